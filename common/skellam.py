"""The distributed Skellam mechanism for user-level DP on a secure sum (issue 22).

Each device clips its whole session update to L2 norm ``clip``, scales it to an integer grid of
step ``gamma`` (a power of two), rounds it stochastically (secure stream), and adds its share of
symmetric Skellam noise: Poisson(mu_i / 2) - Poisson(mu_i / 2), variance mu_i per coordinate.
A sum of independent Skellams is Skellam, so when at least ``min_survivors`` devices add a share
of variance mu / min_survivors the secure sum carries Skellam noise of variance at least mu: the
mechanism the accountant analyses, with the integer sensitivity of one device's rounded vector.

Accounting: Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private Federated
Learning" (NeurIPS 2021), the multi-dimensional bound (their Theorem 3.5 / Corollary 3.6): for
integer alpha > 1, integer L1 and L2 sensitivities D1, D2 and per-coordinate variance mu,

    eps_RDP(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

composed over releases by adding RDP and converted to (epsilon, delta) by Opacus' RDP conversion.
Sensitivities, add/remove of one device's whole update (user level): the clipped vector has
``||x / gamma||_2 <= clip / gamma``; stochastic rounding moves each coordinate by less than 1, so
``D2 = clip / gamma + sqrt(d)`` and ``D1 = sqrt(d) clip / gamma + d`` hold for every draw.

The integers are handed to Flower's SecAgg+ as floats on its own quantisation grid (clipping range
``c = gamma T / 2``, ``T`` levels), where its stochastic rounding is the identity: Flower's
quantiser (which draws from NumPy's global generator) never rounds a value of ours.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent
from randomgen import ChaCha

from common.secure_random import SecureStream

RDP_ORDERS = tuple(range(2, 64)) + tuple(range(64, 513, 8))
GRANULARITY = 64  # clip / gamma >= GRANULARITY sqrt(d): rounding adds at most 1/64 to the L2 sensitivity
TAIL_SIGMAS = 40.0  # the integer range covers the update plus this many standard deviations of a share
MAX_LEVEL_BITS = 30  # Flower's quantiser casts to int32


@dataclass(frozen=True)
class SkellamPlan:
    """Public parameters of one secure user-level release (the same on every device and the server)."""

    dim: int  # coordinates of the exchanged state
    clip: float  # L2 bound of one device's session update
    noise_multiplier: float  # std of the summed noise / D2, once min_survivors shares are in
    min_survivors: int  # the fewest devices whose shares the accounted noise needs
    max_devices: int  # the most devices one sum may hold (sizes the modulus)

    def __post_init__(self) -> None:
        if self.dim < 1 or self.min_survivors < 1 or self.max_devices < self.min_survivors:
            raise ValueError(f"invalid secure aggregation plan {self}")
        if not (math.isfinite(self.clip) and self.clip > 0 and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier > 0):
            raise ValueError(f"clip and noise multiplier must be positive, got {self}")
        if self.level_bits > MAX_LEVEL_BITS:
            raise ValueError(f"the integer range needs 2^{self.level_bits} levels, more than Flower's int32 "
                             f"quantiser holds (lower the noise or the number of coordinates)")

    @property
    def gamma(self) -> float:
        """Grid step: the largest power of two with clip / gamma >= GRANULARITY sqrt(d)."""
        return 2.0 ** math.floor(math.log2(self.clip / (GRANULARITY * math.sqrt(self.dim))))

    @property
    def l2_sensitivity(self) -> float:
        return self.clip / self.gamma + math.sqrt(self.dim)

    @property
    def l1_sensitivity(self) -> float:
        return math.sqrt(self.dim) * self.clip / self.gamma + self.dim

    @property
    def variance(self) -> float:
        """Accounted per-coordinate variance of the summed noise (integer units)."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2

    @property
    def share_variance(self) -> float:
        """What each device adds."""
        return self.variance / self.min_survivors

    @property
    def level_bits(self) -> int:
        """log2 of Flower's quantisation range T: the update plus TAIL_SIGMAS of a share on each side."""
        half = self.clip / self.gamma + 1 + TAIL_SIGMAS * math.sqrt(self.share_variance)
        return max(2, math.ceil(math.log2(2 * half)))

    @property
    def levels(self) -> int:
        return 2 ** self.level_bits

    @property
    def clipping_range(self) -> float:
        """Flower's clipping range c, with 2c / T = gamma."""
        return self.gamma * self.levels / 2

    @property
    def modulus(self) -> int:
        """Flower's modulus: a sum of max_devices values in [0, T] never wraps."""
        return 2 ** (self.level_bits + math.ceil(math.log2(self.max_devices + 1)) + 1)

    def clamp_probability(self) -> float:
        """A bound on the chance that any coordinate of any device's share leaves the integer range
        (a clamp, outside the analysed mechanism; added to the stated delta). Each Poisson(lam) of a
        share deviates by s = TAIL_SIGMAS sqrt(mu_i) / 2 with probability at most
        2 exp(-s^2 / (2 (lam + s / 3))) (Bernstein), union over the two, the coordinates and devices."""
        lam = self.share_variance / 2
        s = TAIL_SIGMAS * math.sqrt(self.share_variance) / 2
        per = 4 * math.exp(-s * s / (2 * (lam + s / 3)))
        return min(1.0, per * self.dim * self.max_devices)

    def to_json(self) -> dict:
        return {**asdict(self), "gamma": self.gamma, "l2_sensitivity": self.l2_sensitivity,
                "l1_sensitivity": self.l1_sensitivity, "variance": self.variance, "levels": self.levels,
                "modulus": self.modulus, "clamp_probability": self.clamp_probability()}


def secure_plan(cfg: dict, dim: int) -> SkellamPlan:
    """The run's public user-level mechanism (resolved run config) for a state of ``dim`` coordinates."""
    return SkellamPlan(dim=dim, clip=cfg["user-clip"], noise_multiplier=cfg["user-noise-multiplier"],
                       min_survivors=cfg["min-survivors"], max_devices=cfg["clients-per-round"])


def skellam_rdp(alpha: int, l1: float, l2: float, variance: float) -> float:
    """The RDP bound of Agarwal et al. (2021) at integer order ``alpha`` (see the module docstring)."""
    if alpha < 2 or int(alpha) != alpha:
        raise ValueError(f"order must be an integer > 1, got {alpha}")
    return alpha * l2 * l2 / (2 * variance) + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4 * variance ** 2),
                                                  3 * l1 / (2 * variance))


def skellam_epsilon(releases: list[tuple[float, float, float]], delta: float) -> float:
    """(epsilon at ``delta``) of the composition of releases [(l1, l2, variance), ...]; 0 for none."""
    if not releases:
        return 0.0
    rdp = [sum(skellam_rdp(a, l1, l2, var) for l1, l2, var in releases) for a in RDP_ORDERS]
    with warnings.catch_warnings():  # at large epsilon the best order is 2, the smallest the bound allows
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(epsilon)


def plan_epsilon(plan: SkellamPlan, delta: float, releases: int = 1) -> float:
    """User-level epsilon of ``releases`` participations under ``plan`` (trust: the threshold)."""
    return skellam_epsilon([(plan.l1_sensitivity, plan.l2_sensitivity, plan.variance)] * releases, delta)


def share_epsilon(plan: SkellamPlan, delta: float) -> float:
    """Epsilon of one device's own share alone (what a server that broke secure aggregation sees)."""
    return skellam_epsilon([(plan.l1_sensitivity, plan.l2_sensitivity, plan.share_variance)], delta)


class SkellamNoise:
    """Symmetric Skellam draws from a ChaCha20 stream keyed from the OS (randomgen's ChaCha, 20 rounds,
    behind NumPy's Poisson sampler)."""

    def __init__(self) -> None:
        self._generator = np.random.Generator(ChaCha(key=int.from_bytes(os.urandom(32), "little"), rounds=20))

    def draw(self, variance: float, n: int) -> np.ndarray:
        lam = variance / 2
        return self._generator.poisson(lam, n).astype(np.int64) - self._generator.poisson(lam, n).astype(np.int64)


def clip_update(vector: np.ndarray, clip: float) -> np.ndarray:
    """``vector`` scaled down to L2 norm at most ``clip`` (unchanged when already within)."""
    norm = float(np.linalg.norm(vector))
    return vector * (clip / norm) if norm > clip else vector


def stochastic_round(scaled: np.ndarray, stream: SecureStream) -> np.ndarray:
    """Unbiased rounding to integers, each coordinate up with probability its fractional part."""
    low = np.floor(scaled)
    return (low + (stream.uniform_open(scaled.size) <= (scaled - low))).astype(np.int64)


def encode_update(vector: np.ndarray, plan: SkellamPlan, stream: SecureStream, noise: SkellamNoise) -> np.ndarray:
    """A device's share: clip, scale by 1 / gamma, round, add Skellam noise of the share variance;
    integers in [-T/2, T/2] (the clamp, if ever, is counted in ``clamp_probability``). A non-finite
    update is replaced by zeros: NaN would pass the clip and land far outside the sensitivity."""
    if vector.shape != (plan.dim,):
        raise ValueError(f"update has shape {vector.shape}, the plan {plan.dim} coordinates")
    vector = vector.astype(np.float64)
    if not np.isfinite(vector).all():  # a diverged session contributes nothing (a refusal would depend on the data)
        vector = np.zeros_like(vector)
    integers = stochastic_round(clip_update(vector, plan.clip) / plan.gamma, stream)
    integers += noise.draw(plan.share_variance, plan.dim)
    half = plan.levels // 2
    return np.clip(integers, -half, half)


def to_flower_grid(integers: np.ndarray, plan: SkellamPlan) -> np.ndarray:
    """The integers as float64 values on Flower's quantisation grid (exact: gamma is a power of two)."""
    return integers.astype(np.float64) * plan.gamma


def from_flower_mean(mean: np.ndarray, survivors: int, plan: SkellamPlan) -> np.ndarray:
    """The integer sum behind SecAgg+'s output (the survivors' mean on Flower's grid)."""
    total = np.rint(np.asarray(mean, dtype=np.float64) * survivors / plan.gamma)
    return total.astype(np.int64)
