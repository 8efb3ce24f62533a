"""User-level central DP on client updates (DP-FedAvg, McMahan et al., ICLR 2018).

Mechanism, exactly as the accountant models it:
- each client is included in a round independently with probability q
  (Poisson sampling; q = clients-per-round / number of clients);
- each included client's update (its state minus the global state) is clipped to
  L2 norm C; a client that is not included, refuses, fails or is rejected adds zero;
- the clipped updates are summed, Gaussian noise N(0, (z C)^2) is added to every
  coordinate, and the sum is divided by the *expected* number of clients qN
  (a fixed denominator, so the count itself is not released). The noise comes from a
  ChaCha20 stream keyed from the OS and is snapped to a grid (:mod:`common.secure_random`).
Each round is one sampled Gaussian mechanism with sensitivity C under add/remove
of one user; the rounds compose in Opacus' RDP accountant (steps = rounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from common.privacy import epsilon_of_history
from common.secure_random import SecureStream, add_gaussian_noise


def client_rate(clients_per_round: int, population: int) -> float:
    """The Poisson rate of client sampling: each client independently with this probability, so that
    clients-per-round are expected per round."""
    if population < 1:
        raise ValueError(f"population must be at least 1, got {population}")
    return min(1.0, clients_per_round / population)


def _norm(delta: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta)))


def clip_update(delta: list[np.ndarray], clip: float) -> tuple[list[np.ndarray], float]:
    """Scale ``delta`` to L2 norm at most ``clip``; returns the clipped update and the original norm.

    The factor is applied in float64 and the float32 result checked: when rounding to float32 puts
    the norm above ``clip``, the factor is stepped down (a few ulps) until it does not, so no
    clipped update ever exceeds the sensitivity the accountant assumes."""
    norm = _norm(delta)
    if not norm > clip:
        return [np.asarray(d, dtype=np.float32) for d in delta], norm
    factor = clip / norm
    while True:
        clipped = [(np.asarray(d, dtype=np.float64) * factor).astype(np.float32) for d in delta]
        if _norm(clipped) <= clip:
            return clipped, norm
        factor = float(np.nextafter(factor * (1 - 1e-7), 0.0))


@dataclass
class CentralDP:
    """Noise, clipping and user-level accounting for the server's aggregate."""

    noise_multiplier: float
    clip: float
    sample_rate: float
    population: int
    delta: float
    history: list[tuple[float, float, int]] = field(default_factory=list)  # (z, q, rounds)

    def noisy_mean(self, deltas: list[list[np.ndarray]], shapes: list[tuple[int, ...]],
                   stream: SecureStream) -> list[np.ndarray]:
        """Sum of clipped updates plus Gaussian noise (from ``stream``, snapped to a grid), over the
        expected number of clients. With no update at all the release is the noise alone."""
        total = [np.zeros(shape, dtype=np.float64) for shape in shapes]
        for d in deltas:
            clipped, _ = clip_update(d, self.clip)
            for t, c in zip(total, clipped):
                t += c
        expected = self.sample_rate * self.population
        sigma = self.noise_multiplier * self.clip
        return [(add_gaussian_noise(t, sigma, stream) / expected).astype(np.float32) for t in total]

    def record_round(self) -> None:
        """Compose one more round (called for every released aggregate)."""
        if self.history and self.history[-1][:2] == (self.noise_multiplier, self.sample_rate):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + 1)
        else:
            self.history.append((self.noise_multiplier, self.sample_rate, 1))

    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        """User-level epsilon at ``delta`` after the recorded rounds (0 before any)."""
        return epsilon_of_history(self.history, self.delta, "rdp")

    def to_json(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "clip": self.clip, "sample_rate": self.sample_rate,
                "population": self.population, "delta": self.delta, "accountant": "rdp",
                "sampling": "poisson", "history": [list(h) for h in self.history]}

    @classmethod
    def from_json(cls, raw: dict) -> "CentralDP":
        """The accountant :meth:`to_json` wrote; ValueError naming the field when a value is invalid."""
        def number(key: str, low: float, high: float, low_open: bool = True) -> float:
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not ((v > low) if low_open else (v >= low)) or v > high:
                raise ValueError(f"{key} {v!r} is not a number in {'(' if low_open else '['}{low:g}, {high:g}]")
            return float(v)

        history = []
        for entry in raw["history"]:
            z, q, n = entry
            if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not (isinstance(z, (int, float)) and z > 0) \
                    or not (isinstance(q, (int, float)) and 0 < q <= 1):
                raise ValueError(f"history entry {entry!r}: expected (noise > 0, rate in (0, 1], rounds >= 0)")
            history.append((float(z), float(q), int(n)))
        population = raw["population"]
        if isinstance(population, bool) or not isinstance(population, int) or population < 1:
            raise ValueError(f"population {population!r} is not a positive integer")
        return cls(noise_multiplier=number("noise_multiplier", 0, 1e6), clip=number("clip", 0, 1e9),
                   sample_rate=number("sample_rate", 0, 1), population=population,
                   delta=number("delta", 0, 1), history=history)
