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
