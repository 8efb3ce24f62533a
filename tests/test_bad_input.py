"""Every bad-input case gives one clear error naming the file, the line and what was expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.errors import DataFormatError
from common.jsonl_format import load_jsonl
from common.movielens import load_grouplens, load_recbole, recbole_ml100k_dir


def _grouplens(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    flags = "|".join(["0"] * 18 + ["1"])
    (folder / "u.item").write_text(
        f"1|Toy Story (1995)|01-Jan-1995||http://x/|{flags}\n2|Heat (1995)|01-Jan-1995||http://x/|{flags}\n",
        encoding="latin-1")
    (folder / "u.data").write_text("1\t1\t5\t100\n1\t2\t3\t101\n2\t1\t4\t102\n", encoding="utf-8")
    return folder


def _expect(path_part: str, line: int | None, words: str):
    def check(exc: DataFormatError) -> None:
        assert path_part in exc.path
        assert exc.line == line
        assert words in str(exc)
        where = f"{exc.path}:{line}" if line is not None else exc.path
        assert str(exc).startswith(where)
    return check


def test_grouplens_good_file_loads(tmp_path):
    data = load_grouplens(_grouplens(tmp_path))
    assert data.num_interactions == 3 and data.items[1].title == "Heat"


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataFormatError, match="GroupLens ml-100k folder"):
        load_grouplens(tmp_path / "nope")
    folder = _grouplens(tmp_path)
    (folder / "u.data").unlink()
    with pytest.raises(DataFormatError) as info:
        load_grouplens(folder)
    _expect("u.data", None, "file not found")(info.value)


def test_wrong_column_count(tmp_path):
    folder = _grouplens(tmp_path)
    (folder / "u.data").write_text("1\t1\t5\t100\n1\t2\t3\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_grouplens(folder)
    _expect("u.data", 2, "expected 4 tab-separated fields")(info.value)


def test_unparsable_value(tmp_path):
    folder = _grouplens(tmp_path)
    (folder / "u.data").write_text("1\t1\t5\t100\n1\t2\tfive\t101\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_grouplens(folder)
    _expect("u.data", 2, "'rating' must be a finite number")(info.value)


def test_unknown_item_id(tmp_path):
    folder = _grouplens(tmp_path)
    (folder / "u.data").write_text("1\t1\t5\t100\n2\t1\t4\t102\n1\t99\t3\t101\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_grouplens(folder)
    _expect("u.data", 3, "unknown item id 99")(info.value)


def test_wrong_encoding(tmp_path):
    folder = _grouplens(tmp_path)
    (folder / "u.data").write_bytes(b"1\t1\t5\t100\n1\t2\t3\t10\xff1\n")
    with pytest.raises(DataFormatError) as info:
        load_grouplens(folder)
    _expect("u.data", 2, "not valid utf-8")(info.value)


def test_grouplens_item_flags(tmp_path):
    folder = _grouplens(tmp_path)
    (folder / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||http://x/|0|1\n", encoding="latin-1")
    with pytest.raises(DataFormatError) as info:
        load_grouplens(folder)
    _expect("u.item", 1, "expected 24 '|'-separated fields")(info.value)


def _recbole_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "atomic"
    folder.mkdir()
    for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        shutil.copy(recbole_ml100k_dir() / name, folder / name)
    return folder


def test_recbole_wrong_header(tmp_path):
    folder = _recbole_copy(tmp_path)
    lines = (folder / "ml-100k.inter").read_text(encoding="utf-8").splitlines()
    lines[0] = "user_id:token\titem:token\trating:float\ttimestamp:float"
    (folder / "ml-100k.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_recbole(folder)
    _expect("ml-100k.inter", 1, "header lacks column(s) ['item_id']")(info.value)


def test_recbole_unknown_item_and_bad_line(tmp_path):
    folder = _recbole_copy(tmp_path)
    path = folder / "ml-100k.inter"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[10] = "196\t5000\t3\t881250949"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_recbole(folder)
    _expect("ml-100k.inter", 11, "unknown item id 5000")(info.value)
    lines[10] = "196\t242\t3"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_recbole(folder)
    _expect("ml-100k.inter", 11, "expected 4 tab-separated fields")(info.value)


def test_recbole_wrong_encoding(tmp_path):
    folder = _recbole_copy(tmp_path)
    path = folder / "ml-100k.item"
    raw = path.read_bytes().split(b"\n")
    raw[4] = raw[4] + b"\xe9"  # a latin-1 byte in a UTF-8 file
    path.write_bytes(b"\n".join(raw))
    with pytest.raises(DataFormatError) as info:
        load_recbole(folder)
    _expect("ml-100k.item", 5, "not valid utf-8")(info.value)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_good(tmp_path):
    cat = _jsonl(tmp_path / "cat.jsonl", [{"item": "a", "text": "A book"}, {"item": "b", "text": "B book"}])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"user": "u1", "item": "a", "timestamp": 1, "rating": 5},
                                        {"user": "u1", "item": "b", "timestamp": 2, "text": "great"}])
    data = load_jsonl(ev, cat)
    assert data.num_interactions == 2 and data.event_text == [None, "great"]


@pytest.mark.parametrize("row, line_words", [
    ('{"user": "u1", "item": "a", "timestamp": 1', "unparsable JSON"),
    ({"user": "u1", "item": "zzz", "timestamp": 1}, "unknown item id 'zzz'"),
    ({"user": "u1", "item": "a"}, "missing field 'timestamp'"),
    ({"user": "u1", "item": "a", "timestamp": "yesterday"}, "field 'timestamp' must be a finite number"),
    ({"user": "u1", "item": "a", "timestamp": 1, "rating": "good"}, "field 'rating' must be a finite number"),
    ([1, 2, 3], "expected a JSON object"),
])
def test_jsonl_bad_event(tmp_path, row, line_words):
    cat = _jsonl(tmp_path / "cat.jsonl", [{"item": "a", "text": "A book"}])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"user": "u1", "item": "a", "timestamp": 0}, row])
    with pytest.raises(DataFormatError) as info:
        load_jsonl(ev, cat)
    _expect("ev.jsonl", 2, line_words)(info.value)


def test_jsonl_bad_catalogue_and_encoding(tmp_path):
    cat = _jsonl(tmp_path / "cat.jsonl", [{"item": "a", "text": "A"}, {"item": "a", "text": "again"}])
    ev = _jsonl(tmp_path / "ev.jsonl", [{"user": "u1", "item": "a", "timestamp": 0}])
    with pytest.raises(DataFormatError) as info:
        load_jsonl(ev, cat)
    _expect("cat.jsonl", 2, "duplicate item id 'a'")(info.value)
    cat = _jsonl(tmp_path / "cat.jsonl", [{"item": "a", "text": "A"}])
    ev.write_bytes(b'{"user": "u1", "item": "a", "timestamp": 0, "text": "\xff"}\n')
    with pytest.raises(DataFormatError) as info:
        load_jsonl(ev, cat)
    _expect("ev.jsonl", 1, "not valid UTF-8")(info.value)
    with pytest.raises(DataFormatError) as info:
        load_jsonl(tmp_path / "missing.jsonl", cat)
    _expect("missing.jsonl", None, "file not found")(info.value)


def test_unknown_user_id(tmp_path):
    folder = _grouplens(tmp_path)
    (folder / "u.user").write_text("1|24|M|technician|85711\n", encoding="latin-1")
    with pytest.raises(DataFormatError) as info:
        load_grouplens(folder)
    _expect("u.data", 3, "unknown user id 2 (not in u.user)")(info.value)
