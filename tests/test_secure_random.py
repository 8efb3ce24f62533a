"""The DP randomness: OS-keyed ChaCha20 streams, exact Bernoulli thresholds, Gaussian noise on a grid."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import stats

from common.secure_random import SecureStream, add_gaussian_noise, snap, snapping_grid


# Each statistical check below fails for a correct sampler with probability below 1e-9: the mean of n
# draws has std 1/sqrt(n), the std about 1/sqrt(2n), and a KS p-value is uniform under the null.
def test_gaussian_has_the_stated_law():
    z = SecureStream().gaussian(200_001)
    assert z.shape == (200_001,) and np.isfinite(z).all()
    assert abs(z.mean()) < 0.015 and abs(z.std() - 1.0) < 0.01  # 6.7 and 6.3 standard errors
    assert stats.kstest(z, "norm").pvalue > 1e-10


def test_bernoulli_rate_and_edges():
    s = SecureStream()
    draws = s.bernoulli(0.3, 200_000)
    assert abs(draws.mean() - 0.3) < 0.0065  # 6.3 standard errors
    assert s.bernoulli(1.0, 10).all() and not s.bernoulli(0.0, 10).any()
    with pytest.raises(ValueError):
        s.bernoulli(1.5, 3)


def test_streams_are_keyed_from_the_os_not_from_global_generators():
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        outs.append(SecureStream().random_bytes(64))
    assert outs[0] != outs[1]


def test_noisy_values_lie_on_a_power_of_two_grid_far_finer_than_the_noise():
    std = 0.64
    grid = snapping_grid(std)
    assert grid == 2.0**-11 and grid <= std / 1024 < 2 * grid
    x = np.linspace(-3, 3, 10_001)
    noisy = add_gaussian_noise(x, std, SecureStream())
    assert np.array_equal(noisy / grid, np.round(noisy / grid))  # no low-order bits from the sampler
    assert abs((noisy - x).std() - std) < 0.03  # 6.6 standard errors of a std of 10,001 draws
    # exactly representable in float32, so the released tensors keep the grid
    assert np.array_equal(noisy.astype(np.float32).astype(np.float64), noisy)
    assert np.array_equal(add_gaussian_noise(x, 0.0, SecureStream()), x)  # no noise, no grid
    assert np.array_equal(snap(np.array([0.3]), 0.0), np.array([0.3]))
