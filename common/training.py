"""The one training loop every stage uses (central baselines now, Flower clients later).

Each example's loss is a softmax cross-entropy over the public catalogue, so it
depends only on that example and public data: DP-SGD's per-example clipping is
valid. Under DP, batches are Poisson-sampled and the noise multiplier is either
given or solved for a target epsilon over the planned number of steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from common.features import FeatureSet
from common.grad_sample import append_rows
from common.model import Recommender, refresh_items
from common.privacy import GradientCanaries, PrivateTraining, PublicSchedule, make_private, noise_for_epsilon
from common.progress import progress_bar

if TYPE_CHECKING:  # only for the annotation of dp_schedule
    from common.sequence_training import SequenceTrainConfig

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = 64
    learning_rate: float = 1e-3
    item_learning_rate: float = 1e-2
    seed: int = 0  # data order and initialisation without DP; never any DP randomness
    refresh_every: int = 50  # steps between catalogue re-encodings
    dp: bool = False
    target_epsilon: float | None = 8.0
    noise_multiplier: float | None = None  # overrides target_epsilon when set
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    # Under DP, the public example count the Poisson rate, the step count and the denominator
    # are derived from (a client's cap on examples per session). None: the training set's own
    # size, which is only right where that size is public (the central baselines).
    public_size: int | None = None
    optimizer: str = "adam"  # "adam" or "sgd" (plain SGD: a client's update is then its noisy gradient sum)
    max_steps: int | None = None  # cap below the planned steps (a client's remaining budget)
    # L2 sensitivity of the clipped sum in units of max_grad_norm that the accounting uses (2: a
    # selection window or replace-one adjacency, see common.privacy.session_sensitivity)
    sensitivity: float = 1.0
    refresh_at_start: bool = True  # False when the head already holds these adapters' item embeddings
    refresh_at_end: bool = True


@dataclass
class TrainReport:
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    expected_batch_size: int | None = None
    empty_batches: int = 0

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


class AdapterCorruptionError(RuntimeError):
    """A DP step left the LoRA weights unchanged or non-finite (see opacus issue 820)."""


def adapter_params(model: Recommender) -> list[torch.Tensor]:
    params = dict(model.encoder.named_parameters())
    return [params[n] for n in model.encoder.adapter_names()]


def _param_groups(model: Recommender, cfg: TrainConfig) -> list[dict]:
    item_side = [p for n, p in model.head.named_parameters() if p.requires_grad]
    groups = [{"params": adapter_params(model), "lr": cfg.learning_rate}]
    if item_side:
        groups.append({"params": item_side, "lr": cfg.item_learning_rate})
    return groups


def dp_schedule(num_rows: int, cfg: TrainConfig | SequenceTrainConfig) -> PublicSchedule:
    """The DP session's public rate, steps and denominator (from ``cfg.public_size`` when set); either
    loop's config (the fields read are common to both)."""
    size = cfg.public_size if cfg.public_size is not None else num_rows
    return PublicSchedule.from_public_size(size, cfg.batch_size, cfg.epochs)


def planned_steps(num_rows: int, cfg: TrainConfig) -> int:
    """Steps the loop will take before any ``max_steps`` cap: the public DP schedule's under DP,
    else epochs x ceil(N / batch)."""
    if cfg.dp:
        return dp_schedule(num_rows, cfg).steps
    return max(1, int(math.ceil(cfg.epochs * num_rows / cfg.batch_size)))


def train(model: Recommender, features: FeatureSet, targets: np.ndarray, item_features: FeatureSet | None,
          cfg: TrainConfig, label: str | None = None, canaries: GradientCanaries | None = None,
          on_start: Callable[[], object] | None = None, row_weights: np.ndarray | None = None) -> TrainReport:
    """Train ``model`` in place on cached user features and their target items.

    ``row_weights`` (0 or 1 per row) marks padding rows (weight 0): they are sampled, run forward
    and backward like real rows, so a session's work does not depend on how many real examples
    it holds, but their loss is multiplied by 0, so their per-example gradient is exactly zero.

    ``on_start`` is called once everything is set up and before the first step (a client
    records its spend there, so a session that cannot start records nothing).

    Under DP every random choice of the mechanism (Poisson batches, noise) comes from
    secure streams keyed from the OS (:mod:`common.privacy`); the schedule is public, and a
    client with no examples still takes its noise-only steps. ``canaries`` (audits only)
    appends rows with made-up per-example gradients to the training set; sampling, clipping,
    noise and accounting then cover them like real rows. Opacus' hooks are removed however
    the loop ends.
    """
    n = len(features)
    extra = canaries.count if canaries is not None else 0
    if n == 0 and not cfg.dp:
        raise ValueError("no training examples")
    if item_features is None and (cfg.refresh_at_start or cfg.refresh_at_end or cfg.refresh_every < 10**9):
        raise ValueError("training that re-encodes the catalogue needs its item features")
    if extra and not cfg.dp:
        raise ValueError("gradient canaries need DP training (they are injected as per-example gradients)")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {cfg.optimizer!r}")
    targets_t = torch.as_tensor(targets, dtype=torch.long)
    weights_t = torch.ones(n) if row_weights is None else torch.as_tensor(row_weights, dtype=torch.float32)
    if weights_t.shape != (n,) or not bool(((weights_t == 0) | (weights_t == 1)).all()):
        raise ValueError(f"row_weights must be {n} values of 0 or 1")
    steps = planned_steps(n + extra, cfg)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    optimizer = OPTIMIZERS[cfg.optimizer](_param_groups(model, cfg), lr=cfg.learning_rate)
    model.train()
    report = TrainReport()
    private: PrivateTraining | None = None
    module: nn.Module = model
    sigma = 0.0
    if cfg.dp:
        schedule = dp_schedule(n + extra, cfg)
        sigma = cfg.noise_multiplier
        if sigma is None:
            if cfg.target_epsilon is None:
                raise ValueError("DP training needs target_epsilon or noise_multiplier")
            sigma = cfg.sensitivity * noise_for_epsilon(cfg.target_epsilon, cfg.delta, schedule.sample_rate, steps,
                                                        cfg.accountant)
        private = make_private(model, optimizer, sigma, cfg.max_grad_norm, schedule, cfg.accountant,
                               sensitivity=cfg.sensitivity)
        module, optimizer = private.module, private.optimizer
        batches = private.batches(n + extra)
        report.noise_multiplier, report.sample_rate, report.delta = sigma, schedule.sample_rate, cfg.delta
        report.expected_batch_size = schedule.expected_batch_size
    else:
        batches = _shuffled_batches(n, cfg.batch_size, cfg.seed)
    try:
        if on_start is not None:
            on_start()
        _run_steps(model, module, optimizer, batches, steps, features, targets_t, weights_t, item_features, cfg,
                   report, n, canaries, must_move=cfg.dp and sigma > 0, label=label)
        if private is not None:
            report.epsilon = private.epsilon(cfg.delta)
    finally:
        if private is not None:
            private.close()  # detach Opacus' hooks so the plain model can be evaluated and reused
    if cfg.refresh_at_end:
        refresh_items(model, item_features)
    model.eval()
    return report


def _shuffled_batches(n: int, batch_size: int, seed: int):
    """Non-private training: epochs of shuffled fixed-size batches, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        yield from order.split(batch_size)


def _run_steps(model: Recommender, module: nn.Module, optimizer, batches, steps: int, features: FeatureSet,
               targets: torch.Tensor, weights: torch.Tensor, item_features: FeatureSet | None, cfg: TrainConfig,
               report: TrainReport, n: int, canaries: GradientCanaries | None, must_move: bool,
               label: str | None) -> None:
    adapters = adapter_params(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.refresh_at_start:
        refresh_items(model, item_features)
    start = time.perf_counter()
    with progress_bar(label, total=steps) as advance:
        for idx in batches:
            if report.steps >= steps:
                break
            if report.steps and report.steps % cfg.refresh_every == 0:
                refresh_items(model, item_features)
            before = [p.detach().clone() for p in adapters]
            optimizer.zero_grad(set_to_none=True)
            loss = None
            canary_idx = idx[idx >= n] - n
            idx = idx[idx < n]
            if len(idx) == 0:
                # Poisson sampling drew no example: the step must still add noise, or
                # whether a batch was empty would leak; give Opacus empty per-sample grads.
                report.empty_batches += 1
                for p in trainable:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            else:
                feats, mask = features.batch(idx)
                # The mean over the batch's rows, padding included: Opacus' "mean" reduction then
                # recovers each row's own gradient (zero for a padding row).
                per_row = nn.functional.cross_entropy(module(feats, mask), targets[idx], reduction="none")
                loss = (per_row * weights[idx]).sum() / len(idx)
                loss.backward()
            if len(canary_idx):
                for p, rows in zip(trainable, canaries.rows(canary_idx, trainable)):
                    append_rows(p, rows)
            optimizer.step()
            # A noiseless step on an empty batch (audits of a broken set-up only) cannot move.
            _check_adapters(adapters, before, must_change=must_move or (cfg.dp and len(idx) + len(canary_idx) > 0))
            report.steps += 1
            report.examples += int(weights[idx].sum()) + len(canary_idx)
            if loss is not None:
                report.losses.append(float(loss.detach()))
            advance(1)
    report.seconds = time.perf_counter() - start


def _check_adapters(adapters: list[torch.Tensor], before: list[torch.Tensor], must_change: bool) -> None:
    changed = any(not torch.equal(a, b) for a, b in zip(adapters, before))
    finite = all(bool(torch.isfinite(a).all()) for a in adapters)
    if not finite:
        raise AdapterCorruptionError("LoRA weights became non-finite after an optimiser step")
    if must_change and not changed:
        raise AdapterCorruptionError("a DP step left every LoRA weight unchanged (opacus issue 820?)")
