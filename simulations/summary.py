"""Aggregate PROTOCOL result records into table rows (mean ± std over seeds)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (FileNotFoundError naming it when absent)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validation_curve(rows: list[dict]) -> list[list[float]]:
    """[[round, validation NDCG@10], ...] of a run's metrics rows: what settings are chosen on."""
    return [[r["round"], r["val_NDCG@10"]] for r in rows if "val_NDCG@10" in r]


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def _privacy(p: dict) -> str:
    if p.get("unit") == "none":
        return "none"
    return f"{p['unit']} ε={p['epsilon']:.2f} δ={p['delta']:g}"


def summarise(results: list[dict]) -> list[tuple[str, ...]]:
    """One row per method: seeds, test metrics, validation NDCG@10, cold-start metrics."""
    by: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by[r["method"]][r["split"]].append(r)
    rows = []
    for method, splits in by.items():
        test = splits.get("test", [])
        val = splits.get("validation", [])
        cold = splits.get("test-cold-start", [])
        priv = _privacy(test[0]["privacy"]) if test else "-"
        rows.append((method, priv, str(len(test)),
                     *(_fmt([r["metrics"][k] for r in test]) for k in ("HR@10", "NDCG@10", "MRR@10", "HR@20")),
                     _fmt([r["metrics"]["NDCG@10"] for r in val]),
                     _fmt([r["metrics"]["HR@10"] for r in cold]), _fmt([r["metrics"]["NDCG@10"] for r in cold])))
    return rows


def mean_metric(results: list[dict], method: str, split: str, key: str) -> float:
    vals = [r["metrics"][key] for r in results if r["method"] == method and r["split"] == split]
    return float(np.mean(vals)) if vals else float("nan")


# BPR measured with RecBole 1.2.1 on exactly this split (issue 2).
BPR_TEST = {"NDCG@10": 0.0622, "HR@10": 0.1251}


def target_lines(results: list[dict]) -> list[str]:
    """Plain statements comparing the central methods with the BPR reference."""
    lines = []
    for method in ("central", "central-dp"):
        seeds = sum(1 for r in results if r["method"] == method and r["split"] == "test")
        if not seeds:
            continue
        for key, ref in BPR_TEST.items():
            value = mean_metric(results, method, "test", key)
            verdict = "meets" if value >= ref else f"misses by {ref - value:.4f}"
            lines.append(f"{method}: test {key} {value:.4f} (mean of {seeds} seed(s)) vs BPR {ref:.4f}: {verdict}")
    return lines
