"""What a run measures, collected as it goes, in memory that does not grow with the tokens simulated.

``Recorder`` keeps, for a run of N requests (ids 0..N-1, as every trace has):

- one row per request (``REQUEST_FIELDS``), written when the request finishes (or at the end, for requests that
  were rejected or left unfinished) into ``request_rows.RequestRows`` — numpy in memory, or a temporary file for a
  long run, read back a block at a time (``blocks``) — so the request object, and its list of token times, can
  then be dropped (``keep_requests=False``);
- the pooled time-between-tokens samples as ``(gap, count)`` pairs: the replica counts, per micro-batch, how many of
  its emitting requests had their previous token at the same time, so every gap of every request is kept exactly
  (percentiles are the numpy ``linear`` percentiles of the expanded sample, ``weighted_percentile``) in a few bytes
  per micro-batch instead of 8 bytes per token, and past ``SPILL_PAIRS`` pairs in a temporary file (``GapPool``);
- Etalon's deadline accounting per request (``slo.deadline_misses``) from its token times when it finishes, done
  for many requests at once (``deadline_misses_batch``; the token times wait in a bounded buffer,
  ``_PENDING_TOKENS``), for a long run (``OFFLOAD_REQUESTS``) by a helper process on another core while the run
  goes on (``simulator.deadline_worker``: the same numbers, its rows written when its answer is taken).

Iteration rows stay in ``replica.IterationLog`` (columnar lists); with ``stream_to`` they are flushed to the output
table in chunks (``tables.TableWriter``), so they too stay bounded.
"""
from __future__ import annotations

import math
import struct
import tempfile
from array import array
from itertools import chain

import numpy as np

from simulator.request_rows import RequestRows

#: per-request columns (float64 unless in INT_FIELDS); NaN where unknown
REQUEST_FIELDS = ("arrival_s", "prompt_tokens", "output_tokens", "scheduled_s", "first_token_s", "completion_s",
                  "num_preemptions", "num_cached_tokens", "replica_id", "decode_replica_id", "kv_transfer_s",
                  "decode_scheduled_s", "ttft_deadline_s", "deadlines", "deadline_misses")
INT_FIELDS = ("prompt_tokens", "output_tokens", "num_preemptions", "num_cached_tokens", "deadlines", "deadline_misses")


_CHUNK = 1 << 20            # pairs per pass over a pooled sample (bounds the temporaries of its summary)


def _sorted_pairs(values, counts) -> tuple[np.ndarray, int]:
    """The sample as one complex array sorted by value (real part: the value, imaginary part: its count, exact
    below 2**53) with zero counts dropped, and the number of samples. One new array of 16 bytes a pair; the
    inputs are not modified."""
    values = np.asarray(values, dtype=float)
    pairs = np.empty(len(values), dtype=np.complex128)
    pairs.real = values
    pairs.imag = np.asarray(counts)
    return _sort_pairs(pairs)


def _sort_pairs(pairs: np.ndarray) -> tuple[np.ndarray, int]:
    """Sort complex ``(value, count)`` pairs in place by value (ties by count), zero counts dropped; return them
    and the number of samples."""
    if not (pairs.imag > 0).all():
        pairs = pairs[pairs.imag > 0]
    pairs.sort()                              # lexicographic: by value, ties by count
    n = sum(int(pairs.imag[i:i + _CHUNK].sum()) for i in range(0, len(pairs), _CHUNK))
    return pairs, n


def _values_at(pairs: np.ndarray, ranks) -> dict:
    """``{rank: value}``: the value of each 0-based ``rank`` of the expanded sorted sample, in one pass over
    ``pairs`` (``_sorted_pairs``) by chunks."""
    todo, out, before = sorted(set(ranks)), {}, 0
    for i in range(0, len(pairs), _CHUNK):
        chunk = pairs[i:i + _CHUNK]
        cum = np.cumsum(chunk.imag) + before          # exact: integers below 2**53
        while todo and todo[0] < cum[-1]:
            out[todo[0]] = float(chunk.real[np.searchsorted(cum, todo[0], side="right")])
            todo.pop(0)
        before = cum[-1]
    return out


def _ranks(n: int, percentile: float) -> tuple[int, int, np.float64]:
    """numpy's ``linear`` percentile of ``n`` samples: the two ranks it interpolates between and the weight."""
    q = np.true_divide(np.float64(percentile), 100)
    virtual = (n - 1) * q
    prev = int(np.floor(virtual))
    gamma = np.float64(virtual - prev)
    if prev >= n - 1:
        return n - 1, n - 1, np.float64(0.0)
    return prev, prev + 1, gamma


def _lerp(a: float, b: float, gamma: np.float64) -> float:
    """numpy's ``_lerp`` of the percentile between the values ``a`` and ``b``."""
    a, b = np.float64(a), np.float64(b)
    diff = np.subtract(b, a)
    if gamma >= 0.5:
        return float(np.subtract(b, diff * (1 - gamma)))
    return float(np.add(a, diff * gamma))


def weighted_percentile(values: np.ndarray, counts: np.ndarray, percentile: float) -> float:
    """``np.percentile(np.repeat(values, counts), percentile)`` without expanding: the same ``linear`` method, the
    same floating-point steps (virtual index ``(n - 1) * q``, numpy's ``_lerp``). Raises ValueError when empty."""
    pairs, n = _sorted_pairs(values, counts)
    if n == 0:
        raise ValueError("weighted_percentile: no samples")
    prev, nxt, gamma = _ranks(n, percentile)
    at = _values_at(pairs, (prev, nxt))
    return _lerp(at[prev], at[nxt], gamma)


def weighted_distribution(values: np.ndarray, counts: np.ndarray) -> dict:
    """``metrics.distribution`` of a weighted sample (mean, p50, p90, p99, max); all None when empty. Computed on
    the sample sorted by value, so the result depends only on the multiset (not on the order samples came in);
    the mean of more than 5 million samples is the count-weighted sum, added chunk by chunk."""
    return _pairs_distribution(*_sorted_pairs(values, counts))


def _pairs_distribution(pairs: np.ndarray, n: int) -> dict:
    """``weighted_distribution`` of a sample given as sorted ``(value, count)`` pairs (``_sorted_pairs``) of ``n``
    samples."""
    from simulator.metrics import PERCENTILES

    if n == 0:
        return {"mean": None, **{k: None for k in PERCENTILES}, "max": None}
    if n < 5_000_000:
        mean = float(np.repeat(pairs.real, pairs.imag.astype(np.int64)).mean())
    else:
        total = 0.0
        for i in range(0, len(pairs), _CHUNK):
            chunk = pairs[i:i + _CHUNK]
            total += float(np.dot(chunk.real, chunk.imag))
        mean = total / n
    ranks = {k: _ranks(n, q) for k, q in PERCENTILES.items()}
    at = _values_at(pairs, [r for prev, nxt, _ in ranks.values() for r in (prev, nxt)])
    out = {"mean": mean}
    out.update({k: _lerp(at[prev], at[nxt], gamma) for k, (prev, nxt, gamma) in ranks.items()})
    out["max"] = float(pairs.real[-1])
    return out


#: pairs a ``GapPool`` holds in memory (4 MiB); beyond them it appends them to a temporary file (16 bytes a pair)
SPILL_PAIRS = 1 << 18
_BUCKETS = 1 << 16          # value buckets of the out-of-core selection (``GapPool.distribution``)


class ExactSum:
    """The exact sum of float64 values added in arrays, read as the correctly rounded float (what ``math.fsum``
    returns for the same values, in any order), without a Python float per value: each value is ``M x 2**E`` with
    an integer mantissa ``|M| < 2**53`` (``np.frexp``); the mantissas are summed exactly per exponent in int64 (as
    26-bit halves, so 2**36 values cannot overflow) and the per-exponent sums combined as one Python integer.
    Values must be finite."""

    def __init__(self):
        self._int, self._exp = 0, 0       # the sum so far: _int x 2**_exp

    def add(self, values) -> None:
        v = np.asarray(values, dtype=float)
        if not len(v):
            return
        m, e = np.frexp(v)
        mant = (m * 2.0 ** 53).astype(np.int64)               # exact: m has 53 significant bits
        exp = e.astype(np.int64) - 53
        order = np.argsort(exp, kind="stable")
        exp, mant = exp[order], mant[order]
        starts = np.flatnonzero(np.r_[True, exp[1:] != exp[:-1]])
        hi = np.add.reduceat(mant >> 26, starts)              # (floor halves: mant = hi x 2**26 + lo)
        lo = np.add.reduceat(mant & ((1 << 26) - 1), starts)
        base = int(exp[0])
        total = 0
        for h, l_, x in zip(hi.tolist(), lo.tolist(), exp[starts].tolist()):
            total += ((h << 26) + l_) << (x - base)
        self._combine(total, base)

    def _combine(self, total: int, base: int) -> None:
        if self._int == 0:
            self._int, self._exp = total, base
        elif base >= self._exp:
            self._int += total << (base - self._exp)
        else:
            self._int = (self._int << (self._exp - base)) + total
            self._exp = base

    def value(self) -> float:
        """The correctly rounded sum (an int's conversion to float rounds to nearest even; the power of two then
        scales it exactly)."""
        if self._int == 0:
            return 0.0
        n, e = abs(self._int), self._exp
        extra = max(0, n.bit_length() - 60)                   # keep 60 bits, folding the rest into a sticky bit
        if extra:
            n = (n >> extra) | (1 if n & ((1 << extra) - 1) else 0)
            e += extra
        return math.copysign(math.ldexp(float(n), e), self._int)


def _order_keys(values: np.ndarray) -> np.ndarray:
    """int64 keys ordered as the float64 ``values`` are (IEEE bits, negative numbers' flipped; -0.0 below 0.0)."""
    k = np.ascontiguousarray(values).view(np.int64)
    return k ^ ((k >> 63) & np.int64(0x7FFF_FFFF_FFFF_FFFF))


class GapPool:
    """A pooled sample as ``(value, count)`` pairs (the time between tokens), appended during a run, in memory that
    does not grow with the run: beyond ``spill_pairs`` pairs they go to an anonymous temporary file
    (``tempfile.TemporaryFile``, deleted when the pool is), ``spill_pairs`` at a time.

    ``distribution()`` is exact either way — the numpy ``linear`` percentiles of the expanded sample and its
    maximum. A pool that never spilled is summarised in memory (``weighted_distribution``); a spilled one in three
    passes over the file, ``CHUNK`` pairs at a time (so its summary, like the pool, takes a few MiB): the count,
    extremes and mean; a histogram of the counts over ``_BUCKETS`` buckets of the values' order keys, which names the
    bucket of each rank; the pairs of those few buckets, sorted. The mean of a spilled pool is the correctly rounded
    sum of ``value x count`` over the pairs (``ExactSum``, as ``math.fsum`` gives it) over the count, so it does not
    depend on the order pairs came in either.
    """

    CHUNK = 1 << 16             # pairs read at once from the file (1 MiB; with its temporaries some 5 MiB)

    def __init__(self, spill_pairs: int = SPILL_PAIRS):
        self.spill_pairs = int(spill_pairs)
        self._mem = array("d")            # (value, count) side by side, 16 bytes a pair
        self._file = None
        self._spilled = 0                 # pairs in the file

    def _spill(self) -> None:
        """Append the pairs in memory to the file."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="servesim-tbt-")
        self._file.seek(16 * self._spilled)
        self._file.write(self._mem)      # (one write of the buffer; array.tofile copies it 64 KiB at a time)
        self._spilled += len(self._mem) // 2
        del self._mem[:]

    def _maybe_spill(self) -> None:
        if len(self._mem) >= 2 * self.spill_pairs:
            self._spill()

    def add(self, gaps: dict) -> None:
        """``{value: count}``."""
        self._mem.extend(chain.from_iterable(gaps.items()))
        self._maybe_spill()

    def add_arrays(self, values, counts) -> None:
        """Aligned sequences of values and counts."""
        self._mem.extend(chain.from_iterable(zip(values, counts)))
        self._maybe_spill()

    def add_pairs(self, pairs: np.ndarray) -> None:
        """An ``(m, 2)`` float64 array of ``(value, count)`` rows."""
        self._mem.frombytes(np.ascontiguousarray(pairs, dtype=float).tobytes())
        self._maybe_spill()

    def __len__(self) -> int:
        """Pairs pooled so far."""
        return self._spilled + len(self._mem) // 2

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def truncate(self, num_pairs: int) -> None:
        """Keep the first ``num_pairs`` pairs."""
        if num_pairs >= self._spilled:
            del self._mem[2 * (num_pairs - self._spilled):]
            return
        del self._mem[:]
        self._file.truncate(16 * num_pairs)
        self._spilled = num_pairs

    def _chunks(self):
        """The spilled pairs as complex128 arrays (value + 1j * count) of up to ``CHUNK`` each."""
        f = self._file
        f.flush()
        for lo in range(0, self._spilled, self.CHUNK):
            f.seek(16 * lo)
            yield np.fromfile(f, dtype=np.complex128, count=min(self.CHUNK, self._spilled - lo))

    def distribution(self) -> dict:
        """``metrics.distribution`` of the expanded sample (mean, p50, p90, p99, max; all None when empty). The
        pool is consumed: in memory it is sorted in place; a spilled one first takes the pairs still in memory."""
        from simulator.metrics import PERCENTILES

        if self._file is None:
            pairs = np.frombuffer(self._mem, dtype=np.complex128) if self._mem else np.empty(0, np.complex128)
            return _pairs_distribution(*_sort_pairs(pairs))
        if self._mem:                    # the rest, so that every pair is in the file
            self._spill()
        # pass 1: the number of samples, the extreme keys, the largest value and the sum of value x count
        n, kmin, kmax, top = 0, None, None, -math.inf

        def products():
            nonlocal n, kmin, kmax, top
            for c in self._chunks():
                c = c[c.imag > 0]
                if not len(c):
                    continue
                n += int(c.imag.sum())                # exact: integers below 2**53 a chunk
                k = _order_keys(c.real)
                lo, hi = int(k.min()), int(k.max())
                kmin = lo if kmin is None else min(kmin, lo)
                kmax = hi if kmax is None else max(kmax, hi)
                top = max(top, float(c.real.max()))
                yield c.real * c.imag

        exact = ExactSum()
        for p in products():
            exact.add(p)
        total = exact.value()                     # correctly rounded: the same for any order of the pairs
        if n == 0:
            return {"mean": None, **{k: None for k in PERCENTILES}, "max": None}
        ranks = {k: _ranks(n, q) for k, q in PERCENTILES.items()}
        wanted = sorted({r for prev, nxt, _ in ranks.values() for r in (prev, nxt)})
        # pass 2: samples per bucket of keys; each wanted rank's bucket and the samples below it
        shift = max(0, (kmax - kmin).bit_length() - _BUCKETS.bit_length() + 1)
        hist = np.zeros(_BUCKETS, dtype=float)
        for c in self._chunks():
            c = c[c.imag > 0]
            hist += np.bincount((_order_keys(c.real) - kmin) >> shift, weights=c.imag, minlength=_BUCKETS)
        cum = np.cumsum(hist)                          # exact: integers below 2**53
        buckets = {r: int(np.searchsorted(cum, r, side="right")) for r in wanted}
        # pass 3: the pairs of those buckets, sorted; the value at each rank
        chosen = np.array(sorted(set(buckets.values())), dtype=np.int64)
        parts = []
        for c in self._chunks():
            c = c[c.imag > 0]
            b = (_order_keys(c.real) - kmin) >> shift
            parts.append(c[np.isin(b, chosen)])
        picked = np.concatenate(parts)
        picked.sort()
        pb = (_order_keys(picked.real) - kmin) >> shift
        at = {}
        for r, b in buckets.items():
            inside = picked[pb == b]
            before = int(cum[b - 1]) if b else 0
            at[r] = float(inside.real[np.searchsorted(np.cumsum(inside.imag) + before, r, side="right")])
        out = {"mean": total / n}
        out.update({k: _lerp(at[prev], at[nxt], gamma) for k, (prev, nxt, gamma) in ranks.items()})
        out["max"] = top
        return out


# token times a Recorder holds for its batched deadline accounting before doing it (the batch's arrays, some 40
# bytes a token, then stay in the caches: a larger batch is slower per token)
_PENDING_TOKENS = 1 << 15
_OFFLOAD_TOKENS = 1 << 17   # (a batch for the helper process: fewer, larger messages; its memory is its own)
_STAGED_ROWS = 1024         # recorded rows waiting for their accounting (or, without it, to be written)
#: requests from which a run's deadline accounting goes to a helper process by default (``Recorder(offload=)``)
OFFLOAD_REQUESTS = 1 << 16
_TTFT_DEADLINE, _DEADLINES, _DEADLINE_MISSES = (REQUEST_FIELDS.index(f) for f in
                                                ("ttft_deadline_s", "deadlines", "deadline_misses"))


def deadline_misses_batch(ttft_s, ttft_deadline_s, times_s, lengths, decode_deadline_s: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Etalon's deadline accounting (``slo.deadline_misses``) of many requests from their token times, vectorized:
    a fixed number of numpy calls for the whole batch, each a pass over its T token times.

    With ``y_i = (t_i - t_0) - i x D`` and the slack ``s_0`` left by the first token, token ``i`` meets its
    deadline iff ``y_i <= R_i = max(s_0, y_1, ..., y_{i-1})`` (the slack carried forward is ``R_i - y_i``; a miss
    resets it, which raises the threshold to ``y_i``); a late token misses ``floor((y_i - R_i) / D + 1)``
    deadlines, ``floor((gap - slack) / D)`` in Etalon's terms. Same result as the loop up to floating-point ties.
    Source: Etalon (arXiv:2407.07000) §4.2, ``etalon/metrics/metric_utils.py:get_request_level_deadline_miss_rate``.

    Args:
        ttft_s, ttft_deadline_s: (m,) seconds, per request.
        times_s: (T,) the requests' token times (seconds), concatenated, ``lengths[j]`` >= 1 of request ``j``.
        lengths: (m,) token counts, summing to T.
        decode_deadline_s: Etalon's decode deadline D.
    Returns:
        ``missed``, ``total``: (m,) int64.

    The running maxima ``R_i`` of all requests come from one ``np.maximum.accumulate`` over (T,) complex keys
    ``first + 1j * z``: ``first`` the position of the request's first token, ``z`` its ``s_0`` there and ``y_i``
    at its later tokens. numpy orders complex numbers lexicographically (real part first), so a request's first
    key exceeds every key before it and the maximum restarts there; the imaginary part of the running maximum is
    the exact ``max(s_0, y_1, ..., y_i)`` (a maximum selects, it does not round), ``R_{i+1}``.
    """
    d = decode_deadline_s
    ttft = np.asarray(ttft_s, dtype=float)
    dl = np.asarray(ttft_deadline_s, dtype=float)
    n = np.asarray(lengths, dtype=np.int64)
    t = np.asarray(times_s, dtype=float)
    ok = ttft <= dl
    s0 = np.where(ok, dl - ttft, 0.0)
    missed = np.where(ok, 0, 1 + np.floor((ttft - dl) / d)).astype(np.int64)
    total = np.where(ok, 1, missed)
    start = np.zeros(len(n), dtype=np.int64)             # (m,) position of each request's first token
    np.cumsum(n[:-1], out=start[1:])
    key = np.empty(len(t), dtype=np.complex128)           # (T,) the keys first + 1j * z
    f = np.repeat(start.astype(float), n)                 # (T,) first: each token's request's start (exact)
    key.real = f
    i_d = np.subtract(np.arange(len(t), dtype=float), f, out=f)    # (T,) i, the token's index in its request,
    i_d *= d                                              # then i x D
    y = np.repeat(t[start], n)                            # (T,) y_i = (t_i - t_0) - i x D, in that order
    np.subtract(t, y, out=y)
    y -= i_d
    y[start] = s0                                         # z: s_0 at first tokens
    key.imag = y
    r = np.maximum.accumulate(key, out=key).imag          # r[p] = R of the token at p + 1 (same request)
    late = y[1:] > r[:-1]                                 # late[p - 1]: the token at p is late
    late[start[1:] - 1] = False                           # (first tokens: the TTFT, counted above)
    pos = np.flatnonzero(late) + 1                        # (L,) positions of the late tokens, ascending
    # per request: the sum of its late tokens' misses and their count, from cumulative sums at its bounds
    cum = np.zeros(len(pos) + 1)
    np.cumsum(np.floor((y[pos] - r[pos - 1]) / d + 1), out=cum[1:])    # exact: integers below 2**53
    bounds = np.searchsorted(pos, np.append(start, len(t)))
    m = np.diff(cum[bounds]).astype(np.int64)
    missed += m
    total += m + (n - 1 - np.diff(bounds))
    return missed, total


class Recorder:
    """Collects a run's per-request rows, pooled TBT samples and deadline accounting (see the module docstring).

    Args:
        num_requests: requests in the run (ids 0..N-1).
        ttft_deadline: callable prompt_tokens -> first-token deadline (s) for Etalon's accounting, or None to skip.
        decode_deadline_s: Etalon's decode deadline D_d.
        keep_requests: keep the finished request objects (with their token times) for the caller.
        on_finish: called with each list of finished requests (after they are recorded).
        in_memory: keep the rows in memory (default: up to ``request_rows.IN_MEMORY_ROWS`` requests; a longer run
            keeps them in a temporary file, and ``blocks`` reads them back a block at a time).
        offload: do the deadline accounting in a helper process (``simulator.deadline_worker``; the same numbers)
            while the run goes on (default: for runs of ``OFFLOAD_REQUESTS`` requests or more).
    """

    def __init__(self, num_requests: int, *, ttft_deadline=None, decode_deadline_s: float = 0.03,
                 keep_requests: bool = True, on_finish=None, in_memory: bool | None = None,
                 offload: bool | None = None):
        self.n = int(num_requests)
        # the rows, by id (``RequestRows``: in memory, or in a temporary file for a long run); a recorded row waits
        # in ``_stage`` (id -> list of REQUEST_FIELDS) until its deadline accounting is done
        self.rows = RequestRows(self.n, len(REQUEST_FIELDS), in_memory=in_memory)
        self._stage: dict = {}
        self._recorded = bytearray(self.n)   # (indexed per request: a bytearray's item is 5x cheaper than numpy's)
        self.recorded = np.frombuffer(self._recorded, dtype=bool)   # (the same flags, as an array)
        self.ttft_deadline = ttft_deadline
        self.decode_deadline_s = decode_deadline_s
        self.keep_requests = keep_requests
        self.on_finish = on_finish
        self.requests: list = []          # kept finished/unfinished requests (keep_requests)
        # (gap, count) pairs, 16 bytes a pair (a count as a float: exact, at most a micro-batch's requests): a
        # million-request run pools some 16 million, which beyond SPILL_PAIRS wait in a temporary file
        self.gaps = GapPool()
        self._deadline_cache: dict = {}
        # deadline accounting waiting to be done in one batch (deadline_misses_batch): the recorded requests' ids,
        # TTFTs, first-token deadlines and token counts, and their token times, copied when they are recorded
        # straight into the batch's buffer (``_times`` from byte ``_times_off``, ``_times_pos`` bytes so far, at
        # most ``_times_cap``): the helper's shared slot for the batch when there is one, else a buffer of this
        # recorder's, each used again by the next batch (native float64 bytes: the engine's ``array("d")`` is
        # copied as it is; a list a caller set is packed by struct.pack, exact and faster than array.fromlist)
        self._pending: list = []
        self._pending_ttft, self._pending_dl, self._pending_len = array("d"), array("d"), array("q")
        self._times = self._own_times = None
        self._times_off = self._times_pos = self._times_cap = 0
        self._times_in_slot = False
        # with ``offload``: the helper process (started here, ended by ``close``) and, per batch sent to it and not
        # yet collected, oldest first, its ``(ids, staged rows)``
        self.offload = self.n >= OFFLOAD_REQUESTS if offload is None else bool(offload)
        self._batch_bytes = 8 * (_OFFLOAD_TOKENS if self.offload else _PENDING_TOKENS)
        self._worker = None
        self._in_flight: list = []
        if self.offload and ttft_deadline is not None:
            self._start_worker()         # (it starts while the run is set up)
        self.token_sink = None            # callable(request) writing its tokens (tokens.csv), or None

    # --- during the run -------------------------------------------------------------------------------------
    def add_gaps(self, gaps: dict) -> None:
        """Count TBT samples: ``{gap_s: number of requests}`` of one micro-batch."""
        self.gaps.add(gaps)

    def add_gap_arrays(self, values, counts) -> None:
        """Count TBT samples given as aligned sequences (fast-forward)."""
        self.gaps.add_arrays(values, counts)

    def add_gap_pairs(self, pairs: np.ndarray) -> None:
        """Count TBT samples given as an ``(m, 2)`` float64 array of ``(gap_s, count)`` rows (fast-forward)."""
        self.gaps.add_pairs(pairs)

    @property
    def num_gap_pairs(self) -> int:
        """``(gap, count)`` pairs pooled so far."""
        return len(self.gaps)

    def truncate_gaps(self, num_pairs: int) -> None:
        """Drop the pairs pooled after the first ``num_pairs`` (a fast-forwarded stretch taken back when the run
        stops inside it, ``simulator.fast_forward.rollback_stretch``)."""
        self.gaps.truncate(num_pairs)

    def record(self, r) -> None:
        """Write request ``r``'s row (done once; a later call for the same id overwrites the fields it knows)."""
        i = r.request_id
        nan = math.nan
        if self._recorded[i]:            # recorded before: the fields it does not know now stay
            row = [r.arrival_s, r.prompt_tokens, r.output_tokens, r.scheduled_s, r.first_token_s, r.completion_s,
                   r.num_preemptions, r.num_cached_tokens, r.replica_id, r.decode_replica_id, r.kv_transfer_s,
                   r.decode_scheduled_s, None, None, None]
            row = [b if v is None else v for v, b in zip(row, self._row(i))]
        else:                            # (the fields that may be unknown, as NaN)
            a, b, c, d, e, f, g = (r.scheduled_s, r.first_token_s, r.completion_s, r.replica_id, r.decode_replica_id,
                                   r.kv_transfer_s, r.decode_scheduled_s)
            row = [r.arrival_s, r.prompt_tokens, r.output_tokens, nan if a is None else a, nan if b is None else b,
                   nan if c is None else c, r.num_preemptions, r.num_cached_tokens, nan if d is None else d,
                   nan if e is None else e, nan if f is None else f, nan if g is None else g, nan, nan, nan]
        if self.ttft_deadline is not None:
            dl = self._deadline_cache.get(r.prompt_tokens)
            if dl is None:
                dl = self._deadline_cache[r.prompt_tokens] = self.ttft_deadline(r.prompt_tokens)
            row[_TTFT_DEADLINE] = dl       # (set after the merge above: always this record's)
            times = r.token_times_s
            if times:
                k = len(times)
                pos = self._times_pos
                if pos + 8 * k > self._times_cap:
                    pos = self._room(8 * k)
                at = self._times_off + pos
                self._times[at:at + 8 * k] = times if type(times) is array else struct.pack(f"{k}d", *times)
                self._times_pos = pos + 8 * k
                self._pending.append(i)
                self._pending_ttft.append(times[0] - r.arrival_s)
                self._pending_dl.append(dl)
                self._pending_len.append(k)
        self._stage[i] = row
        self._recorded[i] = 1
        if self._times_pos >= self._batch_bytes or len(self._stage) >= _STAGED_ROWS:
            self._account_deadlines(wait=False)

    def _room(self, nbytes: int) -> int:
        """Make room for ``nbytes`` more token-time bytes in the batch's buffer: send (or do) the batch when it
        has any, then take the next buffer (a fresh one just large enough for a request too long for any);
        return where they go."""
        if self._pending:
            self._account_deadlines(wait=False)     # (which starts the next buffer)
        if self._times_pos + nbytes > self._times_cap:
            self._next_buffer(nbytes)
        return self._times_pos

    def _next_buffer(self, nbytes: int = 0) -> None:
        """Start the next batch's token-time buffer: the helper's shared slot for it, else this recorder's own
        (``nbytes``: the first request's bytes, when larger than either)."""
        slot = self._worker.slot() if self._worker is not None else None
        if slot is not None and nbytes <= slot[2]:
            self._times, self._times_off, self._times_cap = slot
            self._times_in_slot = True
        else:
            cap = max(2 * self._batch_bytes, 1 << 12)
            if nbytes > cap:
                self._times = bytearray(nbytes)
            else:
                if self._own_times is None or len(self._own_times) != cap:
                    self._own_times = bytearray(cap)
                self._times = self._own_times
            self._times_off, self._times_cap = 0, len(self._times)
            self._times_in_slot = False
        self._times_pos = 0

    def _row(self, i: int) -> list:
        """Request ``i``'s row as recorded so far (staged, or written)."""
        row = self._stage.get(i)
        if row is not None:
            return row
        if any(i in stage for _, stage in self._in_flight):
            self._collect()              # (its accounting first: it belongs to the row recorded last)
        return self.rows.read(i, i + 1)[0].tolist()

    def _account_deadlines(self, wait: bool = True) -> None:
        """Do the pending deadline accounting (in the order requests were recorded: a later row of an id
        overwrites an earlier one, as recording it again does), then write the staged rows. With the helper
        process and not ``wait``, the batch goes to it instead, and its rows are written when its result is
        collected (in order, before any later rows)."""
        stage = self._stage
        if self._pending:
            ids, ttft, dl, lengths = self._pending, self._pending_ttft, self._pending_dl, self._pending_len
            self._pending = []
            self._pending_ttft, self._pending_dl, self._pending_len = array("d"), array("d"), array("q")
            buffer, off, nbytes = self._times, self._times_off, self._times_pos
            if self._worker is not None and not wait:
                if self._worker.full:
                    self._collect_one()
                # (times in its slot are said by their size; others are sent)
                self._worker.submit(ttft, dl, lengths, nbytes if self._times_in_slot else
                                    bytes(memoryview(buffer)[off:off + nbytes]))
                self._in_flight.append((ids, stage))
                self._stage = {}
                self._next_buffer()
                return
            self._collect()
            times = np.frombuffer(buffer, dtype=float, count=nbytes // 8, offset=off)
            self._fill(stage, ids, *deadline_misses_batch(ttft, dl, times, lengths, self.decode_deadline_s))
            del times                    # (a view of the buffer, used again by the next batch)
            self._next_buffer()
        else:
            self._collect()
        if stage:
            self.rows.put(list(stage), list(stage.values()))
            stage.clear()

    def _start_worker(self) -> None:
        """Start the helper process; where none can be started (or no Python runs it: an embedded interpreter's
        ``sys.executable`` is empty), the accounting stays in this process, with a RuntimeWarning."""
        import subprocess

        from simulator.deadline_worker import DeadlineWorker

        try:
            self._worker = DeadlineWorker(self.decode_deadline_s)
        except (OSError, ValueError, TypeError, subprocess.SubprocessError) as e:
            import warnings

            warnings.warn(f"deadline accounting helper process could not start ({type(e).__name__}: {e}); the "
                          f"accounting stays in this process (the same numbers, slower)", RuntimeWarning,
                          stacklevel=2)
            self.offload = False
            self._batch_bytes = 8 * _PENDING_TOKENS

    @staticmethod
    def _fill(stage: dict, ids, missed: np.ndarray, total: np.ndarray) -> None:
        for i, m, t in zip(ids, missed.tolist(), total.tolist()):     # (a later one of an id last)
            row = stage[i]
            row[_DEADLINES], row[_DEADLINE_MISSES] = t, m

    def _collect_one(self) -> None:
        """Take the oldest batch's result from the helper and write its rows."""
        ids, stage = self._in_flight.pop(0)
        self._fill(stage, ids, *self._worker.result())
        self.rows.put(list(stage), list(stage.values()))

    def _collect(self) -> None:
        while self._in_flight:
            self._collect_one()

    @property
    def cols(self) -> dict:
        """The per-request columns (``REQUEST_FIELDS``: name -> (N,) float64, NaN where unknown), with every
        recorded request's deadline accounting done. A long run's rows are read from their file into memory:
        ``blocks`` reads them a block at a time."""
        self._account_deadlines()
        table = self.rows.read(0, self.n)
        return {f: table[:, k] for k, f in enumerate(REQUEST_FIELDS)}

    def blocks(self, size: int | None = None):
        """``(first id, columns)`` of consecutive requests, ``size`` at a time (default ``RequestRows.block``), in
        id order: ``cols`` a block at a time."""
        self._account_deadlines()
        for lo, table in self.rows.blocks(size):
            yield lo, {f: table[:, k] for k, f in enumerate(REQUEST_FIELDS)}

    def finish(self, done: list) -> None:
        """Requests finished (completed, or handed on and completed later): record them, then drop their token
        times unless they are kept."""
        for r in done:
            self.record(r)
            if self.token_sink is not None:
                self.token_sink(r)
        if self.on_finish is not None:
            self.on_finish(done)
        for r in done:
            if self.keep_requests:
                self.requests.append(r)
            else:
                r.token_times_s = array("d")

    def close(self, leftovers) -> None:
        """The run ended: record the requests that never finished (rejected, or still running at ``until_s``),
        finish the deadline accounting and end the helper process."""
        for r in leftovers:
            if not self._recorded[r.request_id]:
                self.record(r)
                if self.token_sink is not None:
                    self.token_sink(r)
            if self.keep_requests:
                self.requests.append(r)
        self._account_deadlines()
        if self._worker is not None:     # (a later record is accounted in this process, in a buffer of its own)
            self._worker.close()
            self._worker = None
            self._times, self._times_cap = None, 0

    # --- after the run --------------------------------------------------------------------------------------
    def tbt_distribution(self) -> dict:
        """``GapPool.distribution`` of the pooled TBT sample (the pool is consumed: call it once, after the run)."""
        return self.gaps.distribution()

    def column(self, name: str) -> np.ndarray:
        return self.cols[name]
