"""The private heuristic's release: its sensitivity on neighbouring data, its noise and its scores."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.privacy import epsilon_of_history
from simulations.private_heuristic import noisy_counts, release_noise


class FixedNormal:
    """An injected draw: ``normal`` returns the given values and records its arguments."""

    def __init__(self, values: np.ndarray) -> None:
        self.values, self.calls = values, []

    def normal(self, loc: float, scale: float, size) -> np.ndarray:
        self.calls.append((loc, scale, size))
        return self.values


def test_removing_one_rating_moves_the_count_vector_by_exactly_one_in_l2(ml100k_split):
    """The release's sensitivity: neighbouring devices (one rating added or removed) differ by a unit vector."""
    split = ml100k_split
    user = 7
    shorter = [rows[:-1] if u == user else rows for u, rows in enumerate(split.train)]
    neighbour = dataclasses.replace(split, train=shorter)
    difference = split.train_item_counts() - neighbour.train_item_counts()
    assert np.linalg.norm(difference) == 1.0
    assert difference[split.data.item[split.train[user][-1]]] == 1


def test_the_server_sum_adds_one_gaussian_of_std_sigma_sqrt_devices_per_item():
    counts = np.array([3.0, 0.0, 7.0])
    draw = FixedNormal(np.array([0.5, -2.0, 1.0]))
    summed = noisy_counts(counts, sigma=2.0, devices=9, rng=draw)
    assert draw.calls == [(0.0, 6.0, (3,))]
    assert np.array_equal(summed, counts + draw.values)


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_the_noise_of_one_release_costs_at_most_the_epsilon_it_was_solved_for(epsilon):
    sigma = release_noise(epsilon)
    assert epsilon - 0.01 <= epsilon_of_history([(sigma, 1.0, 1)], 1e-5, "rdp") <= epsilon  # Opacus' tolerance
    assert epsilon_of_history([(0.9 * sigma, 1.0, 1)], 1e-5, "rdp") > epsilon  # less noise would cost more


def test_with_exact_counts_it_ranks_as_the_published_heuristic_and_the_text_prior(ml100k_split):
    from common.evaluation import rank_targets
    from common.reference_scores import HEURISTIC_DECAY, HEURISTIC_HISTORY, HEURISTIC_POP_WEIGHT, heuristic_scores
    from common.sequence import evaluation_rows
    from simulations.private_heuristic import heuristic_inputs, target_ranks

    split = ml100k_split
    inputs = heuristic_inputs(split)
    vectors = torch.from_numpy(inputs.item_text.astype(np.float32))
    rows = evaluation_rows(split, "test", HEURISTIC_HISTORY, inputs.users)
    counts = split.train_item_counts()
    for weight in (HEURISTIC_POP_WEIGHT, 0.0):
        expected = rank_targets(heuristic_scores(vectors, rows, counts, HEURISTIC_DECAY, weight), split, "test",
                                inputs.users)
        assert np.array_equal(target_ranks(inputs, "test", counts.astype(np.float64), weight), expected)


def test_each_draw_releases_the_true_counts_with_the_solved_noise_from_its_own_generator(ml100k_split, monkeypatch):
    import simulations.private_heuristic as ph

    inputs = ph.heuristic_inputs(ml100k_split)
    seen = []

    def recording(counts, sigma, devices, rng):
        seen.append((counts.copy(), sigma, devices, rng.random()))
        return counts.astype(np.float64)

    monkeypatch.setattr(ph, "noisy_counts", recording)
    ranks = ph.private_heuristic_ranks(inputs, "validation", 4.0, 0.2, draws=3)
    assert ranks.shape == (3, len(inputs.users))
    for counts, sigma, devices, _ in seen:
        assert np.array_equal(counts, ml100k_split.train_item_counts())
        assert (sigma, devices) == (ph.release_noise(4.0), 943)
    assert len({first for *_, first in seen}) == 3  # a generator of its own per draw


def test_negative_noisy_counts_count_as_zero(ml100k_split):
    from simulations.private_heuristic import heuristic_inputs, target_ranks

    inputs = heuristic_inputs(ml100k_split)
    counts = ml100k_split.train_item_counts().astype(np.float64)
    negative = counts.copy()
    negative[::3] = -50.0
    clipped = np.where(negative < 0, 0.0, negative)
    assert np.array_equal(target_ranks(inputs, "test", negative, 0.2), target_ranks(inputs, "test", clipped, 0.2))
    assert not np.array_equal(target_ranks(inputs, "test", negative, 0.2), target_ranks(inputs, "test", counts, 0.2))


def test_the_weight_with_the_highest_mean_validation_figure_is_chosen(monkeypatch):
    import simulations.private_heuristic as ph

    figures = dict(zip(ph.WEIGHTS, (0.03, 0.05, 0.04, 0.06, 0.01)))
    calls = []

    def fake(inputs, which, epsilon, weight, draws):
        calls.append(which)
        return np.full((draws, 5), figures[weight])

    monkeypatch.setattr(ph, "private_heuristic_ndcg", fake)
    weight, means = ph.chosen_weight(None, 8.0)
    assert weight == 0.3 and means == pytest.approx(figures)
    assert set(calls) == {"validation"}


def test_the_privacy_utility_plot_refuses_a_private_heuristic_record_without_its_points(tmp_path):
    import json

    import pytest

    from common.errors import DataFormatError
    from simulations.bench_privacy_utility import _private_heuristic_points

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"points": [{"epsilon": 8.0, "test_NDCG@10_mean": 0.05}]}))
    assert _private_heuristic_points(good) == [{"epsilon": 8.0, "test_NDCG@10_mean": 0.05}]
    for bad in ({"points": [{"epsilon": 8.0}]}, {"points": ["x"]}, {"curve": []}, [1, 2]):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(DataFormatError, match="bad.json"):
            _private_heuristic_points(path)
