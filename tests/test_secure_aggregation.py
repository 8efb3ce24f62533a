"""User-level DP on a secure sum (issue 22): Flower's SecAgg+ with distributed Skellam noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import special, stats

import client.secure_session as secure_session
from common.device_policy import DevicePolicy
from common.ledger import PrivacyLedger, ledger_paths
from common.run_config import ConfigError, resolve
from common.secure_random import SecureStream
from common.skellam import (SkellamNoise, SkellamPlan, encode_update, from_flower_mean, plan_epsilon,
                            skellam_epsilon, skellam_rdp, to_flower_grid)
from server.federation import Federation
from simulations.inprocess_grid import SecureInProcessGrid

TINY = {"examples-per-user": 4, "batch-size": 2, "history-len": 3, "noise-multiplier": 2.0, "sequence-dim": 8}
SECURE = {"secure-aggregation": True, "local-dp": False, "min-survivors": 4, "clients-per-round": 6,
          "secagg-threshold": 0.5}
POLICY = {"privacy-min-survivors": 3}


class FixedNoise(SkellamNoise):
    """An injected draw: a known integer vector per device instead of the secure stream's."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def draw(self, variance: float, n: int) -> np.ndarray:
        return self.values[:n].copy()


class NoNoise(FixedNoise):
    """No noise at all: the share is the rounded update alone."""

    def __init__(self) -> None:
        super().__init__(np.zeros(0, dtype=np.int64))

    def draw(self, variance: float, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)


def _cfg(tiny_grouplens, tmp_path, **extra) -> dict:
    return {"dataset": str(tiny_grouplens), **TINY, **SECURE, "num-server-rounds": 1, "eval-every": 1,
            "output-dir": str(tmp_path / "runs"), "run-name": "secure", **extra}


# ----------------------------------------------------------------------------- the mechanism


def test_the_share_encoding_is_exact_on_flowers_grid_and_the_sum_decodes_to_integers():
    plan = SkellamPlan(dim=50, clip=1.0, noise_multiplier=0.6, min_survivors=3, max_devices=5)
    rng = np.random.default_rng(0)
    shares = [encode_update(rng.normal(size=50), plan, SecureStream(), SkellamNoise()) for _ in range(5)]
    grid = [to_flower_grid(s, plan) for s in shares]
    # Flower's own quantiser (as secaggplus_mod calls it, after its weight ratio T/T): our values are already
    # on its grid, so its stochastic rounding (from NumPy's global generator) is the identity
    from flwr.common.secure_aggregation.quantization import quantize

    for s, g in zip(shares, grid):
        for _ in range(3):
            (quantized,) = quantize([g * plan.levels / plan.levels], plan.clipping_range, plan.levels)
            assert np.array_equal(quantized.astype(np.int64) - plan.levels // 2, s)
    mean = np.mean(grid, axis=0)
    assert np.array_equal(from_flower_mean(mean, 5, plan), np.sum(shares, axis=0))


def test_the_sensitivity_bounds_hold_for_neighbouring_devices_whatever_the_rounding():
    """Add/remove of one device changes the secure sum by its whole rounded, clipped update: its L2 and
    L1 norms are within the accounted sensitivities for every rounding draw (constructed worst cases:
    a vector at the clip with every coordinate's fraction near 1/2, and one spread over few coordinates)."""
    plan = SkellamPlan(dim=400, clip=2.0, noise_multiplier=0.6, min_survivors=2, max_devices=4)

    spread = np.full(400, 1.0)
    peaked = np.zeros(400)
    peaked[:3] = [5.0, -3.0, 1.0]
    for vector in (spread, peaked, 1e6 * spread):
        for _ in range(20):
            share = encode_update(vector, plan, SecureStream(), NoNoise())
            assert np.linalg.norm(share) <= plan.l2_sensitivity
            assert np.abs(share).sum() <= plan.l1_sensitivity
            assert np.linalg.norm(share * plan.gamma) <= plan.clip + plan.gamma * math.sqrt(plan.dim)


def test_the_skellam_accountant_matches_an_independent_computation():
    """The RDP bound is checked against the exact Renyi divergence of two shifted one-dimensional
    Skellam distributions (summed over the integers with scipy), and the conversion to (epsilon, delta)
    against the formula of Balle et al. (2020) written out here."""
    for variance, shift in ((4.0, 1), (30.0, 2), (200.0, 5)):
        lam = variance / 2
        # the integrand p^a q^(1-a) peaks near a * shift; 12 standard deviations past that the rest is negligible
        reach = int(20 * shift + 12 * math.sqrt(variance) + 20)
        k = np.arange(-reach, reach + 1)
        log_p, log_q = stats.skellam.logpmf(k, lam, lam), stats.skellam.logpmf(k - shift, lam, lam)
        assert np.isfinite(log_p).all() and np.isfinite(log_q).all()
        for alpha in (2, 3, 8, 20):
            exact = float(special.logsumexp(alpha * log_p + (1 - alpha) * log_q)) / (alpha - 1)
            bound = skellam_rdp(alpha, shift, shift, variance)
            assert exact <= bound + 1e-12
            if variance >= 200 and alpha <= 8:  # with noise well above the shift the bound is close to sharp
                assert bound <= 1.2 * exact
    # conversion: eps = min over orders of rdp + log((a-1)/a) - (log delta + log a) / (a - 1)
    releases = [(40.0, 5.0, 60.0), (40.0, 5.0, 60.0)]
    orders = list(range(2, 64)) + list(range(64, 513, 8))
    mine = min(sum(skellam_rdp(a, *r) for r in releases) + math.log((a - 1) / a) - (math.log(1e-4) + math.log(a))
               / (a - 1) for a in orders)
    assert skellam_epsilon(releases, 1e-4) == pytest.approx(mine, rel=1e-9)
    plan = SkellamPlan(dim=1000, clip=1.0, noise_multiplier=0.6, min_survivors=16, max_devices=20)
    assert plan_epsilon(plan, 1e-4) == pytest.approx(7.82, abs=0.01)  # the default's figure in the run config help


# ----------------------------------------------------------------------------- through SecAgg+


def _run(tiny_grouplens, tmp_path, captured=None, drop_at=None, noise=None, monkeypatch=None, **extra):
    cfg = _cfg(tiny_grouplens, tmp_path, **extra)
    grid = SecureInProcessGrid(6, cfg, drop_at=drop_at, node_config=POLICY,
                               capture=(lambda node, reply: captured.append((node, reply))) if captured is not None
                               else None)
    if noise is not None:
        monkeypatch.setattr(secure_session, "SkellamNoise", lambda: noise)
    fed = Federation(grid, cfg)
    start = [a.copy() for a in fed.arrays]
    folder = fed.run()
    return fed, grid, start, folder


def _kept_shares(folder) -> dict[str, np.ndarray]:
    """Each device's share as it kept it before release (its own device state, not the server's)."""
    from safetensors.numpy import load_file

    return {p.name.split("-secure-")[0]: load_file(p)["secure-share"]
            for p in (folder / "clients" / "released").glob("*-secure-*.safetensors")}


def test_a_secure_round_applies_exactly_the_sum_of_the_shares_and_the_server_sees_no_single_one(
        tiny_grouplens, tmp_path, monkeypatch):
    captured: list = []
    noise = FixedNoise(np.arange(-5000, 5000, dtype=np.int64) % 7 - 3)  # the same known noise on every device
    fed, grid, start, folder = _run(tiny_grouplens, tmp_path, captured, noise=noise, monkeypatch=monkeypatch,
                                    strategy="fedavg", **{"server-learning-rate": 1.0})
    shares = _kept_shares(folder)
    assert len(shares) == 6
    plan = fed.secure_plan
    plain_sum = np.sum([np.rint(s / plan.gamma) for s in shares.values()], axis=0)
    expected = plain_sum * plan.gamma / 6
    moved = np.concatenate([(a.astype(np.float64) - b.astype(np.float64)).ravel() for a, b in zip(fed.arrays, start)])
    assert np.allclose(moved, expected, atol=1e-6)  # float32 state
    # What the ServerApp received from the devices: no array at all, and masked vectors that are none of the shares.
    for node, reply in captured:
        content = reply.content
        assert all(len(rec) == 0 for rec in content.array_records.values())
        masked = content.config_records.get("secaggplus_configs", {}).get("masked_params")
        if masked:
            from flwr.common import bytes_to_ndarray

            vector = bytes_to_ndarray(masked[1])
            for share in shares.values():
                assert not np.array_equal(vector % plan.modulus, (np.rint(share / plan.gamma) + plan.levels // 2))
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert sorted(record["trained"]) == sorted(grid.partition) and record["secure_released"]
    for client in range(6):  # each device recorded its user-level release
        ledger = PrivacyLedger.load(ledger_paths(folder / "clients", f"user-{client}")[0])
        assert len(ledger.user_releases) == 1 and ledger.sessions == []


def test_dropouts_below_the_threshold_complete_the_round_and_above_it_nothing_is_released(tiny_grouplens, tmp_path):
    fed, grid, start, folder = _run(tiny_grouplens, tmp_path / "a", drop_at={101: "setup", 102: "unmask"})
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert record["secure_released"] and 101 not in record["trained"] and 102 in record["trained"]
    assert any(not np.array_equal(a, b) for a, b in zip(start, fed.arrays))
    # two gone before their shares are in: SecAgg+ could still unmask (threshold 4 of 6), but 4 shares <
    # min-survivors 5 carry less than the accounted noise: aborted before unmasking
    fed, grid, start, folder = _run(tiny_grouplens, tmp_path / "b",
                                    drop_at={101: "collect_masked_vectors", 102: "collect_masked_vectors"},
                                    **{"max-failed-share": 1.0, "min-survivors": 5})
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert not record["secure_released"] and "min-survivors" in record["secure_abort"]
    assert all(np.array_equal(a, b) for a, b in zip(start, fed.arrays))
    assert not (folder / "user_releases.json").exists()  # no share was ever in an unmasked sum
    # three gone: below SecAgg+'s own threshold (a strict majority), nothing can be unmasked
    fed, grid, start, folder = _run(tiny_grouplens, tmp_path / "c",
                                    drop_at={101: "collect_masked_vectors", 102: "collect_masked_vectors",
                                             103: "share_keys"}, **{"max-failed-share": 1.0})
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert not record["secure_released"] and "threshold" in record["secure_abort"]
    assert all(np.array_equal(a, b) for a, b in zip(start, fed.arrays))


def test_a_device_refuses_a_secure_run_weaker_than_its_policy_and_never_sends_an_unmasked_share(tiny_grouplens,
                                                                                              tmp_path):
    base = resolve(_cfg(tiny_grouplens, tmp_path))
    policy = DevicePolicy(allow_secure_aggregation=True, min_survivors=4, min_user_noise_multiplier=0.5,
                          max_user_clip=1.0, user_epsilon_budget=8.0)
    assert policy.violations(base) == []
    for key, value in (("user-noise-multiplier", 0.4), ("user-clip", 2.0), ("min-survivors", 3),
                       ("user-epsilon-budget", 9.0), ("user-delta", 1e-3)):
        assert key in policy.violations({**base, key: value})
    # a deployed device takes part only if its owner opted in; a simulated one (no owner) does
    assert "local-dp" in DevicePolicy().violations(base)
    assert "local-dp" in DevicePolicy.from_node_config({"data-path": "/d"}).violations(base)
    assert DevicePolicy.from_node_config({"data-path": "/d", "privacy-secure-aggregation": True}).violations(base) == []
    assert DevicePolicy.from_node_config({"partition-id": 3}).violations(base) == []
    # a secure run's training message that does not come through SecAgg+ gets no share
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    import client.app as client_app

    cfg = _cfg(tiny_grouplens, tmp_path)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, **POLICY}, state=RecordDict(), run_config=cfg)
    fed = Federation(SecureInProcessGrid(6, cfg, node_config=POLICY), cfg)
    msg = Message(RecordDict({**fed._content(1), "config": ConfigRecord({"server-round": 1, "run-id": "r",
                                                                          "run-dir": str(tmp_path)})}),
                  dst_node_id=5, message_type=MessageType.TRAIN)
    with pytest.raises(client_app.SecureRefusal):
        client_app.train(msg, ctx)


def test_secure_runs_reject_what_cannot_work_on_a_masked_sum():
    for extra in ({"aggregator": "trimmed-mean"}, {"central-dp": True}, {"user-model": "text"},
                  {"client-sampling": "poisson"}, {"min-survivors": 30}, {"evaluate-clients": 2}):
        with pytest.raises(ConfigError, match="secure-aggregation"):
            resolve({"secure-aggregation": True, **extra})
    assert resolve({"secure-aggregation": True})["aggregator"] == "mean"


def test_a_second_participation_beyond_the_user_budget_is_refused_and_the_round_aborts_cleanly(tiny_grouplens,
                                                                                                tmp_path):
    """At the default noise one release costs epsilon 7.82 of the user-level budget of 8: every device
    refuses a second one (a refusal, not a failure, so the run goes on), too few shares arrive, and
    the round is aborted before anything is unmasked."""
    fed, grid, start, folder = _run(tiny_grouplens, tmp_path, **{"num-server-rounds": 2, "eval-every": 2})
    first, second = [json.loads(x) for x in (folder / "rounds.jsonl").read_text().splitlines()]
    assert first["secure_released"] and len(first["trained"]) == 6
    assert not second["secure_released"] and sorted(second["refused"]) == sorted(grid.partition)
    assert set(second["refused_reasons"]) == {"privacy-budget"} and second["failed"] == []
    assert json.loads((folder / "user_releases.json").read_text()) == {str(n): 1 for n in grid.partition}
    privacy = json.loads((folder / "result.json").read_text())["privacy"]
    assert privacy["unit"] == "user" and privacy["user_epsilon"] == pytest.approx(7.82, abs=0.01)


def test_the_audit_recomputes_the_user_level_epsilon_and_catches_a_ledger_that_drops_a_release(tiny_grouplens,
                                                                                                tmp_path):
    from server.audit.accounting import write_audit

    fed, grid, start, folder = _run(tiny_grouplens, tmp_path, **{"wire-log": True})
    _, _, report = write_audit(folder)
    checks = {c["name"]: c for c in report["checks"]}
    secure = checks["secure_user_epsilon_recomputes"]
    assert report["all_checks_passed"] and secure["status"] == "pass", report["checks"]
    assert checks["wire_fields"]["status"] == "pass"  # every SecAgg+ stage carried only its listed fields
    user = [u for u in report["units"] if u["unit"] == "user"][0]
    assert user["epsilon"] == pytest.approx(7.82, abs=0.01) and "semi-honest" in user["trust"]
    # a device whose ledger lost its release (an under-reporting ledger) is caught
    path = ledger_paths(folder / "clients", "user-0")[0]
    raw = json.loads(path.read_text())
    raw["user_releases"] = []
    path.write_text(json.dumps(raw))
    _, _, report = write_audit(folder)
    secure = {c["name"]: c for c in report["checks"]}["secure_user_epsilon_recomputes"]
    assert secure["status"] == "fail" and any("under-reported" in p for p in secure["problems"])
    # a corrupt server record is an error naming the file, never read loosely
    from common.errors import DataFormatError

    (folder / "user_releases.json").write_text('{"101": "many"}')
    with pytest.raises(DataFormatError, match="user_releases.json"):
        write_audit(folder)


def test_devices_refuse_to_unmask_a_sum_of_too_few_shares_even_if_the_server_skips_its_check(tiny_grouplens,
                                                                                               tmp_path, monkeypatch):
    """An attack: a server that drops its own min-survivors check and asks the devices to unmask a sum of
    4 shares (the accounted noise needs 5; SecAgg+'s own threshold, 4, would allow it). Every device sees
    the short list and keeps its secret shares, so the sum is never unmasked."""
    from flwr.server.workflow import SecAggPlusWorkflow

    from server.secure_aggregation import PrivrecSecAgg

    def no_check(self, grid, context, state):
        ok = SecAggPlusWorkflow.collect_masked_vectors_stage(self, grid, context, state)
        self.survivors = sorted(state.active_node_ids)
        return ok

    monkeypatch.setattr(PrivrecSecAgg, "collect_masked_vectors_stage", no_check)
    fed, grid, start, folder = _run(tiny_grouplens, tmp_path, drop_at={101: "collect_masked_vectors",
                                                                       102: "collect_masked_vectors"},
                                    **{"max-failed-share": 1.0, "min-survivors": 5})
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert not record["secure_released"] and "unmask" in record["secure_abort"]
    assert all(np.array_equal(a, b) for a, b in zip(start, fed.arrays))


def test_a_repeated_request_is_a_new_charged_release_never_a_replayed_share(tiny_grouplens, tmp_path, monkeypatch):
    """A share replayed into a second sum would let the server difference two sums: a device asked twice
    for the same (run, round) trains and noises afresh, and its ledger counts both releases."""
    from common.partition import dataset_from_source, run_split
    from common.runtimes import make_runtime
    from common.sequence_runtime import client_sequences

    cfg = resolve(_cfg(tiny_grouplens, tmp_path, **{"user-noise-multiplier": 3.0}))
    runtime = make_runtime(dataset_from_source(cfg["dataset"]), cfg)
    data = client_sequences(run_split(cfg), 0, cfg["history-len"], cfg["examples-per-user"])
    names, state = runtime.state()
    shares = []
    for _ in range(2):
        runtime.load_state(names, state)
        result = secure_session.run_secure_session(runtime, data, cfg, tmp_path, "user-0", "run", 1, 7,
                                                   DevicePolicy(allow_secure_aggregation=True))
        assert not result.refused
        shares.append(result.arrays[0])
    assert not np.array_equal(shares[0], shares[1])  # fresh noise (equal with negligible probability)
    ledger = PrivacyLedger.load(ledger_paths(tmp_path, "user-0")[0])
    assert len(ledger.user_releases) == 2


def test_the_wire_check_flags_a_secure_reply_that_carries_a_tensor_or_an_unlisted_field():
    from server.audit.checks import _secure_wire_problems

    honest = {"stage": "collect_masked_vectors", "arrays": {"fitres.parameters": {}},
              "metrics": {"fitres.num_examples": {"num_examples": 1}},
              "configs": {"secaggplus_configs": {"masked_params": "list[1]"}, "fitres.status": {"code": 0}}}
    assert _secure_wire_problems(honest, "x") == []
    leaky = {**honest, "arrays": {"fitres.parameters": {"0": ["float64", [37138]]}}}
    assert any("must be masked" in p for p in _secure_wire_problems(leaky, "x"))
    chatty = {**honest, "configs": {**honest["configs"], "fitres.metrics": {"history-length": 12}}}
    assert any("history-length" in p for p in _secure_wire_problems(chatty, "x"))


# ----------------------------------------------------------------------------- attacks


def _spent(folder) -> dict[str, int]:
    return {p.name: len(json.loads(p.read_text()).get("user_releases", []))
            for p in (folder / "clients").glob("ledger-*.json")}


def test_a_server_that_changes_one_devices_setup_parameters_gets_no_share_from_it(tiny_grouplens, tmp_path):
    """An attack on the weights: every device but one is told max_weight=1e12 (Flower then multiplies their
    shares by 0), so the unmasked 'mean' would be that one device's share with only its own part of the
    noise. Every device checks the setup against the run config before it trains: the told ones refuse,
    nothing is spent by them, and the round falls below its thresholds."""

    def tamper(node, stage, content):
        if stage == "setup" and node != 101:
            content.config_records["secaggplus_configs"]["max_weight"] = 1e12

    cfg = _cfg(tiny_grouplens, tmp_path, **{"max-failed-share": 1.0})
    grid = SecureInProcessGrid(6, cfg, node_config=POLICY, tamper_sent=tamper)
    fed = Federation(grid, cfg)
    start = [a.copy() for a in fed.arrays]
    folder = fed.run()
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert not record["secure_released"] and sorted(record["refused"]) == [102, 103, 104, 105, 106]
    assert all(np.array_equal(a, b) for a, b in zip(start, fed.arrays))
    assert sum(_spent(folder).values()) <= 1  # only the untouched device trained (its share is never unmasked)


def test_a_hostile_device_that_forwards_garbage_key_shares_makes_no_honest_device_spend(tiny_grouplens, tmp_path):
    """Flower's mod trains before it decrypts the key shares it was forwarded: one device sending garbage
    would make every other device train and spend in a round that can never be unmasked. The devices
    verify every forwarded share first and refuse without training."""

    def hostile(node, stage, content):
        if node == 106 and stage == "share_keys":
            record = content.config_records["secaggplus_configs"]
            record["ctxts"] = [b"garbage" * 10 for _ in record["ctxts"]]

    cfg = _cfg(tiny_grouplens, tmp_path, **{"max-failed-share": 1.0})
    grid = SecureInProcessGrid(6, cfg, node_config=POLICY, tamper_reply=hostile)
    folder = Federation(grid, cfg).run()
    assert sum(_spent(folder).values()) <= 1  # at most the hostile device itself
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert not record["secure_released"]


def test_a_malformed_reply_drops_its_device_and_never_stops_the_run(tiny_grouplens, tmp_path):
    """A hostile device sends a masked vector of the wrong shape (Flower's workflow would raise on it and
    stop the ServerApp): its reply is dropped as if it never came, and the round completes with the rest."""
    from flwr.common import ndarray_to_bytes

    def hostile(node, stage, content):
        if node == 106 and stage == "collect_masked_vectors":
            content.config_records["secaggplus_configs"]["masked_params"] = [
                ndarray_to_bytes(np.array([1], dtype=np.int64)), ndarray_to_bytes(np.zeros(3, dtype=np.int64))]

    cfg = _cfg(tiny_grouplens, tmp_path)
    fed = Federation(SecureInProcessGrid(6, cfg, node_config=POLICY, tamper_reply=hostile), cfg)
    folder = fed.run()
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert record["secure_released"] and 106 not in record["trained"] and len(record["trained"]) == 5


def test_refusal_codes_are_read_from_every_runtimes_error_format():
    from server.secure_aggregation import refusal_code

    assert refusal_code("privacy-budget") == "privacy-budget"  # in process
    assert refusal_code("\nException ClientAppException occurred. Message: privacy-budget'>") == "privacy-budget"
    assert refusal_code("<class 'client.app.SecureRefusal'>:<'privacy-policy'>") == "privacy-policy"
    assert refusal_code("KeyError: 'privacy-budget in a path'") is None
    assert refusal_code("Not enough available neighbour clients.") is None


def test_a_non_finite_update_is_sent_as_zeros_plus_noise_never_beyond_the_sensitivity():
    plan = SkellamPlan(dim=1000, clip=1.0, noise_multiplier=0.6, min_survivors=3, max_devices=5)

    for bad in (np.nan, np.inf, -np.inf):
        vector = np.ones(1000)
        vector[:7] = bad
        share = encode_update(vector, plan, SecureStream(), NoNoise())
        assert not share.any()


def test_a_sparse_neighbourhood_round_completes_and_a_hostile_public_key_only_drops_its_sender(tiny_grouplens,
                                                                                               tmp_path):
    """secagg-neighbours=2 (SecAgg+'s sparse graph: each device shares its secrets with 2 others) runs
    honest rounds; a device whose setup reply holds an unloadable key (which would make every neighbour
    fail) is dropped at once, and the round completes without it."""

    def hostile(node, stage, content):
        if node == 106 and stage == "setup":
            content.config_records["secaggplus_configs"]["pk1"] = b"not a key"

    cfg = _cfg(tiny_grouplens, tmp_path, **{"secagg-neighbours": 2})
    fed = Federation(SecureInProcessGrid(6, cfg, node_config=POLICY, tamper_reply=hostile), cfg)
    start = [a.copy() for a in fed.arrays]
    folder = fed.run()
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert record["secure_released"] and sorted(record["trained"]) == [101, 102, 103, 104, 105]
    assert any(not np.array_equal(a, b) for a, b in zip(start, fed.arrays))


def test_secagg_parameters_mirror_flowers_and_keep_a_strict_majority():
    from common.secagg_params import neighbourhood, reconstruction_threshold, share_count

    for nodes in range(3, 60):
        for neighbours in range(0, 64, 3):
            shares = share_count(nodes, neighbours)
            size = neighbourhood(nodes, neighbours)
            for fraction in (0.01, 0.5, 0.6, 0.99, 1.0):
                threshold = reconstruction_threshold(size, fraction, nodes)
                assert 2 * threshold > size and threshold <= size
                if isinstance(shares, int):  # Flower: an int threshold below an int share count, which is odd
                    assert shares == size < nodes and threshold < shares and shares % 2 == 1


def test_a_device_refuses_an_evaluation_request_in_a_secure_run(tiny_grouplens, tmp_path):
    """Evaluation replies are releases the user-level accounting does not count: a device refuses them in a
    secure run even if the server asks (the run config already rejects evaluate-clients > 0)."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    import client.app as client_app

    cfg = _cfg(tiny_grouplens, tmp_path)
    fed = Federation(SecureInProcessGrid(6, cfg, node_config=POLICY), cfg)
    content = {**fed._content(1), "config": ConfigRecord({"server-round": 1, "run-id": "r", "run-dir": str(tmp_path)})}
    msg = Message(RecordDict(content), dst_node_id=5, message_type=MessageType.EVALUATE)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config=cfg)
    reply = client_app.evaluate(msg, ctx)
    assert reply.content["status"]["refused"] and reply.content["status"]["reason"] == "privacy-policy"


@pytest.mark.parametrize("stage_hit", ["setup", "collect_masked_vectors"])
def test_a_reply_that_carries_a_tensor_only_drops_its_device_and_forges_no_log_line(tiny_grouplens, tmp_path,
                                                                                   stage_hit, caplog):
    """A secure stage reply must carry no tensor. One with an undecodable tensor (here with a serialisation
    type that is a forged log line) is dropped before anything reads it; the round completes with the rest,
    and nothing the device wrote reaches the server's log or records unescaped."""
    from flwr.app import Array, ArrayRecord

    forged = "x'\nINFO :      [privrec] round 1 | FORGED\n" + "A" * 5000

    def hostile(node, stage, content):
        if node == 106 and stage == stage_hit:
            content["junk"] = ArrayRecord({"a": Array("float32", (1,), forged, b"not an npy file")})

    cfg = _cfg(tiny_grouplens, tmp_path)
    folder = Federation(SecureInProcessGrid(6, cfg, node_config=POLICY, tamper_reply=hostile), cfg).run()
    record = json.loads((folder / "rounds.jsonl").read_text().splitlines()[-1])
    assert record["secure_released"] and 106 not in record["trained"] and len(record["trained"]) == 5
    assert not any("FORGED" in r.getMessage() for r in caplog.records)


def test_an_unmasked_sum_beyond_honest_shares_counts_its_survivors_as_rejected_and_stops_the_run(tiny_grouplens,
                                                                                                tmp_path):
    """One device adds a large value inside [0, M) to its masked vector: the reply is well formed, the sum is
    unmasked (every survivor's release counted) and then discarded as beyond what honest shares give. Nobody
    can tell whose share broke it, so the survivors count as rejected and the health check stops the run
    instead of letting every later round spend the honest devices' budgets for nothing."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    def hostile(node, stage, content):
        if node == 106 and stage == "collect_masked_vectors":
            record = content.config_records["secaggplus_configs"]
            head, vector = (bytes_to_ndarray(b) for b in record["masked_params"])
            vector = vector.copy()
            vector[0] = (vector[0] + fed.secure_plan.modulus // 3) % fed.secure_plan.modulus
            record["masked_params"] = [ndarray_to_bytes(head), ndarray_to_bytes(vector)]

    cfg = _cfg(tiny_grouplens, tmp_path, **{"num-server-rounds": 2})
    fed = Federation(SecureInProcessGrid(6, cfg, node_config=POLICY, tamper_reply=hostile), cfg)
    start = [a.copy() for a in fed.arrays]
    with pytest.raises(RuntimeError, match="round 1: 6 of 6 sampled clients sent no usable reply"):
        fed.run()
    record = json.loads((fed.folder.root / "rounds.jsonl").read_text().splitlines()[-1])
    assert record["secure_unmasked"] and not record["secure_released"] and not record["trained"]
    assert len(record["rejected"]) == 6 and not record["failed"]
    assert "exceeds what honest shares give" in record["rejected_reasons"][0]
    assert all(np.array_equal(a, b) for a, b in zip(start, fed.arrays))  # the model never moved


def test_a_reported_spend_no_honest_device_can_report_is_ignored(tiny_grouplens, tmp_path):
    """A survivor's reported user-level epsilon above the run's budget, or an example-level epsilon in a run
    without local DP, is not what an honest device sends: it is ignored, never published."""

    def hostile(node, stage, content):
        if node == 106 and stage == "collect_masked_vectors":
            metrics = content.config_records["fitres.metrics"]
            metrics["user-epsilon"], metrics["epsilon"] = 1e300, 1e300

    cfg = _cfg(tiny_grouplens, tmp_path)
    fed = Federation(SecureInProcessGrid(6, cfg, node_config=POLICY, tamper_reply=hostile), cfg)
    folder = fed.run()
    result = json.loads((folder / "result.json").read_text())
    assert result["privacy"]["user_epsilon"] <= 8.0 and result["privacy"]["epsilon"] <= 8.0
    reported = json.loads(fed.folder.user_spend.read_text())
    assert len(reported) == 5 and "106" not in reported and all(v <= 8.0 for v in reported.values())
    assert "106" not in json.loads(fed.folder.spend.read_text())


def test_a_user_level_releases_history_length_bounds_the_unit_as_a_sessions_does(tmp_path):
    """A device whose ledger holds only a user-level release made with a 5-item history refuses a run that
    asks for 50 unless its owner set privacy-max-history-len, as it would after a 5-item session."""
    from common.ledger import UserRelease

    with PrivacyLedger.session(tmp_path, "u", 8.0, 1e-5) as ledger:
        ledger.record_user_release(UserRelease(dim=10, clip=1.0, noise_multiplier=0.6, min_survivors=3,
                                               max_devices=5, history_len=5), 1e-4)
        assert ledger.recorded_history_lens() == [5]
        assert DevicePolicy().lengthens_unit({"history-len": 50}, ledger.recorded_history_lens())
        assert not DevicePolicy().lengthens_unit({"history-len": 5}, ledger.recorded_history_lens())
        owner = DevicePolicy.from_node_config({"privacy-max-history-len": 50})
        assert not owner.lengthens_unit({"history-len": 50}, ledger.recorded_history_lens())


@pytest.mark.parametrize("secure_local_dp", [False, True])
def test_a_device_keeps_its_releases_to_one_unit_it_can_state(tiny_grouplens, tmp_path, secure_local_dp):
    """Example- and user-level figures are kept apart; a mix neither can state is refused. After a secure
    release without local DP (its data released outside the example-level epsilon) the device makes no
    example-level release; after a plain run's session (outside every user-level release) it joins no
    secure round. A secure round with local DP records a session and a release for the same data, each
    figure holding at its unit, so a plain run may follow it."""
    from client.evaluation import run_evaluation
    from client.secure_session import run_secure_session
    from client.session import run_session
    from common.partition import split_for
    from common.runtimes import make_runtime
    from common.sequence_runtime import client_sequences

    secure = resolve(_cfg(tiny_grouplens, tmp_path, **{"local-dp": secure_local_dp, "user-epsilon-budget": 100.0,
                                                       "client-epsilon-budget": 100.0}))
    plain = resolve({"dataset": str(tiny_grouplens), **TINY, "client-epsilon-budget": 100.0})
    policy = DevicePolicy(allow_secure_aggregation=True, min_survivors=3, epsilon_budget=100.0,
                          user_epsilon_budget=100.0)
    split = split_for(str(tiny_grouplens))
    rows = client_sequences(split, 0, TINY["history-len"], TINY["examples-per-user"])

    def secure_round(folder, rnd):
        return run_secure_session(make_runtime(split.data, secure), rows, secure, folder, "u", "s", rnd, 1, policy)

    def plain_round(folder, rnd):
        return run_session(make_runtime(split.data, plain), rows, plain, folder, "u", "p", rnd, 1, policy)

    first = tmp_path / "secure-first"
    assert not secure_round(first, 1).refused
    later = plain_round(first, 1)
    assert later.refused == (not secure_local_dp)
    if not secure_local_dp:
        assert later.reason == "privacy-budget"
        evaluation = run_evaluation(make_runtime(split.data, plain), rows, plain, first, "u", "p", 2, 1, policy)
        assert evaluation.refused and evaluation.reason == "privacy-budget"
    ledger = PrivacyLedger.load(ledger_paths(first, "u")[0], "u")
    assert len(ledger.sessions) == (2 if secure_local_dp else 0)
    plain_first = tmp_path / "plain-first"
    assert not plain_round(plain_first, 1).refused
    refused = secure_round(plain_first, 1)
    assert refused.refused and refused.reason == "privacy-budget"
    assert not PrivacyLedger.load(ledger_paths(plain_first, "u")[0], "u").user_releases  # nothing recorded


def test_a_round_whose_unmasking_fails_after_the_releases_were_counted_stops_the_run(tiny_grouplens, tmp_path):
    """A survivor's unmask reply naming a node that is not in the round makes Flower's unmasking fail after
    every survivor's release was counted: as with a sum beyond the honest bound, the survivors count as rejected
    and the health check stops the run instead of letting later rounds spend for nothing."""

    def hostile(node, stage, content):
        if node == 106 and stage == "unmask":
            record = content.config_records["secaggplus_configs"]
            record["nids"], record["shares"] = [999999], [b"garbage"]

    cfg = _cfg(tiny_grouplens, tmp_path, **{"num-server-rounds": 2})
    fed = Federation(SecureInProcessGrid(6, cfg, node_config=POLICY, tamper_reply=hostile), cfg)
    with pytest.raises(RuntimeError, match="round 1: 6 of 6 sampled clients sent no usable reply"):
        fed.run()
    record = json.loads((fed.folder.root / "rounds.jsonl").read_text().splitlines()[-1])
    assert not record["secure_released"] and not record["trained"] and len(record["rejected"]) == 6
    assert json.loads(fed.folder.user_releases.read_text()) == {str(n): 1 for n in record["rejected"]}


def test_a_sessions_pairing_with_a_user_release_is_the_devices_token_never_the_servers_labels(tmp_path):
    """A plain run reusing a secure round's run id and round number does not pass for that round's session."""
    from common.ledger import Session, UserRelease

    release = UserRelease(dim=10, clip=1.0, noise_multiplier=0.6, min_survivors=3, max_devices=5, run_id="s",
                          round=1, history_len=3)
    with PrivacyLedger.session(tmp_path, "u", 100.0, 1e-5) as ledger:
        secure_session = Session(1.0, 1.0, 1, 1.0, 1e-5, run_id="s", round=1, sensitivity=2.0, history_len=3)
        ledger.record_user_release(release, 1e-4, secure_session)
        assert ledger.uncovered_sessions() == [] and ledger.uncovered_user_releases() == []
        plain = Session(1.0, 1.0, 1, 1.0, 1e-5, run_id="s", round=1, sensitivity=2.0, history_len=3)
        ledger.record(plain)
        assert len(ledger.uncovered_sessions()) == 1 and ledger.uncovered_user_releases() == []
        ledger.record_user_release(release, 1e-4)  # a secure round without local DP, labelled like the first
        assert len(ledger.uncovered_user_releases()) == 1
    stored = PrivacyLedger.load(ledger_paths(tmp_path, "u")[0], "u")  # the tokens persist
    assert stored.sessions[0].secure_release == stored.user_releases[0].secure_release != ""
    assert len(stored.uncovered_sessions()) == 1 and len(stored.uncovered_user_releases()) == 1


def test_a_secure_round_with_local_dp_is_refused_after_one_without_it(tiny_grouplens, tmp_path):
    """Its example-level epsilon would leave out the earlier round's example-level release."""
    from client.secure_session import run_secure_session
    from common.partition import split_for
    from common.runtimes import make_runtime
    from common.sequence_runtime import client_sequences

    policy = DevicePolicy(allow_secure_aggregation=True, min_survivors=3, epsilon_budget=100.0,
                          user_epsilon_budget=100.0)
    split = split_for(str(tiny_grouplens))
    rows = client_sequences(split, 0, TINY["history-len"], TINY["examples-per-user"])
    results = []
    for rnd, local_dp in ((1, False), (2, True)):
        cfg = resolve(_cfg(tiny_grouplens, tmp_path, **{"local-dp": local_dp, "user-epsilon-budget": 100.0,
                                                        "client-epsilon-budget": 100.0}))
        results.append(run_secure_session(make_runtime(split.data, cfg), rows, cfg, tmp_path, "u", "s", rnd, 1,
                                          policy))
    assert not results[0].refused and results[1].refused and results[1].reason == "privacy-budget"


def test_every_release_path_reads_the_unit_from_sessions_and_user_releases_alike(tiny_grouplens, tmp_path):
    """A device whose only release is a user-level one with a 3-item history refuses a plain 5-item session
    for the unit (privacy-policy), before any budget rule."""
    from client.session import run_session
    from common.ledger import UserRelease
    from common.partition import split_for
    from common.runtimes import make_runtime
    from common.sequence_runtime import client_sequences

    with PrivacyLedger.session(tmp_path, "u", 100.0, 1e-5) as ledger:
        ledger.record_user_release(UserRelease(dim=10, clip=1.0, noise_multiplier=0.6, min_survivors=3,
                                               max_devices=5, history_len=3), 1e-4)
    cfg = resolve({"dataset": str(tiny_grouplens), **TINY, "history-len": 5, "client-epsilon-budget": 100.0})
    split = split_for(str(tiny_grouplens))
    refused = run_session(make_runtime(split.data, cfg), client_sequences(split, 0, 5, 4), cfg, tmp_path, "u", "p",
                          1, 1, DevicePolicy(epsilon_budget=100.0))
    assert refused.refused and refused.reason == "privacy-policy"
