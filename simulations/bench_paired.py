"""Paired comparisons of the published rankers on the same users (:mod:`simulations.paired`).

    python -m simulations.bench_paired NAME           # a published comparison (COMPARISONS), test and validation
    python -m simulations.bench_paired NAME --a SIDE [--a SIDE ...] --b SIDE [--b SIDE ...] [--which test]
    python -m simulations.bench_paired --table        # the summary's table from the records

A SIDE is one of:
- run folders, finished sequence-model runs (the final global model, as ``bash scripts/simulate.sh`` writes
  ``runs/<run-name>``); several folders, the seeds of one configuration, score each user by the mean of
  their per-user NDCG@10;
- ``personal:FOLDER`` entries: those models with each device's personal part fitted on what the user holds
  before the target (:mod:`simulations.bench_personal` at its published settings);
- ``reference:NAME``, one training-free ranker (:data:`REFERENCES`); ``private-heuristic-E`` is the
  heuristic with its counts from a simulated local-DP release at interaction-level epsilon E, each user
  scored by the mean over the release's draws (:mod:`simulations.private_heuristic`).

Every member is checked before it is compared: a run folder's final model must reproduce the figure of
that split its run recorded (the final row of ``metrics.jsonl``, and for test also ``result.json``), a
private heuristic the figure of its record. Written to ``--out/NAME.json``: both sides, the split, each
side's member count, and the comparison (both means, the difference with its 95% bootstrap interval over
users from a generator seeded with 0, and the sign test where both sides average the same number of
members: averaging more members spreads hits over more users and would bias the signs; even then its p is
indicative, as members that vary differently spread differently), so the record is
the same on every rerun. A published comparison writes ``NAME-test.json`` and ``NAME-validation.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from common.io import read_json, read_jsonl, write_json_atomic
from common.split import Split
from simulations.paired import compare_paired

OUT = Path(__file__).parent / "results" / "paired"
BOOTSTRAP_SEED = 0
PRIVATE = "private-heuristic-"
REFERENCES = ("popularity", "heuristic", "text-prior", *(f"{PRIVATE}{e:g}" for e in (1, 2, 4, 8)))
DEFAULT_RUNS = [f"runs/default-seed{s}" for s in range(3)]  # the README's three runs of the federated default


def curve(label: str) -> list[str]:
    """The privacy-utility curve's three runs of one point (``python -m simulations.bench_privacy_utility``)."""
    return [f"runs/privacy-utility/{label}-seed{s}" for s in range(3)]


# name -> (side a, side b): the comparisons the README's claims rest on
COMPARISONS: dict[str, tuple[list[str], list[str]]] = {
    "default-vs-heuristic": (DEFAULT_RUNS, ["reference:heuristic"]),
    "default-vs-popularity": (DEFAULT_RUNS, ["reference:popularity"]),
    "default-vs-text-prior": (DEFAULT_RUNS, ["reference:text-prior"]),
    "personalised-vs-default": ([f"personal:{r}" for r in DEFAULT_RUNS], DEFAULT_RUNS),
    "personalised-vs-heuristic": ([f"personal:{r}" for r in DEFAULT_RUNS], ["reference:heuristic"]),
    "heuristic-vs-popularity": (["reference:heuristic"], ["reference:popularity"]),
    "default-vs-private-heuristic-8": (DEFAULT_RUNS, ["reference:private-heuristic-8"]),
    "epsilon-8-vs-no-dp": (curve("eps8"), curve("no-dp")),
    "epsilon-4-vs-epsilon-8": (curve("eps4"), curve("eps8")),
    **{f"epsilon-{e}-vs-private-heuristic-{e}": (curve(f"eps{e}"), [f"reference:{PRIVATE}{e}"]) for e in (1, 2, 4, 8)},
}
app = typer.Typer(add_completion=False)


def _recorded(folder: Path, which: str) -> float:
    """The ``which`` NDCG@10 a run recorded for its final model: that of the highest-round row of its
    ``metrics.jsonl`` carrying the figure (BadParameter naming the file and field)."""
    key = "val_NDCG@10" if which == "validation" else "test_NDCG@10"
    path = folder / "metrics.jsonl"
    if not path.exists():
        raise typer.BadParameter(f"{path}: missing (is {folder} a finished run folder?)")
    rows = [r for r in read_jsonl(path) if key in r]
    if not rows:
        raise typer.BadParameter(f"{path}: no row has {key!r}: nothing to check the model against")
    for row in rows:
        if not isinstance(row.get("round"), int) or not isinstance(row[key], (int, float)):
            raise typer.BadParameter(f"{path}: a row with {key!r} needs an integer 'round' and a number, got "
                                     f"round {row.get('round')!r}, {key} {row[key]!r}")
    return float(max(rows, key=lambda r: r["round"])[key])


def _run_scores(folder: Path, which: str, personal: bool = False) -> tuple[Split, np.ndarray, np.ndarray]:
    """(split, users, per-user NDCG@10 on ``which``) of a run folder's final global model, refused unless it
    reproduces the figures its run recorded; with ``personal``, of that model with each user's personal
    part on top."""
    from common.evaluation import rank_targets
    from common.metrics import ndcg_at_10
    from common.sequence import evaluation_rows, sequence_scores
    from simulations.bench_personal import load_run

    config_path, result_path = folder / "config.json", folder / "result.json"
    for path in (config_path, result_path):
        if not path.exists():
            raise typer.BadParameter(f"{path}: missing (is {folder} a finished run folder?)")
    seed = read_json(config_path).get("seed")
    if not isinstance(seed, int):
        raise typer.BadParameter(f"{config_path}: no integer 'seed'")
    split, runtime, _ = load_run(folder, seed)
    users = split.eval_users()
    personal_scores = None
    if personal:  # the global scores come with the personalised ones
        from common.personalisation import PersonalSettings
        from simulations.bench_personal import personalised_scores

        fitted_users, global_scores, personal_scores = personalised_scores(runtime.model, split, which,
                                                                           PersonalSettings())
        if not np.array_equal(fitted_users, users):
            raise typer.BadParameter(f"{folder}: the personalised users differ from the evaluation users")
    else:
        rows = evaluation_rows(split, which, runtime.model.settings.history_len, users)
        global_scores = sequence_scores(runtime.model, rows)
    ndcg = ndcg_at_10(rank_targets(global_scores, split, which, users))
    recorded = {f"{folder / 'metrics.jsonl'}": _recorded(folder, which)}
    result = read_json(result_path)
    if result.get("split") == which:
        figure = result.get("metrics", {}).get("NDCG@10")
        if not isinstance(figure, (int, float)):
            raise typer.BadParameter(f"{result_path}: no number at metrics.NDCG@10")
        recorded[str(result_path)] = float(figure)
    for source, figure in recorded.items():
        if abs(ndcg.mean() - figure) > 1e-9:
            raise typer.BadParameter(f"{folder}: recomputed {which} NDCG@10 {ndcg.mean():.6f}, {source} recorded "
                                     f"{figure:.6f}; refusing to compare a model that does not reproduce its own "
                                     "figure")
    if personal_scores is not None:
        ndcg = ndcg_at_10(rank_targets(personal_scores, split, which, users))
    return split, users, ndcg


def _private_heuristic_scores(name: str, split, users: np.ndarray, which: str) -> tuple[np.ndarray, int]:
    """(per-user NDCG@10 averaged over the draws, number of draws) of ``private-heuristic-E``, refused unless
    its mean is the figure of its record (``python -m simulations.private_heuristic``)."""
    import simulations.private_heuristic as private

    epsilon = float(name[len(PRIVATE):])
    record_path = private.OUT / "private-heuristic.json"
    if not record_path.exists():
        raise typer.BadParameter(f"{record_path}: missing; run python -m simulations.private_heuristic first")
    record = read_json(record_path)
    if not isinstance(record.get("points"), list) or not isinstance(record.get("draws"), int):
        raise typer.BadParameter(f"{record_path}: needs a list 'points' and an integer 'draws'")
    points = [p for p in record["points"] if p.get("epsilon") == epsilon]
    if len(points) != 1:
        raise typer.BadParameter(f"{record_path}: no single point at epsilon {epsilon:g}")
    point, draws = points[0], record["draws"]
    for field in ("chosen_weight", f"{which}_NDCG@10_mean"):
        if not isinstance(point.get(field), (int, float)):
            raise typer.BadParameter(f"{record_path}: the point at epsilon {epsilon:g} has no number {field!r}")
    inputs = private.heuristic_inputs(split)
    if not np.array_equal(inputs.users, users):
        raise typer.BadParameter("the private heuristic's users differ from the comparison's")
    weight = private.chosen_weight(inputs, epsilon, draws)[0]
    if weight != point["chosen_weight"]:
        raise typer.BadParameter(f"{record_path}: epsilon {epsilon:g} records weight {point['chosen_weight']}, "
                                 f"the validation choice recomputed is {weight}")
    ndcg = private.private_heuristic_ndcg(inputs, which, epsilon, weight, draws).mean(axis=0)
    if abs(ndcg.mean() - point[f"{which}_NDCG@10_mean"]) > 1e-9:
        raise typer.BadParameter(f"{record_path}: epsilon {epsilon:g} records {which} NDCG@10 "
                                 f"{point[f'{which}_NDCG@10_mean']:.6f}, recomputed {ndcg.mean():.6f}")
    return ndcg, draws


def _reference_scores(name: str, split, users: np.ndarray, which: str) -> tuple[np.ndarray, int]:
    """(per-user NDCG@10, members averaged) of a training-free ranker (:mod:`common.reference_scores`)."""
    from common.evaluation import rank_targets
    from common.metrics import ndcg_at_10
    from common.reference_scores import HEURISTIC_DECAY, HEURISTIC_HISTORY, HEURISTIC_POP_WEIGHT, \
        heuristic_scores, popularity_scores
    from common.run_config import resolve
    from common.sequence import evaluation_rows
    from common.sequence_runtime import item_text_vectors

    if name.startswith(PRIVATE):
        return _private_heuristic_scores(name, split, users, which)
    if name == "popularity":
        scores = popularity_scores(split, users)
    else:
        item_text = item_text_vectors(split.data, resolve({})["item-max-length"])
        rows = evaluation_rows(split, which, HEURISTIC_HISTORY, users)
        weight = HEURISTIC_POP_WEIGHT if name == "heuristic" else 0.0
        scores = heuristic_scores(item_text, rows, split.train_item_counts(), HEURISTIC_DECAY, weight)
    return ndcg_at_10(rank_targets(scores, split, which, users)), 1


def side_scores(sides: list[str], which: str, split=None) -> tuple[object, np.ndarray, np.ndarray, int]:
    """(split, users, per-user NDCG@10, members averaged) of one side: the mean over its run folders (all
    plain or all ``personal:``, each once), or one reference."""
    references = [s for s in sides if s.startswith("reference:")]
    if references and len(sides) > 1:
        raise typer.BadParameter(f"a side is run folders or one reference, got {sides}")
    if len(set(sides)) != len(sides):
        raise typer.BadParameter(f"a side names a member twice: {sides}")
    if references:
        name = references[0].split(":", 1)[1]
        if name not in REFERENCES:
            raise typer.BadParameter(f"{references[0]}: expected reference:NAME with NAME one of {REFERENCES}")
        if split is None:
            from common.partition import split_for
            from common.run_config import resolve
            split = split_for(resolve({})["dataset"])
        users = split.eval_users()
        ndcg, members = _reference_scores(name, split, users, which)
        return split, users, ndcg, members
    personal = {s.startswith("personal:") for s in sides}
    if len(personal) != 1:
        raise typer.BadParameter(f"a side's run folders are all personal: or all plain, got {sides}")
    per_run = []
    users = None
    for folder in sides:
        is_personal = folder.startswith("personal:")
        run_split, run_users, ndcg = _run_scores(Path(folder.split(":", 1)[1] if is_personal else folder), which,
                                                 is_personal)
        if users is not None and not np.array_equal(run_users, users):
            raise typer.BadParameter(f"{folder}: its evaluation users differ from {sides[0]}'s (another split)")
        split, users = run_split, run_users
        per_run.append(ndcg)
    return split, users, np.mean(per_run, axis=0), len(per_run)


def compare_sides(a: list[str], b: list[str], which: str) -> dict:
    """The record of one comparison (runs are loaded first, so references use their split). The sign test
    runs only when both sides average the same number of members."""
    ordered = sorted((("a", a), ("b", b)), key=lambda side: side[1][0].startswith("reference:"))
    scores: dict[str, np.ndarray] = {}
    members: dict[str, int] = {}
    split, users = None, None
    for key, side in ordered:
        split, side_users, scores[key], members[key] = side_scores(side, which, split)
        if users is not None and not np.array_equal(side_users, users):
            raise typer.BadParameter("the two sides are evaluated on different users (another split)")
        users = side_users
    comparison = compare_paired(scores["a"], scores["b"], np.random.default_rng(BOOTSTRAP_SEED),
                                sign_test=members["a"] == members["b"])
    return {"a": a, "b": b, "which": which, "metric": "NDCG@10", "members": members,
            "bootstrap_seed": BOOTSTRAP_SEED, "comparison": comparison.as_dict()}


def table(folder: Path = OUT) -> str:
    """The summary's markdown table from the records in ``folder``."""
    lines = ["| comparison | split | a | b | a - b (95% interval) | users a higher / b higher | sign test p |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        record = read_json(path)
        c = record["comparison"]
        p = "- (unequal sides)" if c["sign_test_p"] is None else f"{c['sign_test_p']:.2g}"
        lines.append(f"| {path.stem} | {record['which']} | {c['mean_a']:.4f} | {c['mean_b']:.4f} | "
                     f"{c['difference']:+.4f} ({c['ci_low']:+.4f}, {c['ci_high']:+.4f}) | "
                     f"{c['a_higher']} / {c['b_higher']} | {p} |")
    return "\n".join(lines)


@app.command()
def main(name: str = typer.Argument(None, help="the record's name (NAME.json under --out)"),
         a: list[str] = typer.Option(None, help="a run folder, personal:FOLDER or reference:NAME (repeat for seeds)"),
         b: list[str] = typer.Option(None, help="a run folder, personal:FOLDER or reference:NAME (repeat for seeds)"),
         which: str = typer.Option(None, help="validation or test (a published comparison writes both)"),
         out: Path = typer.Option(OUT), show_table: bool = typer.Option(False, "--table")) -> None:
    """Compare two sides user by user and write the record (or print the table of the records)."""
    if show_table:
        print(table(out))
        return
    if which not in (None, "validation", "test"):
        raise typer.BadParameter(f"--which must be validation or test, got {which!r}")
    if name in COMPARISONS and not a and not b:
        if which is not None:
            raise typer.BadParameter(f"{name} is a published comparison: it writes both splits, without --which")
        for split_name in ("test", "validation"):
            record = compare_sides(*COMPARISONS[name], split_name)
            write_json_atomic(out / f"{name}-{split_name}.json", record)
            print(json.dumps({"which": split_name, **record["comparison"]}))
        return
    if not name or not a or not b:
        raise typer.BadParameter(f"give a published comparison ({', '.join(COMPARISONS)}), or NAME with --a and "
                                 "--b, or --table")
    record = compare_sides(list(a), list(b), which or "test")
    write_json_atomic(out / f"{name}.json", record)
    print(json.dumps(record["comparison"]))


if __name__ == "__main__":
    app()
