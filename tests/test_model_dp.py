"""Encoder, adapters and DP-SGD: cached path, round-trip, per-example independence, DP steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.encoder import LoraSettings, TextEncoder, get_adapters, load_adapters, save_adapters, set_adapters
from common.features import compute_features
from common.model import Recommender
from common.training import AdapterCorruptionError, TrainConfig, _check_adapters, train

TEXTS = ["loved Star Wars (1977); liked Fargo (1996)", "hated Heat (1995)", "liked Toy Story (1995)",
         "loved Alien (1979); disliked Babe (1995); liked Casino (1995)", "was lukewarm on Jaws (1975)",
         "loved Clueless (1995)", "liked Twister (1996); loved Fargo (1996)", "hated Species (1995)"]
ITEMS = ["Toy Story (1995). Comedy", "Heat (1995). Action", "Fargo (1996). Crime", "Alien (1979). Sci-Fi",
         "Babe (1995). Children's", "Jaws (1975). Thriller"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = TextEncoder(LoraSettings(rank=4, alpha=8))
    # LoRA B starts at zero; give every adapter random values so the tests see real adapters.
    set_adapters(enc, [torch.randn_like(t) * 0.05 for t in get_adapters(enc)])
    return enc


@pytest.fixture(scope="module")
def feats(encoder, tokenizer):
    return compute_features(encoder, tokenizer, TEXTS, 24), compute_features(encoder, tokenizer, ITEMS, 16)


def test_cached_path_equals_stock_forward(encoder, tokenizer):
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    encoder.eval()
    with torch.no_grad():
        ours = encoder(enc["input_ids"], enc["attention_mask"])
        ref = encoder.reference_embedding(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_adapters_are_only_lora_in_fixed_order(encoder):
    names = encoder.adapter_names()
    assert names == sorted(names) and all("lora_" in n for n in names)
    trainable = sorted(n for n, p in encoder.named_parameters() if p.requires_grad)
    assert trainable == names
    # LoRA only on the top (non-frozen) layers
    assert all(f"layer.{encoder.lora.frozen_layers}" in n or f"layer.{encoder.lora.frozen_layers + 1}" in n
               for n in names)


def test_adapters_round_trip_bit_exact(encoder, tmp_path):
    path = save_adapters(encoder, tmp_path / "adapters.safetensors", extra={"item_bias": torch.arange(3.0)})
    original = get_adapters(encoder)
    other = TextEncoder(LoraSettings(rank=4, alpha=8))
    extra = load_adapters(other, path)
    for a, b in zip(original, get_adapters(other)):
        assert torch.equal(a, b)
    assert torch.equal(extra["item_bias"], torch.arange(3.0))
    with pytest.raises(ValueError, match="expected 8 adapter tensors"):
        set_adapters(other, original[:-1])
    with pytest.raises(ValueError, match="expected shape"):
        set_adapters(other, [torch.zeros(1)] + original[1:])


def _per_sample_grads(model, feats, targets, rows):
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.train()
    f, m = feats.batch(torch.as_tensor(rows))
    logits = gsm(f, m)
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(targets)[rows], reduction="sum")
    loss.backward()
    grads = {n: p.grad_sample.detach().clone() for n, p in gsm.named_parameters() if p.requires_grad}
    gsm.zero_grad()
    gsm._close()
    return grads


def test_per_example_gradient_is_independent_of_the_batch(encoder, feats):
    user_feats, item_feats = feats
    from common.model import refresh_items

    model = Recommender(encoder, len(ITEMS), item_bias=True, id_residual=True)
    refresh_items(model, item_feats)
    targets = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    a = _per_sample_grads(model, user_feats, targets, [0, 1, 2, 3])
    b = _per_sample_grads(model, user_feats, targets, [0, 5, 6, 7])
    alone = _per_sample_grads(model, user_feats, targets, [0])
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name][0], b[name][0], atol=1e-6), name
        assert torch.allclose(a[name][0], alone[name][0], atol=1e-6), name
        # and the other rows really are different examples
    assert any(not torch.allclose(a[n][1], b[n][1]) for n in a)


@pytest.mark.parametrize("bias_scale", [1.0, 10.0])
def test_scaled_item_bias_per_example_gradient_matches_autograd(encoder, feats, bias_scale):
    user_feats, item_feats = feats
    from common.model import refresh_items

    model = Recommender(encoder, len(ITEMS), item_bias=True, bias_scale=bias_scale)
    refresh_items(model, item_feats)
    with torch.no_grad():
        model.head.bias.bias.copy_(torch.linspace(-0.2, 0.3, len(ITEMS)))
    targets = np.array([2, 0, 5, 1])
    grads = _per_sample_grads(model, user_feats, targets, [0, 1, 2, 3])
    opacus_grads = next(g for n, g in grads.items() if n.endswith("head.bias.bias"))
    for row in range(4):
        model.zero_grad()
        f, m = user_feats.batch(torch.as_tensor([row]))
        torch.nn.functional.cross_entropy(model(f, m), torch.as_tensor(targets[[row]])).backward()
        assert torch.allclose(opacus_grads[row], model.head.bias.bias.grad, atol=1e-6)
        # d loss / d beta = scale * (softmax - onehot): the scale raises the bias's share of the clip norm
        probs = torch.softmax(model(f, m).detach()[0], dim=0)
        expected = bias_scale * (probs - torch.nn.functional.one_hot(torch.as_tensor(targets[row]), len(ITEMS)))
        assert torch.allclose(model.head.bias.bias.grad, expected, atol=1e-5)
    # ranking scores add the bias in logit units, scale * beta
    f, m = user_feats.batch(torch.arange(2))
    with torch.no_grad():
        user = model.encoder.forward_features(f, m)
        expected = model.head.scale * user @ model.head.item_emb.T + bias_scale * model.head.bias.bias
    assert torch.allclose(model.head.score(user), expected, atol=1e-5)


def test_dp_step_changes_lora_and_stays_finite(encoder, feats):
    user_feats, item_feats = feats
    model = Recommender(encoder, len(ITEMS), item_bias=True)
    before = get_adapters(encoder)
    cfg = TrainConfig(epochs=1.0, batch_size=4, dp=True, noise_multiplier=1.0, max_grad_norm=1.0, seed=1)
    report = train(model, user_feats, np.array([0, 1, 2, 3, 4, 5, 0, 1]), item_feats, cfg)
    after = get_adapters(encoder)
    assert report.steps == 2 and report.epsilon is not None and report.epsilon > 0
    assert all(torch.isfinite(t).all() for t in after)
    assert all(not torch.equal(x, y) for x, y in zip(before, after))  # every adapter tensor moved
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_epsilon_target_is_met(encoder, feats):
    user_feats, item_feats = feats
    model = Recommender(encoder, len(ITEMS), item_bias=True)
    cfg = TrainConfig(epochs=2.0, batch_size=4, dp=True, target_epsilon=8.0, delta=1e-5, seed=2)
    report = train(model, user_feats, np.arange(8) % 6, item_feats, cfg)
    assert report.epsilon <= 8.0 + 1e-6
    assert report.epsilon > 7.0  # the noise was solved for the target, not set far above it


def test_unchanged_weights_are_caught():
    w = [torch.ones(3)]
    with pytest.raises(AdapterCorruptionError, match="unchanged"):
        _check_adapters(w, [torch.ones(3)], must_change=True)
    with pytest.raises(AdapterCorruptionError, match="non-finite"):
        _check_adapters([torch.tensor([float("nan")])], [torch.ones(1)], must_change=False)


def test_unknown_items_are_scored_by_text_alone(encoder, feats):
    _, item_feats = feats
    from common.model import refresh_items

    model = Recommender(encoder, len(ITEMS), item_bias=True, id_residual=True)
    refresh_items(model, item_feats)
    with torch.no_grad():
        model.head.bias.bias.copy_(torch.tensor([5.0, -5.0, 1.0, 0.0, 9.0, 7.0]))
        model.head.residual.weight.normal_()
    model.head.known[:] = torch.tensor([True, True, True, True, False, False])
    u = torch.nn.functional.normalize(torch.randn(2, encoder.dim), dim=-1)
    scores = model.head.score(u)
    text_only = (u @ model.head.item_emb.T) * model.head.scale + 0.25  # mean of the known biases
    assert torch.allclose(scores[:, 4:], text_only[:, 4:], atol=1e-5)
    logits = model.head(u)
    assert torch.isinf(logits[:, 4:]).all()  # unknown items never enter the training softmax


def test_empty_poisson_batches_still_add_noise(encoder, feats):
    user_feats, item_feats = feats
    model = Recommender(encoder, len(ITEMS), item_bias=True)
    # expected batch 1 of 8 examples: P(empty batch) = (7/8)^8, about 0.34 per step; 64 steps, so no
    # empty batch at all has probability 0.66^64, about 3e-12
    cfg = TrainConfig(epochs=8.0, batch_size=1, dp=True, noise_multiplier=1.0, seed=3)
    report = train(model, user_feats, np.arange(8) % 6, item_feats, cfg)
    assert report.steps == 64
    assert report.empty_batches > 0  # each still moved the weights (checked after every step)


def test_a_client_with_no_examples_takes_the_same_noise_only_steps(encoder, feats):
    """Under DP the schedule comes from the public size: no examples still means every step."""
    _, item_feats = feats
    model = Recommender(encoder, len(ITEMS), item_bias=True)
    before = get_adapters(encoder)
    cfg = TrainConfig(epochs=1.0, batch_size=2, dp=True, noise_multiplier=1.0, public_size=4, seed=0)
    from common.features import FeatureSet

    empty = FeatureSet.empty(8, encoder.dim)
    report = train(model, empty, np.zeros(0, dtype=np.int64), item_feats, cfg)
    assert report.steps == 2 and report.empty_batches == 2 and report.expected_batch_size == 2
    assert not any(torch.equal(a, b) for a, b in zip(before, get_adapters(encoder)))
    set_adapters(encoder, before)


def _dp_update(encoder, feats, noise: float, epochs: float, batch: int, seed_globals: bool) -> list[torch.Tensor]:
    import random

    user_feats, item_feats = feats
    start = get_adapters(encoder)
    if seed_globals:
        torch.manual_seed(1234)
        np.random.seed(1234)
        random.seed(1234)
    model = Recommender(encoder, len(ITEMS), item_bias=False)
    cfg = TrainConfig(epochs=epochs, batch_size=batch, dp=True, noise_multiplier=noise, seed=5)
    train(model, user_feats, np.arange(8) % 6, item_feats, cfg)
    out = [a - b for a, b in zip(get_adapters(encoder), start)]
    set_adapters(encoder, start)
    return out


# noise 0 (sampling alone) has no finite epsilon: Opacus says so while accounting it
@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning")
@pytest.mark.parametrize("noise, epochs, batch", [(1.0, 1.0, 8), (0.0, 2.0, 2)], ids=["noise", "sampling"])
@pytest.mark.parametrize("seed_globals", [True, False], ids=["globals-seeded-alike", "identical-inputs"])
def test_dp_randomness_is_not_replayable(encoder, feats, noise, epochs, batch, seed_globals):
    """The same config, state and data, with torch's, numpy's and Python's global generators seeded
    identically (or not at all), never reproduce the DP noise nor, with no noise, the Poisson
    batches: both come from secure streams keyed from the OS."""
    first = _dp_update(encoder, feats, noise, epochs, batch, seed_globals)
    second = _dp_update(encoder, feats, noise, epochs, batch, seed_globals)
    assert not all(torch.equal(x, y) for x, y in zip(first, second))


def test_noise_and_sampling_use_separate_secure_streams(encoder, feats):
    from common.privacy import PublicSchedule, make_private
    from common.secure_random import SecureStream

    model = Recommender(encoder, len(ITEMS), item_bias=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    private = make_private(model, optimizer, 1.0, 1.0, PublicSchedule(0.5, 2, 4), "rdp")
    try:
        assert isinstance(private.sampling_stream, SecureStream)
        assert isinstance(private.optimizer.noise_stream, SecureStream)
        assert private.sampling_stream is not private.optimizer.noise_stream
        assert private.optimizer.generator is None and not private.optimizer.secure_mode
    finally:
        private.close()


def _lora_and_bias(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_opacus_per_sample_gradients_equal_each_examples_own_gradient(encoder, feats):
    """In scale, not only direction: a module registered twice in the tree would double them."""
    from opacus.grad_sample.utils import wrap_model

    from common.model import refresh_items

    user_feats, item_feats = feats
    model = Recommender(encoder, len(ITEMS), item_bias=True, bias_scale=10.0)
    refresh_items(model, item_feats)
    targets = torch.as_tensor([2, 0, 5, 1])
    rows = torch.arange(4)
    own = []
    for row in rows:
        model.zero_grad()
        f, m = user_feats.batch(row[None])
        torch.nn.functional.cross_entropy(model(f, m), targets[row][None]).backward()
        own.append({n: p.grad.detach().clone() for n, p in _lora_and_bias(model).items()})
    model.zero_grad()
    gsm = wrap_model(model, grad_sample_mode="hooks", batch_first=True, loss_reduction="mean")
    try:
        f, m = user_feats.batch(rows)
        torch.nn.functional.cross_entropy(gsm(f, m), targets).backward()
        for name, p in _lora_and_bias(model).items():
            for row in range(4):
                expected = own[row][name]
                assert torch.allclose(p.grad_sample[row], expected, atol=1e-6, rtol=1e-4), (name, row)
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = None
