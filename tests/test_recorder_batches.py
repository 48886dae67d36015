"""Etalon's deadline accounting as the Recorder does it, many requests at once (``deadline_misses_batch``, run when
its buffer of token times fills or its columns are read): per request the same integers as the formula applied to
that request alone, token by token, and as Etalon's loop (``slo.deadline_misses``) wherever the arithmetic is exact
(times that are multiples of 1/8 s), ties included."""
import math
from array import array

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator import recorder as rec
from simulator.recorder import REQUEST_FIELDS, Recorder, deadline_misses_batch
from simulator.request import Request
from simulator.slo import deadline_misses


def formula(ttft, ttft_deadline, times, d):
    """``(missed, total)`` of one request by ``deadline_misses_batch``'s formula, one token at a time in Python
    floats, the same operations in the same order: ``y_i = (t_i - t_0) - i x D`` against the running maximum
    ``R_i`` of ``s_0, y_1 .. y_{i-1}``; a late token misses ``floor((y_i - R_i) / D + 1)``."""
    if ttft <= ttft_deadline:
        r, missed, total = ttft_deadline - ttft, 0, 1
    else:
        missed = 1 + math.floor((ttft - ttft_deadline) / d)
        r, total = 0.0, missed
    for i in range(1, len(times)):
        y = (times[i] - times[0]) - float(i) * d
        if y > r:
            m = math.floor((y - r) / d + 1)
            missed, total, r = missed + m, total + m, y
        else:
            total += 1
    return missed, total


def etalon(ttft, ttft_deadline, times, d):
    return deadline_misses(ttft, np.diff(times).tolist(), ttft_deadline, d)


def random_requests(rng, m, d, *, exact=False, max_len=400):
    """``m`` requests as ``(ttft, ttft_deadline, times)``: 1 to ``max_len`` tokens, gaps around ``d`` with some
    stalls and a few huge ones; ``exact``: every time a multiple of 1/8 s (``d`` too), so sums are exact and many
    gaps tie with the deadline plus the slack."""
    out = []
    for _ in range(m):
        k = int(rng.integers(1, max_len + 1)) if rng.random() < 0.9 else 1
        if exact:
            ttft, ttft_deadline = int(rng.integers(0, 40)) / 8, int(rng.integers(0, 40)) / 8
            gaps = rng.integers(0, 4 * int(8 * d), k - 1) / 8
            gaps[rng.random(k - 1) < 0.002] = 4096.0
        else:
            ttft, ttft_deadline = float(rng.exponential(0.3)), float(rng.uniform(0.05, 0.6))
            gaps = rng.exponential(d * rng.choice([0.5, 0.9, 1.5]), k - 1)
            gaps[rng.random(k - 1) < 0.01] *= 50
            gaps[rng.random(k - 1) < 0.001] = 1e5
        arrival = float(rng.uniform(0, 1e4)) if not exact else int(rng.integers(0, 8000)) / 8
        times = (arrival + ttft + np.concatenate(([0.0], np.cumsum(gaps)))).tolist()
        out.append((times[0] - arrival, ttft_deadline, times))
    return out


def batch(requests, d):
    ttft, dl, times = zip(*requests) if requests else ((), (), ())
    missed, total = deadline_misses_batch(ttft, dl, [t for ts in times for t in ts], [len(ts) for ts in times], d)
    assert missed.dtype == total.dtype == np.int64
    return list(zip(missed.tolist(), total.tolist()))


@pytest.mark.parametrize("d", [0.03, 0.5, 1 / 3])
def test_batch_is_the_formula_request_by_request(d):
    rng = np.random.default_rng(7)
    for _ in range(8):
        requests = random_requests(rng, int(rng.integers(1, 120)), d)
        assert batch(requests, d) == [formula(*q, d) for q in requests]


@pytest.mark.parametrize("d", [0.25, 0.5])
def test_batch_is_etalons_loop_on_exact_timelines(d):
    rng = np.random.default_rng(3)
    for _ in range(8):
        requests = random_requests(rng, int(rng.integers(1, 120)), d, exact=True)
        expected = [etalon(*q, d) for q in requests]
        assert batch(requests, d) == expected == [formula(*q, d) for q in requests]
        assert sum(m for m, _ in expected) > 0


def test_ties_and_edge_cases():
    d = 0.5
    requests = [
        (1.0, 1.0, [5.0]),                               # one token, its deadline met exactly
        (1.125, 1.0, [5.0]),                             # one token, late: 1 + floor(0.125 / 0.5) = 1 miss
        (3.0, 1.0, [5.0]),                               # one token, 2 s late: 5 misses
        (0.5, 1.0, [1.0, 2.0, 2.5, 3.0]),                # gap 1.0 == D + slack 0.5: met; then gaps == D: met
        (1.0, 1.0, [1.0, 1.5, 2.0, 2.5]),                # no slack, every gap == D
        (1.0, 1.0, [1.0, 1.625, 2.0, 2.375]),            # late by 1/8 (slack reset), then ties with the slack
        (0.0, 1.0, [0.0, 1e6]),                          # one huge stall
        (0.25, 0.25, [7.0, 7.0, 7.0, 7.0]),              # tokens at the same time
        (0.0, 2.0 ** -54, [0.0, 1.0]),                   # (y - R) / D = 1 - 2**-53: + 1 rounds up to 2
    ]
    expected = [etalon(*q, d) for q in requests]
    assert batch(requests, d) == expected == [formula(*q, d) for q in requests]
    assert expected[:3] == [(0, 1), (1, 1), (5, 5)] and expected[3] == (0, 4) and expected[6][0] == 1_999_998
    assert expected[-1] == (2, 3)
    # the same requests one at a time, and in any order, give the same rows
    assert [batch([q], d)[0] for q in requests] == expected
    assert batch(requests[::-1], d) == expected[::-1]
    assert batch([], d) == []


def test_ties_between_running_maximum_and_token():
    # times t_0 + i x D exactly where the float arithmetic allows: y_i lands on or next to the threshold R_i
    d = 0.03
    rng = np.random.default_rng(5)
    requests = []
    for j in range(200):
        t0 = float(rng.uniform(0, 1000))
        times = [t0 + i * d for i in range(int(rng.integers(2, 60)))]
        dl = float(rng.choice([0.3, 0.30000000000000004]))
        requests.append((dl if j % 2 else 0.29999999999999993, dl, times))
    assert batch(requests, d) == [formula(*q, d) for q in requests]


exact_request = st.tuples(st.integers(0, 24), st.integers(0, 24),
                          st.lists(st.integers(0, 12), max_size=40)).map(
    lambda x: (x[0] / 8, x[1] / 8, (x[0] / 8 + np.cumsum([0] + x[2]) / 8).tolist()))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(exact_request, max_size=30), st.sampled_from([0.25, 0.5, 1.0]))
def test_batch_is_etalons_loop_hypothesis(requests, d):
    assert batch(requests, d) == [etalon(*q, d) for q in requests] == [formula(*q, d) for q in requests]


def test_complex_maximum_is_lexicographic():
    # deadline_misses_batch restarts its running maximum at each request through numpy's complex ordering
    keys = np.array([0 + 5j, 0 + 1j, 0 + 7j, 3 - 2j, 3 - 9j, 3 + 0j, 7 + 1e300j, 8 - 1e300j, 8 - 2e300j])
    assert np.maximum.accumulate(keys).tolist() == [5j, 5j, 7j, 3 - 2j, 3 - 2j, 3 + 0j, 7 + 1e300j, 8 - 1e300j,
                                                    8 - 1e300j]


def make_request(rid, arrival, times, rng, container=list):
    r = Request(rid, arrival, int(rng.integers(1, 2000)), max(1, len(times)))
    r.token_times_s = container(times)
    r.num_generated = len(times)
    r.scheduled_s = arrival + 0.01 if times or rng.random() < 0.5 else None
    r.first_token_s = times[0] if times else None
    r.completion_s = times[-1] if times else None
    r.num_preemptions = int(rng.integers(0, 3))
    r.replica_id = int(rng.integers(0, 4)) if rng.random() < 0.5 else None
    return r


def check_rows(cols, expected):
    """Every column of every expected row: ``{id: {field: value}}``, a missing field NaN."""
    for i, row in expected.items():
        for f in REQUEST_FIELDS:
            got, want = cols[f][i], row.get(f)
            assert (np.isnan(got) if want is None else got == want), (i, f, got, want)


@pytest.mark.parametrize("container", [list, lambda times: array("d", times)], ids=["list", "array"])
@pytest.mark.parametrize("pending_tokens,offload", [(1, False), (50, False), (700, False), (1 << 15, False),
                                                    (50, True), (700, True)])
def test_recorder_batches_as_recorded(monkeypatch, pending_tokens, offload, container):
    # a run's recording: batches done when the buffer fills (at any size) or the columns are read; requests recorded
    # twice (again with more tokens: the later row counts; again with none: the earlier accounting stays) within a
    # batch and across batches; columns read in the middle of the run; token times changed after a record ignored.
    # Token times as the engine keeps them (an array, copied as bytes) or as a list a user sets (packed); the
    # accounting done here or by the helper process (batches in flight when a request is recorded again)
    monkeypatch.setattr(rec, "_PENDING_TOKENS", pending_tokens)
    monkeypatch.setattr(rec, "_OFFLOAD_TOKENS", pending_tokens)
    d, n = 0.03, 300
    rng = np.random.default_rng(pending_tokens)
    reqs = [make_request(i, times[0] - ttft, times if rng.random() < 0.95 else [], rng, container)
            for i, (ttft, _, times) in enumerate(random_requests(rng, n, d, max_len=300))]
    deadline_of = {r.prompt_tokens: 0.1 + r.prompt_tokens * 1e-4 for r in reqs}
    recorder = Recorder(n, ttft_deadline=deadline_of.__getitem__, decode_deadline_s=d, offload=offload)
    expected = {}

    def record(r):
        recorder.record(r)
        row = expected.setdefault(r.request_id, {})
        row.update({f: getattr(r, f) for f in REQUEST_FIELDS if getattr(r, f, None) is not None})
        row["ttft_deadline_s"] = dl = deadline_of[r.prompt_tokens]
        if r.token_times_s:
            times = r.token_times_s
            row["deadline_misses"], row["deadlines"] = formula(times[0] - r.arrival_s, dl, times, d)

    for j, r in enumerate(reqs):
        times = r.token_times_s
        if j % 7 == 3 and times:                         # recorded at a hand-off, then its tokens go on
            r.token_times_s = times[:max(1, len(times) // 3)]
            record(r)
            r.token_times_s.extend(times[len(r.token_times_s):])
        record(r)
        if j % 11 == 5:                                  # recorded again without its tokens: accounting kept
            r.token_times_s = []
            record(r)
        if j % 13 == 0:                                  # times changed after the record: not counted
            r.token_times_s.append(r.token_times_s[-1] + 5.0 if r.token_times_s else 5.0)
            r.token_times_s[0] -= 1.0
        if j % 100 == 50:                                # columns read mid-run: every recorded row complete
            check_rows(recorder.cols, expected)
            assert not recorder._pending
    check_rows(recorder.cols, expected)
    assert recorder.recorded.all() and not recorder._pending and not recorder._in_flight
    assert np.nansum(recorder.cols["deadline_misses"]) > 0
    assert (recorder._worker is not None) is offload     # (the helper was used, and ends with the run)
    recorder.close([])
    assert recorder._worker is None
    check_rows(recorder.cols, expected)


def test_recorder_columns_do_not_depend_on_the_batch_size(monkeypatch):
    d = 0.03
    rng = np.random.default_rng(1)
    requests = random_requests(rng, 400, d, max_len=600)
    out = []
    for pending_tokens, offload in ((1, False), (333, False), (1 << 15, False), (1 << 30, False), (333, True),
                                    (1 << 15, True)):
        monkeypatch.setattr(rec, "_PENDING_TOKENS", pending_tokens)
        monkeypatch.setattr(rec, "_OFFLOAD_TOKENS", pending_tokens)
        recorder = Recorder(len(requests), ttft_deadline=lambda p: 0.25, decode_deadline_s=d, offload=offload)
        for i, (ttft, _, times) in enumerate(requests):
            recorder.record(make_request(i, times[0] - ttft, times, np.random.default_rng(i)))
        recorder.close([])
        out.append({f: c.tobytes() for f, c in recorder.cols.items()})
    assert all(o == out[0] for o in out[1:])


@pytest.mark.parametrize("slot_bytes", [1 << 21, 16], ids=["shared", "piped"])
def test_the_helper_answers_in_order(monkeypatch, slot_bytes):
    # batches whose token times go through shared memory (slots used again) or, larger than a slot, the pipe
    from simulator import deadline_worker

    monkeypatch.setattr(deadline_worker, "SLOT_BYTES", slot_bytes)
    d = 0.03
    rng = np.random.default_rng(5)
    worker = deadline_worker.DeadlineWorker(d)
    batches = [random_requests(rng, int(rng.integers(1, 30)), d) for _ in range(12)]
    got = []
    for requests in batches:
        if worker.full:
            got.append(worker.result())
        ttft, dl, times = zip(*requests)
        worker.submit(ttft, dl, [len(t) for t in times], np.array([t for ts in times for t in ts]).tobytes())
    while worker.in_flight:
        got.append(worker.result())
    worker.close()
    assert [list(zip(m.tolist(), t.tolist())) for m, t in got] == [batch(b, d) for b in batches]


def test_an_error_in_the_helpers_accounting_is_raised_here(monkeypatch):
    from simulator.deadline_worker import DeadlineWorker

    worker = DeadlineWorker(0.03)
    worker.submit([0.1, 0.2], [0.5, 0.5], [2, 2], np.arange(3.0).tobytes())     # 4 times said, 3 sent
    worker.submit([0.1], [0.5], [2], np.arange(2.0).tobytes())
    with pytest.warns(RuntimeWarning, match="failed; .*Traceback"), pytest.raises(ValueError):
        worker.result()
    missed, total = worker.result()                 # (the next batch: computed here)
    assert list(zip(missed.tolist(), total.tolist())) == batch([(0.1, 0.5, [0.0, 1.0])], 0.03)
    worker.close()


@pytest.mark.parametrize("slot_bytes", [1 << 21, 16], ids=["shared", "piped"])
def test_a_helper_process_killed_mid_run_leaves_the_accounting_here(monkeypatch, slot_bytes):
    # the batches it held (in shared memory or sent through the pipe) and the later ones are computed here: the
    # same numbers, with a warning
    from simulator import deadline_worker

    monkeypatch.setattr(rec, "_OFFLOAD_TOKENS", 100)
    monkeypatch.setattr(deadline_worker, "SLOT_BYTES", slot_bytes)
    d = 0.03
    requests = random_requests(np.random.default_rng(3), 200, d, max_len=300)
    recorder = Recorder(len(requests), ttft_deadline=lambda p: 0.25, decode_deadline_s=d, offload=True)
    with pytest.warns(RuntimeWarning, match="deadline accounting helper process .* failed; the accounting goes on"):
        for i, (ttft, _, times) in enumerate(requests):
            recorder.record(make_request(i, times[0] - ttft, times, np.random.default_rng(i)))
            if i == 20:
                recorder._worker._process.kill()
        recorder.close([])
    assert list(zip(recorder.cols["deadline_misses"].tolist(), recorder.cols["deadlines"].tolist())) == \
        [formula(ttft, 0.25, times, d) for ttft, _, times in requests]


@pytest.mark.parametrize("error", [OSError("no processes here"), TypeError("no executable")])
def test_without_a_helper_process_the_accounting_stays_here(monkeypatch, error):
    import subprocess

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(subprocess, "Popen", refuse)
    d = 0.03
    requests = random_requests(np.random.default_rng(6), 50, d)
    with pytest.warns(RuntimeWarning, match="helper process could not start .*stays in this process"):
        recorder = Recorder(len(requests), ttft_deadline=lambda p: 0.25, decode_deadline_s=d, offload=True)
    assert recorder._worker is None and not recorder.offload
    for i, (ttft, _, times) in enumerate(requests):
        recorder.record(make_request(i, times[0] - ttft, times, np.random.default_rng(i)))
    recorder.close([])
    assert list(zip(recorder.cols["deadline_misses"].tolist(), recorder.cols["deadlines"].tolist())) == \
        [formula(ttft, 0.25, times, d) for ttft, _, times in requests]
