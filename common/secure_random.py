"""Randomness for DP mechanisms: ChaCha20 keystreams keyed from the OS, and Gaussian noise that
does not leak through floating point.

Why not torch's or numpy's generators: torch's CPU generator (MT19937) keeps 32 bits of its
seed and numpy's PCG64 state can be reconstructed from its outputs, so noise drawn from
either can be replayed from one release and subtracted. Each :class:`SecureStream` is a
ChaCha20 keystream (``cryptography``) under a fresh 256-bit key from ``os.urandom``; it is
never seeded, printed or stored. Noise and sampling use separate streams.

Gaussian construction (``gaussian`` + ``snap``): Box-Muller in float64 (the radius from a
106-bit uniform, so draws reach 12.1 standard deviations: the cut tail has probability below
1e-32 and, at a noise multiplier of 0.3, a neighbouring input's mass beyond it below 1e-18),
then the *noisy value* is rounded to a power-of-two grid at most
``std / 2**10`` (Mironov's snapping, CCS 2012, applied to the Gaussian). Rounding
is post-processing of ``x + Z``, so the released value is a function of an (almost ideal)
Gaussian mechanism; the float64 sampler resolves every grid cell about 2**40 times more
finely than the grid, so its deviation from the ideal Gaussian, per coordinate and per grid
cell, is about 2**-40 relative (about 1e-8 in total variation for a 28,000-coordinate step),
far below delta. Without the grid an attacker could read the sampler's float64 lattice in
the low-order bits of the output (Mironov 2012; Jin et al., S&P 2022); the grid removes them.
Opacus' ``secure_mode`` needs torchcsprng, which has no release for this torch.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_TWO_53 = float(2**53)
_REKEY_BYTES = 2**36  # well inside ChaCha20's 2**32-block counter with a 64-byte block
GRID_FRACTION = 2.0**-10  # the snapping grid is at most this fraction of the noise std


class SecureStream:
    """A ChaCha20 keystream under a fresh OS-random 256-bit key (re-keyed from the OS before the
    block counter could wrap)."""

    def __init__(self) -> None:
        self._rekey()

    def _rekey(self) -> None:
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None)
        self._encryptor = cipher.encryptor()
        self._used = 0

    def random_bytes(self, n: int) -> bytes:
        if self._used + n > _REKEY_BYTES:
            self._rekey()
        self._used += n
        return self._encryptor.update(bytes(n))

    def uint53(self, n: int) -> np.ndarray:
        """``n`` independent uniform integers in [0, 2**53), as uint64."""
        raw = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64)
        return raw >> np.uint64(11)

    def uniform_open(self, n: int) -> np.ndarray:
        """``n`` uniforms in (0, 1]: (k + 1/2) / 2**53 for uniform 53-bit k (the largest rounds to 1.0)."""
        return (self.uint53(n).astype(np.float64) + 0.5) / _TWO_53

    def uniform_fine(self, n: int) -> np.ndarray:
        """``n`` uniforms in (0, 1] from 106 random bits: (k + (j + 1/2) / 2**53) / 2**53. Near 0 (where
        Box-Muller's radius comes from) float64 keeps the low bits, so the smallest value is about
        2**-106 instead of 2**-54: the radius reaches 12.1 standard deviations instead of 8.6."""
        high = self.uint53(n).astype(np.float64)
        low = self.uint53(n).astype(np.float64)
        return (high + (low + 0.5) / _TWO_53) / _TWO_53

    def bernoulli(self, p: float, n: int) -> np.ndarray:
        """``n`` independent draws that are True with probability floor(p * 2**53) / 2**53 (exactly p
        for p = 0 or 1; otherwise at most 2**-53 below p, which only lowers the accounted rate)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {p}")
        if p >= 1.0:
            return np.ones(n, dtype=bool)
        threshold = np.uint64(int(math.floor(p * _TWO_53)))
        return self.uint53(n) < threshold

    def gaussian(self, n: int) -> np.ndarray:
        """``n`` standard normal float64 draws (Box-Muller; the radius from 106-bit uniforms)."""
        half = (n + 1) // 2
        u1, u2 = torch.from_numpy(self.uniform_fine(half)), torch.from_numpy(self.uniform_open(half))
        # torch's vectorised float64 log, cos and sin: a few ulps from numpy's results, several times faster here
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = 2.0 * math.pi * u2
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n].numpy()


def snapping_grid(std: float) -> float:
    """The largest power of two at most ``std * GRID_FRACTION`` (0 when there is no noise)."""
    if std <= 0:
        return 0.0
    return 2.0 ** math.floor(math.log2(std * GRID_FRACTION))


def snap(values: np.ndarray, grid: float) -> np.ndarray:
    """Round to the nearest multiple of ``grid`` (unchanged when ``grid`` is 0)."""
    return values if grid <= 0 else np.round(values / grid) * grid


def add_gaussian_noise(values: np.ndarray, std: float, stream: SecureStream) -> np.ndarray:
    """``values + N(0, std^2)`` per coordinate from ``stream``, snapped to the noise's grid, as float64."""
    values = np.asarray(values, dtype=np.float64)
    if std <= 0:
        return values.copy()
    noisy = values + std * stream.gaussian(values.size).reshape(values.shape)
    return snap(noisy, snapping_grid(std))
