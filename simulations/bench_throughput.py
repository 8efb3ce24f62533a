"""Benchmark: training throughput (examples/second) with and without DP-SGD on the same data and batch.

    python -m simulations.bench_throughput [--user-model sequence|text]

Both runs use the same inputs (the text model: cached frozen-layer features; the sequence model:
(history, next item) rows of the published defaults, 50 items of history), the same model
configuration, batch size and number of steps; the DP run adds Opacus per-sample gradients,
clipping, noise and Poisson sampling. Prints what it measured and writes a JSON record.
"""

from __future__ import annotations

import json
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import typer

from common.encoder import TextEncoder, load_tokenizer
from common.examples import training_examples
from common.features import compute_features
from common.io import write_json_atomic
from common.model import Recommender
from common.movielens import load_recbole
from common.privacy import GRAD_SAMPLE_MODES
from common.split import leave_one_out
from common.training import train
from simulations.baselines import BaselineConfig


def measure(examples: int = 4096, batch_size: int = 64, epochs: float = 1.0, id_residual: bool = False,
            repeats: int = 2, out: Path | None = None) -> dict:
    """Time the non-DP and DP loops on identical inputs; return examples/second and the ratio."""
    cfg = BaselineConfig()
    data = load_recbole()
    split = leave_one_out(data)
    ex = training_examples(split, cfg.history_len, cfg.examples_per_user)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(ex.targets), size=min(examples, len(ex.targets)), replace=False))
    tokenizer = load_tokenizer()
    encoder = TextEncoder(cfg.lora)
    feats = compute_features(encoder, tokenizer, [ex.texts[i] for i in pick], cfg.max_length, label="features")
    item_feats = compute_features(encoder, tokenizer, data.item_texts(), cfg.item_max_length)
    targets = ex.targets[pick]
    base = replace(cfg.train, epochs=epochs, batch_size=batch_size, seed=0)
    timings: dict[str, list[float]] = {"non_dp": [], "dp": []}
    epsilon = None
    for r in range(repeats):  # alternate so machine load affects both alike
        for mode in ("non_dp", "dp"):
            torch.manual_seed(r)
            model = Recommender(TextEncoder(cfg.lora), data.num_items, scale=cfg.scale,
                                item_bias=True, id_residual=id_residual)
            tcfg = replace(base, dp=(mode == "dp"), target_epsilon=8.0, delta=1e-5)
            rep = train(model, feats, targets, item_feats, tcfg, label=f"{mode} run {r + 1}")
            timings[mode].append(rep.examples / rep.seconds)
            if mode == "dp":
                epsilon = rep.epsilon
    return _record(timings, epsilon, out, examples=int(len(pick)), batch_size=batch_size, epochs=epochs,
                   id_residual=id_residual, repeats=repeats,
                   note="loop time on cached frozen-layer features; catalogue refreshes included in both")


def _record(timings: dict[str, list[float]], epsilon: float | None, out: Path | None, **fields) -> dict:
    """The benchmark's record (medians, every run, the DP/non-DP time ratio), written to ``out`` if given."""
    non_dp, dp = float(np.median(timings["non_dp"])), float(np.median(timings["dp"]))
    record = {"benchmark": "training-throughput", **fields,
              "examples_per_second": {"non_dp": round(non_dp, 1), "dp": round(dp, 1)},
              "all_runs": {k: [round(v, 1) for v in vs] for k, vs in timings.items()},
              "dp_time_ratio": round(non_dp / dp, 3), "dp_epsilon": epsilon,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    if out is not None:
        write_json_atomic(out, record)
    return record


def measure_sequence(examples: int = 4096, batch_size: int = 0, epochs: float = 1.0, repeats: int = 2,
                     out: Path | None = None, grad_sample_mode: str = "one-pass") -> dict:
    """The same comparison for the sequence model at the run defaults (SGD, as a device session); batch
    size 0: the published session batch (``batch-size``); ``grad_sample_mode``: the DP run's per-example
    gradient engine (``common.privacy.GRAD_SAMPLE_MODES``)."""
    from common.run_config import resolve
    from common.sequence import SequenceRecommender, training_rows
    from common.sequence_runtime import item_text_vectors, sequence_settings
    from common.sequence_training import SequenceTrainConfig, train_sequence

    cfg = resolve({})
    batch_size = batch_size or cfg["batch-size"]
    settings = sequence_settings(cfg)
    data = load_recbole()
    split = leave_one_out(data)
    rows = training_rows(split, settings.history_len, cfg["examples-per-user"])
    pick = np.sort(np.random.default_rng(0).choice(len(rows), size=min(examples, len(rows)), replace=False))
    rows = type(rows)(*(getattr(rows, f)[pick] for f in ("items", "ratings", "targets", "users")))
    vectors = item_text_vectors(data, cfg["item-max-length"])
    timings: dict[str, list[float]] = {"non_dp": [], "dp": []}
    epsilon = None
    for r in range(repeats):
        for mode in ("non_dp", "dp"):
            torch.manual_seed(r)
            model = SequenceRecommender(vectors, settings)
            tcfg = SequenceTrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=cfg["learning-rate"],
                                       optimizer=cfg["local-optimizer"], seed=r, dp=(mode == "dp"),
                                       target_epsilon=8.0, delta=1e-5, max_grad_norm=cfg["max-grad-norm"],
                                       grad_sample_mode=grad_sample_mode)
            rep = train_sequence(model, rows, tcfg, label=f"{mode} run {r + 1}")
            timings[mode].append(rep.examples / rep.seconds)
            if mode == "dp":
                epsilon = rep.epsilon
    return _record(timings, epsilon, out, user_model="sequence", examples=int(len(pick)), batch_size=batch_size,
                   epochs=epochs, repeats=repeats, grad_sample_mode=grad_sample_mode,
                   note="loop time on (history, next item) rows of 50 items of history, sequence model at the run "
                        "defaults")


def main(examples: int = 4096, batch_size: int = 0, epochs: float = 1.0, id_residual: bool = False,
         repeats: int = 2, user_model: str = "sequence", out: Path = Path("results/bench/throughput.json"),
         grad_sample_mode: str = "one-pass") -> None:
    """Print non-DP and DP examples/second and the DP/non-DP time ratio (target <= 1.15); batch size 0:
    the model's usual one (the published session batch for the sequence model; 64 for the text model);
    --grad-sample-mode (sequence model): one-pass (the default) or hooks (Opacus' GradSampleModule)."""
    if user_model == "sequence":
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise typer.BadParameter(f"--grad-sample-mode {grad_sample_mode!r}: expected one of {GRAD_SAMPLE_MODES}")
        rec = measure_sequence(examples, batch_size, epochs, repeats, out, grad_sample_mode)
    elif user_model == "text":
        rec = measure(examples, batch_size or 64, epochs, id_residual, repeats, out)
    else:
        raise typer.BadParameter(f"--user-model {user_model!r}: expected sequence or text")
    print(json.dumps(rec, indent=2))
    verdict = "meets" if rec["dp_time_ratio"] <= 1.15 else "MISSES"
    print(f"DP/non-DP time ratio {rec['dp_time_ratio']:.3f} ({verdict} the 1.15 target)")


if __name__ == "__main__":
    typer.run(main)
