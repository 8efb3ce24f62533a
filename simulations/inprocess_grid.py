"""An in-process Flower federation: a Grid that hands each message to the real ClientApp
functions in this process. Used by the tests (with optional tampering of replies: a malicious
or broken client) and by the user-level audit (:mod:`simulations.audits.canary_clients`), where the
server code must run unchanged but a full simulation engine would only add start-up time."""

from __future__ import annotations

import copy as copy_module
from typing import Callable

import numpy as np
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app

Tamper = Callable[[int, RecordDict], None]


class InProcessGrid:
    """Nodes 101.. map to partitions 0..; replies are what the real client code returns."""

    def __init__(self, num_nodes: int, run_config: dict, tamper: Tamper | None = None,
                 drop: set[int] | None = None, node_config: dict | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.partition = {101 + p: p for p in range(num_nodes)}
        self.run_config, self.tamper, self.drop = run_config, tamper, drop or set()
        self.node_config = dict(node_config or {})  # e.g. every device's privacy-* policy keys
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.partition)

    def send_and_receive(self, messages, timeout: float):
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append(msg)
            if node in self.drop:
                continue  # the node never answers (timed out)
            node_config = {**self.node_config, "partition-id": self.partition[node],
                           "num-partitions": len(self.partition)}
            ctx = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(),
                          run_config=self.run_config)
            fn = client_app.train if msg.metadata.message_type == MessageType.TRAIN else client_app.evaluate
            reply = fn(msg, ctx)
            if self.tamper is not None and msg.metadata.message_type == MessageType.TRAIN:
                self.tamper(node, reply.content)
            self.replies.append(reply)
            out.append(reply)
        return out


def state_of(content: RecordDict) -> dict[str, np.ndarray]:
    rec = content["arrays"]
    return {k: rec[k].numpy() for k in rec.keys()}


class SecureInProcessGrid(InProcessGrid):
    """The in-process federation as SecAgg+ needs it: every message goes through the ClientApp object
    (so its mods run), each node keeps one Context across the protocol's stages, every message gets
    its own copy of the content (the workflow shares one RecordDict between nodes), and an exception
    becomes an error reply as Flower's runtime makes it. ``drop_at`` leaves a node's replies out from
    a SecAgg+ stage on ("setup", "share_keys", "collect_masked_vectors" or "unmask")."""

    STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")

    def __init__(self, num_nodes: int, run_config: dict, drop_at: dict[int, str] | None = None,
                 node_config: dict | None = None, capture: Callable[[int, Message], None] | None = None,
                 tamper_sent: Callable[[int, str, RecordDict], None] | None = None,
                 tamper_reply: Callable[[int, str, RecordDict], None] | None = None) -> None:
        super().__init__(num_nodes, run_config, node_config=node_config)
        self.drop_at = dict(drop_at or {})
        self.capture = capture  # sees each reply before it is returned (tests: what the server receives)
        # tests: a hostile server (changes what a node receives) or a hostile node (changes its reply),
        # called with (node, stage, content)
        self.tamper_sent, self.tamper_reply = tamper_sent, tamper_reply
        self.contexts: dict[int, Context] = {}
        self.current_node: int | None = None  # the node whose ClientApp call is running (the audit's canaries)

    def _context(self, node: int) -> Context:
        if node not in self.contexts:
            node_config = {**self.node_config, "partition-id": self.partition[node],
                           "num-partitions": len(self.partition)}
            self.contexts[node] = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(),
                                          run_config=self.run_config)
        return self.contexts[node]

    def send_and_receive(self, messages, timeout: float):
        out = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            self.sent.append(msg)
            stage = _secagg_stage(msg)
            if node in self.drop_at and stage is not None and \
                    self.STAGES.index(stage) >= self.STAGES.index(self.drop_at[node]):
                continue
            content = copy_module.deepcopy(msg.content)
            if self.tamper_sent is not None and stage is not None:
                self.tamper_sent(node, stage, content)
            copy = Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type,
                           group_id=msg.metadata.group_id)
            self.current_node = node
            try:
                reply = client_app.app(copy, self._context(node))
            except Exception as exc:  # noqa: BLE001 - what Flower's runtime turns into an error reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=copy)
            if self.tamper_reply is not None and stage is not None and not reply.has_error():
                self.tamper_reply(node, stage, reply.content)
            reply.metadata.__dict__["_src_node_id"] = node
            if self.capture is not None:
                self.capture(node, reply)
            self.replies.append(reply)
            out.append(reply)
        return out


def _secagg_stage(msg: Message) -> str | None:
    records = msg.content.config_records
    if "secaggplus_configs" not in records:
        return None
    return str(records["secaggplus_configs"].get("stage", "collect_masked_vectors"))
