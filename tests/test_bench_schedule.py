"""The schedule benchmark's patched probes: non-private oracles (a patched starting point), another FedAdam tau and
the iterate averages, each staying inside its run."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import client.app as client_app
from common.run_config import resolve
from common.sequence_runtime import SequenceRuntime, sequence_settings
from simulations.bench_schedule import ORACLES, PROBES, oracle_item_bias, probe_config, probe_context


@pytest.fixture(scope="module")
def unit_vectors(ml100k):
    """Seeded unit vectors in place of the encoder's (the oracle touches only the item bias)."""
    draw = torch.randn(ml100k.num_items, 384, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.normalize(draw, dim=1)


def test_an_oracle_starts_the_item_bias_from_exact_counts_and_freezes_it_when_asked(ml100k, ml100k_split,
                                                                                      unit_vectors):
    settings = sequence_settings(resolve({}))
    counts = ml100k_split.train_item_counts()
    plain = SequenceRuntime(ml100k, settings, item_text=unit_vectors)
    with oracle_item_bias(1.5, frozen=True):
        frozen = SequenceRuntime(ml100k, settings, item_text=unit_vectors)
    with oracle_item_bias(0.5, frozen=False):
        trained = SequenceRuntime(ml100k, settings, item_text=unit_vectors)
    for runtime, alpha in ((frozen, 1.5), (trained, 0.5)):
        effective = runtime.model.item_bias.effective().detach().numpy()
        np.testing.assert_allclose(effective, alpha * np.log1p(counts), rtol=1e-5, atol=1e-6)
        assert effective[np.argmax(counts)] > effective[np.argmin(counts)]
    # frozen: the bias is neither trained nor exchanged; trained on: exchanged as in the default
    assert "item_bias" not in frozen.state()[0] and not frozen.model.item_bias.bias.requires_grad
    assert trained.state()[0] == plain.state()[0] and "item_bias" in plain.state()[0]
    assert not plain.model.item_bias.bias.detach().any()  # the default starts at zero


def test_an_oracle_is_undone_after_its_run_even_when_the_run_fails(ml100k, unit_vectors):
    settings = sequence_settings(resolve({}))
    original = SequenceRuntime.__init__
    client_app._RUNTIMES[("stale", ())] = object()  # built before the oracle: must not serve inside it
    with pytest.raises(RuntimeError, match="run failed"):
        with oracle_item_bias(1.0, frozen=True):
            assert not client_app._RUNTIMES
            client_app._RUNTIMES[("inside", ())] = object()  # built inside: must not outlive it
            raise RuntimeError("run failed")
    assert SequenceRuntime.__init__ is original and not client_app._RUNTIMES and not client_app._DEVICE_RUNTIMES
    after = SequenceRuntime(ml100k, settings, item_text=unit_vectors)
    assert not after.model.item_bias.bias.detach().any() and "item_bias" in after.state()[0]


def test_every_oracle_runs_the_default_config_inside_its_patch_and_a_probe_runs_unpatched():
    assert not set(ORACLES) & set(PROBES)
    for name in ORACLES:
        assert probe_config(name) == ({}, {})  # the default's run config, nothing else
        context = probe_context(name, {})
        assert not isinstance(context, contextlib.nullcontext)
        original = SequenceRuntime.__init__
        with context:
            assert SequenceRuntime.__init__ is not original
        assert SequenceRuntime.__init__ is original
    assert isinstance(probe_context("lr-0.02", {}), contextlib.nullcontext)


def test_a_tau_probe_runs_its_base_probe_with_another_fedadam_tau_and_restores_the_products():
    from server.aggregation import make_server_step
    from simulations.bench_schedule import SERVER_TAU, server_tau

    assert make_server_step("fedadam", 0.01).tau == 1e-3  # the product's
    for name, (base, tau) in SERVER_TAU.items():
        assert base in PROBES and probe_config(name) == probe_config(base)
        with probe_context(name, {}):
            assert make_server_step("fedadam", 0.01).tau == tau
        assert make_server_step("fedadam", 0.01).tau == 1e-3
    with pytest.raises(RuntimeError, match="run failed"):
        with server_tau(1e-8):
            raise RuntimeError("run failed")
    assert make_server_step("fedadam", 0.01).tau == 1e-3


def test_the_second_moment_summary_reads_the_latest_checkpoints_fedadam_v(tmp_path):
    from common.errors import DataFormatError
    from server.checkpoint import save_checkpoint
    from simulations.bench_schedule import fedadam_second_moments

    assert fedadam_second_moments(tmp_path) is None  # a run without checkpoints
    names, arrays = ["a", "b"], [np.zeros(3, dtype=np.float32), np.zeros((1, 1), dtype=np.float32)]
    v = {"v_t.a": np.array([1e-8, 4e-6, 1e-4], dtype=np.float32),  # sqrt: 1e-4, 2e-3, 1e-2
         "v_t.b": np.array([[2.5e-7]], dtype=np.float32),  # sqrt: 5e-4
         "m_t.a": np.full(3, 9.0, dtype=np.float32), "m_t.b": np.full((1, 1), 9.0, dtype=np.float32)}
    save_checkpoint(tmp_path / "checkpoint", 1, names, arrays, {k: np.ones_like(a) for k, a in v.items()}, {})
    save_checkpoint(tmp_path / "checkpoint", 2, names, arrays, v, {})
    summary = fedadam_second_moments(tmp_path)
    assert summary["checkpoint"] == "round-0002.safetensors" and summary["coordinates"] == 4
    assert summary["median"] == pytest.approx((5e-4 + 2e-3) / 2, rel=1e-5)
    assert summary["share_below_1e-3"] == 0.5
    save_checkpoint(tmp_path / "checkpoint", 3, names, arrays, {}, {})  # FedAvg: no moments to summarise
    with pytest.raises(DataFormatError, match="round-0003.safetensors"):
        fedadam_second_moments(tmp_path)


def test_the_iterate_averages_are_moving_averages_and_a_tail_mean_of_the_models_given(monkeypatch):
    import simulations.bench_schedule as bench

    monkeypatch.setattr(bench, "EMA_DECAYS", (0.5, 0.9))
    monkeypatch.setattr(bench, "TAIL_ROUNDS", 2)
    averages = bench.IterateAverages()
    assert averages.models() == {}
    for value in (1.0, 2.0, 4.0):
        averages.update([np.full(3, value, dtype=np.float32), np.full((2, 2), -value, dtype=np.float32)])
    models = averages.models()
    assert sorted(models) == ["ema-0.5", "ema-0.9", "tail-2"]
    # ema: 1, then d * previous + (1 - d) * new
    for label, expected in (("ema-0.5", 0.5 * (0.5 * 1 + 0.5 * 2) + 0.5 * 4), ("ema-0.9", 0.9 * (0.9 + 0.2) + 0.4),
                            ("tail-2", 3.0)):
        first, second = models[label]
        assert first.dtype == np.float32 and second.shape == (2, 2)
        np.testing.assert_allclose(first, expected, rtol=1e-6)
        np.testing.assert_allclose(second, -expected, rtol=1e-6)
    given = [np.zeros(3, dtype=np.float32), np.zeros((2, 2), dtype=np.float32)]
    averages.update(given)
    given[0][:] = 99.0  # the averages keep copies, not the caller's arrays
    np.testing.assert_allclose(averages.models()["tail-2"][0], 2.0)
    np.testing.assert_allclose(averages.models()["ema-0.5"][0], 0.5 * (0.5 * (0.5 * 1 + 0.5 * 2) + 0.5 * 4))


def test_an_averaged_probe_runs_its_base_probes_config_and_leaves_the_server_unpatched():
    from server.federation import Federation
    from simulations.bench_schedule import AVERAGED, iterate_averages

    apply, finish = Federation._apply, Federation._finish
    for name, base in AVERAGED.items():
        assert base in PROBES and probe_config(name) == probe_config(base)
        with probe_context(name, {}):
            assert Federation._apply is not apply and Federation._finish is not finish
        assert Federation._apply is apply and Federation._finish is finish
    with pytest.raises(RuntimeError, match="run failed"):
        with iterate_averages({}):
            raise RuntimeError("run failed")
    assert Federation._apply is apply and Federation._finish is finish
