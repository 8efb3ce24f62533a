"""Load MovieLens-100K from the GroupLens ``ml-100k/`` folder or RecBole atomic files.

Both formats load to the identical :class:`~common.dataset.Dataset`: interactions
in file order, items with title (year suffix removed), release year and genres.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from common.dataset import RATING_MAX, RATING_MIN, Dataset, Item, sort_ids
from common.errors import DataFormatError

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# A trailing "(1995)" and, for direct-to-video titles, "(1995) (V)".
_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)(\s*\(V\))?\s*$")
# RecBole 1.2.1 spells the placeholder of item 267 "unkonwn"; GroupLens says "unknown".
_RECBOLE_MISSING = {"unkonwn", "unknown", ""}
_INT = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")


def recbole_ml100k_dir() -> Path:
    """Folder of the MovieLens-100K atomic files inside the installed recbole wheel.

    The wheel is used as a data source only; its Python modules are never imported.
    """
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataFormatError(
            "recbole", "package not installed; run `pip install --no-deps recbole==1.2.1`"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not folder.is_dir():
        raise DataFormatError(folder, "expected the ml-100k atomic files of recbole==1.2.1 here")
    return folder


def _read_lines(path: Path, encoding: str) -> list[str]:
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for no, line in enumerate(lines, start=1):
        try:
            out.append(line.decode(encoding).rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise DataFormatError(path, f"not valid {encoding} text ({exc.reason})", no) from None
    return out


def _check_not_utf8(path: Path) -> None:
    """Refuse a latin-1 file that is really UTF-8 with non-ASCII text (it would load as mojibake).

    Latin-1 accents are single bytes (0xE9 for "e acute") that are almost never valid UTF-8, so
    a file that decodes as UTF-8 and holds multi-byte sequences was almost surely saved as UTF-8.
    """
    raw = path.read_bytes()
    if raw.isascii():
        return
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    no = next(k for k, line in enumerate(raw.split(b"\n"), start=1) if not line.isascii())
    raise DataFormatError(
        path, "looks UTF-8 encoded (valid UTF-8 with non-ASCII characters), but GroupLens "
              f"{path.name} is latin-1; convert it, e.g. `iconv -f utf-8 -t latin-1`", no
    )


def _int(path: Path, no: int, value: str, field: str) -> int:
    # int() also takes " 3 ", "1_000" and non-ASCII digits such as "\u0663"; ids must be plain ASCII.
    if not _INT.fullmatch(value):
        raise DataFormatError(
            path, f"field {field!r} must be an integer (ASCII digits, optional leading '-'), got {value!r}", no
        )
    return int(value)


def _float(path: Path, no: int, value: str, field: str) -> float:
    """A finite decimal number (``nan``, ``inf`` and non-ASCII digits are refused)."""
    number = float(value) if _NUMBER.fullmatch(value) else math.nan
    if not math.isfinite(number):
        raise DataFormatError(path, f"field {field!r} must be a finite number, got {value!r}", no)
    return number


def _rating(path: Path, no: int, value: str) -> float:
    rating = _float(path, no, value, "rating")
    if not RATING_MIN <= rating <= RATING_MAX:
        raise DataFormatError(
            path, f"field 'rating' must be within {RATING_MIN:g}..{RATING_MAX:g}, got {value!r}", no
        )
    return rating


def _build(
    items: dict[str, Item], rows: list[tuple[str, str, float, float]], inter_path: Path,
    user_ids: list[str] | None, first_line: int, user_file: str,
) -> Dataset:
    """Index users and items; ``first_line`` is the file line of ``rows[0]`` (for errors)."""
    if not rows:
        raise DataFormatError(inter_path, "no interactions")
    if user_ids is not None:
        known = set(user_ids)
        for no, (u, *_rest) in enumerate(rows, start=first_line):
            if u not in known:
                raise DataFormatError(inter_path, f"unknown user id {u} (not in {user_file})", no)
    ordered = [items[i] for i in sort_ids(list(items))]
    index = {it.item_id: k for k, it in enumerate(ordered)}
    users = sort_ids(user_ids if user_ids is not None else [r[0] for r in rows])
    uindex = {u: k for k, u in enumerate(users)}
    n = len(rows)
    user = np.empty(n, dtype=np.int64)
    item = np.empty(n, dtype=np.int64)
    rating = np.empty(n, dtype=np.float64)
    ts = np.empty(n, dtype=np.float64)
    for k, (u, i, r, t) in enumerate(rows):
        user[k], item[k], rating[k], ts[k] = uindex[u], index[i], r, t
    return Dataset(items=ordered, user_ids=users, user=user, item=item, rating=rating, timestamp=ts)


def load_grouplens(folder: str | Path, allow_empty: bool = False) -> Dataset:
    """Load the GroupLens ``ml-100k/`` folder (``u.data``, ``u.item``, optional ``u.user``); an empty
    ``u.data`` is an error unless ``allow_empty`` (a device that holds no events yet: its catalogue only)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(folder, "expected a GroupLens ml-100k folder holding u.data and u.item")
    items: dict[str, Item] = {}
    item_path = folder / "u.item"
    lines = _read_lines(item_path, "latin-1")
    _check_not_utf8(item_path)
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataFormatError(item_path, "empty line; expected `id|title|date|video date|url|19 genre flags`", no)
        parts = line.split("|")
        if len(parts) != 5 + len(GENRES):
            raise DataFormatError(
                item_path, f"expected {5 + len(GENRES)} '|'-separated fields, got {len(parts)}", no
            )
        item_id = str(_int(item_path, no, parts[0], "movie id"))
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise DataFormatError(item_path, "genre flags must be 0 or 1", no)
        title = parts[1].strip()
        m = _YEAR_SUFFIX.search(title)
        if m:
            title = title[: m.start()]
        date = parts[2].strip()
        year = _int(item_path, no, date[-4:], "release date") if date else None
        genres = tuple(g for g, f in zip(GENRES, flags) if f == "1")
        if item_id in items:
            raise DataFormatError(item_path, f"duplicate movie id {item_id}", no)
        items[item_id] = Item(item_id=item_id, title=title, year=year, genres=genres)

    user_ids = None
    user_path = folder / "u.user"
    if user_path.exists():
        user_ids = []
        for no, line in enumerate(_read_lines(user_path, "latin-1"), start=1):
            parts = line.split("|")
            if len(parts) != 5:
                raise DataFormatError(user_path, f"expected 5 '|'-separated fields, got {len(parts)}", no)
            user_ids.append(str(_int(user_path, no, parts[0], "user id")))

    data_path = folder / "u.data"
    rows = []
    for no, line in enumerate(_read_lines(data_path, "utf-8"), start=1):
        parts = line.split("\t")
        if len(parts) != 4:
            raise DataFormatError(
                data_path, f"expected 4 tab-separated fields `user item rating timestamp`, got {len(parts)}", no
            )
        u = str(_int(data_path, no, parts[0], "user id"))
        i = str(_int(data_path, no, parts[1], "item id"))
        if i not in items:
            raise DataFormatError(data_path, f"unknown item id {i} (not in {item_path.name})", no)
        rows.append((u, i, _rating(data_path, no, parts[2]), _float(data_path, no, parts[3], "timestamp")))
    if not rows and allow_empty:
        return Dataset.without_events([items[i] for i in sort_ids(list(items))])
    return _build(items, rows, data_path, user_ids, first_line=1, user_file="u.user")


def _header(path: Path, line: str, required: tuple[str, ...]) -> dict[str, int]:
    names = [h.split(":", 1)[0] for h in line.split("\t")]
    missing = [r for r in required if r not in names]
    if missing:
        raise DataFormatError(
            path, f"header lacks column(s) {missing}; expected `name:type` columns including {list(required)}", 1
        )
    return {n: k for k, n in enumerate(names)}


def load_recbole(folder: str | Path | None = None, name: str = "ml-100k") -> Dataset:
    """Load RecBole atomic files ``<name>.inter`` / ``.item`` / ``.user`` (default: the wheel's copy)."""
    folder = Path(folder) if folder is not None else recbole_ml100k_dir()
    item_path = folder / f"{name}.item"
    lines = _read_lines(item_path, "utf-8")
    if not lines:
        raise DataFormatError(item_path, "empty file; expected a header row")
    col = _header(item_path, lines[0], ("item_id", "movie_title", "release_year", "class"))
    items: dict[str, Item] = {}
    for no, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != len(col):
            raise DataFormatError(item_path, f"expected {len(col)} tab-separated fields, got {len(parts)}", no)
        item_id = str(_int(item_path, no, parts[col["item_id"]], "item_id"))
        title = parts[col["movie_title"]].strip()
        year_s = parts[col["release_year"]].strip()
        if title in _RECBOLE_MISSING:
            title = "unknown"
        m = _YEAR_SUFFIX.search(title)
        if year_s == "V" and m:
            # RecBole 1.2.1 mis-split item 1412's "(1995) (V)" title suffix into the year column.
            title, year_s = title[: m.start()], m.group(1)
        year = None if year_s in _RECBOLE_MISSING else _int(item_path, no, year_s, "release_year")
        genres = tuple(parts[col["class"]].split())
        bad = [g for g in genres if g not in GENRES]
        if bad:
            raise DataFormatError(item_path, f"unknown genre(s) {bad}; expected some of {list(GENRES)}", no)
        if item_id in items:
            raise DataFormatError(item_path, f"duplicate item_id {item_id}", no)
        items[item_id] = Item(item_id=item_id, title=title, year=year, genres=genres)

    user_ids = None
    user_path = folder / f"{name}.user"
    if user_path.exists():
        ulines = _read_lines(user_path, "utf-8")
        ucol = _header(user_path, ulines[0], ("user_id",)) if ulines else {}
        user_ids = []
        for no, ln in enumerate(ulines[1:], start=2):
            parts = ln.split("\t")
            if len(parts) != len(ucol):
                raise DataFormatError(user_path, f"expected {len(ucol)} tab-separated fields, got {len(parts)}", no)
            user_ids.append(str(_int(user_path, no, parts[ucol["user_id"]], "user_id")))

    inter_path = folder / f"{name}.inter"
    lines = _read_lines(inter_path, "utf-8")
    if not lines:
        raise DataFormatError(inter_path, "empty file; expected a header row")
    col = _header(inter_path, lines[0], ("user_id", "item_id", "rating", "timestamp"))
    rows = []
    for no, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != len(col):
            raise DataFormatError(inter_path, f"expected {len(col)} tab-separated fields, got {len(parts)}", no)
        u = str(_int(inter_path, no, parts[col["user_id"]], "user_id"))
        i = str(_int(inter_path, no, parts[col["item_id"]], "item_id"))
        if i not in items:
            raise DataFormatError(inter_path, f"unknown item id {i} (not in {item_path.name})", no)
        rows.append((u, i, _rating(inter_path, no, parts[col["rating"]]),
                     _float(inter_path, no, parts[col["timestamp"]], "timestamp")))
    return _build(items, rows, inter_path, user_ids, first_line=2, user_file=user_path.name)


def write_grouplens(data: Dataset, folder: str | Path) -> Path:
    """Write a Dataset in the GroupLens ``ml-100k/`` layout (used to export or to test the loader)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "u.item", "w", encoding="latin-1", newline="\n") as f:
        for it in data.items:
            title = it.title if it.year is None else f"{it.title} ({it.year})"
            date = "" if it.year is None else f"01-Jan-{it.year}"
            flags = "|".join("1" if g in it.genres else "0" for g in GENRES)
            f.write(f"{it.item_id}|{title}|{date}||http://example.invalid/|{flags}\n")
    with open(folder / "u.user", "w", encoding="latin-1", newline="\n") as f:
        for u in data.user_ids:
            f.write(f"{u}|30|M|other|00000\n")
    with open(folder / "u.data", "w", encoding="utf-8", newline="\n") as f:
        for u, i, r, t in zip(data.user, data.item, data.rating, data.timestamp):
            f.write(f"{data.user_ids[u]}\t{data.items[i].item_id}\t{int(r)}\t{int(t)}\n")
    return folder
