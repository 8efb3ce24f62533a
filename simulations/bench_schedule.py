"""Schedule probes of the federated default: does another schedule at the same privacy (or without
privacy) lift its quality?

    python -m simulations.bench_schedule NAME [--seed 0] [--out DIR]

Each probe is one run of the product's server and ClientApp functions for all 943 users in one
process (:func:`simulations.bench_privacy_utility.run_point`), the published defaults plus the
probe's overrides (:data:`PROBES`). A probe with ``epsilon`` solves the noise so that a device's
whole schedule costs that epsilon (its budget allows exactly that); ``no-dp`` probes turn local DP
off on devices whose policy allows it (no guarantee: they show the schedule's ceiling). Printed and
written to ``--out/NAME-seedS.json``: the validation NDCG@10 at each evaluation, the test figures
of the last round (read after any choice) and the epsilon the ledgers hold.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from common.io import write_json_atomic
from common.run_config import resolve
from simulations.summary import read_metrics, validation_curve

OUT = Path(__file__).parent / "results" / "federated-sequence" / "schedule"
NO_DP = ({"local-dp": False}, {"privacy-local-dp": False})

# name -> (run-config overrides, node config, (example-level epsilon, sessions per device) the noise is solved
# for, or None).
# Every probe ran with the full training softmax, the default until sequence-exclude-history became true;
# AS_RAN keeps them rerunning as they ran.
AS_RAN = {"sequence-exclude-history": False}
PROBES: dict[str, tuple[dict, dict, tuple[float, int] | None]] = {
    "default": (AS_RAN, {}, None),  # the default of its time again: how far two runs of one seed differ
    "clients-10": ({**AS_RAN, "clients-per-round": 10, "num-server-rounds": 96, "eval-every": 24}, {}, None),
    "clients-5": ({**AS_RAN, "clients-per-round": 5, "num-server-rounds": 192, "eval-every": 48}, {}, None),
    "local-steps-4": ({**AS_RAN, "local-epochs": 4.0}, {}, (7.97, 1)),
    "no-dp-sessions-4": ({**AS_RAN, "num-server-rounds": 192, "eval-every": 48, **NO_DP[0]}, NO_DP[1], None),
    "no-dp-local-steps-4": ({**AS_RAN, "local-epochs": 4.0, **NO_DP[0]}, NO_DP[1], None),
    # the default of its time with each row's own history items out of its training softmax (same epsilon)
    "exclude-history": ({"sequence-exclude-history": True}, {}, None),
    # FedAdam's rate falling linearly to 0 over the run (server-lr-final-factor), with more sessions per user
    "no-dp-sessions-4-decay": ({**AS_RAN, "num-server-rounds": 192, "eval-every": 48, "server-lr-final-factor": 0.0,
                                **NO_DP[0]}, NO_DP[1], None),
    "no-dp-wide-sessions-4-decay": ({"num-server-rounds": 192, "eval-every": 48, "server-lr-final-factor": 0.0,
                                     "sequence-dim": 64, "sequence-exclude-history": True, **NO_DP[0]},
                                    NO_DP[1], None),
    # Four passes over the users at the same per-client epsilon (noise solved for four sessions), and without
    # DP with the plain mean (the trimmed mean drops the extreme values that carry the signal without noise)
    # at FedAdam's rate and at a third of it.
    "sessions-4": ({**AS_RAN, "num-server-rounds": 192, "eval-every": 48}, {}, (7.97, 4)),
    "no-dp-sessions-4-mean": ({**AS_RAN, "num-server-rounds": 192, "eval-every": 48, "aggregator": "mean",
                               **NO_DP[0]}, NO_DP[1], None),
    "no-dp-sessions-4-mean-slow": ({**AS_RAN, "num-server-rounds": 192, "eval-every": 24, "aggregator": "mean",
                                    "server-learning-rate": 0.003, **NO_DP[0]}, NO_DP[1], None),
    # The default since 2026-12-07 (history exclusion) with another aggregator: the plain mean, and the trimmed
    # mean dropping one value of twenty at each end instead of two (issue 19's quality part compares them).
    "aggregator-mean": ({"aggregator": "mean"}, {}, None),
    "trim-0.05": ({"trim-fraction": 0.05}, {}, None),
    # The item bias's share of the joint clip norm (item-bias-scale, chosen for the text model and carried over):
    # at 10 the bias holds about 82% of a sequence-model example's squared gradient norm at initialisation
    # (norm about 10 of 11; simulations/bench_gradient_norms.py), leaving the transformer and the text layers a
    # small share of each clipped example.
    "bias-scale-3": ({"item-bias-scale": 3.0}, {}, None),
    "bias-scale-1": ({"item-bias-scale": 1.0}, {}, None),
    "bias-scale-30": ({"item-bias-scale": 30.0}, {}, None),
}


def probe_config(name: str) -> tuple[dict, dict]:
    """(run-config overrides, node config) of probe ``name``, the noise solved where it asks."""
    if name not in PROBES:
        raise typer.BadParameter(f"probe {name!r}: expected one of {sorted(PROBES)}")
    overrides, node_config, budget = PROBES[name]
    overrides = dict(overrides)
    if budget is not None:
        from simulations.bench_privacy_utility import noise_for

        epsilon, sessions = budget
        overrides["noise-multiplier"] = noise_for(epsilon, resolve(overrides), sessions)
        overrides["client-epsilon-budget"] = epsilon
    return overrides, node_config


def main(name: str = typer.Argument(..., help=f"one of {', '.join(PROBES)}"), seed: int = typer.Option(0),
         out: Path = typer.Option(OUT), work: Path = typer.Option(Path("runs") / "schedule",
                                                                  help="run folders (not kept)")) -> None:
    """Run one probe and write its record."""
    from simulations.bench_privacy_utility import run_point

    overrides, node_config = probe_config(name)
    t0 = time.perf_counter()
    result = run_point(name, overrides, node_config, seed, work)
    rows = read_metrics(work / f"{name}-seed{seed}" / "metrics.jsonl")
    record = {"probe": name, "seed": seed, "overrides": overrides, "node_config": node_config,
              "validation_NDCG@10": validation_curve(rows),
              "test": result["metrics"], "epsilon": result["privacy"].get("epsilon"),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(out / f"{name}-seed{seed}.json", record)
    print(json.dumps(record))


if __name__ == "__main__":
    typer.run(main)
