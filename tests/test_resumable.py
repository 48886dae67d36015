"""The shared crash-safe writers (``traces.tables``): resumable tables, atomic files, folder locks."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from traces.tables import (LOCK_NAME, FolderLock, ResumableTable, TableError, ensure_dir, write_atomic,
                           write_json_atomic)

COLUMNS = ["key", "value"]


def _check(row):
    if row["value"]:
        float(row["value"])


def _table(path):
    return ResumableTable(path, COLUMNS, check_row=_check, owner="a test").open()


def test_a_new_table_gets_its_header_and_rows_are_appended_on_their_own_lines(tmp_path):
    path = tmp_path / "sub" / "t.csv"
    t = _table(path)
    assert path.read_text() == "key,value\n" and t.rows == [] and t.notes == []
    t.append({"key": "a", "value": 1.5})
    t.append(["b", None])                                       # None is an empty cell
    t.close()
    assert path.read_text() == "key,value\na,1.5\nb,\n"
    assert _table(path).rows == [{"key": "a", "value": "1.5"}, {"key": "b", "value": ""}]


@pytest.mark.parametrize("tail, why", [
    ("c,3", "no newline"),                                      # killed mid-row
    ("c\n", "1 fields, expected 2"),                            # wrong number of fields
    ("c,3x\n", "could not convert"),                            # a field that does not parse
    ('"c,3\n', "not valid CSV"),                                # an unterminated quote
])
def test_a_torn_last_row_is_dropped_with_a_note_before_appending(tmp_path, tail, why):
    path = tmp_path / "t.csv"
    path.write_text("key,value\na,1\nb,2\n" + tail)
    t = _table(path)
    assert [r["key"] for r in t.rows] == ["a", "b"]
    assert len(t.notes) == 1 and "line 4: dropped a torn last row" in t.notes[0] and why in t.notes[0]
    t.append(["d", 4])
    t.close()
    assert path.read_text() == "key,value\na,1\nb,2\nd,4\n"      # never appended to the partial line


def test_invalid_utf8_in_the_last_row_is_a_torn_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"key,value\na,1\nb,\xff\n")
    t = _table(path)
    assert [r["key"] for r in t.rows] == ["a"] and "not valid UTF-8" in t.notes[0]


@pytest.mark.parametrize("text, message", [
    ("key,value\na,oops\nb,2\n", r"t\.csv: line 2: damaged row \(could not convert"),
    ("key,value\na\nb,2\n", r"t\.csv: line 2: damaged row \(1 fields, expected 2\)"),
    ("key,value\na,1\nb\nc,3", r"t\.csv: line 3: damaged row"),  # a bad row AND a newline-less tail
])
def test_a_damaged_row_before_the_last_is_an_error_naming_its_line(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TableError, match=message) as info:
        _table(path)
    assert "\n" not in str(info.value)
    assert path.read_text() == text                             # nothing repaired, nothing lost


@pytest.mark.parametrize("text, detail", [
    ("key,other\na,1\n", "column 2 is 'other', expected 'value'"),
    ("key\na\n", "1 columns, expected 2 (no 'value')"),
    ("key,value,more\n", "extra 'more'"),
    ("something else entirely", "first line 'something else entirely' is not a header"),
])
def test_a_foreign_table_is_refused_naming_the_file_and_column(tmp_path, text, detail):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TableError, match="foreign table: written by a test") as info:
        _table(path)
    assert str(info.value).startswith(str(path)) and detail in str(info.value)


def test_a_header_cut_short_is_rewritten(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("key,va")
    t = _table(path)
    assert path.read_text() == "key,value\n" and "header cut short" in t.notes[0]


def test_rewrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    t = _table(path)
    t.append_many([["b", 2], ["a", 1]])
    before = path.read_bytes()

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(TableError, match="t.csv: cannot write: No space left on device"):
        t.rewrite(sorted(t.rows, key=lambda r: r["key"]))
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    t.rewrite(sorted(t.rows, key=lambda r: r["key"]))
    assert path.read_text() == "key,value\na,1\nb,2\n"


def test_write_atomic_and_json(tmp_path):
    path = write_json_atomic(tmp_path / "m.json", {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_ensure_dir_errors_are_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(TableError, match="f/sub: cannot create the output folder: Not a directory"):
        ensure_dir(tmp_path / "f" / "sub")
    with pytest.raises(TableError, match="a file of that name exists"):
        ensure_dir(tmp_path / "f")
    assert ensure_dir(tmp_path / "a" / "b").is_dir()


HOLD = ("import sys, time; from traces.tables import FolderLock; "
        "lock = FolderLock(sys.argv[1], 'sweep').acquire(); print('held', flush=True); time.sleep(60)")


def test_folder_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TableError, match=rf"servesim sweep \(pid {holder.pid}\) is writing to this folder"):
            FolderLock(tmp_path, "sweep").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = FolderLock(tmp_path, "profile").acquire()             # the kernel dropped the dead holder's lock
    assert len(lock.notes) == 1 and f"pid {holder.pid}, no longer running" in lock.notes[0]
    assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()} profile\n"
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""              # a clean exit leaves no pid behind
    with FolderLock(tmp_path, "profile") as again:
        assert again.notes == []
