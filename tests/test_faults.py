"""Fault injection: hostile replies of every kind, clients that die, a server killed and resumed,
corrupt checkpoints and ledgers, a full disk. Each run completes or stops with an error that names
the file; the global model stays finite; nothing is lost; no ledger under-reports.

Run alone with ``pytest -m faults``.
"""

from __future__ import annotations

import io

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from common.errors import DataFormatError
from common.ledger import PrivacyLedger
from server.audit.accounting import write_audit
from server.federation import Federation
from simulations.inprocess_grid import InProcessGrid, state_of

pytestmark = pytest.mark.faults


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


def _set_metric(content, **values) -> None:
    metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
    metrics.update(values)
    content["metrics"] = MetricRecord(metrics)


# node -> what its reply is turned into (nodes 101..106 are partitions 0..5)
HOSTILE_TRAIN = {
    101: lambda c: _set_metric(c, **{"num-examples": float("nan")}),  # a field outside the wire list
    102: lambda c: _set_metric(c, epsilon=float("nan")),
    103: lambda c: _set_metric(c, epsilon=-5.0),
    104: lambda c: _set_metric(c, epsilon=1e300),
    105: lambda c: c.__delitem__("metrics"),
}


def _tamper_train(node, content):
    if node in HOSTILE_TRAIN and "arrays" in content.array_records:
        HOSTILE_TRAIN[node](content)


def test_hostile_train_replies_are_rejected_and_never_reach_the_model_or_the_report(small_run_config):
    cfg = dict(small_run_config, **{"clients-per-round": 6, "num-server-rounds": 1, "evaluate-clients": 0,
                                    "max-failed-share": 1.0})  # the run goes on whatever is rejected
    grid = InProcessGrid(6, cfg, tamper=_tamper_train)
    fed = Federation(grid, cfg)
    run_dir = fed.run()
    row = _rows(run_dir)[1]
    assert row["clients_rejected"] == 5 and row["clients_accepted"] == 1
    assert all(np.isfinite(a).all() for a in fed.arrays)
    result = json.loads((run_dir / "result.json").read_text())  # strict JSON: no NaN anywhere
    assert 0 < result["privacy"]["epsilon"] <= 8.0
    assert all(0 <= e <= 8.0 for e in fed.client_epsilon.values())
    assert set(fed.client_epsilon) == {"106"}  # no epsilon taken from a rejected reply's metrics
    assert all(np.isfinite(v) for v in result["metrics"].values())


@pytest.mark.parametrize("bad", ["nan-state", "huge-update", "wrong-dtype", "extra-record", "unreadable-arrays",
                                 "npz-archive", "bytes-of-another-dtype"])
def test_malformed_tensors_are_rejected(small_run_config, bad):
    def tamper(node, content):
        if "arrays" not in content.array_records:
            return
        arrays = state_of(content)
        first = next(iter(arrays))
        if bad == "nan-state":
            arrays[first] = np.full_like(arrays[first], np.nan)
        elif bad == "huge-update":
            arrays[first] = arrays[first] + 1e30
        elif bad == "wrong-dtype":
            arrays[first] = arrays[first].astype(np.float64)
        elif bad == "extra-record":
            content["loss"] = ConfigRecord({"train-loss": 1.0})
            return
        elif bad in ("npz-archive", "bytes-of-another-dtype"):
            # the metadata declares the expected dtype and shape; the bytes are an .npz archive (np.load
            # would return an archive object, not an array) or a float64 .npy
            honest = Array(arrays[first])
            if bad == "npz-archive":
                buffer = io.BytesIO()
                np.savez(buffer, x=arrays[first])
                data = buffer.getvalue()
            else:
                data = Array(arrays[first].astype(np.float64)).data
            records = {k: Array(v) for k, v in arrays.items()}
            records[first] = Array(dtype=honest.dtype, shape=tuple(honest.shape), stype=honest.stype, data=data)
            content["arrays"] = ArrayRecord(records)
            return
        else:
            content["arrays"] = ArrayRecord({first: Array(np.array(["not", "numbers"]))})
            return
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})

    cfg = dict(small_run_config, **{"clients-per-round": 3, "num-server-rounds": 1, "evaluate-clients": 0,
                                    "max-failed-share": 1.0})
    fed = Federation(InProcessGrid(6, cfg, tamper=tamper), cfg)
    start = [a.copy() for a in fed.arrays]
    fed.run()
    assert _rows(fed.folder.root)[1]["clients_rejected"] == 3
    assert all(np.array_equal(a, b) for a, b in zip(start, fed.arrays))


class _EvaluationTamper(InProcessGrid):
    """Evaluation replies replaced by hostile ones."""

    def __init__(self, *args, evil, **kwargs):
        super().__init__(*args, **kwargs)
        self.evil = evil

    def send_and_receive(self, messages, timeout):
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            if reply.metadata.message_type == "evaluate" and "status" not in reply.content.config_records:
                self.evil(reply.content)
        return replies


@pytest.mark.parametrize("evil", [
    lambda c: c.__delitem__("metrics"),
    lambda c: _set_metric(c, **{"HR@10": float("nan")}),
    lambda c: _set_metric(c, **{"NDCG@10": 1e9}),
    lambda c: c["metrics"].__delitem__("HR@10"),
    lambda c: c.__setitem__("arrays", ArrayRecord({"x": Array(np.zeros(3, dtype=np.float32))})),
], ids=["no-metrics", "nan", "1e9", "no-hr", "extra-record"])
def test_hostile_evaluation_replies_are_rejected_and_the_round_completes(small_run_config, evil):
    cfg = dict(small_run_config, **{"num-server-rounds": 1, "evaluate-clients": 6, "eval-noise-multiplier": 1.0,
                                    "client-epsilon-budget": 8.0})
    fed = Federation(_EvaluationTamper(6, cfg, evil=evil), cfg)
    run_dir = fed.run()
    row = _rows(run_dir)[1]
    assert row["federated_rejected"] == 6 and row["federated_clients"] == 0 and "federated_NDCG@10" not in row
    json.loads((run_dir / "result.json").read_text())


def test_one_evaluator_can_no_longer_swing_the_federated_evaluation(small_run_config):
    """One of 6 evaluators reporting 227.3 (accepted before: it made the federated HR@10 37.7). A value
    outside the honest range is rejected; one inside it moves the median by at most one rank."""
    from server.validation import evaluation_release_range

    cfg = dict(small_run_config, **{"num-server-rounds": 1, "evaluate-clients": 6, "eval-noise-multiplier": 4.0,
                                    "client-epsilon-budget": 8.0})
    high = evaluation_release_range(4.0)[1]
    for value, rejected in ((227.3, 1), (high, 0)):
        first = []

        def evil(content, value=value):
            if not first:  # the first evaluation reply of the round only
                first.append(True)
                _set_metric(content, **{"HR@10": value, "NDCG@10": value})

        grid = _EvaluationTamper(6, dict(cfg, **{"run-name": f"one-evaluator-{rejected}"}), evil=evil)
        run_dir = Federation(grid, dict(cfg, **{"run-name": f"one-evaluator-{rejected}"})).run()
        row = _rows(run_dir)[1]
        honest = sorted(dict(r.content["metrics"])["HR@10"] for r in grid.replies
                        if r.metadata.message_type == "evaluate")[:-1 if not rejected else None]
        assert row["federated_rejected"] == rejected and row["federated_clients"] == 6 - rejected
        if rejected:
            continue
        # the median of the 6 (one at the top of the range) lies between the honest values' order statistics
        assert honest[2] <= row["federated_HR@10"] <= honest[-1]


def test_a_non_finite_model_fails_evaluation_loudly_instead_of_scoring_perfectly(small_run_config):
    from common.metrics import NonFiniteScoresError

    cfg = dict(small_run_config, **{"num-server-rounds": 1})
    fed = Federation(InProcessGrid(6, cfg), cfg)
    fed.arrays[-1] = np.full_like(fed.arrays[-1], np.nan)
    with pytest.raises((NonFiniteScoresError, ValueError)):
        fed.evaluator.evaluate(fed.names, fed.arrays)


def test_dead_clients_leave_their_spend_and_the_round_completes(small_run_config):
    cfg = dict(small_run_config, **{"clients-per-round": 6, "num-server-rounds": 2, "evaluate-clients": 0})
    fed = Federation(InProcessGrid(6, cfg, drop={101, 102}), cfg)
    run_dir = fed.run()
    rows = _rows(run_dir)
    assert [r["clients_failed"] for r in rows[1:]] == [2, 2] and all(r["clients_accepted"] == 4 for r in rows[1:])
    report = write_audit(run_dir)[2]
    assert report["all_checks_passed"], [c for c in report["checks"] if c["status"] == "fail"]


def test_clients_reporting_no_spend_cannot_lower_the_stated_epsilon(small_run_config):
    cfg = dict(small_run_config, **{"num-server-rounds": 1, "evaluate-clients": 0})
    grid = InProcessGrid(6, cfg, tamper=lambda node, c: _set_metric(c, epsilon=0.0)
                         if "arrays" in c.array_records else None)
    run_dir = Federation(grid, cfg).run()
    privacy = json.loads((run_dir / "result.json").read_text())["privacy"]
    ledgers = max(PrivacyLedger.load(p).epsilon for p in (run_dir / "clients").glob("ledger-*.json"))
    assert privacy["epsilon_reported_by_devices"] == 0.0
    assert privacy["epsilon"] == pytest.approx(ledgers) and ledgers > 5


def test_a_run_whose_clients_mostly_fail_stops_loudly_after_checkpointing(small_run_config):
    """4 of 6 sampled clients dead (a killed simulation worker, unreachable devices): the run must not go
    on and report success on the two that answered."""
    cfg = dict(small_run_config, **{"clients-per-round": 6, "num-server-rounds": 3, "evaluate-clients": 0})
    fed = Federation(InProcessGrid(6, cfg, drop={101, 102, 103, 104}), cfg)
    with pytest.raises(RuntimeError, match=r"round 1: 4 of 6 sampled clients sent no usable reply.*max-failed-share 0.5"):
        fed.run()
    run_dir = Path(cfg["output-dir"]) / cfg["run-name"]
    assert json.loads((run_dir / "checkpoint" / "latest.json").read_text())["round"] == 1  # resumable
    assert not (run_dir / "result.json").exists()
    looser = dict(cfg, **{"resume": True, "max-failed-share": 0.7})
    Federation(InProcessGrid(6, looser, drop={101, 102, 103}), looser).run()  # 3 of 6: within 0.7
    assert (run_dir / "result.json").exists()


def test_a_killed_server_resumes_and_the_accounting_stays_whole(small_run_config, monkeypatch):
    import server.federation as federation_mod

    cfg = dict(small_run_config, **{"num-server-rounds": 3, "evaluate-clients": 0, "eval-every": 100})
    real = Federation._aggregate

    def die_in_round_2(self, rnd, accepted):
        if rnd == 2:
            raise KeyboardInterrupt("server killed after the round's sessions were spent")
        return real(self, rnd, accepted)

    monkeypatch.setattr(federation_mod.Federation, "_aggregate", die_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        Federation(InProcessGrid(6, cfg), cfg).run()
    monkeypatch.undo()
    run_dir = Path(cfg["output-dir"]) / cfg["run-name"]
    spent = {p.name: PrivacyLedger.load(p).epsilon for p in (run_dir / "clients").glob("ledger-*.json")}
    resumed = dict(cfg, resume=True)
    Federation(InProcessGrid(6, resumed), resumed).run()
    assert [r["round"] for r in _rows(run_dir)] == [0, 1, 2, 3]
    for name, eps in spent.items():  # sessions of the interrupted round stay recorded
        assert PrivacyLedger.load(run_dir / "clients" / name).epsilon >= eps
    report = write_audit(run_dir)[2]
    assert report["all_checks_passed"], [c for c in report["checks"] if c["status"] == "fail"]


def _round_replies(grid: InProcessGrid, server_round: int) -> dict[int, tuple]:
    """node -> (tensor bytes, metrics) of the train replies ``grid`` carried for ``server_round``."""
    out = {}
    for msg, reply in zip(grid.sent, grid.replies):
        if msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == server_round:
            arrays = state_of(reply.content) if "arrays" in reply.content.array_records else {}
            out[int(msg.metadata.dst_node_id)] = ({k: v.tobytes() for k, v in arrays.items()},
                                                  dict(reply.content["metrics"]))
    return out


def test_a_resumed_round_gets_the_replies_already_released_without_a_new_spend(small_run_config, monkeypatch):
    """Killed mid-round after its clients answered: on resume they send the same bytes again instead of
    spending a second session (at a budget of one session they would otherwise refuse)."""
    import server.federation as federation_mod

    # one session of this configuration costs epsilon 5.38, two cost 7.41: a budget of 6 allows one
    cfg = dict(small_run_config, **{"num-server-rounds": 2, "clients-per-round": 3, "evaluate-clients": 0,
                                    "eval-every": 100, "client-epsilon-budget": 6.0})
    real = Federation._aggregate

    def die_in_round_2(self, rnd, accepted):
        if rnd == 2:
            raise KeyboardInterrupt("server killed after the round's replies arrived")
        return real(self, rnd, accepted)

    monkeypatch.setattr(federation_mod.Federation, "_aggregate", die_in_round_2)
    killed = InProcessGrid(6, cfg)
    with pytest.raises(KeyboardInterrupt):
        Federation(killed, cfg).run()
    monkeypatch.undo()
    before = _round_replies(killed, 2)
    assert len(before) == 3 and all(tensors for tensors, _ in before.values())
    resumed_cfg = dict(cfg, resume=True)
    resumed = InProcessGrid(6, resumed_cfg)
    run_dir = Federation(resumed, resumed_cfg).run()
    after = _round_replies(resumed, 2)
    assert after == before  # the same bytes, the same reported spend
    assert _rows(run_dir, "rounds.jsonl")[1]["trained"] == sorted(before)
    for p in (run_dir / "clients").glob("ledger-*.json"):
        rounds = [s.round for s in PrivacyLedger.load(p).sessions if s.kind == "dp-sgd"]
        assert len(rounds) == len(set(rounds)) <= 1  # nobody spent twice for one round
    report = write_audit(run_dir)[2]
    assert report["all_checks_passed"], [c for c in report["checks"] if c["status"] == "fail"]


@pytest.fixture(scope="module")
def checkpointed_run(small_ml100k, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = {"dataset": str(small_ml100k), "num-server-rounds": 1, "clients-per-round": 3, "evaluate-clients": 0,
           "eval-every": 1, "examples-per-user": 4, "history-len": 3, "max-length": 32, "batch-size": 2,
           "noise-multiplier": 2.0, "max-update-norm": 1000.0, "output-dir": str(out), "run-name": "ck"}
    Federation(InProcessGrid(6, cfg), cfg).run()
    return cfg, out / "ck"


def _corrupt(kind: str, run_dir: Path) -> str:
    """Damage the run folder; returns the file name the error must name."""
    ck = run_dir / "checkpoint"
    latest = json.loads((ck / "latest.json").read_text())
    weights = ck / latest["weights"]
    if kind == "truncated-latest":
        (ck / "latest.json").write_text((ck / "latest.json").read_text()[:40])
        return "latest.json"
    if kind == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:100])
        return weights.name
    if kind == "nan-weights":  # a rewritten file whose digest was updated too: caught by the finite check
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(weights))
        first = next(k for k in tensors if k.startswith("state."))
        tensors[first] = np.full_like(tensors[first], np.nan)
        save_file(tensors, str(weights))
        import hashlib

        latest["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        (ck / "latest.json").write_text(json.dumps(latest))
        return weights.name
    if kind == "flipped-byte":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x01
        weights.write_bytes(bytes(data))
        return weights.name
    if kind in ("truncated-metrics", "truncated-rounds"):
        path = run_dir / ("metrics.jsonl" if kind == "truncated-metrics" else "rounds.jsonl")
        path.write_text(path.read_text()[:-20])
        return path.name
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated-latest", "truncated-weights", "nan-weights", "flipped-byte",
                                  "truncated-metrics", "truncated-rounds"])
def test_a_corrupt_checkpoint_or_record_is_refused_naming_the_file(checkpointed_run, tmp_path, kind):
    cfg, run_dir = checkpointed_run
    copy = tmp_path / "runs" / "ck"
    shutil.copytree(run_dir, copy)
    named = _corrupt(kind, copy)
    resumed = dict(cfg, **{"output-dir": str(tmp_path / "runs"), "resume": True, "num-server-rounds": 2})
    with pytest.raises(DataFormatError) as info:
        Federation(InProcessGrid(6, resumed), resumed).run()
    assert named in str(info.value)


def test_a_corrupt_ledger_makes_its_client_refuse_not_restart(small_run_config):
    cfg = dict(small_run_config, **{"clients-per-round": 6, "num-server-rounds": 1, "evaluate-clients": 0})
    fed = Federation(InProcessGrid(6, cfg), cfg)
    fed.run()
    ledgers = sorted((fed.folder.root / "clients").glob("ledger-*.json"))
    ledgers[0].write_text("{cut short")
    ledgers[1].unlink()
    more = dict(cfg, **{"num-server-rounds": 2, "resume": True, "client-epsilon-budget": 8.0,
                        "noise-multiplier": 5.0})
    with pytest.raises(Exception):  # noise is part of the experiment: a resume may not change it
        Federation(InProcessGrid(6, more), more)
    more = dict(cfg, **{"num-server-rounds": 2, "resume": True})
    grid = InProcessGrid(6, more)
    Federation(grid, more).run()
    reasons = [r.content["status"]["reason"] for r in grid.replies if "status" in r.content.config_records]
    assert reasons.count("ledger-unavailable") == 2
    assert not ledgers[1].exists()  # never recreated from 0


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def full_disk(tmp_path):
    mount = tmp_path / "disk"
    if not _tmpfs(mount, "512k"):
        pytest.skip("a full disk needs a small tmpfs, which needs root and mount")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def _fill(folder: Path) -> None:
    """Take every remaining block of the file system under ``folder``."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:
            pass


def test_a_full_disk_fails_the_write_cleanly_and_keeps_the_ledger(full_disk):
    from common.io import write_bytes_atomic
    from common.ledger import Session

    with PrivacyLedger.session(full_disk, "c", 8.0, 1e-5) as ledger:
        ledger.record(Session(1.0, 1.0, 1, 1.0, 1e-5))
    before = (full_disk / "ledger-c.json").read_bytes()
    _fill(full_disk)
    with pytest.raises(OSError):
        write_bytes_atomic(full_disk / "small.bin", b"x" * 10)
    with pytest.raises(OSError), PrivacyLedger.session(full_disk, "c", 8.0, 1e-5) as ledger:
        ledger.record(Session(1.0, 1.0, 1, 1.0, 1e-5))
    assert (full_disk / "ledger-c.json").read_bytes() == before  # the old ledger is intact
    assert not [p.name for p in full_disk.iterdir() if p.name.endswith(".tmp")]  # no stray temp file


def test_audit_on_a_full_disk_exits_3_and_leaves_no_temp_file(full_disk, checkpointed_run):
    from typer.testing import CliRunner

    from simulations.cli import app

    _, run_dir = checkpointed_run
    copy = full_disk / "ck"
    for name in ("config.json", "rounds.jsonl", "metrics.jsonl", "result.json", "checkpoint/latest.json"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run_dir / name, copy / name)
    shutil.copytree(run_dir / "clients", copy / "clients")
    _fill(full_disk)
    result = CliRunner().invoke(app, ["audit", str(copy)])
    assert result.exit_code == 3 and "cannot write the audit" in result.output, result.output
    assert not list(copy.glob(".*.tmp"))


def test_feedback_that_cannot_be_written_exits_3_and_records_nothing(ml100k, tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    import client.feedback as feedback_mod
    from client.device_state import write_device_info
    from client.export import export_user
    from simulations.cli import app

    data, state = tmp_path / "data", tmp_path / "state"
    export_user(ml100k, "7", data)
    write_device_info(state, str(data), "device")
    before = (data / "events.jsonl").read_bytes()

    def no_space(fd, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(feedback_mod.os, "write", no_space)
    result = CliRunner().invoke(app, ["feedback", "--state-dir", str(state), "--item", "1", "--rating", "4"])
    assert result.exit_code == 3 and "not recorded" in result.output, result.output
    assert (data / "events.jsonl").read_bytes() == before


def test_a_hostile_reply_cannot_break_the_wire_log(small_run_config):
    """The wire log copies non-tensor values: NaN, huge strings and odd types must not stop the run."""
    def tamper(node, content):
        if "arrays" in content.array_records:
            _set_metric(content, epsilon=float("nan"))
            content["junk"] = ConfigRecord({"text": "x" * 100_000, "blob": b"\x00" * 10})

    cfg = dict(small_run_config, **{"clients-per-round": 3, "num-server-rounds": 1, "evaluate-clients": 0,
                                    "wire-log": True, "max-failed-share": 1.0})
    fed = Federation(InProcessGrid(6, cfg, tamper=tamper), cfg)
    run_dir = fed.run()
    rows = [json.loads(x) for x in (run_dir / "wire.jsonl").read_text().splitlines()]  # strict JSON
    assert len(rows) == 3 and all(r["metrics"]["metrics"]["epsilon"] == "<nan>" for r in rows)
    assert all(len(r["configs"]["junk"]["text"]) < 300 for r in rows)
    assert _rows(run_dir)[1]["clients_rejected"] == 3


def test_the_wire_log_bounds_the_names_dtypes_and_shapes_a_reply_declares():
    """A record name, key, dtype string or shape list comes from the device: each is kept printable and
    bounded, so one reply cannot write megabytes (or a forged line) into wire.jsonl."""
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from server.validation import WIRE_LOG_NAME_LIMIT, WIRE_LOG_SHAPE_LIMIT, describe_reply

    long = "K\n" * 500_000
    content = RecordDict({long: ArrayRecord({long: Array(long, tuple(range(100_000)), "numpy.ndarray", b"")}),
                          "metrics": MetricRecord({long: 0.0}), "configs": ConfigRecord({long: "v"})})
    reply = SimpleNamespace(has_error=lambda: False, content=content)
    row = json.dumps(describe_reply(reply))
    assert len(row) < 5 * (WIRE_LOG_NAME_LIMIT + 40) + 20 * WIRE_LOG_SHAPE_LIMIT + 200, len(row)
    assert "\\n" not in row and "1000000 chars" in row and "100000 dimensions" in row
