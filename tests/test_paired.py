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


@pytest.mark.parametrize("a, b", [([], []), ([0.1, 0.2], [0.1]), ([[0.1]], [[0.1]]), ([0.1, np.nan], [0.1, 0.2])])
def test_bad_scores_are_refused(a, b):
    with pytest.raises(ValueError):
        compare_paired(np.array(a, dtype=float), np.array(b, dtype=float), np.random.default_rng(0))


def test_a_side_mixing_runs_and_references_or_naming_an_unknown_reference_is_refused():
    from simulations.bench_paired import side_scores

    with pytest.raises(typer.BadParameter, match="run folders or one reference"):
        side_scores(["runs/x", "reference:heuristic"], "test")
    with pytest.raises(typer.BadParameter, match="one of"):
        side_scores(["reference:oracle"], "test")


def test_a_run_folder_that_does_not_reproduce_its_own_figure_is_refused(ml100k, tmp_path):
    """The benchmark rescoring a run's final model must find the figure the run recorded, or refuse."""
    from common.io import save_tensors
    from common.run_config import resolve
    from common.runtimes import make_runtime
    from simulations.bench_paired import side_scores

    cfg = resolve({"seed": 0})
    runtime = make_runtime(ml100k, cfg, seed=0)
    names, arrays = runtime.state()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_tensors(folder / "adapters.safetensors", dict(zip(names, arrays)))
    def record(split: str, ndcg: float) -> None:
        (folder / "result.json").write_text(json.dumps({"split": split, "metrics": {"NDCG@10": ndcg}}))

    record("validation", 0.5)  # a figure for another split: nothing to check the test scores against
    _, users, ndcg = side_scores([str(folder)], "test")
    assert len(users) == len(ndcg) == 943
    record("test", float(ndcg.mean()))
    assert np.array_equal(side_scores([str(folder)], "test")[2], ndcg)
    record("test", float(ndcg.mean()) + 1e-6)
    with pytest.raises(typer.BadParameter, match="does not reproduce its own figure"):
        side_scores([str(folder)], "test")
