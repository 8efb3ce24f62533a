"""Check every client reply before it may enter the aggregate or a report.

A reply must carry exactly the expected adapter tensors (names, order, shapes,
dtypes), only finite values, and an update whose L2 norm (against the global
adapters it was trained from) is within a bound; its metrics must be exactly the
fields :mod:`common.wire` allows, each a finite number in its range, describing the
mechanism the run configured. A failing reply is rejected with a reason and left
out; the round goes on without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from common.privacy import client_schedule
from common.wire import RECORD_NAMES, REFUSAL_REASONS, allowed_metrics


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


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def expected_mechanism(cfg: Mapping[str, Any]) -> dict[str, float]:
    """What an honest client's DP-SGD session under ``cfg`` reports (steps: the planned maximum)."""
    schedule = client_schedule(cfg)
    return {"noise-multiplier": cfg["noise-multiplier"], "max-grad-norm": cfg["max-grad-norm"],
            "sample-rate": schedule.sample_rate, "steps": schedule.steps,
            "expected-batch-size": schedule.expected_batch_size, "delta": cfg["delta"]}


def validate_metrics(kind: str, metrics: Mapping[str, Any], cfg: Mapping[str, Any]) -> Verdict:
    """Check the metric record of a non-refused ``train`` or ``evaluate`` reply against the wire
    contract and the run's configured mechanism."""
    allowed = allowed_metrics(kind)
    extra = sorted(set(metrics) - set(allowed))
    if extra:
        return Verdict(False, f"metrics: unexpected field(s) {extra[:5]}")
    values = {}
    for key, raw in metrics.items():
        value = _number(raw)
        if value is None:
            return Verdict(False, f"metrics.{key}: {raw!r} is not a finite number")
        values[key] = value
    if values.get("refused", 0.0) != 0.0:
        return Verdict(False, "metrics.refused: a reply with tensors must have refused = 0")
    if kind == "train" and not cfg["local-dp"]:
        # No DP session, so nothing to describe: a device that runs without DP (its policy allows it)
        # sends its tensors and refused = 0 only.
        return Verdict(True) if set(values) <= {"refused"} else Verdict(
            False, f"metrics: {sorted(set(values) - {'refused'})} in a reply of a run without local DP")
    required = ["epsilon", "delta"] + (["noise-multiplier", "max-grad-norm", "sample-rate", "steps",
                                        "expected-batch-size"] if kind == "train" else
                                       ["HR@10", "NDCG@10", "eval-noise-multiplier"])
    missing = [k for k in required if k not in values]
    if missing:
        return Verdict(False, f"metrics: missing field(s) {missing}")
    if not 0.0 <= values["epsilon"] <= cfg["client-epsilon-budget"] * (1 + 1e-6):
        return Verdict(False, f"metrics.epsilon: {values['epsilon']:g} outside [0, {cfg['client-epsilon-budget']:g}]")
    want = expected_mechanism(cfg)
    if not _close(values["delta"], want["delta"]):
        return Verdict(False, f"metrics.delta: {values['delta']:g}, the run's delta is {want['delta']:g}")
    if kind == "train":
        for key in ("noise-multiplier", "max-grad-norm", "sample-rate", "expected-batch-size"):
            if not _close(values[key], want[key]):
                return Verdict(False, f"metrics.{key}: {values[key]:g}, the run configured {want[key]:g}")
        if not (values["steps"] == int(values["steps"]) and 1 <= values["steps"] <= want["steps"]):
            return Verdict(False, f"metrics.steps: {values['steps']:g}, expected an integer in 1..{want['steps']}")
        if values.get("adjacency-replace-one", 0.0) not in (0.0, 1.0):
            return Verdict(False, "metrics.adjacency-replace-one: expected 0 or 1")
        return Verdict(True)
    z = cfg["eval-noise-multiplier"]
    if not _close(values["eval-noise-multiplier"], z):
        return Verdict(False, f"metrics.eval-noise-multiplier: {values['eval-noise-multiplier']:g}, the run "
                              f"configured {z:g}")
    bound = 1.0 + 40.0 * z * math.sqrt(2.0)  # 40 noise std: never reached by an honest reply
    for key in ("HR@10", "NDCG@10"):
        if abs(values[key]) > bound:
            return Verdict(False, f"metrics.{key}: {values[key]:g} is beyond any honest noisy value (|x| <= {bound:g})")
    return Verdict(True)


WIRE_LOG_LIMIT = 200  # characters of a string value, entries of a record, kept in the wire log


def _loggable(value: Any) -> Any:
    """A reply value as the wire log keeps it: finite numbers and short strings as they are; NaN,
    infinity, long strings and other types as a bounded description (the log is strict JSON)."""
    if isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**53):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else f"<{value}>"
    if isinstance(value, str):
        return value if len(value) <= WIRE_LOG_LIMIT else value[:WIRE_LOG_LIMIT] + f"...<{len(value)} chars>"
    return f"<{type(value).__name__}>"


def describe_reply(reply) -> dict:
    """What a reply carried, for the wire log: each record's kind, tensor names with dtype and
    shape (never their values), and each metric and config value (bounded, see ``_loggable``)."""
    if reply.has_error():
        return {"error": {"code": int(reply.error.code), "reason": str(reply.error.reason)[:500]}}
    try:
        content = reply.content
        out: dict = {"arrays": {}, "metrics": {}, "configs": {}}
        for name, record in list(content.array_records.items())[:WIRE_LOG_LIMIT]:
            out["arrays"][name] = {k: [str(record[k].dtype), list(record[k].shape)]
                                   for k in list(record.keys())[:WIRE_LOG_LIMIT]}
        for name, record in list(content.metric_records.items())[:WIRE_LOG_LIMIT]:
            out["metrics"][name] = {k: _loggable(record[k]) for k in list(record.keys())[:WIRE_LOG_LIMIT]}
        for name, record in list(content.config_records.items())[:WIRE_LOG_LIMIT]:
            out["configs"][name] = {k: _loggable(v) for k, v in list(record.items())[:WIRE_LOG_LIMIT]}
    except Exception as exc:  # noqa: BLE001 - the log must never stop the round
        return {"unreadable": type(exc).__name__}
    return out


def judge_train_reply(reply, cfg: Mapping[str, Any], specs: list[TensorSpec],
                      global_arrays: list[np.ndarray]) -> tuple[str, list[np.ndarray], str, float | None]:
    """(outcome, arrays, reason, epsilon) of one train reply: outcome ``trained``, ``refused``,
    ``rejected`` or ``failed``; epsilon is the device's reported spend once its metrics are valid
    (also when its tensors are then rejected: the update left the device). Nothing in a reply is
    used before it is validated; a reply that cannot even be parsed is rejected, never raised."""
    if reply.has_error():
        return "failed", [], str(reply.error.reason), None
    epsilon = None
    try:
        content = reply.content
        if set(content.keys()) - RECORD_NAMES:
            return "rejected", [], f"unexpected record(s) {sorted(set(content.keys()) - RECORD_NAMES)[:5]}", None
        metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
        if "status" in content.config_records:
            reason = content["status"].get("reason", "")
            return "refused", [], reason if reason in REFUSAL_REASONS else "unknown reason code", None
        verdict = validate_metrics("train", metrics, cfg)
        if not verdict.accepted:
            return "rejected", [], verdict.reason, None
        epsilon = float(metrics["epsilon"]) if "epsilon" in metrics else None
        if "arrays" not in content.array_records:
            return "rejected", [], "no arrays record", epsilon
        names = list(content["arrays"].keys())
        arrays = [content["arrays"][k].numpy() for k in names]
    except Exception as exc:  # noqa: BLE001 - a malformed reply must not stop the round
        return "rejected", [], f"unreadable reply ({type(exc).__name__})", epsilon
    verdict = validate_reply(names, arrays, specs, global_arrays, cfg["max-update-norm"])
    return ("trained", arrays, "", epsilon) if verdict.accepted else ("rejected", [], verdict.reason, epsilon)
