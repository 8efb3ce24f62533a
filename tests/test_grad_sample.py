"""The one-pass per-example gradient engine and the DP optimizer's clipping and noise.

The sequence model's own per-example checks (every layer, both engines) are in test_sequence_model.py;
these cover the engine's general rules and the optimizer against Opacus' own step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from common.grad_sample import OnePassGradSample
from common.privacy import PublicSchedule, SecureNoiseDPOptimizer, make_private
from common.secure_random import SecureStream, snap, snapping_grid


class _Toy(nn.Module):
    """A Linear on 2-D and on 3-D inputs, a Linear called twice, an Embedding, a LayerNorm, a layer never called
    and one whose output does not reach the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 4)  # never called
        self.aside = nn.Linear(4, 4)  # called, its output not in the loss
        self.aside_output: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.mix(self.embed(ids)))  # (B, T, 4)
        h = torch.tanh(self.mix(h)).mean(dim=1) + x  # mix called a second time
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
            assert p.grad_sample.shape == (len(y), *p.shape), name
            for k in range(len(y)):
                assert torch.allclose(p.grad_sample[k], expected[k][name], atol=1e-12), (name, k)
        for unused in (model.unused, model.aside):
            assert torch.all(unused.weight.grad_sample == 0) and torch.all(unused.bias.grad_sample == 0)
        assert float(model.mix.weight.grad_sample.abs().sum()) > 0
    finally:
        engine.close()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not model.mix._forward_hooks and not model._forward_pre_hooks


def test_a_forward_that_never_reached_backward_is_forgotten_and_one_without_autograd_is_refused():
    torch.manual_seed(0)
    model = _Toy().double()
    ids, x, y = _toy_batch()
    engine = OnePassGradSample(model)
    try:
        model(ids[:2], x[:2])  # abandoned: its records must not join the next step's
        engine.backward(_loss_rows(model, ids, x, y).sum(), len(y))
        assert model.head.weight.grad_sample.shape[0] == len(y)
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
        norms = torch.cat([p.grad_sample.reshape(len(y), -1) for p in engine.params], dim=1).norm(dim=1)
    finally:
        engine.close()
    assert float(norms.max()) > 0.5
    start = copy.deepcopy(model.state_dict())
    hooks = _dp_step(model, "hooks", ids, x, y, noise=0.0)
    model.load_state_dict(start)
    one_pass = _dp_step(model, "one-pass", ids, x, y, noise=0.0)
    for name in hooks:
        assert torch.allclose(hooks[name], one_pass[name], atol=1e-12), name
        if not name.startswith(("unused", "aside")):
            assert not torch.equal(hooks[name], start[name]), name


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
