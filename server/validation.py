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

from common.array_codec import decode_array
from common.privacy import client_schedule
from common.wire import RECORD_NAMES, REFUSAL_REASONS, allowed_metrics

FALSE_REJECTION = 1e-9  # the probability that the derived bound rejects an honest update
UNBOUNDED_UPDATE_NORM = 50.0  # the bound where the mechanism gives none (no local DP, or no cap on examples)
ADAM_BETAS = (0.9, 0.999)  # torch's defaults, which the client's Adam uses


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


def _check_keys(names: list[str], specs: list[TensorSpec]) -> Verdict:
    expected = [s.name for s in specs]
    if names != expected:
        missing = sorted(set(expected) - set(names))
        extra = sorted(set(names) - set(expected))
        if missing or extra:
            return Verdict(False, f"keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
        return Verdict(False, "keys in the wrong order")
    return Verdict(True)


NPY_HEADER_SLACK = 4096  # bytes beyond the raw tensor that a serialised array may carry (its header)


def check_layout(names: list[str], records: list[Any], specs: list[TensorSpec]) -> Verdict:
    """Keys, shapes, dtypes and byte sizes from the arrays' metadata, before any tensor is converted
    (copied): an extra or oversized tensor is rejected without being touched."""
    verdict = _check_keys(names, specs)
    if not verdict.accepted:
        return verdict
    for spec, rec in zip(specs, records):
        shape, dtype = tuple(getattr(rec, "shape", ())), str(getattr(rec, "dtype", ""))
        if shape != spec.shape or dtype != spec.dtype:
            return Verdict(False, f"{spec.name}: shape {shape} {dtype}, expected {spec.shape} {spec.dtype}")
        expected_bytes = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        if len(getattr(rec, "data", b"")) > expected_bytes + NPY_HEADER_SLACK:
            return Verdict(False, f"{spec.name}: {len(rec.data)} bytes for a {spec.shape} {spec.dtype} tensor")
    return Verdict(True)


def validate_reply(names: list[str], arrays: list[np.ndarray], specs: list[TensorSpec],
                   global_arrays: list[np.ndarray], max_update_norm: float) -> Verdict:
    """Accept the reply or say exactly why not."""
    verdict = _check_keys(names, specs)
    if not verdict.accepted:
        return verdict
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


def update_norm_bound(cfg: Mapping[str, Any], dimension: int) -> float:
    """The L2 bound on a reply's update (its state minus the global state it was sent).

    ``max-update-norm`` when set; else derived from the public local-DP mechanism, so that an honest
    client exceeds it with probability below :data:`FALSE_REJECTION`. A session takes K public steps
    (:func:`common.privacy.client_schedule`), each adding to the gradient sum at most ``cap`` clipped
    per-example gradients (norm <= C each, padding rows give zero) and Gaussian noise sigma*C*z,
    z ~ N(0, I_d), divided by the public denominator B. With SGD at learning rate lr (the larger of
    the text model's adapters' and item bias's; the sequence model's one rate):

        ||update|| <= (lr / B) * (K * cap * C + sigma * C * sqrt(K) * (sqrt(d) + t)) + snapping,

    where P(||sum of K noise draws|| >= sqrt(K) * (sqrt(d) + t)) <= exp(-t^2 / 2) (Gaussian
    concentration of a 1-Lipschitz function, E||z|| <= sqrt(d)), so t = sqrt(2 ln(1 / 1e-9)) = 6.44;
    snapping moves each noise value by at most half its grid (<= sigma*C/2048), K*sqrt(d) times.
    With Adam, each step moves a coordinate by at most lr * max(1, (1 - beta1) / sqrt(1 - beta2))
    (Kingma and Ba 2015, section 2.1). Without local DP, or without a cap on a session's examples,
    nothing bounds an honest update and :data:`UNBOUNDED_UPDATE_NORM` is used.
    """
    if cfg["max-update-norm"] > 0:
        return float(cfg["max-update-norm"])
    if not cfg["local-dp"] or cfg["examples-per-user"] == 0:
        return UNBOUNDED_UPDATE_NORM
    schedule = client_schedule(cfg)
    k, b = schedule.steps, schedule.expected_batch_size
    # the sequence model trains every tensor at learning-rate; the text model its item bias at its own
    text_item_lr = cfg["item-learning-rate"] if cfg["item-bias"] and cfg["user-model"] == "text" else 0.0
    lr = max(cfg["learning-rate"], text_item_lr)
    if cfg["local-optimizer"] == "adam":
        beta1, beta2 = ADAM_BETAS
        bound = k * lr * max(1.0, (1 - beta1) / math.sqrt(1 - beta2)) * math.sqrt(dimension)
    else:
        c, sigma = cfg["max-grad-norm"], cfg["noise-multiplier"]
        t = math.sqrt(2 * math.log(1 / FALSE_REJECTION))
        noise = sigma * c * math.sqrt(k) * (math.sqrt(dimension) + t) + k * math.sqrt(dimension) * sigma * c / 2048
        bound = lr / b * (k * cfg["examples-per-user"] * c + noise)
    return bound * (1 + 1e-3)  # float32 arithmetic on the device


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
    low, high = evaluation_release_range(z)
    for key in ("HR@10", "NDCG@10"):
        if not low <= values[key] <= high:
            return Verdict(False, f"metrics.{key}: {values[key]:g} is outside the range [{low:.4g}, {high:.4g}] of an "
                                  f"honest noisy release")
    return Verdict(True)


EVAL_RANGE_STD = 6.5  # P(|N(0,1)| > 6.5) = 8e-11: an honest release falls outside with probability < 1e-9


def evaluation_release_range(eval_noise_multiplier: float) -> tuple[float, float]:
    """Where an honest noisy evaluation release lies: a metric in [0, 1] plus Gaussian noise of std
    z*sqrt(2), within :data:`EVAL_RANGE_STD` std of that interval."""
    k = EVAL_RANGE_STD * eval_noise_multiplier * math.sqrt(2.0)
    return -k, 1.0 + k


def printable(text: object, limit: int = 200) -> str:
    """Text that came from a device (an error reason, a key or field name inside a rejection reason) as
    the server logs and records it: control characters (newlines, terminal escapes) replaced by '?',
    cut at ``limit`` characters, so a device can neither forge log lines nor flood the log."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


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


WIRE_LOG_NAME_LIMIT = 100  # characters of a record name, key or dtype kept in the wire log
WIRE_LOG_SHAPE_LIMIT = 8  # dimensions of a shape kept in the wire log


def _bounded(text: object) -> str:
    """A name, key or dtype from a reply as the wire log keeps it: printable and at most
    :data:`WIRE_LOG_NAME_LIMIT` characters (with its full length noted when cut)."""
    text = str(text)
    kept = printable(text, WIRE_LOG_NAME_LIMIT)
    return kept if len(text) <= WIRE_LOG_NAME_LIMIT else f"{kept}...<{len(text)} chars>"


def _bounded_shape(shape: object) -> list:
    """A declared shape as the wire log keeps it: at most :data:`WIRE_LOG_SHAPE_LIMIT` integer dimensions."""
    dims = list(shape) if isinstance(shape, (list, tuple)) else []
    kept = [int(d) if isinstance(d, int) and not isinstance(d, bool) and abs(d) < 2 ** 63 else _bounded(d)
            for d in dims[:WIRE_LOG_SHAPE_LIMIT]]
    return kept if len(dims) <= WIRE_LOG_SHAPE_LIMIT else [*kept, f"...<{len(dims)} dimensions>"]


def describe_reply(reply) -> dict:
    """What a reply carried, for the wire log: each record's kind, tensor names with dtype and
    shape (never their values), and each metric and config value (bounded, see ``_loggable``)."""
    if reply.has_error():
        return {"error": {"code": int(reply.error.code), "reason": str(reply.error.reason)[:500]}}
    try:
        content = reply.content
        out: dict = {"arrays": {}, "metrics": {}, "configs": {}}
        for name, record in list(content.array_records.items())[:WIRE_LOG_LIMIT]:
            out["arrays"][_bounded(name)] = {
                _bounded(k): [_bounded(record[k].dtype), _bounded_shape(record[k].shape)]
                for k in list(record.keys())[:WIRE_LOG_LIMIT]}
        for name, record in list(content.metric_records.items())[:WIRE_LOG_LIMIT]:
            out["metrics"][_bounded(name)] = {_bounded(k): _loggable(record[k])
                                              for k in list(record.keys())[:WIRE_LOG_LIMIT]}
        for name, record in list(content.config_records.items())[:WIRE_LOG_LIMIT]:
            out["configs"][_bounded(name)] = {_bounded(k): _loggable(v)
                                              for k, v in list(record.items())[:WIRE_LOG_LIMIT]}
    except Exception as exc:  # noqa: BLE001 - the log must never stop the round
        return {"unreadable": type(exc).__name__}
    return out


def judge_train_reply(reply, cfg: Mapping[str, Any], specs: list[TensorSpec], global_arrays: list[np.ndarray],
                      max_update_norm: float) -> tuple[str, list[np.ndarray], str, float | None]:
    """(outcome, arrays, reason, epsilon) of one train reply: outcome ``trained``, ``refused``,
    ``rejected`` or ``failed``; epsilon is the device's reported spend once its metrics are valid
    (also when its tensors are then rejected: the update left the device). Nothing in a reply is
    used before it is validated; a reply that cannot even be parsed is rejected, never raised."""
    if reply.has_error():
        return "failed", [], printable(reply.error.reason), None
    epsilon = None
    try:
        content = reply.content
        if set(content.keys()) - RECORD_NAMES:
            return "rejected", [], printable(f"unexpected record(s) {sorted(set(content.keys()) - RECORD_NAMES)[:5]}"), \
                None
        metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
        if "status" in content.config_records:
            reason = content["status"].get("reason", "")
            return "refused", [], reason if reason in REFUSAL_REASONS else "unknown reason code", None
        verdict = validate_metrics("train", metrics, cfg)
        if not verdict.accepted:
            return "rejected", [], printable(verdict.reason), None
        epsilon = float(metrics["epsilon"]) if "epsilon" in metrics else None
        if "arrays" not in content.array_records:
            return "rejected", [], "no arrays record", epsilon
        record = content["arrays"]
        names = list(record.keys())
        layout = check_layout(names, [record[k] for k in names], specs)
        if not layout.accepted:
            return "rejected", [], printable(layout.reason), epsilon
        arrays = [decode_array(record[k], k) for k in names]  # one plain .npy each, as declared
        verdict = validate_reply(names, arrays, specs, global_arrays, max_update_norm)
    except ValueError as exc:  # a tensor whose bytes are not what its metadata declares
        return "rejected", [], printable(exc), epsilon
    except Exception as exc:  # noqa: BLE001 - a malformed reply must not stop the round
        return "rejected", [], f"unreadable reply ({type(exc).__name__})", epsilon
    if not verdict.accepted:
        return "rejected", [], printable(verdict.reason), epsilon
    return "trained", arrays, "", epsilon
