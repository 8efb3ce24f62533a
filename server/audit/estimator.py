"""Epsilon lower bounds from one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

m canaries are each included independently with probability 1/2. After training, an
auditor guesses "in" for the k_in highest scores and "out" for the k_out lowest and
abstains on the rest. If the training algorithm is (epsilon, delta)-DP, the number of
correct guesses W among r = k_in + k_out satisfies

    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta * alpha(v),   p = e^eps / (1 + e^eps),
    alpha(v) = max over i in 1..v of P[v - i <= Binomial(r, p) < v] / i

(their Theorem 5.2). Observing v correct guesses therefore rejects (eps, delta)-DP at
level beta whenever that p-value is below beta; the lower bound is the largest eps still
rejected. Trying several guess counts and keeping the best is a choice made after seeing
the scores, so every candidate is tested at beta / (number of candidates) (Bonferroni).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``v`` correct out of ``r`` guesses under (epsilon, delta)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    # cumulative[i-1] = P[v - i <= Bin(r, p) < v] for i = 1..v
    cumulative = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
    alpha = float(np.max(cumulative / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float, tol: float = 1e-6) -> float:
    """Largest epsilon that ``v`` correct of ``r`` guesses rejects at level ``beta`` (0 if none)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if r == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo


def largest_reachable_bound(m: int, delta: float, beta: float) -> float:
    """The bound if all m canaries were guessed and every guess were right: no audit with m canaries
    at this confidence can show more, whatever the true epsilon."""
    return epsilon_lower_bound(m, m, m, delta, beta)


def guess_candidates(m: int) -> list[tuple[int, int]]:
    """The fixed grid of (k_in, k_out) guess counts tried: top-only and symmetric, at roughly
    logarithmic spacing. Declared before scoring, so the Bonferroni factor is its length."""
    fixed = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
    sizes = sorted({k for k in (*fixed, *(m * i // 20 for i in range(1, 21))) if 1 <= k <= m})
    out = [(k, 0) for k in sizes]
    out += [(k // 2, k - k // 2) for k in sizes if k >= 2 and k // 2 + (k - k // 2) <= m]
    return out


@dataclass
class AuditBound:
    """One empirical lower bound with what is needed to check and read it."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    canaries_included: int
    guesses: int
    correct: int
    guesses_in: int
    guesses_out: int
    candidates_tried: int
    largest_reachable: float

    def to_json(self) -> dict:
        return asdict(self)


def audit_scores(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95) -> AuditBound:
    """Lower bound from canary ``scores`` (higher means "more likely included") and the truth.

    The best bound over :func:`guess_candidates` is returned, each candidate tested at
    (1 - confidence) / len(candidates).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores and included must be equal-length 1-d arrays, got {scores.shape}, {included.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    m = scores.size
    candidates = guess_candidates(m)
    beta = (1.0 - confidence) / len(candidates)
    # Ties broken at random: a stable sort would let the canary order (which encodes nothing,
    # but an implementation might) decide guesses.
    order = np.lexsort((np.random.default_rng().random(m), -scores))
    truth_sorted = included[order]
    best = None
    for k_in, k_out in candidates:
        v = int(truth_sorted[:k_in].sum()) + int((~truth_sorted[m - k_out:]).sum() if k_out else 0)
        r = k_in + k_out
        eps = epsilon_lower_bound(m, r, v, delta, beta)
        if best is None or eps > best.epsilon_lower_bound:
            best = AuditBound(eps, confidence, delta, m, int(included.sum()), r, v, k_in, k_out, len(candidates),
                              0.0)
    best.largest_reachable = largest_reachable_bound(m, delta, beta)
    return best
