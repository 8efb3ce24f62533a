"""The personal part of the sequence model (an offset in item-text space fitted on the device's own
history): each user's offset depends on that user's rows alone, the global model is never changed,
the fit lowers the user's own objective, and the device ranks with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.partition import split_for
from common.personalisation import PersonalSettings, fit_offsets, personal_objective, personal_rows, \
    personal_scores
from common.sequence import SequenceRecommender, SequenceSettings, concat_rows, evaluation_rows, sequence_scores


@pytest.fixture
def trained_like(tiny_grouplens):
    """A sequence model over the tiny catalogue with every parameter moved off its initial value (a
    stand-in for a trained global model; no randomness beyond a fixed seed), in float64: batched and
    single fits then agree far inside the tolerances below (in float32 the rounding of differently
    batched products, magnified by Adam's normalised step where a gradient is near zero, need not)."""
    split = split_for(str(tiny_grouplens))
    gen = torch.Generator().manual_seed(3)
    text = torch.nn.functional.normalize(torch.randn(split.data.num_items, 384, generator=gen), dim=1)
    with torch.random.fork_rng():  # the layers' initial values from a fixed seed, whatever ran before
        torch.manual_seed(5)
        model = SequenceRecommender(text, SequenceSettings(history_len=3, dim=8, layers=1, id_terms=False,
                                                           prior_weight=2.0, exclude_history=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.double().eval()
    return split, model


def _rows(split, users, which="validation", cap=50):
    parts = [personal_rows(split, split.history_rows(int(u), which), 3, cap) for u in users]
    owners = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)])
    return parts, concat_rows(parts, 3), owners


def _everyone(trained_like):
    """(split, model, users, per-user rows, all rows, their owners) for every user with targets."""
    split, model = trained_like
    users = split.eval_users()
    return (split, model, users, *_rows(split, users))


def test_each_users_offset_is_the_one_it_gets_fitting_alone(trained_like):
    _, model, users, parts, rows, owners = _everyone(trained_like)
    settings = PersonalSettings(steps=15, learning_rate=0.05, l2=0.1)
    together = fit_offsets(model, rows, owners, len(users), settings)
    for k, part in enumerate(parts):
        alone = fit_offsets(model, part, np.zeros(len(part), dtype=np.int64), 1, settings)[0]
        assert torch.allclose(together[k], alone, atol=1e-6), k
    assert together.abs().sum(1).min() > 0  # every user with rows moved off the global model


def test_no_steps_is_the_global_model_and_a_fit_changes_no_global_parameter(trained_like):
    split, model, users, _, rows, owners = _everyone(trained_like)
    before = [p.detach().clone() for p in model.parameters()]
    assert fit_offsets(model, rows, owners, len(users), PersonalSettings(steps=0)).abs().max() == 0
    offsets = fit_offsets(model, rows, owners, len(users), PersonalSettings())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    global_scores = sequence_scores(model, evaluation_rows(split, "validation", 3, users))
    assert np.array_equal(personal_scores(model, global_scores, torch.zeros_like(offsets)), global_scores)
    shifted = personal_scores(model, global_scores, offsets)
    text = model.item_text[: model.num_items].numpy()
    assert np.allclose(shifted - global_scores, offsets.numpy() @ text.T, atol=1e-5)


def test_the_fit_lowers_each_users_own_objective(trained_like):
    _, model, users, _, rows, owners = _everyone(trained_like)
    settings = PersonalSettings(steps=20, learning_rate=0.05, l2=0.1)
    offsets = fit_offsets(model, rows, owners, len(users), settings)
    with torch.no_grad():
        items, targets = torch.from_numpy(rows.items), torch.from_numpy(rows.targets)
        from common.sequence import history_mask
        base = model(items, torch.from_numpy(rows.ratings)).masked_fill(
            history_mask(items, targets, model.num_items), float("-inf"))
        owners_t = torch.from_numpy(owners)
        counts = torch.bincount(owners_t, minlength=len(users)).clamp(min=1).float()
        text = model.item_text[: model.num_items]
        at_zero = personal_objective(base, targets, owners_t, counts, torch.zeros_like(offsets), text, settings.l2)
        fitted = personal_objective(base, targets, owners_t, counts, offsets, text, settings.l2)
    assert (fitted < at_zero).all()


def test_personal_rows_read_only_interactions_before_each_target_and_the_most_recent(trained_like):
    split, _ = trained_like
    data = split.data
    user_rows = split.history_rows(0, "test")
    rows = personal_rows(split, user_rows, 3, cap=4)
    assert len(rows) == 4
    for k, t in enumerate(range(len(user_rows) - 4, len(user_rows))):
        assert rows.targets[k] == data.item[user_rows[t]]
        before = data.item[user_rows[max(0, t - 3):t]]
        assert list(rows.items[k][3 - len(before):]) == list(before)
        assert (rows.items[k][: 3 - len(before)] == data.num_items).all()
    assert len(personal_rows(split, user_rows[:1], 3, cap=4)) == 0  # one interaction: no row to fit


def test_targets_the_model_has_no_logit_for_are_left_out_of_the_fit(trained_like):
    split, _ = trained_like
    data = split.data
    user_rows = split.history_rows(0, "test")
    known = np.ones(data.num_items, dtype=bool)
    dropped = int(data.item[user_rows[-1]])
    known[dropped] = False
    rows = personal_rows(split, user_rows, 3, cap=50, known=known)
    assert list(rows.targets) == [int(data.item[r]) for r in user_rows[1:] if data.item[r] != dropped]
    assert len(rows) < len(user_rows) - 1
    everything = personal_rows(split, user_rows, 3, cap=50, known=np.ones(data.num_items, dtype=bool))
    unfiltered = personal_rows(split, user_rows, 3, cap=50)
    assert all(np.array_equal(getattr(everything, f), getattr(unfiltered, f)) for f in ("items", "ratings", "targets"))


def test_the_cold_start_figures_refuse_a_run_without_the_hold_out_or_of_another_seed(tmp_path):
    import json

    import typer

    from common.run_config import resolve
    from simulations.bench_personal import cold_start_figures

    (tmp_path / "config.json").write_text(json.dumps({**resolve({}), "cold-start-holdout": False, "seed": 0}))
    with pytest.raises(typer.BadParameter, match="cold-start-holdout=true"):
        cold_start_figures(tmp_path, 0)
    (tmp_path / "config.json").write_text(json.dumps({**resolve({}), "cold-start-holdout": True, "seed": 0}))
    with pytest.raises(typer.BadParameter, match="not --seed 1"):
        cold_start_figures(tmp_path, 1)


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(rows=0), dict(learning_rate=0.0), dict(l2=-1.0),
                                 dict(learning_rate=float("nan")), dict(min_target_rating=6.0)])
def test_bad_personal_settings_are_refused(bad):
    with pytest.raises(ValueError, match="personal"):
        PersonalSettings(**bad)


def test_owners_outside_the_offsets_are_refused(trained_like):
    split, model = trained_like
    _, rows, owners = _rows(split, split.eval_users()[:2])
    for bad_owners, count in ((owners + 5, 2), (owners.astype(float), 2), (owners, 0)):
        with pytest.raises(ValueError, match="owners"):
            fit_offsets(model, rows, bad_owners, count, PersonalSettings())


def test_the_harness_scores_global_and_personalised_quality_from_the_same_model(trained_like):
    from common.evaluation import evaluate_scores
    from simulations.bench_personal import personalised_metrics

    split, model = trained_like
    users = split.eval_users()
    none = personalised_metrics(model, split, "test", PersonalSettings(steps=0))
    assert none["personal"] == none["global"]
    assert none["paired"] == {"users_up": 0, "users_down": 0, "mean_NDCG@10_difference": 0.0}
    assert none["global"] == evaluate_scores(sequence_scores(model, evaluation_rows(split, "test", 3, users)),
                                             split, "test", users)


@pytest.mark.parametrize("which", ["validation", "test"])
def test_the_harness_fits_each_user_on_what_the_device_holds_before_the_target(trained_like, which):
    """In batches of two users, each user's personalised scores are the global ones plus the offset that user
    fits alone on its interactions before the ``which`` target (never the target, nor a later item)."""
    from simulations.bench_personal import personalised_scores

    split, model = trained_like
    settings = PersonalSettings(steps=10)
    users, global_scores, personal = personalised_scores(model, split, which, settings, users_per_batch=2)
    text = model.item_text[: model.num_items]
    for k, u in enumerate(users):
        held = split.history_rows(int(u), which)
        later = [split.target_row(int(u), w) for w in ("validation", "test") if w == which or w == "test"]
        assert not set(later) & set(held.tolist())
        alone = personal_rows(split, held, 3, settings.rows)
        offset = fit_offsets(model, alone, np.zeros(len(alone), dtype=np.int64), 1, settings)[0]
        assert offset.abs().max() > 1e-3
        assert np.allclose(personal[k], global_scores[k] + (offset @ text.T).numpy(), atol=1e-5), k


def test_the_harness_leaves_items_the_model_never_trained_on_out_of_each_fit(trained_like):
    """With items held out of training (the cold-start benchmark), no fit targets one (they have no logit:
    the loss would be infinite), and each user still gets the offset it fits alone on the other rows."""
    from simulations.bench_personal import personalised_scores

    split, model = trained_like
    known = np.ones(model.num_items, dtype=bool)
    known[::3] = False
    model.set_known(torch.from_numpy(known))
    settings = PersonalSettings(steps=10)
    users, global_scores, personal = personalised_scores(model, split, "test", settings, users_per_batch=4)
    assert np.isfinite(personal).all()
    text = model.item_text[: model.num_items]
    for k, u in enumerate(users):
        alone = personal_rows(split, split.history_rows(int(u), "test"), 3, settings.rows, known=known)
        assert known[alone.targets].all()
        offset = fit_offsets(model, alone, np.zeros(len(alone), dtype=np.int64), 1, settings)[0]
        assert np.allclose(personal[k], global_scores[k] + (offset @ text.T).numpy(), atol=1e-5), k


def test_targets_rated_below_the_floor_are_left_out_of_the_fit_and_unrated_ones_kept(trained_like):
    split, _ = trained_like
    data = split.data
    user_rows = split.history_rows(0, "test")
    every = personal_rows(split, user_rows, 3, cap=50)
    liked = personal_rows(split, user_rows, 3, cap=50, min_target_rating=4)
    ratings = data.rating[user_rows[1:]]
    assert (ratings < 4).any() and (ratings >= 4).any()  # the fixture user has both kinds
    assert list(liked.targets) == [int(data.item[r]) for r in user_rows[1:] if data.rating[r] >= 4]
    assert len(every) == len(user_rows) - 1
    import copy

    unrated = copy.deepcopy(split)  # the fixture's split is shared (cached): change a copy
    unrated.data.rating[user_rows[-1]] = np.nan
    assert np.isnan(unrated.data.rating[user_rows[-1]]) and not np.isnan(data.rating[user_rows[-1]])
    assert personal_rows(unrated, user_rows, 3, cap=50, min_target_rating=4).targets[-1] == data.item[user_rows[-1]]


def test_no_module_that_builds_a_reply_reads_the_personal_part():
    """Only the on-device ranking (client/recommend.py and its command) names the personal part, at any
    level of the code (a function-local import included); importing the ClientApp loads neither it nor
    the recommender that uses it."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    readers = set()
    for path in sorted(p for folder in ("client", "common", "server") for p in (root / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n.startswith(("common.personalisation", "client.recommend")) for n in names):
                readers.add(path.relative_to(root).as_posix())
    assert readers == {"client/recommend.py", "client/cli.py"}
    code = ("import sys, client.app, client.session, client.evaluation, client.secure_session; "
            "print(sorted(m for m in sys.modules if m in ('common.personalisation', 'client.recommend')))")
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(root), env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
