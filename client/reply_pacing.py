"""Replies released on a public time grid: when a reply arrives tells the server nothing of the data.

Under DP a session's tensors have the same shape on every device, but reading the device's files and
building its rows still take longer the more it holds (a few milliseconds, measured by
``simulations/bench_timing.py``). The server sees when each reply arrives, and each reply's metadata
says when it was made. This ClientApp mod (the outermost, so around every handler, every secure-round
stage, every refusal and every error a handler raises) holds the reply until the first whole multiple
of the device's ``reply-time-quantum`` after it started handling the request, at least one quantum,
and only then stamps it (a fresh reply to the request: creation time and time-to-live). A device whose
work fits in one quantum therefore replies exactly one quantum after it took the request, whatever it
holds. A slower one reveals how many quanta its work took: a server that sizes the public work to end
near a boundary could learn whether the data-dependent milliseconds crossed it, so the quantum must sit
well above the slowest session, and the device logs a warning when a reply took more than half of it.
The quantum is the device's own (its policy's ``privacy-reply-time-quantum``), never the run's, so a
server cannot turn it off.
"""

from __future__ import annotations

import math
import time
from logging import WARNING
from typing import Callable

from flwr.app import Context, Message
from flwr.common.logger import log

from common.device_policy import DevicePolicy

# Injectable for tests (a fake clock decides how long a handler "took").
clock: Callable[[], float] = time.monotonic
sleep: Callable[[float], None] = time.sleep

_WHOLE = 1e-9  # elapsed times within this share of a whole quantum count as that whole quantum (float rounding)


def quanta_needed(elapsed: float, quantum: float) -> int:
    """How many whole quanta a reply whose work took ``elapsed`` seconds waits for (at least one)."""
    return max(1, math.ceil(elapsed / quantum - _WHOLE))


def release_time(start: float, now: float, quantum: float) -> float:
    """The first whole multiple of ``quantum`` after ``start`` that is not before ``now`` (at least one
    quantum after ``start``); ``now`` itself when ``quantum`` is 0 (no pacing)."""
    if quantum <= 0:
        return now
    return start + quanta_needed(now - start, quantum) * quantum


def device_quantum(node_config) -> float:
    """The device's reply time quantum from its policy; the default device's when the policy cannot be read
    (the handler then refuses, and that refusal is paced like any reply)."""
    try:
        return DevicePolicy.from_node_config(node_config).reply_time_quantum
    except Exception:  # noqa: BLE001 - any unreadable policy: the default, never no pacing
        return DevicePolicy().reply_time_quantum


def wait_until(deadline: float) -> None:
    """Sleep until ``clock()`` reaches ``deadline`` (sleep may return early on some platforms: re-check)."""
    while (left := deadline - clock()) > 0:
        sleep(left)


def restamped(reply: Message, request: Message) -> Message:
    """The same reply made afresh now, so its creation time and time-to-live are those of its release (every
    other metadata field of a reply is taken from its request, so only those two change)."""
    if reply.metadata.reply_to_message_id != request.metadata.message_id:
        raise ValueError("a handler returned a message that is not a reply to its request")
    if reply.has_error():
        return Message(reply.error, reply_to=request)
    return Message(reply.content, reply_to=request)


def reply_pacing_mod(msg: Message, context: Context, call_next) -> Message:
    """Run the handler, then hold its reply (or its exception) until the device's next time quantum."""
    quantum = device_quantum(context.node_config)
    start = clock()
    try:
        reply = call_next(msg, context)
    finally:
        elapsed = clock() - start
        if quantum > 0 and elapsed > quantum / 2:
            log(WARNING, "privrec client: a reply's work took %.3f s, more than half of this device's reply time "
                         "quantum (%.3f s): raise privacy-reply-time-quantum so that no reply needs a second one",
                elapsed, quantum)
        wait_until(release_time(start, start + elapsed, quantum))
    return restamped(reply, msg) if quantum > 0 else reply
