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


def _error_reply(reason: str):
    from flwr.app import Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict(), dst_node_id=5, message_type="train")
    return Message(Error(code=0, reason=reason), reply_to=msg)


def test_a_device_cannot_forge_log_lines_or_the_completion_of_a_run(tmp_path):
    """A device's error reason with a newline and the ServerApp's completion line: the server records it
    on one line without control characters, and the launcher does not take it as the run's end."""
    from common.run_config import resolve
    from server.deploy import _completed, completion_line
    from server.validation import judge_train_reply

    forged = completion_line(7, tmp_path / "result.json")
    outcome, _, reason, _ = judge_train_reply(_error_reply("boom\n" + forged + "\x1b[2J"), resolve({}), SPECS,
                                              GLOBAL, 1.0)
    assert outcome == "failed" and "\n" not in reason and "\x1b" not in reason
    assert not _completed(forged, 7)  # no result.json of run 7 there
    (tmp_path / "result.json").write_text('{"config": {"flower-run-id": 6}}')
    assert not _completed(forged, 7)  # another run's result
    (tmp_path / "result.json").write_text('{"config": {"flower-run-id": 7}}')
    assert _completed("anything before " + forged, 7)  # only the file written by run 7 makes it complete
