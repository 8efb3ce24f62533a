"""The CLI writes PROTOCOL result files (section 5) and rejects bad arguments clearly."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from simulations.cli import app

KEYS = {"method", "split", "protocol", "metrics", "users", "seed", "privacy", "wall_seconds", "config"}


def test_popularity_baseline_writes_protocol_files(tmp_path):
    result = CliRunner().invoke(app, ["baseline", "popularity", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["popularity-seed0-test-cold-start.json", "popularity-seed0-test.json",
                     "popularity-seed0-validation.json"]
    test = json.loads((tmp_path / "popularity-seed0-test.json").read_text())
    assert set(test) == KEYS
    assert test["protocol"] == "ml-100k-loo-full-v1" and test["users"] == 943
    assert set(test["metrics"]) == {"HR@10", "NDCG@10", "MRR@10", "HR@20"}
    assert test["privacy"] == {"unit": "none"}
    assert 0.0 < test["metrics"]["NDCG@10"] < test["metrics"]["HR@10"] <= test["metrics"]["HR@20"]
    cold = json.loads((tmp_path / "popularity-seed0-test-cold-start.json").read_text())
    assert cold["users"] == 95
    # held-out items have no train interactions, so popularity ranks them last
    assert cold["metrics"]["HR@10"] == 0.0
    assert "popularity" in result.output


def test_unknown_method_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["baseline", "bpr", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "METHOD must be one of" in result.output


def test_bad_data_path_gives_clear_error(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\n")
    result = CliRunner().invoke(app, ["baseline", "popularity", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "u.item" in result.output and "file not found" in result.output


def test_a_schedule_probe_at_a_target_epsilon_solves_its_noise_for_the_whole_schedule():
    import pytest
    import typer

    from common.privacy import client_schedule, epsilon_of_history
    from common.run_config import resolve
    from simulations.bench_schedule import probe_config

    overrides, node_config = probe_config("local-steps-4")
    cfg = resolve(overrides)
    schedule = client_schedule(cfg)
    assert schedule.steps == 4 and node_config == {}
    # the noise is per unit of the session's 2C sensitivity; four steps at it cost at most 7.97
    eps = epsilon_of_history([(cfg["noise-multiplier"] / 2.0, schedule.sample_rate, schedule.steps)], cfg["delta"])
    assert 7.9 < eps <= 7.97 and cfg["client-epsilon-budget"] == 7.97
    # four one-step sessions per device at the solved noise cost at most 7.97 together, a fifth would not fit
    overrides, _ = probe_config("sessions-4")
    cfg = resolve(overrides)
    session = (cfg["noise-multiplier"] / 2.0, 1.0, client_schedule(cfg).steps)
    assert 7.9 < epsilon_of_history([session] * 4, cfg["delta"]) <= 7.97
    assert epsilon_of_history([session] * 5, cfg["delta"]) > 7.97
    assert probe_config("no-dp-sessions-4")[1] == {"privacy-local-dp": False}
    # the probes rerun as they ran, with the full training softmax of their time
    assert not resolve(probe_config("clients-10")[0])["sequence-exclude-history"]
    with pytest.raises(typer.BadParameter, match="probe 'nope'"):
        probe_config("nope")


def test_the_population_projection_solves_the_measured_alignment_and_the_devices_per_snr():
    """Rounds of 40 devices whose updates (each at the clip) have mean pairwise cosine 0.1: the projection
    recovers 0.1 from the measured norms, and the devices per round for a ratio R solve n + n(n-1) 0.1 =
    (R x noise)^2."""
    from simulations.bench_secure import projection

    n, rho, noise = 40, 0.1, 30.0
    signal = (n + n * (n - 1) * rho) ** 0.5
    rounds = [{"survivors": n, "signal_norm_estimate": signal, "noise_norm_expected": noise}] * 3
    out = projection([{"rounds": rounds}], targets=(1.0, 10.0))
    assert abs(out["mean_pairwise_cosine"] - rho) < 1e-9
    for ratio in (1.0, 10.0):
        m = out[f"devices_for_snr_{ratio:g}"]
        assert m + m * (m - 1) * rho >= (ratio * noise) ** 2 > (m - 1) + (m - 1) * (m - 2) * rho


def test_the_central_comparison_noise_is_the_smallest_that_keeps_the_secure_epsilon():
    from common.privacy import epsilon_of_history
    from simulations.bench_secure import USER_EPSILON, central_noise

    noise = central_noise({"clients-per-round": 41, "num-server-rounds": 23, "central-dp": True, "local-dp": False})
    assert noise == 0.5514  # what the published central-DP runs used

    def epsilon(z: float) -> float:
        return epsilon_of_history([(z, 41 / 943, 23)], 1e-4)

    assert epsilon(noise) <= USER_EPSILON < epsilon(round(noise - 1e-4, 4))


def test_the_privacy_utility_curve_averages_each_setting_over_its_seeds():
    from simulations.bench_privacy_utility import points

    rows = [{"file": "eps8-seed0-test.json", "epsilon": 7.99, "ndcg": 0.05, "hr": 0.09, "noise": 1.28, "seed": 0},
            {"file": "eps8-seed1-test.json", "epsilon": 8.0, "ndcg": 0.07, "hr": 0.11, "noise": 1.28, "seed": 1},
            {"file": "no-dp-seed0-test.json", "epsilon": None, "ndcg": 0.06, "hr": 0.1, "noise": None, "seed": 0},
            {"file": "eps1-seed0-test.json", "epsilon": 1.0, "ndcg": 0.02, "hr": 0.05, "noise": 8.1, "seed": 0}]
    got = points(rows)
    assert [p["label"] for p in got] == ["eps1", "eps8", "no-dp"]
    eps8 = got[1]
    assert eps8["epsilon"] == 8.0 and eps8["seeds"] == [0, 1] and eps8["per_seed"] == [0.05, 0.07]
    assert eps8["ndcg"] == pytest.approx(0.06) and eps8["ndcg_sd"] == pytest.approx(0.0141421, rel=1e-4)
    assert got[0]["ndcg_sd"] == 0.0 and got[2]["epsilon"] is None


def test_the_cold_start_boost_table_derives_warm_users_from_all_and_cold(tmp_path):
    import json

    from simulations.bench_cold_start import boost_table

    def figures(all_ndcg: float, cold_ndcg: float) -> dict:
        return {f"{s}_{g}": {"users": n, "NDCG@10": v, "HR@10": v}
                for s in ("validation", "test") for g, n, v in (("all", 20, all_ndcg), ("cold", 4, cold_ndcg))}

    files = []
    for seed, boosted in ((0, 0.05), (1, 0.07)):
        path = tmp_path / f"x-seed{seed}-test-cold-start.json"
        path.write_text(json.dumps({"seed": seed, "config": {"unseen_rankings": {
            "0": figures(0.1, 0.0), "0.5": figures(boosted, 0.25)}}}))
        files.append(path)
    lines = boost_table(files).splitlines()
    assert "seeds 0 / 1" in lines[0] and len(lines) == 4
    # warm users: (20 x 0.1 - 4 x 0) / 16 = 0.125 at boost 0; (20 x 0.05 - 4 x 0.25) / 16 = 0 and 0.025 at 0.5
    assert "| 0.1250 (100.0%) |" in lines[2]
    assert lines[3].startswith("| 0.5 | 0.0500 / 0.0700 = 0.0600 (60.0%) | 0.0125 (10.0%) | 0.2500 |")
    assert "| 0.2500 / 0.2500 = 0.2500 |" in lines[3]  # the cold-start HR@10: one hit of 4 users on each seed


def test_a_cold_start_run_with_overrides_cannot_overwrite_the_published_default(tmp_path, monkeypatch):
    import pytest
    import typer

    import server.federation
    from simulations.bench_cold_start import RESULTS, main

    def no_federation(*args, **kwargs):
        raise AssertionError("the guard let the run start")

    monkeypatch.setattr(server.federation, "Federation", no_federation)  # a regression fails fast, writes nothing
    with pytest.raises(typer.BadParameter, match="published"):
        main(seed=0, set_=["sequence-exclude-history=false"], name="federated-default", out=RESULTS,
             work=tmp_path, table=False)


def test_a_kept_run_keeps_its_validation_curve_where_it_is_committed(tmp_path):
    import json

    from simulations.bench_federated import _keep, _validation_ndcg

    run = tmp_path / "runs" / "default-seed0"
    run.mkdir(parents=True)
    (run / "result.json").write_text("{}")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"round": 0, "val_NDCG@10": 0.02}, {"round": 1, "loss": 1.0}, {"round": 12, "val_NDCG@10": 0.05})) + "\n")
    kept = _keep(run, tmp_path / "kept")
    assert json.loads((kept / "validation.json").read_text()) == {"validation_NDCG@10": [[0, 0.02], [12, 0.05]]}
    (kept / "metrics.jsonl").unlink()  # a clean clone has no raw metrics: the committed curve answers
    assert _validation_ndcg(kept) == 0.05
