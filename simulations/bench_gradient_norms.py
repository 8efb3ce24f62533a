"""Per-example gradient norms of the sequence model at initialisation, by tensor: how DP-SGD's joint clip
norm is shared between the item bias, the text layers and the transformer.

    python -m simulations.bench_gradient_norms [--out FILE]

One batch of the published session size (200 rows of the run defaults, seeded choice and seeded
initialisation, the history exclusion on), per-example gradients from the one-pass engine. Prints and
writes the quantiles of the whole per-example norm, each tensor's median per-example norm, and the item
bias's median share of the squared norm. Deterministic: the same figures on every run of one code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from torch import nn

from common.grad_sample import OnePassGradSample, per_example_gradient
from common.io import write_json_atomic
from common.sequence import SequenceRecommender
from simulations.bench_dp_step import session_batch


def measure() -> dict:
    """The norms of one seeded batch at a seeded initialisation."""
    batch = session_batch()
    cfg, rows = batch.cfg, len(batch.targets)
    torch.manual_seed(0)
    model = SequenceRecommender(batch.vectors, batch.settings)
    model.train()
    engine = OnePassGradSample(model)
    try:
        logits = model(batch.items, batch.ratings).masked_fill(batch.exclude, float("-inf"))
        engine.backward(nn.functional.cross_entropy(logits, batch.targets, reduction="none").sum(), rows)
        per_tensor = {name: per_example_gradient(p).reshape(rows, -1).norm(dim=1)
                      for name, p in model.named_parameters()}
    finally:
        engine.close()
    total = torch.stack(list(per_tensor.values()), dim=1).norm(dim=1)
    bias_share = per_tensor["item_bias.bias"] ** 2 / total ** 2
    levels = ("5%", "25%", "50%", "75%", "95%")
    quantiles = torch.quantile(total, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
    return {"benchmark": "per-example-gradient-norms", "rows": rows, "item_bias_scale": cfg["item-bias-scale"],
            "max_grad_norm": cfg["max-grad-norm"],
            "total_norm_quantiles": {q: round(float(v), 4) for q, v in zip(levels, quantiles)},
            "share_of_rows_clipped": round(float((total > cfg["max-grad-norm"]).float().mean()), 4),
            "item_bias_share_of_squared_norm_median": round(float(bias_share.median()), 4),
            "median_norm_by_tensor": {name: round(float(v.median()), 4) for name, v in per_tensor.items()}}


def main(out: Path = Path("results/bench/gradient-norms.json")) -> None:
    """Print and write the per-example gradient norms at initialisation."""
    record = measure()
    write_json_atomic(out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    typer.run(main)
