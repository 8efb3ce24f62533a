"""The second stage of aggregation: the server step from the round's aggregate to the next global state.

The first stage is :mod:`server.aggregators` (the rule chosen with ``aggregator``), or with
central DP the clipped, noised mean update of :mod:`server.central_dp`. The *server step*:
Flower's FedAvg (take the mean) or FedAdam (Adam on the mean update, Reddi et al.
2021), whose optimiser state is checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg

from common.errors import DataFormatError


class _GivenMean(FedAvg):
    """Makes a strategy's FedAvg stage return a mean computed elsewhere (validated, maybe DP-noised).

    FedAdam.aggregate_train calls ``super().aggregate_train`` for its averaging stage;
    placed after FedOpt in the method resolution order, this class answers that call,
    so Flower's own server-optimiser code runs on our mean.
    """

    _given: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                    MetricRecord | None]:
        return self._given, None


class FedAdamStep(FedAdam, _GivenMean):
    pass


# strategy name -> the Flower server step, given FedAdam's server learning rate (eta)
STRATEGIES = {
    "fedavg": lambda eta: _GivenMean(),
    "fedadam": lambda eta: FedAdamStep(eta=eta, eta_l=eta, tau=1e-3),
}


def make_server_step(name: str, server_learning_rate: float):
    """The server step of strategy ``name`` (see :data:`STRATEGIES`)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name](server_learning_rate)


def server_learning_rate(base: float, final_factor: float, server_round: int, num_rounds: int) -> float:
    """The server learning rate of round ``server_round`` (1-based): ``base`` in round 1, falling linearly
    towards ``final_factor * base``, which it would reach one round after the last, so every round's
    update counts (a round's releases are spent whatever its rate). A function of the round and the
    run's length (which a resume may not change while the rate falls: :func:`server.resume.check_resume`)."""
    progress = (server_round - 1) / num_rounds
    return base * (1.0 - (1.0 - final_factor) * min(1.0, max(0.0, progress)))


def to_record(names: list[str], arrays: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({n: Array(np.asarray(a, dtype=np.float32)) for n, a in zip(names, arrays)})


def server_step(step, server_round: int, names: list[str], current: list[np.ndarray],
                mean: list[np.ndarray], learning_rate: float | None = None) -> list[np.ndarray]:
    """Apply the strategy's server update to ``mean`` from ``current`` (FedAdam at ``learning_rate`` when
    given, else at its own eta)."""
    step._given = to_record(names, mean)
    if isinstance(step, FedAdam):
        if learning_rate is not None:
            step.eta = learning_rate
        step.current_arrays = {n: np.asarray(a, dtype=np.float32) for n, a in zip(names, current)}
        new, _ = step.aggregate_train(server_round, [])
    else:
        new = step._given
    step._given = None
    return [new[n].numpy().astype(np.float32) for n in names]


def optimizer_state(step) -> dict[str, np.ndarray]:
    """FedAdam's first and second moments (empty for FedAvg), for checkpoints."""
    out: dict[str, np.ndarray] = {}
    if isinstance(step, FedAdam):
        for k, v in (step.m_t or {}).items():
            out[f"m_t.{k}"] = np.asarray(v, dtype=np.float32)
        for k, v in (step.v_t or {}).items():
            out[f"v_t.{k}"] = np.asarray(v, dtype=np.float32)
    return out


def load_optimizer_state(step, tensors: dict[str, np.ndarray], names: list[str], arrays: list[np.ndarray],
                         source: Path) -> None:
    """Restore FedAdam's moments; each must match a state tensor's shape, be finite, and the second
    moment be >= 0, else a DataFormatError names ``source``."""
    if not isinstance(step, FedAdam):
        return
    shapes = {n: np.shape(a) for n, a in zip(names, arrays)}
    moments: dict[str, dict[str, np.ndarray]] = {"m_t": {}, "v_t": {}}
    for key, value in tensors.items():
        kind, _, name = key.partition(".")
        if kind not in moments or name not in shapes or np.shape(value) != shapes[name] \
                or not np.isfinite(value).all() or (kind == "v_t" and (value < 0).any()):
            raise DataFormatError(source, f"optimizer tensor {key!r}: not a finite FedAdam moment of a state "
                                          f"tensor of that shape (second moments >= 0)")
        moments[kind][name] = value
    step.m_t, step.v_t = (moments["m_t"] or None), (moments["v_t"] or None)
