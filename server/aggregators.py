"""The first stage of aggregation: from the round's validated client states to one state, by a rule
chosen with ``aggregator``. The arithmetic of the robust rules is Flower's own
(``flwr.serverapp.strategy``: FedMedian's coordinate-wise median, FedTrimmedAvg's ``trim_mean``,
MultiKrum's ``select_multikrum``, Bulyan's ``aggregate_n_closest_weights``); the second stage, the
server step (FedAvg: take it; FedAdam: Adam on it), is :mod:`server.aggregation`.

| aggregator | Flower strategy | rule |
|---|---|---|
| ``mean`` | FedAvg | equal-weight mean |
| ``median`` | FedMedian | coordinate-wise median |
| ``trimmed-mean`` | FedTrimmedAvg | coordinate-wise mean after dropping ``trim-fraction`` of the values at each end |
| ``krum`` | Krum | the one state with the smallest sum of squared distances to its n - f - 2 nearest |
| ``multikrum`` | MultiKrum | the mean of the n - f states with the best Krum scores |
| ``bulyan`` | Bulyan | Krum selection of n - 2f states, then per coordinate the mean of the n - 4f values nearest the median |

``f`` is ``byzantine-clients``. Below a rule's minimum (Krum and MultiKrum: n >= 2f + 3; Bulyan:
n >= 4f + 3) the round leaves the model unchanged; a median of fewer than 3 updates, or a trimmed
mean that drops nothing (trim-fraction x n < 1), is the mean, and the log says so. Every rule is a function of the clients' DP releases only, so under
local DP it is post-processing and changes no client's guarantee. Central DP adds its noise to the
*sum* of clipped updates, whose sensitivity the accountant takes to be the clip: it is run with
``mean`` only (a robust rule has another sensitivity), which :mod:`common.run_config` enforces.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from common.model_state import ITEM_BIAS_KEY

States = list[list[np.ndarray]]


def _mean(states: States) -> list[np.ndarray]:
    """Equal-weight mean in float64 (a weight by example count would need the count, which is private)."""
    return [np.mean(np.stack([s[k] for s in states]).astype(np.float64), axis=0).astype(np.float32)
            for k in range(len(states[0]))]


def _median(states: States, cfg: Mapping[str, Any]) -> list[np.ndarray]:
    if len(states) < 3:
        log(WARNING, "the median of %d updates is their mean this round", len(states))
    return [np.median(np.stack([s[k] for s in states]), axis=0).astype(np.float32) for k in range(len(states[0]))]


def _trimmed_mean(states: States, cfg: Mapping[str, Any]) -> list[np.ndarray]:
    if int(cfg["trim-fraction"] * len(states)) < 1:
        log(WARNING, "trimmed-mean of %d updates at trim-fraction %g drops nothing: it is the mean this round",
            len(states), cfg["trim-fraction"])
    return [np.asarray(trim_mean(np.stack([s[k] for s in states]).astype(np.float64), cfg["trim-fraction"]),
                       dtype=np.float32) for k in range(len(states[0]))]


def _records(states: States) -> list[RecordDict]:
    return [RecordDict({"arrays": ArrayRecord({str(k): Array(a) for k, a in enumerate(s)})}) for s in states]


def _krum_selected(states: States, f: int, keep: int) -> States:
    """The ``keep`` states with the best Krum scores (Flower's ``select_multikrum``)."""
    chosen = select_multikrum(_records(states), num_malicious_nodes=f, num_nodes_to_select=keep)
    return [[rec["arrays"][str(k)].numpy() for k in range(len(states[0]))] for rec in chosen]


def _krum(states: States, cfg: Mapping[str, Any]) -> list[np.ndarray] | None:
    f = cfg["byzantine-clients"]
    if len(states) < 2 * f + 3:
        return None  # Krum's guarantee needs n >= 2f + 3: the round leaves the model unchanged
    return _mean(_krum_selected(states, f, 1))


def _multikrum(states: States, cfg: Mapping[str, Any]) -> list[np.ndarray] | None:
    f = cfg["byzantine-clients"]
    if len(states) < 2 * f + 3:
        return None
    return _mean(_krum_selected(states, f, len(states) - f))


def _bulyan(states: States, cfg: Mapping[str, Any]) -> list[np.ndarray] | None:
    f = cfg["byzantine-clients"]
    if len(states) < 4 * f + 3:
        return None  # Bulyan's guarantee needs n >= 4f + 3: the round leaves the model unchanged
    selected = _krum_selected(states, f, len(states) - 2 * f)
    median = [np.median(np.stack(layer), axis=0) for layer in zip(*selected)]
    closest = aggregate_n_closest_weights(median, selected, len(states) - 4 * f)
    return [np.asarray(a, dtype=np.float32) for a in closest]


def without_common_mode(states: States, names: list[str], current: list[np.ndarray]) -> States:
    """Each state with the mean of its item-bias update removed (the update projected onto the
    zero-sum subspace of the item biases).

    The softmax over the catalogue does not change when every logit moves by the same amount, so
    each example's gradient with respect to the item biases sums to zero over the items (softmax
    minus one-hot), and so does every clipped sum of them: the mean of an honest bias update is pure
    DP noise (std sigma C / (B sqrt(items)) for SGD). A hostile update's common mode, by contrast,
    lowers every other item at once; each coordinate's shift would be within the honest range, so a
    coordinate-wise rule could not stop it. Removing it is post-processing of each DP release.
    """
    if ITEM_BIAS_KEY not in names:
        return states
    k = names.index(ITEM_BIAS_KEY)
    base = current[k].astype(np.float64)
    out = []
    for s in states:
        update = s[k].astype(np.float64) - base
        projected = (base + update - update.mean()).astype(np.float32)
        out.append([*s[:k], projected, *s[k + 1:]])
    return out


AGGREGATORS: dict[str, Callable[[States, Mapping[str, Any]], list[np.ndarray] | None]] = {
    "mean": lambda states, cfg: _mean(states),
    "median": _median,
    "trimmed-mean": _trimmed_mean,
    "krum": _krum,
    "multikrum": _multikrum,
    "bulyan": _bulyan,
}


def aggregate(states: States, cfg: Mapping[str, Any], names: list[str] | None = None,
              current: list[np.ndarray] | None = None) -> list[np.ndarray] | None:
    """The round's aggregate state under the run's ``aggregator`` (None: the rule cannot aggregate
    this few states, and the global model stays as it is). Given the state ``names`` and the
    ``current`` global state, each item-bias update's common mode is removed first
    (:func:`without_common_mode`)."""
    if not states:
        raise ValueError("aggregate needs at least one state")
    if names is not None and current is not None:
        states = without_common_mode(states, names, current)
    try:
        rule = AGGREGATORS[cfg["aggregator"]]
    except KeyError:
        raise ValueError(f"aggregator must be one of {sorted(AGGREGATORS)}, got {cfg['aggregator']!r}") from None
    return rule(states, cfg)
