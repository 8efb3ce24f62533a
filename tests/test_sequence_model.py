"""The sequence user model: per-sample gradients, no leakage of the target, cold-start scoring, DP loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.dataset import Dataset, Item
from common.grad_sample import per_example_gradient
from common.sequence import (SequenceRecommender, SequenceRows, SequenceSettings, evaluation_rows, rating_codes,
                             sequence_scores, training_rows, user_sequence_rows)
from common.sequence_training import SequenceTrainConfig, train_sequence
from common.split import leave_one_out

NUM_ITEMS, TEXT_DIM = 30, 12


def _item_text(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(NUM_ITEMS, TEXT_DIM, generator=g), dim=-1)


def _model(settings: SequenceSettings | None = None, known: torch.Tensor | None = None) -> SequenceRecommender:
    torch.manual_seed(0)
    model = SequenceRecommender(_item_text(), settings or SequenceSettings(history_len=6, dim=8, layers=2, heads=2),
                                known)
    with torch.no_grad():  # every parameter away from its (partly zero) initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _rows(n: int, history_len: int = 6, seed: int = 1) -> SequenceRows:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, NUM_ITEMS, size=(n, history_len))
    ratings = rng.integers(1, 6, size=(n, history_len))
    for k in range(n):  # left padding of different lengths, one row with no history at all
        pad = k % (history_len + 1)
        items[k, :pad], ratings[k, :pad] = NUM_ITEMS, 0
    return SequenceRows(items, ratings, rng.integers(0, NUM_ITEMS, size=n), np.zeros(n, dtype=np.int64))


def _dataset(sequences: list[list[int]]) -> Dataset:
    items = [Item(item_id=str(i + 1), title=f"item {i}") for i in range(NUM_ITEMS)]
    user, item, ts = [], [], []
    for u, seq in enumerate(sequences):
        for k, it in enumerate(seq):
            user.append(u), item.append(it), ts.append(1000.0 * u + k)
    n = len(user)
    return Dataset(items=items, user_ids=[str(u + 1) for u in range(len(sequences))], user=np.array(user),
                   item=np.array(item), rating=np.full(n, 4.0), timestamp=np.array(ts))


class _PerExample:
    """Per-example gradients of a batch's loss by one of the two DP engines (``mode``: Opacus' hooks or
    the one-pass engine): call :meth:`model`, then :meth:`backward` with the per-row losses."""

    def __init__(self, model, mode: str) -> None:
        from opacus.grad_sample.utils import wrap_model

        from common.grad_sample import OnePassGradSample

        self.mode = mode
        if mode == "hooks":
            self.model = wrap_model(model, grad_sample_mode="hooks", batch_first=True, loss_reduction="mean")
        else:
            self.engine, self.model = OnePassGradSample(model), model

    def backward(self, per_row: torch.Tensor) -> None:
        if self.mode == "hooks":
            per_row.mean().backward()
        else:
            self.engine.backward(per_row.sum(), len(per_row))

    def close(self) -> None:
        self.model._close() if self.mode == "hooks" else self.engine.close()


@pytest.mark.parametrize("mode", ["hooks", "one-pass"])
@pytest.mark.parametrize("id_dropout,prior_weight", [(False, 0.0), (True, 0.0), (False, 2.0)])
def test_per_sample_gradients_equal_each_examples_own_gradient(id_dropout, prior_weight, mode):
    known = torch.ones(NUM_ITEMS, dtype=torch.bool)
    known[-5:] = False
    model = _model(SequenceSettings(history_len=6, dim=8, layers=2, heads=2, prior_weight=prior_weight), known)
    rows = _rows(7)
    rows.targets[:] = np.arange(7)  # known targets
    items, ratings, targets = (torch.from_numpy(a) for a in (rows.items, rows.ratings, rows.targets))
    # ID dropout: each row drops its own items' ID terms; its gradients must still be that row's own
    mask = torch.from_numpy((np.random.default_rng(1).random((7, NUM_ITEMS)) >= 0.5).astype(np.float32)) \
        if id_dropout else None
    expected = []
    for k in range(len(rows)):  # each example alone
        model.zero_grad()
        row_mask = None if mask is None else mask[k:k + 1]
        torch.nn.functional.cross_entropy(model(items[k:k + 1], ratings[k:k + 1], row_mask),
                                          targets[k:k + 1]).backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    engine = _PerExample(model, mode)
    try:
        engine.backward(torch.nn.functional.cross_entropy(engine.model(items, ratings, mask), targets,
                                                          reduction="none"))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert {"text_bias.weight", "item_bias.bias", "id_in.weight", "id_out.weight", "text_in.weight",
                "blocks.1.attention.query.weight", "blocks.0.norm1.weight", "rating.weight",
                "query.weight"} <= set(names)
        if mask is not None:  # a dropped, known item's bias gets no gradient from that row
            dropped = (mask == 0) & known[None, :]
            assert bool(dropped.any())
            assert torch.all(model.item_bias.bias.grad_sample[dropped] == 0)
            assert not torch.all(model.item_bias.bias.grad_sample[~dropped & known[None, :]] == 0)
        for name, p in model.named_parameters():
            sample = per_example_gradient(p)
            assert sample.shape == (len(rows), *p.shape), name
            for k in range(len(rows)):
                want = expected[k][name]
                assert torch.allclose(sample[k], want, atol=1e-6, rtol=1e-4), (name, k)
            assert any(float(expected[k][name].abs().sum()) > 0 for k in range(len(rows))), name
            if mode == "one-pass":  # no ordinary gradient is computed
                assert p.grad is None, name
    finally:
        engine.close()


@pytest.mark.parametrize("id_terms", [False, True])
def test_the_scores_are_the_stated_formula_with_the_text_bias_in_text_space(id_terms):
    """score(j) = <text_out(u) + w, t_j> + prior + known_j (ID terms) + boost (unknown j), and the training
    logits the same without the boost and -inf for unknown items: the text bias applied in text space is
    the formula's T w."""
    known = torch.ones(NUM_ITEMS, dtype=torch.bool)
    known[::4] = False
    model = _model(SequenceSettings(history_len=6, dim=8, layers=1, heads=2, id_terms=id_terms, prior_weight=1.5,
                                    new_item_boost=0.7), known)
    rows = _rows(7)
    items, ratings = torch.from_numpy(rows.items), torch.from_numpy(rows.ratings)
    text = _item_text()
    with torch.no_grad():
        user = model.user_vectors(items, ratings)
        expected = model.text_out(user) @ text.T + (text @ model.text_bias.weight) \
            + 1.5 * model.text_prior(items, ratings)
        id_part = model.id_out(user) if id_terms else torch.zeros_like(expected)
        expected = expected + known * (id_part + model.item_bias.effective())
        assert model.text_bias.weight.abs().min() > 0 and model.item_bias.bias.abs().min() > 0
        assert torch.allclose(model.score(items, ratings), expected + 0.7 * (~known), atol=1e-5)
        training = model(items, ratings)
    assert torch.isinf(training[:, ~known]).all() and (training[:, ~known] < 0).all()
    assert torch.allclose(training[:, known], expected[:, known], atol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "one-pass"])
def test_history_exclusion_keeps_per_sample_gradients_each_rows_own(mode):
    from common.sequence import history_mask

    model = _model(SequenceSettings(history_len=6, dim=8, layers=1, heads=2, exclude_history=True))
    rows = _rows(7)
    rows.targets[:] = np.arange(7)
    rows.items[1, -1] = 1  # a repeated item: the row's target is also in its history and must stay scorable
    items, ratings, targets = (torch.from_numpy(a) for a in (rows.items, rows.ratings, rows.targets))
    mask = history_mask(items, targets, NUM_ITEMS)
    for k in range(len(rows)):  # exactly the row's own history items, never its target
        want = set(rows.items[k][rows.items[k] < NUM_ITEMS].tolist()) - {int(rows.targets[k])}
        assert set(torch.nonzero(mask[k]).flatten().tolist()) == want
    assert not bool(mask[6].any())  # the row with no history masks nothing

    def loss_of(module, sl, reduction="mean"):
        logits = module(items[sl], ratings[sl]).masked_fill(mask[sl], float("-inf"))
        return torch.nn.functional.cross_entropy(logits, targets[sl], reduction=reduction)

    expected = []
    for k in range(len(rows)):
        model.zero_grad()
        loss = loss_of(model, slice(k, k + 1))
        assert torch.isfinite(loss)
        loss.backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    engine = _PerExample(model, mode)
    try:
        engine.backward(loss_of(engine.model, slice(None), "none"))
        for name, p in model.named_parameters():
            for k in range(len(rows)):
                assert torch.allclose(per_example_gradient(p)[k], expected[k][name], atol=1e-6, rtol=1e-4), (name, k)
        # a row's masked history items get no bias gradient from it; its other items do
        assert torch.all(model.item_bias.bias.grad_sample[mask] == 0)
        assert torch.all(model.item_bias.bias.grad_sample[~mask] != 0)
    finally:
        engine.close()


def test_a_training_step_leaves_the_rows_history_items_out_of_its_softmax():
    from common.run_config import resolve
    from common.sequence_runtime import sequence_settings

    assert sequence_settings(resolve({})).exclude_history  # the federated default
    assert not sequence_settings(resolve({"sequence-exclude-history": False})).exclude_history
    rows = _rows(1)
    rows.targets[:] = 0
    history = set(rows.items[0][rows.items[0] < NUM_ITEMS].tolist()) - {0}
    assert len(history) >= 3
    moved = {}
    for exclude in (True, False):
        model = _model(SequenceSettings(history_len=6, dim=8, layers=1, heads=2, exclude_history=exclude))
        before = model.item_bias.bias.detach().clone()
        train_sequence(model, rows, SequenceTrainConfig(epochs=1.0, batch_size=1, optimizer="sgd", learning_rate=0.5))
        moved[exclude] = set(torch.nonzero(model.item_bias.bias.detach() != before).flatten().tolist())
    assert moved[True] == set(range(NUM_ITEMS)) - history  # exactly the history items untouched
    assert moved[False] == set(range(NUM_ITEMS))  # without the rule every item's bias moves


def test_history_exclusion_trains_under_dp():
    model = _model(SequenceSettings(history_len=6, dim=8, layers=1, heads=2, exclude_history=True))
    rows = _rows(40)
    report = train_sequence(model, rows, SequenceTrainConfig(dp=True, epochs=1.0, batch_size=8, noise_multiplier=1.0))
    assert report.steps > 0 and all(np.isfinite(report.losses))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_rows_use_only_interactions_before_their_target():
    seqs = [[3, 7, 1, 9, 4, 2, 8], [5, 6, 0, 11]]
    split = leave_one_out(_dataset(seqs))
    rows = user_sequence_rows(split, 0, history_len=3)
    train = seqs[0][:-2]  # validation 2, test 8
    assert rows.targets.tolist() == train[1:]
    pad = NUM_ITEMS
    assert rows.items.tolist() == [[pad, pad, 3], [pad, 3, 7], [3, 7, 1], [7, 1, 9]]
    # changing what comes after a target changes no earlier row
    later = leave_one_out(_dataset([[3, 7, 1, 9, 20, 21, 22], [5, 6, 0, 11]]))
    assert user_sequence_rows(later, 0, 3).items[:2].tolist() == rows.items[:2].tolist()
    users = np.array([0, 1])
    val, test = evaluation_rows(split, "validation", 3, users), evaluation_rows(split, "test", 3, users)
    assert val.items[0].tolist() == [1, 9, 4] and val.targets[0] == 2
    assert test.items[0].tolist() == [9, 4, 2] and test.targets[0] == 8
    assert 8 not in val.items[0] and 2 not in training_rows(split, 3).items[:len(rows)].ravel()


def test_the_capped_rows_are_the_most_recent():
    split = leave_one_out(_dataset([list(range(12))]))
    rows = user_sequence_rows(split, 0, history_len=4, examples_per_user=3)
    assert rows.targets.tolist() == [7, 8, 9]


def test_rating_codes():
    assert rating_codes(np.array([1.0, 4.6, np.nan, 5.0])).tolist() == [1, 5, 0, 5]


@pytest.mark.parametrize("boost", [0.0, 0.5])
def test_unseen_items_are_rankable_and_ignore_every_id_parameter(boost):
    known = torch.ones(NUM_ITEMS, dtype=torch.bool)
    known[[2, 11, 17]] = False
    model = _model(SequenceSettings(history_len=6, dim=8, layers=2, heads=2, new_item_boost=boost), known=known)
    rows = _rows(5)
    rows.items[rows.items == 2] = 3
    before = sequence_scores(model, rows)
    assert np.isfinite(before).all()
    with torch.no_grad():
        for layer in (model.id_out, model.item_bias):
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
        model.id_in.weight[[2, 11, 17]] += 5.0  # an unseen item's input ID row is never used
    after = sequence_scores(model, rows)
    cold = (~known).numpy()
    np.testing.assert_allclose(after[:, cold], before[:, cold], rtol=1e-6, atol=1e-6)
    assert not np.allclose(after[:, ~cold], before[:, ~cold])
    logits = model(torch.from_numpy(rows.items), torch.from_numpy(rows.ratings))
    assert torch.isinf(logits[:, ~known]).all() and torch.isfinite(logits[:, known]).all()


@pytest.mark.parametrize("id_terms,boost", [(True, 0.7), (False, -0.4)])
def test_the_new_item_boost_moves_exactly_the_unseen_items_scores(id_terms, boost):
    known = torch.ones(NUM_ITEMS, dtype=torch.bool)
    known[[2, 11, 17]] = False
    settings = SequenceSettings(history_len=6, dim=8, layers=2, heads=2, id_terms=id_terms)
    model = _model(settings, known=known)
    rows = _rows(5)
    plain = sequence_scores(model, rows)
    model.settings = SequenceSettings(**{**settings.__dict__, "new_item_boost": boost})
    boosted = sequence_scores(model, rows)
    cold = (~known).numpy()
    np.testing.assert_array_equal(boosted[:, ~cold], plain[:, ~cold])
    np.testing.assert_allclose(boosted[:, cold], plain[:, cold] + boost, rtol=0, atol=1e-6)
    logits = model(torch.from_numpy(rows.items), torch.from_numpy(rows.ratings))  # training ignores it
    assert torch.isinf(logits[:, ~known]).all()
    with pytest.raises(ValueError, match="new_item_boost"):
        SequenceSettings(new_item_boost=float("nan"))


def test_a_history_of_unseen_items_only_reads_their_text():
    known = torch.ones(NUM_ITEMS, dtype=torch.bool)
    known[[4, 5]] = False
    model = _model(known=known)
    items = torch.tensor([[NUM_ITEMS, 4, 5]])
    ratings = torch.tensor([[0, 3, 4]])
    model.settings = SequenceSettings(history_len=3, dim=8)
    a = model.user_vectors(items, ratings)
    with torch.no_grad():
        model.id_in.weight[[4, 5]] = 100.0
    assert torch.allclose(model.user_vectors(items, ratings), a)


def test_an_empty_history_gives_a_finite_user():
    model = _model()
    rows = _rows(1)
    rows.items[:], rows.ratings[:] = NUM_ITEMS, 0
    assert np.isfinite(sequence_scores(model, rows)).all()


@pytest.mark.parametrize("dp", [False, True])
def test_training_lowers_the_loss_and_reports_its_privacy(dp):
    rows = _rows(64, seed=3)
    rows.targets[:] = rows.items[:, -1] % 7  # learnable from the last item
    model = _model()
    cfg = SequenceTrainConfig(epochs=30 if not dp else 8, batch_size=16, learning_rate=1e-2, dp=dp,
                              noise_multiplier=0.5 if dp else None, max_grad_norm=5.0)
    report = train_sequence(model, rows, cfg)
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())
    if dp:
        from common.privacy import epsilon_of_history

        assert report.epsilon == pytest.approx(epsilon_of_history(
            [(0.5, 16 / 64, report.steps)], cfg.delta))
        assert report.steps == 32
    else:
        assert report.epsilon is None
        assert np.mean(report.losses[-5:]) < np.mean(report.losses[:5]) - 0.5


def test_dropout_is_refused_under_dp():
    """nn.Dropout's masks come from torch's seeded generator and follow row positions: a removal that shifts
    the rows would change other examples' gradients, which the accounted sensitivity does not cover."""
    model = _model(SequenceSettings(history_len=6, dim=8, layers=1, heads=2, dropout=0.1))
    cfg = SequenceTrainConfig(epochs=1, batch_size=4, dp=True, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="dropout under DP"):
        train_sequence(model, _rows(8), cfg)
    train_sequence(model, _rows(8), SequenceTrainConfig(epochs=1, batch_size=4))  # without DP it trains


def test_the_text_heuristic_is_the_stated_formula():
    from simulations.text_heuristic import heuristic_scores

    text = _item_text()
    rows = SequenceRows(np.array([[NUM_ITEMS, 4, 9]]), np.array([[0, 5, 2]]), np.array([1]), np.array([0]))
    counts = np.arange(NUM_ITEMS)
    got = heuristic_scores(text, rows, counts, decay=0.5, pop_weight=0.3)[0]
    user = (5 - 2.5) * 0.5 * text[4].double() + (2 - 2.5) * 1.0 * text[9].double()
    user = user / user.norm()
    want = (text.double() @ user).numpy() + 0.3 * np.log1p(counts)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bench_overrides_name_a_field_and_keep_its_type():
    import typer

    from simulations.bench_sequence import SETTINGS, TRAIN, with_overrides

    settings, cfg = with_overrides(SETTINGS, TRAIN, ["dim=32", "learning_rate=0.002"])
    assert settings.dim == 32 and cfg.learning_rate == 0.002 and settings.layers == SETTINGS.layers
    for bad in (["nope=1"], ["dim"], ["dp=1"]):
        with pytest.raises(typer.BadParameter):
            with_overrides(SETTINGS, TRAIN, bad)


def test_the_text_prior_is_the_heuristic_without_popularity():
    from simulations.text_heuristic import heuristic_scores

    model = _model(SequenceSettings(history_len=6, dim=8, layers=1, heads=2, prior_weight=1.0, prior_decay=0.7))
    rows = _rows(5)
    rows.items[0], rows.ratings[0] = NUM_ITEMS, 0  # no history: the prior is 0
    got = model.text_prior(torch.from_numpy(rows.items), torch.from_numpy(rows.ratings)).numpy()
    want = heuristic_scores(model.item_text[:NUM_ITEMS], rows, np.zeros(NUM_ITEMS), decay=0.7, pop_weight=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not got[0].any()


@pytest.mark.parametrize("dp", [False, True])
def test_the_central_reference_keeps_the_best_validation_epoch_or_the_private_run(dp):
    from dataclasses import replace

    from common.privacy import epsilon_of_history
    from simulations.bench_sequence import DP_TRAIN, TRAIN, fit

    rng = np.random.default_rng(0)
    split = leave_one_out(_dataset([list(rng.permutation(NUM_ITEMS)[:12]) for _ in range(8)]))
    settings = SequenceSettings(history_len=4, dim=8, layers=1, heads=2, id_dropout=0.3)
    cfg = replace(DP_TRAIN, batch_size=16, epochs=2.0) if dp else replace(TRAIN, batch_size=16)
    model, info = fit(_item_text(), split, settings, cfg, max_epochs=3, seed=0, label=None)
    if dp:
        assert info["epsilon"] == pytest.approx(epsilon_of_history(
            [(info["noise_multiplier"], info["sample_rate"], info["steps"])], cfg.delta))
        assert info["epsilon"] <= cfg.target_epsilon + 1e-6
    else:
        assert len(info["validation_curve"]) == 3
        assert info["validation_curve"][info["epoch_chosen"] - 1] == max(info["validation_curve"])


def test_a_federated_session_always_has_the_public_number_of_rows():
    from simulations.bench_sequence_federated import padded_session_rows

    seqs = [list(range(12)), [3, 4, 5], [7, 8, 9, 10, 11, 12, 13]]
    split = leave_one_out(_dataset(seqs))
    for user in range(3):
        rows, weights = padded_session_rows(split, user, cap=6, history_len=4)
        real = user_sequence_rows(split, user, 4, 6)
        assert rows.items.shape == (6, 4) and len(weights) == 6
        assert weights.tolist() == [1.0] * len(real) + [0.0] * (6 - len(real))
        assert rows.items[len(real):].tolist() == [[NUM_ITEMS] * 4] * (6 - len(real))


def test_a_padding_row_with_a_masked_target_adds_nothing():
    known = torch.ones(NUM_ITEMS, dtype=torch.bool)
    known[0] = False  # padding rows' (unused) target
    model = _model(known=known)
    rows = _rows(4, seed=5)
    rows.targets[:] = [3, 4, 0, 0]
    cfg = SequenceTrainConfig(epochs=1.0, batch_size=4, learning_rate=0.1, dp=True, noise_multiplier=0.5,
                              public_size=4, sensitivity=2.0)
    report = train_sequence(model, rows, cfg, row_weights=np.array([1.0, 1.0, 0.0, 0.0]))
    assert all(np.isfinite(loss) for loss in report.losses)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_the_federated_reference_refuses_to_change_its_mechanism():
    from typer.testing import CliRunner

    from simulations.bench_sequence_federated import app

    for bad in ("dp=false", "sensitivity=1.0", "epochs=2.0", "noise_multiplier=0.5", "public_size=10"):
        result = CliRunner().invoke(app, ["--set", bad, "--rounds", "1"])
        assert result.exit_code != 0 and "only model settings" in result.output, bad


def test_the_prefix_exclusion_masks_each_rows_earlier_items_beyond_its_window():
    from simulations.bench_sequence import prefix_exclusions

    seqs = [[3, 7, 1, 9, 4, 7, 2, 5, 8], [5, 6, 0, 11, 12]]
    split = leave_one_out(_dataset(seqs))
    rows = training_rows(split, history_len=2)
    mask = prefix_exclusions(split, rows)(torch.arange(len(rows))).numpy()
    k = 0
    for seq in seqs:
        train = seq[:-2]
        for t in range(1, len(train)):
            want = set(train[:t]) - {train[t]}  # the whole prefix, the target itself left in
            assert set(np.flatnonzero(mask[k]).tolist()) == want, (seq, t)
            k += 1
    assert k == len(rows)
    # the row of target 7 (position 5) has 7 earlier too: it stays scorable; 3 is older than its window
    row = [i for i in range(len(rows)) if rows.users[i] == 0 and rows.targets[i] == 7][1]
    assert not mask[row, 7] and mask[row, 3] and 3 not in rows.items[row]


def test_a_final_learning_rate_must_lie_between_zero_and_the_start():
    for final in (-0.1, 0.6):
        with pytest.raises(ValueError, match="final_learning_rate"):
            train_sequence(_model(), _rows(4), SequenceTrainConfig(epochs=1.0, batch_size=4, optimizer="sgd",
                                                                   learning_rate=0.5, final_learning_rate=final))


def test_extra_exclusions_are_refused_under_dp():
    model = _model()
    rows = _rows(8)
    with pytest.raises(ValueError, match="not allowed under DP"):
        train_sequence(model, rows, SequenceTrainConfig(dp=True, epochs=1.0, batch_size=4, noise_multiplier=1.0),
                       extra_exclusions=lambda idx: torch.zeros(len(idx), NUM_ITEMS, dtype=torch.bool))


def test_extra_exclusions_leave_the_masked_items_untouched():
    rows = _rows(1)
    rows.targets[:] = 0
    model = _model(SequenceSettings(history_len=6, dim=8, layers=1, heads=2))
    before = model.item_bias.bias.detach().clone()
    masked = {4, 9, 17}
    extra = torch.zeros(1, NUM_ITEMS, dtype=torch.bool)
    extra[0, list(masked)] = True
    train_sequence(model, rows, SequenceTrainConfig(epochs=1.0, batch_size=1, optimizer="sgd", learning_rate=0.5),
                   extra_exclusions=lambda idx: extra[: len(idx)])
    moved = set(torch.nonzero(model.item_bias.bias.detach() != before).flatten().tolist())
    assert moved == set(range(NUM_ITEMS)) - masked


@pytest.mark.parametrize("dp", [False, True])
def test_the_learning_rate_falls_linearly_to_its_final_value(dp, monkeypatch):
    seen = []
    original = torch.optim.SGD.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    cfg = SequenceTrainConfig(epochs=5.0, batch_size=8, optimizer="sgd", learning_rate=0.4, final_learning_rate=0.0,
                              dp=dp, noise_multiplier=1.0 if dp else None)
    report = train_sequence(_model(), _rows(8), cfg)
    assert report.steps == 5 and seen == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])


@pytest.mark.parametrize("flags", [["--examples-per-user", "50"], ["--exclude-prefix"], ["--final-lr-factor", "0.5"],
                                   ["--set", "dp=false"]])
def test_the_central_dp_reference_refuses_rules_its_accounting_does_not_cover(flags, tmp_path):
    from typer.testing import CliRunner

    from simulations import bench_sequence

    result = CliRunner().invoke(bench_sequence.app, ["sequence-dp", "--out", str(tmp_path),
                                                                 "--no-cold-start", *flags])
    assert result.exit_code != 0
    said = _plain(result.output)
    assert "non-private" in said or "says whether it is private" in said
    assert not list(tmp_path.iterdir())


def test_the_non_private_reference_cannot_be_switched_to_dp_past_its_rules(tmp_path):
    from typer.testing import CliRunner

    from simulations import bench_sequence

    # DP-SGD on a most-recent-N window would need sensitivity 2C, and sequence-dp accounts C
    result = CliRunner().invoke(bench_sequence.app, ["sequence", "--out", str(tmp_path), "--no-cold-start",
                                                                 "--set", "dp=true", "--examples-per-user", "50"])
    assert result.exit_code != 0 and "says whether it is private" in _plain(result.output)
    assert not list(tmp_path.iterdir())


def test_each_method_has_its_own_training_rules():
    from simulations.bench_sequence import training_rules

    assert training_rules("sequence", None, None) == (0.0, True)
    assert training_rules("sequence-dp", None, None) == (1.0, False)
    assert training_rules("sequence", 1.0, False) == (1.0, False)


def test_the_central_reference_decays_its_learning_rate_over_the_epoch_budget(monkeypatch):
    from simulations import bench_sequence

    calls = []
    real = bench_sequence.train_sequence

    def record(model, rows, cfg, **kwargs):
        calls.append((cfg.learning_rate, cfg.final_learning_rate, kwargs.get("extra_exclusions")))
        return real(model, rows, cfg, **kwargs)

    monkeypatch.setattr(bench_sequence, "train_sequence", record)
    rng = np.random.default_rng(0)
    split = leave_one_out(_dataset([list(rng.permutation(NUM_ITEMS)[:12]) for _ in range(8)]))
    settings = SequenceSettings(history_len=4, dim=8, layers=1, heads=2)
    cfg = SequenceTrainConfig(epochs=1.0, batch_size=16, learning_rate=3e-3)
    _, info = bench_sequence.fit(_item_text(), split, settings, cfg, max_epochs=3, seed=0, label=None,
                                 final_lr_factor=0.0, exclude_prefix=True)
    assert [x for c in calls for x in c[:2]] == pytest.approx([3e-3, 2e-3, 2e-3, 1e-3, 1e-3, 0.0])
    assert all(c[2] is not None for c in calls) and info["exclude_prefix"] and info["final_lr_factor"] == 0.0
    calls.clear()
    bench_sequence.fit(_item_text(), split, settings, cfg, max_epochs=2, seed=0, label=None)
    assert calls == [(3e-3, None, None)] * 2  # the defaults of fit itself: constant, no extra mask


def _plain(output: str) -> str:
    """A CLI's output without rich's box and line breaks."""
    return " ".join(output.replace("│", " ").split())


def test_the_cold_start_grid_equals_ranking_with_each_boost_set():
    from dataclasses import replace

    from common.evaluation import evaluate_scores
    from simulations.bench_cold_start import unseen_rankings
    from simulations.baselines import cold_start_users

    rng = np.random.default_rng(3)
    split = leave_one_out(_dataset([list(rng.permutation(NUM_ITEMS)[:10]) for _ in range(12)]))
    test_targets = [int(split.data.item[split.target_row(int(u), "test")]) for u in split.eval_users()]
    held_out = np.array(sorted(set(test_targets[:4])))
    known = torch.ones(NUM_ITEMS, dtype=torch.bool)
    known[torch.from_numpy(held_out)] = False
    model = _model(SequenceSettings(history_len=4, dim=8, layers=1, heads=2, new_item_boost=0.7), known)
    boosts = (0.0, 0.5, 2.0)
    got = unseen_rankings(model, split, held_out, boosts)
    assert model.settings.new_item_boost == 0.7  # restored
    for boost in boosts:
        model.settings = replace(model.settings, new_item_boost=boost)
        for which in ("validation", "test"):
            for group, users in (("all", split.eval_users()), ("cold", cold_start_users(split, held_out, which))):
                rows = evaluation_rows(split, which, 4, users)
                want = evaluate_scores(sequence_scores(model, rows), split, which, users)
                assert got[f"{boost:g}"][f"{which}_{group}"] == {
                    "users": len(users), "NDCG@10": round(want["NDCG@10"], 5), "HR@10": round(want["HR@10"], 5)}
    assert len(cold_start_users(split, held_out, "test")) >= 4
    assert got["2"]["test_cold"]["HR@10"] > got["0"]["test_cold"]["HR@10"]  # the boost does lift new items here


def test_the_central_dp_reference_takes_its_own_public_learning_rate_schedule():
    from simulations.bench_sequence import DP_SETTINGS, DP_TRAIN, method_config

    settings, train_cfg, final_lr_factor, exclude_prefix = method_config("sequence-dp", ["final_learning_rate=0.0"],
                                                                         0, None, None)
    assert train_cfg.dp and train_cfg.final_learning_rate == 0.0 and final_lr_factor == 1.0 and not exclude_prefix
    # the DP model's own settings (chosen on validation), not the non-private model's
    assert settings == DP_SETTINGS and settings.id_dropout == 0.0 and train_cfg.epochs == DP_TRAIN.epochs


class _SpikeCanary:
    """One audit canary: a per-example gradient of norm 100 on the first coordinate of the first tensor."""

    count = 1

    def rows(self, canary_index, params):
        out = [torch.zeros((len(canary_index), *p.shape)) for p in params]
        out[0].view(len(canary_index), -1)[:, 0] = 100.0
        return out


def test_gradient_canaries_are_refused_without_dp():
    with pytest.raises(ValueError, match="canaries need DP"):
        train_sequence(_model(), _rows(4), SequenceTrainConfig(epochs=1.0, batch_size=2), canaries=_SpikeCanary())


def test_a_sampled_canary_moves_its_coordinate_by_one_clipped_step_over_the_public_batch():
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    # rate 1 (batch 5 of public size 5: 4 real rows and the canary): one step, every row in it; the real
    # rows are weight-0 padding, so only the canary's gradient, clipped to C = 1, moves anything
    cfg = SequenceTrainConfig(epochs=1.0, batch_size=5, optimizer="sgd", learning_rate=0.5, dp=True,
                              noise_multiplier=0.0, max_grad_norm=1.0, public_size=5)
    report = train_sequence(model, _rows(4), cfg, row_weights=np.zeros(4), canaries=_SpikeCanary())
    assert report.steps == 1 and report.examples == 1
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    assert float(moved[0]) == pytest.approx(-0.5 * 1.0 / 5)  # lr x C / the public expected batch
    assert float(moved[1:].abs().max()) == 0.0


@pytest.mark.parametrize("out", [[], ["--out", "simulations/results/sequence"]])
def test_a_trained_run_does_not_overwrite_the_published_rows(out, monkeypatch):
    from pathlib import Path

    from typer.testing import CliRunner

    from simulations import bench_sequence

    monkeypatch.chdir(Path(bench_sequence.__file__).parent.parent)  # the relative path names the root itself
    result = CliRunner().invoke(bench_sequence.app, ["sequence-dp", "--no-cold-start", *out])
    assert result.exit_code != 0 and "--out folder of its own" in _plain(result.output)


def test_the_central_dp_defaults_are_those_of_the_published_tuned_runs():
    """The documented command (no --set) must reproduce the configuration of results/sequence/dp-tuned. How
    per-example gradients are computed (grad_sample_mode, recorded since the one-pass engine; the runs used
    Opacus' hooks) is not part of the configuration: the gradients, clipping and noise are the same; nor is
    user_batches (added later, non-private only: 0 under DP)."""
    import json
    from dataclasses import asdict

    from simulations.bench_sequence import DP_SETTINGS, DP_TRAIN, RESULTS

    assert DP_TRAIN.user_batches == 0
    ignored = {"seed", "grad_sample_mode", "user_batches"}
    for seed in (0, 1, 2):
        config = json.loads((RESULTS / "dp-tuned" / f"sequence-dp-seed{seed}-test.json").read_text())["config"]
        assert config["settings"] == asdict(DP_SETTINGS)
        assert {k: v for k, v in config["train"].items() if k not in ignored} == \
               {k: v for k, v in asdict(DP_TRAIN).items() if k not in ignored}


def test_user_batches_hold_whole_users_each_once_per_pass_and_are_refused_under_dp():
    from common.sequence_training import _user_batches, _user_groups

    rows = _rows(10)
    rows.users[:] = np.array([3, 1, 3, 2, 1, 3, 0, 2, 1, 3])  # four users, 1 to 4 rows each
    groups = _user_groups(rows.users)
    assert [sorted(rows.users[g].tolist()) for g in groups] == [[0], [1, 1, 1], [2, 2], [3, 3, 3, 3]]
    batches = _user_batches(groups, 3, torch.Generator().manual_seed(0))
    for _ in range(3):  # three passes: batches of 3 users then 1, every user's rows once per pass
        first, second = next(batches), next(batches)
        users = [set(rows.users[b.numpy()].tolist()) for b in (first, second)]
        assert [len(u) for u in users] == [3, 1] and users[0] | users[1] == {0, 1, 2, 3}
        assert sorted(torch.cat([first, second]).tolist()) == list(range(10))
    report = train_sequence(_model(), rows, SequenceTrainConfig(epochs=2.0, user_batches=3, optimizer="sgd"))
    assert report.steps == 4 and report.examples == 20
    for bad in (SequenceTrainConfig(dp=True, epochs=1.0, batch_size=4, noise_multiplier=1.0, user_batches=2),
                SequenceTrainConfig(epochs=1.0, user_batches=-1)):
        with pytest.raises(ValueError, match="user_batches"):
            train_sequence(_model(), rows, bad)
