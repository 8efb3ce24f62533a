"""The training loop of the sequence model, without or with DP-SGD (Opacus per-sample gradients).

One row is one (history prefix, next item) example and its loss a softmax cross-entropy over the
public catalogue, so per-example clipping bounds exactly one example's contribution. Under DP the
batches are Poisson-sampled and the noise drawn from the secure streams of :mod:`common.privacy`;
the rate, steps and denominator come from a public size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from common.grad_sample import append_rows
from common.privacy import GradientCanaries, PrivateTraining, PublicSchedule, make_private, noise_for_epsilon
from common.progress import progress_bar
from common.secure_random import SecureStream
from common.sequence import SequenceRecommender, SequenceRows, history_mask

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class SequenceTrainConfig:
    """Knobs of one training run of the sequence model (recorded with every result)."""

    epochs: float = 10.0
    batch_size: int = 256
    # non-private only: each batch holds every row of this many users (an epoch's users in a random order),
    # the shape of a federated round, instead of batch_size random rows (0)
    user_batches: int = 0
    learning_rate: float = 1e-3
    # linear decay from learning_rate to this over the run's steps (None: constant)
    final_learning_rate: float | None = None
    weight_decay: float = 0.0
    optimizer: str = "adam"
    seed: int = 0  # initialisation and (without DP) data order; never any DP randomness
    dp: bool = False
    target_epsilon: float | None = 8.0
    noise_multiplier: float | None = None  # overrides target_epsilon when set
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    sensitivity: float = 1.0  # of the clipped sum, in units of max_grad_norm
    public_size: int | None = None  # public example count of the DP schedule (None: the rows' count)
    max_steps: int | None = None
    # DP only: how per-example gradients are computed (common.privacy.GRAD_SAMPLE_MODES); the same
    # gradients, clipping and noise either way, "one-pass" skips the weight gradients DP-SGD never uses
    grad_sample_mode: str = "one-pass"


@dataclass
class SequenceTrainReport:
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    epsilon: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    expected_batch_size: int | None = None


def _batches(n: int, batch_size: int, generator: torch.Generator):
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


def _user_groups(users: np.ndarray) -> list[np.ndarray]:
    """Row indices of each user's rows, users in ascending id."""
    order = np.argsort(users, kind="stable")
    _, starts = np.unique(users[order], return_index=True)
    return np.split(order, starts[1:])


def _user_batches(groups: list[np.ndarray], users_per_batch: int, generator: torch.Generator):
    """Batches of every row of ``users_per_batch`` users, the users of each pass in a random order."""
    while True:
        order = torch.randperm(len(groups), generator=generator).tolist()
        for start in range(0, len(order), users_per_batch):
            yield torch.from_numpy(np.concatenate([groups[u] for u in order[start:start + users_per_batch]]))


def train_sequence(model: SequenceRecommender, rows: SequenceRows, cfg: SequenceTrainConfig,
                   row_weights: np.ndarray | None = None, label: str | None = None,
                   on_start: Callable[[], None] | None = None,
                   extra_exclusions: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   canaries: GradientCanaries | None = None) -> SequenceTrainReport:
    """Train ``model`` in place on ``rows``; ``row_weights`` (0/1) marks weight-0 padding rows.
    ``on_start`` runs once the DP machinery is in place, before the first step (a device records the
    session's spend there, so that a failure afterwards can only over-report). ``extra_exclusions``
    (non-private training only) maps a batch's row indices to a (B, num_items) mask of further items to
    leave out of each row's softmax (for example the user's items older than the history window): it
    reads more than the row's own input, so it is refused under DP. ``canaries`` (audits only, DP only)
    appends rows with made-up per-example gradients: they are Poisson-sampled, clipped and noised by the
    same objects as the real rows (as in :func:`common.training.train`)."""
    n = len(rows)
    extra = canaries.count if canaries is not None else 0
    if n == 0 and not cfg.dp:
        raise ValueError("no training rows")
    if extra and not cfg.dp:
        raise ValueError("gradient canaries need DP training (they are injected as per-example gradients)")
    if cfg.dp and model.settings.dropout > 0:
        raise ValueError("dropout under DP: nn.Dropout draws its masks from torch's seeded generator, tied to row "
                         "positions (a removal would change other rows' masks); use dropout 0 with DP")
    if cfg.user_batches < 0 or (cfg.dp and cfg.user_batches):
        raise ValueError(f"user_batches must be 0, or positive without DP (DP batches are Poisson samples of "
                         f"rows), got {cfg.user_batches}")
    if cfg.dp and extra_exclusions is not None:
        raise ValueError("extra_exclusions reads beyond a row's own input: not allowed under DP")
    if cfg.final_learning_rate is not None and not 0.0 <= cfg.final_learning_rate <= cfg.learning_rate:
        raise ValueError(f"final_learning_rate must be in [0, learning_rate], got {cfg.final_learning_rate} with "
                         f"learning_rate {cfg.learning_rate}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {cfg.optimizer!r}")
    items, ratings = torch.from_numpy(rows.items), torch.from_numpy(rows.ratings)
    targets = torch.from_numpy(rows.targets)
    weights = torch.ones(n) if row_weights is None else torch.as_tensor(row_weights, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[cfg.optimizer](params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    report = SequenceTrainReport()
    private: PrivateTraining | None = None
    module: nn.Module = model
    if cfg.dp:
        schedule = PublicSchedule.from_public_size(cfg.public_size or n, cfg.batch_size, cfg.epochs)
        steps = schedule.steps
        sigma = cfg.noise_multiplier
        if sigma is None:
            sigma = cfg.sensitivity * noise_for_epsilon(cfg.target_epsilon, cfg.delta, schedule.sample_rate, steps,
                                                        cfg.accountant)
        private = make_private(model, optimizer, sigma, cfg.max_grad_norm, schedule, cfg.accountant,
                               sensitivity=cfg.sensitivity, grad_sample_mode=cfg.grad_sample_mode)
        module, optimizer = private.module, private.optimizer
        batches = private.batches(n + extra)
        report.noise_multiplier, report.sample_rate = sigma, schedule.sample_rate
        report.expected_batch_size = schedule.expected_batch_size
    elif cfg.user_batches:
        groups = _user_groups(rows.users)
        steps = max(1, int(np.ceil(cfg.epochs * np.ceil(len(groups) / cfg.user_batches))))
        batches = _user_batches(groups, cfg.user_batches, generator)
    else:
        steps = max(1, int(np.ceil(cfg.epochs * n / cfg.batch_size)))
        batches = _batches(n, cfg.batch_size, generator)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    scheduler = None
    if cfg.final_learning_rate is not None:  # a public function of the step count
        scheduler = torch.optim.lr_scheduler.LinearLR(
            optimizer.original_optimizer if private is not None else optimizer, start_factor=1.0,
            end_factor=cfg.final_learning_rate / cfg.learning_rate if cfg.learning_rate > 0 else 1.0,
            total_iters=max(1, steps - 1))
    dropout = model.settings.id_dropout if (model.id_out is not None or model.item_bias is not None) else 0.0
    # Under DP the ID-dropout masks are secret and independent per row (a secure stream from the OS): a
    # removal that shifts the other rows' positions then changes no remaining example's mask distribution,
    # so the accounted sensitivity holds. Masks tied to row positions and known to the server (a seeded
    # generator) would let every shifted row count differently and break it.
    mask_stream = SecureStream() if (cfg.dp and dropout > 0) else None
    model.train()
    start = time.perf_counter()
    try:
        if on_start is not None:
            on_start()
        with progress_bar(label, total=steps) as advance:
            for idx in batches:
                if report.steps >= steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                canary_idx = idx[idx >= n] - n
                idx = idx[idx < n]
                if len(idx) == 0:  # an empty Poisson batch still takes its noise step
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                else:
                    id_mask = None
                    if mask_stream is not None:  # which items' ID terms each row drops
                        keep = mask_stream.bernoulli(1.0 - dropout, len(idx) * model.num_items)
                        id_mask = torch.from_numpy(keep.reshape(len(idx), model.num_items).astype(np.float32))
                    elif dropout > 0:
                        id_mask = (torch.rand(len(idx), model.num_items, generator=generator) >= dropout).float()
                    logits = module(items[idx], ratings[idx], id_mask)
                    if model.settings.exclude_history:  # per row, from its own input only
                        logits = logits.masked_fill(history_mask(items[idx], targets[idx], model.num_items),
                                                    float("-inf"))
                    if extra_exclusions is not None:
                        logits = logits.masked_fill(extra_exclusions(idx), float("-inf"))
                    per_row = nn.functional.cross_entropy(logits, targets[idx], reduction="none")
                    # a padding row's loss is exactly 0 even if its (unused) target is masked out (inf x 0)
                    per_row = torch.where(weights[idx] > 0, per_row, torch.zeros_like(per_row))
                    loss_sum = (per_row * weights[idx]).sum()
                    if private is not None:
                        private.backward(loss_sum, len(idx))
                    else:
                        (loss_sum / len(idx)).backward()
                    report.losses.append(float(loss_sum.detach()) / len(idx))
                if len(canary_idx):  # after the real rows, in whichever form the engine left them
                    for p, made_up in zip(params, canaries.rows(canary_idx, params)):
                        append_rows(p, made_up)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                report.steps += 1
                report.examples += int(weights[idx].sum()) + len(canary_idx)
                advance(1)
        if private is not None:
            report.epsilon = private.epsilon(cfg.delta)
    finally:
        if private is not None:
            private.close()
    report.seconds = time.perf_counter() - start
    model.eval()
    return report
