"""Central references for the sequence model on the PROTOCOL split (and the training-free heuristic).

    python -m simulations.bench_sequence METHOD [--seeds 0,1,2] --out DIR

Methods:
  text-heuristic  zero-shot text vectors, rating-weighted recency-decayed user, + popularity (no training;
                  decay and popularity weight chosen on validation from a 20-point grid)
  sequence        the sequence model trained centrally without privacy on every training example
  sequence-dp     the same model trained centrally with DP-SGD (example level, epsilon 8, delta 1e-5), with
                  its own settings chosen on validation (DP_SETTINGS, DP_TRAIN)

The non-private model runs ``--max-epochs`` epochs and keeps the epoch with the best validation
NDCG@10 (chosen on validation only); by default its learning rate falls linearly to 0 over those
epochs and every item the user had before a row's target leaves that row's softmax (both central
non-private rules: the mask reads more than the row's own input); the DP model runs its
configured epochs once, with the noise solved for epsilon 8 over all of its steps, and keeps the
last model (a choice among epochs by validation figures would be a release its epsilon does not
cover). The test split is scored once.
The cold-start row trains the same way on the split without the held-out items (PROTOCOL section
4) and reports the cold-start test users. Result files (PROTOCOL section 5) go to ``--out``;
``--table`` prints the table of the files in ``--out``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import typer

from common.evaluation import evaluate_scores
from common.io import write_json_atomic
from common.movielens import load_recbole
from common.privacy import interaction_group_size
from common.results import NO_PRIVACY, result_record
from common.sequence import (SequenceRecommender, SequenceRows, SequenceSettings, evaluation_rows,
                             sequence_scores, training_rows)
from common.sequence_runtime import item_text_vectors
from common.sequence_training import SequenceTrainConfig, train_sequence
from common.split import Split, cold_start_items, leave_one_out, without_items
from simulations.baselines import cold_start_users
from simulations.text_heuristic import choose_on_validation, heuristic_scores

RESULTS = Path(__file__).parent / "results" / "sequence"
ITEM_MAX_LENGTH = 32

SETTINGS = SequenceSettings(history_len=50, dim=64, layers=2, heads=2, dropout=0.0, id_dropout=0.3,
                            exclude_history=True)
TRAIN = SequenceTrainConfig(epochs=1.0, batch_size=256, learning_rate=1e-3)
# the non-private model's training rules (chosen on seed 0's validation split, docs in results/sequence/summary.md)
FINAL_LR_FACTOR = 0.0  # the learning rate falls linearly to 0 over --max-epochs
EXCLUDE_PREFIX = True  # every item the user had before a row's target leaves that row's softmax
# The DP model's own settings, chosen on seed 0's validation split among 8 configurations (results/sequence/
# summary.md): no ID dropout (a cold-start regulariser that costs warm quality), the zero-cost text prior
# at weight 10, 6 epochs at Adam 6e-3 (the noise solved for epsilon 8 over all 570 steps).
DP_SETTINGS = replace(SETTINGS, id_dropout=0.0, prior_weight=10.0)
DP_TRAIN = SequenceTrainConfig(epochs=6.0, batch_size=1024, learning_rate=6e-3, dp=True, target_epsilon=8.0,
                               delta=1e-5, max_grad_norm=1.0)

app = typer.Typer(add_completion=False)


def prefix_exclusions(split: Split, rows: SequenceRows) -> Callable[[torch.Tensor], torch.Tensor]:
    """For :func:`training_rows` ``rows``: a batch's (B, num_items) mask of every item its user had before
    its target (the whole prefix, not only the history window), the target itself left in."""
    num_items = split.data.num_items
    user_items = [split.data.item[np.asarray(r, dtype=np.int64)] for r in split.train]
    users = rows.users
    # rows come user by user, in target order, ending at each user's last training interaction
    position = np.empty(len(users), dtype=np.int64)
    for u in np.unique(users):
        where = np.flatnonzero(users == u)
        position[where] = len(user_items[u]) - len(where) + np.arange(len(where))
    for k in range(len(users)):  # the construction above must give each row its own target
        if user_items[users[k]][position[k]] != rows.targets[k]:
            raise ValueError(f"row {k} is not the next-item row of user {users[k]} at position {position[k]}")

    def mask(idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(idx), num_items, dtype=torch.bool)
        for b, k in enumerate(idx.tolist()):
            before = user_items[users[k]][:position[k]]
            out[b, torch.from_numpy(before)] = True
            out[b, int(rows.targets[k])] = False
        return out

    return mask


def fit(item_text: torch.Tensor, split: Split, settings: SequenceSettings, train_cfg: SequenceTrainConfig,
        max_epochs: int, seed: int, label: str | None,
        held_out: np.ndarray = np.empty(0, dtype=np.int64),
        examples_per_user: int = 0, final_lr_factor: float = 1.0,
        exclude_prefix: bool = False) -> tuple[SequenceRecommender, dict]:
    """Train and return the model with what was done.

    Without DP: epoch by epoch, keeping the epoch with the best validation NDCG@10; the learning rate
    falls linearly to ``final_lr_factor`` of its start over ``max_epochs``, and with ``exclude_prefix``
    each row's softmax also leaves out its user's items older than its history window. With DP: one
    run of ``train_cfg.epochs`` epochs whose noise is solved for the target epsilon over all of its
    steps, and the final model (no choice on validation figures, which would be a release too)."""
    torch.manual_seed(seed)
    model = SequenceRecommender(item_text, settings)
    if train_cfg.dp:  # a public set: the catalogue without the protocol's published hold-out list (if any)
        model.set_known(torch.as_tensor(~np.isin(np.arange(split.data.num_items), held_out)))
    else:  # non-private: the items with training ratings
        model.set_known(torch.as_tensor(split.train_item_counts() > 0))
    rows = training_rows(split, settings.history_len, examples_per_user)
    if train_cfg.dp:
        report = train_sequence(model, rows, replace(train_cfg, seed=seed), label=label)
        return model, {"train_rows": len(rows), "train_seconds": round(report.seconds, 1), "steps": report.steps,
                       "epsilon": report.epsilon, "noise_multiplier": report.noise_multiplier,
                       "sample_rate": report.sample_rate, "expected_batch_size": report.expected_batch_size}
    users = split.eval_users()
    validation = evaluation_rows(split, "validation", settings.history_len, users)
    exclusions = prefix_exclusions(split, rows) if exclude_prefix else None
    best, best_state, curve, seconds = -1.0, None, [], 0.0
    for epoch in range(max_epochs):
        lr = [train_cfg.learning_rate * (1 - (1 - final_lr_factor) * e / max_epochs) for e in (epoch, epoch + 1)]
        epoch_cfg = replace(train_cfg, epochs=1.0, seed=seed * 1000 + epoch, learning_rate=lr[0],
                            final_learning_rate=None if final_lr_factor == 1.0 else lr[1])
        report = train_sequence(model, rows, epoch_cfg, label=f"{label} epoch {epoch + 1}",
                                extra_exclusions=exclusions)
        seconds += report.seconds
        ndcg = evaluate_scores(sequence_scores(model, validation), split, "validation", users)["NDCG@10"]
        curve.append(round(ndcg, 5))
        if ndcg > best:
            best, best_state = ndcg, (epoch + 1, copy.deepcopy(model.state_dict()))
    epochs, state = best_state
    model.load_state_dict(state)
    return model, {"train_rows": len(rows), "epochs_run": max_epochs, "epoch_chosen": epochs,
                   "final_lr_factor": final_lr_factor, "exclude_prefix": exclude_prefix,
                   "validation_curve": curve, "train_seconds": round(seconds, 1)}


def _dp_privacy(train_cfg: SequenceTrainConfig, info: dict, history_len: int) -> dict:
    return {"unit": "example", "epsilon": round(info["epsilon"], 4), "delta": train_cfg.delta, "accountant": "rdp",
            "adjacency": "add-remove", "selection": "all of the training examples", "sensitivity": 1.0,
            "trust": "the curator who trains centrally holds every example",
            "noise_multiplier": info["noise_multiplier"], "sample_rate": info["sample_rate"], "steps": info["steps"],
            "max_grad_norm": train_cfg.max_grad_norm, "denominator": info["expected_batch_size"],
            "note": (f"example-level only: one rating is the target of one example and in the histories of up to "
                     f"{history_len} later ones, so interaction-level DP follows only by group privacy with group "
                     f"size {interaction_group_size(history_len, 0)}; the training set's size is treated as public")}


def with_overrides(settings: SequenceSettings, train_cfg: SequenceTrainConfig,
                   overrides: list[str]) -> tuple[SequenceSettings, SequenceTrainConfig]:
    """Apply ``key=value`` overrides to the model settings or the training config (a field of either)."""
    model_fields, train_fields = asdict(settings), asdict(train_cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or (key not in model_fields and key not in train_fields):
            raise typer.BadParameter(f"--set {item!r}: expected FIELD=VALUE with a field of SequenceSettings "
                                     f"or SequenceTrainConfig")
        target = model_fields if key in model_fields else train_fields
        value = json.loads(raw)
        if isinstance(target[key], bool) != isinstance(value, bool):
            raise typer.BadParameter(f"--set {item!r}: {key} takes a {type(target[key]).__name__}")
        target[key] = value
    return SequenceSettings(**model_fields), SequenceTrainConfig(**train_fields)


def training_rules(method: str, final_lr_factor: float | None, exclude_prefix: bool | None) -> tuple[float, bool]:
    """The non-private model's training rules, None meaning the method's default: the decay and the
    prefix exclusion for ``sequence``, neither for ``sequence-dp``."""
    private = method == "sequence-dp"
    final_lr_factor = (1.0 if private else FINAL_LR_FACTOR) if final_lr_factor is None else final_lr_factor
    exclude_prefix = (not private and EXCLUDE_PREFIX) if exclude_prefix is None else exclude_prefix
    return final_lr_factor, exclude_prefix


def method_config(method: str, overrides: list[str], examples_per_user: int, final_lr_factor: float | None,
                  exclude_prefix: bool | None) -> tuple[SequenceSettings, SequenceTrainConfig, float, bool]:
    """A sequence method's settings, training config and training rules after ``--set`` overrides; refuses
    a DP switch that disagrees with the method and any rule the DP accounting does not cover."""
    private = method == "sequence-dp"
    settings, train_cfg = with_overrides(DP_SETTINGS if private else SETTINGS, DP_TRAIN if private else TRAIN,
                                         overrides)
    if train_cfg.dp != private:
        raise typer.BadParameter(f"--set dp={str(train_cfg.dp).lower()}: the method ({method}) says whether it "
                                 f"is private")
    if train_cfg.final_learning_rate is not None and not train_cfg.dp:
        raise typer.BadParameter("--set final_learning_rate: the non-private model's decay is --final-lr-factor "
                                 "(the set is for sequence-dp)")
    if train_cfg.dp and examples_per_user:
        # a most-recent-N window lets an older example in when one is removed: 2C, not the C accounted here
        raise typer.BadParameter("--examples-per-user is for the non-private model: sequence-dp trains on all "
                                 "examples and accounts sensitivity C")
    if train_cfg.dp and (exclude_prefix or final_lr_factor not in (None, 1.0)):
        # The prefix mask reads more than a row's own input. (A DP run's own learning-rate schedule, a
        # public function of the step, is covered: --set final_learning_rate.)
        raise typer.BadParameter("--exclude-prefix and --final-lr-factor are for the non-private model's "
                                 "epoch-by-epoch training (a DP run decays with --set final_learning_rate)")
    return (settings, train_cfg, *training_rules(method, final_lr_factor, exclude_prefix))


def run_method(method: str, seed: int, data, item_text: torch.Tensor, out: Path, max_epochs: int,
               overrides: list[str] | None = None, cold_start: bool = True,
               examples_per_user: int = 0, final_lr_factor: float | None = None,
               exclude_prefix: bool | None = None) -> list[dict]:
    """Evaluate one method for one seed and write its result files. ``final_lr_factor`` and
    ``exclude_prefix`` (None: the method's default) shape the non-private model's training only."""
    split = leave_one_out(data)
    held_out = cold_start_items(data.num_items)
    cold_split, cold_users = without_items(split, held_out), cold_start_users(split, held_out)
    users = split.eval_users()
    records = []
    t0 = time.perf_counter()
    if method == "text-heuristic":
        rows = {w: evaluation_rows(split, w, 50, users) for w in ("validation", "test")}
        choice, tried = choose_on_validation(item_text, split, rows["validation"], users)
        config = {"history_len": 50, **choice, "configurations_tried": len(tried), "grid": tried}
        counts = split.train_item_counts()
        for which in ("validation", "test"):
            metrics = evaluate_scores(heuristic_scores(item_text, rows[which], counts, **choice), split, which, users)
            records.append(result_record(method, which, metrics, len(users), seed, NO_PRIVACY,
                                         time.perf_counter() - t0, config))
        cold_counts = cold_split.train_item_counts()
        cold_rows = evaluation_rows(split, "test", 50, cold_users)
        metrics = evaluate_scores(heuristic_scores(item_text, cold_rows, cold_counts, **choice), split, "test",
                                  cold_users)
        records.append(result_record(method, "test-cold-start", {k: metrics[k] for k in ("HR@10", "NDCG@10")},
                                     len(cold_users), seed, NO_PRIVACY, time.perf_counter() - t0, config))
    elif method in ("sequence", "sequence-dp"):
        settings, train_cfg, final_lr_factor, exclude_prefix = method_config(
            method, overrides or [], examples_per_user, final_lr_factor, exclude_prefix)
        model, info = fit(item_text, split, settings, train_cfg, max_epochs, seed, f"{method} seed {seed}",
                          examples_per_user=examples_per_user, final_lr_factor=final_lr_factor,
                          exclude_prefix=exclude_prefix)
        privacy = _dp_privacy(train_cfg, info, settings.history_len) if train_cfg.dp else NO_PRIVACY
        config = {"settings": asdict(settings), "train": asdict(replace(train_cfg, seed=seed)),
                  "examples_per_user": examples_per_user, **info}
        for which in ("validation", "test"):
            rows = evaluation_rows(split, which, settings.history_len, users)
            metrics = evaluate_scores(sequence_scores(model, rows), split, which, users)
            records.append(result_record(method, which, metrics, len(users), seed, privacy,
                                         time.perf_counter() - t0, config))
        t1 = time.perf_counter()
        if not cold_start:
            return _write(records, method, seed, out)
        cold_model, cold_info = fit(item_text, cold_split, settings, train_cfg, max_epochs, seed,
                                    f"{method} seed {seed} (cold)", held_out, examples_per_user, final_lr_factor,
                                    exclude_prefix)
        rows = evaluation_rows(split, "test", settings.history_len, cold_users)
        metrics = evaluate_scores(sequence_scores(cold_model, rows), split, "test", cold_users)
        cold_privacy = _dp_privacy(train_cfg, cold_info, settings.history_len) if train_cfg.dp else NO_PRIVACY
        records.append(result_record(method, "test-cold-start", {k: metrics[k] for k in ("HR@10", "NDCG@10")},
                                     len(cold_users), seed, cold_privacy, time.perf_counter() - t1,
                                     {**config, **cold_info, "cold_start_items": len(held_out)}))
    else:
        raise typer.BadParameter(f"method must be text-heuristic, sequence or sequence-dp, got {method!r}")
    return _write(records, method, seed, out)


def _write(records: list[dict], method: str, seed: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    for r in records:
        write_json_atomic(out / f"{method}-seed{seed}-{r['split']}.json", r)
    return records


def results_table(folder: Path) -> str:
    """Mean ± std over seeds of every method's result files in ``folder``, as a markdown table."""
    from simulations.summary import summarise

    records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*-seed*-*.json"))]
    head = ("| method | privacy | seeds | test HR@10 | test NDCG@10 | test MRR@10 | test HR@20 | validation NDCG@10 "
            "| cold-start HR@10 | cold-start NDCG@10 |\n|" + "---|" * 10)
    return "\n".join([head, *("| " + " | ".join(row) + " |" for row in summarise(records))])


@app.command()
def main(method: str = typer.Argument(..., help="text-heuristic, sequence or sequence-dp"),
         seeds: str = typer.Option("0,1,2", help="comma-separated seeds"),
         max_epochs: int = typer.Option(6, help="epochs per trained model (the best on validation is kept); the "
                                                "non-private model's learning rate reaches its final value at the last"),
         out: Path = typer.Option(RESULTS, help="folder for the result files (a trained method needs its own)"),
         set_: list[str] = typer.Option([], "--set", help="FIELD=VALUE override of the settings (repeatable)"),
         cold_start: bool = typer.Option(True, help="also train and score the cold-start row"),
         examples_per_user: int = typer.Option(0, help="train on each user's most recent N targets (0: all)"),
         final_lr_factor: float = typer.Option(None, min=0.0, max=1.0, help="non-private model: the learning "
                                               "rate falls linearly to this share of its start over --max-epochs "
                                               f"(1: constant) [default: {FINAL_LR_FACTOR}]"),
         exclude_prefix: bool = typer.Option(None, "--exclude-prefix/--no-exclude-prefix",
                                             help="non-private model: each row's softmax also leaves out its user's "
                                                  f"items older than its history window [default: {EXCLUDE_PREFIX}]"),
         table: bool = typer.Option(False, help="print the markdown table of the result files in --out and stop")
         ) -> None:
    """Run METHOD for each seed and print test NDCG@10 / HR@10 and the cold-start HR@10."""
    if table:
        print(results_table(out))
        return
    if method in ("sequence", "sequence-dp"):  # refuse a bad combination before loading anything
        method_config(method, set_, examples_per_user, final_lr_factor, exclude_prefix)
    if method in ("sequence", "sequence-dp") and out.resolve() == RESULTS.resolve():
        # every trained row has its folder; the root holds the earliest rows' files, which a run would overwrite
        raise typer.BadParameter(f"a trained method needs an --out folder of its own ({RESULTS} holds the earliest "
                                 f"published rows)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_recbole()
    item_text = item_text_vectors(data, ITEM_MAX_LENGTH)
    seed_list = [int(s) for s in seeds.split(",")] if method != "text-heuristic" else [0]
    for seed in seed_list:
        records = {r["split"]: r for r in run_method(method, seed, data, item_text, out, max_epochs, set_,
                                                     cold_start, examples_per_user, final_lr_factor,
                                                     exclude_prefix)}
        print(json.dumps({"method": method, "seed": seed,
                          "test_NDCG@10": round(records["test"]["metrics"]["NDCG@10"], 4),
                          "test_HR@10": round(records["test"]["metrics"]["HR@10"], 4),
                          "validation_NDCG@10": round(records["validation"]["metrics"]["NDCG@10"], 4),
                          "cold_HR@10": round(records["test-cold-start"]["metrics"]["HR@10"], 4)
                          if "test-cold-start" in records else None}), flush=True)


if __name__ == "__main__":
    app()
