"""Benchmark: where a DP-SGD step of the sequence model spends its time, against a plain step.

    python -m simulations.bench_dp_step [--steps 70] [--warmup 10] [--out FILE]

One batch of the published session size (200 rows of the run defaults' 50-item histories, the history
exclusion on) goes through three set-ups built from the same initial weights: a plain SGD step, DP-SGD
with Opacus' hooks (``GradSampleModule``), and DP-SGD with the one-pass engine (the default). Their
steps are interleaved, so machine load touches all three alike, and the forward pass, the backward pass
(per-example gradients under DP) and the optimizer step (clipping, the secure noise and the update
under DP) are timed separately. Prints and writes the medians in milliseconds and each set-up's total
against the plain step. The noise multiplier and clip do not change the work; 1.0 each.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from common.io import write_json_atomic
from common.movielens import load_recbole
from common.privacy import GRAD_SAMPLE_MODES, PublicSchedule, make_private
from common.run_config import resolve
from common.sequence import SequenceRecommender, SequenceSettings, history_mask, training_rows
from common.sequence_runtime import item_text_vectors, sequence_settings
from common.split import leave_one_out

SETUPS = ("plain", *GRAD_SAMPLE_MODES)


@dataclass
class SessionBatch:
    """The run defaults, the model's settings and item vectors, and one seeded batch of the published session
    size (its rows' history masks included)."""

    cfg: dict
    settings: SequenceSettings
    vectors: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    targets: torch.Tensor
    exclude: torch.Tensor


def session_batch() -> SessionBatch:
    """200 rows (the published session) of the run defaults, chosen by a seeded draw."""
    cfg = resolve({})
    settings = sequence_settings(cfg)
    data = load_recbole()
    rows = training_rows(leave_one_out(data), settings.history_len, cfg["examples-per-user"])
    pick = np.sort(np.random.default_rng(0).choice(len(rows), size=cfg["batch-size"], replace=False))
    items, ratings, targets = (torch.from_numpy(getattr(rows, f)[pick]) for f in ("items", "ratings", "targets"))
    return SessionBatch(cfg, settings, item_text_vectors(data, cfg["item-max-length"]), items, ratings, targets,
                        history_mask(items, targets, data.num_items))


def measure(steps: int = 70, warmup: int = 10) -> dict:
    """Median forward, backward, optimizer-step and total milliseconds of each set-up."""
    batch = session_batch()
    cfg, settings, vectors = batch.cfg, batch.settings, batch.vectors
    items, ratings, targets, exclude = batch.items, batch.ratings, batch.targets, batch.exclude
    rows = len(targets)
    runs = {}
    for name in SETUPS:
        torch.manual_seed(0)
        model = SequenceRecommender(vectors, settings)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["learning-rate"])
        private = None
        if name != "plain":
            schedule = PublicSchedule.from_public_size(rows, rows, 1.0)
            private = make_private(model, optimizer, 1.0, 1.0, schedule, "rdp", grad_sample_mode=name)
            optimizer = private.optimizer
        model.train()
        runs[name] = {"model": private.module if private else model, "optimizer": optimizer, "private": private,
                      "times": {"forward": [], "backward": [], "step": [], "total": []}}
    try:
        for step in range(warmup + steps):
            for name in SETUPS:
                run = runs[name]
                run["optimizer"].zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                logits = run["model"](items, ratings).masked_fill(exclude, float("-inf"))
                loss_sum = nn.functional.cross_entropy(logits, targets, reduction="none").sum()
                t1 = time.perf_counter()
                if run["private"] is not None:
                    run["private"].backward(loss_sum, rows)
                else:
                    (loss_sum / rows).backward()
                t2 = time.perf_counter()
                run["optimizer"].step()
                t3 = time.perf_counter()
                if step >= warmup:
                    phases = {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2, "total": t3 - t0}
                    for key, value in phases.items():
                        run["times"][key].append(value)
    finally:
        for run in runs.values():
            if run["private"] is not None:
                run["private"].close()
    medians = {name: {k: round(1e3 * statistics.median(v), 2) for k, v in runs[name]["times"].items()}
               for name in SETUPS}
    return {"benchmark": "dp-step-phases", "batch_rows": rows, "steps": steps, "warmup": warmup,
            "milliseconds_median": medians,
            "total_against_plain": {name: round(medians[name]["total"] / medians["plain"]["total"], 3)
                                    for name in SETUPS},
            "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}


def main(steps: int = 70, warmup: int = 10, out: Path = Path("results/bench/dp-step.json")) -> None:
    """Print the median phase times of a plain, an Opacus-hooks and a one-pass DP-SGD step."""
    record = measure(steps, warmup)
    write_json_atomic(out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    typer.run(main)
