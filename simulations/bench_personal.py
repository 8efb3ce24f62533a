"""Personalised quality of the federated default, measured where the personal part lives: each device
fits its offset (:mod:`common.personalisation`) on its own history, on top of the final global model,
and ranks its own held-out item with it.

    python -m simulations.bench_personal --seed S [--run runs/default-seedS]   # validation and test
    python -m simulations.bench_personal --seed S --grid                          # the tuning grid, validation
    python -m simulations.bench_personal --table                                  # the summary of the files

With ``--run`` the final global model of a finished run folder is used (the README's main command
writes ``runs/<run-name>``); without it the default is trained first, in one process
(:class:`simulations.inprocess_grid.InProcessGrid`), into ``runs/personal-seedS``. For the validation
item a device holds its train interactions; for the test item also its validation interaction
(PROTOCOL section 2): the offset is refitted on what the device holds before each target. Users are
fitted in batches of ``USERS_PER_BATCH``: each user's offset depends on its own rows alone, the one its
device fits alone up to floating-point rounding (:mod:`common.personalisation`). The global figures
are computed from the same model and inputs.

    python -m simulations.bench_personal --seed S --run DIR --set FIELD=VALUE --name NAME   # a probe, validation only
    python -m simulations.bench_personal --seed S --run runs/cold-start/cold-seedS --cold-start   # cold-start users
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import typer

from common.io import write_json_atomic
from common.personalisation import PersonalSettings
from common.results import result_record

RESULTS = Path(__file__).parent / "results" / "personal"
# The grid declared before its first runs (chosen on validation: the highest mean of the seeds'
# NDCG@10; test read only for the chosen settings).
GRID = tuple(PersonalSettings(steps=s, learning_rate=0.05, l2=l2, rows=50) for s in (20, 50) for l2 in (0.03, 0.1, 0.3))
USERS_PER_BATCH = 256
app = typer.Typer(add_completion=False)


def load_run(run_dir: Path, seed: int, cold_start: bool = False):
    """(the full split, runtime, run config) of a finished sequence-model run folder of ``seed``, its final
    state loaded and checked. ``cold_start``: the run must have the cold-start hold-out (its held-out items
    marked unknown to the model) and ranks at today's default new-item boost; otherwise it must not."""
    from common.io import load_tensors
    from common.partition import split_for
    from common.run_config import resolve, stored_config
    from common.runtimes import make_runtime

    config_path, state_path = run_dir / "config.json", run_dir / "adapters.safetensors"
    if not config_path.exists():
        raise typer.BadParameter(f"{config_path}: missing (is {run_dir} a finished run folder?)")
    cfg = stored_config(json.loads(config_path.read_text()))
    if cfg["user-model"] != "sequence" or bool(cfg["cold-start-holdout"]) != cold_start:
        wanted = "with cold-start-holdout=true (python -m simulations.bench_cold_start keeps them in " \
                 "runs/cold-start/)" if cold_start else "without a cold-start hold-out"
        raise typer.BadParameter(f"{config_path}: this measures a sequence-model run {wanted}")
    if cfg["seed"] != seed:
        raise typer.BadParameter(f"{run_dir}: the run's seed is {cfg['seed']}, not --seed {seed}")
    if not state_path.exists():
        raise typer.BadParameter(f"{state_path}: missing (is {run_dir} a finished run folder?)")
    if cold_start:
        cfg = {**cfg, "sequence-new-item-boost": resolve({})["sequence-new-item-boost"]}
    split = split_for(cfg["dataset"])
    runtime = make_runtime(split.data, cfg, seed=cfg["seed"])
    tensors, _ = load_tensors(state_path)
    runtime.load_state(list(runtime.names), [tensors[n] for n in runtime.names])
    return split, runtime, cfg


def personalised_scores(model, split, which: str, settings: PersonalSettings,
                        users_per_batch: int = USERS_PER_BATCH, users: np.ndarray | None = None,
                        fit_split=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, global scores, personalised scores) for ``users`` (default: every user with a ``which``
    target), ranked from ``split``'s histories; each user's offset is fitted on what the user holds before
    that target in ``fit_split`` (default ``split``; :meth:`common.split.Split.history_rows`), leaving out
    targets the model has no logit for."""
    import torch

    from common.personalisation import fit_offsets, personal_rows, personal_scores
    from common.sequence import concat_rows, evaluation_rows, sequence_scores

    users = split.eval_users() if users is None else users
    fitted = split if fit_split is None else fit_split
    known = model.known[: model.num_items].numpy()
    history_len = model.settings.history_len
    global_scores = sequence_scores(model, evaluation_rows(split, which, history_len, users))
    offsets = []
    for start in range(0, len(users), users_per_batch):
        batch = users[start:start + users_per_batch]
        parts = [personal_rows(fitted, fitted.history_rows(int(u), which), history_len, settings.rows,
                               settings.min_target_rating, known) for u in batch]
        owners = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)])
        offsets.append(fit_offsets(model, concat_rows(parts, history_len), owners, len(batch), settings))
    return users, global_scores, personal_scores(model, global_scores, torch.cat(offsets))


def compared(global_scores: np.ndarray, personal: np.ndarray, split, which: str,
             users: np.ndarray) -> dict[str, dict[str, float]]:
    """Global and personalised PROTOCOL metrics of ``users`` (each matrix ranked once), and the paired
    comparison per user: how many users' NDCG@10 rose or fell, and the mean change."""
    from common.evaluation import rank_targets
    from common.metrics import metrics_from_ranks, ndcg_at_10

    ranks = {k: rank_targets(scores, split, which, users) for k, scores in (("global", global_scores),
                                                                             ("personal", personal))}
    diff = ndcg_at_10(ranks["personal"]) - ndcg_at_10(ranks["global"])
    return {"global": metrics_from_ranks(ranks["global"]), "personal": metrics_from_ranks(ranks["personal"]),
            "paired": {"users_up": int((diff > 0).sum()), "users_down": int((diff < 0).sum()),
                       "mean_NDCG@10_difference": float(diff.mean())}}


def personalised_metrics(model, split, which: str, settings: PersonalSettings) -> dict[str, dict[str, float]]:
    """:func:`compared` for every user with a ``which`` target."""
    users, global_scores, personal = personalised_scores(model, split, which, settings)
    return compared(global_scores, personal, split, which, users)


def cold_start_figures(run: Path, seed: int) -> dict[str, dict]:
    """Test HR@10 and NDCG@10, global and personalised (the chosen settings), of the cold-start users and of
    the other ("warm") users, for a finished ``cold-start-holdout`` run ranked at today's default new-item
    boost, every user from the full split's history (as ``simulations.bench_cold_start`` ranks them). The
    offsets are fitted on the training split without the held-out items (PROTOCOL section 4: no training
    input mentions them), as the global model was trained."""
    from common.partition import split_for
    from common.split import cold_start_items
    from simulations.baselines import cold_start_users

    full, runtime, cfg = load_run(run, seed, cold_start=True)
    cold = cold_start_users(full, cold_start_items(full.data.num_items))
    warm = np.setdiff1d(full.eval_users(), cold)
    out: dict[str, dict] = {"new_item_boost": cfg["sequence-new-item-boost"]}
    trained_on = split_for(cfg["dataset"], cold_start_holdout=True)
    for name, users in (("cold_start_users", cold), ("warm_users", warm)):
        users, global_scores, personal = personalised_scores(runtime.model, full, "test", PersonalSettings(),
                                                             users=users, fit_split=trained_on)
        out[name] = {"users": len(users), **compared(global_scores, personal, full, "test", users)}
    return out


@app.command()
def main(seed: int = typer.Option(0), run: Path = typer.Option(None, help="a finished run folder of the default"),
         grid: bool = typer.Option(False, help="score the tuning grid on validation only"),
         cold_start: bool = typer.Option(False, help="--run is a cold-start-holdout run: score its cold-start and "
                                                     "warm test users with and without the personal part"),
         set_: list[str] = typer.Option([], "--set", help="a PersonalSettings field FIELD=VALUE (a probe: scored on "
                                                          "validation only, written as probe-NAME-seedS.json)"),
         name: str = typer.Option("", help="the probe's name (with --set)"),
         out: Path = typer.Option(RESULTS), table: bool = typer.Option(False, help="print the summary and stop")) -> None:
    """Fit every device's personal offset and score its held-out items."""
    if table:
        print(summary_table(out))
        return
    if bool(set_) != bool(name):
        raise typer.BadParameter("--set and --name go together (a probe is scored on validation only)")
    if cold_start:
        if run is None or grid or set_:
            raise typer.BadParameter("--cold-start needs --run (a folder kept by simulations.bench_cold_start) "
                                     "and takes neither --grid nor --set")
        t0 = time.perf_counter()
        figures = cold_start_figures(run, seed)
        write_json_atomic(out / f"cold-start-seed{seed}.json", {"seed": seed, "run": str(run), **figures,
                                                                "personal": asdict(PersonalSettings()),
                                                                "wall_seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps({k: {g: round(v[g]["HR@10"], 4) for g in ("global", "personal")}
                          for k, v in figures.items() if isinstance(v, dict)}))
        return
    probe = _settings_with(set_) if set_ else None
    t0 = time.perf_counter()
    if run is None:
        run = _train_default(seed)
    split, runtime, cfg = load_run(run, seed)
    model = runtime.model
    run_result = json.loads((run / "result.json").read_text())
    base = {"run": str(run), "run_test_NDCG@10": run_result["metrics"]["NDCG@10"],
            "personal_part": "an offset in item-text space per device, fitted on the device's own history; "
                             "never sent (no DP needed, no epsilon spent)"}
    if grid or probe is not None:
        rows = []
        for settings in (GRID if grid else (probe,)):
            figures = personalised_metrics(model, split, "validation", settings)
            rows.append({"settings": asdict(settings), "validation": figures})
            print(json.dumps(rows[-1]), flush=True)
        path = out / (f"grid-seed{seed}.json" if grid else f"probe-{name}-seed{seed}.json")
        write_json_atomic(path, {"seed": seed, **base, "grid": rows, "wall_seconds": round(time.perf_counter() - t0, 1)})
        return
    settings = PersonalSettings()
    figures = {w: personalised_metrics(model, split, w, settings) for w in ("validation", "test")}
    config = {**base, "personal": asdict(settings), "global": {w: figures[w]["global"] for w in figures},
              "validation": figures["validation"]["personal"], "paired": {w: figures[w]["paired"] for w in figures}}
    record = result_record("federated-dp-personalised", "test", figures["test"]["personal"],
                           len(split.eval_users()), seed, run_result["privacy"], time.perf_counter() - t0, config)
    write_json_atomic(out / f"personalised-seed{seed}.json", record)
    print(json.dumps({w: {k: round(v["NDCG@10"], 4) for k, v in figures[w].items() if "NDCG@10" in v}
                      for w in figures}))


def _settings_with(pairs: list[str]) -> PersonalSettings:
    """The default PersonalSettings with ``FIELD=VALUE`` overrides, each value of its field's type."""
    values = asdict(PersonalSettings())
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in values:
            raise typer.BadParameter(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {sorted(values)}")
        try:
            values[key] = type(values[key])(raw)
        except ValueError:
            raise typer.BadParameter(f"--set {pair!r}: {raw!r} is not a {type(values[key]).__name__}") from None
    try:
        return PersonalSettings(**values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _train_default(seed: int) -> Path:
    import shutil

    import server.federation as federation
    from common.partition import split_for
    from simulations.inprocess_grid import InProcessGrid

    cfg = {"seed": seed, "output-dir": "runs", "run-name": f"personal-seed{seed}"}
    shutil.rmtree(Path("runs") / cfg["run-name"], ignore_errors=True)
    fed = federation.Federation(InProcessGrid(split_for("recbole").data.num_users, cfg), cfg)
    fed.run()
    return fed.folder.root


def grid_table(folder: Path) -> str:
    """Markdown rows: each grid setting's validation NDCG@10 per seed and its mean (the choice's basis)."""
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob("grid-seed*.json"))]
    if not runs:
        return f"no grid-seed*.json in {folder}"
    seeds = [r["seed"] for r in runs]
    lines = ["| steps | l2 | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 3) + "|"]
    lines.append("| global model | | " + " | ".join(f"{r['grid'][0]['validation']['global']['NDCG@10']:.4f}"
                                                for r in runs) + " | " + f"{np.mean([r['grid'][0]['validation']['global']['NDCG@10'] for r in runs]):.4f} |")
    for k, row in enumerate(runs[0]["grid"]):
        values = [r["grid"][k]["validation"]["personal"]["NDCG@10"] for r in runs]
        lines.append(f"| {row['settings']['steps']} | {row['settings']['l2']} | " +
                     " | ".join(f"{v:.4f}" for v in values) + f" | {np.mean(values):.4f} |")
    return "\n".join(lines)


def cold_start_table(folder: Path) -> str:
    """Markdown rows: per seed and mean, test HR@10 of the cold-start users and NDCG@10 of the warm users,
    global and personalised."""
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob("cold-start-seed*.json"))]
    if not runs:
        return f"no cold-start-seed*.json in {folder}"
    columns = {"cold-start HR@10, global": ("cold_start_users", "global", "HR@10"),
               "cold-start HR@10, personalised": ("cold_start_users", "personal", "HR@10"),
               "warm NDCG@10, global": ("warm_users", "global", "NDCG@10"),
               "warm NDCG@10, personalised": ("warm_users", "personal", "NDCG@10")}
    lines = ["| seed | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in runs:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[a][b][c]:.4f}" for a, b, c in columns.values()) + " |")
    lines.append(f"| mean ({len(runs)}) | " + " | ".join(
        f"{np.mean([r[a][b][c] for r in runs]):.4f}" for a, b, c in columns.values()) + " |")
    return "\n".join(lines)


def summary_table(folder: Path) -> str:
    """Markdown rows: per seed and mean ± sd, the global and personalised NDCG@10 on validation and test,
    then the grid."""
    files = sorted(folder.glob("personalised-seed*.json"))
    if not files:
        return f"no personalised-seed*.json in {folder}\n\n" + grid_table(folder)
    records = [json.loads(f.read_text()) for f in files]
    columns = {"validation, global": lambda r: r["config"]["global"]["validation"]["NDCG@10"],
               "validation, personalised": lambda r: r["config"]["validation"]["NDCG@10"],
               "test, global": lambda r: r["config"]["global"]["test"]["NDCG@10"],
               "test, personalised": lambda r: r["metrics"]["NDCG@10"],
               "test HR@10, personalised": lambda r: r["metrics"]["HR@10"]}
    lines = ["| seed | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in records:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{get(r):.4f}" for get in columns.values()) + " |")
    values = {name: [get(r) for r in records] for name, get in columns.items()}
    lines.append(f"| mean ± sd ({len(records)}) | " + " | ".join(
        f"{np.mean(v):.4f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.4f}" for v in values.values()) + " |")
    return "\n".join(lines) + "\n\n" + grid_table(folder) + "\n\n" + cold_start_table(folder)


if __name__ == "__main__":
    app()
