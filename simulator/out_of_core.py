"""A long run's request-level summary in memory that does not grow with its requests: the rows are read back a
block at a time (``Recorder.blocks``), latencies pooled in ``recorder.GapPool`` samples (exact percentiles, spilled
to a temporary file past a few MiB), and the arrival and completion times that the load report compares sorted
out of core (``SortedSpill``). ``metrics.summarize`` uses it for a recorder whose rows are in a file; the
definitions are ``metrics``'.
"""
from __future__ import annotations

import math
import tempfile

import numpy as np

from simulator.metrics import load_verdict, request_columns, request_samples
from simulator.recorder import GapPool

_SPILL_VALUES = 1 << 16     # latencies a pool holds in memory (1 MiB) before it spills them to its file


class SortedSpill:
    """A sample of float64 values, added in any order, read back sorted in blocks (an external merge sort): values
    are sorted ``run`` at a time and appended to an anonymous temporary file; ``blocks`` merges the runs, reading
    ``block`` values of each at a time. A sample of at most ``run`` values never touches the file."""

    def __init__(self, run: int = 1 << 16, block: int = 1 << 12):
        self.run, self.block = int(run), int(block)
        self._buf: list = []
        self._buffered = 0
        self._file = None
        self._runs: list = []             # (first value's index in the file, length)
        self._size = 0

    def __len__(self) -> int:
        return self._size + self._buffered

    def add(self, values) -> None:
        values = np.asarray(values, dtype=float)
        if not len(values):
            return
        self._buf.append(values)
        self._buffered += len(values)
        if self._buffered >= self.run:
            self._spill()

    def _spill(self) -> None:
        if not self._buffered:
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="servesim-sort-")
        data = np.sort(np.concatenate(self._buf))
        self._file.seek(8 * self._size)
        data.tofile(self._file)
        self._runs.append((self._size, len(data)))
        self._size += len(data)
        self._buf, self._buffered = [], 0

    def _read(self, at: int, count: int) -> np.ndarray:
        self._file.seek(8 * at)
        return np.fromfile(self._file, dtype=float, count=count)

    def blocks(self):
        """The values in ascending order, as consecutive arrays (each non-empty)."""
        if self._file is None:
            data = np.sort(np.concatenate(self._buf)) if self._buf else np.empty(0)
            for lo in range(0, len(data), self.run):
                yield data[lo:lo + self.run]
            return
        self._spill()
        self._file.flush()
        # one cursor a run: its next unread value, its end, and the values read but not yet merged
        cursors = [[start, start + n, np.empty(0)] for start, n in self._runs]
        while True:
            for c in cursors:
                if not len(c[2]) and c[0] < c[1]:
                    count = min(self.block, c[1] - c[0])
                    c[2] = self._read(c[0], count)
                    c[0] += count
            live = [c for c in cursors if len(c[2])]
            if not live:
                return
            # every value up to the smallest of the live buffers' last values is in the buffers: merge those
            cut = min(c[2][-1] for c in live)
            parts = []
            for c in live:
                k = int(np.searchsorted(c[2], cut, side="right"))
                parts.append(c[2][:k])
                c[2] = c[2][k:]
            yield np.sort(np.concatenate(parts))


def _pool_values(pool: GapPool, values: np.ndarray) -> None:
    values = values[~np.isnan(values)]
    if len(values):
        pairs = np.empty((len(values), 2))
        pairs[:, 0] = values
        pairs[:, 1] = 1.0
        pool.add_pairs(pairs)


def request_summary(recorder, *, disaggregated: bool = False) -> dict:
    """What ``metrics.summarize`` reports from the per-request rows, a block of rows at a time: the distributions
    of ``metrics.request_samples`` (seconds) and its counts summed, ``makespan_s`` and ``load``
    (``metrics.load_report``'s). Percentiles and maxima are exact (``GapPool``); a mean is that of the pooled
    sample (``GapPool.distribution``)."""
    pools: dict = {}
    arrivals, completions = SortedSpill(), SortedSpill()
    totals: dict = {}
    last_done, first_arrival, any_arrival = -math.inf, math.inf, False
    for lo, cols in recorder.blocks():
        t = request_columns(cols, disaggregated=disaggregated, fluidity=False, first_id=lo)
        samples, counts = request_samples(t, disaggregated)
        for name, values in samples.items():
            _pool_values(pools.setdefault(name, GapPool(spill_pairs=_SPILL_VALUES)), values)
        for name, count in counts.items():
            totals[name] = totals.get(name, 0) + count
        done = ~np.isnan(t["completion_s"])
        finish = t["completion_s"][done]
        if len(finish):
            last_done = max(last_done, float(finish.max()))
        seen = t["arrival_s"][~np.isnan(t["arrival_s"])]
        if len(seen):
            any_arrival = True
            first_arrival = min(first_arrival, float(seen.min()))
        arrivals.add(t["arrival_s"][done])
        completions.add(finish)
    makespan = last_done - first_arrival if totals.get("requests_completed") else 0.0
    return {**{k: pool.distribution() for k, pool in pools.items()}, **totals, "makespan_s": makespan,
            "load": load_report_sorted(arrivals, completions, makespan) if any_arrival else None}


def load_report_sorted(arrivals: SortedSpill, completions: SortedSpill, makespan: float) -> dict:
    """``metrics.load_report`` of the completed requests' arrival and completion times, each a ``SortedSpill``: the
    same numbers, from one merge of the two sorted streams (the requests in the system at each arrival) and the
    order statistics it compares."""
    n = len(arrivals)
    q = n // 4
    wanted = {0, n - 1, q, 3 * q} if n else set()
    at_a, at_d = {}, {}
    sums = [0, 0]                        # in the system over arrivals q..2q-1 and 3q..n-1
    ranges = ((q, 2 * q), (3 * q, n))
    blocks = completions.blocks()
    pending, counted, exhausted = np.empty(0), 0, False
    pos = 0
    for a in arrivals.blocks():
        while not exhausted and (not len(pending) or pending[-1] <= a[-1]):
            nxt = next(blocks, None)
            if nxt is None:
                exhausted = True
            else:
                pending = np.concatenate((pending, nxt))
        before = counted + np.searchsorted(pending, a, side="right")     # completions at or before each arrival
        in_system = np.arange(pos + 1, pos + len(a) + 1) - before
        for k, (lo, hi) in enumerate(ranges):
            lo, hi = max(lo, pos), min(hi, pos + len(a))
            if lo < hi:
                sums[k] += int(in_system[lo - pos:hi - pos].sum())
        for r in wanted:
            if pos <= r < pos + len(a):
                at_a[r] = float(a[r - pos])
        drop = int(np.searchsorted(pending, a[-1], side="right"))
        counted += drop
        pending = pending[drop:]
        pos += len(a)
    pos = 0
    for d in completions.blocks():
        for r in wanted:
            if pos <= r < pos + len(d):
                at_d[r] = float(d[r - pos])
        pos += len(d)
    span = at_a[n - 1] - at_a[0] if n > 1 else 0.0
    second = sums[0] / q if q else None
    last = sums[1] / (n - 3 * q) if q else None
    return load_verdict(n, span, makespan, second, last,
                        (at_a[q], at_a[3 * q], at_d[q], at_d[3 * q]) if q else None)
