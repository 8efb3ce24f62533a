"""Check every client reply before it may enter the aggregate.

A reply must carry exactly the expected adapter tensors (names, order, shapes,
dtypes), only finite values, and an update whose L2 norm (against the global
adapters it was trained from) is within a bound. A failing reply is rejected with
a reason and left out; the round goes on without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str = ""


def adapter_specs(names: list[str], arrays: list[np.ndarray]) -> list[TensorSpec]:
    """The expected layout, taken from the global adapters."""
    return [TensorSpec(n, tuple(a.shape), str(a.dtype)) for n, a in zip(names, arrays)]


def validate_reply(names: list[str], arrays: list[np.ndarray], specs: list[TensorSpec],
                   global_arrays: list[np.ndarray], max_update_norm: float) -> Verdict:
    """Accept the reply or say exactly why not."""
    expected = [s.name for s in specs]
    if names != expected:
        missing = sorted(set(expected) - set(names))
        extra = sorted(set(names) - set(expected))
        if missing or extra:
            return Verdict(False, f"keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
        return Verdict(False, "keys in the wrong order")
    for spec, arr in zip(specs, arrays):
        if tuple(arr.shape) != spec.shape:
            return Verdict(False, f"{spec.name}: shape {tuple(arr.shape)}, expected {spec.shape}")
        if str(arr.dtype) != spec.dtype:
            return Verdict(False, f"{spec.name}: dtype {arr.dtype}, expected {spec.dtype}")
        if not np.isfinite(arr).all():
            return Verdict(False, f"{spec.name}: non-finite values")
    norm = float(np.sqrt(sum(float(np.sum((a.astype(np.float64) - g) ** 2))
                             for a, g in zip(arrays, global_arrays))))
    if not norm <= max_update_norm:
        return Verdict(False, f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}")
    return Verdict(True)


def describe_reply(reply) -> dict:
    """What a reply carried, for the wire log: each record's kind, tensor names with dtype and
    shape (never their values), and every metric and config value verbatim."""
    if reply.has_error():
        return {"error": {"code": int(reply.error.code), "reason": str(reply.error.reason)[:500]}}
    content = reply.content
    out: dict = {"arrays": {}, "metrics": {}, "configs": {}}
    for name, record in content.array_records.items():
        out["arrays"][name] = {k: [str(record[k].dtype), list(record[k].shape)] for k in record.keys()}
    for name, record in content.metric_records.items():
        out["metrics"][name] = {k: record[k] for k in record.keys()}
    for name, record in content.config_records.items():
        out["configs"][name] = {k: (v if isinstance(v, (int, float, str, bool)) else f"<{type(v).__name__}>")
                                for k, v in record.items()}
    return out
