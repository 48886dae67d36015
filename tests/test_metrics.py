"""Request- and token-level metrics on hand-built request timelines (issue 2: TTFT = first token - arrival;
scheduling delay = first scheduled - arrival; TBT = gaps between consecutive tokens, preemption included, pooled;
TPOT = (completion - first token) / (outputs - 1); E2E; normalized latency = E2E / outputs; throughput)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from simulator.metrics import REQUEST_COLUMNS, distribution, recorded, requests_table, summarize, tbt_gaps
from simulator.replica import IterationLog
from simulator.request import Request


def timeline(rid, arrival, prompt, output, scheduled=None, times=(), preemptions=0, rejected=None):
    r = Request(rid, arrival, prompt, output)
    r.scheduled_s = scheduled
    r.token_times_s = list(times)
    r.num_generated = len(times)
    r.first_token_s = times[0] if times else None
    r.completion_s = times[-1] if len(times) == output else None
    r.num_preemptions = preemptions
    r.rejected = rejected
    return r


@pytest.fixture
def requests():
    return [
        # preempted after its 2nd token and recomputed: the gap 2 -> 5 counts as one TBT of 3 s
        timeline(0, 0.0, 10, 3, scheduled=0.5, times=[1.0, 2.0, 5.0], preemptions=1),
        timeline(1, 1.0, 20, 2, scheduled=1.0, times=[3.0, 3.5]),
        timeline(2, 2.0, 5, 1, scheduled=4.0, times=[6.0]),
        timeline(3, 3.0, 9000, 5, rejected="too long"),                 # never scheduled
        timeline(4, 4.0, 8, 4, scheduled=4.5, times=[5.0, 5.5]),        # unfinished (2 of 4 tokens)
    ]


def test_requests_table_by_hand(requests):
    t = requests_table(requests)
    assert list(t.columns) == REQUEST_COLUMNS
    t = t.set_index("request_id")
    done = t.loc[[0, 1, 2]]
    assert done["ttft_s"].tolist() == [1.0, 2.0, 4.0]
    assert done["scheduling_delay_s"].tolist() == [0.5, 0.0, 2.0]
    assert done["e2e_s"].tolist() == [5.0, 2.5, 4.0]
    assert done["tpot_s"].iloc[:2].tolist() == [2.0, 0.5]            # (5-1)/2, (3.5-3)/1
    assert math.isnan(done["tpot_s"].iloc[2])                         # one output token: undefined
    assert t["num_preemptions"].tolist() == [1, 0, 0, 0, 0]
    # rejected: nothing known; unfinished: first token and scheduling known, completion not
    assert t.loc[3, ["scheduled_s", "first_token_s", "completion_s", "ttft_s", "e2e_s"]].isna().all()
    assert t.loc[4, "ttft_s"] == 1.0 and math.isnan(t.loc[4, "completion_s"]) and math.isnan(t.loc[4, "e2e_s"])


def test_tbt_pools_every_gap_of_every_request(requests):
    assert sorted(tbt_gaps(requests).tolist()) == [0.5, 0.5, 1.0, 3.0]
    assert tbt_gaps([requests[2], requests[3]]).size == 0


def test_distribution_percentiles():
    d = distribution(np.arange(1, 101))
    assert d == {"mean": 50.5, "p50": 50.5, "p90": pytest.approx(90.1), "p99": pytest.approx(99.01), "max": 100.0}
    assert distribution([4.0, float("nan"), 2.0]) == {"mean": 3.0, "p50": 3.0, "p90": pytest.approx(3.8),
                                                      "p99": pytest.approx(3.98), "max": 4.0}
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}


def test_summary_by_hand(requests):
    log = IterationLog(start_s=[0.5, 1.0], duration_s=[0.5, 0.5], batch_size=[1, 2], num_prefill_tokens=[10, 20],
                       num_decode_tokens=[0, 1], kv_blocks_used=[2, 4], kv_blocks_total=[10, 10])
    s = summarize(recorded(requests), log.stats(), num_rejected=1)
    for key in ("ttft_s", "tbt_s", "tpot_s", "e2e_s", "scheduling_delay_s"):
        assert set(s[key]) == {"mean", "p50", "p90", "p99", "max"}
    assert s["ttft_s"]["mean"] == pytest.approx(7 / 3) and s["ttft_s"]["p50"] == 2.0 and s["ttft_s"]["max"] == 4.0
    assert s["ttft_s"]["p90"] == pytest.approx(3.6)                   # linear interpolation of [1, 2, 4]
    assert s["e2e_s"]["mean"] == pytest.approx(11.5 / 3) and s["e2e_s"]["max"] == 5.0
    assert s["tpot_s"]["mean"] == pytest.approx(1.25) and s["tpot_s"]["max"] == 2.0
    assert s["tbt_s"]["mean"] == pytest.approx(5 / 4) and s["tbt_s"]["max"] == 3.0
    assert s["normalized_latency_s_per_token"]["mean"] == pytest.approx((5 / 3 + 2.5 / 2 + 4 / 1) / 3)
    assert s["requests_completed"] == 3
    assert s["requests_rejected"] == 1
    assert s["num_preemptions"] == 1
    # makespan = last completion (6) - first arrival (0); completed tokens = (10+3) + (20+2) + (5+1) = 41
    assert s["makespan_s"] == 6.0
    assert s["throughput_tokens_per_s"] == pytest.approx(41 / 6)
    assert s["output_throughput_tokens_per_s"] == pytest.approx(6 / 6)
    assert s["throughput_requests_per_s"] == pytest.approx(3 / 6)
    assert s["num_iterations"] == 2
    assert s["kv_cache_utilization"] == {"mean": pytest.approx(0.3), "max": pytest.approx(0.4)}


def test_summary_of_nothing_completed():
    r = timeline(0, 1.0, 10, 2, rejected="too long")
    s = summarize(recorded([r]), IterationLog().stats(), num_rejected=1)
    assert s["requests_completed"] == 0 and s["requests_rejected"] == 1
    assert s["ttft_s"]["p99"] is None and s["throughput_tokens_per_s"] == 0.0 and s["makespan_s"] == 0.0


def test_request_progress_is_advanced_when_scheduled_and_tokens_emitted_when_the_micro_batch_ends():
    r = Request(0, 0.0, prompt_tokens=10, output_tokens=3)
    r.schedule(6, 0.0)                                 # first chunk: advanced at once, in flight
    assert r.num_computed_tokens == 6 and r.in_flight and r.scheduled_s == 0.0
    assert not r.complete(1.0)                         # ... no token at its end
    assert r.remaining_tokens == 4 and not r.is_decoding and not r.in_flight
    r.schedule(4, 1.0)
    assert r.complete(2.0)                             # prompt complete: first token
    assert r.is_decoding and r.first_token_s == 2.0 and r.scheduled_s == 0.0
    r.schedule(1, 2.0)
    assert r.complete(3.0)
    r.preempt()                                        # recompute: KV dropped, prompt + 2 outputs to redo
    assert r.num_computed_tokens == 0 and r.remaining_tokens == 12 and r.num_preemptions == 1
    r.schedule(12, 5.0)
    assert r.complete(7.0) and r.is_finished
    assert list(r.token_times_s) == [2.0, 3.0, 7.0] and r.completion_s == 7.0
    assert r.max_kv_tokens == 12


def test_requests_streamed_at_arrival_give_the_same_run():
    # keep_requests=False (the CLI) creates requests chunk by chunk as they arrive and drops them once measured
    import gc

    from simulator.config import SimConfig
    from simulator.request import Request
    from simulator.simulation import load_requests, simulate, stream_requests

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, Request) for o in gc.get_objects())

    config = SimConfig().with_(num_requests=300, qps=4.0)
    before = live()
    n, stream = stream_requests(config, chunk=64)
    it = iter(stream)
    first = next(it)
    assert n == 300 and live() - before <= 64
    fields = lambda rs: [(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in rs]  # noqa: E731
    assert fields([first, *it]) == fields(load_requests(config))
    kept, streamed = simulate(config), simulate(config, keep_requests=False)
    assert kept.summary == streamed.summary and streamed.requests is None
    assert kept.request_columns().keys() == streamed.request_columns().keys()


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_pooled_tbt_summary_equals_the_expanded_sample(monkeypatch, chunk):
    # the recorder keeps TBT samples as (gap, count) pairs and summarizes them by chunks without expanding
    from simulator import recorder
    from simulator.metrics import PERCENTILES

    monkeypatch.setattr(recorder, "_CHUNK", chunk)
    rng = np.random.default_rng(5)
    for _ in range(50):
        values = np.round(rng.uniform(0, 0.1, int(rng.integers(1, 200))), 3)      # ties on purpose
        counts = rng.integers(0, 6, len(values)).astype(np.int32)
        counts[0] = max(counts[0], 1)
        sample = np.sort(np.repeat(values, counts))          # the mean is summed in value order
        got = recorder.weighted_distribution(values, counts)
        assert got["mean"] == float(sample.mean()) and got["max"] == float(sample.max())
        for key, q in PERCENTILES.items():
            assert got[key] == float(np.percentile(sample, q))
            assert recorder.weighted_percentile(values, counts, q) == float(np.percentile(sample, q))
        # the recorder's own pool, filled as a run fills it (some pairs taken back), summarized in place
        pool = recorder.Recorder(1)
        half = len(values) // 2
        pool.add_gaps(dict(zip(values[:half].tolist(), counts[:half].tolist())))
        pool.add_gap_arrays(values[half:].tolist(), counts[half:].tolist())
        pool.add_gap_arrays([9.0, 9.5], [7, 8])
        pool.truncate_gaps(pool.num_gap_pairs - 2)
        merged = {}
        for v, c in zip(values[:half].tolist(), counts[:half].tolist()):
            merged[v] = c                                    # a dict keeps the last count of a repeated gap
        expect = recorder.weighted_distribution([*merged, *values[half:]], [*merged.values(), *counts[half:]])
        assert pool.tbt_distribution() == expect


def test_recorder_deadline_accounting_is_batched_but_as_recorded(monkeypatch):
    # the Recorder defers Etalon's deadline accounting to batches of requests; its columns must still be those of
    # each request's token times at the moment it was recorded, a second record of an id overwriting the first,
    # whether a batch is done when the buffer fills (a small buffer here) or when the columns are read
    from simulator import recorder as rec
    from simulator.slo import deadline_misses

    monkeypatch.setattr(rec, "_PENDING_TOKENS", 9)      # done after the 3rd record
    r = rec.Recorder(5, ttft_deadline=lambda prompt: 0.5, decode_deadline_s=0.25)
    handed_on = timeline(0, 0.0, 10, 6, times=[0.25, 0.5])            # recorded at its hand-off, then again
    reqs = [handed_on, timeline(1, 0.0, 10, 3, times=[1.0, 1.75, 2.0]), timeline(2, 0.0, 10, 1, times=[0.75]),
            timeline(3, 0.0, 10, 4, times=[0.25, 1.25, 1.5, 2.75]), timeline(4, 0.0, 10, 3, times=[0.25, 1.5])]
    r.record(handed_on)
    handed_on.token_times_s += [1.5, 1.75, 2.0, 3.0]
    for q in reqs:
        r.record(q)
    expected = [deadline_misses(q.token_times_s[0], np.diff(q.token_times_s), 0.5, 0.25)[::-1] for q in reqs]
    reqs[4].token_times_s.append(4.0)                   # after its record: not counted
    assert r._pending, "the last requests' accounting should still be waiting"
    got = list(zip(r.cols["deadlines"].astype(int).tolist(), r.cols["deadline_misses"].astype(int).tolist()))
    assert got == expected and not r._pending
    assert sum(m for _, m in got) > 0
