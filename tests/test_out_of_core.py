"""A long run keeps its per-request rows in a temporary file and summarises them a block at a time
(``simulator.request_rows``, ``simulator.out_of_core``): the rows read back as written, the external sort sorts,
the load report is ``metrics.load_report``'s to the bit, the latency distributions are exact, and a run whose rows
went to a file writes every output byte the in-memory run writes (its summary's means aside, which are summed in
another order)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from simulator import request_rows
from simulator.cli import main
from simulator.metrics import distribution, load_report
from simulator.out_of_core import SortedSpill, load_report_sorted, request_summary
from simulator.recorder import REQUEST_FIELDS, Recorder
from simulator.request import Request
from simulator.request_rows import RequestRows


@pytest.mark.parametrize("in_memory", [True, False])
def test_rows_read_back_as_written_by_id(in_memory):
    rows = RequestRows(10, 3, in_memory=in_memory)
    assert rows.in_memory is in_memory
    rows.put([7, 2, 3], [[7.0, 7.5, np.nan], [2.0, 2.5, 2.25], [3.0, 3.5, 3.25]])
    rows.put([2], [[-2.0, -2.5, -2.25]])                      # a later row of an id replaces it
    got = rows.read(0, 10)
    assert got.shape == (10, 3)
    assert got[2].tolist() == [-2.0, -2.5, -2.25] and got[3].tolist() == [3.0, 3.5, 3.25]
    assert got[7, :2].tolist() == [7.0, 7.5] and np.isnan(got[7, 2])
    assert np.isnan(got[[0, 1, 4, 5, 6, 8, 9]]).all()          # never written: NaN (also past the file's end)
    assert [lo for lo, _ in rows.blocks(4)] == [0, 4, 8]
    assert np.array_equal(np.concatenate([b for _, b in rows.blocks(4)]), got, equal_nan=True)


@pytest.mark.parametrize("in_memory", [True, False])
def test_rows_far_apart_are_written_each_in_place(in_memory):
    rows = RequestRows(5000, 2, in_memory=in_memory)
    rows.put([4999, 0, 1, 2500], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])     # (no read of the span)
    rows.put([1, 2], [[-5.0, -6.0], [9.0, 10.0]])
    got = rows.read(0, 5000)
    assert got[[0, 1, 2, 2500, 4999]].tolist() == [[3.0, 4.0], [-5.0, -6.0], [9.0, 10.0], [7.0, 8.0], [1.0, 2.0]]
    assert np.isnan(np.delete(got, [0, 1, 2, 2500, 4999], axis=0)).all()


def test_rows_through_the_block_cache_read_back_as_in_memory(monkeypatch):
    # rows put roughly in id order with stragglers (into cached blocks, blocks written out when too many are held,
    # rows of blocks already written out straight to the file), a later row of an id replacing it, and reads in
    # the middle (of the file and the cached blocks): the same table as in memory
    monkeypatch.setattr(request_rows, "CACHE_ROWS", 16)
    monkeypatch.setattr(request_rows, "CACHED_BLOCKS", 3)
    n, rng = 1000, np.random.default_rng(11)
    disk, mem = RequestRows(n, 2, in_memory=False), RequestRows(n, 2, in_memory=True)
    order = np.argsort(np.arange(n) + rng.normal(0, 40, n))    # finishing roughly in id order
    order = np.concatenate([order, rng.choice(n, 150)])         # and some recorded again
    for k, lo in enumerate(range(0, len(order), 37)):
        ids = list(dict.fromkeys(order[lo:lo + 37].tolist()))   # (distinct ids a put)
        rows = rng.normal(size=(len(ids), 2))
        for table in (disk, mem):
            table.put(ids, rows)
        if k % 9 == 4:
            i = int(rng.integers(0, n))
            assert np.array_equal(disk.read(i, i + 50), mem.read(i, i + 50), equal_nan=True)
    assert np.array_equal(disk.read(0, n), mem.read(0, n), equal_nan=True)
    assert np.isnan(mem.read(0, n)).all(axis=1).sum() < n // 4     # (most ids were written)
    # a first row of a block below every cached one, the cache full: that block is the one written out
    rows = RequestRows(200, 2, in_memory=False)
    for block in (5, 6, 7, 1):
        rows.put([16 * block + 3], [[float(block), 0.5]])
    assert rows.read(0, 200)[[19, 83, 99, 115]].tolist() == [[1.0, 0.5], [5.0, 0.5], [6.0, 0.5], [7.0, 0.5]]


def timeline(rid, arrival, prompt, output, times=(), **fields):
    r = Request(request_id=rid, arrival_s=arrival, prompt_tokens=prompt, output_tokens=output)
    r.token_times_s = list(times)
    if times:
        r.first_token_s, r.scheduled_s = times[0], arrival + 0.125
        r.num_generated = len(times)
        if len(times) == output:
            r.completion_s = times[-1]
    for k, v in fields.items():
        setattr(r, k, v)
    return r


def test_a_recorder_in_a_file_holds_the_same_columns(monkeypatch):
    from simulator import recorder as rec

    monkeypatch.setattr(rec, "_STAGED_ROWS", 3)                 # rows written as the run goes
    rng = np.random.default_rng(5)
    requests = []
    for i in range(40):
        k = int(rng.integers(0, 6))
        times = (i + 0.5 + np.cumsum(rng.exponential(0.25, k))).tolist()
        requests.append(timeline(i, float(i), int(rng.integers(1, 50)), max(k, 1) + int(rng.integers(0, 2)),
                                 times, replica_id=i % 3, num_preemptions=int(rng.integers(0, 2))))
    recorders = [Recorder(40, ttft_deadline=lambda p: 0.25 + p / 100, decode_deadline_s=0.25, in_memory=m)
                 for m in (True, False)]
    for r in requests[::-1]:
        for recorder in recorders:
            recorder.record(r)
    again = requests[4]
    again.token_times_s = again.token_times_s[:1]               # recorded again, knowing less: fields stay
    again.replica_id = None
    for recorder in recorders:
        recorder.record(again)
    mem, disk = (recorder.cols for recorder in recorders)
    assert list(mem) == list(disk) == list(REQUEST_FIELDS)
    for f in REQUEST_FIELDS:
        assert np.array_equal(mem[f], disk[f], equal_nan=True), f
    assert mem["replica_id"][4] == 1.0
    blocks = list(recorders[1].blocks(16))
    assert [lo for lo, _ in blocks] == [0, 16, 32]
    assert np.array_equal(np.concatenate([b["deadlines"] for _, b in blocks]), mem["deadlines"], equal_nan=True)


@pytest.mark.parametrize("n", [0, 1, 5, 100, 3001])
def test_the_external_sort_sorts(n):
    rng = np.random.default_rng(n)
    values = np.round(rng.normal(size=n), 2)                    # with ties
    spill = SortedSpill(run=64, block=16)
    for lo in range(0, n, 37):
        spill.add(values[lo:lo + 37])
    assert len(spill) == n
    blocks = list(spill.blocks())
    assert all(len(b) for b in blocks)
    got = np.concatenate(blocks) if blocks else np.empty(0)
    assert np.array_equal(got, np.sort(values))
    assert np.array_equal(np.concatenate(list(spill.blocks())) if n else np.empty(0), got)    # read again


@pytest.mark.parametrize("seed", range(6))
def test_the_sorted_load_report_is_load_reports(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    arrival = np.sort(rng.exponential(1 / 20, n).cumsum())
    served = rng.choice([10.0, 20.0, 40.0])                   # under, at and over capacity
    completion = np.maximum.accumulate(arrival + rng.exponential(0.5, n)) + np.arange(n) / served
    completion[rng.random(n) < 0.05] = np.nan                   # rejected
    rng.shuffle(completion)                                    # (completions in any order)
    makespan = float(np.nanmax(completion) - arrival.min())
    kept = ~np.isnan(completion)
    arrivals, completions = SortedSpill(run=128, block=32), SortedSpill(run=128, block=32)
    for lo in range(0, n, 100):
        arrivals.add(arrival[lo:lo + 100][kept[lo:lo + 100]])
        completions.add(completion[lo:lo + 100][kept[lo:lo + 100]])
    assert load_report_sorted(arrivals, completions, makespan) == load_report(arrival, completion, makespan)


def test_the_summary_of_rows_in_a_file_is_exact():
    rng = np.random.default_rng(11)
    n = 5000
    recorder = Recorder(n, in_memory=False)
    for i in range(n):
        k = int(rng.integers(0, 40))
        start = i * 0.05
        times = (start + 0.2 + np.cumsum(rng.exponential(0.03, k))).tolist()
        recorder.record(timeline(i, start, 100, max(k, 1), times, num_preemptions=int(rng.random() < 0.1)))
    got = request_summary(recorder)
    t = {f: v for f, v in recorder.cols.items()}
    done = ~np.isnan(t["completion_s"])
    e2e = (t["completion_s"] - t["arrival_s"])[done]
    expect = {"ttft_s": distribution((t["first_token_s"] - t["arrival_s"])[done]), "e2e_s": distribution(e2e),
              "scheduling_delay_s": distribution(t["scheduled_s"] - t["arrival_s"]),
              "normalized_latency_s_per_token": distribution(e2e / t["output_tokens"][done])}
    for name, want in expect.items():
        have = got[name]
        assert {k: have[k] for k in ("p50", "p90", "p99", "max")} == {k: want[k] for k in ("p50", "p90", "p99", "max")}
        assert math.isclose(have["mean"], want["mean"], rel_tol=1e-12)
    assert got["requests_completed"] == int(done.sum())
    assert got["num_preemptions"] == int(t["num_preemptions"].sum())
    assert got["output_tokens"] == int(t["output_tokens"][done].sum())
    makespan = float(t["completion_s"][done].max() - t["arrival_s"].min())
    assert got["makespan_s"] == makespan
    assert got["load"] == load_report(t["arrival_s"], t["completion_s"], makespan)


def _files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("args", [["--scheduler", "sarathi", "--qps", "8"],
                                  ["--scheduler", "vllm", "--qps", "40", "--replicas", "2"],
                                  ["--scheduler", "sarathi", "--qps", "6", "--prefill-replicas", "1",
                                   "--decode-replicas", "1"]], ids=["sarathi", "vllm-cluster", "disaggregated"])
def test_rows_in_a_file_change_no_output_byte_but_the_means(tmp_path, monkeypatch, args):
    runs = {}
    for name, limit in (("memory", 1 << 20), ("file", 64)):
        monkeypatch.setattr(request_rows, "IN_MEMORY_ROWS", limit)
        out = tmp_path / name
        done = CliRunner().invoke(main, ["simulate", *args, "--num-requests", "300", "--out", str(out)])
        assert done.exit_code == 0, done.output
        runs[name] = _files(out)
    memory, file = runs["memory"], runs["file"]
    assert memory.keys() == file.keys() and len(memory) >= 3
    for name in memory:
        if name != "summary.json":
            assert memory[name] == file[name], name
    a, b = json.loads(memory["summary.json"]), json.loads(file["summary.json"])

    def means(x, path=()):
        """Every ``mean`` in the summary (path -> value), the rest of it with the means taken out."""
        if isinstance(x, dict):
            found = {}
            for k, v in list(x.items()):
                if k == "mean" and isinstance(v, float):
                    found[path] = x.pop(k)
                else:
                    found.update(means(v, (*path, k)))
            return found
        return {}

    ma, mb = means(a), means(b)
    assert a == b                                              # everything but the means: identical
    assert ma.keys() == mb.keys() and len(ma) >= 5
    for k in ma:
        assert math.isclose(ma[k], mb[k], rel_tol=1e-12), k


@pytest.mark.parametrize("args", [["--scheduler", "sarathi", "--qps", "8"],
                                  ["--scheduler", "sarathi", "--qps", "6", "--prefill-replicas", "1",
                                   "--decode-replicas", "1"]], ids=["sarathi", "disaggregated"])
def test_the_helper_process_and_the_row_cache_change_no_output_byte(tmp_path, monkeypatch, args):
    # a long run's ways (deadline accounting in a helper process, in batches; rows through a few cached blocks),
    # forced on a short run: every file the same as without them
    from simulator import recorder

    monkeypatch.setattr(request_rows, "IN_MEMORY_ROWS", 64)
    runs = {}
    for name, offload_from, cache_rows in (("plain", 1 << 30, 1 << 20), ("helper", 0, 16)):
        monkeypatch.setattr(recorder, "OFFLOAD_REQUESTS", offload_from)
        monkeypatch.setattr(recorder, "_OFFLOAD_TOKENS", 2000)
        monkeypatch.setattr(request_rows, "CACHE_ROWS", cache_rows)
        monkeypatch.setattr(request_rows, "CACHED_BLOCKS", 2)
        out = tmp_path / name
        done = CliRunner().invoke(main, ["simulate", *args, "--num-requests", "300", "--out", str(out)])
        assert done.exit_code == 0, done.output
        runs[name] = _files(out)
    assert runs["plain"] == runs["helper"]


def test_a_long_runs_requests_table_is_written_while_it_is_measured(tmp_path, monkeypatch):
    # rows in a file and a streamed output folder: simulate writes the requests table (another thread, beside the
    # summary), and write() leaves it; to another folder write() writes it again, the same bytes
    from simulator.simulation import Outputs, SimResult, simulate

    monkeypatch.setattr(request_rows, "IN_MEMORY_ROWS", 64)
    result = simulate(num_requests=300, qps=8, keep_requests=False, outputs=Outputs(tmp_path / "run", "csv", False))
    assert result.requests_written == tmp_path / "run" / "requests.csv" and result.requests_written.exists()
    written = SimResult._write_requests
    calls = []
    monkeypatch.setattr(SimResult, "_write_requests", lambda self, path, fmt: calls.append(path) or
                        written(self, path, fmt))
    result.write()
    assert calls == []
    result.write(tmp_path / "again")
    assert calls == [tmp_path / "again" / "requests.csv"]
    assert (tmp_path / "again" / "requests.csv").read_bytes() == result.requests_written.read_bytes()
