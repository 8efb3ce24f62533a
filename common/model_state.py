"""The federated model state: exactly the tensors clients train and exchange, in a fixed order.

That is the LoRA adapters (sorted names) followed by the optional item bias. The
frozen encoder never moves; only these tensors travel, as float32 numpy arrays.
A process keeps one :class:`ModelRuntime` (tokenizer, encoder, recommender and the
catalogue's frozen features), because building it costs seconds and every client
or server round in that process reuses it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from common.dataset import Dataset
from common.encoder import LoraSettings, TextEncoder, get_adapters, load_tokenizer, set_adapters
from common.features import FeatureSet, compute_features
from common.model import Recommender, refresh_items

ITEM_BIAS_KEY = "item_bias"


def state_names(model: Recommender) -> list[str]:
    """Exchange order: LoRA tensors (sorted), then the item bias if the model has one."""
    names = list(model.encoder.adapter_names())
    if model.head.bias is not None:
        names.append(ITEM_BIAS_KEY)
    return names


def get_state(model: Recommender) -> tuple[list[str], list[np.ndarray]]:
    """Names and float32 copies of the exchanged tensors."""
    arrays = [t.numpy().astype(np.float32) for t in get_adapters(model.encoder)]
    if model.head.bias is not None:
        arrays.append(model.head.bias.bias.detach().numpy().astype(np.float32).copy())
    return state_names(model), arrays


STATE_BOUND = 1e3  # no honest adapter or item-bias value comes near it


def check_state_values(names: list[str], arrays: list[np.ndarray]) -> None:
    """Raise ValueError unless every received value is finite and within ``STATE_BOUND``: a state
    built to overflow for some inputs only would make training fail for some data only."""
    for name, a in zip(names, arrays):
        a = np.asarray(a)
        if not np.isfinite(a).all() or (a.size and float(np.abs(a).max()) > STATE_BOUND):
            raise ValueError(f"received state tensor {name}: non-finite values or |x| > {STATE_BOUND:g}")


def set_state(model: Recommender, names: list[str], arrays: list[np.ndarray]) -> None:
    """Load exchanged tensors; names must be exactly :func:`state_names` in order, every value finite
    and bounded (:func:`check_state_values`)."""
    check_state_values(names, arrays)
    expected = state_names(model)
    if list(names) != expected:
        raise ValueError(f"model state keys differ from the expected {len(expected)} keys "
                         f"(first expected {expected[:2]}, got {list(names)[:2]})")
    n_lora = len(model.encoder.adapter_names())
    set_adapters(model.encoder, [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays[:n_lora]])
    if model.head.bias is not None:
        bias = np.asarray(arrays[n_lora], dtype=np.float32)
        if bias.shape != tuple(model.head.bias.bias.shape):
            raise ValueError(f"{ITEM_BIAS_KEY}: shape {bias.shape}, expected {tuple(model.head.bias.bias.shape)}")
        with torch.no_grad():
            model.head.bias.bias.copy_(torch.from_numpy(bias))


def state_digest(arrays: list[np.ndarray]) -> str:
    """Content hash of a state (identifies which adapters a cached item embedding belongs to)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


def state_bytes(arrays: list[np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays))


def checked_stored_values(raw: Any, defaults: dict[str, Any], run_config_keys: dict[str, str]) -> dict[str, Any]:
    """Model settings read back from a file, as a dict: a JSON object with no unknown field, every value of
    its default's type (finite numbers) and, for fields in ``run_config_keys``, within that run-config
    key's range; a ValueError naming the field otherwise (before any model is built from them)."""
    from common.run_config import FIELDS

    if not isinstance(raw, dict):
        raise ValueError(f"settings must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    values = {}
    for name, default in defaults.items():
        value = raw.get(name, default)
        wanted = bool if isinstance(default, bool) else int if isinstance(default, int) else float
        ok = isinstance(value, bool) if wanted is bool else (
            isinstance(value, int) and not isinstance(value, bool) if wanted is int else
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok:
            raise ValueError(f"setting {name}: {value!r} is not a {wanted.__name__}")
        if name in run_config_keys:  # ConfigError is a ValueError
            FIELDS[run_config_keys[name]].check(run_config_keys[name], value)
        values[name] = wanted(value)
    return values


@dataclass(frozen=True)
class ModelSettings:
    """What fixes the model's shape and inputs (taken from the resolved run config)."""

    lora_rank: int = 8
    lora_alpha: int = 16
    item_bias: bool = True
    item_bias_scale: float = 1.0  # 1 = plain bias; device states saved before the knob existed load as 1
    history_len: int = 5
    max_length: int = 64
    item_max_length: int = 32
    scale: float = 20.0

    @classmethod
    def from_stored(cls, raw: Any) -> "ModelSettings":
        """Settings read back from a file: every field of the right type and within the run config's
        range (a ValueError naming the field otherwise), checked before any model is built from them."""
        from common.run_config import FIELDS

        defaults = asdict(cls())
        keys = {n: n.replace("_", "-") for n in defaults if n.replace("_", "-") in FIELDS}
        values = checked_stored_values(raw, defaults, keys)
        for name in set(defaults) - set(keys):
            if not values[name] > 0:
                raise ValueError(f"setting {name}: {values[name]!r} must be a positive number")
        return cls(**values)

    @classmethod
    def from_run_config(cls, cfg: dict[str, Any]) -> "ModelSettings":
        return cls(lora_rank=cfg["lora-rank"], lora_alpha=cfg["lora-alpha"], item_bias=cfg["item-bias"],
                   item_bias_scale=cfg["item-bias-scale"],
                   history_len=cfg["history-len"], max_length=cfg["max-length"],
                   item_max_length=cfg["item-max-length"])


_CATALOGUE_CACHE: dict[tuple[str, int], FeatureSet] = {}


def _catalogue_features(encoder: TextEncoder, tokenizer, texts: list[str], max_length: int) -> FeatureSet:
    """Frozen-layer features of the catalogue; identical for every LoRA state, so cached per process."""
    key = (hashlib.sha256("\n".join(texts).encode()).hexdigest(), max_length)
    if key not in _CATALOGUE_CACHE:
        _CATALOGUE_CACHE[key] = compute_features(encoder, tokenizer, texts, max_length)
    return _CATALOGUE_CACHE[key]


class ModelRuntime:
    """One process's encoder, recommender and cached catalogue features for a dataset."""

    kind = "text"

    def __init__(self, data: Dataset, settings: ModelSettings, seed: int = 0) -> None:
        torch.manual_seed(seed)  # LoRA A matrices are random; B is zero, so the start equals zero-shot
        self.data, self.settings = data, settings
        self.tokenizer = load_tokenizer()
        self.encoder = TextEncoder(LoraSettings(rank=settings.lora_rank, alpha=settings.lora_alpha))
        self.model = Recommender(self.encoder, data.num_items, scale=settings.scale, item_bias=settings.item_bias,
                                bias_scale=settings.item_bias_scale)
        self._item_features: FeatureSet | None = None
        self._items_for: str | None = None

    @property
    def item_features(self) -> FeatureSet:
        """Frozen-layer features of the catalogue, computed on first use (a device that receives
        published item embeddings never needs them)."""
        if self._item_features is None:
            self._item_features = _catalogue_features(self.encoder, self.tokenizer, self.data.item_texts(),
                                                      self.settings.item_max_length)
        return self._item_features

    def use_item_embeddings(self, embeddings: np.ndarray, digest: str) -> None:
        """Take catalogue embeddings computed elsewhere (the server's published catalogue) for the
        state with ``digest``, instead of re-encoding the catalogue here."""
        if embeddings.shape != tuple(self.model.head.item_emb.shape):
            raise ValueError(f"published item embeddings have shape {embeddings.shape}, "
                             f"the model expects {tuple(self.model.head.item_emb.shape)}")
        norms = np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1)
        if not np.isfinite(norms).all() or np.abs(norms - 1.0).max() > 1e-3:
            raise ValueError("published item embeddings must be finite unit vectors (the encoder's output); "
                             "refusing a catalogue that is not")
        self.model.head.item_emb.copy_(torch.as_tensor(embeddings, dtype=torch.float32))
        self._items_for = digest

    def features(self, texts: list[str], fixed: bool = False) -> FeatureSet:
        """Frozen features of user texts; ``fixed`` keeps every tensor at the full ``max_length``
        (:func:`common.features.compute_features`)."""
        return compute_features(self.encoder, self.tokenizer, texts, self.settings.max_length, fixed=fixed)

    def state(self) -> tuple[list[str], list[np.ndarray]]:
        """Names and float32 copies of the exchanged tensors (:func:`get_state`)."""
        return get_state(self.model)

    def load_state(self, names: list[str], arrays: list[np.ndarray], refresh: bool = True) -> None:
        """Set the global state and make sure the catalogue embeddings match it (cached by digest);
        ``refresh=False`` leaves that to :meth:`use_item_embeddings`."""
        set_state(self.model, names, arrays)
        digest = state_digest(arrays)
        if refresh and digest != self._items_for:
            refresh_items(self.model, self.item_features)
            self._items_for = digest
