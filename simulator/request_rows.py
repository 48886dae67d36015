"""Per-request rows of a run, by request id, in memory or — for a long run — in a temporary file, so that what a
run holds does not grow with its requests.

A row is ``width`` float64 fields (``recorder.REQUEST_FIELDS``). ``put`` writes rows by id (a later row of an id
replaces the earlier one); ``read(lo, hi)`` returns the rows of ids ``lo..hi - 1`` as an ``(hi - lo, width)``
array, NaN for ids never written. Up to ``IN_MEMORY_ROWS`` requests the rows are one numpy array; beyond, an
anonymous temporary file (``tempfile.TemporaryFile``, deleted with the object) of ``8 x width`` bytes a request,
read back in blocks. Requests finish roughly in id order, so the rows go to the file through a few blocks of
``CACHE_ROWS`` consecutive ids held in memory (``CACHED_BLOCKS`` at most, the lowest written out first, with
``os.pwrite``; a read takes a cached block's rows from memory); a row of a block already written out goes to the
file at once (rows of consecutive ids in one call).
"""
from __future__ import annotations

import os
import struct
import tempfile
from itertools import chain

import numpy as np

#: requests whose rows are kept in memory (2 MiB of 15 fields); a longer run keeps them in a temporary file
IN_MEMORY_ROWS = 1 << 14
CACHE_ROWS = 1 << 12        # rows of a block held in memory before the file (480 KiB of 15 fields)
CACHED_BLOCKS = 8           # blocks held at most


class RequestRows:
    """Rows of ``n`` requests (ids ``0..n-1``) of ``width`` float64 fields each (see the module docstring).

    Args:
        n: requests.
        width: fields a row.
        in_memory: keep the rows in memory (default: when ``n <= IN_MEMORY_ROWS``).
    """

    def __init__(self, n: int, width: int, *, in_memory: bool | None = None):
        self.n, self.width = int(n), int(width)
        self.block = IN_MEMORY_ROWS      # rows ``blocks`` reads at once
        if in_memory is None:
            in_memory = self.n <= IN_MEMORY_ROWS
        self._table = np.full((self.n, self.width), np.nan) if in_memory else None
        self._written = None if in_memory else np.zeros(self.n, dtype=bool)
        self._file = None if in_memory else tempfile.TemporaryFile(prefix="servesim-requests-")
        self._cache: dict = {}           # block -> its (CACHE_ROWS, width) rows, NaN where not written
        self._flushed: set = set()       # blocks written out to the file (their later rows go there at once)

    @property
    def in_memory(self) -> bool:
        return self._table is not None

    def put(self, ids, rows) -> None:
        """Write ``rows`` (``(m, width)``, or a list of m rows) at the distinct request ``ids`` (m,)."""
        ids = np.asarray(ids, dtype=np.int64)
        if isinstance(rows, list):       # (Python numbers: unboxed by struct, 3x faster than numpy's conversion)
            rows = np.frombuffer(struct.pack(f"{len(ids) * self.width}d", *chain.from_iterable(rows)))
        rows = np.asarray(rows, dtype=float).reshape(len(ids), self.width)
        if self._table is not None:
            self._table[ids] = rows
            return
        if not len(ids):
            return
        self._written[ids] = True
        blocks = ids // CACHE_ROWS
        first, last = int(blocks.min()), int(blocks.max())
        if first == last:
            self._put_block(first, ids, rows)
            return
        order = np.argsort(blocks, kind="stable")              # (a later row of an id stays after an earlier one)
        ids, rows, blocks = ids[order], rows[order], blocks[order]
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(ids)]):
            self._put_block(int(blocks[lo]), ids[lo:hi], rows[lo:hi])

    def _put_block(self, block: int, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows of ids in ``block``: into its cached rows, or (written out already) into the file."""
        cached = self._cache.get(block)
        if cached is None:
            if block in self._flushed:
                self._write_rows(ids, rows)
                return
            cached = self._cache[block] = np.full((CACHE_ROWS, self.width), np.nan)
            cached[ids - block * CACHE_ROWS] = rows
            if len(self._cache) > CACHED_BLOCKS:    # (the lowest: perhaps this one)
                self._flush(min(self._cache))
            return
        cached[ids - block * CACHE_ROWS] = rows

    def _flush(self, block: int) -> None:
        """Write a cached block out to the file (its rows past the last id cut)."""
        lo = block * CACHE_ROWS
        self._write(lo, self._cache.pop(block)[:self.n - lo])
        self._flushed.add(block)

    def _write_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Write rows at ``ids`` to the file, one call per run of consecutive ids (a later row of an id last)."""
        order = np.argsort(ids, kind="stable")
        ids, rows = ids[order], rows[order]
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1          # runs of consecutive ids: one write each
        for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(ids)]):
            self._write(int(ids[lo]), rows[lo:hi])

    def _write(self, first: int, rows: np.ndarray) -> None:
        """Write ``rows`` at ids ``first, first + 1, ...`` of the file."""
        data, at = np.ascontiguousarray(rows).tobytes(), first * 8 * self.width
        while data:                                              # (a write may be partial)
            done = os.pwrite(self._file.fileno(), data, at)
            data, at = data[done:], at + done

    def read(self, lo: int, hi: int) -> np.ndarray:
        """The rows of ids ``lo..hi - 1``: a new ``(hi - lo, width)`` float64 array."""
        lo, hi = max(0, lo), min(self.n, hi)
        if self._table is not None:
            return self._table[lo:hi].copy()
        size = 8 * self.width
        data = os.pread(self._file.fileno(), (hi - lo) * size, lo * size)
        out = np.full((hi - lo, self.width), np.nan)
        got = len(data) // size                                  # (a file shorter than the last row written)
        if got:
            out[:got] = np.frombuffer(data[:got * size], dtype=float).reshape(got, self.width)
        out[~self._written[lo:hi]] = np.nan
        for block, cached in self._cache.items():                # (a cached block has nothing in the file)
            first, last = max(lo, block * CACHE_ROWS), min(hi, (block + 1) * CACHE_ROWS)
            if first < last:
                out[first - lo:last - lo] = cached[first - block * CACHE_ROWS:last - block * CACHE_ROWS]
        return out

    def blocks(self, size: int | None = None):
        """``(lo, rows)`` of consecutive ids, ``size`` requests at a time (default ``block``), in id order."""
        size = size or self.block
        for lo in range(0, self.n, size):
            yield lo, self.read(lo, lo + size)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
