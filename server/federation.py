"""The server's round loop: sample, send, validate, aggregate (optionally with central DP), evaluate,
checkpoint, record.

Flower's ``Strategy.start`` runs a fixed loop; privrec needs reply validation,
refusal accounting, central DP with Poisson sampling, checkpoints and resume
inside each round, so it drives the Grid itself and uses Flower's strategies for
the aggregation arithmetic (:mod:`server.aggregation`).
"""

from __future__ import annotations

import time
from importlib.metadata import version
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.dataset import Dataset
from common.io import write_json_atomic
from common.model_state import state_bytes
from common.partition import dataset_from_source, run_split
from common.results import result_record
from common.run_config import ConfigError, resolve
from common.runtimes import make_runtime
from common.secure_random import SecureStream
from common.skellam import plan_epsilon, secure_plan
from common.split import Split
from server.aggregation import (load_optimizer_state, make_server_step, optimizer_state, server_learning_rate,
                                server_step, to_record)
from server.aggregators import aggregate, without_common_mode
from server.catalogue import CataloguePublisher
from server.central_dp import CentralDP, client_rate
from server.checkpoint import load_checkpoint, save_checkpoint
from server.deploy import completion_line
from server.evaluation import ServerEvaluator, federated_evaluation
from server.privacy_statement import ledgers_epsilon, ledgers_user_epsilon, privacy_statement, secure_statement
from server.resume import check_resume, restored_central, restored_releases, restored_spend
from server.run_folder import RunFolder
from server.sampling import sample_clients
from server.secure_aggregation import run_secure_round
from server.validation import adapter_specs, describe_reply, judge_train_reply, printable, update_norm_bound


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float, settle: float = 5.0) -> list[int]:
    """The connected nodes once there are ``wanted`` of them, or once some are connected and the set
    has not changed for ``settle`` seconds (devices join one by one), or at ``timeout``."""
    deadline = time.time() + timeout
    seen: list[int] = []
    stable_since = time.time()
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if nodes != seen:
            seen, stable_since = nodes, time.time()
        if len(nodes) >= wanted or (nodes and time.time() - stable_since >= settle) or time.time() > deadline:
            return nodes
        time.sleep(0.5)


class Federation:
    """One federated run, resumable from its run folder."""

    def __init__(self, grid: Grid, run_config: dict[str, Any], flower_run_id: int | None = None) -> None:
        self.grid = grid
        self.flower_run_id = flower_run_id  # Flower's id of this run (None outside Flower's runtime)
        self.cfg = resolve(run_config)
        cfg = self.cfg
        self.run_id = cfg["run-name"] or f"run-{time.strftime('%Y%m%d-%H%M%S')}-seed{cfg['seed']}"
        # The data first: a bad dataset path must not leave a run folder that blocks a retry.
        data = dataset_from_source(cfg["dataset"])
        split = run_split(cfg)
        split.eval_users()  # raises NoEvaluationUsersError when no user has the 3 events the split needs
        self.folder = RunFolder(Path(cfg["output-dir"]) / self.run_id)
        self.folder.lock()  # held until run() ends: one run per folder
        try:
            self._set_up(cfg, data, split)
        except BaseException:
            self.folder.unlock()
            raise

    def _set_up(self, cfg: dict[str, Any], data: Dataset, split: Split) -> None:
        """Everything past the folder's lock (released by ``__init__`` if this fails)."""
        check_resume(self.folder, cfg)
        self.folder.write_config({**cfg, "run-id": self.run_id, "versions": {
            p: version(p) for p in ("flwr", "opacus", "torch", "peft", "transformers")}})
        self.runtime = make_runtime(data, cfg, seed=cfg["seed"])
        self.names, self.arrays = self.runtime.state()
        self.specs = adapter_specs(self.names, self.arrays)
        self.max_update_norm = update_norm_bound(cfg, sum(int(a.size) for a in self.arrays))
        self.step = make_server_step(cfg["strategy"], cfg["server-learning-rate"])
        self.evaluator = ServerEvaluator(self.runtime, split)
        self.client_epsilon: dict[str, float] = {}
        self.user_releases: dict[str, int] = {}  # node -> its shares in unmasked secure sums
        self.reported_user_epsilon: dict[str, float] = {}  # node -> the user-level epsilon it reported
        self.secure_plan = secure_plan(cfg, sum(int(a.size) for a in self.arrays)) \
            if cfg["secure-aggregation"] else None
        self.publisher = CataloguePublisher(self.runtime, self.folder.root, self.run_id) \
            if cfg["publish-catalogue"] else None
        # central DP: Poisson client sampling and the server's noise, each from its own stream
        self._sampling_stream, self._noise_stream = SecureStream(), SecureStream()
        self.central: CentralDP | None = None
        self.start_round = 1
        self.nodes: list[int] = []

    def _restore(self) -> None:
        meta, arrays, optimizer = load_checkpoint(self.folder.checkpoints)
        if meta["names"] != self.names:
            raise ConfigError(f"{self.folder.checkpoints}: checkpoint tensors do not match this model")
        self.arrays = arrays
        load_optimizer_state(self.step, optimizer, self.names, self.arrays, self.folder.checkpoints / meta["weights"])
        if int(meta["round"]) > self.cfg["num-server-rounds"]:
            # no round would run, and the result would pair the checkpoint's state with an older evaluation
            raise ConfigError(f"resume: num-server-rounds {self.cfg['num-server-rounds']} is below the checkpoint's "
                              f"round {meta['round']}; set it to at least {meta['round']}")
        self.start_round = int(meta["round"]) + 1
        self.folder.keep_rounds_up_to(int(meta["round"]))
        # The per-node spend and the central-DP accountant as of the last record (see server.resume).
        self.client_epsilon = restored_spend(self.folder, meta)
        self.user_releases = restored_releases(self.folder, meta)
        self.reported_user_epsilon = {k: float(v) for k, v in
                                      self.folder.read_node_numbers(self.folder.user_spend).items()}
        if self.central is not None:
            self.central = restored_central(self.folder, meta, self.central)
        log(INFO, "resuming %s after round %d", self.run_id, meta["round"])

    def run(self) -> Path:
        """Run (or continue) the rounds; the run folder's lock is released however it ends."""
        try:
            return self._run()
        finally:
            self.folder.unlock()

    def _run(self) -> Path:
        cfg = self.cfg
        self.nodes = _wait_for_nodes(self.grid, cfg["clients-per-round"], cfg["round-timeout"])
        if not self.nodes:
            raise RuntimeError("no SuperNodes connected within round-timeout")
        if cfg["central-dp"]:
            q = client_rate(cfg["clients-per-round"], len(self.nodes))
            self.central = CentralDP(cfg["central-noise-multiplier"], cfg["central-clip"], q, len(self.nodes),
                                     cfg["central-delta"])
        if cfg["resume"]:
            self._restore()
        log(INFO, "privrec run %s: %d clients, rounds %d..%d, aggregator %s, strategy %s, update norm bound %.4g, "
            "local DP %s, central DP %s", self.run_id, len(self.nodes), self.start_round, cfg["num-server-rounds"],
            cfg["aggregator"], cfg["strategy"], self.max_update_norm, cfg["local-dp"], cfg["central-dp"])
        if self.start_round == 1:
            try:
                references = self.evaluator.references()
            except Exception as exc:  # noqa: BLE001 - reference lines are optional; training must not depend on them
                log(WARNING, "the training-free references could not be computed (%s: %s); the quality plot "
                    "will have no reference lines", type(exc).__name__, exc)
                references = {}
            self._record(0, {"clients_sampled": 0}, {**self._evaluate(0)[0], **references})
        for rnd in range(self.start_round, cfg["num-server-rounds"] + 1):
            t0 = time.perf_counter()
            row, record = self._train_round(rnd)
            evaluate = rnd % cfg["eval-every"] == 0 or rnd == cfg["num-server-rounds"]
            metrics, record["evaluated"], record["evaluation_released"] = \
                self._evaluate(rnd) if evaluate else ({}, [], [])
            self.folder.append(self.folder.rounds, record)
            row.update(self._spend_summary())  # after the round's evaluation releases too
            row["round_seconds"] = round(time.perf_counter() - t0, 2)
            self._record(rnd, row, metrics)
            self._checkpoint(rnd)
            self._check_health(rnd, record)
        return self._finish()

    def _check_health(self, rnd: int, record: dict[str, Any]) -> None:
        """Stop the run (after the round is checkpointed, so it can be resumed) when more than
        ``max-failed-share`` of the sampled clients sent no usable reply (none at all, an error, or one
        that was rejected; a refusal is a device's own decision and counts as an answer): dead
        workers, unreachable devices or a bound that rejects honest updates must not turn into a run
        that reports success on a handful of updates."""
        sampled = len(record["sampled"])
        unusable = len(record["failed"]) + len(record["rejected"])
        if sampled and unusable > self.cfg["max-failed-share"] * sampled:
            reasons = [*record.get("failed_reasons", []), *record.get("rejected_reasons", [])]
            raise RuntimeError(f"round {rnd}: {unusable} of {sampled} sampled clients sent no usable reply "
                               f"({len(record['failed'])} failed, {len(record['rejected'])} rejected), more than "
                               f"max-failed-share {self.cfg['max-failed-share']:g}; the run stops after "
                               f"checkpointing round {rnd} (continue it with resume=true once the cause is "
                               f"fixed). Reasons: {reasons[:3]}")

    def _spend_summary(self) -> dict[str, Any]:
        eps = list(self.client_epsilon.values())
        user = self.central.epsilon() if self.central else None
        if self.secure_plan is not None and self.user_releases:
            user = plan_epsilon(self.secure_plan, self.cfg["user-delta"], max(self.user_releases.values()))
        return {"epsilon_max": max(eps) if eps else None, "epsilon_median": float(np.median(eps)) if eps else None,
                "clients_with_spend": len(eps), "user_epsilon": user}

    def _train_round(self, rnd: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Sample, send, judge and aggregate one round: (its metrics row, its rounds.jsonl record)."""
        cfg = self.cfg
        # Poisson sampling (central DP) draws from the secure stream: who is sampled must be secret.
        # The other schemes are not part of a mechanism and stay reproducible from the seed.
        sampled = sample_clients(self.nodes, cfg, rnd, np.random.default_rng([cfg["seed"], rnd]),
                                 self._sampling_stream)
        if cfg["secure-aggregation"]:
            return self._secure_train_round(rnd, sampled)
        content = self._content(rnd)
        messages = [Message(content=RecordDict(content), dst_node_id=nid, message_type=MessageType.TRAIN)
                    for nid in sampled]
        replies = list(self.grid.send_and_receive(messages, timeout=cfg["round-timeout"])) if messages else []
        accepted: list[list[np.ndarray]] = []
        participation: dict[str, list] = {"trained": [], "refused": [], "rejected": [], "failed": []}
        rejected_reasons: list[str] = []  # in the order of participation["rejected"]
        failed_reasons: list[str] = []
        bytes_received = 0
        destination = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages if m.metadata.message_id}
        wire: list[dict] = []
        for reply in replies:
            # An error the SuperLink writes for a dead node comes from the SuperLink itself (node 1):
            # the node that owed the reply is the destination of the message it answers.
            node = destination.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
            if node not in sampled or any(node in part for part in participation.values()):
                log(WARNING, "round %d: ignored a reply from node %d (not sampled, or a second reply)", rnd, node)
                continue
            if self.cfg["wire-log"]:
                wire.append({"round": rnd, "node": node, **describe_reply(reply)})
            outcome, arrays, reason, epsilon = judge_train_reply(reply, self.cfg, self.specs, self.arrays,
                                                                 self.max_update_norm)
            if epsilon is not None:  # validated metrics: the update left the device, so its spend counts
                self.client_epsilon[str(node)] = max(self.client_epsilon.get(str(node), 0.0), epsilon)
            participation[outcome].append(node)
            if outcome == "rejected":
                rejected_reasons.append(reason[:200])
            if outcome == "failed":
                failed_reasons.append(reason[:200])
            if outcome == "trained":
                accepted.append(arrays)
                bytes_received += state_bytes(arrays)
            elif outcome != "refused":
                log(WARNING, "round %d: node %d %s: %s", rnd, node, outcome, reason[:200])
            else:
                log(INFO, "round %d: node %d refused (%s)", rnd, node, reason)
        write_json_atomic(self.folder.spend, self.client_epsilon, strict=True)  # before anything can be lost
        answered = {n for part in participation.values() for n in part}
        silent = [nid for nid in sampled if nid not in answered]
        if silent:  # no reply within round-timeout: a dead, disconnected or slow node
            participation["failed"] += silent
            log(WARNING, "round %d: %d node(s) sent no reply within round-timeout: %s", rnd, len(silent), silent[:20])
        if silent:
            failed_reasons.append(f"{len(silent)} sent no reply within round-timeout")
        aggregated = self._aggregate(rnd, accepted)
        if wire:
            self.folder.append(self.folder.wire, *wire)
        record = {"round": rnd, "sampled": sampled, **participation, "rejected_reasons": rejected_reasons,
                  "failed_reasons": failed_reasons}
        row = {"clients_sampled": len(sampled), "clients_replied": len(sampled) - len(participation["failed"]),
               "clients_accepted": len(accepted), "clients_rejected": len(participation["rejected"]),
               "clients_refused": len(participation["refused"]), "clients_failed": len(participation["failed"]),
               "bytes_sent": len(sampled) * self._content_bytes(), "bytes_received": bytes_received,
               "aggregated": aggregated}
        return row, record

    def _secure_train_round(self, rnd: int, sampled: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
        """One round through SecAgg+ (:mod:`server.secure_aggregation`): the server sees the survivors'
        summed shares only; their mean over the public round size is the update, or nothing on abort."""
        cfg, plan = self.cfg, self.secure_plan
        t0 = time.perf_counter()
        counted: list[int] = []  # the survivors whose releases were counted (the unmask stage began)

        def count_releases(survivors: list[int]) -> None:
            """Before the unmask requests go out: each survivor's share is about to be in an unmasked sum."""
            counted.extend(survivors)
            for node in survivors:
                self.user_releases[str(node)] = self.user_releases.get(str(node), 0) + 1
            write_json_atomic(self.folder.user_releases, self.user_releases, strict=True)

        outcome = run_secure_round(self.grid, sampled, lambda: RecordDict(self._content(rnd)), plan, rnd,
                                   cfg["secagg-threshold"], cfg["round-timeout"], self.flower_run_id or 0,
                                   cfg["secagg-neighbours"], describe_reply if cfg["wire-log"] else None,
                                   on_unmask=count_releases)
        secure_seconds = time.perf_counter() - t0  # the protocol and the devices' work, before the server step
        if outcome.wire:
            self.folder.append(self.folder.wire, *({"round": rnd, **w} for w in outcome.wire))
        for node, metrics in outcome.metrics.items():  # the spends the survivors report, within what is possible
            for key, spend, budget in (("epsilon", self.client_epsilon,
                                        cfg["client-epsilon-budget"] if cfg["local-dp"] else None),
                                       ("user-epsilon", self.reported_user_epsilon, cfg["user-epsilon-budget"])):
                value = metrics.get(key)
                if value is None:
                    continue
                if budget is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and 0 <= value <= budget * (1 + 1e-6):
                    spend[str(node)] = max(spend.get(str(node), 0.0), float(value))
                else:  # an honest device refuses a session past its budget, and reports no epsilon without local DP
                    log(WARNING, "round %d: node %d reported %s %s, outside what an honest device reports; ignored",
                        rnd, node, key, printable(value, 40))
        write_json_atomic(self.folder.spend, self.client_epsilon, strict=True)
        write_json_atomic(self.folder.user_spend, self.reported_user_epsilon, strict=True)
        aggregated, signal = False, {}
        if outcome.total is not None:
            # The sum's squared norm is the signal's plus the noise's, whose mean the plan gives: what the
            # round's update is made of (the population projection in docs/secure-aggregation.md uses it).
            noise_sq = len(outcome.survivors) * plan.share_variance * plan.dim
            sum_sq = float(np.sum(outcome.total.astype(np.float64) ** 2))
            signal = {"sum_norm": plan.gamma * sum_sq ** 0.5, "noise_norm_expected": plan.gamma * noise_sq ** 0.5,
                      "signal_norm_estimate": plan.gamma * max(0.0, sum_sq - noise_sq) ** 0.5}
            update = outcome.total.astype(np.float64) * plan.gamma / cfg["clients-per-round"]
            mean, start = [], 0
            for g in self.arrays:
                mean.append((g + update[start:start + g.size].reshape(g.shape)).astype(g.dtype))
                start += g.size
            aggregated = self._apply(rnd, mean)
        refused = sorted(n for n in outcome.refused if n not in outcome.survivors)
        failed = [n for n in sampled if n not in outcome.survivors and n not in refused]
        # Releases counted but no sum applied (the unmasking failed, or the sum was beyond what honest shares
        # give): nobody can say whose reply broke it, so every counted survivor is rejected and the health check
        # stops a run that would otherwise spend its honest devices' budgets on rounds that change nothing.
        discarded = bool(counted) and outcome.total is None
        rejected = sorted(counted) if discarded else []
        record = {"round": rnd, "sampled": sampled, "trained": [] if discarded else outcome.survivors,
                  "refused": refused, "refused_reasons": [outcome.refused[n] for n in refused],
                  "rejected": rejected, "failed": failed,
                  "rejected_reasons": [printable(outcome.reason or "no sum after the releases were counted")]
                  if discarded else [],
                  "secure_released": outcome.total is not None, "secure_unmasked": outcome.unmasked,
                  "failed_reasons": [f"{len(failed)} dropped out (not in the secure sum)"] if failed else [],
                  "secure_abort": outcome.reason}
        row = {"clients_sampled": len(sampled), "clients_replied": len(outcome.survivors) + len(refused),
               "clients_accepted": len(outcome.survivors) if outcome.total is not None else 0,
               "clients_rejected": len(rejected), "clients_refused": len(refused), "clients_failed": len(failed),
               "bytes_sent": outcome.bytes_down, "bytes_received": outcome.bytes_up, "aggregated": aggregated,
               "secure_round_seconds": round(secure_seconds, 3), **signal}
        return row, record

    def _content(self, rnd: int) -> dict[str, Any]:
        """What every message of this round carries: the global state, the round's config and, when
        publishing, the catalogue file with its SHA-256."""
        config = {"server-round": rnd, "run-id": self.run_id, "run-dir": str(self.folder.root.resolve())}
        content: dict[str, Any] = {"arrays": to_record(self.names, self.arrays)}
        if self.publisher is not None:
            data, sha = self.publisher.publish(self.names, self.arrays, rnd)
            config["catalogue-sha256"] = sha
            content["catalogue"] = ConfigRecord({"file": data})
        content["config"] = ConfigRecord(config)
        return content

    def _content_bytes(self) -> int:
        return state_bytes(self.arrays) + (len(self.publisher.data) if self.publisher is not None else 0)

    def _aggregate(self, rnd: int, accepted: list[list[np.ndarray]]) -> bool:
        """Update the global state; False when the round leaves it unchanged.

        Accepted updates are combined by the run's ``aggregator`` (:mod:`server.aggregators`; the
        mean has equal weights: a weight by example count would need the count, which is private).
        Under central DP the accountant's step for this round is
        made durable before the noisy aggregate is used, so a crash can only over-report."""
        if self.central is None and len(accepted) < self.cfg["min-replies"]:
            log(WARNING, "round %d: %d accepted updates < min-replies %d; global model unchanged", rnd,
                len(accepted), self.cfg["min-replies"])
            return False
        if self.central is not None:
            accepted = without_common_mode(accepted, self.names, self.arrays)
            deltas = [[a - g for a, g in zip(s, self.arrays)] for s in accepted]
            noisy = self.central.noisy_mean(deltas, [a.shape for a in self.arrays], self._noise_stream)
            self.central.record_round()
            write_json_atomic(self.folder.central_dp, self.central.to_json())
            mean = [g + d for g, d in zip(self.arrays, noisy)]
        else:
            mean = aggregate(accepted, self.cfg, self.names, self.arrays)
            if mean is None:
                log(WARNING, "round %d: %s cannot aggregate %d updates; global model unchanged", rnd,
                    self.cfg["aggregator"], len(accepted))
                return False
        return self._apply(rnd, mean)

    def _apply(self, rnd: int, mean: list[np.ndarray]) -> bool:
        """The server step on the round's aggregate state; stops the run before a non-finite state is used."""
        eta = server_learning_rate(self.cfg["server-learning-rate"], self.cfg["server-lr-final-factor"], rnd,
                                   self.cfg["num-server-rounds"])
        new = server_step(self.step, rnd, self.names, self.arrays, mean, eta)
        bad = [n for n, a in zip(self.names, new) if not np.isfinite(a).all()]
        if bad:  # validated replies cannot cause this; stop before a corrupt state is checkpointed or used
            raise FloatingPointError(f"round {rnd}: the aggregated global state has non-finite values in "
                                     f"{bad[:3]}; the run stops at the last good checkpoint")
        self.arrays = new
        return True

    def _evaluate(self, rnd: int) -> tuple[dict[str, Any], list[int], list[int]]:
        """(server-side PROTOCOL metrics plus the federated evaluation's, the nodes asked to evaluate, the
        nodes whose valid release was received)."""
        cfg = self.cfg
        out: dict[str, Any] = {}
        for split, m in self.evaluator.evaluate(self.names, self.arrays).items():
            prefix = "val" if split == "validation" else "test"
            out.update({f"{prefix}_{k}": v for k, v in m.items()})
        k = min(cfg["evaluate-clients"], len(self.nodes))
        if not (k and rnd > 0):
            return out, [], []
        federated, chosen, released = self._federated_evaluation(rnd, k)
        return {**out, **federated}, chosen, released

    def _federated_evaluation(self, rnd: int, k: int) -> tuple[dict[str, Any], list[int], list[int]]:
        """The robust mean of the validated noisy (HR@10, NDCG@10) releases of ``k`` clients (see
        :mod:`client.evaluation` and :func:`server.evaluation.federated_evaluation`), who was asked, and
        whose release was received."""
        rng = np.random.default_rng([self.cfg["seed"], rnd, 1])
        chosen = sorted(self.nodes[i] for i in rng.choice(len(self.nodes), size=k, replace=False))
        content = self._content(rnd)
        msgs = [Message(content=RecordDict(content), dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in chosen]
        out, epsilons = federated_evaluation(self.grid.send_and_receive(msgs, timeout=self.cfg["round-timeout"]),
                                             msgs, self.cfg)
        for node, eps in epsilons.items():  # each release is part of that device's spend
            self.client_epsilon[str(node)] = max(self.client_epsilon.get(str(node), 0.0), eps)
        write_json_atomic(self.folder.spend, self.client_epsilon, strict=True)
        return out, chosen, sorted(epsilons)

    def _record(self, rnd: int, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        full = {"round": rnd, **row, **metrics, "time": time.time()}
        self.folder.append(self.folder.metrics, full)
        parts = [f"round {rnd}"]
        if row.get("clients_sampled"):
            parts.append(f"clients {row['clients_accepted']}/{row['clients_sampled']} accepted "
                         f"({row['clients_refused']} refused, {row['clients_rejected']} rejected, "
                         f"{row['clients_failed']} failed)")
        if "test_NDCG@10" in metrics:
            parts.append(f"test NDCG@10 {metrics['test_NDCG@10']:.4f} HR@10 {metrics['test_HR@10']:.4f}")
        if row.get("epsilon_max") is not None:
            parts.append(f"example eps max {row['epsilon_max']:.2f}")
        if row.get("user_epsilon") is not None:
            parts.append(f"user eps {row['user_epsilon']:.2f}")
        log(INFO, "[privrec] " + " | ".join(parts))

    def _checkpoint(self, rnd: int) -> None:
        state = {"run_id": self.run_id, "client_epsilon": self.client_epsilon,
                 "central_dp": self.central.to_json() if self.central else None,
                 "user_releases": self.user_releases}
        save_checkpoint(self.folder.checkpoints, rnd, self.names, self.arrays, optimizer_state(self.step), state)

    def _finish(self) -> Path:
        cfg = self.cfg
        rows = self.folder.read_metrics()
        last = [r for r in rows if "test_NDCG@10" in r][-1]
        self.folder.write_final_state(self.names, self.arrays, {"run-id": self.run_id, "round": str(last["round"]),
                                                                "user-model": cfg["user-model"],
                                                                "lora-rank": str(cfg["lora-rank"])})
        metrics = {k: last[f"test_{k}"] for k in ("HR@10", "NDCG@10", "MRR@10", "HR@20")}
        ledgers = Path(cfg["ledger-dir"]) if cfg["ledger-dir"] else self.folder.clients
        secure = secure_statement(cfg, self.secure_plan, self.user_releases, ledgers_user_epsilon(ledgers),
                                  self.reported_user_epsilon) if self.secure_plan is not None else None
        privacy = privacy_statement(self.cfg, self.client_epsilon, self.central,
                                    ledgers_epsilon(ledgers) if cfg["local-dp"] else (None, 0), secure)
        started = rows[0]["time"] if rows else time.time()
        method = "federated" + ("-dp" if cfg["local-dp"] else "") + ("-central-dp" if cfg["central-dp"] else "") + \
            ("-secure-dp" if cfg["secure-aggregation"] else "")
        result = result_record(method, "test", metrics, len(self.evaluator.users), cfg["seed"], privacy,
                               time.time() - started, {**cfg, "run-id": self.run_id, "rounds": last["round"],
                                                       "flower-run-id": self.flower_run_id})
        self.folder.write_result(result)
        self.folder.write_plots()
        log(INFO, completion_line(self.flower_run_id, self.folder.result))
        log(INFO, "[privrec] run %s: test NDCG@10 %.4f, HR@10 %.4f; artefacts in %s", self.run_id,
            metrics["NDCG@10"], metrics["HR@10"], self.folder.root)
        return self.folder.root

def run_federation(grid: Grid, run_config: dict[str, Any], flower_run_id: int | None = None) -> Path:
    """Entry point used by the ServerApp (and tests): runs or resumes, returns the run folder."""
    return Federation(grid, run_config, flower_run_id).run()
