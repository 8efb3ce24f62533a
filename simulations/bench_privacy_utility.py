"""The privacy-utility curve of the federated default: test NDCG@10 at example-level epsilon 1, 2, 4,
8 per client and without DP, everything else the published defaults.

    python -m simulations.bench_privacy_utility [--seed 0] [--epsilons 1,2,4,8] [--skip-no-dp]

Each point is one run of the product's own server (:class:`server.federation.Federation`) and
ClientApp functions, all 943 MovieLens-100K users as clients, in one process
(:class:`simulations.inprocess_grid.InProcessGrid`: the same messages, validation, ledgers, device
policies and aggregation as ``bash scripts/simulate.sh``, without Flower's simulation engine). For
epsilon E the noise multiplier is the smallest for which one session (the default schedule,
accounted at sensitivity 2C) costs E at the default delta, and the client budget is E, so each
device trains once, as in the default run. "No DP" turns local DP off (no clipping, no noise) on
devices whose policy allows it; it has no guarantee. Result files (PROTOCOL section 5) and the
plot ``privacy-utility.png`` (each setting's mean ± sd over the seeds in ``--out``) go to ``--out``;
``--table`` prints the markdown table of what is there and redraws the plot.
"""

from __future__ import annotations

import json
import math
import statistics
import shutil
import sys
import time
from pathlib import Path

import typer

from common.errors import DataFormatError
from common.io import read_json, write_bytes_atomic, write_json_atomic
from common.privacy import client_schedule, noise_for_epsilon, session_sensitivity
from common.device_policy import DevicePolicy
from common.run_config import parse_overrides, resolve
from simulations.private_heuristic import OUT as PRIVATE_HEURISTIC_OUT

RESULTS = Path(__file__).parent / "results" / "privacy-utility"
app = typer.Typer(add_completion=False)


def noise_for(epsilon: float, cfg: dict, sessions: int = 1) -> float:
    """Noise multiplier for which ``sessions`` sessions of ``cfg``'s schedule cost ``epsilon`` together
    (each accounted at 2C)."""
    schedule = client_schedule(cfg)
    per_unit = noise_for_epsilon(epsilon, cfg["delta"], schedule.sample_rate, schedule.steps * sessions,
                                 cfg["accountant"])
    return session_sensitivity(cfg["examples-per-user"], "add-remove") * per_unit


def run_point(label: str, overrides: dict, node_config: dict, seed: int, work: Path) -> dict:
    """One federated run through the product's server and client code; its PROTOCOL result."""
    from server.federation import Federation
    from simulations.inprocess_grid import InProcessGrid

    cfg = {**overrides, "seed": seed, "output-dir": str(work), "run-name": f"{label}-seed{seed}"}
    shutil.rmtree(work / cfg["run-name"], ignore_errors=True)
    folder = Federation(InProcessGrid(943, cfg, node_config=node_config), cfg).run()
    return json.loads((folder / "result.json").read_text())


def points(rows: list[dict]) -> list[dict]:
    """The curve's points: the result files of one setting (an epsilon, or no DP) over seeds, with the mean,
    the sample standard deviation (0 for one seed) and the seeds, ordered by epsilon (no DP last)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["file"].rsplit("-seed", 1)[0], []).append(r)
    out = []
    for label, rs in groups.items():
        ndcg, hr = [r["ndcg"] for r in rs], [r["hr"] for r in rs]
        out.append({"label": label, "epsilon": max(r["epsilon"] for r in rs) if rs[0]["epsilon"] is not None else None,
                    "noise": rs[0]["noise"], "ndcg": statistics.mean(ndcg), "hr": statistics.mean(hr),
                    "ndcg_sd": statistics.stdev(ndcg) if len(ndcg) > 1 else 0.0,
                    "hr_sd": statistics.stdev(hr) if len(hr) > 1 else 0.0,
                    "seeds": sorted(r["seed"] for r in rs), "per_seed": [round(v, 4) for v in ndcg]})
    return sorted(out, key=lambda p: math.inf if p["epsilon"] is None else p["epsilon"])


def _plot(rows: list[dict], path: Path) -> None:
    from server.plots import _pyplot, png_bytes

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    curve = points(rows)
    private = [p for p in curve if p["epsilon"] is not None]
    ax.errorbar([p["epsilon"] for p in private], [p["ndcg"] for p in private],
                yerr=[p["ndcg_sd"] for p in private], fmt="o-", capsize=3, color="#3569b5",
                label="federated default (local DP; mean ± sd over seeds)")
    for p in curve:
        if p["epsilon"] is None:
            ax.axhline(p["ndcg"], color="#3569b5", linestyle=":", label="same, without DP (no guarantee)")
    if PRIVATE_HEURISTIC.exists():  # python -m simulations.private_heuristic
        heuristic = _private_heuristic_points(PRIVATE_HEURISTIC)
        ax.plot([p["epsilon"] for p in heuristic], [p["test_NDCG@10_mean"] for p in heuristic], "s--",
                color="#b3261e",
                label="training-free heuristic, popularity under local DP\n(interaction-level epsilon)")
    else:
        print(f"{PRIVATE_HEURISTIC} is missing: the plot leaves out the private heuristic "
              "(python -m simulations.private_heuristic writes it)", file=sys.stderr)
    for name, value, colour in REFERENCES:
        ax.axhline(value, color=colour, linestyle="--", label=name)
    ax.set_xlabel("epsilon per device (delta 1e-5): example level for the model, interaction level for the heuristic",
                  fontsize=7)
    ax.set_ylabel("test NDCG@10")
    ax.set_title("Privacy-utility curve (MovieLens-100K, 943 clients)")
    ax.legend(fontsize=7)
    write_bytes_atomic(path, png_bytes(fig))


PRIVATE_HEURISTIC = PRIVATE_HEURISTIC_OUT / "private-heuristic.json"


def _private_heuristic_points(path: Path) -> list[dict]:
    """The private heuristic's points (epsilon, mean test NDCG@10) from its record; a DataFormatError names the
    file when a point lacks them."""
    record = read_json(path)
    points = record.get("points") if isinstance(record, dict) else None
    if not isinstance(points, list) or not all(
            isinstance(p, dict) and isinstance(p.get("epsilon"), (int, float))
            and isinstance(p.get("test_NDCG@10_mean"), (int, float)) for p in points):
        raise DataFormatError(path, "expected 'points', each with a numeric epsilon and test_NDCG@10_mean")
    return points
# Reference lines (test NDCG@10 on the same split; their result files are in simulations/results/).
REFERENCES = (("popularity (non-private)", 0.0449, "#888888"),
              ("training-free text heuristic (exact popularity)", 0.0548, "#b3261e"),
              ("zero-shot encoder", 0.0201, "#7a7a00"))


def _rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("*-test.json")):
        r = json.loads(f.read_text())
        eps = r["privacy"].get("epsilon") if r["privacy"].get("unit") == "example" else None
        rows.append({"file": f.name, "epsilon": eps, "ndcg": r["metrics"]["NDCG@10"], "hr": r["metrics"]["HR@10"],
                     "noise": r["config"].get("noise-multiplier") if eps is not None else None,
                     "seed": r["seed"], "seconds": r["wall_seconds"]})
    return rows


def markdown_table(out: Path) -> str:
    """The curve as a markdown table: one row per setting, mean ± sd over the seeds present."""
    lines = ["| example ε per client (δ 1e-5) | noise multiplier | test NDCG@10 | per seed | test HR@10 | seeds |",
             "|---|---|---|---|---|---|"]
    for p in points(_rows(out)):
        eps = "no DP" if p["epsilon"] is None else f"{p['epsilon']:.2f}"
        noise = "-" if p["noise"] is None else f"{p['noise']:.2f}"
        lines.append(f"| {eps} | {noise} | {p['ndcg']:.4f} ± {p['ndcg_sd']:.4f} | "
                     f"{' / '.join(f'{v:.4f}' for v in p['per_seed'])} | {p['hr']:.4f} ± {p['hr_sd']:.4f} | "
                     f"{', '.join(map(str, p['seeds']))} |")
    return "\n".join(lines)


@app.command()
def main(seed: int = typer.Option(0), epsilons: str = typer.Option("1,2,4,8", help="comma-separated targets"),
         skip_no_dp: bool = typer.Option(False, "--skip-no-dp", help="do not run the point without local DP"),
         out: Path = typer.Option(RESULTS),
         work: Path = typer.Option(Path("runs") / "privacy-utility", help="run folders (not kept)"),
         table: bool = typer.Option(False, help="only print the table of the results in --out and redraw the "
                                                "plot from them"),
         set_: list[str] = typer.Option([], "--set", help="run-config KEY=VALUE on every point (then give --out "
                                                          "a folder of its own)")) -> None:
    """Run each point and write its result file; then draw the curve."""
    if not table:
        base = parse_overrides(set_)
        if base and out.resolve() == RESULTS.resolve():
            raise typer.BadParameter("--set changes the curve: give --out a folder of its own (the results root holds "
                                     "the published defaults' curve)")
        defaults = resolve(base)
        points: list[tuple[str, dict, dict]] = []
        for text in epsilons.split(","):
            eps = float(text)
            # one session fits the budget (its epsilon is at most eps), and no device policy allows more than 8
            points.append((f"eps{eps:g}", {**base, "noise-multiplier": noise_for(eps, defaults),
                                           "client-epsilon-budget": min(eps, DevicePolicy().epsilon_budget)}, {}))
        if not skip_no_dp:
            points.append(("no-dp", {**base, "local-dp": False}, {"privacy-local-dp": False}))
        for label, overrides, node_config in points:
            t0 = time.perf_counter()
            result = run_point(label, overrides, node_config, seed, work)
            trained = result["privacy"].get("epsilon") or 0.0
            if "noise-multiplier" in overrides and trained < 0.5 * overrides["client-epsilon-budget"]:
                raise RuntimeError(f"{label}: the devices spent epsilon {trained}: they refused the run (a result "
                                   f"without training is not a point of the curve)")
            write_json_atomic(out / f"{label}-seed{seed}-test.json", result)
            print(json.dumps({"point": label, "NDCG@10": result["metrics"]["NDCG@10"],
                              "epsilon": result["privacy"].get("epsilon"),
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    _plot(_rows(out), out / "privacy-utility.png")
    print(markdown_table(out))


if __name__ == "__main__":
    app()
