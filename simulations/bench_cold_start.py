"""Cold start under the federated default: the product's federation with ``cold-start-holdout=true``
(PROTOCOL section 4: the published cold-start items join the catalogue after training, so no
device holds a rating of them and the sequence model scores them by their text alone), then HR@10
and NDCG@10 of the cold-start test users (whose test item is a held-out item) and of every test user.

    python -m simulations.bench_cold_start [--seed 0] [--set KEY=VALUE ...]

One run of the product's server (:class:`server.federation.Federation`) and ClientApp functions,
all 943 users as clients, in one process (:class:`simulations.inprocess_grid.InProcessGrid`). The
cold-start users are then ranked from their full test-time histories, as the central reference
does (``simulations/bench_sequence.py``). Result files go to ``--out``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import typer

from common.io import write_json_atomic
from common.results import result_record
from common.run_config import parse_overrides

RESULTS = Path(__file__).parent / "results" / "cold-start-federated"
BOOST_GRID = tuple(round(0.1 * k, 1) for k in range(11))  # sequence-new-item-boost values scored after training
app = typer.Typer(add_completion=False)


@app.command()
def main(seed: int = typer.Option(0), set_: list[str] = typer.Option([], "--set", help="run-config KEY=VALUE"),
         name: str = typer.Option("federated-default", help="result file prefix (name the --set overrides)"),
         out: Path = typer.Option(RESULTS),
         work: Path = typer.Option(Path("runs") / "cold-start", help="run folder (not kept)"),
         table: bool = typer.Option(False, help="print the new-item boost table of the --name files in --out "
                                                "and stop")) -> None:
    """Train without the held-out items and score the cold-start users."""
    if table:
        print(boost_table(sorted(out.glob(f"{name}-seed*-test-cold-start.json"))))
        return
    if set_ and name == "federated-default" and out.resolve() == RESULTS.resolve():
        raise typer.BadParameter("--set changes the run: give it a --name or an --out of its own (the published "
                                 "default's files are federated-default-seedS-* in the results folder)")
    import server.federation as federation
    from common.evaluation import evaluate_scores
    from common.partition import split_for
    from common.sequence import evaluation_rows, sequence_scores
    from common.sequence_runtime import SequenceRuntime
    from common.split import cold_start_items
    from simulations.baselines import cold_start_users
    from simulations.inprocess_grid import InProcessGrid

    t0 = time.perf_counter()
    full = split_for("recbole")
    held_out = cold_start_items(full.data.num_items)
    overrides = parse_overrides(set_)
    cfg = {**overrides, "cold-start-holdout": True, "seed": seed, "output-dir": str(work),
           "run-name": f"cold-seed{seed}"}
    shutil.rmtree(work / cfg["run-name"], ignore_errors=True)
    fed = federation.Federation(InProcessGrid(full.data.num_users, cfg), cfg)
    fed.run()
    if not isinstance(fed.runtime, SequenceRuntime):
        raise typer.BadParameter("this benchmark scores the sequence model (user-model=sequence)")
    fed.runtime.load_state(fed.names, fed.arrays)
    model = fed.runtime.model
    cold_users = cold_start_users(full, held_out)
    rows = evaluation_rows(full, "test", fed.runtime.settings.history_len, cold_users)
    cold = evaluate_scores(sequence_scores(model, rows), full, "test", cold_users)
    warm = json.loads((fed.folder.result).read_text())
    # For choosing settings: the same two figures on the validation split (the users whose validation item
    # is held out, and every user's validation NDCG@10 from the run's last evaluation).
    cold_val_users = cold_start_users(full, held_out, "validation")
    val_rows = evaluation_rows(full, "validation", fed.runtime.settings.history_len, cold_val_users)
    cold_val = evaluate_scores(sequence_scores(model, val_rows), full, "validation", cold_val_users)
    last = [r for r in fed.folder.read_metrics() if "val_NDCG@10" in r][-1]
    validation = {"cold_start_users": len(cold_val_users), "cold_start_HR@10": cold_val["HR@10"],
                  "cold_start_NDCG@10": cold_val["NDCG@10"], "all_users_NDCG@10": last["val_NDCG@10"]}
    # The same trained model ranked with each new-item boost of the grid (a ranking rule, no training
    # change), every figure computed here from every user's full history so that they compare on equal terms.
    rankings = unseen_rankings(model, full, held_out, BOOST_GRID)
    wall = time.perf_counter() - t0
    config = {**fed.cfg, "held_out_items": len(held_out), "cold_start_users": len(cold_users),
              "simulation": "in-process federation (InProcessGrid), cold-start-holdout=true",
              "validation": validation, "unseen_rankings": rankings}
    write_json_atomic(out / f"{name}-seed{seed}-test-cold-start.json",
                      result_record("federated-dp", "test-cold-start", {k: cold[k] for k in ("HR@10", "NDCG@10")},
                                    len(cold_users), seed, warm["privacy"], wall, config))
    write_json_atomic(out / f"{name}-seed{seed}-test.json",
                      {**warm, "config": config})
    print(json.dumps({"cold_start_HR@10": cold["HR@10"], "cold_start_NDCG@10": cold["NDCG@10"],
                      "cold_users": len(cold_users), "all_users_NDCG@10": warm["metrics"]["NDCG@10"],
                      "validation": validation, "unseen_rankings": rankings, "seconds": round(wall, 1)}))


def _warm(figures: dict, split: str) -> float:
    """NDCG@10 of the users whose target is not a held-out item, from the all-users and cold-start figures."""
    everyone, cold = figures[f"{split}_all"], figures[f"{split}_cold"]
    return ((everyone["NDCG@10"] * everyone["users"] - cold["NDCG@10"] * cold["users"])
            / (everyone["users"] - cold["users"]))


def boost_table(files: list[Path]) -> str:
    """The markdown table of every boost of the grid over the runs in ``files`` (one per seed): validation
    (what a boost is chosen on) and test, for all users, the warm users and the cold-start users; shares are
    of boost 0's mean."""
    if not files:
        raise typer.BadParameter("no result files to tabulate (run the benchmark first)")
    runs = [json.loads(f.read_text()) for f in files]
    rankings = [r["config"]["unseen_rankings"] for r in runs]
    seeds = " / ".join(str(r["seed"]) for r in runs)

    def column(boost: str, key) -> list[float]:
        return [key(r[boost]) for r in rankings]

    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    def sd(values: list[float]) -> str:
        return f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else ""

    base_val_all = mean(column("0", lambda f: f["validation_all"]["NDCG@10"]))
    base_val_warm = mean(column("0", lambda f: _warm(f, "validation")))
    base_test_warm = mean(column("0", lambda f: _warm(f, "test")))
    lines = [f"| boost | validation: all users NDCG@10 (seeds {seeds} = mean; share of boost 0's) | validation: warm "
             f"users NDCG@10 (mean; share) | validation: cold-start NDCG@10 ({rankings[0]['0']['validation_cold']['users']}"
             f" users, mean) | test: cold-start HR@10 ({rankings[0]['0']['test_cold']['users']} users) | test: all users "
             f"NDCG@10 | test: warm users NDCG@10 (share) |", "|---|---|---|---|---|---|---|"]
    for boost in rankings[0]:
        val_all = column(boost, lambda f: f["validation_all"]["NDCG@10"])
        val_warm = column(boost, lambda f: _warm(f, "validation"))
        val_cold = column(boost, lambda f: f["validation_cold"]["NDCG@10"])
        # HR@10 is hits / users: recover the exact share from the stored (rounded) figure
        cold_hr = column(boost, lambda f: round(f["test_cold"]["HR@10"] * f["test_cold"]["users"])
                         / f["test_cold"]["users"])
        test_all = column(boost, lambda f: f["test_all"]["NDCG@10"])
        test_warm = column(boost, lambda f: _warm(f, "test"))
        per_seed = lambda values: " / ".join(f"{v:.4f}" for v in values)  # noqa: E731
        lines.append(f"| {boost} | {per_seed(val_all)} = {mean(val_all):.4f} ({mean(val_all) / base_val_all:.1%}) | "
                     f"{mean(val_warm):.4f} ({mean(val_warm) / base_val_warm:.1%}) | {mean(val_cold):.4f} | "
                     f"{per_seed(cold_hr)} = {mean(cold_hr):.4f} | {per_seed(test_all)} = {mean(test_all):.4f}"
                     f"{sd(test_all)} | {mean(test_warm):.4f}{sd(test_warm)} ({mean(test_warm) / base_test_warm:.1%}) |")
    return "\n".join(lines)


def unseen_rankings(model, split, held_out, boosts) -> dict[str, dict]:
    """For each boost of ``boosts`` (keyed ``f"{boost:g}"``): validation and test NDCG@10 / HR@10 of every
    user and of the cold-start users (whose target is a held-out item), ranked with the model's
    ``new_item_boost`` set to that boost. The boost adds itself to the score of every item the model does
    not know and to nothing else, so the users' scores are computed once and the boost added to them."""
    from dataclasses import replace

    from common.evaluation import evaluate_scores
    from common.sequence import evaluation_rows, sequence_scores
    from simulations.baselines import cold_start_users

    kept = model.settings
    model.settings = replace(kept, new_item_boost=0.0)
    try:
        groups = {}
        for which in ("validation", "test"):
            for group, users in (("all", split.eval_users()), ("cold", cold_start_users(split, held_out, which))):
                rows = evaluation_rows(split, which, kept.history_len, users)
                groups[f"{which}_{group}"] = (which, users, sequence_scores(model, rows))
    finally:
        model.settings = kept
    unseen = (~model.known[: model.num_items]).numpy().astype(np.float32)
    out = {}
    for boost in boosts:
        figures = {}
        for key, (which, users, scores) in groups.items():
            metrics = evaluate_scores(scores + np.float32(boost) * unseen, split, which, users)
            figures[key] = {"users": len(users), "NDCG@10": round(metrics["NDCG@10"], 5),
                            "HR@10": round(metrics["HR@10"], 5)}
        out[f"{boost:g}"] = figures
    return out


if __name__ == "__main__":
    app()
