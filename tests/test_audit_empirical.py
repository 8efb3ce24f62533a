"""Empirical audits: lower bounds stay below the accountant on correct DP and catch broken DP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from simulations.audits.canary_clients import gdp_epsilon, run_client_audit
from simulations.audits.mechanism import DiracCanaries, run_mechanism_audit
from simulations.audits.membership import run_membership_audit
from simulations.cli import app

pytestmark = [pytest.mark.audit, pytest.mark.slow]

REQUIRED = {"epsilon_lower_bound", "confidence", "accountant_epsilon", "delta", "privacy_unit", "reading"}
# A correct mechanism's one-run lower bound exceeds its true epsilon (at most the accountant's) with
# probability at most 1 - confidence: the correct-setup audits run at 1 - 1e-9, so they cannot fail by
# chance (at 0.95 they would one run in twenty at worst).
SURE = 1 - 1e-9


def test_dirac_canary_rows_put_their_norm_on_their_own_coordinate():
    params = [torch.zeros(2, 3), torch.zeros(4)]
    other = torch.zeros(5)  # a trainable tensor that is not an adapter gets zero rows
    canaries = DiracCanaries(params, included_ids=np.array([0, 2]), coords=np.array([1, 9, 7]), norm=5.0)
    rows = canaries.rows(torch.tensor([1, 0]), [other, *params])  # training rows n+1, n+0 -> canaries 2, 0
    assert rows[0].abs().sum() == 0
    assert rows[1].shape == (2, 2, 3) and rows[1][1].flatten()[1] == 5.0 and rows[1][0].abs().sum() == 0
    assert rows[2].shape == (2, 4) and rows[2][0][7 - 6] == 5.0 and rows[2].abs().sum() == 5.0


# Noise 1.0 and batch 20 (several Poisson steps), the setting of the published audit: the audited
# session's accountant epsilon (about 1.6; its canaries need no window, so sensitivity C) is below what
# 2,000 canaries can prove (largest reachable about 4.2; a broken setup scores about 2.9), so a
# broken setup is caught. At noise 0.64 (batch 20) it would be about 5.0, out of reach.
AUDITED_NOISE = 1.0
AUDITED_BATCH = 20


TEXT_MODEL = {"user-model": "text"}


def test_mechanism_audit_of_the_correct_setup_stays_below_the_accountant():
    report = run_mechanism_audit({**TEXT_MODEL, "noise-multiplier": AUDITED_NOISE, "batch-size": AUDITED_BATCH},
                                 canaries=2000, confidence=SURE)
    assert report["user_model"] == "text"
    assert REQUIRED <= set(report)
    assert report["broken"] == "none" and not report["bound_exceeds_accountant"]
    assert 0 <= report["epsilon_lower_bound"] <= report["accountant_epsilon"]
    claimed = report["mechanism_claimed"]
    # The audited session's public size is its real rows and the expected number of included canaries
    # (fixed before inclusion is drawn): rate batch / size, ceil(1 / rate) steps.
    assert report["training_rows"]["public_size"] == report["training_rows"]["real_examples"] + 1000
    assert claimed["sample_rate"] == pytest.approx(claimed["batch_size"] / report["training_rows"]["public_size"])
    assert claimed["steps"] == report["training_rows"]["planned_steps"]
    assert report["mechanism_run"] == {"noise_multiplier": 1.0, "max_grad_norm": 1.0}


def test_the_sequence_models_session_stays_below_the_accountant_under_audit():
    """The default user model's own loop (train_sequence) on a device's padded session rows."""
    report = run_mechanism_audit({"noise-multiplier": AUDITED_NOISE, "batch-size": AUDITED_BATCH}, canaries=2000,
                                 confidence=SURE)
    assert REQUIRED <= set(report) and report["user_model"] == "sequence"
    assert report["broken"] == "none" and not report["bound_exceeds_accountant"]
    assert 0 <= report["epsilon_lower_bound"] <= report["accountant_epsilon"]
    rows = report["training_rows"]
    assert rows["real_examples"] + rows["padding_rows"] == 200  # the public session cap (examples-per-user)
    assert rows["public_size"] == 200 + 1000  # the session's rows and the expected included canaries
    claimed = report["mechanism_claimed"]
    assert claimed["sample_rate"] == pytest.approx(AUDITED_BATCH / rows["public_size"])
    assert claimed["steps"] == rows["planned_steps"] and claimed["optimizer"] == "sgd"


# Chance of a false failure: broken, an included canary that was sampled in any step stands out by
# far (noise off: no noise at all; clip off: a step of 100 C against noise of about 7 C over the
# steps, 13 standard deviations), and 300 right guesses already bound epsilon at 2.18 > 1.6, so a
# failure needs fewer than 300 of the 2,000 canaries both included and sampled (each is with
# probability about 0.3: expected about 630; a binomial tail far below 1e-9).
# The sequence model's broken set-up is audited on a 10-example session: its real rows then move the
# canaries' coordinates by far less than one sampled canary does (noise off, measured over three
# sessions: at most 0.10 of one canary's step on any of the 2,000 coordinates; on a 200-example
# session a few dozen move by a quarter of a step or more, which would put some excluded canaries
# among the top guesses). Clipping off, the real rows are unclipped but tiny beside a canary's
# 100 C, and the noise calibrated to C is the text model's case above (excluded canaries measured
# at most 0.25 of a step, included and sampled ones at least 0.80). The rest of the argument is
# the text model's: about 640 canaries are both included and sampled (rate 20/1,010, 51 steps), and
# 300 right guesses bound epsilon at 2.18, above the claim (about 1.6).
@pytest.mark.parametrize("model", [("text", ["--set", "user-model='text'"]),
                                   ("sequence", ["--set", "examples-per-user=10"])], ids=["text", "sequence"])
@pytest.mark.parametrize("broken", ["noise-off", "clip-off"])
def test_mechanism_audit_catches_a_broken_setup(broken, model, tmp_path):
    user_model, flags = model
    result = CliRunner().invoke(app, ["audit-empirical", "mechanism", "--broken", broken, "--out", str(tmp_path),
                                      "--set", f"noise-multiplier={AUDITED_NOISE}",
                                      "--set", f"batch-size={AUDITED_BATCH}", *flags])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / f"audit-mechanism-{broken}.json").read_text())
    assert REQUIRED <= set(report) and report["user_model"] == user_model
    assert report["epsilon_lower_bound"] > report["accountant_epsilon"], report["estimator"]
    assert report["bound_exceeds_accountant"] and "EXCEEDS" in result.output


def test_membership_audit_of_the_correct_setup_stays_below_the_accountant():
    report = run_membership_audit(canaries=200, confidence=SURE)
    assert REQUIRED <= set(report)
    assert 0 <= report["epsilon_lower_bound"] <= report["accountant_epsilon"]
    assert report["canaries"]["count"] == 200 and report["training_rows"]["real_examples"] > 0


def test_gaussian_dp_epsilon_matches_known_points():
    # mu-GDP: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2); at mu = 1, eps(1e-5) ~ 4.36.
    from scipy import stats

    eps = gdp_epsilon(1.0, 1e-5)
    assert stats.norm.cdf(-eps + 0.5) - np.exp(eps) * stats.norm.cdf(-eps - 0.5) == pytest.approx(1e-5, rel=1e-4)
    assert gdp_epsilon(0.0, 1e-5) == 0.0 and gdp_epsilon(2.0, 1e-5) > eps
    # Large or infinite shifts (a broken central DP) must not overflow.
    assert 100 < gdp_epsilon(40.0, 1e-4) < np.inf and gdp_epsilon(np.inf, 1e-4) == np.inf


def test_client_level_audit_runs_the_federation_with_canary_clients(small_ml100k, tmp_path):
    overrides = {"dataset": str(small_ml100k), "num-server-rounds": 2, "examples-per-user": 4, "history-len": 3,
                 "max-length": 32, "batch-size": 2, "max-update-norm": 1000.0}
    report = run_client_audit(overrides, tmp_path, real_clients=3, canaries=40, confidence=SURE)
    assert REQUIRED <= set(report) and report["privacy_unit"].startswith("user")
    assert 0 <= report["epsilon_lower_bound"] <= report["accountant_epsilon"]
    assert report["mechanism_claimed"]["rounds"] == 2 and report["delta"] == 1e-4
    assert report["population"]["canary_clients"] == report["canaries"]["included"]
    assert np.isfinite(report["epsilon_estimate_one_shot"])
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").iterdir())


def test_the_secure_canary_audit_runs_every_device_through_the_secure_path_and_sees_missing_noise(
        tiny_grouplens, tmp_path):
    import client.secure_session as secure_session
    import client.session
    import common.skellam
    from common.skellam import SkellamPlan, plan_epsilon
    from simulations.audits.secure_canaries import run_secure_client_audit

    overrides = {"dataset": str(tiny_grouplens), "examples-per-user": 4, "batch-size": 2, "history-len": 3,
                 "sequence-dim": 16}

    def releases_in_ledgers(report) -> list[int]:
        return sorted(len(json.loads(p.read_text())["user_releases"])
                      for p in (Path(report["run_dir"]) / "clients").glob("ledger-*.json"))

    # One real device, four canaries (an injected draw: both groups non-empty) and one more real device
    # that drops out before its masked share: the sum holds exactly min-survivors = 5 shares.
    report = run_secure_client_audit(overrides, tmp_path / "ok", real_clients=1, canaries=4, confidence=SURE,
                                     included=np.array([True, False, True, False]), dropouts=1)
    assert REQUIRED <= set(report) and report["privacy_unit"].startswith("user")
    assert report["round"]["clients_sampled"] == 6 and report["round"]["clients_accepted"] == 5
    assert report["round"]["aggregated"]
    # Every device that trained recorded its one release in its own ledger, canaries included (the
    # dropped device left after key sharing and never trained); the server counted the five shares.
    assert releases_in_ledgers(report) == [1] * 5
    assert sorted(json.loads((Path(report["run_dir"]) / "user_releases.json").read_text()).values()) == [1] * 5
    claimed = report["mechanism_claimed"]
    assert claimed["min_survivors"] == 5 and claimed["strategy"] == "fedavg"
    dim = report["canaries"]["dimension"]
    plan = SkellamPlan(dim, 1.0, 0.6, 5, 6)
    assert report["accountant_epsilon"] == pytest.approx(plan_epsilon(plan, 1e-6))
    assert report["accountant_epsilon_at_user_delta"] == pytest.approx(plan_epsilon(plan, 1e-4))
    # The sum's norm is its noise's, five shares' worth: with d >= 12,000 coordinates the noise norm's
    # relative spread is under 0.65% (chi-square), so a 5% miss is over 7 standard deviations (and a
    # share sized for the six sampled devices instead of the five survivors would be 8.7% short).
    assert dim >= 12000
    assert 0.95 < report["round"]["sum_norm"] / report["round"]["noise_norm_expected"] < 1.05
    # The patch is gone after the run.
    assert secure_session.train_locally is client.session.train_locally
    assert secure_session.SkellamNoise is common.skellam.SkellamNoise

    included = np.array([True, False, True, False, True])
    broken = run_secure_client_audit(overrides, tmp_path / "broken", real_clients=1, canaries=5, confidence=SURE,
                                     included=included, broken="noise-off")
    assert releases_in_ledgers(broken) == [1] * 6  # the ledgers still claim the noise
    assert broken["round"]["sum_norm"] / broken["round"]["noise_norm_expected"] < 0.2  # but none is there
    scores = np.array(broken["scores"])
    # Without noise the change is the sum of the real update and the three canaries at the clip: an
    # included canary scores about 1/2; an excluded one (a direction independent of the change) about
    # N(0, 1/d), so with d >= 12,000 (above) a score above 0.1 is over 10 standard deviations out.
    assert scores[included].min() > 0.2 and np.abs(scores[~included]).max() < 0.1
    assert secure_session.SkellamNoise is common.skellam.SkellamNoise


def test_the_secure_canary_audit_is_reached_from_the_cli_and_names_a_setup_it_lacks(tiny_grouplens, tmp_path):
    tiny = ["--set", f"dataset={tiny_grouplens}", "--set", "examples-per-user=4", "--set", "batch-size=2",
            "--set", "history-len=3", "--set", "sequence-dim=8"]
    result = CliRunner().invoke(app, ["audit-empirical", "secure-clients", "--canaries", "4", "--real-clients", "1",
                                      "--out", str(tmp_path), *tiny])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "audit-secure-clients.json").read_text())
    assert report["audit"] == "secure-clients" and report["round"]["clients_accepted"] == 5
    result = CliRunner().invoke(app, ["audit-empirical", "secure-clients", "--broken", "clip-off", "--out",
                                      str(tmp_path), *tiny])
    assert result.exit_code != 0 and "noise-off" in result.output
    result = CliRunner().invoke(app, ["audit-empirical", "secure-clients", "--canaries", "6", "--real-clients", "1",
                                      "--out", str(tmp_path), *tiny])
    assert result.exit_code != 0 and "has 6" in result.output  # one user per device, and the tiny set has 6
