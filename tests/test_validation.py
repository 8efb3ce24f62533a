"""Server-side reply validation: bad replies are rejected with the reason."""

from __future__ import annotations

import numpy as np

from server.validation import adapter_specs, validate_reply

NAMES = ["a.lora_A", "a.lora_B"]
GLOBAL = [np.zeros((4, 8), dtype=np.float32), np.zeros((8, 4), dtype=np.float32)]
SPECS = adapter_specs(NAMES, GLOBAL)


def _reply(scale: float = 0.01):
    rng = np.random.default_rng(0)
    return [(g + scale * rng.standard_normal(g.shape)).astype(np.float32) for g in GLOBAL]


def test_good_reply_accepted():
    assert validate_reply(NAMES, _reply(), SPECS, GLOBAL, max_update_norm=1.0).accepted


def test_nan_rejected():
    arrays = _reply()
    arrays[1][0, 0] = np.nan
    v = validate_reply(NAMES, arrays, SPECS, GLOBAL, 1.0)
    assert not v.accepted and "a.lora_B: non-finite" in v.reason


def test_wrong_shape_dtype_keys_rejected():
    arrays = _reply()
    v = validate_reply(NAMES, [arrays[0], arrays[1].T.copy()], SPECS, GLOBAL, 1.0)
    assert not v.accepted and "shape (4, 8), expected (8, 4)" in v.reason
    v = validate_reply(NAMES, [arrays[0].astype(np.float64), arrays[1]], SPECS, GLOBAL, 1.0)
    assert not v.accepted and "dtype float64" in v.reason
    v = validate_reply(["a.lora_A", "b"], arrays, SPECS, GLOBAL, 1.0)
    assert not v.accepted and "missing ['a.lora_B']" in v.reason
    v = validate_reply(list(reversed(NAMES)), arrays, SPECS, GLOBAL, 1.0)
    assert not v.accepted and "wrong order" in v.reason


def test_oversize_norm_rejected():
    v = validate_reply(NAMES, _reply(scale=10.0), SPECS, GLOBAL, max_update_norm=1.0)
    assert not v.accepted and "exceeds the bound" in v.reason


def test_evaluation_replies_are_checked_in_full_even_without_local_dp():
    from common.run_config import resolve
    from server.validation import validate_metrics

    cfg = resolve({"local-dp": False})
    assert not validate_metrics("evaluate", {}, cfg).accepted
    assert not validate_metrics("evaluate", {"HR@10": 1e308, "NDCG@10": 0.0}, cfg).accepted
    assert not validate_metrics("train", {"refused": 0.0, "epsilon": 1e300}, cfg).accepted
    assert validate_metrics("train", {"refused": 0.0}, cfg).accepted
