"""``audit.html``: the accounting audit as one self-contained page (plots embedded as PNG data URIs,
inline CSS, no external assets), readable offline by a privacy officer."""

from __future__ import annotations

import base64
import html
from typing import Any

from server.plots import histogram_figure, png_bytes, privacy_figure, quality_figure

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;color:#1d1d1f;
line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.statement{background:#f2f6fc;border-left:4px solid #3569b5;padding:.8rem 1rem;margin:1rem 0}
.nodp{background:#fff4e5;border-left-color:#d9822b}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #d0d0d0;padding:.3rem .55rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#146c2e;font-weight:600}.fail{color:#b3261e;font-weight:600}.na{color:#666}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots figure{margin:0}.plots img{max-width:520px;border:1px solid #eee}
.scroll{max-height:420px;overflow:auto;display:inline-block}
small,.muted{color:#555}ul.problems{margin:.2rem 0 .2rem 1.2rem;padding:0;font-size:.88rem}
"""

# Sets data-images-rendered on <body> once every embedded plot has decoded (used by the
# headless-browser test; harmless for readers).
SCRIPT = """window.addEventListener('load',function(){var im=document.images,n=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0){n++;}}
document.body.setAttribute('data-images-rendered',n+'/'+im.length);});"""


SHOWN_PROBLEMS = 12


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return _e(x)


def _png(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig, dpi=90)).decode("ascii")


def _plots(report: dict[str, Any], metrics: list[dict]) -> list[tuple[str, str]]:
    """(caption, data URI) for each plot the run's records support."""
    out = []
    if any(r.get("test_NDCG@10") is not None for r in metrics):
        out.append(("Quality against rounds (server-side PROTOCOL evaluation)", _png(quality_figure(metrics))))
    if not (report["dp"]["local"] or report["dp"]["central"]):
        return out
    out.append(("Epsilon against rounds, as the server recorded it", _png(privacy_figure(metrics))))
    clients = [c for c in (report["budget"] or {"clients": []})["clients"] if c["spent"] is not None]
    if clients:
        out.append(("Histogram of per-client example-level epsilon", _png(histogram_figure(
            [c["spent"] for c in clients], report["budget"]["cap"],
            "example-level ε spent (recomputed from the ledger)", "Per-client spend"))))
    return out


def _units_table(units: list[dict]) -> str:
    rows = []
    for u in units:
        if u.get("covered") is False:
            rows.append(f"<tr><td>{_e(u['unit'])}</td><td colspan=4 class=na>not covered: {_e(u['why'])}</td></tr>")
            continue
        eps = u["epsilon"]
        if isinstance(eps, dict):
            eps_text = (f"min {_fmt(eps.get('min'))}, median {_fmt(eps.get('median'))}, max {_fmt(eps.get('max'))} "
                        f"over {eps.get('clients', 0)} clients")
        else:
            eps_text = _fmt(eps)
        detail = u.get("mechanism") or {k: u[k] for k in ("bound", "group_size", "why", "note") if k in u}
        detail_text = "; ".join(f"{_e(k)}: {_fmt(v)}" for k, v in detail.items() if not isinstance(v, list))
        delta_text = _fmt(u["delta"]) + (" (≥ 1: no guarantee)" if u.get("meaningful") is False else "")
        rows.append(f"<tr><td>{_e(u['unit'])}</td><td>{_e(u.get('scope', ''))}</td><td>{eps_text}</td>"
                    f"<td class=num>{delta_text}</td><td><small>{detail_text}</small></td></tr>")
    return ("<table><tr><th>unit</th><th>scope</th><th>epsilon</th><th>delta</th><th>mechanism / how bounded</th></tr>"
            + "".join(rows) + "</table>")


def _checks_table(checks: list[dict]) -> str:
    rows = []
    for c in checks:
        cls = {"pass": "pass", "fail": "fail"}.get(c["status"], "na")
        problems = "".join(f"<li>{_e(p)}</li>" for p in c["problems"][:SHOWN_PROBLEMS])
        more = (f"<li>… and {len(c['problems']) - SHOWN_PROBLEMS} more (all are listed in audit.json)</li>"
                if len(c["problems"]) > SHOWN_PROBLEMS else "")
        rows.append(f"<tr><td class={cls}>{_e(c['status'].upper())}</td><td>{_e(c['title'])}</td>"
                    f"<td>{_e(c['reason'])}{'<ul class=problems>' + problems + more + '</ul>' if problems else ''}</td></tr>")
    return "<table><tr><th>result</th><th>check</th><th>reason</th></tr>" + "".join(rows) + "</table>"


def _budget_table(budget: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(c['client_id'])}</td><td class=num>{_fmt(c['cap'])}</td><td class=num>{_fmt(c['spent'])}</td>"
        f"<td class=num>{_fmt(c['remaining'])}</td><td class=num>{c['sessions']}</td>"
        f"<td class=num>{c['refusals_this_run']}</td></tr>" for c in budget["clients"])
    return ("<div class=scroll><table><tr><th>client</th><th>cap</th><th>spent</th><th>remaining</th><th>sessions</th>"
            "<th>refusals (this run)</th></tr>" + rows + "</table></div>")


def render_html(report: dict[str, Any], metrics: list[dict]) -> str:
    """The whole page for ``report`` (audit.json's content) and the run's metrics rows."""
    no_dp = not (report["dp"]["local"] or report["dp"]["central"])
    plots = "".join(f"<figure><img alt='{_e(c)}' src='{uri}'><figcaption><small>{_e(c)}</small></figcaption></figure>"
                    for c, uri in _plots(report, metrics))
    verdict = ("<span class=pass>all consistency checks pass</span>" if report["all_checks_passed"]
               else "<span class=fail>at least one consistency check FAILED</span>")
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in report["versions"].items() if not isinstance(v, dict))
    budget = report["budget"]
    body = [
        f"<h1>Privacy audit of run {_e(report['run_id'])}</h1>",
        f"<p class=muted>{_e(report['run_dir'])} · {_e(report['rounds_completed'])} rounds · generated "
        f"{_e(report['generated_at'])} · {verdict}</p>",
        f"<div class='statement{' nodp' if no_dp else ''}'>{_e(report['statement'])}</div>",
    ]
    if not no_dp:
        body += ["<h2>Guarantees by privacy unit</h2>", _units_table(report["units"]),
                 f"<p class=muted>Library versions of the run: {versions}.</p>"]
    body += ["<h2>Consistency checks</h2>", _checks_table(report["checks"])]
    if plots:
        body += ["<h2>Plots</h2>", f"<div class=plots>{plots}</div>"]
    if budget and budget["clients"]:
        body += ["<h2>Budget per client</h2>",
                 f"<p>Cap {budget['cap']:g} per client (policy: {_e(budget['policy'])}); {budget['clients_with_ledger']} "
                 f"ledgers; {budget['refusals_total']} refusals in this run ({budget['refusals_unattributed']} from "
                 f"nodes without a ledger session).</p>", _budget_table(budget)]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>privrec privacy audit: {_e(report['run_id'])}</title><style>{STYLE}</style>"
            f"<script>{SCRIPT}</script></head><body>" + "\n".join(body) + "</body></html>\n")
