"""Replies on the device's public time grid (client.reply_pacing): when a reply leaves, and the time its
metadata says it was made, do not depend on how long the work took; a server cannot turn the pacing off;
refusals and errors are paced too. Time is a fake clock throughout, so nothing here depends on the machine."""

from __future__ import annotations

import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app
import client.reply_pacing as pacing
from common.device_policy import DevicePolicy
from common.errors import ConfigError


class FakeClock:
    """A clock that only moves when told: by a handler's pretended work or by a hold."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.holds: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.holds.append(seconds)
        self.now += seconds

    def timestamp(self) -> float:  # flwr's now().timestamp() in the replies' metadata
        return self.now


@pytest.fixture
def fake(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(pacing, "clock", fake.clock)
    monkeypatch.setattr(pacing, "sleep", fake.sleep)
    monkeypatch.setattr("flwr.app.message.message.now", lambda: fake)  # the time a reply is stamped with
    return fake


def request(message_type: str = MessageType.TRAIN) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Message(RecordDict(), dst_node_id=5, message_type=message_type)


def context(**node_config) -> Context:
    return Context(run_id=1, node_id=5, state=RecordDict(), run_config={}, node_config=node_config)


def test_release_time_is_the_first_whole_quantum_not_before_the_reply():
    assert pacing.release_time(10.0, 10.3, 1.0) == 11.0
    assert pacing.release_time(10.0, 10.0, 1.0) == 11.0  # at least one quantum
    assert pacing.release_time(10.0, 11.0, 1.0) == 11.0
    assert pacing.release_time(10.0, 11.2, 1.0) == 12.0  # a slower reply reveals only its count of quanta
    assert pacing.release_time(10.0, 10.3, 0.0) == 10.3  # 0: no pacing
    # work of exactly k quanta waits k, not k + 1, whatever the float rounding of the two clock readings
    assert all(pacing.quanta_needed((s + 0.1 * k) - s, 0.1) == k for s in (0.0, 7.3, 1e5 + 0.7) for k in range(1, 50))


def test_the_quantum_is_the_devices_policy_and_simulated_devices_are_not_paced():
    assert DevicePolicy().reply_time_quantum == 1.0
    assert pacing.device_quantum({"data-path": "/d"}) == 1.0
    assert pacing.device_quantum({"data-path": "/d", "privacy-reply-time-quantum": 2.5}) == 2.5
    assert pacing.device_quantum({"data-path": "/d", "privacy-reply-time-quantum": 0}) == 0.0  # the owner's choice
    assert pacing.device_quantum({"partition-id": 3}) == 0.0  # nobody outside the study times a simulated reply
    # an unreadable policy falls back to the default device's quantum (the handler refuses, paced)
    assert pacing.device_quantum({"data-path": "/d", "privacy-unknown": 1}) == 1.0
    assert pacing.device_quantum({"data-path": "/d", "privacy-reply-time-quantum": 10**400}) == 1.0
    for bad in (-1.0, 1e-310, float("nan"), float("inf"), 301.0, True, "1", 10**400):
        with pytest.raises(ConfigError):
            DevicePolicy.from_node_config({"data-path": "/d", "privacy-reply-time-quantum": bad})
    longest = DevicePolicy.from_node_config({"data-path": "/d", "privacy-reply-time-quantum": 300})
    assert longest.reply_time_quantum == 300


def handler(fake: FakeClock, took: float, fail: bool = False):
    def call_next(msg: Message, ctx: Context) -> Message:
        reply = Message(RecordDict(), reply_to=msg)  # stamped when the work ends
        fake.now += took
        if fail:
            raise RuntimeError("a secure round's drop-out")
        return reply
    return call_next


@pytest.mark.parametrize("took, quanta", [(0.0, 1), (0.01, 1), (0.7, 1), (1.0, 1), (1.3, 2)])
def test_a_reply_leaves_and_is_stamped_at_a_whole_quantum_however_long_the_work_took(fake, took, quanta):
    msg = request()
    start = fake.now
    reply = pacing.reply_pacing_mod(msg, context(**{"data-path": "/d"}), handler(fake, took))
    assert fake.now - start == pytest.approx(quanta * 1.0, abs=1e-9)
    assert reply.metadata.created_at == fake.now  # made afresh at its release, not when the work ended
    assert reply.metadata.created_at + reply.metadata.ttl == pytest.approx(msg.metadata.created_at
                                                                           + msg.metadata.ttl)
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id


def test_an_error_reply_is_restamped_too(fake):
    msg = request()
    start = fake.now

    def failing(m: Message, ctx: Context) -> Message:
        return Message(Error(code=0, reason="x"), reply_to=m)

    reply = pacing.reply_pacing_mod(msg, context(**{"data-path": "/d"}), failing)
    assert reply.has_error() and reply.error.reason == "x"
    assert reply.metadata.created_at == fake.now == start + 1.0


def test_an_exception_is_held_like_a_reply_and_still_raised(fake):
    start = fake.now
    with pytest.raises(RuntimeError, match="drop-out"):
        pacing.reply_pacing_mod(request(), context(**{"data-path": "/d", "privacy-reply-time-quantum": 2.0}),
                                handler(fake, 0.5, fail=True))
    assert fake.now - start == 2.0


def test_a_simulated_device_replies_at_once(fake):
    reply = pacing.reply_pacing_mod(request(), context(**{"partition-id": 0}), handler(fake, 0.2))
    assert fake.holds == [] and reply.metadata.created_at == fake.now - 0.2  # untouched


def test_the_run_config_cannot_turn_pacing_off(fake):
    ctx = context(**{"data-path": "/d"})
    ctx.run_config = {"privacy-reply-time-quantum": 0, "reply-time-quantum": 0}
    start = fake.now
    pacing.reply_pacing_mod(request(), ctx, handler(fake, 0.1))
    assert fake.now - start == 1.0


def test_pacing_wraps_every_handler_of_the_client_app():
    """The app-level mod is the outermost of every registered handler (Flower: app mods, then the handler's);
    the app registers only these two, and Flower answers any other message type before any mod or data."""
    assert client_app.app._mods == [pacing.reply_pacing_mod]  # noqa: SLF001 - Flower keeps them here
    assert set(client_app.app._registered_funcs) == {"train.default", "evaluate.default"}  # noqa: SLF001


def test_a_reply_whose_work_took_more_than_half_its_quantum_is_logged_for_the_owner(fake, monkeypatch):
    logged: list[str] = []
    monkeypatch.setattr(pacing, "log", lambda level, fmt, *args: logged.append(fmt % args))
    pacing.reply_pacing_mod(request(), context(**{"data-path": "/d"}), handler(fake, 0.4))
    assert logged == []
    pacing.reply_pacing_mod(request(), context(**{"data-path": "/d"}), handler(fake, 0.6))
    assert len(logged) == 1 and "raise privacy-reply-time-quantum" in logged[0]


def test_a_handler_answering_another_message_is_not_passed_off_as_this_ones_reply(fake):
    other = request()
    other.metadata.__dict__["_message_id"] = "another"  # as the SuperLink would have set it

    def stray(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict(), reply_to=other)

    with pytest.raises(ValueError, match="not a reply to its request"):
        pacing.reply_pacing_mod(request(), context(**{"data-path": "/d"}), stray)
