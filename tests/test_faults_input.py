"""Hostile input: non-finite or out-of-range values, odd ids, wrong encodings, degenerate data,
NaN scores, huge texts and concurrent feedback all fail loudly or work, never silently."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.dataset import Dataset, Item, sort_ids
from common.errors import DataFormatError
from common.jsonl_format import load_jsonl
from common.metrics import NonFiniteScoresError, target_rank
from common.movielens import load_grouplens, load_recbole, recbole_ml100k_dir
from common.split import NoEvaluationUsersError, leave_one_out

pytestmark = [pytest.mark.faults]

FLAGS = "|".join(["0"] * 18 + ["1"])


def _grouplens(tmp_path: Path, data_line: str = "1\t2\t3\t101") -> Path:
    """Two items, two users; ``data_line`` is line 2 of u.data."""
    folder = tmp_path / "ml-100k"
    folder.mkdir(exist_ok=True)
    (folder / "u.item").write_text(
        f"1|Toy Story (1995)|01-Jan-1995||http://x/|{FLAGS}\n2|Heat (1995)|01-Jan-1995||http://x/|{FLAGS}\n",
        encoding="latin-1")
    (folder / "u.data").write_text(f"1\t1\t5\t100\n{data_line}\n2\t1\t4\t102\n", encoding="utf-8")
    return folder


def _refused(call, path_part: str, line: int, words: str) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        call()
    exc = info.value
    assert path_part in exc.path and exc.line == line and words in str(exc), str(exc)
    assert str(exc).startswith(f"{exc.path}:{line}: ")
    return exc


# 1. ratings and timestamps


@pytest.mark.parametrize("data_line, words", [
    ("1\t2\t3\tnan", "'timestamp' must be a finite number"),
    ("1\t2\t3\tinf", "'timestamp' must be a finite number"),
    ("1\t2\t3\t-Infinity", "'timestamp' must be a finite number"),
    ("1\t2\t3\t1e999", "'timestamp' must be a finite number"),
    ("1\t2\tnan\t101", "'rating' must be a finite number"),
    ("1\t2\tinf\t101", "'rating' must be a finite number"),
    ("1\t2\t0\t101", "'rating' must be within 1..5"),
    ("1\t2\t6\t101", "'rating' must be within 1..5"),
    ("1\t2\t-3\t101", "'rating' must be within 1..5"),
    ("1\t2\t5.5\t101", "'rating' must be within 1..5"),
])
def test_grouplens_refuses_non_finite_and_out_of_range_values(tmp_path, data_line, words):
    folder = _grouplens(tmp_path, data_line)
    _refused(lambda: load_grouplens(folder), "u.data", 2, words)


def test_grouplens_accepts_the_ends_of_the_rating_scale(tmp_path):
    data = load_grouplens(_grouplens(tmp_path, "1\t2\t1\t101"))
    assert data.rating.tolist() == [5.0, 1.0, 4.0]


def _recbole_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "atomic"
    folder.mkdir()
    for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        shutil.copy(recbole_ml100k_dir() / name, folder / name)
    return folder


@pytest.mark.parametrize("line, words", [
    ("196\t242\tnan\t881250949", "'rating' must be a finite number"),
    ("196\t242\t9\t881250949", "'rating' must be within 1..5"),
    ("196\t242\t3\tinf", "'timestamp' must be a finite number"),
    ("196\t242\t3\tnan", "'timestamp' must be a finite number"),
    ("\u0663\t242\t3\t881250949", "'user_id' must be an integer"),
])
def test_recbole_refuses_bad_values(tmp_path, line, words):
    folder = _recbole_copy(tmp_path)
    path = folder / "ml-100k.inter"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[10] = line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _refused(lambda: load_recbole(folder), "ml-100k.inter", 11, words)


def test_recbole_user_file_with_a_short_line_is_refused(tmp_path):
    folder = _recbole_copy(tmp_path)
    path = folder / "ml-100k.user"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3].split("\t")[0]  # the id alone, the other columns missing
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _refused(lambda: load_recbole(folder), "ml-100k.user", 4, "tab-separated fields")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row, words", [
    ({"user": "u", "item": "a", "timestamp": 1, "rating": 0}, "'rating' must be within 1..5"),
    ({"user": "u", "item": "a", "timestamp": 1, "rating": 6}, "'rating' must be within 1..5"),
    ({"user": "u", "item": "a", "timestamp": 1, "rating": -2.5}, "'rating' must be within 1..5"),
    ('{"user": "u", "item": "a", "timestamp": 1, "rating": NaN}', "'rating' must be a finite number"),
    ('{"user": "u", "item": "a", "timestamp": 1, "rating": 1e999}', "'rating' must be a finite number"),
    ('{"user": "u", "item": "a", "timestamp": 1' + "0" * 400 + "}", "'timestamp' must be a finite number"),
    ('{"user": "u", "item": "a", "timestamp": 1' + "0" * 5000 + "}", "unparsable JSON"),
    ('{"user": "u", "item": "a", "timestamp": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "unparsable JSON"),
])
def test_jsonl_refuses_bad_ratings_and_numbers(tmp_path, row, words):
    cat = _jsonl(tmp_path / "cat.jsonl", [{"item": "a", "text": "A book"}])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"user": "u", "item": "a", "timestamp": 0}, row])
    _refused(lambda: load_jsonl(ev, cat), "ev.jsonl", 2, words)


def test_jsonl_ratings_within_the_scale_or_absent_load(tmp_path):
    cat = _jsonl(tmp_path / "cat.jsonl", [{"item": "a", "text": "A book"}])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"user": "u", "item": "a", "timestamp": 0, "rating": 1},
                                        {"user": "u", "item": "a", "timestamp": 1, "rating": 5.0},
                                        {"user": "u", "item": "a", "timestamp": 2, "rating": None},
                                        {"user": "u", "item": "a", "timestamp": 3}])
    rating = load_jsonl(ev, cat).rating
    assert rating[:2].tolist() == [1.0, 5.0] and np.isnan(rating[2:]).all()


# 2. u.item encoding


def test_utf8_u_item_is_refused_as_likely_mojibake(tmp_path):
    folder = _grouplens(tmp_path)
    (folder / "u.item").write_text(
        f"1|Toy Story (1995)|01-Jan-1995||http://x/|{FLAGS}\n2|Amélie (2001)|01-Jan-2001||http://x/|{FLAGS}\n",
        encoding="utf-8")
    exc = _refused(lambda: load_grouplens(folder), "u.item", 2, "looks UTF-8 encoded")
    assert "latin-1" in str(exc) and "iconv -f utf-8 -t latin-1" in str(exc)


def test_latin1_u_item_with_accents_loads(tmp_path):
    folder = _grouplens(tmp_path)
    (folder / "u.item").write_text(
        f"1|Misérables, Les (1995)|01-Jan-1995||http://x/|{FLAGS}\n2|Á köldum klaka (1994)|01-Jan-1994||"
        f"http://x/|{FLAGS}\n", encoding="latin-1")
    assert [it.title for it in load_grouplens(folder).items] == ["Misérables, Les", "Á köldum klaka"]


# 3. ids


@pytest.mark.parametrize("bad", ["\u0663", " 3", "3 ", "1_000", "--1", "+1", "²", "1.0", ""])
def test_grouplens_ids_must_be_ascii_integers(tmp_path, bad):
    folder = _grouplens(tmp_path, f"{bad}\t2\t3\t101")
    _refused(lambda: load_grouplens(folder), "u.data", 2, "'user id' must be an integer (ASCII digits")
    if bad == "\u0663":  # not latin-1: u.item cannot hold it
        return
    folder = _grouplens(tmp_path)
    (folder / "u.item").write_text(f"{bad}|Heat (1995)|01-Jan-1995||http://x/|{FLAGS}\n", encoding="latin-1")
    _refused(lambda: load_grouplens(folder), "u.item", 1, "'movie id' must be an integer")


def test_sort_ids_orders_odd_ids_without_crashing():
    assert sort_ids(["10", "-2", "3"]) == ["-2", "3", "10"]
    assert sort_ids(["--1", "2", "10"]) == ["--1", "10", "2"]  # not all integers: lexicographic
    assert sort_ids(["²", "1"]) == ["1", "²"]
    assert sort_ids(["\u0663", "1"]) == ["1", "\u0663"]
    assert sort_ids(["007", "7", "1"]) == ["1", "007", "7"]


def test_jsonl_string_ids_that_look_numeric_load(tmp_path):
    cat = _jsonl(tmp_path / "cat.jsonl", [{"item": "²", "text": "A"}, {"item": "--1", "text": "B"}])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"user": "--1", "item": "²", "timestamp": 0},
                                        {"user": "²", "item": "--1", "timestamp": 1}])
    data = load_jsonl(ev, cat)
    assert data.user_ids == ["--1", "²"] and [it.item_id for it in data.items] == ["--1", "²"]


# 4. too few events to evaluate anyone


def _dataset(events_per_user: list[int], num_items: int = 6) -> Dataset:
    user = np.repeat(np.arange(len(events_per_user)), events_per_user)
    n = len(user)
    return Dataset(items=[Item(item_id=str(i + 1), title=f"movie {i + 1}") for i in range(num_items)],
                   user_ids=[str(u + 1) for u in range(len(events_per_user))], user=user.astype(np.int64),
                   item=(np.arange(n) % num_items).astype(np.int64), rating=np.full(n, 4.0),
                   timestamp=np.arange(n, dtype=np.float64))


def test_no_user_with_three_events_is_a_clear_error_before_evaluation():
    from common.evaluation import eval_texts

    split = leave_one_out(_dataset([2, 1, 2]))  # building the split itself is fine (devices use it)
    assert split.all_rows(0).tolist() == [0, 1]
    with pytest.raises(NoEvaluationUsersError) as info:
        split.eval_users()
    assert "3 events" in str(info.value) and "all 3 users" in str(info.value)
    with pytest.raises(NoEvaluationUsersError):
        eval_texts(split, "test", history_len=3)


def test_one_user_with_three_events_is_evaluated():
    assert leave_one_out(_dataset([2, 3, 1])).eval_users().tolist() == [1]


# 5. non-finite scores


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_refused(bad):
    scores = np.array([0.1, 0.9, bad, 0.7])
    with pytest.raises(NonFiniteScoresError, match="1 of 4 scores are not finite"):
        target_rank(scores, 0, np.zeros(4, dtype=bool))
    with pytest.raises(ValueError):
        target_rank(np.full(4, np.nan), 0, np.zeros(4, dtype=bool))


def test_finite_scores_keep_the_protocol_rank():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.2])
    assert target_rank(scores, 2, np.zeros(5, dtype=bool)) == 2  # 0.9, and the tie with smaller index 0
    assert target_rank(scores, 2, np.array([True, False, False, False, False])) == 1


def test_rank_targets_refuses_a_matrix_with_any_nan():
    from common.evaluation import evaluate_scores, rank_targets

    split = leave_one_out(_dataset([4, 4], num_items=6))
    users = split.eval_users()
    scores = np.tile(np.arange(6, dtype=np.float64), (2, 1))
    assert rank_targets(scores, split, "test", users).tolist() == [2, 2]
    scores[1, 5] = np.nan
    with pytest.raises(NonFiniteScoresError, match="1 of 12 scores"):
        rank_targets(scores, split, "test", users)
    with pytest.raises(NonFiniteScoresError):
        evaluate_scores(np.full((2, 6), np.nan), split, "validation", users)


# 6. huge texts


class _Spy:
    """Wraps a tokenizer and remembers the longest string it was given."""

    def __init__(self, tokenizer, limit: int) -> None:
        self.tokenizer, self.limit, self.longest = tokenizer, limit, 0

    def __call__(self, texts, **kw):
        self.longest = max([self.longest] + [len(t) for t in texts])
        assert self.longest <= self.limit, f"tokenizer called with a {self.longest}-character text"
        return self.tokenizer(texts, **kw)


def test_normal_texts_tokenize_as_before(tokenizer):
    from common.features import tokenize

    texts = ["Toy Story (1995). Animation, Children's, Comedy", "Heat", "word " * 40, "Amélie " * 3000]
    ids, mask, truncated = tokenize(tokenizer, texts, 32)
    full = [tokenizer(t, add_special_tokens=True, truncation=False)["input_ids"] for t in texts]
    before = tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    assert ids.tolist() == before["input_ids"].tolist() and mask.tolist() == before["attention_mask"].tolist()
    assert truncated == sum(len(f) > 32 for f in full) == 2


def test_a_huge_text_is_cut_before_tokenizing_and_counted_as_truncated(tokenizer):
    from common.features import char_budget, tokenize

    huge = "a long story " * 1_600_000  # about 20 MB
    spy = _Spy(tokenizer, char_budget(32))
    ids, mask, truncated = tokenize(spy, ["Heat", huge], 32)
    assert spy.longest == char_budget(32) and truncated == 1
    assert int(mask[1].sum()) == 32
    expected = tokenizer("a long story " * 20, truncation=True, max_length=32)["input_ids"]
    assert ids[1].tolist() == expected
    # Over the budget in characters but few tokens (blank padding) still counts as cut.
    _, _, truncated = tokenize(spy, ["Heat" + " " * char_budget(32)], 32)
    assert truncated == 1


# 7. concurrent feedback


def _device(tmp_path: Path, items: int) -> Path:
    from client.device_state import write_device_info

    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "catalogue.jsonl", [{"item": str(i), "text": f"item {i}"} for i in range(items)])
    # no trailing newline: the first feedback must complete the last line
    (data / "events.jsonl").write_text("\n".join(json.dumps({"user": "u", "item": str(i), "timestamp": i})
                                                 for i in range(3)), encoding="utf-8")
    state = tmp_path / "state"
    write_device_info(state, str(data), "c")
    return state


def _record_five(state: str, first: int, barrier) -> None:
    from client.feedback import record_feedback

    barrier.wait(120)
    for k in range(5):
        record_feedback(state, str(first + k), 4.0)


def test_concurrent_feedback_loses_no_event(tmp_path):
    state = _device(tmp_path, items=30)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_record_five, args=(str(state), 10 + 5 * p, barrier)) for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    data = load_jsonl(tmp_path / "data" / "events.jsonl", tmp_path / "data" / "catalogue.jsonl")
    recorded = sorted(int(data.items[i].item_id) for i in data.item[3:])
    assert data.num_interactions == 23 and recorded == list(range(10, 30))
    assert np.all(data.rating[3:] == 4.0) and np.all(np.diff(data.timestamp) >= 0)


def test_a_device_with_no_events_yet_records_its_first_feedback(tmp_path):
    """An empty events.jsonl is a device training accepts; its first rating must be recordable too (the user id
    comes from the device file: it never leaves the device)."""
    from client.feedback import record_feedback

    state = _device(tmp_path, items=30)
    (tmp_path / "data" / "events.jsonl").write_text("")
    event = record_feedback(state, "12", 5.0)
    assert event["item"] == "12" and event["rating"] == 5.0
    data = load_jsonl(tmp_path / "data" / "events.jsonl", tmp_path / "data" / "catalogue.jsonl")
    assert data.num_interactions == 1 and data.user_ids == [event["user"]]
    assert record_feedback(state, "13", 4.0)["user"] == event["user"]  # the same user from then on
