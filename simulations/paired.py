"""Paired comparison of two rankers on the same users: how sure is a difference in mean NDCG@10?

A test figure is a mean over the split's 943 users, and most users score 0 or a value far from the
mean, so two rankers' means differ by chance by more than most configurations differ by design. The
seeds' standard deviation in the result tables covers training randomness only; this module adds the
evaluation's own sampling error. Both rankers are scored on the same users, so the comparison is
paired: the per-user differences are resampled (a percentile bootstrap over users, from a caller's
generator) and their signs counted (an exact two-sided sign test over the users whose scores differ).

The sign test asks whether a user is as likely to score higher under one ranker as under the other. A
side that averages several rankers (seeds, or draws of a release) spreads its hits over more users in
smaller amounts, which breaks that symmetry, so callers run it only when both sides average the same
number of rankers (even then its p is indicative: rankers that vary differently spread differently). The
bootstrap interval of the mean difference holds either way; it holds the rankers fixed, so it covers
which users the split holds, not training or release randomness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest

RESAMPLES = 10_000
LEVEL = 0.95
TIE = 1e-12  # differences this small are ties: averages of equal scores may differ in the last bits


@dataclass(frozen=True)
class PairedComparison:
    """Mean NDCG@10 of rankers a and b over the same users, and how sure their difference is."""

    users: int
    mean_a: float
    mean_b: float
    difference: float  # mean of a - b
    ci_low: float  # percentile bootstrap interval of the difference at ``level``
    ci_high: float
    level: float
    resamples: int
    a_higher: int  # users whose score is higher under a (by more than TIE)
    b_higher: int
    sign_test_p: float | None  # exact two-sided binomial test of a_higher of a_higher + b_higher at 1/2; None
    # where the caller did not ask for it

    def as_dict(self) -> dict:
        """The comparison as plain JSON values."""
        return asdict(self)


def compare_paired(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, resamples: int = RESAMPLES,
                   level: float = LEVEL, sign_test: bool = True) -> PairedComparison:
    """Compare per-user scores ``a`` and ``b`` (the same users in the same order, finite); ``sign_test``
    only where both average the same number of rankers (module docstring)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores must be two non-empty vectors of one length, got shapes {a.shape} "
                         f"and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores must be finite")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    difference = a - b
    means = np.empty(resamples)
    for k in range(resamples):  # one resample at a time: no (resamples x users) index array
        means[k] = difference[rng.integers(0, difference.size, difference.size)].mean()
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    a_higher, b_higher = int((difference > TIE).sum()), int((difference < -TIE).sum())
    p = None
    if sign_test:
        p = float(binomtest(a_higher, a_higher + b_higher, 0.5).pvalue) if a_higher + b_higher else 1.0
    return PairedComparison(users=int(a.size), mean_a=float(a.mean()), mean_b=float(b.mean()),
                            difference=float(difference.mean()), ci_low=float(low), ci_high=float(high),
                            level=level, resamples=resamples, a_higher=a_higher, b_higher=b_higher,
                            sign_test_p=p)
