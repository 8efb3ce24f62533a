"""The schedule benchmark's non-private oracles: a patched starting point that stays inside its run."""

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
        context = probe_context(name)
        assert not isinstance(context, contextlib.nullcontext)
        original = SequenceRuntime.__init__
        with context:
            assert SequenceRuntime.__init__ is not original
        assert SequenceRuntime.__init__ is original
    assert isinstance(probe_context("lr-0.02"), contextlib.nullcontext)
