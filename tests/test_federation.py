"""The federated round loop with the real ClientApp and ServerApp code, in process.

(The same apps through Flower's simulation engine are covered by test_flower_simulation.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.errors import DataFormatError
from common.ledger import PrivacyLedger
from common.run_config import DEFAULTS_CONFIGURATIONS_TRIED, ConfigError, resolve
from common.secure_random import SecureStream
from common.wire import RECORD_NAMES, REFUSAL_REASONS, STATUS_FIELDS, TRAIN_METRICS, allowed_metrics
from server.audit.accounting import write_audit
from server.federation import Federation
from server.sampling import sample_clients
from simulations.inprocess_grid import InProcessGrid, state_of


def _rows(run_dir, name="metrics.jsonl"):
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def completed_run(small_ml100k, tmp_path_factory):
    """One finished 2-round run, shared by the tests that only inspect it."""
    cfg = {"dataset": str(small_ml100k), "num-server-rounds": 2, "clients-per-round": 3, "evaluate-clients": 2,
           "eval-every": 1, "examples-per-user": 4, "history-len": 3, "max-length": 32, "batch-size": 2,
           "noise-multiplier": 2.0, "max-update-norm": 1000.0, "output-dir": str(tmp_path_factory.mktemp("runs")), "run-name": "t"}
    grid = InProcessGrid(6, cfg)
    fed = Federation(grid, cfg)
    start = [a.copy() for a in fed.arrays]
    return grid, fed, start, fed.run()


def test_round_loop_trains_and_writes_artefacts(completed_run):
    grid, fed, start, run_dir = completed_run
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    # round 0 records the training-free references (their values: tests/test_sequence_federated.py)
    assert sorted(k for k in rows[0] if k.startswith("ref_")) == sorted(
        f"ref_{name}_{m}" for name in ("popularity", "heuristic", "text_prior") for m in ("HR@10", "NDCG@10"))
    assert all(r["clients_accepted"] == 3 and r["clients_rejected"] == 0 for r in rows[1:])
    assert all(0 < r["epsilon_max"] <= 8.0 for r in rows[1:])
    assert not all(np.array_equal(a, b) for a, b in zip(start, fed.arrays)), "global state did not change"
    for name in ("config.json", "metrics.jsonl", "adapters.safetensors", "result.json", "quality.png",
                 "epsilon.png", "rounds.jsonl"):
        assert (run_dir / name).stat().st_size > 0, name
    result = json.loads((run_dir / "result.json").read_text())
    assert result["protocol"] == "ml-100k-loo-full-v1" and result["split"] == "test"
    assert result["privacy"]["unit"] == "example" and result["privacy"]["delta"] == 1e-5
    # the guarantee is for the published defaults used untuned; the choice among configurations is outside it
    assert f"among {DEFAULTS_CONFIGURATIONS_TRIED} configurations" in result["privacy"]["tuning"]
    assert "without tuning them on its own population" in result["privacy"]["tuning"]
    assert "privacy-reply-time-quantum" in result["privacy"]["timing"]  # deployed replies are paced
    assert set(result["metrics"]) == {"HR@10", "NDCG@10", "MRR@10", "HR@20"}
    # Every client that trained has a ledger whose epsilon recomputes from its history.
    ledgers = sorted((run_dir / "clients").glob("ledger-*.json"))
    assert ledgers
    for path in ledgers:
        ledger = PrivacyLedger.load(path)
        assert ledger.epsilon == pytest.approx(ledger.recomputed_epsilon())
        assert {s.kind for s in ledger.sessions} <= {"dp-sgd", "evaluation"}


def _reply_holds_only_listed_fields(content, expected_names, kind):
    """What the README's privacy statement lists (common.wire), and nothing else."""
    assert set(content.keys()) <= RECORD_NAMES
    assert list(content.array_records) in ([], ["arrays"])
    if "arrays" in content.array_records:
        assert kind == "train" and list(content["arrays"].keys()) == expected_names
    assert list(content.metric_records) == ["metrics"]
    metrics = dict(content["metrics"])
    assert set(metrics) <= set(allowed_metrics(kind)), set(metrics) - set(allowed_metrics(kind))
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    for name, record in content.config_records.items():
        assert name == "status" and set(record.keys()) <= set(STATUS_FIELDS)
        assert record["reason"] in REFUSAL_REASONS
    if "status" not in content.config_records and kind == "train":
        assert set(metrics) == set(TRAIN_METRICS)


def test_replies_hold_only_the_listed_fields(completed_run):
    grid, fed, _, _ = completed_run
    assert grid.replies
    seen = set()
    for reply in grid.replies:
        kind = reply.metadata.message_type
        seen.add(kind)
        _reply_holds_only_listed_fields(reply.content, fed.names, kind)
    assert seen == {"train", "evaluate"}


def _tamper(node, content):
    if "arrays" not in content.array_records:
        return
    arrays = state_of(content)
    first = next(iter(arrays))
    if node == 101:
        arrays[first] = arrays[first].copy()
        arrays[first][0, 0] = np.nan
    elif node == 102:
        arrays[first] = np.zeros((3, 3), dtype=np.float32)
    elif node == 103:
        arrays[first] = arrays[first] + 1e3
    else:
        return
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})


def test_bad_replies_are_rejected_and_the_round_completes(small_run_config):
    cfg = dict(small_run_config, **{"clients-per-round": 6, "num-server-rounds": 1, "max-failed-share": 1.0})
    grid = InProcessGrid(6, cfg, tamper=_tamper, drop={106})
    fed = Federation(grid, cfg)
    fed.run()
    rows = _rows(fed.folder.root)
    # the text model's runs record the popularity reference only (see ServerEvaluator.references)
    assert sorted(k for k in rows[0] if k.startswith("ref_")) == ["ref_popularity_HR@10", "ref_popularity_NDCG@10"]
    row = rows[1]
    assert row["clients_sampled"] == 6
    assert row["clients_rejected"] == 3 and row["clients_accepted"] == 2
    assert row["clients_replied"] == 5  # node 106 never answered
    assert all(np.isfinite(a).all() for a in fed.arrays)
    rounds = [json.loads(x) for x in (fed.folder.root / "rounds.jsonl").read_text().splitlines()]
    assert sorted(rounds[0]["rejected"]) == [101, 102, 103]
    assert rounds[0]["failed"] == [106] and row["clients_failed"] == 1


def test_client_at_its_budget_refuses_and_the_server_counts_it(small_run_config):
    # One session at noise 1.0 costs more than this budget: every client refuses.
    cfg = dict(small_run_config, **{"client-epsilon-budget": 0.05, "num-server-rounds": 1})
    grid = InProcessGrid(6, cfg)
    fed = Federation(grid, cfg)
    start = [a.copy() for a in fed.arrays]
    fed.run()
    row = _rows(fed.folder.root)[1]
    assert row["clients_refused"] == 3 and row["clients_accepted"] == 0
    assert all(np.array_equal(a, b) for a, b in zip(start, fed.arrays))
    reasons = [r.content["status"]["reason"] for r in grid.replies if "status" in r.content.config_records]
    assert reasons and all(r == "privacy-budget" for r in reasons)


def test_resume_continues_rounds_and_accounting(small_run_config):
    cfg = dict(small_run_config, **{"central-dp": True, "clients-per-round": 3})
    Federation(InProcessGrid(6, cfg), cfg).run()
    cfg_dir = Path(cfg["output-dir"]) / cfg["run-name"]
    first = _rows(cfg_dir)
    ledgers_before = {p.name: json.loads(p.read_text())["epsilon"] for p in (cfg_dir / "clients").glob("*.json")}
    with pytest.raises(ConfigError, match="resume"):
        Federation(InProcessGrid(6, cfg), cfg)  # same run-name without resume=true
    more = dict(cfg, **{"num-server-rounds": 3, "resume": True})
    fed = Federation(InProcessGrid(6, more), more)
    fed.run()
    rows = _rows(cfg_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[:3] == first
    assert fed.central is not None and fed.central.rounds == 3
    assert rows[3]["user_epsilon"] > rows[2]["user_epsilon"] > 0
    for name, eps in ledgers_before.items():
        assert json.loads((cfg_dir / "clients" / name).read_text())["epsilon"] >= eps
    changed = dict(more, **{"learning-rate": 0.5})
    with pytest.raises(ConfigError, match="learning-rate"):
        Federation(InProcessGrid(6, changed), changed)


def test_a_client_error_becomes_a_refusal_without_its_details(small_run_config):
    # 7 nodes on a 6-user dataset: the 7th has no user, and its error must not travel.
    cfg = dict(small_run_config, **{"clients-per-round": 7, "num-server-rounds": 1, "evaluate-clients": 0})
    grid = InProcessGrid(7, cfg)
    fed = Federation(grid, cfg)
    fed.run()
    row = _rows(fed.folder.root)[1]
    assert row["clients_refused"] == 1 and row["clients_accepted"] == 6
    [reason] = [r.content["status"]["reason"] for r in grid.replies if "status" in r.content.config_records]
    assert reason == "client-error"  # a fixed code: the ValueError and its message stay on the device


def test_a_run_stored_before_item_bias_scale_existed_resumes_only_at_scale_1(small_run_config):
    folder = Path(small_run_config["output-dir"]) / small_run_config["run-name"]
    folder.mkdir(parents=True)
    stored = {k: v for k, v in resolve(small_run_config).items() if k not in ("item-bias-scale", "client-sampling")}
    (folder / "config.json").write_text(json.dumps(stored))
    # the defaults (scale 10, cyclic sampling) are not what that run used
    at_default = dict(small_run_config, resume=True)
    with pytest.raises(ConfigError, match=r"client-sampling.*item-bias-scale"):
        Federation(InProcessGrid(6, at_default), at_default)
    as_stored = dict(at_default, **{"item-bias-scale": 1.0, "client-sampling": "uniform"})
    with pytest.raises(ConfigError, match="checkpoint"):  # the config is accepted; only the checkpoint is missing
        Federation(InProcessGrid(6, as_stored), as_stored)


def test_cyclic_sampling_trains_every_client_once_before_any_twice():
    nodes = [2**63 + 5 * i for i in range(10)]  # uint64 ids beyond float64's exact range
    cfg = resolve({"clients-per-round": 5, "seed": 3})
    assert cfg["client-sampling"] == "cyclic"
    rounds = [sample_clients(nodes, cfg, rnd, np.random.default_rng(rnd), None) for rnd in range(1, 5)]
    assert sorted(rounds[0] + rounds[1]) == sorted(nodes)  # first pass: every client exactly once
    assert sorted(rounds[2] + rounds[3]) == sorted(nodes)  # second pass, in a fresh order
    assert rounds[2:] != rounds[:2]
    # deterministic in (seed, round), whatever rng is passed: a resumed run samples the same clients
    assert rounds == [sample_clients(nodes, cfg, rnd, None, None) for rnd in range(1, 5)]
    assert rounds != [sample_clients(nodes, dict(cfg, seed=4), rnd, None, None) for rnd in range(1, 5)]
    # a round that straddles two passes has no repeated client, and the first pass still covers everyone
    cfg4 = dict(cfg, **{"clients-per-round": 4})
    r1, r2, r3 = (sample_clients(nodes, cfg4, rnd, None, None) for rnd in (1, 2, 3))
    assert len(set(r1 + r2)) == 8 and set(r1 + r2 + r3) == set(nodes) and len(r3) == len(set(r3))


def test_sampling_scheme_follows_central_dp():
    assert resolve({"central-dp": True})["client-sampling"] == "poisson"
    assert resolve({"client-sampling": "uniform"})["client-sampling"] == "uniform"
    with pytest.raises(ConfigError, match="client-sampling.*Poisson"):
        resolve({"central-dp": True, "client-sampling": "cyclic"})
    nodes = list(range(1000))
    picked = sample_clients(nodes, resolve({"central-dp": True, "clients-per-round": 100}), 1, np.random.default_rng(0),
                            SecureStream())
    assert 35 < len(picked) < 165  # Binomial(1000, 0.1): the count varies; 6.9 std either side


def test_resume_from_an_unreadable_stored_config_names_the_file(small_run_config):
    folder = Path(small_run_config["output-dir"]) / small_run_config["run-name"]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"seed": 0,')  # cut short by a crash
    cfg = dict(small_run_config, resume=True)
    with pytest.raises(ConfigError, match="config.json"):
        Federation(InProcessGrid(6, cfg), cfg)


@pytest.mark.parametrize("asked", [{"local-dp": False}, {"noise-multiplier": 0.3}], ids=["dp-off", "less-noise"])
def test_a_run_asking_for_less_privacy_is_refused_by_every_device(small_run_config, asked):
    """Whoever submits the run chooses its config; every device still applies its own policy."""
    cfg = dict(small_run_config, **{"clients-per-round": 6, "num-server-rounds": 1, **asked})
    grid = InProcessGrid(6, cfg)
    fed = Federation(grid, cfg)
    start = [a.copy() for a in fed.arrays]
    fed.run()
    train_replies = [r for r in grid.replies if "metrics" in r.content.metric_records
                     and dict(r.content["metrics"]).get("refused") is not None and "HR@10" not in r.content["metrics"]]
    assert len(train_replies) >= 6
    for reply in grid.replies:
        assert "arrays" not in reply.content.array_records  # nothing trained is sent
        assert reply.content["status"]["reason"] == "privacy-policy"
    assert all(np.array_equal(a, b) for a, b in zip(start, fed.arrays))
    assert not list((fed.folder.root / "clients").glob("ledger-*.json"))  # nothing spent
    assert _rows(fed.folder.root)[1]["clients_refused"] == 6


def test_federated_evaluation_is_a_noisy_release_each_ledger_counts(small_run_config):
    cfg = dict(small_run_config, **{"num-server-rounds": 1, "clients-per-round": 1, "evaluate-clients": 6,
                                    "eval-noise-multiplier": 2.0, "client-epsilon-budget": 8.0})
    grid = InProcessGrid(6, cfg)
    fed = Federation(grid, cfg)
    fed.run()
    evaluations = [dict(r.content["metrics"]) for r in grid.replies if "HR@10" in r.content["metrics"]]
    assert len(evaluations) == 6 and all(v["eval-noise-multiplier"] == 2.0 for v in evaluations)
    # Noisy values: a snapped Gaussian of std 2.8 lands exactly on 0 or 1 with probability about 1.2e-3,
    # so all 12 released values doing so has probability below 1e-30.
    assert any(v[k] not in (0.0, 1.0) for v in evaluations for k in ("HR@10", "NDCG@10"))
    ledgers = [PrivacyLedger.load(p) for p in (fed.folder.root / "clients").glob("ledger-*.json")]
    assert sum(1 for led in ledgers for s in led.sessions if s.kind == "evaluation") == 6
    row = _rows(fed.folder.root)[1]
    assert row["federated_clients"] == 6 and np.isfinite(row["federated_NDCG@10"])
    assert row["federated_noise_std_of_median"] == pytest.approx(2.0 * np.sqrt(2) * np.sqrt(np.pi / 12))
    # an honest run with federated evaluation passes the accounting audit: evaluators that did not
    # train are explained by the round's record, and metrics.jsonl's epsilon includes their releases
    record = _rows(fed.folder.root, "rounds.jsonl")[0]
    assert record["evaluated"] == record["evaluation_released"] == sorted(grid.partition)
    spend = max(led.epsilon for led in ledgers)
    assert row["epsilon_max"] == pytest.approx(spend)
    report = write_audit(fed.folder.root)[2]
    assert report["all_checks_passed"], [c for c in report["checks"] if c["status"] == "fail"]


def test_a_central_dp_release_is_accounted_before_a_crash_can_lose_it(small_run_config, monkeypatch):
    import server.federation as federation_mod

    cfg = dict(small_run_config, **{"central-dp": True, "num-server-rounds": 2, "eval-every": 100})
    real = federation_mod.save_checkpoint

    def crash_in_round_2(folder, rnd, *args, **kwargs):
        if rnd == 2:
            raise KeyboardInterrupt("killed between the release and its checkpoint")
        return real(folder, rnd, *args, **kwargs)

    monkeypatch.setattr(federation_mod, "save_checkpoint", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        Federation(InProcessGrid(6, cfg), cfg).run()
    monkeypatch.undo()
    run_dir = Path(cfg["output-dir"]) / cfg["run-name"]
    assert json.loads((run_dir / "checkpoint" / "latest.json").read_text())["round"] == 1
    assert sum(n for _, _, n in json.loads((run_dir / "central-dp.json").read_text())["history"]) == 2
    resumed = dict(cfg, resume=True)
    fed = Federation(InProcessGrid(6, resumed), resumed)
    fed.run()
    assert fed.central.rounds == 3  # round 2 was released twice: both count


def test_resume_with_another_population_re_derives_the_sampling_rate(small_run_config):
    cfg = dict(small_run_config, **{"central-dp": True, "num-server-rounds": 1, "clients-per-round": 3})
    Federation(InProcessGrid(6, cfg), cfg).run()
    more = dict(cfg, **{"num-server-rounds": 2, "resume": True})
    fed = Federation(InProcessGrid(4, more), more)
    fed.run()
    assert fed.central.population == 4 and fed.central.sample_rate == pytest.approx(3 / 4)
    assert [(q, n) for _, q, n in fed.central.history] == [(0.5, 1), (0.75, 1)]


def test_a_run_that_stopped_before_its_first_checkpoint_is_not_silently_restarted(small_run_config, monkeypatch):
    import server.federation as federation_mod

    cfg = dict(small_run_config, **{"central-dp": True, "num-server-rounds": 1, "eval-every": 100})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the first checkpoint")

    monkeypatch.setattr(federation_mod, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        Federation(InProcessGrid(6, cfg), cfg).run()
    monkeypatch.undo()
    run_dir = Path(cfg["output-dir"]) / cfg["run-name"]
    records = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "central-dp.json")}
    with pytest.raises(ConfigError, match=r"checkpoint.*nothing to continue from.*Remove"):
        Federation(InProcessGrid(6, dict(cfg, resume=True)), dict(cfg, resume=True))
    with pytest.raises(ConfigError, match="before its first checkpoint.*remove the folder"):
        Federation(InProcessGrid(6, cfg), cfg)  # a plain retry says how to retry
    assert {name: (run_dir / name).read_bytes() for name in records} == records  # nothing dropped


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_holds_it(small_run_config):
    cfg = dict(small_run_config, **{"num-server-rounds": 1, "eval-every": 100})
    first = Federation(InProcessGrid(6, cfg), cfg)  # holds the folder from here until run() ends
    for other in (cfg, dict(cfg, resume=True)):
        with pytest.raises(ConfigError, match="in use by another privrec run"):
            Federation(InProcessGrid(6, other), other)
    first.run()
    resumed = dict(cfg, **{"resume": True, "num-server-rounds": 2})
    Federation(InProcessGrid(6, resumed), resumed).run()  # free again once the first run ended
    assert [r["round"] for r in _rows(Path(cfg["output-dir"]) / cfg["run-name"])] == [0, 1, 2]


def test_a_non_finite_global_state_is_refused_by_every_client_before_any_spend(small_run_config):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as client_app

    cfg = dict(small_run_config, **{"num-server-rounds": 1})
    fed = Federation(InProcessGrid(6, cfg), cfg)
    arrays = [a.copy() for a in fed.arrays]
    arrays[-1][0] = np.nan  # a tripwire in one item's bias
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(content=RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in zip(fed.names, arrays)}),
                                      "config": ConfigRecord({"server-round": 1, "run-id": "t",
                                                              "run-dir": str(fed.folder.root)})}),
                  dst_node_id=101, message_type=MessageType.TRAIN)
    for user in range(6):
        ctx = Context(run_id=1, node_id=101 + user, node_config={"partition-id": user, "num-partitions": 6},
                      state=RecordDict(), run_config=cfg)
        reply = client_app.train(msg, ctx)
        assert reply.content["status"]["reason"] == "client-error" and "arrays" not in reply.content.array_records
    assert not list((fed.folder.root / "clients").glob("ledger-*.json"))


def test_a_persistent_ledger_dir_makes_budgets_compose_across_runs(small_run_config, tmp_path):
    """Each simulated run is its own deployment unless ledger-dir is set; with it, a second run on the
    same people sees what the first spent."""
    shared = tmp_path / "ledgers"
    cfg = dict(small_run_config, **{"clients-per-round": 6, "num-server-rounds": 1, "evaluate-clients": 0,
                                    "ledger-dir": str(shared), "budget-policy": "refuse",
                                    "client-epsilon-budget": 6.0})
    Federation(InProcessGrid(6, cfg), cfg).run()
    spent = {p.name: PrivacyLedger.load(p).epsilon for p in shared.glob("ledger-*.json")}
    assert len(spent) == 6 and all(3.0 < e <= 6.0 for e in spent.values())  # one session each
    again = dict(cfg, **{"run-name": "second"})
    grid = InProcessGrid(6, again)
    fed = Federation(grid, again)
    fed.run()
    assert _rows(fed.folder.root)[1]["clients_refused"] == 6  # a second session would exceed 6
    result = json.loads((fed.folder.root / "result.json").read_text())
    assert "persistent folder" in result["privacy"]["ledgers"]
    fresh = dict(small_run_config, **{"run-name": "third", "num-server-rounds": 1})
    Federation(InProcessGrid(6, fresh), fresh).run()
    third = json.loads((Path(fresh["output-dir"]) / "third" / "result.json").read_text())
    assert "do not compose across runs" in third["privacy"]["ledgers"]


def test_a_resume_without_the_central_accountant_of_its_checkpointed_rounds_is_refused(small_run_config):
    """Every checkpointed round of a central-DP run released a noisy aggregate: a resume whose accountant is
    gone (the file deleted and the checkpoint's copy removed) would start counting from zero. It is refused,
    naming the file; with the file gone but the checkpoint's copy kept, the run continues from that copy."""
    cfg = dict(small_run_config, **{"central-dp": True, "clients-per-round": 3, "num-server-rounds": 2,
                                    "evaluate-clients": 0, "eval-every": 100})
    run_dir = Federation(InProcessGrid(6, cfg), cfg).run()
    (run_dir / "central-dp.json").unlink()
    more = dict(cfg, **{"resume": True, "num-server-rounds": 3})
    fed = Federation(InProcessGrid(6, more), more)
    fed.run()  # the checkpoint's copy covers both rounds
    assert fed.central.rounds == 3
    (run_dir / "central-dp.json").unlink()
    latest = run_dir / "checkpoint" / "latest.json"
    latest.write_text(json.dumps({**json.loads(latest.read_text()), "central_dp": None}))
    again = dict(cfg, **{"resume": True, "num-server-rounds": 4})
    with pytest.raises(DataFormatError, match=r"central-dp\.json.*covers 0 round\(s\), the checkpoint 3"):
        Federation(InProcessGrid(6, again), again).run()


def test_a_resume_with_fewer_rounds_than_its_checkpoint_is_refused(small_run_config):
    """No round would run, and the result would pair the checkpoint's state with an older evaluation."""
    cfg = dict(small_run_config, **{"clients-per-round": 3, "num-server-rounds": 2, "evaluate-clients": 0,
                                    "eval-every": 100})
    run_dir = Federation(InProcessGrid(6, cfg), cfg).run()
    before = (run_dir / "result.json").read_bytes()
    fewer = dict(cfg, **{"resume": True, "num-server-rounds": 1})
    with pytest.raises(ConfigError, match="num-server-rounds 1 is below the checkpoint's round 2"):
        Federation(InProcessGrid(6, fewer), fewer).run()
    assert (run_dir / "result.json").read_bytes() == before


def test_a_secure_runs_release_counts_resume_from_the_larger_of_the_checkpoint_and_the_file(tmp_path):
    from server.resume import restored_releases
    from server.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    assert restored_releases(folder, None) == {}
    meta = {"round": 3, "user_releases": {"1": 3, "2": 1}}
    assert restored_releases(folder, meta) == {"1": 3, "2": 1}  # the file deleted: the checkpoint's counts stay
    folder.user_releases.write_text(json.dumps({"1": 2, "2": 2, "3": 1}))
    assert restored_releases(folder, meta) == {"1": 3, "2": 2, "3": 1}
    with pytest.raises(DataFormatError, match="latest.json"):
        restored_releases(folder, {"user_releases": {"1": 1.5}})
