"""The simulation SuperLink the main job runs on: started by the launcher on a free port outside the
kernel's ephemeral range, declared as the ``local`` connection of ``$FLWR_HOME/config.toml``, and
stopped (with everything it started: SuperExec, the simulation and its Ray workers) when the
launcher ends.

Flower's own managed local SuperLink (``address = ":local:"``) listens on fixed ports, so two
``FLWR_HOME``s (two checkouts, a test beside a benchmark) would share one SuperLink and run on each
other's installation, and it keeps running, detached, after the command that started it.
"""

from __future__ import annotations

import ctypes
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
    with _exit_on_termination(), _adopting_orphans() as keep:
        yield from _serve(home, supernodes, cpus, keep)


LAUNCH_MARKER = "PRIVREC_LAUNCH_ID"


@contextmanager
def _adopting_orphans() -> Iterator[set[tuple[int, int]] | None]:
    """While inside, this process adopts the orphans of its descendants (Linux subreaper), so that what the
    SuperLink starts (Ray's processes, once their parent died) comes back here rather than to init and
    :func:`_stop` can end it whatever session or environment it has. Yields the processes already below
    this one (pid, start time), which are not the SuperLink's, or None where adopting is not possible."""
    was = subreaper_flag()
    if not set_subreaper(True):
        yield None
        return
    try:
        table = _processes()
        yield {(pid, table[pid][2]) for pid in descendants(os.getpid(), table)}
    finally:
        if not was:
            set_subreaper(False)


def _serve(home: str | Path, supernodes: int, cpus: int | None,
           keep: set[tuple[int, int]] | None = None) -> Iterator[int]:
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
            _stop(proc, env[LAUNCH_MARKER], keep)
            raise
        if proc.poll() is None and _healthy(port):
            break
        last_error = f"exit code {proc.poll()}" if proc.poll() is not None else "no answer"
        _stop(proc, env[LAUNCH_MARKER], keep)
    else:
        raise RuntimeError(f"the simulation SuperLink did not start ({last_error}); see {logs / 'superlink.log'}")
    try:
        write_simulation_connection(home, port, supernodes, cpus)
        yield port
    finally:
        _stop(proc, env[LAUNCH_MARKER], keep)


def _stop(proc: subprocess.Popen, marker: str, keep: set[tuple[int, int]] | None = None) -> None:
    """Terminate the SuperLink's whole process group (it leads a session of its own), then every
    process that carries this launch's marker (the simulation Flower starts in a session of its own
    and Ray's workers, which a failed run, e.g. one whose heartbeat was lost, would otherwise leave
    running), then kill whatever is left; a second SIGTERM or SIGHUP meanwhile does not interrupt this.
    With ``keep`` (this process adopts orphans), every other live descendant is ended too, including a
    child the caller started inside the ``with`` block and has not waited for: it is killed and reaped,
    so its ``Popen.returncode`` means nothing afterwards."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _terminate_group(proc)
        # with the tree adopted, terminate_descendants ends a late starter: no quiet watch needed here
        _terminate_marked(marker, settle=6.0 if keep is None else 0.0)
        if keep is not None:  # everything else below this (subreaper) process, adopted orphans included
            terminate_descendants(keep)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # linux/prctl.h


def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def subreaper_flag() -> bool:
    """Whether this process adopts its orphaned descendants (False where it cannot be read)."""
    prctl, flag = _prctl(), ctypes.c_int(0)
    return prctl is not None and prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and bool(flag.value)


def set_subreaper(on: bool) -> bool:
    """Make this process adopt (or stop adopting) its orphaned descendants (Linux
    ``PR_SET_CHILD_SUBREAPER``); False where the system does not allow it."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def _processes() -> dict[int, tuple[int, str, int]]:
    """Every process's parent id, state and start time (clock ticks since boot; with the id, an identity
    that survives id reuse), zombies included (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        out[int(entry.name)] = (int(fields[1]), fields[0], int(fields[19]))
    return out


def descendants(root: int, table: dict[int, tuple[int, str, int]] | None = None) -> list[int]:
    """Ids of the live (not zombie) processes below ``root``: children, their children, ..."""
    table = _processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo, seen = [], list(children.get(root, [])), {root}
    while todo:
        pid = todo.pop()
        if pid in seen:  # a scan is not atomic: an id reused meanwhile must not make a cycle
            continue
        seen.add(pid)
        if table[pid][1] not in ("Z", "X"):
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def terminate_descendants(keep: set[tuple[int, int]], grace: float = 10.0, rounds: int = 20) -> list[int]:
    """SIGTERM, then SIGKILL, every live descendant of this process except the ``keep`` processes (pid,
    start time) and what is below them, reaping the exited ones that are its children, until two scans
    in a row find none. In a subreaper every orphan of the tree comes back here, and only a live process
    can start another, so once the tree is empty nothing of it can appear again (the second scan covers
    a process read before its parent died and reparented after). Returns what was still alive at the
    end (empty unless something survived every SIGKILL round)."""
    me = os.getpid()

    def targets() -> list[int]:
        table = _processes()
        kept = {pid for pid, start in keep if pid in table and table[pid][2] == start}
        spared = set(kept)
        for pid in kept:
            spared.update(descendants(pid, table))
        for pid, (ppid, state, _) in table.items():  # collect our exited children, never a kept one
            if ppid == me and state == "Z" and pid not in kept:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        return [pid for pid in descendants(me, table) if pid not in spared]

    pids = targets()
    empty_scans = 0
    for sig in (signal.SIGTERM, *[signal.SIGKILL] * rounds):
        signalled: set[int] = set()
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            if not pids:
                empty_scans += 1
                if empty_scans >= 2:
                    return []
            else:
                empty_scans = 0
            for pid in set(pids) - signalled:  # also one started meanwhile
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):  # gone, or an id reused by another user's process
                    pass
                signalled.add(pid)
            time.sleep(0.1)
            pids = targets()
    return pids


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
