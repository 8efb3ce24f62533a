"""An in-process Flower federation: a Grid that hands each message to the real ClientApp
functions in this process. Used by the tests (with optional tampering of replies: a malicious
or broken client) and by the user-level audit (:mod:`simulations.audits.canary_clients`), where the
server code must run unchanged but a full simulation engine would only add start-up time."""

from __future__ import annotations

from typing import Callable

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
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
