"""The replies a device has released, kept so that a repeated request gets the same bytes again.

A server that crashes after some devices answered a round asks them again when it resumes. A
device whose ledger already holds that (run, round, kind) answers with the reply it released then:
sending an already released output again reveals nothing new and costs no privacy, where training
again would spend a second session (at a one-session budget: a refusal, and the round's work
lost). The reply is kept (atomically, 0600) *before* it is returned. Only a kept reply is ever
sent again: a recorded session whose reply is not kept (the device stopped before it finished, or
the reply was dropped as old) is never run again under that record; a request for it is a new
release, planned and charged as one. So a server that cycles round numbers gains nothing.

Files: ``<ledger folder>/released/<client>-<kind>-<run digest>-<round>.safetensors``; the newest
:data:`KEEP` per client and kind are kept.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from common.errors import DataFormatError
from common.io import load_tensors, make_private_dir, save_tensors

KEEP = 3


class ReleasedReplies:
    """One client's kept replies in its ledger folder."""

    def __init__(self, ledger_dir: str | Path, client_id: str) -> None:
        self.folder = Path(ledger_dir) / "released"
        self.client_id = client_id

    def _path(self, kind: str, run_id: str, server_round: int) -> Path:
        digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:16]
        return self.folder / f"{self.client_id}-{kind}-{digest}-{int(server_round):06d}.safetensors"

    def load(self, kind: str, run_id: str, server_round: int) -> tuple[list[str], list[np.ndarray],
                                                                       dict[str, float]] | None:
        """(names, arrays, metrics) of the reply released for this request, or None."""
        path = self._path(kind, run_id, server_round)
        if not path.is_file():
            return None
        tensors, meta = load_tensors(path)
        try:
            names = json.loads(meta["names"])
            metrics = {str(k): float(v) for k, v in json.loads(meta["metrics"]).items()}
            if meta.get("run_id") != run_id or int(meta["round"]) != int(server_round):
                raise ValueError("it was kept for another request")
            return names, [tensors[n] for n in names], metrics
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(path, f"unreadable kept reply ({exc})") from None

    def save(self, kind: str, run_id: str, server_round: int, names: list[str], arrays: list[np.ndarray],
             metrics: dict[str, float]) -> Path:
        """Keep a reply before it is released; drop this client's older kept replies of ``kind``."""
        make_private_dir(self.folder)
        path = self._path(kind, run_id, server_round)
        meta = {"names": json.dumps(names), "metrics": json.dumps(metrics), "run_id": run_id,
                "round": str(int(server_round))}
        save_tensors(path, dict(zip(names, arrays)), meta, private=True)
        mine = sorted(self.folder.glob(f"{self.client_id}-{kind}-*.safetensors"), key=lambda p: p.stat().st_mtime)
        for old in mine[:-KEEP]:
            old.unlink(missing_ok=True)
        return path
