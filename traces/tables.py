"""Crash-safe output files shared by every long-running servesim command (``sweep``, ``profile``, ``validate``).

It lives in ``traces`` because that package imports nothing else of servesim, so ``profiler`` and ``simulator``
can both import it without an import cycle. Only the standard library is used.

- ``write_atomic(path, data)`` / ``write_json_atomic(path, obj)``: write ``.NAME.tmp`` beside the file, flush,
  ``fsync``, ``os.replace`` it over ``NAME`` and ``fsync`` the folder, so a reader (or a run resumed after a
  kill) sees the old file or the new one, never half of one. The temporary name is fixed, so a run killed
  mid-write leaves at most one stale ``.NAME.tmp``, overwritten by the next write.
- ``ensure_dir(path)``: create an output folder and prove it is writable, or raise a one-line error.
- ``FolderLock(folder, command)``: one writer per output folder. ``fcntl.flock`` on ``FOLDER/.servesim.lock``,
  which holds ``"<pid> <command>"`` while the lock is held; the kernel drops a dead process's lock, so a lock file
  left by a killed run is simply taken over, with a note naming that run's pid.
- ``ResumableTable(path, columns, check_row=...)``: a CSV appended to row by row. ``open()`` creates the file with
  its header (atomically), refuses a *foreign table* (another header: the message names the file and the first
  differing column), and repairs a torn tail: the last row is dropped (with a note) when it has no newline, has
  the wrong number of fields, is not valid CSV or its fields do not parse (``check_row`` raises ValueError);
  a damaged row anywhere else is an error naming the file and its line. Nothing is ever appended to a
  partial line. ``append(row)`` / ``append_many(rows)`` write, flush and ``fsync``; ``rewrite(rows)``
  finalizes the table by an atomic rewrite (e.g. sorted).

Every error is ``error(message)`` for the ``error`` class the caller passes (default ``TableError``, a
``ValueError``), one line, naming the file (and the line of a bad row).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

LOCK_NAME = ".servesim.lock"


class TableError(ValueError):
    """An output file or folder that cannot be used (foreign, damaged, locked, unwritable)."""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# --- atomic files ----------------------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, *, error: type[ValueError] = TableError) -> Path:
    """Write ``data`` (text is UTF-8, newlines kept as given) to ``path`` through ``.NAME.tmp`` and a rename.

    Raises ``error`` naming the file when it cannot be written (the temporary file is removed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, bytes):
            f = open(tmp, "wb")
        else:
            f = open(tmp, "w", encoding="utf-8", newline="")
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise error(f"{path}: cannot write: {_reason(exc)}") from None
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | Path, obj, *, error: type[ValueError] = TableError, **dumps) -> Path:
    """``write_atomic(path, json.dumps(obj, indent=2, **dumps) + "\\n")``."""
    dumps.setdefault("indent", 2)
    return write_atomic(path, json.dumps(obj, **dumps) + "\n", error=error)


def ensure_dir(path: str | Path, *, error: type[ValueError] = TableError, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) and check that a file can be created in it.

    Raises ``error`` with one line naming the folder: a file in the way, no permission, read-only file system."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise error(f"{path}: cannot use as the {what}: a file of that name exists") from None
    except OSError as exc:
        raise error(f"{path}: cannot create the {what}: {_reason(exc)}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".servesim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise error(f"{path}: {what} is not writable: {_reason(exc)}") from None
    return path


# --- one writer per folder -------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class FolderLock:
    """An exclusive lock on an output folder for ``command`` (e.g. ``"sweep"``); see the module docstring.

    ``acquire()`` raises ``error`` when another live process holds it, naming its pid and command; ``notes``
    then says whether a lock file of a dead run was taken over. Use as a context manager. Without ``fcntl``
    (Windows) it does nothing.
    """

    def __init__(self, folder: str | Path, command: str, *, error: type[ValueError] = TableError):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.error = error
        self.notes: list[str] = []
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:                                  # pragma: no cover - not POSIX
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise self.error(f"{self.path}: cannot create the lock file: {_reason(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(fd)
            os.close(fd)
            who = f"servesim {holder[1]} (pid {holder[0]})" if holder else "another process"
            raise self.error(f"{self.folder}: {who} is writing to this folder (lock {self.path}); wait for it to "
                             f"finish or use another --out") from None
        old = self._holder(fd)
        if old and old[0] != os.getpid():
            state = "no longer running" if not _pid_alive(old[0]) else "no longer holding it"
            self.notes.append(f"{self.path}: took over the lock left by servesim {old[1]} (pid {old[0]}, {state})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.command}\n".encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> tuple[int, str] | None:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").split()
            return int(text[0]), " ".join(text[1:]) or "?"
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        """Empty the lock file (a clean exit leaves no pid behind) and unlock. The file itself stays: removing
        it would let a process that opened it just before take a lock nobody else sees."""
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- the resumable table ---------------------------------------------------------------------------------------

def _cell(value) -> str:
    return "" if value is None else str(value)


def _csv_text(rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _column_diff(found: list[str], expected: list[str]) -> str:
    for i, (a, b) in enumerate(zip(found, expected)):
        if a != b:
            return f"column {i + 1} is {a!r}, expected {b!r}"
    if len(found) < len(expected):
        return f"{len(found)} columns, expected {len(expected)} (no {expected[len(found)]!r})"
    return f"{len(found)} columns, expected {len(expected)} (extra {found[len(expected)]!r})"


class ResumableTable:
    """A CSV table with a fixed header that a long run appends to and a later run resumes (module docstring).

    Args:
        path: the CSV file. columns: its header.
        check_row: called with each complete row as ``{column: text}``; raises ValueError (message: what is
            wrong, e.g. ``"time_median_s: not a number: 'x'"``) for a row whose fields do not parse.
        error: the exception class raised (one-line message naming the file).
        owner: who writes such tables, for the foreign-table message (e.g. ``"a different sweep"``).

    After ``open()``: ``rows`` (the complete data rows, ``{column: text}``, file order) and ``notes`` (what was
    repaired). ``append``/``append_many`` take mappings (missing keys and None are empty cells) or sequences
    in column order.
    """

    def __init__(self, path: str | Path, columns: Sequence[str], *, check_row=None,
                 error: type[ValueError] = TableError, owner: str = "another program"):
        self.path = Path(path)
        self.columns = [str(c) for c in columns]
        self.check_row = check_row
        self.error = error
        self.owner = owner
        self.rows: list[dict[str, str]] = []
        self.notes: list[str] = []
        self._fh = None
        self._writer = None

    # reading and repairing
    def open(self) -> "ResumableTable":
        path = self.path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise self.error(f"{path}: cannot read: {_reason(exc)}") from None
        if not data:
            self._create()
            return self
        keep, torn = data, None
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            keep, torn = data[:cut], data[cut:]
            if not keep:                                   # not even the header is complete
                head = torn.decode("utf-8", "replace").rstrip("\r")
                if self._header().rstrip("\n").startswith(head):
                    self.notes.append(f"{path}: rewrote a header cut short by an interrupted run")
                    self._create()
                    return self
                raise self._foreign(f"first line {head[:60]!r} is not a header of this table")
        text = keep.decode("utf-8", "replace")             # a U+FFFD marks bytes that are not UTF-8
        records, bad = self._records(text)
        total_lines = text.count("\n")
        if not records or records[0][2] != self.columns:
            found = records[0][2] if records else []
            raise self._foreign(_column_diff(found, self.columns))
        data_records = [r for r in records[1:] if r[2]]    # blank lines are no rows
        problems = [(start, end, p) for start, end, fields in data_records if (p := self._problem(fields))]
        if bad is not None:
            problems.append(bad)
        if torn is not None:
            # a newline-less tail is what a kill mid-write leaves; anything else wrong as well is damage
            if problems:
                raise self._damaged(*problems[0][::2])
            self._truncate(len(keep))
            self.notes.append(f"{path}: line {total_lines + 1}: dropped a torn last row (no newline at the end) "
                              f"left by an interrupted run")
        elif problems:
            start, end, problem = problems[0]
            last = start == data_records[-1][0] if data_records and bad is None else end >= total_lines
            if len(problems) > 1 or not last:
                raise self._damaged(start, problem)
            offsets = [0] + [m.end() for m in re.finditer(b"\n", keep)]
            self._truncate(offsets[start - 1])
            self.notes.append(f"{path}: line {start}: dropped a torn last row ({problem}) left by an interrupted "
                              f"run")
            data_records = [r for r in data_records if r[0] != start]
        self.rows = [dict(zip(self.columns, fields)) for _, _, fields in data_records]
        return self

    def _records(self, text: str):
        """``([(first line, last line, fields)], bad)``: bad is ``(line, line, problem)`` of unparsable CSV."""
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        records, prev = [], 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return records, None
            except csv.Error as exc:
                return records, (prev + 1, reader.line_num, f"not valid CSV ({exc})")
            records.append((prev + 1, reader.line_num, fields))
            prev = reader.line_num

    def _problem(self, fields: list[str]) -> str | None:
        if len(fields) != len(self.columns):
            return f"{len(fields)} fields, expected {len(self.columns)}"
        if any("\ufffd" in f for f in fields):
            return "not valid UTF-8"
        if self.check_row is not None:
            try:
                self.check_row(dict(zip(self.columns, fields)))
            except (ValueError, TypeError, KeyError) as exc:
                return " ".join(str(exc).split()) or type(exc).__name__
        return None

    def _truncate(self, size: int) -> None:
        try:
            with open(self.path, "r+b") as f:
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise self.error(f"{self.path}: cannot repair: {_reason(exc)}") from None

    def _foreign(self, detail: str) -> ValueError:
        return self.error(f"{self.path}: foreign table: written by {self.owner} ({detail}); use another --out or "
                          f"remove it")

    def _damaged(self, line: int, problem: str) -> ValueError:
        return self.error(f"{self.path}: line {line}: damaged row ({problem}), not a torn last row; fix or delete "
                          f"that line, or use another --out")

    def _header(self) -> str:
        return _csv_text([self.columns])

    def _create(self) -> None:
        ensure_dir(self.path.parent, error=self.error)
        write_atomic(self.path, self._header(), error=self.error)
        self.rows = []

    # writing
    def _values(self, row) -> list[str]:
        if isinstance(row, Mapping):
            return [_cell(row.get(c)) for c in self.columns]
        values = [_cell(v) for v in row]
        if len(values) != len(self.columns):
            raise ValueError(f"{self.path}: a row of {len(values)} values for {len(self.columns)} columns")
        return values

    def append_many(self, rows: Iterable) -> None:
        """Append rows, then flush and ``fsync`` once."""
        values = [self._values(r) for r in rows]
        if not values:
            return
        try:
            if self._fh is None:
                self._fh = open(self.path, "a", encoding="utf-8", newline="")
                self._writer = csv.writer(self._fh, lineterminator="\n")
            self._writer.writerows(values)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise self.error(f"{self.path}: cannot append: {_reason(exc)}") from None
        self.rows.extend(dict(zip(self.columns, v)) for v in values)

    def append(self, row) -> None:
        """Append one row, flush and ``fsync`` it."""
        self.append_many([row])

    def rewrite(self, rows: Iterable) -> None:
        """Replace the table atomically by the header and ``rows`` (e.g. the final, sorted table)."""
        self.close()
        values = [self._values(r) for r in rows]
        write_atomic(self.path, self._header() + _csv_text(values), error=self.error)
        self.rows = [dict(zip(self.columns, v)) for v in values]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = self._writer = None

    def __enter__(self) -> "ResumableTable":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["LOCK_NAME", "FolderLock", "ResumableTable", "TableError", "ensure_dir", "write_atomic",
           "write_json_atomic"]
