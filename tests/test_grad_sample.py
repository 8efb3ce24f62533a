"""The one-pass per-example gradient engine and the DP optimizer's clipping and noise.

The sequence model's own per-example checks (every layer, both engines) are in test_sequence_model.py;
these cover the engine's general rules and the optimizer against Opacus' own step."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from common.grad_sample import OnePassGradSample, OuterProductRows, append_rows, factored_rows, per_example_gradient
from common.privacy import PublicSchedule, SecureNoiseDPOptimizer, make_private
from common.secure_random import SecureStream, snap, snapping_grid


class _Toy(nn.Module):
    """A Linear on 2-D and on 3-D inputs, Linears called twice on 3-D and on 2-D inputs, one whose weight is frozen,
    an Embedding, a LayerNorm, a layer never called and one whose output does not reach the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 4)  # never called
        self.aside = nn.Linear(4, 4)  # called, its output not in the loss
        self.twice = nn.Linear(4, 4)  # called twice on 2-D inputs: a sum of outer products is no longer one
        self.frozen = nn.Linear(4, 4)  # only its bias is trained
        self.frozen.weight.requires_grad_(False)
        self.aside_output: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.mix(self.embed(ids)))  # (B, T, 4)
        h = torch.tanh(self.mix(h)).mean(dim=1) + x  # mix called a second time
        h = h + self.twice(torch.tanh(self.twice(h))) + self.frozen(h)
        self.aside_output = self.aside(h)
        return self.head(h)


def _toy_batch(n: int = 5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (n, 3), generator=g)
    ids[0, :] = 2  # a repeated index within one example
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return ids, x, y


def _loss_rows(model, ids, x, y):
    return nn.functional.cross_entropy(model(ids, x), y, reduction="none")


def test_one_pass_gradients_equal_each_examples_own_gradient():
    torch.manual_seed(0)
    model = _Toy().double()
    ids, x, y = _toy_batch()
    expected = []
    for k in range(len(y)):
        model.zero_grad(set_to_none=True)
        _loss_rows(model, ids[k:k + 1], x[k:k + 1], y[k:k + 1]).sum().backward()
        expected.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                         for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    engine = OnePassGradSample(model)
    try:
        engine.backward(_loss_rows(model, ids, x, y).sum(), len(y))
        for name, p in model.named_parameters():
            assert p.grad is None, name  # no ordinary gradient is computed
            if not p.requires_grad:
                assert not hasattr(p, "grad_sample"), name
                continue
            sample = per_example_gradient(p)
            assert sample.shape == (len(y), *p.shape), name
            for k in range(len(y)):
                assert torch.allclose(sample[k], expected[k][name], atol=1e-12), (name, k)
        for unused in (model.unused, model.aside):
            assert torch.all(per_example_gradient(unused.weight) == 0) and torch.all(unused.bias.grad_sample == 0)
        assert float(model.mix.weight.grad_sample.abs().sum()) > 0
        # kept factored: a trainable weight of a Linear seeing one position per example, called once
        factored = {name for name, p in model.named_parameters() if factored_rows(p) is not None}
        assert factored == {"head.weight", "aside.weight"}
        assert model.head.weight.grad_sample.shape == (len(y), 0)  # a placeholder with nothing to read
        assert float(model.twice.weight.grad_sample.abs().sum()) > 0
        assert float(model.frozen.bias.grad_sample.abs().sum()) > 0
    finally:
        engine.close()
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "grad_sample_factors") for p in model.parameters())
    assert not model.mix._forward_hooks and not model._forward_pre_hooks


def test_a_forward_that_never_reached_backward_is_forgotten_and_one_without_autograd_is_refused():
    torch.manual_seed(0)
    model = _Toy().double()
    ids, x, y = _toy_batch()
    engine = OnePassGradSample(model)
    try:
        model(ids[:2], x[:2])  # abandoned: its records must not join the next step's
        engine.backward(_loss_rows(model, ids, x, y).sum(), len(y))
        assert per_example_gradient(model.head.weight).shape[0] == len(y)
        with torch.no_grad():
            model(ids, x)
        with pytest.raises(RuntimeError, match="no forward pass"):
            engine.backward(torch.zeros((), dtype=torch.float64, requires_grad=True), len(y))
        model(ids, x)
        with pytest.raises(RuntimeError, match="per-example gradient of shape"):  # the wrong batch size
            engine.backward(_loss_rows(model, ids, x, y).sum(), len(y) + 1)
        loss = _loss_rows(model, ids, x, y).sum()
        model.aside_output.mul_(2.0)  # a recorded output changed in place: its gradient would be the changed one's
        with pytest.raises(RuntimeError, match="changed in place"):
            engine.backward(loss, len(y))
    finally:
        engine.close()
    layer = nn.Linear(3, 2)
    engine = OnePassGradSample(layer)
    try:
        inputs = torch.randn(4, 3)
        loss = layer(inputs).sum()
        inputs.mul_(2.0)  # a recorded input changed in place: the samplers would read the changed one
        with pytest.raises(RuntimeError, match="changed in place"):
            engine.backward(loss, 4)
    finally:
        engine.close()


class _RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Linear(3, 3), _RawParameter()), "no Opacus grad sampler"),
    (nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), "not fit for per-example gradients"),
])
def test_a_model_the_engine_cannot_treat_exactly_is_refused(model, match):
    with pytest.raises(ValueError, match=match):
        OnePassGradSample(model)


def _dp_step(model, mode: str, ids, x, y, noise: float):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = make_private(model, optimizer, noise, 0.5, PublicSchedule(1.0, 1, 8), "rdp", grad_sample_mode=mode)
    try:
        private.optimizer.zero_grad(set_to_none=True)
        private.backward(_loss_rows(private.module, ids, x, y).sum(), len(y))
        private.optimizer.step()
    finally:
        private.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_noiseless_dp_step_is_the_same_with_opacus_hooks_and_the_one_pass_engine():
    """Clip norm 0.5, below most examples' norms: the clipped sums, the public denominator and the update agree."""
    torch.manual_seed(0)
    model = _Toy().double()
    for unused in (model.unused, model.aside):  # Opacus' hooks fail on a trainable layer that gets no gradient
        unused.requires_grad_(False)
    ids, x, y = _toy_batch()
    engine = OnePassGradSample(model)  # clipping at 0.5 must scale some examples down and leave others
    try:
        engine.backward(_loss_rows(model, ids, x, y).sum(), len(y))
        norms = torch.cat([per_example_gradient(p).reshape(len(y), -1) for p in engine.params], dim=1).norm(dim=1)
    finally:
        engine.close()
    assert float(norms.max()) > 0.5
    start = copy.deepcopy(model.state_dict())
    hooks = _dp_step(model, "hooks", ids, x, y, noise=0.0)
    model.load_state_dict(start)
    one_pass = _dp_step(model, "one-pass", ids, x, y, noise=0.0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in hooks:
        assert torch.allclose(hooks[name], one_pass[name], atol=1e-12), name
        assert torch.equal(hooks[name], start[name]) == (name not in trained), name


def test_clipping_matches_opacus_and_the_noise_is_one_draw_split_in_parameter_order():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(3, 2, dtype=torch.float64)), nn.Parameter(torch.zeros(4, dtype=torch.float64))]
    samples = [torch.randn(6, 3, 2, dtype=torch.float64) * 3, torch.randn(6, 4, dtype=torch.float64)]
    for s in samples:  # one example under the clip norm (not scaled), the others above it (scaled down)
        s[1] *= 0.01

    def prepared(optimizer_class, **extra):
        for p, s in zip(params, samples):
            p.grad_sample, p.summed_grad, p.grad = s.clone(), None, None
        return optimizer_class(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.7, max_grad_norm=0.5,
                               expected_batch_size=6, **extra)

    theirs = prepared(DPOptimizer)
    theirs.clip_and_accumulate()
    want = [p.summed_grad.clone() for p in params]
    for p in params:
        del p.grad_sample, p.summed_grad

    class Drawn:  # an injected draw: the noise values are known
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def gaussian(self, n: int) -> np.ndarray:
            self.sizes.append(n)
            return np.arange(n, dtype=np.float64) / 10

    drawn = Drawn()
    ours = prepared(SecureNoiseDPOptimizer, noise_stream=drawn)
    ours.clip_and_accumulate()
    norms = torch.cat([s.reshape(6, -1) for s in samples], dim=1).norm(dim=1)
    assert float(norms[1]) < 0.5 < float(norms[[0, 2, 3, 4, 5]].min())
    for p, w in zip(params, want):
        assert torch.allclose(p.summed_grad, w, atol=1e-12)
    ours.add_noise()
    assert drawn.sizes == [10]  # every coordinate in one call
    flat = torch.cat([w.reshape(-1) for w in want]).numpy()
    noisy = snap(flat + 0.7 * 0.5 * np.arange(10) / 10, snapping_grid(0.7 * 0.5))  # std: noise multiplier x C
    assert np.array_equal(params[0].grad.reshape(-1).numpy(), noisy[:6])
    assert np.array_equal(params[1].grad.numpy(), noisy[6:])
    ours.scale_grad()
    assert np.allclose(params[1].grad.numpy(), noisy[6:] / 6)


def test_the_real_noise_stream_is_a_secure_stream():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    model = nn.Linear(2, 2)
    private = make_private(model, optimizer, 1.0, 1.0, PublicSchedule(1.0, 1, 2), "rdp",
                           grad_sample_mode="one-pass")
    try:
        assert isinstance(private.optimizer.noise_stream, SecureStream)
        assert private.one_pass is not None and private.module is model  # nothing wraps the model
    finally:
        private.close()
    with pytest.raises(ValueError, match="grad_sample_mode"):
        make_private(nn.Linear(2, 2), optimizer, 1.0, 1.0, PublicSchedule(1.0, 1, 2), "rdp", grad_sample_mode="x")


def test_an_example_whose_gradient_is_not_finite_contributes_nothing_and_the_others_are_clipped():
    """A NaN row and a row whose norm overflows float32 are dropped; the rest is Opacus' clipped sum."""
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))]
    g = torch.Generator().manual_seed(0)
    samples = [torch.randn(5, 3, generator=g) * 2, torch.randn(5, 2, 2, generator=g) * 2]
    samples[0][1, 0] = float("nan")
    samples[1][3] = 3e38  # finite values whose norm is not
    good = [0, 2, 4]
    for p, s in zip(params, samples):
        p.grad_sample, p.summed_grad = s.clone(), None
    optimizer = SecureNoiseDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=0.5,
                                       expected_batch_size=5, noise_stream=SecureStream())
    optimizer.clip_and_accumulate()
    norms = torch.cat([s[good].reshape(len(good), -1) for s in samples], dim=1).norm(dim=1)
    assert float(norms.min()) > 0.5  # every kept example is scaled down
    factor = 0.5 / (norms + 1e-6)
    for p, s in zip(params, samples):
        want = torch.einsum("i,i...", factor, s[good])
        assert torch.all(torch.isfinite(p.summed_grad))
        assert torch.allclose(p.summed_grad, want, atol=1e-6)


def test_factored_rows_give_the_norms_and_weighted_sums_of_the_tensors_they_stand_for():
    g = torch.Generator().manual_seed(0)
    left = torch.randn(6, 3, generator=g, dtype=torch.float64)
    right = torch.randn(6, 4, generator=g, dtype=torch.float64)
    left[2] = float("inf")
    canaries = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)  # ordinary rows appended after them
    canaries[1, 0, 0] = float("nan")
    rows = OuterProductRows.of(left, right).appended(canaries)
    dense = torch.cat([left[:, :, None] * right[:, None, :], canaries])
    assert rows.shape == dense.shape == (8, 3, 4) and rows.placeholder.shape == (8, 0)
    assert torch.allclose(rows.materialise(), dense, rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(rows.norms(), dense.reshape(8, -1).norm(dim=1), atol=1e-12, equal_nan=True)
    keep = torch.isfinite(rows.norms())
    assert keep.tolist() == [True, True, False, True, True, True, True, False]
    kept = rows.keep_rows(keep)
    weights = torch.rand(8, generator=g, dtype=torch.float64)
    want = torch.einsum("i,i...", weights, torch.where(keep[:, None, None], dense, 0.0))
    assert torch.all(torch.isfinite(kept.weighted_sum(weights)))
    assert torch.allclose(kept.weighted_sum(weights), want, atol=1e-12)
    left[0] = 0.0  # the factors are copies: a later change of the tensors they came from changes nothing
    assert torch.allclose(rows.materialise(), dense, rtol=0, atol=0, equal_nan=True)


@contextlib.contextmanager
def _toy_after_one_pass():
    """The seeded toy and its batch's labels, its per-example gradients just computed by the one-pass engine."""
    torch.manual_seed(0)
    model = _Toy().double()
    ids, x, y = _toy_batch()
    engine = OnePassGradSample(model)
    try:
        engine.backward(_loss_rows(model, ids, x, y).sum(), len(y))
        yield model, y
    finally:
        engine.close()


def test_factors_count_only_while_their_placeholder_is_the_parameters_grad_sample():
    with _toy_after_one_pass() as (model, y):
        head = model.head.weight
        assert factored_rows(head) is not None
        head.grad_sample = torch.zeros(len(y), 3, 4, dtype=torch.float64)  # replaced by someone else
        assert factored_rows(head) is None and torch.equal(per_example_gradient(head), head.grad_sample)
        head.grad_sample = None  # what Opacus' zero_grad leaves
        assert factored_rows(head) is None
        head.grad_sample = torch.zeros((0, 3, 4), dtype=torch.float64)  # an empty Poisson batch's
        assert factored_rows(head) is None and per_example_gradient(head).shape == (0, 3, 4)


def test_the_optimizer_refuses_a_placeholder_without_its_factors():
    torch.manual_seed(0)
    model = _Toy().double()
    ids, x, y = _toy_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = make_private(model, optimizer, 1.0, 0.5, PublicSchedule(1.0, 1, 8), "rdp", grad_sample_mode="one-pass")
    try:
        private.backward(_loss_rows(model, ids, x, y).sum(), len(y))
        model.head.weight.grad_sample_factors = None  # lost: the zero-width placeholder alone would read as zeros
        with pytest.raises(RuntimeError, match=r"per-example gradients of shape \(5, 0\)"):
            private.optimizer.step()
    finally:
        private.close()


def test_canary_rows_are_appended_after_factored_and_ordinary_rows_alike():
    with _toy_after_one_pass() as (model, y):
        before = {n: per_example_gradient(p) for n, p in model.named_parameters() if p.requires_grad}
        for name, p in model.named_parameters():
            if p.requires_grad:
                append_rows(p, torch.full((2, *p.shape), 7.0, dtype=torch.float64))
        assert factored_rows(model.head.weight) is not None  # still factored, now with two ordinary rows after
        for name, p in model.named_parameters():
            if p.requires_grad:
                got = per_example_gradient(p)
                assert got.shape == (len(y) + 2, *p.shape) and len(p.grad_sample) == len(y) + 2, name
                assert torch.equal(got[:len(y)], before[name]) and bool(torch.all(got[len(y):] == 7.0)), name


def test_a_dp_step_on_factored_gradients_equals_one_on_the_tensors_they_stand_for():
    """Clip 2.5 (some examples scaled, some not), one example whose input is NaN (it must contribute nothing):
    the same update whether the optimizer reads the factors or the materialised per-example gradients."""
    torch.manual_seed(0)
    model = _Toy().double()
    ids, x, y = _toy_batch(7)
    x[3, 1] = float("nan")
    start = copy.deepcopy(model.state_dict())
    after = []
    for dense in (False, True):
        model.load_state_dict(start)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        private = make_private(model, optimizer, 0.0, 2.5, PublicSchedule(1.0, 1, 8), "rdp",
                               grad_sample_mode="one-pass")
        try:
            private.optimizer.zero_grad(set_to_none=True)
            private.backward(_loss_rows(model, ids, x, y).sum(), len(y))
            assert factored_rows(model.head.weight) is not None
            norms = torch.cat([per_example_gradient(p).reshape(len(y), -1) for p in private.optimizer.params],
                              dim=1).norm(dim=1)
            finite = norms[torch.isfinite(norms)]
            assert len(finite) == len(y) - 1 and float(finite.min()) < 2.5 < float(finite.max())
            if dense:  # the same rows as ordinary tensors: the factors become stale
                for p in private.optimizer.params:
                    p.grad_sample = per_example_gradient(p)
                assert factored_rows(model.head.weight) is None
            private.optimizer.step()
        finally:
            private.close()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in after[0]:
        assert torch.all(torch.isfinite(after[0][name])), name
        assert torch.allclose(after[0][name], after[1][name], atol=1e-12), name
    assert not torch.equal(after[0]["head.weight"], start["head.weight"])
