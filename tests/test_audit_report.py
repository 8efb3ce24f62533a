"""``privrec audit RUN_DIR``: the accounting report of a real (in-process) run, and tampered ledgers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.audit.accounting import NO_DP_STATEMENT, write_audit
from server.federation import Federation
from simulations.cli import app
from simulations.inprocess_grid import InProcessGrid

pytestmark = [pytest.mark.audit]


def _run(cfg: dict, nodes: int = 6) -> Path:
    return Federation(InProcessGrid(nodes, cfg), cfg).run()


@pytest.fixture(scope="module")
def dp_run(small_ml100k, tmp_path_factory):
    cfg = {"dataset": str(small_ml100k), "num-server-rounds": 2, "clients-per-round": 3, "evaluate-clients": 0,
           "eval-every": 1, "examples-per-user": 4, "history-len": 3, "max-length": 32, "batch-size": 2,
           "max-update-norm": 1000.0, "output-dir": str(tmp_path_factory.mktemp("runs")), "run-name": "dp",
           "wire-log": True}
    return _run(cfg)


@pytest.fixture
def run_copy(dp_run, tmp_path):
    """A private copy of the DP run, free to tamper with."""
    target = tmp_path / "dp"
    shutil.copytree(dp_run, target)
    return target


def _checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def _edit_ledger(run_dir: Path, edit) -> str:
    """Apply ``edit`` to the first ledger with a session; returns that client's id."""
    for path in sorted((run_dir / "clients").glob("ledger-*.json")):
        raw = json.loads(path.read_text())
        if raw["sessions"]:
            edit(raw)
            path.write_text(json.dumps(raw))
            return raw["client_id"]
    raise AssertionError("no ledger with a session")


def test_a_correct_run_passes_every_check_and_reports_each_unit(run_copy):
    json_path, html_path, report = write_audit(run_copy)
    assert json_path == run_copy / "audit.json" and html_path == run_copy / "audit.html"
    assert json.loads(json_path.read_text()) == report
    assert report["all_checks_passed"], [c for c in report["checks"] if c["status"] == "fail"]
    checks = _checks(report)
    for name in ("ledgers_readable", "ledger_epsilon_recomputes", "ledgers_match_rounds", "within_budget",
                 "config_matches_records", "server_report_matches_ledgers", "policy_recorded", "ledger_storage",
                 "wire_fields"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["user_epsilon_recomputes"]["status"] == "n/a"
    units = {u["unit"]: u for u in report["units"]}
    example = units["example"]
    assert example["delta"] == 1e-5 and example["accountant"] == "rdp"
    assert 0 < example["epsilon"]["min"] <= example["epsilon"]["median"] <= example["epsilon"]["max"] <= 8.0
    assert sum(example["epsilon"]["histogram"]["counts"]) == example["epsilon"]["clients"]
    # history-len 3 and a most-recent window, accounted as replacements: one rating is at most 3 + 1
    # accounted examples away (its own, and the rewritten histories of 3 later ones).
    assert units["interaction"]["group_size"] == 4 and units["interaction"]["bound"] == "group privacy"
    assert example["mechanism"]["history_lengths"] == [3]  # every session of this run used 3 items
    assert units["interaction"]["epsilon"] == pytest.approx(4 * example["epsilon"]["max"])
    assert units["user"]["covered"] is False
    budget = report["budget"]
    assert budget["cap"] == 8.0 and budget["clients_with_ledger"] == example["epsilon"]["clients"]
    for c in budget["clients"]:
        assert c["remaining"] == pytest.approx(c["cap"] - c["spent"])
    assert {"opacus", "flwr", "torch"} <= set(report["versions"])


def test_the_html_report_is_self_contained_with_plots_and_tables(run_copy):
    _, html_path, report = write_audit(run_copy)
    page = html_path.read_text()
    assert page.count("<img") == 3 and page.count("src='data:image/png;base64,") == 3
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page), "external asset"
    assert "Consistency checks" in page and "Budget per client" in page and report["run_id"] in page


def test_an_edited_history_fails_recomputation_and_the_config_check(run_copy):
    def edit(raw):
        raw["sessions"][0]["noise_multiplier"] = 3.0  # claims more noise than was used

    client = _edit_ledger(run_copy, edit)
    _, _, report = write_audit(run_copy)
    checks = _checks(report)
    assert not report["all_checks_passed"]
    assert checks["ledger_epsilon_recomputes"]["status"] == "fail"
    assert any(client in p for p in checks["ledger_epsilon_recomputes"]["problems"])
    assert checks["config_matches_records"]["status"] == "fail"
    assert any(client in p and "noise_multiplier 3" in p for p in checks["config_matches_records"]["problems"])


def test_a_lowered_epsilon_fails_with_the_client_named(run_copy):
    client = _edit_ledger(run_copy, lambda raw: raw.update(epsilon=raw["epsilon"] / 2))
    _, _, report = write_audit(run_copy)
    check = _checks(report)["ledger_epsilon_recomputes"]
    assert check["status"] == "fail"
    assert len(check["problems"]) == 1 and check["problems"][0].startswith(f"{client}: stored epsilon")


def test_a_missing_round_fails_the_server_agreement_check(run_copy):
    removed = {}

    def edit(raw):
        session = raw["sessions"].pop()
        removed.update(session)
        raw["epsilon"] = 0.0 if not raw["sessions"] else raw["epsilon"]

    _edit_ledger(run_copy, edit)
    _, _, report = write_audit(run_copy)
    check = _checks(report)["ledgers_match_rounds"]
    assert check["status"] == "fail"
    assert any(f"round {removed['round']}" in p and str(removed["node_id"]) in p and "under-reported" in p
               for p in check["problems"])


def test_a_client_over_its_cap_fails(run_copy):
    client = _edit_ledger(run_copy, lambda raw: raw.update(budget_epsilon=raw["epsilon"] / 2))
    check = _checks(write_audit(run_copy)[2])["within_budget"]
    assert check["status"] == "fail" and any(p.startswith(client) for p in check["problems"])


def test_an_unreadable_ledger_and_an_under_reporting_server_fail(run_copy):
    next(iter((run_copy / "clients").glob("ledger-*.json"))).write_text("{not json")
    result = json.loads((run_copy / "result.json").read_text())
    result["privacy"]["epsilon"] = 0.01
    (run_copy / "result.json").write_text(json.dumps(result))
    checks = _checks(write_audit(run_copy)[2])
    assert checks["ledgers_readable"]["status"] == "fail" and "unreadable privacy ledger" in checks["ledgers_readable"]["problems"][0]
    assert checks["server_report_matches_ledgers"]["status"] == "fail"
    assert "under-reports" in checks["server_report_matches_ledgers"]["problems"][0]


def test_the_cli_exits_1_on_a_failed_check_and_2_on_a_missing_run(run_copy, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", str(run_copy)])
    assert ok.exit_code == 0, ok.output
    _edit_ledger(run_copy, lambda raw: raw.update(epsilon=0.0))
    bad = runner.invoke(app, ["audit", str(run_copy)])
    assert bad.exit_code == 1 and "fail" in bad.output
    missing = runner.invoke(app, ["audit", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "nope" in missing.output
    (run_copy / "rounds.jsonl").write_text('{"round": 1, "sampled": [1]}\n{"round": 2, "sam')  # cut short
    malformed = runner.invoke(app, ["audit", str(run_copy)])
    assert malformed.exit_code == 2 and "rounds.jsonl:2" in malformed.output, malformed.output


@pytest.mark.parametrize("edit", ["steps-0", "sample-rate"])
def test_a_ledger_edited_to_under_report_fails_against_the_servers_records(run_copy, edit):
    """The edit recomputes the stored epsilon so that the ledger agrees with itself; the server's
    checkpoint still holds what that node reported when its update arrived."""
    from common.ledger import PrivacyLedger

    def under_report(raw):
        for s in raw["sessions"]:
            if edit == "steps-0":
                s["steps"] = 0
            else:
                s["sample_rate"] = 0.01
        raw.pop("version", None)

    client = _edit_ledger(run_copy, under_report)
    path = run_copy / "clients" / f"ledger-{client}.json"
    raw = json.loads(path.read_text())
    raw["epsilon"] = PrivacyLedger.load(path).recomputed_epsilon()
    path.write_text(json.dumps(raw))
    checks = _checks(write_audit(run_copy)[2])
    assert checks["ledger_epsilon_recomputes"]["status"] == "pass"  # consistent with itself
    check = checks["ledgers_match_server_epsilon"]
    assert check["status"] == "fail" and any(client in p and "under-reports" in p for p in check["problems"])


def _numbers_under_epsilon_keys(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "epsilon" in k.lower() and isinstance(v, (int, float, dict)) and not isinstance(v, bool):
                yield f"{path}.{k}"
            yield from _numbers_under_epsilon_keys(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers_under_epsilon_keys(v, f"{path}[{i}]")


def test_a_run_without_dp_is_reported_in_plain_words_without_an_epsilon(small_ml100k, tmp_path):
    cfg = {"dataset": str(small_ml100k), "num-server-rounds": 1, "clients-per-round": 2, "evaluate-clients": 0,
           "examples-per-user": 4, "history-len": 3, "max-length": 32, "batch-size": 2, "local-dp": False,
           "strategy": "fedavg", "output-dir": str(tmp_path), "run-name": "nodp"}
    run_dir = _run(cfg)
    _, html_path, report = write_audit(run_dir)
    assert report["statement"] == NO_DP_STATEMENT and report["units"] == [] and report["budget"] is None
    assert all(c["status"] == "n/a" for c in report["checks"]) and report["all_checks_passed"]
    assert list(_numbers_under_epsilon_keys(report)) == []
    page = html_path.read_text()
    assert "no formal privacy guarantee" in page and "ε" not in page.replace("&#x27;", "'")


def test_central_dp_reports_the_user_unit_and_recomputes_it(small_ml100k, tmp_path):
    cfg = {"dataset": str(small_ml100k), "num-server-rounds": 2, "clients-per-round": 3, "evaluate-clients": 0,
           "examples-per-user": 4, "history-len": 3, "max-length": 32, "batch-size": 2, "central-dp": True,
           "max-update-norm": 1000.0, "output-dir": str(tmp_path), "run-name": "cdp"}
    run_dir = _run(cfg)
    _, _, report = write_audit(run_dir)
    assert report["all_checks_passed"], [c for c in report["checks"] if c["status"] == "fail"]
    user = {u["unit"]: u for u in report["units"]}["user"]
    assert user["delta"] == 1e-4 and user["mechanism"]["rounds"] == 2 and user["epsilon"] > 0
    assert user["mechanism"]["sample_rate"] == pytest.approx(0.5)
    assert _checks(report)["user_epsilon_recomputes"]["status"] == "pass"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"), reason="Debian chromium not installed "
                    "(.ci/run installs it; in CI this test runs)")
def test_audit_html_renders_in_headless_chromium(run_copy, tmp_path):
    import numpy as np
    from matplotlib.image import imread

    assert _chromium(), "CI must install Debian's chromium (see .ci/run)"
    _, html_path, _ = write_audit(run_copy)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1800"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert 'data-images-rendered="3/3"' in dom.stdout, dom.stderr[-2000:]
    assert dom.stdout.count("<tr>") > 10  # units, checks and budget tables were laid out
    shot = tmp_path / "audit.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    # Not blank: plenty of non-white pixels and real variety (text, table rules, plot lines).
    assert (pixels.mean(axis=2) < 0.9).mean() > 0.02
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50


def test_a_ledger_with_zero_noise_fails_the_readable_check_without_crashing(run_copy):
    def edit(raw):
        raw["sessions"][0]["noise_multiplier"] = 0.0

    client = _edit_ledger(run_copy, edit)
    _, _, report = write_audit(run_copy)
    check = _checks(report)["ledgers_readable"]
    assert check["status"] == "fail" and any("noise_multiplier" in p for p in check["problems"])
    assert "covers only the" in report["statement"] and client


def test_a_malformed_round_record_is_a_clear_error(run_copy):
    from common.errors import DataFormatError

    with open(run_copy / "rounds.jsonl", "a") as f:
        f.write(json.dumps({"round": "3", "sampled": []}) + "\n")
    with pytest.raises(DataFormatError, match=r"rounds.jsonl:3"):
        write_audit(run_copy)


def test_a_ledger_without_a_policy_or_breaking_it_fails(run_copy):
    client = _edit_ledger(run_copy, lambda raw: raw["policy"].update(min_noise_multiplier=5.0))
    check = _checks(write_audit(run_copy)[2])["policy_recorded"]
    assert check["status"] == "fail" and any(p.startswith(client) and "break" in p for p in check["problems"])
    _edit_ledger(run_copy, lambda raw: raw.pop("policy"))
    check = _checks(write_audit(run_copy)[2])["policy_recorded"]
    assert any("no device policy recorded" in p for p in check["problems"])


def test_a_ledger_not_written_by_the_locked_writer_fails_and_the_folder_is_stated(run_copy):
    check = _checks(write_audit(run_copy)[2])["ledger_storage"]
    assert check["status"] == "pass" and any("do not compose" in p for p in check["problems"])
    next(iter((run_copy / "clients").glob("ledger-*.lock"))).unlink()
    check = _checks(write_audit(run_copy)[2])["ledger_storage"]
    assert check["status"] == "fail" and any(".lock" in p for p in check["problems"])


def test_a_wire_log_with_an_unlisted_field_fails(run_copy):
    path = run_copy / "wire.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["metrics"]["metrics"]["train-loss"] = 4.2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = _checks(write_audit(run_copy)[2])["wire_fields"]
    assert check["status"] == "fail" and "train-loss" in check["problems"][0]
