"""Which clients train in a round: one function per ``client-sampling`` scheme, in a registry.

Node ids are uint64: positions are chosen, never ids, so numpy never rounds an id through float64.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from common.run_config import ConfigError
from common.secure_random import SecureStream
from server.central_dp import client_rate

Sampler = Callable[[list[int], dict[str, Any], int, np.random.Generator, SecureStream], list[int]]


def cyclic(node_ids: list[int], cfg: dict[str, Any], rnd: int, rng: np.random.Generator,
           secure: SecureStream) -> list[int]:
    """The population walked in passes, each in a fresh order drawn from (seed, pass): round ``rnd``
    takes the next clients-per-round positions, so no client trains twice before every client has
    trained once (a round that straddles two passes drops a repeated client)."""
    n = len(node_ids)
    k = min(cfg["clients-per-round"], n)
    start = (rnd - 1) * k
    chosen: set[int] = set()
    for first_pass in range(start // n, (start + k - 1) // n + 1):
        order = np.random.default_rng([cfg["seed"], first_pass, 2]).permutation(n)
        lo, hi = max(start, first_pass * n), min(start + k, (first_pass + 1) * n)
        chosen.update(int(i) for i in order[lo - first_pass * n: hi - first_pass * n])
    return sorted(node_ids[i] for i in chosen)


def uniform(node_ids: list[int], cfg: dict[str, Any], rnd: int, rng: np.random.Generator,
            secure: SecureStream) -> list[int]:
    """A fresh fixed-size uniform sample from ``rng`` (reproducible from the seed)."""
    n = len(node_ids)
    return sorted(node_ids[i] for i in rng.choice(n, size=min(cfg["clients-per-round"], n), replace=False))


def poisson(node_ids: list[int], cfg: dict[str, Any], rnd: int, rng: np.random.Generator,
            secure: SecureStream) -> list[int]:
    """Each client independently at rate clients-per-round / N, from the secure stream: what the
    central-DP accountant models, and it must not be replayable."""
    n = len(node_ids)
    q = client_rate(cfg["clients-per-round"], n)
    return [nid for nid, chosen in zip(node_ids, secure.bernoulli(q, n)) if chosen]


SAMPLERS: dict[str, Sampler] = {"cyclic": cyclic, "uniform": uniform, "poisson": poisson}


def sample_clients(node_ids: list[int], cfg: dict[str, Any], rnd: int, rng: np.random.Generator,
                   secure: SecureStream) -> list[int]:
    """The clients of round ``rnd`` (1-based) under the run's resolved ``client-sampling`` scheme."""
    try:
        sampler = SAMPLERS[cfg["client-sampling"]]
    except KeyError:
        raise ConfigError(f"run config 'client-sampling': {cfg['client-sampling']!r} is not one of "
                          f"{sorted(SAMPLERS)}") from None
    return sampler(node_ids, cfg, rnd, rng, secure)
