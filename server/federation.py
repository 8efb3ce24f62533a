"""The server's round loop: sample, send, validate, aggregate (optionally with central DP), evaluate,
checkpoint, record.

Flower's ``Strategy.start`` runs a fixed loop; privrec needs reply validation,
refusal accounting, central DP with Poisson sampling, checkpoints and resume
inside each round, so it drives the Grid itself and uses Flower's strategies for
the aggregation arithmetic (:mod:`server.aggregation`).
"""

from __future__ import annotations

import json
import math
import time
from importlib.metadata import version
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.model_state import ModelRuntime, ModelSettings, get_state, state_bytes
from common.partition import dataset_from_source, split_for
from common.privacy import client_schedule, interaction_group_size
from common.secure_random import SecureStream
from common.wire import EVALUATE_METRICS, RECORD_NAMES, REFUSAL_REASONS, TRAIN_METRICS
from common.results import result_record, write_json_atomic
from common.run_config import DEFAULTS, ConfigError, resolve
from server.aggregation import (load_optimizer_state, make_server_step, optimizer_state, server_step, to_record,
                                weighted_mean)
from server.artefacts import RunFolder
from server.catalogue import CataloguePublisher
from server.central_dp import CentralDP
from server.checkpoint import load_checkpoint, save_checkpoint
from server.evaluation import ServerEvaluator
from server.validation import adapter_specs, describe_reply, validate_metrics, validate_reply

CENTRAL_DP_LEDGER = "central-dp.json"  # the user-level accountant, written before each release is used

# Keys whose change would make a resumed run a different experiment.
_RESUME_MAY_CHANGE = {"num-server-rounds", "resume", "round-timeout", "eval-every", "evaluate-clients",
                      "output-dir"}  # a run folder may be moved and resumed where it now is


def sample_clients(node_ids: list[int], cfg: dict[str, Any], rnd: int, rng: np.random.Generator,
                   secure: SecureStream) -> list[int]:
    """The clients of round ``rnd`` (1-based) under the run's ``client-sampling`` scheme.

    cyclic: the population is walked in passes, each in a fresh order drawn from (seed, pass); round
    ``rnd`` takes the next ``clients-per-round`` positions, so no client trains twice before every client
    has trained once (a round that straddles two passes drops a repeated client). uniform: a fresh
    fixed-size sample from ``rng``. poisson: each client independently at rate clients-per-round / N
    from the secure stream (what the central-DP accountant models; it must not be replayable).
    """
    n = len(node_ids)
    k = min(cfg["clients-per-round"], n)
    scheme = cfg["client-sampling"]
    if scheme == "poisson":
        return [nid for nid, chosen in zip(node_ids, secure.bernoulli(k / n, n)) if chosen]
    # Choose positions, not ids: node ids are uint64 and numpy would round them through float64.
    if scheme == "uniform":
        return sorted(node_ids[i] for i in rng.choice(n, size=k, replace=False))
    if scheme != "cyclic":
        raise ConfigError(f"run config 'client-sampling': {scheme!r} is not a concrete scheme")
    start = (rnd - 1) * k
    chosen: set[int] = set()
    for first_pass in range(start // n, (start + k - 1) // n + 1):
        order = np.random.default_rng([cfg["seed"], first_pass, 2]).permutation(n)
        lo, hi = max(start, first_pass * n), min(start + k, (first_pass + 1) * n)
        chosen.update(int(i) for i in order[lo - first_pass * n: hi - first_pass * n])
    return sorted(node_ids[i] for i in chosen)


def _wait_for_nodes(grid: Grid, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if nodes or time.time() > deadline:
            return nodes
        time.sleep(1.0)


def _with_legacy_keys(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored run config with the keys added since filled in with the values that reproduce that run:
    a plain item bias, and the sampling used before client-sampling existed (uniform each round,
    Poisson under central DP)."""
    legacy = {"item-bias-scale": 1.0, "client-sampling": "poisson" if stored.get("central-dp") else "uniform",
              # added with the DP evaluation release and persistent simulated ledgers; neither changes
              # what an older run did
              "eval-noise-multiplier": DEFAULTS["eval-noise-multiplier"], "ledger-dir": ""}
    return {**legacy, **stored}


class Federation:
    """One federated run, resumable from its run folder."""

    def __init__(self, grid: Grid, run_config: dict[str, Any]) -> None:
        self.grid = grid
        self.cfg = resolve(run_config)
        cfg = self.cfg
        self.run_id = cfg["run-name"] or f"run-{time.strftime('%Y%m%d-%H%M%S')}-seed{cfg['seed']}"
        # The data first: a bad dataset path must not leave a run folder that blocks a retry.
        data = dataset_from_source(cfg["dataset"])
        split = split_for(cfg["dataset"])
        split.eval_users()  # raises NoEvaluationUsersError when no user has the 3 events the split needs
        self.folder = RunFolder(Path(cfg["output-dir"]) / self.run_id)
        self._check_resume()
        self.folder.write_config({**cfg, "run-id": self.run_id, "versions": {
            p: version(p) for p in ("flwr", "opacus", "torch", "peft", "transformers")}})
        self.runtime = ModelRuntime(data, ModelSettings.from_run_config(cfg), seed=cfg["seed"])
        self.names, self.arrays = get_state(self.runtime.model)
        self.specs = adapter_specs(self.names, self.arrays)
        self.step = make_server_step(cfg["strategy"], cfg["server-learning-rate"])
        self.evaluator = ServerEvaluator(self.runtime, split)
        self.client_epsilon: dict[str, float] = {}
        self.publisher = CataloguePublisher(self.runtime, self.folder.root, self.run_id) \
            if cfg["publish-catalogue"] else None
        self._secure = SecureStream()  # central DP: Poisson client sampling and the server's noise
        self.central: CentralDP | None = None
        self.start_round = 1
        self.nodes: list[int] = []

    def _check_resume(self) -> None:
        exists = self.folder.config.exists()
        if exists and not self.cfg["resume"]:
            raise ConfigError(f"run folder {self.folder.root} exists: set resume=true to continue it, "
                              f"or choose another run-name")
        if self.cfg["resume"]:
            if not exists:
                raise ConfigError(f"resume=true but {self.folder.config} does not exist (run-name "
                                  f"{self.cfg['run-name']!r})")
            try:
                old = json.loads(self.folder.config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"resume: {self.folder.config} cannot be read as the stored run config "
                                  f"(expected a JSON object): {exc}") from exc
            if not isinstance(old, dict):
                raise ConfigError(f"resume: {self.folder.config} holds {type(old).__name__}, expected a JSON object")
            old = _with_legacy_keys(old)
            changed = sorted(k for k in self.cfg if k not in _RESUME_MAY_CHANGE and old.get(k) != self.cfg[k])
            if changed:
                raise ConfigError(f"resume: run config differs from the stored run in {changed}")

    def _restore(self) -> None:
        meta, arrays, optimizer = load_checkpoint(self.folder.checkpoints)
        if meta["names"] != self.names:
            raise ConfigError(f"{self.folder.checkpoints}: checkpoint tensors do not match this model")
        self.arrays = arrays
        load_optimizer_state(self.step, optimizer)
        self.client_epsilon = dict(meta["client_epsilon"])
        if self.central is not None:
            self._restore_central(meta)
        self.start_round = int(meta["round"]) + 1
        self.folder.keep_rounds_up_to(int(meta["round"]))
        log(INFO, "resuming %s after round %d", self.run_id, meta["round"])

    def _restore_central(self, meta: dict[str, Any]) -> None:
        """The central-DP accountant as of the last release: ``central-dp.json`` is written before each
        noisy aggregate is used, so it may hold one round more than the checkpoint (a release made
        just before a crash), and it wins. A changed population re-derives the sampling rate; the
        history keeps the rounds already released at the old rate."""
        stored = [CentralDP.from_json(meta["central_dp"])] if meta.get("central_dp") else []
        ledger = self.folder.root / CENTRAL_DP_LEDGER
        if ledger.exists():
            try:
                stored.append(CentralDP.from_json(json.loads(ledger.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"resume: {ledger} cannot be read as the central-DP accountant ({exc}); "
                                  f"refusing to continue without it") from None
        if not stored:
            return
        restored = max(stored, key=lambda c: c.rounds)
        fresh = self.central
        if restored.population != fresh.population:
            log(WARNING, "resume: %d clients instead of %d; central-DP sampling rate re-derived as %.4g",
                fresh.population, restored.population, fresh.sample_rate)
        restored.population, restored.sample_rate = fresh.population, fresh.sample_rate
        self.central = restored

    def run(self) -> Path:
        cfg = self.cfg
        self.nodes = _wait_for_nodes(self.grid, cfg["round-timeout"])
        if not self.nodes:
            raise RuntimeError("no SuperNodes connected within round-timeout")
        if cfg["central-dp"]:
            q = min(1.0, cfg["clients-per-round"] / len(self.nodes))
            self.central = CentralDP(cfg["central-noise-multiplier"], cfg["central-clip"], q, len(self.nodes),
                                     cfg["central-delta"])
        if cfg["resume"] and (self.folder.checkpoints / "latest.json").exists():
            self._restore()
        elif cfg["resume"]:
            self.folder.keep_rounds_up_to(-1)  # stopped before its first checkpoint: start over
            if self.central is not None:
                self._restore_central({})  # but a release made before the crash still counts
        log(INFO, "privrec run %s: %d clients, rounds %d..%d, strategy %s, local DP %s, central DP %s",
            self.run_id, len(self.nodes), self.start_round, cfg["num-server-rounds"], cfg["strategy"],
            cfg["local-dp"], cfg["central-dp"])
        if self.start_round == 1:
            self._record(0, {"clients_sampled": 0}, self._evaluate(0))
        for rnd in range(self.start_round, cfg["num-server-rounds"] + 1):
            t0 = time.perf_counter()
            row = self._train_round(rnd)
            evaluate = rnd % cfg["eval-every"] == 0 or rnd == cfg["num-server-rounds"]
            metrics = self._evaluate(rnd) if evaluate else {}
            row["round_seconds"] = round(time.perf_counter() - t0, 2)
            self._record(rnd, row, metrics)
            self._checkpoint(rnd)
        return self._finish()

    def _train_round(self, rnd: int) -> dict[str, Any]:
        cfg = self.cfg
        # Poisson sampling (central DP) draws from the secure stream: who is sampled must be secret.
        # The other schemes are not part of a mechanism and stay reproducible from the seed.
        sampled = sample_clients(self.nodes, cfg, rnd, np.random.default_rng([cfg["seed"], rnd]), self._secure)
        content = self._content(rnd)
        messages = [Message(content=RecordDict(content), dst_node_id=nid, message_type=MessageType.TRAIN)
                    for nid in sampled]
        replies = list(self.grid.send_and_receive(messages, timeout=cfg["round-timeout"])) if messages else []
        accepted: list[list[np.ndarray]] = []
        participation: dict[str, list] = {"trained": [], "refused": [], "rejected": [], "failed": []}
        rejected_reasons: list[str] = []  # in the order of participation["rejected"]
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
            outcome, arrays, reason = self._judge_train_reply(reply, node)
            participation[outcome].append(node)
            if outcome == "rejected":
                rejected_reasons.append(reason[:200])
            if outcome == "trained":
                accepted.append(arrays)
                bytes_received += state_bytes(arrays)
            elif outcome != "refused":
                log(WARNING, "round %d: node %d %s: %s", rnd, node, outcome, reason[:200])
            else:
                log(INFO, "round %d: node %d refused (%s)", rnd, node, reason)
        answered = {n for part in participation.values() for n in part}
        silent = [nid for nid in sampled if nid not in answered]
        if silent:  # no reply within round-timeout: a dead, disconnected or slow node
            participation["failed"] += silent
            log(WARNING, "round %d: %d node(s) sent no reply within round-timeout: %s", rnd, len(silent), silent[:20])
        aggregated = self._aggregate(rnd, accepted)
        self.folder.append(self.folder.rounds, {"round": rnd, "sampled": sampled, **participation,
                                                "rejected_reasons": rejected_reasons})
        if wire:
            self.folder.append(self.folder.root / "wire.jsonl", *wire)
        eps = list(self.client_epsilon.values())
        return {
            "clients_sampled": len(sampled), "clients_replied": len(sampled) - len(participation["failed"]),
            "clients_accepted": len(accepted), "clients_rejected": len(participation["rejected"]),
            "clients_refused": len(participation["refused"]), "clients_failed": len(participation["failed"]),
            "epsilon_max": max(eps) if eps else None,
            "epsilon_median": float(np.median(eps)) if eps else None,
            "clients_with_spend": len(eps),
            "user_epsilon": self.central.epsilon() if self.central else None,
            "bytes_sent": len(sampled) * self._content_bytes(), "bytes_received": bytes_received,
            "aggregated": aggregated,
        }

    def _judge_train_reply(self, reply: Message, node: int) -> tuple[str, list[np.ndarray], str]:
        """(outcome, arrays, reason) of one train reply: ``trained``, ``refused``, ``rejected`` or
        ``failed``. Nothing in a reply is used before it is validated; a reply that cannot even be
        parsed is rejected, never raised."""
        if reply.has_error():
            return "failed", [], str(reply.error.reason)
        try:
            content = reply.content
            if set(content.keys()) - RECORD_NAMES:
                return "rejected", [], f"unexpected record(s) {sorted(set(content.keys()) - RECORD_NAMES)[:5]}"
            metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
            if "status" in content.config_records:
                reason = content["status"].get("reason", "")
                return "refused", [], reason if reason in REFUSAL_REASONS else "unknown reason code"
            verdict = validate_metrics("train", metrics, self.cfg)
            if not verdict.accepted:
                return "rejected", [], verdict.reason
            if "epsilon" in metrics:  # validated: the update left the device, so its spend counts
                self.client_epsilon[str(node)] = max(self.client_epsilon.get(str(node), 0.0),
                                                     float(metrics["epsilon"]))
            if "arrays" not in content.array_records:
                return "rejected", [], "no arrays record"
            names = list(content["arrays"].keys())
            arrays = [content["arrays"][k].numpy() for k in names]
        except Exception as exc:  # noqa: BLE001 - a malformed reply must not stop the round
            return "rejected", [], f"unreadable reply ({type(exc).__name__})"
        verdict = validate_reply(names, arrays, self.specs, self.arrays, self.cfg["max-update-norm"])
        return ("trained", arrays, "") if verdict.accepted else ("rejected", [], verdict.reason)

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

        Accepted updates are averaged with equal weights: a weight by example count would need
        the count, which is private. Under central DP the accountant's step for this round is
        made durable before the noisy aggregate is used, so a crash can only over-report."""
        if self.central is None and len(accepted) < self.cfg["min-replies"]:
            log(WARNING, "round %d: %d accepted updates < min-replies %d; global model unchanged", rnd,
                len(accepted), self.cfg["min-replies"])
            return False
        if self.central is not None:
            deltas = [[a - g for a, g in zip(s, self.arrays)] for s in accepted]
            noisy = self.central.noisy_mean(deltas, [a.shape for a in self.arrays], self._secure)
            self.central.record_round()
            write_json_atomic(self.folder.root / CENTRAL_DP_LEDGER, self.central.to_json())
            mean = [g + d for g, d in zip(self.arrays, noisy)]
        else:
            mean = weighted_mean(self.names, accepted, [1.0] * len(accepted))
        new = server_step(self.step, rnd, self.names, self.arrays, mean)
        bad = [n for n, a in zip(self.names, new) if not np.isfinite(a).all()]
        if bad:  # validated replies cannot cause this; stop before a corrupt state is checkpointed or used
            raise FloatingPointError(f"round {rnd}: the aggregated global state has non-finite values in "
                                     f"{bad[:3]}; the run stops at the last good checkpoint")
        self.arrays = new
        return True

    def _evaluate(self, rnd: int) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {}
        for split, m in self.evaluator.evaluate(self.names, self.arrays).items():
            prefix = "val" if split == "validation" else "test"
            out.update({f"{prefix}_{k}": v for k, v in m.items()})
        k = min(cfg["evaluate-clients"], len(self.nodes))
        if k and rnd > 0:
            out.update(self._federated_evaluation(rnd, k))
        return out

    def _federated_evaluation(self, rnd: int, k: int) -> dict[str, Any]:
        """Mean of the validated noisy (HR@10, NDCG@10) releases of ``k`` clients (see
        :mod:`client.evaluation`); refusals, failures and invalid replies are counted, not used."""
        rng = np.random.default_rng([self.cfg["seed"], rnd, 1])
        chosen = sorted(self.nodes[i] for i in rng.choice(len(self.nodes), size=k, replace=False))
        content = self._content(rnd)
        msgs = [Message(content=RecordDict(content), dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in chosen]
        rows, refused, rejected = [], 0, 0
        destination = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in msgs if m.metadata.message_id}
        answered: set[int] = set()
        for reply in self.grid.send_and_receive(msgs, timeout=self.cfg["round-timeout"]):
            node = destination.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
            if reply.has_error() or node not in chosen or node in answered:
                continue  # failed, unsolicited or a second reply
            answered.add(node)
            try:
                if "status" in reply.content.config_records:
                    refused += 1
                    continue
                metrics = dict(reply.content["metrics"])
            except Exception:  # noqa: BLE001 - a malformed reply is rejected, never raised
                rejected += 1
                continue
            verdict = validate_metrics("evaluate", metrics, self.cfg)
            if not verdict.accepted:
                rejected += 1
                log(WARNING, "round %d: evaluation reply rejected: %s", rnd, verdict.reason)
                continue
            if "epsilon" in metrics:  # the release is part of the device's spend
                self.client_epsilon[str(node)] = max(self.client_epsilon.get(str(node), 0.0), float(metrics["epsilon"]))
            rows.append(metrics)
        out: dict[str, Any] = {"federated_clients": len(rows), "federated_refused": refused,
                               "federated_rejected": rejected}
        if rows:
            out["federated_HR@10"] = float(np.mean([r["HR@10"] for r in rows]))
            out["federated_NDCG@10"] = float(np.mean([r["NDCG@10"] for r in rows]))
            out["federated_noise_std_of_mean"] = self.cfg["eval-noise-multiplier"] * math.sqrt(2.0 / len(rows))
        return out

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
                 "central_dp": self.central.to_json() if self.central else None}
        save_checkpoint(self.folder.checkpoints, rnd, self.names, self.arrays, optimizer_state(self.step), state)

    def _finish(self) -> Path:
        cfg = self.cfg
        rows = self.folder.read_metrics()
        last = [r for r in rows if "test_NDCG@10" in r][-1]
        self.folder.write_final_state(self.names, self.arrays, {"run-id": self.run_id, "round": str(last["round"]),
                                                                "lora-rank": str(cfg["lora-rank"])})
        metrics = {k: last[f"test_{k}"] for k in ("HR@10", "NDCG@10", "MRR@10", "HR@20")}
        privacy = self.privacy_statement()
        started = rows[0]["time"] if rows else time.time()
        method = "federated" + ("-dp" if cfg["local-dp"] else "") + ("-central-dp" if cfg["central-dp"] else "")
        result = result_record(method, "test", metrics, len(self.evaluator.users), cfg["seed"], privacy,
                               time.time() - started, {**cfg, "run-id": self.run_id, "rounds": last["round"]})
        write_json_atomic(self.folder.result, result, strict=True)
        self.folder.write_plots()
        log(INFO, "[privrec] run %s done: test NDCG@10 %.4f, HR@10 %.4f; artefacts in %s", self.run_id,
            metrics["NDCG@10"], metrics["HR@10"], self.folder.root)
        return self.folder.root

    def privacy_statement(self) -> dict[str, Any]:
        """PROTOCOL.md section 6: the unit(s) protected, with delta, accountant, adjacency and trust."""
        cfg = self.cfg
        eps = list(self.client_epsilon.values())
        out: dict[str, Any] = {"unit": "none"}
        if cfg["local-dp"]:
            schedule = client_schedule(cfg)
            out = {"unit": "example", "epsilon": max(eps) if eps else 0.0, "delta": cfg["delta"],
                   "accountant": cfg["accountant"], "adjacency": "add-remove", "trust": "none",
                   "epsilon_is": "max over clients of the composed per-client epsilon (every DP-SGD session and "
                                 "every evaluation release in its ledger)",
                   "client_epsilon_budget": cfg["client-epsilon-budget"], "noise_multiplier": cfg["noise-multiplier"],
                   "max_grad_norm": cfg["max-grad-norm"], "sample_rate": schedule.sample_rate,
                   "steps_per_session": schedule.steps, "denominator": schedule.expected_batch_size,
                   "sampling": "poisson per example, from a ChaCha20 stream keyed from the OS",
                   "noise": "Gaussian from a separate ChaCha20 stream, snapped to a power-of-two grid",
                   "released_fields": sorted(["arrays", *(f"metrics.{k}" for k in TRAIN_METRICS),
                                              *(f"metrics.{k}" for k in EVALUATE_METRICS)]),
                   "ledgers": (f"persistent folder {cfg['ledger-dir']}" if cfg["ledger-dir"] else
                               "per run (simulation: clients/ in the run folder). Each simulated run is a "
                               "separate deployment: budgets do not compose across runs on the same data; set "
                               "ledger-dir to account for repeated runs. Deployed devices keep their ledger in "
                               "their own state-dir."),
                   "note": (f"example-level per client; one rating changes up to "
                            f"{interaction_group_size(cfg['history-len'], cfg['examples-per-user'])} examples "
                            f"(its own, and the rewritten histories of later ones), so interaction-level DP "
                            f"follows only by group privacy with that group size")}
        if self.central is not None:
            if out["unit"] == "none":
                out = {"unit": "user", "epsilon": self.central.epsilon(), "delta": self.central.delta,
                       "accountant": "rdp", "adjacency": "add-remove", "trust": "the server (aggregator)"}
            out.update({"user_epsilon": self.central.epsilon(), "user_delta": self.central.delta,
                        "user_accountant": "rdp", "user_adjacency": "add-remove (one whole client)",
                        "user_trust": "the server (aggregator) adds the noise and keeps who was sampled secret",
                        "user_sampling": f"poisson, q={self.central.sample_rate:.4g}",
                        "user_noise_multiplier": self.central.noise_multiplier, "user_clip": self.central.clip,
                        "outside_user_guarantee": ("metrics.jsonl and rounds.jsonl (who was sampled, per-round "
                                                   "counts of accepted, refused, rejected and failed clients) are "
                                                   "the trusted server's own records, not covered by the "
                                                   "user-level epsilon: do not publish them")})
        return out


def run_federation(grid: Grid, run_config: dict[str, Any]) -> Path:
    """Entry point used by the ServerApp (and tests): runs or resumes, returns the run folder."""
    return Federation(grid, run_config).run()
