"""What a resumed run takes over from its run folder, and what it refuses.

Three records, each written before what it covers can be lost: the checkpoint (state, optimiser
moments, round), ``central-dp.json`` (the user-level accountant, written before each noisy
aggregate is used) and ``client-epsilon.json`` (what each node reported spending, written as soon
as its reply is judged). A crash can therefore leave the two privacy records one round ahead of
the checkpoint; they win, so a resumed run can only over-report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from common.errors import DataFormatError
from common.run_config import ConfigError
from server.central_dp import CentralDP
from server.checkpoint import LATEST
from server.run_folder import RunFolder

# Keys whose change would make a resumed run a different experiment may not change; these may
# (a run folder may also be moved and resumed where it now is).
MAY_CHANGE = {"num-server-rounds", "resume", "round-timeout", "eval-every", "evaluate-clients", "output-dir",
              "max-failed-share"}


def check_resume(folder: RunFolder, cfg: dict[str, Any]) -> None:
    """Refuse a new run over an existing folder, a resume without one, and a resume that changes the
    experiment (naming the keys)."""
    exists = folder.config.exists()
    checkpoint = folder.checkpoints / LATEST
    if exists and not cfg["resume"]:
        hint = "set resume=true to continue it" if checkpoint.exists() else (
            "it stopped before its first checkpoint, so it cannot be continued: remove the folder to run it again "
            "under this name")
        raise ConfigError(f"run folder {folder.root} exists: {hint}, or choose another run-name")
    if not cfg["resume"]:
        return
    if not exists:
        raise ConfigError(f"resume=true but {folder.config} does not exist (run-name {cfg['run-name']!r})")
    try:
        old = folder.read_config()
    except DataFormatError as exc:
        raise ConfigError(f"resume: the stored run config cannot be read: {exc}") from None
    changed = sorted(k for k in cfg if k not in MAY_CHANGE and old.get(k) != cfg[k])
    if changed:
        raise ConfigError(f"resume: run config differs from the stored run in {changed}")
    if cfg["server-lr-final-factor"] != 1.0 and old.get("num-server-rounds") != cfg["num-server-rounds"]:
        # the server's learning-rate schedule runs over num-server-rounds: more rounds would raise it again
        raise ConfigError(f"resume: num-server-rounds cannot change ({old.get('num-server-rounds')} to "
                          f"{cfg['num-server-rounds']}) while server-lr-final-factor "
                          f"({cfg['server-lr-final-factor']:g}) makes the server's learning rate fall over them")
    if not checkpoint.exists():
        raise ConfigError(f"resume=true but {checkpoint} does not exist: the run stopped before its first round was "
                          f"checkpointed, so there is nothing to continue from. Remove {folder.root} (its records and "
                          f"simulated ledgers go with it) and run it again, or choose another run-name")


def _larger_of(sources: list[tuple[Any, Path]], valid: Callable[[Any], bool], expected: str) -> dict[str, Any]:
    """Per node, the larger value of several copies of one record (``(record, path)`` pairs): a copy that is
    missing or behind can only raise nothing; a malformed one is a DataFormatError naming its file."""
    out: dict[str, Any] = {}
    for record, path in sources:
        if not isinstance(record, dict):
            raise DataFormatError(path, f"expected a JSON object of node id -> {expected}")
        for node, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
                raise DataFormatError(path, f"node {node}: {value!r}, expected {expected}")
            out[str(node)] = max(out.get(str(node), value), value)
    return out


def restored_spend(folder: RunFolder, checkpoint_meta: dict[str, Any] | None) -> dict[str, float]:
    """Each node's reported epsilon: the larger of the checkpoint's and ``client-epsilon.json``'s."""
    spend = _larger_of([((checkpoint_meta or {}).get("client_epsilon") or {}, folder.checkpoints / "latest.json"),
                        (folder.read_spend() or {}, folder.spend)],
                       lambda eps: 0 <= eps < math.inf, "an epsilon (a finite number >= 0)")
    return {node: float(eps) for node, eps in spend.items()}


def restored_releases(folder: RunFolder, checkpoint_meta: dict[str, Any] | None) -> dict[str, int]:
    """A secure run's count of each node's shares in unmasked sums: the larger of the checkpoint's and
    ``user_releases.json``'s (a missing file cannot lower it)."""
    counts = _larger_of([((checkpoint_meta or {}).get("user_releases") or {}, folder.checkpoints / "latest.json"),
                         (folder.read_node_numbers(folder.user_releases), folder.user_releases)],
                        lambda n: 0 <= n < math.inf and n == int(n), "a release count (an integer >= 0)")
    return {node: int(n) for node, n in counts.items()}


def restored_central(folder: RunFolder, checkpoint_meta: dict[str, Any] | None, fresh: CentralDP) -> CentralDP:
    """The central-DP accountant as of the last release (the record with the most rounds), with the
    mechanism of the run config (a stored one that differs is refused) and the sampling rate of the
    current population (the history keeps the rounds released at the old rate)."""
    stored = []
    if (checkpoint_meta or {}).get("central_dp"):
        stored.append((checkpoint_meta["central_dp"], folder.checkpoints / "latest.json"))
    raw = folder.read_central_dp()
    if raw is not None:
        stored.append((raw, folder.central_dp))
    accountants = []
    for record, path in stored:
        try:
            central = CentralDP.from_json(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(path, f"not a central-DP accountant ({exc}); refusing to continue without it") \
                from None
        if (central.noise_multiplier, central.clip, central.delta) != (fresh.noise_multiplier, fresh.clip,
                                                                       fresh.delta):
            raise DataFormatError(path, f"accountant of noise {central.noise_multiplier}, clip {central.clip}, delta "
                                        f"{central.delta}; the run config says {fresh.noise_multiplier}, "
                                        f"{fresh.clip}, {fresh.delta}")
        accountants.append(central)
    checkpointed = int((checkpoint_meta or {}).get("round", 0))
    restored = max(accountants, key=lambda c: c.rounds) if accountants else fresh
    if restored.rounds < checkpointed:
        # every checkpointed round of a central-DP run released one noisy aggregate: an accountant that
        # covers fewer (missing, or an older copy) would under-report the user-level epsilon
        raise DataFormatError(folder.central_dp, f"the central-DP accountant covers {restored.rounds} round(s), the "
                                                 f"checkpoint {checkpointed}; refusing to continue with fewer")
    if not accountants:
        return fresh
    if restored.population != fresh.population:
        log(WARNING, "resume: %d clients instead of %d; central-DP sampling rate re-derived as %.4g",
            fresh.population, restored.population, fresh.sample_rate)
    restored.population, restored.sample_rate = fresh.population, fresh.sample_rate
    return restored
