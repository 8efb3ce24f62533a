"""Shared fixtures: the real MovieLens-100K from the recbole wheel, and a tiny encoder set-up."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ml100k():
    from common.movielens import load_recbole

    return load_recbole()


@pytest.fixture(scope="session")
def ml100k_split(ml100k):
    from common.split import leave_one_out

    return leave_one_out(ml100k)


@pytest.fixture(scope="session")
def tokenizer():
    from common.encoder import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def small_ml100k(ml100k, tmp_path_factory):
    """A GroupLens folder with the first 6 users of MovieLens-100K and the full catalogue."""
    import numpy as np

    from common.dataset import Dataset
    from common.movielens import write_grouplens

    keep = ml100k.user < 6
    sub = Dataset(items=ml100k.items, user_ids=ml100k.user_ids[:6], user=ml100k.user[keep],
                  item=ml100k.item[keep], rating=ml100k.rating[keep], timestamp=ml100k.timestamp[keep])
    assert np.unique(sub.user).size == 6
    return write_grouplens(sub, tmp_path_factory.mktemp("ml-small"))


@pytest.fixture(scope="session")
def tiny_grouplens(tmp_path_factory):
    """A made-up GroupLens folder for fast unit tests: 12 items, 6 users with 8 ratings each (no
    real data, so nothing about MovieLens is assumed; the catalogue encodes in well under a second)."""
    import numpy as np

    from common.movielens import GENRES

    folder = tmp_path_factory.mktemp("ml-tiny")
    titles = ["Toy Story", "Heat", "Fargo", "Alien", "Babe", "Jaws", "Casino", "Clueless", "Twister",
              "Species", "Crumb", "Kolya"]
    flags = ["|".join("1" if g == genre else "0" for g in GENRES) for genre in
             ("Comedy", "Action", "Crime", "Sci-Fi", "Children's", "Thriller")]
    (folder / "u.item").write_text("".join(f"{i + 1}|{t} (199{i % 10})|01-Jan-199{i % 10}||http://x/|"
                                           f"{flags[i % len(flags)]}\n" for i, t in enumerate(titles)),
                                   encoding="latin-1")
    rng = np.random.default_rng(0)
    rows = []
    for user in range(1, 7):
        for k, item in enumerate(rng.permutation(12)[:8]):
            rows.append(f"{user}\t{item + 1}\t{int(rng.integers(1, 6))}\t{880000000 + 1000 * user + k}\n")
    (folder / "u.data").write_text("".join(rows), encoding="utf-8")
    return folder


@pytest.fixture
def small_run_config(tiny_grouplens, tmp_path):
    """A fast federated run of the text model on the made-up 12-item catalogue: 6 clients, short texts,
    few examples (the sequence model's runs: ``tests/test_sequence_federated.py``)."""
    return {"dataset": str(tiny_grouplens), "user-model": "text", "num-server-rounds": 2, "clients-per-round": 3,
            "evaluate-clients": 2, "eval-every": 1, "examples-per-user": 4, "history-len": 3, "max-length": 32,
            "batch-size": 2, "noise-multiplier": 2.0, "max-update-norm": 1000.0, "output-dir": str(tmp_path / "runs"),
            "run-name": "t"}


@pytest.fixture(autouse=True)
def _restore_threads():
    """Client code pins torch to one thread (one simulated client per core); undo it between tests."""
    yield
    torch.set_num_threads(2)
