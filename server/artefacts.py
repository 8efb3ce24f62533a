"""The run folder ``<output-dir>/<run-id>/``: config, per-round metrics, final state, result, plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataFormatError
from common.results import read_jsonl, write_json_atomic, write_text_atomic


class RunFolder:
    """Paths and writers for one run's artefacts (every file written atomically)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    config = property(lambda self: self.root / "config.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoint")
    clients = property(lambda self: self.root / "clients")
    adapters = property(lambda self: self.root / "adapters.safetensors")
    result = property(lambda self: self.root / "result.json")
    rounds = property(lambda self: self.root / "rounds.jsonl")

    def write_config(self, cfg: dict[str, Any]) -> None:
        write_json_atomic(self.config, cfg)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics)

    def keep_rounds_up_to(self, last_round: int) -> None:
        """On resume, drop records of rounds after the checkpoint (they will be re-run)."""
        for path in (self.metrics, self.rounds):
            rows = read_jsonl(path)
            bad = [k for k, r in enumerate(rows, start=1) if not isinstance(r.get("round"), int)]
            if bad:
                raise DataFormatError(path, "expected an integer 'round' in every record", bad[0])
            if path.exists():
                self._write_lines(path, [r for r in rows if r["round"] <= last_round])

    def append(self, path: Path, *new_rows: dict) -> None:
        """Add rows to a JSONL file (rewritten whole, atomically)."""
        self._write_lines(path, [*read_jsonl(path), *new_rows])

    @staticmethod
    def _write_lines(path: Path, rows: list[dict]) -> None:
        write_text_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))

    def write_final_state(self, names: list[str], arrays: list[np.ndarray], metadata: dict[str, str]) -> None:
        from safetensors.numpy import save_file

        tmp = self.adapters.with_name(self.adapters.name + ".tmp")
        save_file({n: np.ascontiguousarray(a) for n, a in zip(names, arrays)}, str(tmp), metadata=metadata)
        tmp.replace(self.adapters)

    def write_plots(self) -> list[Path]:
        """quality.png (NDCG@10 / HR@10 against rounds) and epsilon.png (privacy spent against rounds)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        quality = (("test_NDCG@10", "server test NDCG@10"), ("test_HR@10", "server test HR@10"),
                   ("federated_NDCG@10", "federated NDCG@10"))
        privacy = (("epsilon_max", "example-level ε, max over clients"),
                   ("epsilon_median", "example-level ε, median over clients"),
                   ("user_epsilon", "user-level ε (central DP)"))
        out = [self._plot(rows, quality, "metric", "Quality of the global model", "quality.png", ""),
               self._plot(rows, privacy, "epsilon", "Privacy spent", "epsilon.png", "no DP in this run")]
        plt.close("all")
        return out

    def _plot(self, rows: list[dict], series, ylabel: str, title: str, name: str, empty_note: str) -> Path:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series:
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        elif empty_note:
            ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
        return self._save(fig, name)

    def _save(self, fig, name: str) -> Path:
        path = self.root / name
        tmp = path.with_name(f".{name}.tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        tmp.replace(path)
        return path
