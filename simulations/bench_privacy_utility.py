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
plot ``privacy-utility.png`` go to ``--out``; ``--table`` prints the markdown table of what is there.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import typer

from common.io import write_bytes_atomic, write_json_atomic
from common.privacy import client_schedule, noise_for_epsilon, session_sensitivity
from common.device_policy import DevicePolicy
from common.run_config import resolve

RESULTS = Path(__file__).parent / "results" / "privacy-utility"
app = typer.Typer(add_completion=False)


def noise_for(epsilon: float, cfg: dict) -> float:
    """Noise multiplier of a default session costing ``epsilon`` (accounted at 2C)."""
    schedule = client_schedule(cfg)
    per_unit = noise_for_epsilon(epsilon, cfg["delta"], schedule.sample_rate, schedule.steps, cfg["accountant"])
    return session_sensitivity(cfg["examples-per-user"], "add-remove") * per_unit


def run_point(label: str, overrides: dict, node_config: dict, seed: int, work: Path) -> dict:
    """One federated run through the product's server and client code; its PROTOCOL result."""
    from server.federation import Federation
    from simulations.inprocess_grid import InProcessGrid

    cfg = {**overrides, "seed": seed, "output-dir": str(work), "run-name": f"{label}-seed{seed}"}
    shutil.rmtree(work / cfg["run-name"], ignore_errors=True)
    folder = Federation(InProcessGrid(943, cfg, node_config=node_config), cfg).run()
    return json.loads((folder / "result.json").read_text())


def _plot(rows: list[dict], path: Path) -> None:
    from server.plots import _pyplot, png_bytes

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    private = sorted((r for r in rows if r["epsilon"] is not None), key=lambda r: r["epsilon"])
    ax.plot([r["epsilon"] for r in private], [r["ndcg"] for r in private], "o-", color="#3569b5",
            label="federated default (local DP)")
    for r in rows:
        if r["epsilon"] is None:
            ax.axhline(r["ndcg"], color="#3569b5", linestyle=":", label="same, without DP (no guarantee)")
    for name, value, colour in REFERENCES:
        ax.axhline(value, color=colour, linestyle="--", label=name)
    ax.set_xlabel("example-level epsilon per client (delta 1e-5)")
    ax.set_ylabel("test NDCG@10")
    ax.set_title("Privacy-utility curve (MovieLens-100K, 943 clients)")
    ax.legend(fontsize=7)
    write_bytes_atomic(path, png_bytes(fig))


# Reference lines (test NDCG@10 on the same split; their result files are in simulations/results/).
REFERENCES = (("popularity (non-private)", 0.0449, "#888888"), ("training-free text heuristic", 0.0548, "#b3261e"),
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
    lines = ["| example ε per client | noise multiplier | test NDCG@10 | test HR@10 | seed | file |",
             "|---|---|---|---|---|---|"]
    for r in sorted(_rows(out), key=lambda r: math.inf if r["epsilon"] is None else r["epsilon"]):
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        noise = "-" if r["noise"] is None else f"{r['noise']:.2f}"
        lines.append(f"| {eps} | {noise} | {r['ndcg']:.4f} | {r['hr']:.4f} | {r['seed']} | {r['file']} |")
    return "\n".join(lines)


@app.command()
def main(seed: int = typer.Option(0), epsilons: str = typer.Option("1,2,4,8", help="comma-separated targets"),
         skip_no_dp: bool = typer.Option(False, "--skip-no-dp", help="do not run the point without local DP"),
         out: Path = typer.Option(RESULTS),
         work: Path = typer.Option(Path("runs") / "privacy-utility", help="run folders (not kept)"),
         table: bool = typer.Option(False, help="only print the table of the results in --out")) -> None:
    """Run each point and write its result file; then draw the curve."""
    if not table:
        defaults = resolve({})
        points: list[tuple[str, dict, dict]] = []
        for text in epsilons.split(","):
            eps = float(text)
            # one session fits the budget (its epsilon is at most eps), and no device policy allows more than 8
            points.append((f"eps{eps:g}", {"noise-multiplier": noise_for(eps, defaults),
                                           "client-epsilon-budget": min(eps, DevicePolicy().epsilon_budget)}, {}))
        if not skip_no_dp:
            points.append(("no-dp", {"local-dp": False}, {"privacy-local-dp": False}))
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
