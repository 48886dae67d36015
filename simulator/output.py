"""Writing result tables: CSV or Parquet through pyarrow (fast, no pandas needed), atomically, or in chunks.

Tables are given as ``{column: numpy array}`` (float columns with NaN for unknown values become empty cells/nulls;
``nullable`` integer columns likewise). CSV is written without quotes, one header line, floats in the shortest form
that reads back to the same double. Every file goes through a temporary name in the same folder and a rename, so an
interrupted run never leaves a half-written table under the final name.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

FORMATS = ("csv", "parquet")
_STRUCT_CODES = {np.dtype(np.float64): "d", np.dtype(np.int64): "q"}


def unboxed(values, dtype=np.float64) -> np.ndarray:
    """``np.array(values, dtype)`` of a sequence of Python numbers (float64 or int64), read-only. The numbers are
    unboxed by ``struct.pack``, three times faster than numpy's conversion of a list (which first inspects every
    item for its type), to the same values: a float64 of an int is the same rounding. Raises ``struct.error`` for a
    float given as an int64."""
    dtype = np.dtype(dtype)
    return np.frombuffer(struct.pack(f"{len(values)}{_STRUCT_CODES[dtype]}", *values), dtype=dtype)


def _arrow_table(columns: dict, nullable_ints=()):
    import pyarrow as pa

    arrays = {}
    for name, values in columns.items():
        a = np.asarray(values)
        if a.dtype.kind == "f":
            mask = np.isnan(a)
            if name in nullable_ints:
                arrays[name] = _from_numpy(pa, np.where(mask, 0, a).astype(np.int64), pa.int64(), ~mask)
            else:
                arrays[name] = _from_numpy(pa, a.astype(np.float64, copy=False), pa.float64(),
                                           ~mask if mask.any() else None)
        elif a.dtype.kind == "b":
            arrays[name] = pa.Array.from_buffers(pa.bool_(), len(a), [None, pa.py_buffer(_bitmap(a))])
        elif a.dtype.kind in "iu":
            arrays[name] = _from_numpy(pa, a.astype(np.int64), pa.int64())
        else:
            arrays[name] = pa.array(a.tolist())       # let pyarrow infer the type (it may import pandas)
    return pa.table(arrays)


def _from_numpy(pa, values: np.ndarray, arrow_type, valid: np.ndarray | None = None):
    """An Arrow array over the 1-D numpy ``values`` (already of ``arrow_type``'s width), null where ``valid`` is
    False. Built from the buffers because ``pa.array`` on a numpy array imports pandas (to ask whether the
    values are a pandas Categorical), which costs about half a second; the array is the same."""
    values = np.ascontiguousarray(values)
    validity, nulls = None, 0
    if valid is not None:
        validity, nulls = pa.py_buffer(_bitmap(valid)), len(valid) - int(np.count_nonzero(valid))
    return pa.Array.from_buffers(arrow_type, len(values), [validity, pa.py_buffer(values)], null_count=nulls)


def _bitmap(flags: np.ndarray) -> np.ndarray:
    """Arrow's bit-packed form of a boolean array (least significant bit first)."""
    return np.packbits(flags.astype(bool, copy=False), bitorder="little")


def _write(table, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        import pyarrow.csv as pc

        pc.write_csv(table, path, pc.WriteOptions(quoting_style="none", quoting_header="none"))


def table_path(out_dir, stem: str, fmt: str = "csv") -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"format: unknown {fmt!r}; known: {', '.join(FORMATS)}")
    return Path(out_dir) / f"{stem}.{fmt}"


def write_table(columns: dict, path, fmt: str = "csv", nullable_ints=()) -> Path:
    """Write ``columns`` to ``path`` (CSV or Parquet) through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    _write(_arrow_table(columns, nullable_ints), tmp, fmt)
    os.replace(tmp, path)
    return path


class ChunkWriter:
    """Append tables to one CSV or Parquet file chunk by chunk (bounded memory), renamed into place on ``close``.

    ``write(columns)`` appends; the schema is the first chunk's. ``close()`` finishes the file (an empty table
    with ``columns`` names if nothing was written). The file is encoded and written by one background thread, in
    the order the chunks came (pyarrow's writers release the GIL, so a long run's rows are formatted on another
    core while it simulates: 0.8 s per million iteration rows here); at most ``MAX_PENDING`` chunks wait for it,
    and an error it meets (a full disk) is raised by the next ``write`` or by ``close``.
    """

    MAX_PENDING = 2

    def __init__(self, path, fmt: str = "csv", nullable_ints=()):
        self.path = Path(path)
        self.fmt = fmt
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.nullable_ints = nullable_ints
        self._writer = None
        self._thread = None
        self._pending: list = []
        self.rows = 0

    def _append(self, table) -> None:
        if self._writer is None:
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                self._writer = pq.ParquetWriter(self.tmp, table.schema)
            else:
                import pyarrow.csv as pc

                self._writer = pc.CSVWriter(self.tmp, table.schema,
                                            write_options=pc.WriteOptions(quoting_style="none",
                                                                          quoting_header="none"))
        self._writer.write_table(table)

    def write(self, columns: dict) -> None:
        from concurrent.futures import ThreadPoolExecutor

        table = _arrow_table(columns, self.nullable_ints)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="servesim-writer")
        while len(self._pending) >= self.MAX_PENDING:
            self._pending.pop(0).result()
        self._pending.append(self._thread.submit(self._append, table))
        self.rows += table.num_rows

    def _drain(self) -> None:
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None

    def close(self, empty_columns: dict | None = None) -> Path:
        self._drain()
        if self._writer is None:
            write_table(empty_columns or {}, self.tmp, self.fmt, self.nullable_ints)
        else:
            self._writer.close()
        os.replace(self.tmp, self.path)
        return self.path


def text_table(rows, *, left=(0,), rule: bool = True) -> str:
    """Rows of cells as aligned text: columns ``left`` (indices; -1 is the last) left-justified, the others
    right-justified, two spaces apart, trailing blanks cut; with ``rule``, a line of dashes under the header.
    The one printer of servesim's console tables (run summaries, specs, validation errors)."""
    rows = [[str(c) for c in r] for r in rows]
    n = len(rows[0])
    lefts = {i % n for i in left}
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    lines = ["  ".join(c.ljust(w) if i in lefts else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    if rule:
        lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)

