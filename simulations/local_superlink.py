"""The simulation SuperLink the main job runs on: started by the launcher on a free port outside the
kernel's ephemeral range, declared as the ``local`` connection of ``$FLWR_HOME/config.toml``, and
stopped (with everything it started: SuperExec, the simulation and its Ray workers) when the
launcher ends.

Flower's own managed local SuperLink (``address = ":local:"``) listens on fixed ports, so two
``FLWR_HOME``s (two checkouts, a test beside a benchmark) would share one SuperLink and run on each
other's installation, and it keeps running, detached, after the command that started it.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.flower_env import flwr_env
from common.io import write_text_atomic

LOWEST_PORT = 10000
STARTUP_TIMEOUT_S = 60.0


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports it hands out to outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(rng: random.Random | None = None, tries: int = 200) -> int:
    """A port below the ephemeral range (so no outgoing connection takes it meanwhile) that is free now."""
    rng = rng or random.Random(os.urandom(16))
    low, high = ephemeral_range()
    top = low - 1 if low > LOWEST_PORT + 100 else 65535
    bottom = LOWEST_PORT if low > LOWEST_PORT + 100 else high + 1
    for _ in range(tries):
        port = rng.randint(bottom, top)
        if port_is_free(port):
            return port
    raise RuntimeError(f"no free port found in {bottom}-{top}")


def _healthy(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success
    except httpx.HTTPError:
        return False


def write_simulation_connection(home: Path, port: int, supernodes: int, cpus: int | None) -> Path:
    """Declare the ``local`` connection (this SuperLink, with the simulation's options) as the default."""
    lines = ['[superlink]', 'default = "local"', '', '[superlink.local]', f'address = "127.0.0.1:{port}"',
             'insecure = true', f'options.num-supernodes = {int(supernodes)}',
             'options.backend.client-resources.num-cpus = 1']
    if cpus is not None:  # with RAY_ADDRESS set Ray joins that cluster and refuses a CPU count
        lines.append(f'options.backend.init-args.num-cpus = {int(cpus)}')
    return write_text_atomic(home / "config.toml", "\n".join(lines) + "\n")


@contextmanager
def _exit_on_termination() -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP end this process through SystemExit, as Ctrl-C does through
    KeyboardInterrupt, so the ``finally`` below still stops the SuperLink (their default action
    would end the process at once and leave it running). A signal this process ignores (SIGHUP
    under ``nohup``) stays ignored."""
    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, _exit) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def local_superlink(home: str | Path, supernodes: int, cpus: int | None) -> Iterator[int]:
    """Start a simulation SuperLink for ``home`` on a free port, declare it in ``home``'s config, yield
    the port, and stop it and every process it started afterwards, also when this process is told to
    terminate (SIGTERM, SIGHUP) or interrupted."""
    with _exit_on_termination():
        yield from _serve(home, supernodes, cpus)


LAUNCH_MARKER = "PRIVREC_LAUNCH_ID"


def _serve(home: str | Path, supernodes: int, cpus: int | None) -> Iterator[int]:
    home = Path(home).resolve()
    env = flwr_env(home)
    # Inherited by everything the SuperLink starts, also what leaves its process group (Flower starts
    # the simulation, and Ray its workers, in sessions of their own): :func:`_stop` ends those by it.
    env[LAUNCH_MARKER] = secrets.token_hex(16)
    logs = home / "local-superlink"
    logs.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(5):  # another process may take the port between the check and the bind
        port = free_port()
        cmd = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
               "--port", str(port), "--database", str(logs / "state.db"), "--log-file", str(logs / "superlink.log")]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:  # a signal while it starts must stop it too
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None and not _healthy(port):
                time.sleep(0.3)
        except BaseException:
            _stop(proc, env[LAUNCH_MARKER])
            raise
        if proc.poll() is None and _healthy(port):
            break
        last_error = f"exit code {proc.poll()}" if proc.poll() is not None else "no answer"
        _stop(proc, env[LAUNCH_MARKER])
    else:
        raise RuntimeError(f"the simulation SuperLink did not start ({last_error}); see {logs / 'superlink.log'}")
    try:
        write_simulation_connection(home, port, supernodes, cpus)
        yield port
    finally:
        _stop(proc, env[LAUNCH_MARKER])


def _stop(proc: subprocess.Popen, marker: str) -> None:
    """Terminate the SuperLink's whole process group (it leads a session of its own), then every
    process that carries this launch's marker (the simulation Flower starts in a session of its own
    and Ray's workers, which a failed run, e.g. one whose heartbeat was lost, would otherwise leave
    running), then kill whatever is left; a second SIGTERM or SIGHUP meanwhile does not interrupt this."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _terminate_group(proc)
        _terminate_marked(marker)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def marked_processes(marker: str) -> list[int]:
    """Ids of the processes whose environment holds ``LAUNCH_MARKER=marker`` (Linux /proc)."""
    needle = f"{LAUNCH_MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _terminate_marked(marker: str, grace: float = 10.0, settle: float = 6.0, rounds: int = 5) -> None:
    """SIGTERM every marked process, SIGKILL what is left after ``grace``; then watch for ``settle``
    seconds, because a dying Ray node can still start a process (its dashboard agent) after the last
    scan: whatever appears is killed too, up to ``rounds`` times. (With 2 s, CI once saw an agent start
    after the quiet window on loaded cores and outlive the run.)"""
    for sig in (signal.SIGTERM, *[signal.SIGKILL] * rounds):
        pids = marked_processes(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = marked_processes(marker)
        if pids:
            continue
        quiet_until = time.monotonic() + settle
        while not pids and time.monotonic() < quiet_until:
            time.sleep(0.2)
            pids = marked_processes(marker)
        if not pids:
            return


def _terminate_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
