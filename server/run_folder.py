"""The run folder ``<output-dir>/<run-id>/``: one schema for what a run writes and what the audit and
the benchmarks read back.

| file | written by | content |
|---|---|---|
| ``config.json`` | start of the run | the resolved run config, run id and library versions |
| ``metrics.jsonl`` | every round | counts, epsilons, bytes; evaluation metrics when evaluated; round 0: the training-free references (``ref_*``) |
| ``rounds.jsonl`` | every round | who was sampled, trained, refused, rejected (with reasons) or failed |
| ``wire.jsonl`` | every round, with ``wire-log`` | the structure and non-tensor values of each reply |
| ``central-dp.json`` | before each central-DP release is used | the user-level accountant |
| ``client-epsilon.json`` | as soon as a round's replies are judged | each node's reported epsilon |
| ``checkpoint/`` | every round | state, optimiser moments, per-node epsilon (``server.checkpoint``) |
| ``clients/`` | the simulated clients | their ledgers (``common.ledger``), unless ``ledger-dir`` is set |
| ``adapters.safetensors``, ``result.json``, ``quality.png``, ``epsilon.png`` | the end of the run | |
| ``run.lock`` | held for the whole run | nothing: its ``flock`` keeps a second run out of the folder |

Every file is written atomically (:mod:`common.io`); every read names the file and line of a defect.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, DataFormatError
from common.io import (hold_lock, read_json, read_jsonl, save_tensors, write_bytes_atomic, write_json_atomic,
                       write_jsonl)
from common.run_config import stored_config
from server.checkpoint import LATEST
from server.plots import png_bytes, privacy_figure, quality_figure


class RunFolder:
    """Paths, writers and readers of one run's files."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise DataFormatError(self.root, "not a folder (expected a privrec run folder)")
        self._lock: int | None = None

    def lock(self) -> None:
        """Hold the folder's exclusive lock until :meth:`unlock` (or the process ends); a ConfigError
        when another run holds it: two runs in one folder would write every round twice."""
        fd = hold_lock(self.root / "run.lock")
        if fd is None:
            raise ConfigError(f"run folder {self.root} is in use by another privrec run (it holds "
                              f"{self.root / 'run.lock'}); wait for that run to end, or choose another run-name")
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    config = property(lambda self: self.root / "config.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    rounds = property(lambda self: self.root / "rounds.jsonl")
    wire = property(lambda self: self.root / "wire.jsonl")
    central_dp = property(lambda self: self.root / "central-dp.json")
    spend = property(lambda self: self.root / "client-epsilon.json")
    user_releases = property(lambda self: self.root / "user_releases.json")  # secure runs: shares unmasked per node
    user_spend = property(lambda self: self.root / "user-epsilon.json")  # secure runs: what each node reported
    checkpoints = property(lambda self: self.root / "checkpoint")
    clients = property(lambda self: self.root / "clients")
    adapters = property(lambda self: self.root / "adapters.safetensors")
    result = property(lambda self: self.root / "result.json")

    # -- writing -------------------------------------------------------------------------------
    def write_config(self, cfg: dict[str, Any]) -> None:
        write_json_atomic(self.config, cfg)

    def append(self, path: Path, *new_rows: dict) -> None:
        """Add rows to a JSONL file (rewritten whole, atomically: the files hold one row per round)."""
        write_jsonl(path, [*read_jsonl(path), *new_rows])

    def keep_rounds_up_to(self, last_round: int) -> None:
        """On resume, drop records of rounds after the checkpoint (they will be re-run)."""
        for path in (self.metrics, self.rounds, self.wire):
            rows = read_jsonl(path)
            bad = [k for k, r in enumerate(rows, start=1) if not isinstance(r.get("round"), int)]
            if bad:
                raise DataFormatError(path, "expected an integer 'round' in every record", bad[0])
            if path.exists():
                write_jsonl(path, [r for r in rows if r["round"] <= last_round])

    def write_result(self, result: dict[str, Any]) -> None:
        write_json_atomic(self.result, result, strict=True)

    def write_final_state(self, names: list[str], arrays: list[np.ndarray], metadata: dict[str, str]) -> None:
        save_tensors(self.adapters, dict(zip(names, arrays)), metadata)

    def write_plots(self) -> list[Path]:
        """quality.png (NDCG@10 / HR@10 against rounds) and epsilon.png (privacy spent against rounds)."""
        rows = self.read_metrics()
        return [write_bytes_atomic(self.root / name, png_bytes(figure(rows)))
                for name, figure in (("quality.png", quality_figure), ("epsilon.png", privacy_figure))]

    # -- reading -------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """The stored config, with every key a run of an older privrec lacks filled in
        (:func:`common.run_config.stored_config`)."""
        raw = read_json(self.config)
        if not isinstance(raw, dict):
            raise DataFormatError(self.config, f"holds {type(raw).__name__}, expected a JSON object")
        return stored_config(raw)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics)

    def read_rounds(self) -> list[dict]:
        """rounds.jsonl, each row checked: an integer round and lists of integer node ids."""
        rows = read_jsonl(self.rounds)
        for number, row in enumerate(rows, start=1):
            ids = [row.get(k, []) for k in ("sampled", "trained", "refused", "rejected", "failed", "evaluated",
                                            "evaluation_released")]
            if not isinstance(row.get("round"), int) or not all(
                    isinstance(x, list) and all(isinstance(n, int) for n in x) for x in ids):
                raise DataFormatError(self.rounds, "expected an integer 'round' and lists of integer node ids",
                                      number)
        return rows

    def read_wire(self) -> list[dict]:
        return read_jsonl(self.wire)

    def read_result(self) -> dict[str, Any] | None:
        return read_json(self.result) if self.result.exists() else None

    def read_checkpoint_meta(self) -> dict[str, Any] | None:
        path = self.checkpoints / LATEST
        return read_json(path) if path.exists() else None

    def read_central_dp(self) -> dict[str, Any] | None:
        return read_json(self.central_dp) if self.central_dp.exists() else None

    def read_node_numbers(self, path: Path) -> dict[str, float]:
        """A secure run's per-node record (``user_releases`` counts, ``user_spend`` epsilons): node id ->
        a finite number >= 0; empty when absent; anything else is a DataFormatError naming the file."""
        if not path.exists():
            return {}
        raw = read_json(path)
        if not isinstance(raw, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in raw.values()):
            raise DataFormatError(path, "expected a JSON object of node id -> a finite number >= 0")
        return {str(k): v for k, v in raw.items()}

    def read_spend(self) -> dict[str, Any] | None:
        return read_json(self.spend) if self.spend.exists() else None
