"""Paired comparisons of the published rankers on the same users (:mod:`simulations.paired`).

    python -m simulations.bench_paired NAME           # a published comparison (COMPARISONS), test and validation
    python -m simulations.bench_paired NAME --a SIDE [--a SIDE ...] --b SIDE [--b SIDE ...] [--which test]
    python -m simulations.bench_paired --table        # the summary's table from the records

A SIDE is a finished sequence-model run folder (its final global model, as ``bash scripts/simulate.sh``
writes ``runs/<run-name>``), ``personal:FOLDER`` (that model with each device's personal part fitted on
what the user holds before the target, :mod:`simulations.bench_personal` at its published settings), or
``reference:NAME``, a training-free ranker (:data:`REFERENCES`). A side of several run folders (the seeds
of one configuration) scores each user by the mean of the folders' per-user NDCG@10. Each run's own figure is recomputed first and the benchmark refuses a folder whose
recomputed mean differs from its ``result.json``. Written to ``--out/NAME.json``: both sides, the split,
and the comparison (both means, the difference with its 95% bootstrap interval over users from a
generator seeded with 0, and the sign test), so the record is the same on every rerun. A published
comparison writes ``NAME-test.json`` and ``NAME-validation.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
import numpy as np
import typer

from common.io import write_json_atomic
from simulations.paired import compare_paired

OUT = Path(__file__).parent / "results" / "paired"
BOOTSTRAP_SEED = 0
# private-heuristic-8: the heuristic with popularity from a simulated local-DP release at interaction-level
# epsilon 8 (simulations/private_heuristic.py: its weight chosen on validation, the mean over its draws)
REFERENCES = ("popularity", "heuristic", "text-prior", "private-heuristic-8")
DEFAULT_RUNS = [f"runs/default-seed{s}" for s in range(3)]  # the README's three runs of the federated default
CURVE = "runs/privacy-utility/{label}-seed{seed}"  # python -m simulations.bench_privacy_utility --seed S
# name -> (side a, side b): the comparisons the README's claims rest on
COMPARISONS: dict[str, tuple[list[str], list[str]]] = {
    "default-vs-heuristic": (DEFAULT_RUNS, ["reference:heuristic"]),
    "default-vs-popularity": (DEFAULT_RUNS, ["reference:popularity"]),
    "default-vs-text-prior": (DEFAULT_RUNS, ["reference:text-prior"]),
    "personalised-vs-default": ([f"personal:{r}" for r in DEFAULT_RUNS], DEFAULT_RUNS),
    "personalised-vs-heuristic": ([f"personal:{r}" for r in DEFAULT_RUNS], ["reference:heuristic"]),
    "heuristic-vs-popularity": (["reference:heuristic"], ["reference:popularity"]),
    "default-vs-private-heuristic-8": (DEFAULT_RUNS, ["reference:private-heuristic-8"]),
    "epsilon-8-vs-no-dp": ([CURVE.format(label="eps8", seed=s) for s in range(3)],
                           [CURVE.format(label="no-dp", seed=s) for s in range(3)]),
    "epsilon-4-vs-epsilon-8": ([CURVE.format(label="eps4", seed=s) for s in range(3)],
                               [CURVE.format(label="eps8", seed=s) for s in range(3)]),
}
app = typer.Typer(add_completion=False)


def _run_scores(folder: Path, which: str, personal: bool = False) -> tuple[object, np.ndarray, np.ndarray]:
    """(split, users, per-user NDCG@10 on ``which``) of a run folder's final global model, checked against
    the figure the run recorded; with ``personal``, of the model with each user's personal part on top."""
    from common.evaluation import rank_targets
    from common.metrics import ndcg_at_10
    from common.sequence import evaluation_rows, sequence_scores
    from simulations.bench_personal import load_run

    config_path, result_path = folder / "config.json", folder / "result.json"
    for path in (config_path, result_path):
        if not path.exists():
            raise typer.BadParameter(f"{path}: missing (is {folder} a finished run folder?)")
    seed = json.loads(config_path.read_text()).get("seed")
    if not isinstance(seed, int):
        raise typer.BadParameter(f"{config_path}: no integer 'seed'")
    split, runtime, _ = load_run(folder, seed)
    users = split.eval_users()
    rows = evaluation_rows(split, which, runtime.model.settings.history_len, users)
    ndcg = ndcg_at_10(rank_targets(sequence_scores(runtime.model, rows), split, which, users))
    result = json.loads(result_path.read_text())
    if result.get("split") == which and abs(ndcg.mean() - result["metrics"]["NDCG@10"]) > 1e-9:
        raise typer.BadParameter(f"{folder}: recomputed {which} NDCG@10 {ndcg.mean():.6f}, the run recorded "
                                 f"{result['metrics']['NDCG@10']:.6f}; refusing to compare a model that does "
                                 "not reproduce its own figure")
    if personal:
        from common.personalisation import PersonalSettings
        from simulations.bench_personal import personalised_scores

        fitted_users, _, scores = personalised_scores(runtime.model, split, which, PersonalSettings())
        if not np.array_equal(fitted_users, users):
            raise typer.BadParameter(f"{folder}: the personalised users differ from the evaluation users")
        ndcg = ndcg_at_10(rank_targets(scores, split, which, users))
    return split, users, ndcg


def _reference_scores(name: str, split, users: np.ndarray, which: str) -> np.ndarray:
    """Per-user NDCG@10 of a training-free ranker (:mod:`common.reference_scores`)."""
    from common.evaluation import rank_targets
    from common.metrics import ndcg_at_10
    from common.reference_scores import HEURISTIC_DECAY, HEURISTIC_HISTORY, HEURISTIC_POP_WEIGHT, \
        heuristic_scores, popularity_scores
    from common.run_config import resolve
    from common.sequence import evaluation_rows
    from common.sequence_runtime import item_text_vectors

    if name == "private-heuristic-8":
        from simulations.private_heuristic import chosen_weight, heuristic_inputs, private_heuristic_ndcg

        inputs = heuristic_inputs(split)
        if not np.array_equal(inputs.users, users):
            raise typer.BadParameter("the private heuristic's users differ from the comparison's")
        return private_heuristic_ndcg(inputs, which, 8.0, chosen_weight(inputs, 8.0)[0]).mean(axis=0)
    if name == "popularity":
        scores = popularity_scores(split, users)
    else:
        item_text = item_text_vectors(split.data, resolve({})["item-max-length"])
        rows = evaluation_rows(split, which, HEURISTIC_HISTORY, users)
        weight = HEURISTIC_POP_WEIGHT if name == "heuristic" else 0.0
        scores = heuristic_scores(item_text, rows, split.train_item_counts(), HEURISTIC_DECAY, weight)
    return ndcg_at_10(rank_targets(scores, split, which, users))


def side_scores(sides: list[str], which: str, split=None) -> tuple[object, np.ndarray, np.ndarray]:
    """(split, users, per-user NDCG@10) of one side: the mean over its run folders, or one reference."""
    references = [s for s in sides if s.startswith("reference:")]
    if references and len(sides) > 1:
        raise typer.BadParameter(f"a side is run folders or one reference, got {sides}")
    if references:
        name = references[0].split(":", 1)[1]
        if name not in REFERENCES:
            raise typer.BadParameter(f"{references[0]}: expected reference:NAME with NAME one of {REFERENCES}")
        if split is None:
            from common.partition import split_for
            from common.run_config import resolve
            split = split_for(resolve({})["dataset"])
        users = split.eval_users()
        return split, users, _reference_scores(name, split, users, which)
    per_run = []
    users = None
    for folder in sides:
        personal = folder.startswith("personal:")
        run_split, run_users, ndcg = _run_scores(Path(folder.split(":", 1)[1] if personal else folder), which,
                                                 personal)
        if users is not None and not np.array_equal(run_users, users):
            raise typer.BadParameter(f"{folder}: its evaluation users differ from {sides[0]}'s (another split)")
        split, users = run_split, run_users
        per_run.append(ndcg)
    return split, users, np.mean(per_run, axis=0)


def compare_sides(a: list[str], b: list[str], which: str) -> dict:
    """The record of one comparison (runs are loaded first, so references use their split)."""
    ordered: list[tuple[str, list[str]]] = sorted((("a", a), ("b", b)), key=lambda s: s[1][0].startswith("reference:"))
    scores: dict[str, np.ndarray] = {}
    split, users = None, None
    for key, side in ordered:
        split, side_users, scores[key] = side_scores(side, which, split)
        if users is not None and not np.array_equal(side_users, users):
            raise typer.BadParameter("the two sides are evaluated on different users (another split)")
        users = side_users
    comparison = compare_paired(scores["a"], scores["b"], np.random.default_rng(BOOTSTRAP_SEED))
    return {"a": a, "b": b, "which": which, "metric": "NDCG@10", "bootstrap_seed": BOOTSTRAP_SEED,
            "comparison": comparison.as_dict()}


def table(folder: Path = OUT) -> str:
    """The summary's markdown table from the records in ``folder``."""
    lines = ["| comparison | split | a | b | a - b (95% interval) | users a higher / b higher | sign test p |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        c = record["comparison"]
        lines.append(f"| {path.stem} | {record['which']} | {c['mean_a']:.4f} | {c['mean_b']:.4f} | "
                     f"{c['difference']:+.4f} ({c['ci_low']:+.4f}, {c['ci_high']:+.4f}) | "
                     f"{c['a_higher']} / {c['b_higher']} | {c['sign_test_p']:.2g} |")
    return "\n".join(lines)


@app.command()
def main(name: str = typer.Argument(None, help="the record's name (NAME.json under --out)"),
         a: list[str] = typer.Option(None, help="a run folder or reference:NAME (repeat for seeds)"),
         b: list[str] = typer.Option(None, help="a run folder or reference:NAME (repeat for seeds)"),
         which: str = typer.Option("test", help="validation or test"),
         out: Path = typer.Option(OUT), show_table: bool = typer.Option(False, "--table")) -> None:
    """Compare two sides user by user and write the record (or print the table of the records)."""
    if show_table:
        print(table(out))
        return
    if which not in ("validation", "test"):
        raise typer.BadParameter(f"--which must be validation or test, got {which!r}")
    if name in COMPARISONS and not a and not b:
        for split_name in ("test", "validation"):
            record = compare_sides(*COMPARISONS[name], split_name)
            write_json_atomic(out / f"{name}-{split_name}.json", record)
            print(json.dumps({"which": split_name, **record["comparison"]}))
        return
    if not name or not a or not b:
        raise typer.BadParameter(f"give a published comparison ({', '.join(COMPARISONS)}), or NAME with --a and "
                                 "--b, or --table")
    record = compare_sides(list(a), list(b), which)
    write_json_atomic(out / f"{name}.json", record)
    print(json.dumps(record["comparison"]))


if __name__ == "__main__":
    app()
