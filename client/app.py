"""privrec ClientApp (Flower Message API): DP training and evaluation on one user's own data.

What a reply may hold is fixed by :mod:`common.wire`: the model-state tensors (adapters and
item bias, in the exchange order) after a DP-SGD session, the session's public mechanism
parameters, a noisy evaluation release, or a refusal with a fixed reason code. The device's
privacy policy comes from its node config (:class:`common.device_policy.DevicePolicy`), never
from the run config, which only states what a run asks for.
"""

from __future__ import annotations

from logging import ERROR, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.device_state import save_global_state, store_catalogue, write_device_info
from client.evaluation import run_evaluation
from client.reply_pacing import reply_pacing_mod
from client.secure_checks import SecureCheckError, check_before_training, check_before_unmask, stored_state
from client.secure_session import run_secure_session
from client.session import SessionResult, refusal, run_session
from common.array_codec import decode_array
from common.catalogue_file import PublishedCatalogue
from common.dataset import Dataset
from common.device_policy import DevicePolicy
from common.errors import DataFormatError
from common.model_state import state_digest
from common.partition import (ClientData, client_data, dataset_from_source, device_client_data,
                              device_client_sequences, device_dataset, run_split)
from common.run_config import resolve
from common.runtimes import Runtime, make_runtime, runtime_settings
from common.sequence_runtime import ClientSequences, client_sequences

# Every reply, of every handler and every secure-round stage, leaves on the device's public time grid.
app = ClientApp(mods=[reply_pacing_mod])


_RUNTIMES: dict[tuple, Runtime] = {}


def _runtime(source: str, cfg: dict) -> Runtime:
    """The simulation process's runtime for this run's model (one kept: building it costs seconds)."""
    key = (source, runtime_settings(cfg))
    if key not in _RUNTIMES:
        torch.set_num_threads(1)  # one simulated client per core
        _RUNTIMES.clear()
        _RUNTIMES[key] = make_runtime(dataset_from_source(source), cfg)
    return _RUNTIMES[key]


_DEVICE_RUNTIMES: dict[tuple, Runtime] = {}


def _device_runtime(data_path: str, cfg: dict, data: Dataset, catalogue: PublishedCatalogue | None) -> Runtime:
    """The device's runtime, built from its already-loaded data (it only needs the catalogue; the
    sequence model takes the published item vectors when there are some instead of encoding them)."""
    key = (data_path, runtime_settings(cfg))
    if key not in _DEVICE_RUNTIMES:
        _DEVICE_RUNTIMES.clear()
        _DEVICE_RUNTIMES[key] = make_runtime(data, cfg, item_text=None if catalogue is None else catalogue.embeddings)
    return _DEVICE_RUNTIMES[key]


def _client_inputs(cfg: dict, split_or_path, user: int | None, loaded: Dataset | None = None
                   ) -> ClientData | ClientSequences:
    """The user's inputs for the run's model: a simulated user of the split, or a device's folder."""
    sequence = cfg["user-model"] == "sequence"
    if user is None:
        build = device_client_sequences if sequence else device_client_data
        return build(split_or_path, cfg["history-len"], cfg["examples-per-user"], loaded)
    build = client_sequences if sequence else client_data
    return build(split_or_path, user, cfg["history-len"], cfg["examples-per-user"])


def _prepare(msg: Message, context: Context, cfg: dict
             ) -> tuple[str, ClientData | ClientSequences, Path, Runtime]:
    """Client id, its data, its ledger folder, and a runtime holding the received global state
    (simulation: the partition-id's user, ledgers in ``ledger-dir`` or the run folder's
    ``clients/``; deployment: the device's data-path, ledger in its own state-dir)."""
    node = context.node_config
    server_config = msg.content["config"]
    names, arrays = _global_state(msg)
    if "data-path" in node:
        data_path = str(node["data-path"])
        state_dir = Path(str(node.get("state-dir", Path(data_path) / "state")))
        client_id = str(node.get("client-id", "device"))
        loaded = device_dataset(data_path)
        data = _client_inputs(cfg, data_path, None, loaded)
        catalogue = _received_catalogue(msg, state_dir, loaded)
        runtime = _device_runtime(data_path, cfg, loaded, catalogue)
        _use_state(runtime, names, arrays, catalogue)
        save_global_state(state_dir, names, arrays, runtime.settings, str(server_config["run-id"]),
                          int(server_config["server-round"]))
        write_device_info(state_dir, data_path, client_id)
        return client_id, data, state_dir, runtime
    if "partition-id" not in node:
        raise ValueError("node config needs partition-id (simulation) or data-path (deployment)")
    user = int(node["partition-id"])
    data = _client_inputs(cfg, run_split(cfg), user)
    runtime = _runtime(cfg["dataset"], cfg)
    runtime.load_state(names, arrays)
    ledgers = Path(cfg["ledger-dir"]) if cfg["ledger-dir"] else Path(str(server_config["run-dir"])) / "clients"
    return f"user-{user}", data, ledgers, runtime


def _received_catalogue(msg: Message, state_dir: Path, data: Dataset) -> PublishedCatalogue | None:
    """The catalogue the server published with this message (checksum verified, then kept for
    on-device recommendations), or None when it sent none."""
    if "catalogue" not in msg.content.config_records:
        return None
    config = msg.content["config"]
    catalogue = store_catalogue(state_dir, bytes(msg.content["catalogue"]["file"]), str(config["catalogue-sha256"]))
    local_ids = [it.item_id for it in data.items]
    if catalogue.item_ids != local_ids:
        raise DataFormatError(state_dir / "catalogue.safetensors",
                              f"the server's catalogue ({len(catalogue.item_ids)} items) does not list the same item "
                              f"ids in the same order as this device's catalogue.jsonl ({len(local_ids)} items)")
    return catalogue


def _use_state(runtime: Runtime, names: list[str], arrays: list[np.ndarray],
               catalogue: PublishedCatalogue | None) -> None:
    """Load the received global state; take the published item vectors instead of encoding the catalogue
    here (the text model's only when they were computed for this state; the sequence model's never depend
    on it)."""
    if catalogue is None:
        runtime.load_state(names, arrays)
        return
    usable = runtime.kind == "sequence" or catalogue.state_digest == state_digest(arrays)
    runtime.load_state(names, arrays, refresh=not usable)
    if usable:
        runtime.use_item_embeddings(catalogue.embeddings, catalogue.state_digest)


def _global_state(msg: Message) -> tuple[list[str], list[np.ndarray]]:
    record = msg.content["arrays"]
    names = list(record.keys())
    return names, [decode_array(record[k], k) for k in names]  # one plain .npy each, as declared


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


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round, the plain handler otherwise.

    Before it trains and before it helps unmask, a device checks the round (:mod:`client.secure_checks`):
    the setup parameters are the run's, every forwarded key share verifies, the dropout lists are
    consistent and, with every device a neighbour, hold at least ``min-survivors`` shares. A failed
    check is a refusal: nothing is trained, spent or sent, and without this device's key shares the sum
    cannot be unmasked. (A server that lies consistently in those lists is outside the semi-honest model.)"""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get("stage")
    if stage in ("collect_masked_vectors", "unmask"):
        cfg = resolve(context.run_config)
        try:
            state = stored_state(context)
            if stage == "unmask":
                check_before_unmask(state, configs, cfg)
            else:
                check_before_training(state, configs, _state_size(msg), cfg)
        except SecureCheckError as exc:
            log(WARNING, "privrec client: secure round refused: %s", exc)
            raise SecureRefusal("privacy-policy") from None
    return secaggplus_mod(msg, context, call_next)


def _state_size(msg: Message) -> int:
    if "arrays" not in msg.content.array_records:
        raise SecureCheckError("the training message carries no global state")
    record = msg.content["arrays"]
    try:  # from the declared shapes: the tensors themselves are decoded (and checked) once, by _global_state
        return sum(int(np.prod([int(d) for d in record[k].shape], dtype=np.int64)) for k in record.keys())
    except (TypeError, ValueError) as exc:
        raise SecureCheckError(f"the training message's global state: unreadable shapes ({exc})") from None


class SecureRefusal(RuntimeError):
    """A device that will not take part in a secure round: under SecAgg+ it drops out with an error reply
    whose reason is one of the fixed refusal codes (:data:`common.wire.REFUSAL_REASONS`), nothing else."""


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Local DP-SGD on the global state; reply with the new state or a refusal. In a secure-aggregation
    run (only through SecAgg+): the device's masked share, or an error reply (it drops out)."""
    if RECORD_KEY_CONFIGS in msg.content.config_records or _secure_run(context):
        try:
            return _secure_train(msg, context)
        except SecureRefusal:
            raise
        except Exception as exc:  # noqa: BLE001 - the server learns only the fixed code, as in a plain round
            log(ERROR, "privrec client: %s: %s", type(exc).__name__, exc)
            raise SecureRefusal("client-error") from None
    try:
        return _reply(msg, _train(msg, context))
    except Exception as exc:  # noqa: BLE001 - any failure becomes a refusal, never a crash loop
        return _failure(msg, exc)


def _secure_run(context: Context) -> bool:
    try:
        return bool(resolve(context.run_config)["secure-aggregation"])
    except Exception:  # noqa: BLE001 - a bad run config is reported by the plain path
        return False


def _secure_train(msg: Message, context: Context) -> Message:
    """The stage of a SecAgg+ round that trains: the share in Flower's legacy fit-result records (which
    ``secaggplus_mod`` masks), or SecureRefusal. Never an unmasked share: a secure run's training
    request that did not come through SecAgg+ is refused, as is a SecAgg+ request in a plain run."""
    cfg = resolve(context.run_config)
    if not (cfg["secure-aggregation"] and RECORD_KEY_CONFIGS in msg.content.config_records):
        raise SecureRefusal("privacy-policy")  # secure aggregation asked for by only one of config and message
    policy = DevicePolicy.from_node_config(context.node_config)
    if policy.violations(cfg):
        raise SecureRefusal("privacy-policy")
    server_config = msg.content["config"]
    client_id, data, ledgers, runtime = _prepare(msg, context, cfg)
    result = run_secure_session(runtime, data, cfg, ledgers, client_id, run_id=str(server_config["run-id"]),
                                server_round=int(server_config["server-round"]), node_id=int(context.node_id),
                                policy=policy)
    if result.refused:
        raise SecureRefusal(result.reason)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(result.arrays), num_examples=1,
                    metrics=dict(result.metrics))
    return Message(content=fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


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
    if policy.violations(cfg) or cfg["secure-aggregation"]:
        # a secure run's evaluation reply would be a release outside its user-level accounting
        return refusal("privacy-policy")
    server_config = msg.content["config"]
    client_id, data, ledgers, runtime = _prepare(msg, context, cfg)
    return run_evaluation(runtime, data, cfg, ledgers, client_id, run_id=str(server_config["run-id"]),
                          server_round=int(server_config["server-round"]), node_id=int(context.node_id),
                          policy=policy)
