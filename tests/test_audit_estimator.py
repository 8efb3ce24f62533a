"""The one-run epsilon lower bound (Steinke, Nasr and Jagielski) against values known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from server.audit.estimator import audit_scores, epsilon_lower_bound, guess_candidates, largest_reachable_bound, p_value


@pytest.mark.parametrize("m", [10, 100, 1000])
def test_perfect_guesses_at_delta_zero_match_the_closed_form(m):
    # All m guesses right: p-value p^m with p = e^eps / (1 + e^eps); the bound solves p^m = beta.
    beta = 0.05
    p = beta ** (1 / m)
    assert epsilon_lower_bound(m, m, m, 0.0, beta) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_p_value_at_delta_zero_is_the_binomial_tail():
    for r, v, eps in [(100, 70, 0.5), (500, 300, 0.2), (50, 50, 3.0), (20, 3, 1.0)]:
        q = math.exp(eps) / (1 + math.exp(eps))
        assert p_value(1000, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, q), rel=1e-12)


def test_delta_only_weakens_the_bound_and_p_value_grows_with_epsilon():
    assert p_value(1000, 200, 180, 1.0, 1e-5) > p_value(1000, 200, 180, 1.0, 0.0)
    assert epsilon_lower_bound(1000, 200, 180, 1e-5, 0.05) < epsilon_lower_bound(1000, 200, 180, 0.0, 0.05)
    values = [p_value(1000, 200, 150, e, 1e-5) for e in np.linspace(0, 3, 13)]
    assert values == sorted(values)


def test_chance_level_guessing_gives_no_bound():
    assert epsilon_lower_bound(1000, 500, 250, 1e-5, 0.05) == 0.0
    assert epsilon_lower_bound(1000, 0, 0, 1e-5, 0.05) == 0.0


def test_bound_is_what_rejects_exactly_at_beta():
    eps = epsilon_lower_bound(1000, 300, 260, 1e-5, 0.01)
    assert p_value(1000, 300, 260, eps, 1e-5) < 0.01 <= p_value(1000, 300, 260, eps + 1e-3, 1e-5)


def test_scores_that_reveal_inclusion_reach_the_largest_bound_and_noise_reaches_none():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    perfect = audit_scores(included + rng.normal(0, 0.01, 1000), included, 1e-5)
    assert perfect.correct == perfect.guesses > 0
    assert 0 < perfect.epsilon_lower_bound <= perfect.largest_reachable
    # The guess-count grid was tested at beta / len(grid): the reachable bound says so.
    k = len(guess_candidates(1000))
    assert perfect.candidates_tried == k
    assert perfect.largest_reachable == pytest.approx(largest_reachable_bound(1000, 1e-5, 0.05 / k), abs=1e-5)
    noise = audit_scores(rng.normal(0, 1, 1000), included, 1e-5)
    assert noise.epsilon_lower_bound < 0.5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 11, 5, 1.0, 0.0)
    with pytest.raises(ValueError, match="equal-length"):
        audit_scores(np.zeros(3), np.zeros(4, dtype=bool), 1e-5)
    with pytest.raises(ValueError, match="finite"):
        audit_scores(np.array([0.0, np.nan]), np.array([True, False]), 1e-5)
