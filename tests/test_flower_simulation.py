"""End to end through Flower's own simulation runtime: `flwr run .` on a local SuperLink."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _left_running(home: Path) -> list[str]:
    """Processes still running whose command line names ``home``, or whose environment has it as
    FLWR_HOME (the SuperLink and everything it started, also in sessions of their own: the
    simulation and Ray's workers)."""
    res = subprocess.run(["pgrep", "-af", str(home)], capture_output=True, text=True)
    left = [line for line in res.stdout.splitlines() if "pgrep" not in line]
    needle = f"FLWR_HOME={home}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    left.append(f"{entry.name} {(entry / 'cmdline').read_bytes()[:200]!r}")
            except OSError:
                continue
    return left


def _still_running(home: Path, wait: float = 30.0) -> list[str]:
    """:func:`_left_running` once the processes have had ``wait`` seconds to exit: a Ray worker whose node
    was killed can take a moment to notice (a process that stays is still reported)."""
    import time

    deadline = time.monotonic() + wait
    left = _left_running(home)
    while left and time.monotonic() < deadline:
        time.sleep(1.0)
        left = _left_running(home)
    return left


def test_flwr_run_small_simulation(small_ml100k, tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    env = dict(os.environ, FLWR_HOME=str(home), PRIVREC_SUPERNODES="4", PRIVREC_CPUS="2")
    overrides = (f"dataset='{small_ml100k}' output-dir='{out}' run-name='e2e' num-server-rounds=2 "
                 f"clients-per-round=3 evaluate-clients=2 eval-every=1 examples-per-user=4 history-len=3 "
                 f"max-length=32 batch-size=2 max-update-norm=1000.0")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "simulate.sh"), "--run-config", overrides],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert not _still_running(home)  # the launcher stopped the SuperLink it started, and all below it
    run_dir = out / "e2e"
    assert (run_dir / "result.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_accepted"] >= 1 for r in rows[1:])
    final = load_file(str(run_dir / "adapters.safetensors"))
    start = load_file(str(run_dir / "checkpoint" / "round-0001.safetensors"))
    assert any(not np.array_equal(final[k], start[f"state.{k}"]) for k in final)
    assert np.abs(final["text_out.weight"]).sum() > 0, "the sequence model's output layer never left zero"
    assert len(list((run_dir / "clients").glob("ledger-user-*.json"))) >= 3
    for png in ("quality.png", "epsilon.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_secure_round_through_flowers_simulation_engine_applies_the_exact_sum_and_no_single_share(
        small_ml100k, tmp_path):
    """secure-aggregation=true through `flwr run .`: the ClientApp's secaggplus_mod masks every share,
    the ServerApp's wire log shows it received no tensor from any device, and round 2 moved the global
    state by exactly the sum of the shares the devices kept (fedavg, server learning rate 1)."""
    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    env = dict(os.environ, FLWR_HOME=str(home), PRIVREC_SUPERNODES="4", PRIVREC_CPUS="2")
    overrides = (f"dataset='{small_ml100k}' output-dir='{out}' run-name='sa' num-server-rounds=2 "
                 f"clients-per-round=4 min-survivors=3 secure-aggregation=true local-dp=false strategy='fedavg' "
                 f"server-learning-rate=1.0 eval-every=1 examples-per-user=4 history-len=3 batch-size=2 "
                 f"wire-log=true user-noise-multiplier=2.0")  # two releases within the budget of 8
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "simulate.sh"), "--run-config", overrides],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert not _still_running(home)
    run_dir = out / "sa"
    assert (run_dir / "result.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    from common.run_config import resolve
    from common.skellam import secure_plan

    before = load_file(str(run_dir / "checkpoint" / "round-0001.safetensors"))
    after = load_file(str(run_dir / "checkpoint" / "round-0002.safetensors"))
    names = sorted(k[len("state."):] for k in before if k.startswith("state."))
    cfg = resolve({"clients-per-round": 4, "min-survivors": 3, "secure-aggregation": True})
    plan = secure_plan(cfg, sum(before[f"state.{n}"].size for n in names))
    shares = [load_file(str(p))["secure-share"] for p in (run_dir / "clients" / "released").glob("*-000002.safetensors")]
    assert len(shares) == 4
    summed = np.sum([np.rint(s / plan.gamma) for s in shares], axis=0) * plan.gamma / 4
    # the exchange order is the sorted tensor names (common.sequence_runtime.exchanged_parameters)
    moved = np.concatenate([(after[f"state.{n}"].astype(np.float64) - before[f"state.{n}"]).ravel() for n in names])
    assert np.allclose(moved, summed, atol=1e-6)
    wire = [json.loads(x) for x in (run_dir / "wire.jsonl").read_text().splitlines()]
    stage2 = [w for w in wire if w["stage"] == "collect_masked_vectors"]
    assert len(stage2) == 8  # 4 devices x 2 rounds, and every one arrived without a tensor
    assert all(all(not keys for keys in w["arrays"].values()) for w in stage2)
    assert all("masked_params" in w["configs"]["secaggplus_configs"] for w in stage2)
    privacy = json.loads((run_dir / "result.json").read_text())["privacy"]
    assert privacy["unit"] == "user" and privacy["user_epsilon"] > 0


def test_the_main_job_exits_non_zero_when_the_run_fails(tmp_path):
    """`flwr run --stream` alone exits 0 when the ServerApp raises; the launcher reads the run's status."""
    home = tmp_path / "flwr-home"
    env = dict(os.environ, FLWR_HOME=str(home), PRIVREC_SUPERNODES="2", PRIVREC_CPUS="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "simulate.sh"), "--run-config",
                           f"dataset='{tmp_path / 'missing'}' output-dir='{tmp_path / 'runs'}' run-name='f'"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert not _still_running(home)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "finished:failed" in proc.stdout and "missing" in proc.stdout
    bad_key = subprocess.run(["bash", str(ROOT / "scripts" / "simulate.sh"), "--run-config", "num-rounds=3"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad_key.returncode == 2 and "num-rounds" in bad_key.stderr


SLOW_CLIENT = """import time

from flwr.clientapp import ClientApp

import client.app as privrec

app = ClientApp()


@app.train()
def train(msg, context):
    if int(context.node_config["partition-id"]) == 0 and int(msg.content["config"]["server-round"]) == 2:
        time.sleep(900)  # a hung client: it answers long after the server stopped waiting
    return privrec.train(msg, context)


@app.evaluate()
def evaluate(msg, context):
    return privrec.evaluate(msg, context)
"""


def test_the_launcher_does_not_wait_for_a_hung_client_after_the_last_round(small_ml100k, tmp_path):
    """The privrec app with one client that sleeps 900 s in the last round: the server counts it as failed
    after round-timeout; the launcher exits 0 soon after the ServerApp completed, stops the runtime that
    still waits for the sleeper, and leaves nothing running."""
    import time

    app_dir = tmp_path / "slowapp"
    app_dir.mkdir()
    pyproject = (ROOT / "pyproject.toml").read_text().replace('clientapp = "client.app:app"',
                                                              'clientapp = "slow_client:app"')
    (app_dir / "pyproject.toml").write_text(pyproject.replace('name = "privrec"', 'name = "privrecslow"'))
    (app_dir / "slow_client.py").write_text(SLOW_CLIENT)
    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1")
    overrides = (f"dataset='{small_ml100k}' output-dir='{out}' run-name='slow' num-server-rounds=2 "
                 f"clients-per-round=4 evaluate-clients=0 eval-every=100 examples-per-user=4 history-len=3 "
                 f"max-length=32 batch-size=2 round-timeout=75.0")
    t0 = time.monotonic()
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "simulations.simulate", "--supernodes", "4",
                           "--cpus", "2", "--app-dir", str(app_dir), "--run-config", overrides],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 600, seconds  # well before the sleeper would have answered
    assert "finished:completed" in proc.stdout
    rounds = [json.loads(x) for x in (out / "slow" / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds[1]["failed"]) == 1 and (out / "slow" / "result.json").exists()
    assert not _still_running(home)


HOLD_A_SUPERLINK = """import sys, time
from simulations.local_superlink import local_superlink
with local_superlink(sys.argv[1], 2, 1) as port:
    print(port, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_a_launcher_told_to_terminate_still_stops_its_superlink(tmp_path, signal_name):
    """kill (or a closed terminal) must not leave the simulation SuperLink and what it started running."""
    import signal

    home = tmp_path / "flwr-home"
    # the default disposition, whatever this test inherited (under nohup SIGHUP is ignored, and stays so)
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), "-c", HOLD_A_SUPERLINK, str(home)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip().isdigit()  # the SuperLink is up
        assert any("flower-superlink" in line for line in _left_running(home))
        proc.send_signal(getattr(signal, signal_name))
        assert proc.wait(timeout=60) == 128 + getattr(signal, signal_name)
        assert not _still_running(home)
    finally:
        proc.kill()


def test_a_launcher_under_nohup_keeps_running_when_its_terminal_closes(tmp_path):
    """SIGHUP ignored by the parent (nohup) stays ignored; SIGTERM still stops everything."""
    import signal
    import time

    home = tmp_path / "flwr-home"
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), "-c", HOLD_A_SUPERLINK, str(home)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        assert proc.stdout.readline().strip().isdigit()
        proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert proc.poll() is None and any("flower-superlink" in line for line in _left_running(home))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert not _still_running(home)
    finally:
        proc.kill()


ADOPT_AND_END = r"""import json, os, subprocess, sys
from simulations import local_superlink as ls

# A process in a session of its own, with no environment at all (no launch marker, no FLWR_HOME), that on
# SIGTERM starts one more such process and exits: what a dying Ray node does with its dashboard agent. It
# writes with os.write, one system call: the SIGTERM can arrive as soon as "ready" is readable, and a handler
# that printed through sys.stdout while the main code was still inside its flush would fail (a reentrant
# call into the same buffered writer) and never start the late process.
DYING_SPAWNER = '''import os, signal, subprocess, sys, time
def late(*_):
    p = subprocess.Popen(["sleep", "300"], env={}, start_new_session=True)
    os.write(1, f"{p.pid}\\n".encode())
    sys.exit(0)
signal.signal(signal.SIGTERM, late)
os.write(1, f"ready {os.getpid()}\\n".encode())
time.sleep(300)
'''
# The SuperLink's stand-in leads a session, starts the spawner in another one and waits; the launcher's
# SIGTERM to its group ends it and leaves the spawner an orphan.
STAND_IN = f'''import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {DYING_SPAWNER!r}], env={{}}, start_new_session=True)
time.sleep(300)
'''
import select, signal
kept = subprocess.Popen(["sleep", "120"])  # this process's own child from before: it must survive
late = None
with ls._adopting_orphans() as keep:
    if keep is None:
        kept.kill()
        print(json.dumps({"unsupported": True}))
        sys.exit(0)
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    spawner = int(proc.stdout.readline().split()[1])
    print(json.dumps({"spawner": spawner}), flush=True)  # for the test to clean up should this script fail
    ls._stop(proc, "no-process-has-this-marker", keep)
    left = ls.descendants(os.getpid())
    if select.select([proc.stdout], [], [], 30)[0]:  # the spawner prints the late process's id when told to end
        line = proc.stdout.readline()
        late = int(line) if line.strip() else None
def alive(pid):
    try:
        return pid is not None and "Z" not in open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1][:3]
    except OSError:
        return False
report = {"spawner": spawner, "left": left, "late": late, "kept": kept.pid, "kept_alive": kept.poll() is None,
          "spawner_alive": alive(spawner), "late_alive": alive(late), "adopting_after": ls.subreaper_flag()}
for pid in (spawner, late, kept.pid):  # nothing of this script outlives it, whatever the outcome
    try:
        os.kill(pid, signal.SIGKILL) if pid else None
    except (ProcessLookupError, PermissionError):
        pass
print(json.dumps(report), flush=True)
"""


def test_the_launcher_ends_adopted_processes_even_one_started_while_dying(tmp_path):
    """Nothing the SuperLink's tree starts can outlive the launcher's stop, whatever its session or environment
    and however late it starts, so long as a live process of the tree started it; the launcher's own earlier
    children are left alone, and it stops adopting orphans afterwards."""
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", ADOPT_AND_END], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    if got.get("unsupported"):
        pytest.skip("this kernel does not let a process adopt orphans (PR_SET_CHILD_SUBREAPER)")
    # the script killed its processes before it reported, so what it reports alive was alive after _stop
    assert got["left"] == [got["kept"]] and got["kept_alive"]
    assert got["late"] is not None  # the spawner was told to end (by _stop) and started its late process
    assert not got["spawner_alive"] and not got["late_alive"]
    assert not got["adopting_after"]
