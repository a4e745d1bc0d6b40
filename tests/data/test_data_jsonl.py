"""JSONL reading/writing and the shared-data locator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera.data.jsonl import append_jsonl, read_jsonl, read_jsonl_counted, write_jsonl_atomic
from tessera.data.paths import shared_data_dir
from tessera.errors import DataFormatError, InputError


def _write(path: Path, data: str | bytes) -> Path:
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def test_reads_rows_and_ignores_blank_lines(tmp_path):
    p = _write(tmp_path / "a.jsonl", '{"a": 1}\n\n  \n{"a": 2}\r\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_utf8_bom_is_accepted(tmp_path):
    p = _write(tmp_path / "bom.jsonl", "\ufeff" + '{"a": "é"}\n')
    assert read_jsonl(p) == [{"a": "é"}]


def test_malformed_row_names_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"a": 1}\n\n{"a": \n{"a": 3}\n')
    with pytest.raises(DataFormatError) as e:
        read_jsonl(p)
    assert f"{p}:3:" in str(e.value) and "skip" in str(e.value)
    assert e.value.line == 3 and "\n" not in str(e.value)


def test_non_object_row_is_malformed(tmp_path):
    p = _write(tmp_path / "list.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataFormatError, match=r"list\.jsonl:2: expected a JSON object"):
        read_jsonl(p)


def test_skip_bad_skips_and_counts(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"a": 1}\nnot json\n"str"\n{"a": 4}\n{"a": 5')
    rows, n_bad = read_jsonl_counted(p, skip_bad=True)
    assert rows == [{"a": 1}, {"a": 4}] and n_bad == 3
    assert read_jsonl(p, skip_bad=True) == rows


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found; check the path"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        read_jsonl(tmp_path)


def test_non_utf8_names_file_and_line(tmp_path):
    p = _write(tmp_path / "latin1.jsonl", b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(InputError) as e:
        read_jsonl(p, skip_bad=True)
    assert f"{p}:2:" in str(e.value) and "UTF-8" in str(e.value)


def test_write_atomic_round_trip_and_no_temp_left(tmp_path):
    p = tmp_path / "sub" / "out.jsonl"
    rows = [{"id": "1", "text": "héllo"}, {"id": "2", "x": [1, 2]}]
    write_jsonl_atomic(p, rows)
    assert read_jsonl(p) == rows
    write_jsonl_atomic(p, rows[:1])
    assert read_jsonl(p) == rows[:1]
    assert [f.name for f in p.parent.iterdir()] == ["out.jsonl"]


def test_write_atomic_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl_atomic(p, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(p, rows())
    assert read_jsonl(p) == [{"a": 1}]
    assert [f.name for f in tmp_path.iterdir()] == ["out.jsonl"]


def test_append_and_resume_after_torn_line(tmp_path):
    p = tmp_path / "log.jsonl"
    append_jsonl(p, {"id": 1})
    append_jsonl(p, {"id": 2})
    with p.open("a") as f:
        f.write('{"id": 3, "tor')  # a run killed mid-write
    append_jsonl(p, {"id": 4})
    rows, n_bad = read_jsonl_counted(p, skip_bad=True)
    assert [r["id"] for r in rows] == [1, 2, 4] and n_bad == 1
    assert json.loads(p.read_text().splitlines()[-1]) == {"id": 4}


def test_shared_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("TESSERA_SHARED_DATA", str(tmp_path / "missing"))
    assert shared_data_dir() is None


def test_shared_data_dir_default(monkeypatch):
    monkeypatch.delenv("TESSERA_SHARED_DATA", raising=False)
    d = shared_data_dir()
    assert d is None or d.is_dir()
