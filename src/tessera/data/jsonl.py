"""JSON Lines: strict reading with file:line errors, atomic writes, appends for resumable jobs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from tessera.errors import DataFormatError, InputError

UTF8_HINT = "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)"
# any \uD800-\uDFFF escape: the row's strings are then checked for a lone surrogate (valid pairs pass)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(row) -> bool:
    """True if a string in ``row`` holds a lone UTF-16 surrogate (JSON ``"\\ud800"``): not valid Unicode, unwritable as UTF-8."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``Path(path)`` if it is an existing file, else an :class:`InputError`."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} not found; check the path")
    if p.is_dir():
        raise InputError(f"{what} {p} is a folder; pass a file")
    return p


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """Whole file as text (UTF-8, BOM dropped, universal newlines); clear errors."""
    p = check_file(path, what)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(p, line, "not valid UTF-8", hint=UTF8_HINT) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl_numbered(path: str | os.PathLike, skip_bad: bool = False) -> tuple[list[tuple[int, dict]], int]:
    """``([(line_number, row), ...], n_skipped)``; line numbers are 1-based.

    Blank lines are ignored.  A line that is not a JSON object raises
    :class:`DataFormatError` (``path:line``) unless ``skip_bad``, in which case it is
    skipped and counted.  Bytes that are not UTF-8 always raise (fix the file).
    """
    p = check_file(path)
    rows: list[tuple[int, dict]] = []
    n_bad = 0
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataFormatError(p, lineno, "not valid UTF-8", hint=UTF8_HINT) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                what = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
                if what is None and _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(row):
                    what = "a \\u escape encodes a lone surrogate (not valid Unicode)"
            except json.JSONDecodeError as e:
                what = f"malformed JSON ({e.msg} at column {e.colno})"
            except ValueError as e:  # e.g. numbers too long to convert
                what = f"malformed JSON ({e})"
            except RecursionError:  # arrays/objects nested thousands deep
                what = "malformed JSON (nested too deeply)"
            if what is not None:
                if skip_bad:
                    n_bad += 1
                    continue
                raise DataFormatError(p, lineno, what)
            rows.append((lineno, row))
    return rows, n_bad


def read_jsonl_counted(path: str | os.PathLike, skip_bad: bool = False) -> tuple[list[dict], int]:
    """``(rows, n_skipped)``: like :func:`read_jsonl`, also saying how many rows were skipped."""
    rows, n_bad = read_jsonl_numbered(path, skip_bad)
    return [r for _, r in rows], n_bad


def read_jsonl(path: str | os.PathLike, skip_bad: bool = False) -> list[dict]:
    """Rows of a JSON Lines file (one JSON object per line; blank lines ignored).

    Missing file -> :class:`InputError`; malformed row -> :class:`DataFormatError`
    naming ``path:line`` unless ``skip_bad`` (see :func:`read_jsonl_counted` for the count).
    """
    return read_jsonl_counted(path, skip_bad)[0]


def _dumps(row) -> str:
    return json.dumps(row, ensure_ascii=False)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows to a temporary file in the same folder, then rename it over ``path``.

    Readers never see a half-written file; on error the old file is left untouched.
    """
    from tessera.config import atomic_file

    p = Path(path)
    with atomic_file(p) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(_dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return p


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one row (for jobs that resume by id).

    If a previous run died mid-line, a newline is written first so the new row stays
    on a line of its own (the torn line is then skipped by ``read_jsonl(skip_bad=True)``).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = _dumps(row) + "\n"
    with p.open("ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
