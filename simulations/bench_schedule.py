"""Schedule probes of the federated default: does another schedule at the same privacy (or without
privacy) lift its quality?

    python -m simulations.bench_schedule NAME [--seed 0] [--out DIR]

Each probe is one run of the product's server and ClientApp functions for all 943 users in one
process (:func:`simulations.bench_privacy_utility.run_point`), the published defaults plus the
probe's overrides (:data:`PROBES`). A probe with ``epsilon`` solves the noise so that a device's
whole schedule costs that epsilon (its budget allows exactly that); ``no-dp`` probes turn local DP
off on devices whose policy allows it (no guarantee: they show the schedule's ceiling). The
``oracle-popularity-*`` names (:data:`ORACLES`) run the default from a non-private starting point, an
item bias set from exact training counts: diagnostics, never product settings. The :data:`SERVER_TAU`
names run another probe with FedAdam's tau changed for the run (the product keeps Flower's 1e-3). The
:data:`AVERAGED` names run another probe and also evaluate averages of the server's global models over its rounds
(post-processing of what the server holds anyway: no privacy cost). Printed and
written to ``--out/NAME-seedS.json``: the validation NDCG@10 at each evaluation, the test figures
of the last round (read after any choice) and the epsilon the ledgers hold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
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
    # FedAdam's rate falling linearly to 0 over the default's single pass (server-lr-final-factor=0), from its
    # rate and from twice it: the learning rate falling to 0 lifted the central model
    # (simulations/results/sequence/).
    "lr-decay": ({"server-lr-final-factor": 0.0}, {}, None),
    "lr-0.02-decay": ({"server-learning-rate": 0.02, "server-lr-final-factor": 0.0}, {}, None),
    # Both fell below the default, the higher start less: a constant rate above the default's 0.01.
    "lr-0.015": ({"server-learning-rate": 0.015}, {}, None),
    "lr-0.02": ({"server-learning-rate": 0.02}, {}, None),
    "default-now": ({}, {}, None),  # the published default as it is (what the tau probe changes one thing of)
    "no-dp-now": (NO_DP[0], NO_DP[1], None),  # the same without DP: the privacy-utility curve's no-DP point
    # Fewer exchanged values under the same noise: no transformer block (the user vector is then the query's alone,
    # the text prior carrying the history) and half the width. Both were above the first sequence defaults of
    # their time (0.0431 and 0.0460 against 0.0418, seed 0) and never tried at the present ones.
    "layers-0": ({"sequence-layers": 0}, {}, None),
    "dim-16": ({"sequence-dim": 16}, {}, None),
}

# Non-private oracles (diagnostics, never a product setting): the default with its first global model's item
# bias set to alpha x log(1 + the item's exact training count), trained on or held fixed ("frozen": no longer
# trained or exchanged). They bound what a DP release of item counts could give training as a starting point.
# name -> (alpha, frozen)
ORACLES: dict[str, tuple[float, bool]] = {
    "oracle-popularity-0.5": (0.5, False), "oracle-popularity-1": (1.0, False),
    "oracle-popularity-0.5-frozen": (0.5, True), "oracle-popularity-1-frozen": (1.0, True),
    "oracle-popularity-1.5-frozen": (1.5, True), "oracle-popularity-2-frozen": (2.0, True),
}


# FedAdam's tau (Flower's default 1e-3, in the denominator of every coordinate's step: sqrt(v) + tau) against a
# tau that leaves the step Adam's (1e-8): without DP over four passes, at the default, and at the default
# without DP. name -> (probe whose config it runs, tau).
SERVER_TAU: dict[str, tuple[str, float]] = {
    "no-dp-sessions-4-mean-tau-1e-8": ("no-dp-sessions-4-mean", 1e-8),
    "tau-1e-8": ("default-now", 1e-8),
    "no-dp-tau-1e-8": ("no-dp-now", 1e-8),
}


# Averages of the server's iterates, evaluated beside the run's own last global model (the same training, so the
# comparison is paired): exponential moving averages with each decay (started at the first round's model) and
# the uniform mean of the last TAIL_ROUNDS global models. name -> the probe whose config it runs.
AVERAGED: dict[str, str] = {"default-now-averaged": "default-now"}
EMA_DECAYS = (0.8, 0.9, 0.95)
TAIL_ROUNDS = 16


class IterateAverages:
    """Averages of a run's successive global models: an exponential moving average for each decay in
    :data:`EMA_DECAYS` (started at the first model it is given) and the uniform mean of the last
    :data:`TAIL_ROUNDS`."""

    def __init__(self) -> None:
        self.ema: dict[float, list[np.ndarray]] = {}
        self.tail: list[list[np.ndarray]] = []

    def update(self, arrays: list[np.ndarray]) -> None:
        """Take the next global model into every average."""
        for decay in EMA_DECAYS:
            old = self.ema.get(decay)
            self.ema[decay] = [a.copy() for a in arrays] if old is None else \
                [(decay * o + (1.0 - decay) * a).astype(a.dtype) for o, a in zip(old, arrays)]
        self.tail = (self.tail + [[a.copy() for a in arrays]])[-TAIL_ROUNDS:]

    def models(self) -> dict[str, list[np.ndarray]]:
        """label -> the averaged model, in the run's tensor order."""
        out = {f"ema-{d:g}": arrays for d, arrays in self.ema.items()}
        if self.tail:
            out[f"tail-{TAIL_ROUNDS}"] = [np.mean(np.stack(group), axis=0).astype(group[0].dtype)
                                          for group in zip(*self.tail)]
        return out


@contextmanager
def iterate_averages(sink: dict) -> Iterator[None]:
    """While active, a run's server keeps :class:`IterateAverages` of the global models its rounds make and,
    before finishing, writes each average's validation and test figures into ``sink``."""
    from server.federation import Federation

    apply, finish = Federation._apply, Federation._finish

    def averaging_apply(self, rnd, mean):
        changed = apply(self, rnd, mean)
        self.__dict__.setdefault("_averages", IterateAverages()).update(self.arrays)
        return changed

    def averaging_finish(self):
        averages = self.__dict__.get("_averages")
        if averages is not None:
            for label, arrays in averages.models().items():
                figures = self.evaluator.evaluate(self.names, arrays)
                sink[label] = {"validation_NDCG@10": figures["validation"]["NDCG@10"],
                               "test_NDCG@10": figures["test"]["NDCG@10"], "test_HR@10": figures["test"]["HR@10"]}
            self.evaluator.evaluate(self.names, self.arrays)  # leave the runtime holding the run's own model
        return finish(self)

    Federation._apply, Federation._finish = averaging_apply, averaging_finish
    try:
        yield
    finally:
        Federation._apply, Federation._finish = apply, finish


@contextmanager
def server_tau(tau: float) -> Iterator[None]:
    """While active, the server's FedAdam step uses ``tau`` (the product's is fixed at 1e-3)."""
    import server.aggregation as aggregation

    original = aggregation.STRATEGIES["fedadam"]

    def with_tau(eta: float):
        step = original(eta)  # the product's step, every other argument kept
        step.tau = tau
        return step

    aggregation.STRATEGIES["fedadam"] = with_tau
    try:
        yield
    finally:
        aggregation.STRATEGIES["fedadam"] = original


@contextmanager
def oracle_item_bias(alpha: float, frozen: bool) -> Iterator[None]:
    """While active, every sequence runtime built in this process starts its item bias at alpha x log(1 +
    exact training count) (and, when ``frozen``, stops training and exchanging it). Every runtime of an
    in-process run (server and devices) is patched alike, so the exchanged state keeps one shape."""
    import client.app as client_app
    import common.sequence_runtime as runtime_module
    from common.partition import split_for

    counts = torch.from_numpy(split_for(resolve({})["dataset"]).train_item_counts().astype(np.float32))
    original = runtime_module.SequenceRuntime.__init__

    def patched(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        bias = self.model.item_bias
        with torch.no_grad():
            bias.bias.copy_(alpha * torch.log1p(counts) / bias.scale)
        if frozen:
            bias.bias.requires_grad_(False)
            self.names, self.parameters = runtime_module.exchanged_parameters(self.model)

    # The ClientApp keeps one runtime per process, keyed on settings an oracle does not change: none built
    # outside the patch may serve inside it, and none built inside may outlive it.
    client_app._RUNTIMES.clear()
    client_app._DEVICE_RUNTIMES.clear()
    runtime_module.SequenceRuntime.__init__ = patched
    try:
        yield
    finally:
        runtime_module.SequenceRuntime.__init__ = original
        client_app._RUNTIMES.clear()
        client_app._DEVICE_RUNTIMES.clear()


def fedadam_second_moments(folder: Path) -> dict | None:
    """Summary of sqrt(v), FedAdam's second moment, over every coordinate in the latest checkpoint of the run in
    ``folder`` (None without one): its median, 90th percentile and the share of coordinates under 1e-3."""
    from common.errors import DataFormatError
    from server.checkpoint import LATEST, load_checkpoint

    checkpoints = folder / "checkpoint"
    if not (checkpoints / LATEST).exists():
        return None
    meta, _, optimizer = load_checkpoint(checkpoints)
    moments = [v.ravel().astype(np.float64) for k, v in sorted(optimizer.items()) if k.startswith("v_t.")]
    if not moments:
        raise DataFormatError(checkpoints / meta["weights"], "no FedAdam second moment (v_t) in the checkpoint")
    root = np.sqrt(np.concatenate(moments))
    return {"checkpoint": meta["weights"], "coordinates": int(root.size),
            "median": float(np.median(root)), "p90": float(np.percentile(root, 90)),
            "share_below_1e-3": float((root < 1e-3).mean())}


def probe_context(name: str, sink: dict) -> AbstractContextManager:
    """What a probe runs inside: an oracle's patched starting point, another FedAdam tau, the iterate averages
    (written into ``sink``), or nothing."""
    if name in AVERAGED:
        return iterate_averages(sink)
    if name in ORACLES:
        return oracle_item_bias(*ORACLES[name])
    if name in SERVER_TAU:
        return server_tau(SERVER_TAU[name][1])
    return nullcontext()


def probe_config(name: str) -> tuple[dict, dict]:
    """(run-config overrides, node config) of probe ``name``, the noise solved where it asks (an oracle runs
    the default's)."""
    if name in ORACLES:
        return probe_config("default-now")
    if name in SERVER_TAU:
        return probe_config(SERVER_TAU[name][0])
    if name in AVERAGED:
        return probe_config(AVERAGED[name])
    if name not in PROBES:
        raise typer.BadParameter(f"probe {name!r}: expected one of "
                                 f"{sorted([*PROBES, *ORACLES, *SERVER_TAU, *AVERAGED])}")
    overrides, node_config, budget = PROBES[name]
    overrides = dict(overrides)
    if budget is not None:
        from simulations.bench_privacy_utility import noise_for

        epsilon, sessions = budget
        overrides["noise-multiplier"] = noise_for(epsilon, resolve(overrides), sessions)
        overrides["client-epsilon-budget"] = epsilon
    return overrides, node_config


def main(name: str = typer.Argument(..., help=f"one of {', '.join([*PROBES, *ORACLES, *SERVER_TAU, *AVERAGED])}"),
         seed: int = typer.Option(0), out: Path = typer.Option(OUT), work: Path = typer.Option(Path("runs") / "schedule",
                                                                  help="run folders (not kept)")) -> None:
    """Run one probe and write its record."""
    from simulations.bench_privacy_utility import run_point

    overrides, node_config = probe_config(name)
    t0 = time.perf_counter()
    averages: dict = {}
    with probe_context(name, averages):
        result = run_point(name, overrides, node_config, seed, work)
    rows = read_metrics(work / f"{name}-seed{seed}" / "metrics.jsonl")
    record = {"probe": name, "seed": seed, "overrides": overrides, "node_config": node_config,
              "validation_NDCG@10": validation_curve(rows),
              "test": result["metrics"], "epsilon": result["privacy"].get("epsilon"),
              "seconds": round(time.perf_counter() - t0, 1)}
    record["fedadam_sqrt_v"] = fedadam_second_moments(work / f"{name}-seed{seed}")
    if name in SERVER_TAU:
        record["server_tau"] = SERVER_TAU[name][1]
    if name in AVERAGED:
        record["iterate_averages"] = averages
    if name in ORACLES:  # not the default: a non-private starting point, whatever its ledgers say
        alpha, frozen = ORACLES[name]
        record["oracle"] = {"item_bias_start": f"{alpha:g} x log(1 + exact training count)", "frozen": frozen,
                            "non_private": True}
    write_json_atomic(out / f"{name}-seed{seed}.json", record)
    print(json.dumps(record))


if __name__ == "__main__":
    typer.run(main)
