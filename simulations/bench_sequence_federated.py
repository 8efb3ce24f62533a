"""The sequence model under the federated local-DP mechanism, simulated in one process (a reference
for the next step of issue 21, not the product's federated path, which still trains the text model).

    python -m simulations.bench_sequence_federated [--seed 0] [--aggregator trimmed-mean] [--set FIELD=VALUE]

What is the same as the default federated run: 943 clients in a cyclic order drawn from the seed,
20 per round, 48 rounds; each session one full-batch DP-SGD step (SGD, learning rate 1) over the
user's 50 most recent examples padded with weight-0 rows to 50, noise 1.28, clip 1, accounted at
sensitivity 2C (a client's epsilon 7.97 at delta 1e-5 after one session; a session that would take
it above the budget of 8 is refused); the noise and Poisson sampling come from privrec's secure
streams (:func:`common.sequence_training.train_sequence`); the server's own aggregation
(:func:`server.aggregators.aggregate`, with the item-bias common-mode projection) and its Flower
FedAdam step (:func:`server.aggregation.server_step`, eta 0.01).

What is not: no Flower messages, wire, ledger files, reply validation or device policy; every
client is honest. The model is the sequence model (:mod:`common.sequence`) over the zero-shot
encoder's item text vectors, by default a small one (dim 32, one block, no ID embeddings, an item
bias at scale 10 and the parameter-free text prior at weight 5). Test NDCG@10 (PROTOCOL) after
the last round is written as a result file to ``--out``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import typer

from common.evaluation import evaluate_scores
from common.io import write_json_atomic
from common.ledger import Session, composed_epsilon
from common.movielens import load_recbole
from common.privacy import PublicSchedule, interaction_group_size, noise_for_epsilon
from common.results import result_record
from common.sequence import (SequenceRecommender, SequenceRows, SequenceSettings, evaluation_rows,
                             sequence_scores, user_sequence_rows)
from common.sequence_runtime import exchanged_parameters, item_text_vectors, padded_sequence_rows
from common.sequence_training import SequenceTrainConfig, train_sequence
from common.split import leave_one_out
from server.aggregation import make_server_step, server_step
from server.aggregators import aggregate
from simulations.bench_sequence import ITEM_MAX_LENGTH, with_overrides

RESULTS = Path(__file__).parent / "results" / "sequence-federated"
SETTINGS = SequenceSettings(history_len=50, dim=32, layers=1, heads=2, id_terms=False, item_bias=True,
                            item_bias_scale=10.0, prior_weight=5.0)
SESSION = SequenceTrainConfig(epochs=1.0, batch_size=50, learning_rate=1.0, optimizer="sgd", dp=True,
                              noise_multiplier=1.28, max_grad_norm=1.0, delta=1e-5, public_size=50, sensitivity=2.0)
BUDGET = 8.0
MODEL_FIELDS = set(asdict(SETTINGS))

app = typer.Typer(add_completion=False)


def padded_session_rows(split, user: int, cap: int, history_len: int) -> tuple[SequenceRows, np.ndarray]:
    """The user's ``cap`` most recent rows and weight-0 padding rows up to ``cap`` (the product's rule)."""
    return padded_sequence_rows(user_sequence_rows(split, user, history_len, cap), cap, split.data.num_items)


@app.command()
def main(seed: int = typer.Option(0, help="client order and model initialisation (never DP randomness)"),
         rounds: int = typer.Option(48), clients_per_round: int = typer.Option(20),
         aggregator: str = typer.Option("trimmed-mean", help="mean, median, trimmed-mean, ..."),
         strategy: str = typer.Option("fedadam"), server_learning_rate: float = typer.Option(0.01),
         set_: list[str] = typer.Option([], "--set", help="FIELD=VALUE override of the settings or session"),
         target_epsilon: float = typer.Option(0.0, help="set the noise so that one session costs this epsilon "
                                              "(and the budget allows one); 0: keep noise 1.28 and budget 8; "
                                              "-1: no noise (clipping only, no guarantee)"),
         out: Path = typer.Option(RESULTS)) -> None:
    """Train and evaluate; print validation/test NDCG@10 every 12 rounds."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    mechanism = [item for item in set_ if item.partition("=")[0] not in MODEL_FIELDS | {"learning_rate"}]
    if mechanism:
        raise typer.BadParameter(f"--set {mechanism[0]!r}: only model settings and learning_rate may be changed here; "
                                 f"the mechanism is the default run's (use --target-epsilon for the noise)")
    settings, session_cfg = with_overrides(SETTINGS, SESSION, set_)
    budget = BUDGET
    if target_epsilon > 0:
        noise = session_cfg.sensitivity * noise_for_epsilon(target_epsilon, session_cfg.delta, 1.0, 1, "rdp")
        session_cfg, budget = replace(session_cfg, noise_multiplier=noise), target_epsilon + 1e-6
    elif target_epsilon < 0:
        session_cfg = replace(session_cfg, noise_multiplier=0.0)
    private = session_cfg.noise_multiplier > 0
    data = load_recbole()
    split = leave_one_out(data)
    item_text = item_text_vectors(data, ITEM_MAX_LENGTH)
    torch.manual_seed(seed)
    model = SequenceRecommender(item_text, settings)
    # Every catalogue item is "known": which items anyone rated is private (the union of the
    # clients' data), so no rule may depend on it.
    torch.nn.init.zeros_(model.text_out.weight)  # the first model is the text prior alone
    names, params = exchanged_parameters(model)
    step = make_server_step(strategy, server_learning_rate)
    cfg = {"aggregator": aggregator, "trim-fraction": 0.1, "byzantine-clients": 1}
    users = split.eval_users()
    eval_rows = {w: evaluation_rows(split, w, settings.history_len, users) for w in ("validation", "test")}

    def evaluate() -> dict[str, float]:
        return {w: evaluate_scores(sequence_scores(model, eval_rows[w]), split, w, users)["NDCG@10"]
                for w in eval_rows}

    order = np.random.default_rng(seed).permutation(data.num_users)
    spent: dict[int, list[Session]] = {}
    schedule = PublicSchedule.from_public_size(session_cfg.public_size, session_cfg.batch_size, session_cfg.epochs)
    one = Session(session_cfg.noise_multiplier if private else 1.0, schedule.sample_rate, schedule.steps,
                  session_cfg.max_grad_norm, session_cfg.delta, sensitivity=session_cfg.sensitivity)
    curve, trained, refused = [], 0, 0
    for r in range(rounds):
        current = [p.detach().numpy().copy() for p in params]
        states = []
        for k in range(clients_per_round):
            user = int(order[(r * clients_per_round + k) % data.num_users])
            if private and composed_epsilon(spent.get(user, []) + [one], session_cfg.delta) > budget:
                refused += 1
                continue
            spent.setdefault(user, []).append(one)
            rows, weights = padded_session_rows(split, user, session_cfg.public_size, settings.history_len)
            report = train_sequence(model, rows, replace(session_cfg, seed=seed), row_weights=weights)
            if private and (report.steps, report.sample_rate) != (one.steps, one.sample_rate):
                raise RuntimeError(f"session ran {report.steps} steps at rate {report.sample_rate}, "
                                   f"accounted {one.steps} at {one.sample_rate}")
            states.append([p.detach().numpy().copy() for p in params])
            trained += 1
            with torch.no_grad():
                for p, c in zip(params, current):
                    p.copy_(torch.from_numpy(c))
        if states:
            combined = aggregate(states, cfg, names, current)
            if combined is not None:
                new = server_step(step, r + 1, names, current, combined)
                with torch.no_grad():
                    for p, a in zip(params, new):
                        p.copy_(torch.from_numpy(a))
        if (r + 1) % 12 == 0 or r + 1 == rounds:
            figures = evaluate()
            curve.append({"round": r + 1, **{f"{w}_NDCG@10": round(v, 5) for w, v in figures.items()}})
            print(json.dumps(curve[-1]), flush=True)
    epsilon = max(composed_epsilon(s, session_cfg.delta) for s in spent.values()) if private else None
    privacy = {"unit": "none", "note": "clipped, no noise"} if not private else {"unit": "example", "epsilon": round(epsilon, 4), "delta": session_cfg.delta, "accountant": "rdp",
               "adjacency": "add-remove", "trust": "none (local DP on each simulated client)",
               "selection": f"the user's {session_cfg.public_size} most recent training examples, padded with "
                            f"weight-0 rows; accounted at sensitivity 2C", "sensitivity": session_cfg.sensitivity,
               "note": (f"example-level only: one example's input is the user's last {settings.history_len} "
                        f"interactions, so one rating touches up to "
                        f"{interaction_group_size(settings.history_len, session_cfg.public_size)} accounted examples "
                        f"(group privacy); simulated in one process (no wire, ledgers or device policies)")}
    config = {"settings": asdict(settings), "session": asdict(session_cfg), "rounds": rounds,
              "clients_per_round": clients_per_round, "aggregator": aggregator, "strategy": strategy,
              "server_learning_rate": server_learning_rate, "sessions_trained": trained, "sessions_refused": refused,
              "parameters": int(sum(p.numel() for p in params)), "curve": curve,
              "simulation": "in-process reference of the local-DP mechanism (see the module docstring)"}
    level = "" if target_epsilon == 0 else "-no-noise" if target_epsilon < 0 else f"-eps{target_epsilon:g}"
    tag = (f"seq-fed-{aggregator}-seed{seed}" + level
           + ("-" + "-".join(s.replace("=", "") for s in set_) if set_ else ""))
    wall = time.perf_counter() - t0
    for which in ("validation", "test"):
        metrics = evaluate_scores(sequence_scores(model, eval_rows[which]), split, which, users)
        write_json_atomic(out / f"{tag}-{which}.json",
                          result_record("sequence-federated", which, metrics, len(users), seed, privacy, wall, config))
    print(json.dumps({"epsilon": epsilon, "sessions": trained, "refused": refused, "seconds": round(wall, 1)}))


if __name__ == "__main__":
    app()
