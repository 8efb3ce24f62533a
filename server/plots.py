"""The run's plots, drawn one way for the run folder (quality.png, epsilon.png) and the audit page."""

from __future__ import annotations

import io

QUALITY = (("test_NDCG@10", "server test NDCG@10"), ("test_HR@10", "server test HR@10"),
           ("federated_NDCG@10", "federated NDCG@10 (noisy DP releases)"))
PRIVACY = (("epsilon_max", "example-level ε, max over clients"),
           ("epsilon_median", "example-level ε, median over clients"),
           ("user_epsilon", "user-level ε (central DP)"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Training-free references of the same split (test NDCG@10), recorded in round 0's row by the server.
REFERENCES = (("ref_popularity_NDCG@10", "popularity (exact counts)", "#888888"),
              ("ref_heuristic_NDCG@10", "training-free text heuristic (uses exact popularity)", "#b3261e"),
              ("ref_text_prior_NDCG@10", "text prior alone (the heuristic without popularity)", "#2e8b57"))


def series_figure(rows: list[dict], series, ylabel: str, title: str, empty_note: str = "",
                  references=()):
    """One line per (key, label) of ``series`` over the rows that hold it, against ``round``; a dashed
    horizontal line per (key, label, colour) of ``references`` that some row holds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in series:
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for key, label, colour in references:
        value = next((r[key] for r in rows if r.get(key) is not None), None)
        if value is not None:
            ax.axhline(value, color=colour, linestyle="--", linewidth=1, label=f"{label}, test NDCG@10 {value:.4f}")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    elif empty_note:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
    return fig


def quality_figure(rows: list[dict]):
    return series_figure(rows, QUALITY, "metric", "Quality of the global model", references=REFERENCES)


def privacy_figure(rows: list[dict]):
    return series_figure(rows, PRIVACY, "epsilon", "Privacy spent", "no DP in this run")


def histogram_figure(values: list[float], cap: float, xlabel: str, title: str):
    """A histogram of ``values`` with the cap drawn as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=20, color="#3569b5")
    ax.axvline(cap, color="#b3261e", linestyle="--", label=f"cap {cap:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clients")
    ax.set_title(title)
    ax.legend()
    return fig


def png_bytes(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()
