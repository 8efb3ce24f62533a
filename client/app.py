"""privrec ClientApp (Flower Message API): DP training and evaluation on one user's own data.

What a reply may hold is fixed by :mod:`common.wire`: the model-state tensors (adapters and
item bias, in the exchange order) after a DP-SGD session, the session's public mechanism
parameters, a noisy evaluation release, or a refusal with a fixed reason code. The device's
privacy policy comes from its node config (:class:`common.device_policy.DevicePolicy`), never
from the run config, which only states what a run asks for.
"""

from __future__ import annotations

from functools import lru_cache
from logging import ERROR
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.device_state import save_global_state, store_catalogue, write_device_info
from client.evaluation import run_evaluation
from client.session import SessionResult, refusal, run_session
from common.dataset import Dataset
from common.device_policy import DevicePolicy
from common.errors import DataFormatError
from common.model_state import ModelRuntime, ModelSettings, state_digest
from common.partition import ClientData, client_data, dataset_from_source, device_client_data, device_dataset, split_for
from common.run_config import resolve

app = ClientApp()


@lru_cache(maxsize=1)
def _runtime(source: str, settings: ModelSettings) -> ModelRuntime:
    torch.set_num_threads(1)  # one simulated client per core
    return ModelRuntime(dataset_from_source(source), settings)


_DEVICE_RUNTIMES: dict[tuple[str, ModelSettings], ModelRuntime] = {}


def _device_runtime(data_path: str, settings: ModelSettings, data: Dataset) -> ModelRuntime:
    """The device's runtime, built from its already-loaded data (it only needs the catalogue)."""
    key = (data_path, settings)
    if key not in _DEVICE_RUNTIMES:
        _DEVICE_RUNTIMES.clear()
        _DEVICE_RUNTIMES[key] = ModelRuntime(data, settings)
    return _DEVICE_RUNTIMES[key]


def _prepare(msg: Message, context: Context, cfg: dict) -> tuple[str, ClientData, Path, ModelRuntime]:
    """Client id, its data, its ledger folder, and a runtime holding the received global state
    (simulation: the partition-id's user, ledgers in ``ledger-dir`` or the run folder's
    ``clients/``; deployment: the device's data-path, ledger in its own state-dir)."""
    node = context.node_config
    settings = ModelSettings.from_run_config(cfg)
    server_config = msg.content["config"]
    names, arrays = _global_state(msg)
    if "data-path" in node:
        data_path = str(node["data-path"])
        state_dir = Path(str(node.get("state-dir", Path(data_path) / "state")))
        client_id = str(node.get("client-id", "device"))
        loaded = device_dataset(data_path)
        data = device_client_data(data_path, cfg["history-len"], cfg["examples-per-user"], loaded)
        runtime = _device_runtime(data_path, settings, loaded)
        _keep_on_device(msg, runtime, state_dir, names, arrays, settings)
        write_device_info(state_dir, data_path, client_id)
        return client_id, data, state_dir, runtime
    if "partition-id" not in node:
        raise ValueError("node config needs partition-id (simulation) or data-path (deployment)")
    user = int(node["partition-id"])
    data = client_data(split_for(cfg["dataset"]), user, cfg["history-len"], cfg["examples-per-user"])
    runtime = _runtime(cfg["dataset"], settings)
    runtime.load_state(names, arrays)
    ledgers = Path(cfg["ledger-dir"]) if cfg["ledger-dir"] else Path(str(server_config["run-dir"])) / "clients"
    return f"user-{user}", data, ledgers, runtime


def _keep_on_device(msg: Message, runtime: ModelRuntime, state_dir: Path, names: list[str],
                    arrays: list[np.ndarray], settings: ModelSettings) -> None:
    """Store the global state and the published catalogue (checksum verified) for on-device
    recommendations, and use the catalogue's item embeddings instead of re-encoding the catalogue."""
    config = msg.content["config"]
    save_global_state(state_dir, names, arrays, settings, str(config["run-id"]), int(config["server-round"]))
    if "catalogue" not in msg.content.config_records:
        runtime.load_state(names, arrays)
        return
    catalogue = store_catalogue(state_dir, bytes(msg.content["catalogue"]["file"]), str(config["catalogue-sha256"]))
    local_ids = [it.item_id for it in runtime.data.items]
    if catalogue.item_ids != local_ids:
        raise DataFormatError(state_dir / "catalogue.safetensors",
                              f"the server's catalogue ({len(catalogue.item_ids)} items) does not list the same item "
                              f"ids in the same order as this device's catalogue.jsonl ({len(local_ids)} items)")
    published_for_this_state = catalogue.state_digest == state_digest(arrays)
    runtime.load_state(names, arrays, refresh=not published_for_this_state)
    if published_for_this_state:
        runtime.use_item_embeddings(catalogue.embeddings, catalogue.state_digest)


def _global_state(msg: Message) -> tuple[list[str], list[np.ndarray]]:
    record = msg.content["arrays"]
    names = list(record.keys())
    return names, [record[k].numpy() for k in names]


def _reply(msg: Message, result: SessionResult) -> Message:
    """The reply message of a session or evaluation result (fields of :mod:`common.wire` only)."""
    content = RecordDict({"metrics": MetricRecord(result.metrics)})
    if result.refused:
        content["status"] = ConfigRecord({"refused": True, "reason": result.reason})
    elif result.arrays:
        content["arrays"] = ArrayRecord({n: Array(a) for n, a in zip(result.names, result.arrays)})
    return Message(content=content, reply_to=msg)


def _failure(msg: Message, exc: Exception) -> Message:
    """A refusal for a failure on the device; the details (which may quote local data) stay in the
    device's own log, the server learns only the fixed code ``client-error``."""
    log(ERROR, "privrec client: %s: %s", type(exc).__name__, exc)
    return _reply(msg, SessionResult(refused=True, reason="client-error", metrics={"refused": 1.0}))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local DP-SGD on the global state; reply with the new state or a refusal."""
    try:
        return _reply(msg, _train(msg, context))
    except Exception as exc:  # noqa: BLE001 - any failure becomes a refusal, never a crash loop
        return _failure(msg, exc)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """A DP release of HR@10 / NDCG@10 of the global state on this client's own held-out item."""
    try:
        return _reply(msg, _evaluate(msg, context))
    except Exception as exc:  # noqa: BLE001
        return _failure(msg, exc)


def _train(msg: Message, context: Context) -> SessionResult:
    cfg = resolve(context.run_config)
    policy = DevicePolicy.from_node_config(context.node_config)
    if policy.violations(cfg):  # before anything is loaded or stored
        return refusal("privacy-policy")
    server_config = msg.content["config"]
    client_id, data, ledgers, runtime = _prepare(msg, context, cfg)
    return run_session(runtime, data, cfg, ledgers, client_id, run_id=str(server_config["run-id"]),
                       server_round=int(server_config["server-round"]), node_id=int(context.node_id), policy=policy)


def _evaluate(msg: Message, context: Context) -> SessionResult:
    cfg = resolve(context.run_config)
    policy = DevicePolicy.from_node_config(context.node_config)
    if policy.violations(cfg):
        return refusal("privacy-policy")
    server_config = msg.content["config"]
    client_id, data, ledgers, runtime = _prepare(msg, context, cfg)
    return run_evaluation(runtime, data, cfg, ledgers, client_id, run_id=str(server_config["run-id"]),
                          server_round=int(server_config["server-round"]), node_id=int(context.node_id),
                          policy=policy)
