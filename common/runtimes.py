"""The user models a run can train, found by the run config's ``user-model`` name."""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

from common.dataset import Dataset
from common.model_state import ModelRuntime, ModelSettings
from common.sequence_runtime import SequenceRuntime, sequence_settings
from common.split import cold_start_items

Runtime = Union[ModelRuntime, SequenceRuntime]


def runtime_settings(cfg: dict[str, Any]) -> Any:
    """The hashable settings that fix the model a run config asks for."""
    if cfg["user-model"] == "sequence":
        return ("sequence", sequence_settings(cfg), cfg["item-max-length"], bool(cfg["cold-start-holdout"]))
    return ("text", ModelSettings.from_run_config(cfg))


def make_runtime(data: Dataset, cfg: dict[str, Any], seed: int = 0, item_text: np.ndarray | None = None) -> Runtime:
    """A fresh runtime of the run's user model over ``data``'s catalogue; ``item_text`` (the sequence
    model's item vectors, e.g. a published catalogue's) saves encoding the catalogue."""
    kind, *rest = runtime_settings(cfg)
    if kind == "sequence":
        settings, item_max_length, holdout = rest
        runtime = SequenceRuntime(data, settings, item_max_length=item_max_length, seed=seed, item_text=item_text)
        if holdout:  # items that join the catalogue after training: text-only, outside the training softmax
            known = np.ones(data.num_items, dtype=bool)
            known[cold_start_items(data.num_items)] = False
            runtime.model.set_known(torch.from_numpy(known))
        return runtime
    return ModelRuntime(data, rest[0], seed=seed)
