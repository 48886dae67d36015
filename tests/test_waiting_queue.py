"""A long waiting queue keeps its tail as stream positions (``simulator.waiting.WaitingQueue``): the queue reads the
same to a scheduler, every output file is the same as with every request queued as an object, and the Request
objects alive stay bounded while the queue grows."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
from click.testing import CliRunner

from simulator.cli import main
from simulator.request import Request
from simulator.simulation import simulate
from simulator.waiting import WaitingQueue


def test_the_backlog_is_made_in_order_when_reached():
    calls = []
    q = WaitingQueue(["a", "b"])

    def make_next(k):
        calls.append(k)
        made = sum(calls[:-1])
        q.extend(f"m{made + i}" for i in range(k))

    q.make_next, q.batch = make_next, 2
    q.backlog = 5
    assert len(q) == 7 and q and q.num_made == 2
    assert q[0] == "a" and calls == []               # the head does not make the backlog
    assert q[3] == "m1" and calls == [2] and len(q) == 7 and q.num_made == 4
    assert q[4] == "m2" and calls == [2, 2] and q.num_made == 6 and q.backlog == 1
    q.appendleft("preempted")
    assert [q.popleft() for _ in range(7)] == ["preempted", "a", "b", "m0", "m1", "m2", "m3"]
    assert q.popleft() == "m4" and calls == [2, 2, 1] and not q and len(q) == 0
    with pytest.raises(IndexError):
        q.popleft()
    q.backlog = 3
    assert list(q) == ["m5", "m6", "m7"] and q.backlog == 0 and calls[-1] == 3


def _files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


CASES = {
    "sarathi-overload": ["--scheduler", "sarathi", "--qps", "40", "--num-requests", "400"],
    "vllm-preempting": ["--scheduler", "vllm", "--num-kv-blocks", "700", "--qps", "30", "--num-requests", "400"],
    "orca-overload": ["--scheduler", "orca", "--qps", "40", "--num-requests", "300"],
    "vllm-v0-rejecting": ["--scheduler", "vllm-v0", "--num-kv-blocks", "120", "--qps", "30",
                          "--num-requests", "300"],
    "step-by-step": ["--scheduler", "sarathi", "--qps", "40", "--num-requests", "250", "--no-fast-forward"],
}


@pytest.mark.parametrize("case", CASES)
def test_a_backlog_changes_no_output_byte(tmp_path, monkeypatch, case):
    args = ["simulate", *CASES[case], "--tokens"]
    # short stretches, so that requests arrive into a queue as the run goes (one stretch would admit all of
    # them ahead of their arrival)
    monkeypatch.setattr("simulator.fast_forward.MAX_STEPS", 48)
    monkeypatch.setattr("simulator.fast_forward_admissions.MAX_STEPS", 48)
    monkeypatch.setattr(WaitingQueue, "backlog_after", 1 << 40)          # every request queued as an object
    ref = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    backlogs = []
    make = WaitingQueue._make

    def spy(self, n):
        backlogs.append(self.backlog)
        return make(self, n)

    monkeypatch.setattr(WaitingQueue, "backlog_after", 3)
    monkeypatch.setattr(WaitingQueue, "_make", spy)
    got = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "got")])
    assert got.exit_code == 0, got.output
    assert max(backlogs) > 20                     # the queue was long: its tail waited as positions
    assert _files(tmp_path / "got") == _files(tmp_path / "ref")
    assert got.output.replace("got", "ref") == ref.output


@pytest.mark.parametrize("backlog_after, bound", [(64, 300), (1 << 40, None)])
def test_request_objects_stay_bounded_while_the_queue_grows(monkeypatch, backlog_after, bound):
    # 3000 requests at 100 QPS: the queue reaches some 2800. Alive: the running ones (at most 128), the queued ones
    # made, and those a stretch read ahead (stretches of 64 steps here, so that the reading ahead stays short)
    monkeypatch.setattr("simulator.fast_forward.MAX_STEPS", 64)
    monkeypatch.setattr("simulator.fast_forward_admissions.MAX_STEPS", 64)
    monkeypatch.setattr(WaitingQueue, "backlog_after", backlog_after)
    alive, finished = [], [0]

    def watch(done):
        finished[0] += len(done)
        if finished[0] // 300 > len(alive):
            gc.collect()
            alive.append(sum(isinstance(o, Request) for o in gc.get_objects()))

    result = simulate(scheduler="sarathi", qps=100.0, num_requests=3000, keep_requests=False, on_finish=watch)
    assert result.summary["requests_completed"] == 3000
    if bound is not None:
        assert max(alive) < bound, alive
    else:                                # every queued request an object
        assert max(alive) > 2000, alive
