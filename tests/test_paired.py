"""The paired comparison of rankers: its statistics on constructed scores, and the benchmark's refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import typer

from simulations.paired import compare_paired


class ScriptedDraws:
    """A generator whose ``integers`` returns the given index arrays in turn (an injected bootstrap draw)."""

    def __init__(self, draws: list[list[int]]) -> None:
        self.draws = [np.asarray(d) for d in draws]
        self.calls = 0

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        assert (low, high, size) == (0, len(self.draws[0]), len(self.draws[0]))
        draw = self.draws[self.calls]
        self.calls += 1
        return draw


def test_a_constant_shift_is_certain_and_every_user_counts_for_the_higher_side():
    b = np.array([0.0, 0.5, 1.0, 0.25, 0.0])
    c = compare_paired(b + 0.01, b, np.random.default_rng(0), resamples=200)
    assert c.difference == pytest.approx(0.01)
    assert c.ci_low == pytest.approx(0.01) and c.ci_high == pytest.approx(0.01)
    assert (c.a_higher, c.b_higher, c.users) == (5, 0, 5)
    assert c.sign_test_p == pytest.approx(2 * 0.5**5)


def test_the_interval_is_the_percentiles_of_the_resampled_mean_differences():
    a = np.array([1.0, 0.0, 0.5, 0.0])
    b = np.array([0.0, 0.0, 0.0, 0.5])  # differences 1, 0, 0.5, -0.5
    draws = [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 3, 3], [0, 1, 2, 3], [3, 3, 3, 3]]
    rng = ScriptedDraws(draws)
    c = compare_paired(a, b, rng, resamples=5, level=0.5)
    assert rng.calls == 5
    # resampled means 1, 0, 0, 0.25, -0.5; sorted -0.5, 0, 0, 0.25, 1: the 25th and 75th percentiles of five
    # values are the second and the fourth
    assert (c.ci_low, c.ci_high) == (0.0, 0.25)
    assert c.difference == pytest.approx(0.25)


def test_the_sign_test_is_the_exact_two_sided_binomial_over_users_whose_scores_differ():
    a = np.array([1.0] * 8 + [0.0] * 2 + [0.3] * 5)
    b = np.array([0.0] * 8 + [1.0] * 2 + [0.3] * 5)  # 8 higher, 2 lower, 5 ties (not counted)
    c = compare_paired(a, b, np.random.default_rng(0), resamples=10)
    assert (c.a_higher, c.b_higher) == (8, 2)
    assert c.sign_test_p == pytest.approx(2 * sum(math.comb(10, k) for k in (8, 9, 10)) / 2**10)
    ties = compare_paired(b, b, np.random.default_rng(0), resamples=10)
    assert (ties.a_higher, ties.b_higher, ties.sign_test_p, ties.difference) == (0, 0, 1.0, 0.0)


@pytest.mark.parametrize("a, b, kwargs, message", [
    ([], [], {}, "non-empty"), ([0.1, 0.2], [0.1], {}, "one length"), ([[0.1]], [[0.1]], {}, "vectors"),
    ([0.1, np.nan], [0.1, 0.2], {}, "finite"), ([0.1, np.inf], [0.1, 0.2], {}, "finite"),
    ([0.1], [0.2], {"resamples": 0}, "resamples"), ([0.1], [0.2], {"level": 1.0}, "level")])
def test_bad_scores_or_settings_are_refused(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare_paired(np.array(a, dtype=float), np.array(b, dtype=float), np.random.default_rng(0), **kwargs)


def test_last_bit_differences_are_ties_and_the_sign_test_runs_only_when_asked():
    score = np.full(4, 1 / np.log2(7))
    averaged = np.mean([score] * 20, axis=0)  # equal in exact arithmetic, not in floating point
    assert not np.array_equal(averaged, score)
    c = compare_paired(averaged, score, np.random.default_rng(0), resamples=10)
    assert (c.a_higher, c.b_higher, c.sign_test_p) == (0, 0, 1.0)
    assert compare_paired(averaged, score, np.random.default_rng(0), resamples=10, sign_test=False).sign_test_p is None


def test_a_side_mixing_kinds_naming_a_member_twice_or_an_unknown_reference_is_refused():
    from simulations.bench_paired import side_scores

    with pytest.raises(typer.BadParameter, match="run folders or one reference"):
        side_scores(["runs/x", "reference:heuristic"], "test")
    with pytest.raises(typer.BadParameter, match="all personal: or all plain"):
        side_scores(["runs/x", "personal:runs/y"], "test")
    with pytest.raises(typer.BadParameter, match="twice"):
        side_scores(["runs/x", "runs/x"], "test")
    with pytest.raises(typer.BadParameter, match="one of"):
        side_scores(["reference:oracle"], "test")


@pytest.fixture(scope="module")
def two_runs(ml100k, tmp_path_factory):
    """Two finished run folders of the default model (its initial state, and one with a trained-looking item
    bias), each recording the figures its model scores, and their per-user NDCG@10 on both splits."""
    from common.evaluation import rank_targets
    from common.io import save_tensors
    from common.metrics import ndcg_at_10
    from common.partition import split_for
    from common.run_config import resolve
    from common.runtimes import make_runtime
    from common.sequence import evaluation_rows, sequence_scores

    cfg = resolve({"seed": 0})
    split = split_for(cfg["dataset"])
    users = split.eval_users()
    runtime = make_runtime(ml100k, cfg, seed=0)
    names, initial = runtime.state()
    biased = [np.log1p(split.train_item_counts()).astype(np.float32) / cfg["item-bias-scale"]
              if n == "item_bias" else a for n, a in zip(names, initial)]
    folders, scores = [], []
    for k, arrays in enumerate((initial, biased)):
        runtime.load_state(names, arrays)
        per_split = {w: ndcg_at_10(rank_targets(sequence_scores(runtime.model, evaluation_rows(
            split, w, cfg["history-len"], users)), split, w, users)) for w in ("validation", "test")}
        folder = tmp_path_factory.mktemp(f"run{k}")
        (folder / "config.json").write_text(json.dumps(cfg))
        save_tensors(folder / "adapters.safetensors", dict(zip(names, arrays)))
        (folder / "metrics.jsonl").write_text(json.dumps({"round": 0, "val_NDCG@10": 0.5}) + "\n" + json.dumps(
            {"round": 1, "val_NDCG@10": per_split["validation"].mean(), "test_NDCG@10": per_split["test"].mean()}))
        (folder / "result.json").write_text(json.dumps({"split": "test",
                                                        "metrics": {"NDCG@10": per_split["test"].mean()}}))
        folders.append(folder)
        scores.append(per_split)
    return folders, scores


def test_several_run_folders_score_each_user_by_their_mean_and_the_record_keeps_the_order(two_runs):
    from simulations.bench_paired import compare_sides, side_scores

    (first, second), scores = two_runs
    assert not np.array_equal(scores[0]["test"], scores[1]["test"])
    _, users, mean, members = side_scores([str(first), str(second)], "validation")
    assert members == 2 and len(users) == 943
    assert np.array_equal(mean, np.mean([scores[0]["validation"], scores[1]["validation"]], axis=0))
    record = compare_sides([str(second)], [str(first)], "test")
    c = record["comparison"]
    assert (c["mean_a"], c["mean_b"]) == (scores[1]["test"].mean(), scores[0]["test"].mean())
    assert c["difference"] == pytest.approx(scores[1]["test"].mean() - scores[0]["test"].mean())
    assert record["members"] == {"a": 1, "b": 1} and c["sign_test_p"] is not None
    unequal = compare_sides([str(first), str(second)], ["reference:popularity"], "test")
    assert unequal["members"] == {"a": 2, "b": 1} and unequal["comparison"]["sign_test_p"] is None


def _nudge_final_validation(text: str) -> str:
    rows = [json.loads(line) for line in text.splitlines()]
    rows[-1]["val_NDCG@10"] += 1e-6
    return "\n".join(json.dumps(r) for r in rows)


def _nudge_result(text: str) -> str:
    result = json.loads(text)
    result["metrics"]["NDCG@10"] += 1e-6
    return json.dumps(result)


@pytest.mark.parametrize("file, which, edit", [("metrics.jsonl", "validation", _nudge_final_validation),
                                               ("result.json", "test", _nudge_result)])
def test_a_run_folder_that_does_not_reproduce_its_own_figure_is_refused(two_runs, file, which, edit):
    """The benchmark rescoring a run's final model must find the figures the run recorded, or refuse."""
    from simulations.bench_paired import side_scores

    folder = two_runs[0][1]
    original = (folder / file).read_text()
    try:
        (folder / file).write_text(edit(original))
        with pytest.raises(typer.BadParameter, match="does not reproduce its own figure"):
            side_scores([str(folder)], which)
    finally:
        (folder / file).write_text(original)
    side_scores([str(folder)], which)  # restored: accepted


def test_the_table_shows_each_record_and_no_sign_test_for_unequal_sides(tmp_path):
    from simulations.bench_paired import table

    comparison = {"mean_a": 0.06, "mean_b": 0.05, "difference": 0.01, "ci_low": -0.002, "ci_high": 0.02,
                  "a_higher": 9, "b_higher": 4, "sign_test_p": None}
    (tmp_path / "x-test.json").write_text(json.dumps({"which": "test", "comparison": comparison}))
    assert table(tmp_path).splitlines()[2] == ("| x-test | test | 0.0600 | 0.0500 | +0.0100 (-0.0020, +0.0200) | "
                                               "9 / 4 | - (unequal sides) |")


def test_a_reference_on_side_a_keeps_the_order(two_runs):
    """Runs are loaded first whatever their side, so the record must still put each side's figure in place."""
    from simulations.bench_paired import compare_sides

    (first, _), scores = two_runs
    c = compare_sides(["reference:popularity"], [str(first)], "test")["comparison"]
    assert c["mean_b"] == scores[0]["test"].mean()
    assert c["difference"] == pytest.approx(c["mean_a"] - scores[0]["test"].mean())


@pytest.mark.parametrize("case, message", [
    ("no metrics", "metrics.jsonl: missing"), ("no figure row", "no row has 'test_NDCG@10'"),
    ("round not an integer", "integer 'round'"), ("result without a number", "no number at metrics.NDCG@10")])
def test_a_run_folder_without_the_figures_to_check_is_refused(two_runs, tmp_path, case, message):
    import shutil

    from simulations.bench_paired import side_scores

    folder = tmp_path / "run"
    shutil.copytree(two_runs[0][0], folder)
    metrics, result = folder / "metrics.jsonl", folder / "result.json"
    if case == "no metrics":
        metrics.unlink()
    elif case == "no figure row":
        metrics.write_text(json.dumps({"round": 0, "val_NDCG@10": 0.5}))
    elif case == "round not an integer":
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        rows[-1]["round"] = "last"
        metrics.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        result.write_text(json.dumps({"split": "test", "metrics": {}}))
    with pytest.raises(typer.BadParameter, match=message):
        side_scores([str(folder)], "test")


@pytest.fixture
def fake_private_heuristic(monkeypatch, tmp_path, ml100k_split):
    """The private heuristic's record in a temporary folder, and cheap stand-ins for its scoring: every user
    scores 0.01 x the weight (the weight chosen on validation is 0.3)."""
    import simulations.private_heuristic as private

    users = ml100k_split.eval_users()
    monkeypatch.setattr(private, "OUT", tmp_path)
    monkeypatch.setattr(private, "heuristic_inputs", lambda split: private.HeuristicInputs(split, users, {}, None))
    monkeypatch.setattr(private, "chosen_weight", lambda inputs, epsilon, draws: (0.3, {}))
    monkeypatch.setattr(private, "private_heuristic_ndcg",
                        lambda inputs, which, epsilon, weight, draws: np.full((draws, len(users)), 0.01 * weight))

    def write(**point) -> None:
        base = {"epsilon": 8.0, "chosen_weight": 0.3, "test_NDCG@10_mean": 0.003, "validation_NDCG@10_mean": 0.003}
        (tmp_path / "private-heuristic.json").write_text(json.dumps({"draws": 4, "points": [{**base, **point}]}))

    return write


def test_a_private_heuristic_matching_its_record_is_compared_with_the_records_draws(fake_private_heuristic,
                                                                                   ml100k_split):
    from simulations.bench_paired import side_scores

    fake_private_heuristic()
    _, users, ndcg, members = side_scores(["reference:private-heuristic-8"], "test", ml100k_split)
    assert members == 4 and np.allclose(ndcg, 0.003) and len(ndcg) == len(users)


@pytest.mark.parametrize("point, message", [({"test_NDCG@10_mean": 0.004}, "records test NDCG@10"),
                                            ({"chosen_weight": 0.2}, "records weight 0.2"),
                                            ({"epsilon": 4.0}, "no single point at epsilon 8")])
def test_a_private_heuristic_that_differs_from_its_record_is_refused(fake_private_heuristic, ml100k_split, point,
                                                                     message):
    from simulations.bench_paired import side_scores

    fake_private_heuristic(**point)
    with pytest.raises(typer.BadParameter, match=message):
        side_scores(["reference:private-heuristic-8"], "test", ml100k_split)


def test_a_missing_private_heuristic_record_is_refused(monkeypatch, tmp_path, ml100k_split):
    import simulations.private_heuristic as private
    from simulations.bench_paired import side_scores

    monkeypatch.setattr(private, "OUT", tmp_path)
    with pytest.raises(typer.BadParameter, match="run python -m simulations.private_heuristic first"):
        side_scores(["reference:private-heuristic-8"], "test", ml100k_split)


def test_the_command_line_refuses_which_for_a_published_comparison_and_too_few_draws():
    from typer.testing import CliRunner

    from simulations import bench_paired, private_heuristic

    def words(output: str) -> str:  # the message as words, whatever box and line breaks the terminal drew
        return " ".join(output.replace("│", " ").split())

    refused = CliRunner().invoke(bench_paired.app, ["default-vs-heuristic", "--which", "test"])
    assert refused.exit_code == 2 and "without --which" in words(refused.output)
    app = typer.Typer()
    app.command()(private_heuristic.main)
    refused = CliRunner().invoke(app, ["--draws", "1"])
    assert refused.exit_code == 2 and "at least 2" in words(refused.output)


def test_the_table_prints_a_sign_test_where_there_is_one(tmp_path):
    from simulations.bench_paired import table

    comparison = {"mean_a": 0.06, "mean_b": 0.05, "difference": 0.01, "ci_low": -0.002, "ci_high": 0.02,
                  "a_higher": 9, "b_higher": 4, "sign_test_p": 0.2668}
    (tmp_path / "y-validation.json").write_text(json.dumps({"which": "validation", "comparison": comparison}))
    assert table(tmp_path).splitlines()[2].endswith("| 9 / 4 | 0.27 |")
