"""Device-side behaviour without a SuperLink: corrupt or missing data becomes a refusal (never a
crash loop), export round-trips, min-replies holds the model, the catalogue file is verified, replies leave
on the device's time grid whatever it holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app
import client.reply_pacing as pacing
from client.deploy import device_launch
from client.device_state import load_catalogue, store_catalogue
from client.export import export_user
from common.catalogue_file import PublishedCatalogue, catalogue_bytes, sha256_hex
from common.errors import ConfigError, DataFormatError
from common.jsonl_format import load_jsonl
from common.partition import device_client_data
from server.federation import Federation
from simulations.inprocess_grid import InProcessGrid
from tests.test_reply_pacing import FakeClock


def _train_message(names, arrays) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    content = RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in zip(names, arrays)}),
                          "config": ConfigRecord({"server-round": 1, "run-id": "t", "run-dir": "/nonexistent"})})
    return Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN)


@pytest.fixture(scope="module")
def global_state(small_ml100k, tmp_path_factory):
    """The default (sequence) model's first global state."""
    cfg = {"dataset": str(small_ml100k), "output-dir": str(tmp_path_factory.mktemp("r")), "run-name": "s"}
    fed = Federation(InProcessGrid(1, cfg), cfg)
    return fed.names, fed.arrays


@pytest.fixture(scope="module")
def text_global_state(small_ml100k, tmp_path_factory):
    """The text model's first global state."""
    cfg = {"dataset": str(small_ml100k), "output-dir": str(tmp_path_factory.mktemp("r")), "run-name": "s",
           "user-model": "text", "history-len": 5}
    fed = Federation(InProcessGrid(1, cfg), cfg)
    return fed.names, fed.arrays


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_device_data_is_refused_with_a_class_only_reason(damage, ml100k, global_state, tmp_path):
    data = tmp_path / "data"
    export_user(ml100k, "7", data)
    if damage == "corrupt":
        with open(data / "events.jsonl", "a") as f:
            f.write('{"user": "7", "item": "1", "timestamp": "yesterday"}\n')
    else:
        (data / "events.jsonl").unlink()
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                  node_config={"data-path": str(data), "state-dir": str(tmp_path / "state")})
    reply = client_app.train(_train_message(*global_state), ctx)
    assert "status" in reply.content.config_records
    assert reply.content["status"]["reason"] == "client-error"  # a fixed code: the details stay in the device's log
    assert "arrays" not in reply.content.array_records
    assert not (tmp_path / "state" / "ledger-device.json").exists()  # nothing spent


def test_export_writes_the_users_events_in_order_and_the_whole_catalogue(ml100k, tmp_path):
    folder, count = export_user(ml100k, "1", tmp_path)
    data = load_jsonl(folder / "events.jsonl", folder / "catalogue.jsonl")
    assert count == int((ml100k.user == ml100k.user_ids.index("1")).sum()) and data.num_users == 1
    assert [it.item_id for it in data.items] == [it.item_id for it in ml100k.items]
    assert np.all(np.diff(data.timestamp) >= 0)
    with pytest.raises(ValueError, match="unknown user id"):
        export_user(ml100k, "100000", tmp_path / "x")


def test_a_device_trains_on_every_event_including_new_feedback(ml100k, tmp_path):
    export_user(ml100k, "1", tmp_path)
    before = device_client_data(tmp_path, history_len=3, examples_per_user=0)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write(json.dumps({"user": "1", "item": "50", "timestamp": 2e9, "rating": 5}) + "\n")
    after = device_client_data(tmp_path, history_len=3, examples_per_user=0)
    assert len(after.train_targets) == len(before.train_targets) + 1
    assert after.train_targets[-1] == ml100k.item_index["50"]


def test_a_stored_catalogue_is_verified_on_every_read(tmp_path):
    cat = PublishedCatalogue(item_ids=["1", "2"], texts=["a", "b"], embeddings=np.eye(2, dtype=np.float32),
                             bias=np.zeros(2, dtype=np.float32), state_digest="d", run_id="r", round=1, scale=20.0)
    data = catalogue_bytes(cat)
    with pytest.raises(DataFormatError, match="announced"):
        store_catalogue(tmp_path, data, "0" * 64)
    stored = store_catalogue(tmp_path, data, sha256_hex(data))
    assert stored.item_ids == ["1", "2"] and np.array_equal(stored.embeddings, cat.embeddings)
    (tmp_path / "catalogue.safetensors").write_bytes(data[:-1] + b"\x00")
    with pytest.raises(DataFormatError, match="checksum mismatch"):
        load_catalogue(tmp_path)


def test_min_replies_leaves_the_model_unchanged(small_run_config):
    cfg = {**small_run_config, "num-server-rounds": 1, "clients-per-round": 6, "min-replies": 6}
    fed = Federation(InProcessGrid(6, cfg, drop={106}), cfg)  # one of the six never answers
    start = [a.copy() for a in fed.arrays]
    run_dir = fed.run()
    row = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert row["clients_accepted"] == 5 and row["aggregated"] is False
    assert all(np.array_equal(a, b) for a, b in zip(start, fed.arrays))


def test_a_grouplens_slice_of_one_user_is_device_data(ml100k, tmp_path):
    from common.dataset import Dataset
    from common.movielens import write_grouplens

    keep = ml100k.user == 4
    one = Dataset(items=ml100k.items, user_ids=[ml100k.user_ids[4]], user=np.zeros(int(keep.sum()), dtype=np.int64),
                  item=ml100k.item[keep], rating=ml100k.rating[keep], timestamp=ml100k.timestamp[keep])
    folder = write_grouplens(one, tmp_path / "slice")
    data = device_client_data(folder, history_len=3, examples_per_user=0)
    assert len(data.train_targets) == int(keep.sum()) - 1 and data.eval_target is not None


@pytest.mark.parametrize("layout", ["jsonl", "grouplens"])
def test_a_device_with_no_events_yet_trains_like_any_other(ml100k, small_ml100k, global_state, tmp_path, layout):
    """An empty history must not make the device refuse, in either data layout: the refusal would tell the
    server it is empty."""
    import shutil

    data = tmp_path / "data"
    if layout == "jsonl":
        export_user(ml100k, "7", data)
        (data / "events.jsonl").write_text("")
    else:  # a GroupLens slice: the full catalogue, no ratings yet
        data.mkdir()
        shutil.copy(small_ml100k / "u.item", data / "u.item")
        (data / "u.data").write_text("")
    assert len(device_client_data(data, 5, 50).train_targets) == 0
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                  node_config={"data-path": str(data), "state-dir": str(tmp_path / "state")})
    reply = client_app.train(_train_message(*global_state), ctx)
    assert "status" not in reply.content.config_records and "arrays" in reply.content.array_records


def _device_state(ml100k, global_state, tmp_path, texts=None, user_model="sequence"):
    """A device state folder as a run leaves it: global state, published catalogue, device file."""
    from client.device_state import save_global_state, write_device_info
    from common.model_state import ModelSettings, state_digest
    from common.run_config import resolve
    from common.sequence_runtime import sequence_settings

    names, arrays = global_state
    data, state = tmp_path / "data", tmp_path / "state"
    export_user(ml100k, "1", data)
    if user_model == "sequence":
        settings = sequence_settings(resolve({}))
    else:
        settings = ModelSettings.from_run_config(resolve({"user-model": "text", "history-len": 5}))
    save_global_state(state, names, arrays, settings, "r", 1)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(ml100k.items), 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cat = PublishedCatalogue(item_ids=[it.item_id for it in ml100k.items],
                             texts=texts or [it.render() for it in ml100k.items], embeddings=emb,
                             bias=np.zeros(len(ml100k.items), dtype=np.float32), state_digest=state_digest(arrays),
                             run_id="r", round=1, scale=20.0)
    blob = catalogue_bytes(cat)
    store_catalogue(state, blob, sha256_hex(blob))
    write_device_info(state, str(data), "device")
    return state


def test_hostile_catalogue_titles_and_ids_reach_the_terminal_as_plain_text(ml100k, global_state, tmp_path):
    from typer.testing import CliRunner

    from simulations.cli import app

    texts = [f"\x1b[31mRED\x1b[0m [/x] [bold]{it.render()}" for it in ml100k.items]
    state = _device_state(ml100k, global_state, tmp_path, texts)
    shown = CliRunner().invoke(app, ["recommend", "--state-dir", str(state), "--k", "3"])
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "[/x]" in shown.output and "[bold]" in shown.output
    bad_item = CliRunner().invoke(app, ["feedback", "--state-dir", str(state), "--item", "[/x]", "--rating", "5"])
    assert bad_item.exit_code == 2 and "unknown item id '[/x]'" in bad_item.output
    bad_text = CliRunner().invoke(app, ["recommend", "--state-dir", str(state), "--text", "caf\udce9"])
    assert bad_text.exit_code == 2 and "not valid UTF-8" in bad_text.output


@pytest.mark.parametrize("user_model, setting", [
    ("text", {"lora_rank": "8"}), ("text", {"lora_rank": 100000}), ("text", {"item_bias": 1}), ("text", {"rank": 8}),
    ("sequence", {"dim": "8"}), ("sequence", {"dim": 100000}), ("sequence", {"item_bias": 1}),
    ("sequence", {"heads": 5}), ("sequence", {"lora_rank": 8}), ("sequence", {"new_item_boost": 1e6}),
    ("sequence", {"new_item_boost": "0.2"}), ("sequence", {"exclude_history": 1})])
def test_stored_model_settings_are_checked_before_a_model_is_built(ml100k, global_state, text_global_state, tmp_path,
                                                                   user_model, setting):
    from safetensors.numpy import load_file, save_file

    from client.device_state import GLOBAL_STATE, load_global_state
    from client.recommend import DeviceRecommender

    state = _device_state(ml100k, global_state if user_model == "sequence" else text_global_state, tmp_path,
                          user_model=user_model)
    path = state / GLOBAL_STATE
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata())
    settings = {**json.loads(meta["settings"]), **setting}
    meta["settings"] = json.dumps(settings)
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(DataFormatError, match=GLOBAL_STATE):
        load_global_state(state)
    with pytest.raises(DataFormatError, match=GLOBAL_STATE):
        DeviceRecommender(state)


def _device_context(data, state, **policy) -> Context:
    return Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                   node_config={"data-path": str(data), "state-dir": str(state), **policy})


def test_devices_holding_nothing_and_hundreds_of_events_reply_at_the_same_time_through_the_app(
        monkeypatch, ml100k, global_state, tmp_path):
    """The ClientApp itself (its mods included): a refusal and a trained reply each leave, and are stamped,
    one quantum after the request whatever the device holds (a fake clock: the real work takes no fake time,
    so only the hold moves it; the quantum is the device's policy: no run config key sets it)."""
    fake = FakeClock()
    monkeypatch.setattr(pacing, "clock", fake.clock)
    monkeypatch.setattr(pacing, "sleep", fake.sleep)
    monkeypatch.setattr("flwr.app.message.message.now", lambda: fake)
    full = tmp_path / "full"
    export_user(ml100k, "1", full)  # 272 events
    empty = tmp_path / "empty"
    export_user(ml100k, "1", empty)
    (empty / "events.jsonl").write_text("")
    quantum = 7.0
    for data in (full, empty):
        ctx = _device_context(data, tmp_path / f"state-{data.name}", **{"privacy-reply-time-quantum": quantum})
        for run_config, trained in (({"local-dp": False}, False), ({}, True)):  # a policy refusal, then a session
            ctx.run_config = run_config
            msg = _train_message(*global_state)
            start = fake.now
            reply: Message = client_app.app(msg, ctx)
            assert ("arrays" in reply.content.array_records) == trained
            if not trained:
                assert reply.content["status"]["reason"] == "privacy-policy"
            assert fake.now - start == quantum and reply.metadata.created_at == fake.now


def test_a_devices_launch_takes_only_privacy_keys_as_policy(tmp_path):
    """Policy is privacy-* keys; node config keys such as partition-id or data-path are refused there."""
    for key in ("partition-id", "data-path"):
        with pytest.raises(ConfigError, match="privacy-"):
            device_launch("127.0.0.1:9092", tmp_path / "ca", tmp_path / "key", tmp_path, tmp_path / "s", 9094,
                          policy={key: 1})
