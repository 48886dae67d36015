"""Fast-forward of quiet decode stretches (issue 11) changes nothing: every output file of a run is byte-identical
with it on and off — for every scheduler, on one replica and clusters, with pipeline stages (not fast-forwarded,
so trivially equal), under KV pressure (the stretch stops where growth could fail), with waiting requests (it
stops at the first completion) and closed-loop load."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cost_models.base import ConstantCostModel
from simulator.cli import main
from simulator.request import Request
from simulator.schedulers import SCHEDULERS
from simulator.simulation import simulate

FILES = ("summary.json", "requests.csv", "iterations.csv", "tokens.csv")


def _trace(path: Path, n: int, seed: int, qps: float) -> Path:
    rng = np.random.default_rng(seed)
    arrivals = np.round(np.cumsum(rng.exponential(1 / qps, n)), 6)
    prompts = rng.integers(16, 1500, n)
    outputs = rng.integers(1, 300, n)
    lines = ["prompt_tokens,output_tokens,arrival_s"] + [f"{p},{o},{a}" for p, o, a in zip(prompts, outputs, arrivals)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _both(tmp_path: Path, *args) -> None:
    for ff, name in (("--fast-forward", "on"), ("--no-fast-forward", "off")):
        out = CliRunner().invoke(main, ["simulate", "--out", str(tmp_path / name), "--tokens", ff, *map(str, args)])
        assert out.exit_code == 0, out.output
    for f in FILES:
        on, off = (tmp_path / "on" / f).read_bytes(), (tmp_path / "off" / f).read_bytes()
        if f == "summary.json":          # the config records the option itself
            on = on.replace(b'"fast_forward": true', b'"fast_forward": false')
        assert on == off, f


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("shape", ["one", "kv-pressure", "cluster", "pp2", "closed-loop", "chunked"])
def test_every_output_is_identical_with_fast_forward_on_and_off(tmp_path, scheduler, shape):
    trace = _trace(tmp_path / "t.csv", 120, seed=zlib.crc32(f"{scheduler}-{shape}".encode()), qps=4.0)
    args = ["--trace", trace, "--scheduler", scheduler]
    if shape == "kv-pressure":
        args += ["--num-kv-blocks", 1200, "--max-model-len", 2048]   # requests wait; growth runs into the cache
    elif shape == "cluster":
        args += ["--replicas", 3, "--router", "least-tokens"]
    elif shape == "pp2":
        args += ["--pp", 2]
    elif shape == "closed-loop":
        args += ["--concurrency", 6]
    elif shape == "chunked":                 # prompts of many chunks: stretches with a prefill in them
        args += ["--token-budget", 96, "--qps", 8, "--retime"]
        args += ["--max-num-batched-tokens", 160] if scheduler == "vllm" else []
    _both(tmp_path, *args)


def test_fast_forward_is_used_and_counts_every_iteration(tmp_path):
    # the default workload at 2 QPS: most iterations are quiet decode stretches
    res_on = simulate(num_requests=300, fast_forward=True)
    res_off = simulate(num_requests=300, fast_forward=False)
    assert res_on.summary == res_off.summary
    assert res_on.log.columns() == res_off.log.columns()
    assert [r.token_times_s for r in res_on.requests] == [r.token_times_s for r in res_off.requests]


@pytest.mark.parametrize("scheduler,queue", [("sarathi", False), ("sarathi", True), ("vllm", False),
                                             ("vllm", True)])
def test_stretches_carry_prefill_chunks(monkeypatch, scheduler, queue):
    # the steps after an admission (the new prompt's chunks beside every decode) are fast-forwarded too, with
    # requests waiting (only while the chunks fill the budget) or not
    import simulator.replica as replica

    seen = []

    def spy(rep, plan, s):
        seen.append((s["n_pre"], s["K"]))
        return apply_stretch(rep, plan, s)

    def spy_admitting(rep, s):           # a stretch with admissions: count its steps with a prefill chunk
        seen.append((sum(1 for n in s["n_prefill"] if n), s["K"]))
        return apply_admitting(rep, s)

    apply_stretch, apply_admitting = replica.apply_stretch, replica.apply_admitting
    monkeypatch.setattr(replica, "apply_stretch", spy)
    monkeypatch.setattr(replica, "apply_admitting", spy_admitting)
    kw = dict(num_requests=300, scheduler=scheduler, qps=3.0 if queue else 1.0)
    if scheduler == "vllm":
        kw["max_num_batched_tokens"] = 512
    on = simulate(fast_forward=True, **kw)
    with_chunks = [(n_pre, k) for n_pre, k in seen if n_pre > 1]    # steps with a chunk, steps
    assert sum(n for n, _ in with_chunks) > 50 and max(k for _, k in with_chunks) > 10
    off = simulate(fast_forward=False, **kw)
    assert on.summary["ttft_s"] == off.summary["ttft_s"] and on.log.columns() == off.log.columns()
    assert [r.token_times_s for r in on.requests] == [r.token_times_s for r in off.requests]


@pytest.mark.parametrize("replicas", [1, 2])
def test_stretches_take_the_step_in_flight_at_an_arrival_on_a_lone_replica(monkeypatch, replicas):
    # one replica: nothing reads its state at an arrival, so the step in flight then is a stretch's last one and
    # the step-by-step engine runs only where a stretch cannot (Replica.spans_arrivals); with a router choosing
    # between replicas, stretches stop before it and that step runs step by step
    import simulator.replica as replica

    spans, explicit = [], []

    def spy(rep, plan, s):
        horizon = rep.horizon()
        spans.append(s["ends"][-1] > horizon > s["starts"][-1])
        return apply_stretch(rep, plan, s)

    def spy_admitting(rep, s):           # a stretch with admissions runs through the arrivals
        spans.append(s["ends"][-1] > rep.horizon())
        return apply_admitting(rep, s)

    def counted(rep, plan):
        explicit.append(1)
        return apply(rep, plan)

    apply_stretch, apply = replica.apply_stretch, replica.Replica._apply
    apply_admitting = replica.apply_admitting
    monkeypatch.setattr(replica, "apply_stretch", spy)
    monkeypatch.setattr(replica, "apply_admitting", spy_admitting)
    monkeypatch.setattr(replica.Replica, "_apply", counted)
    kw = dict(num_requests=200, qps=0.5 * replicas, replicas=replicas)
    on = simulate(fast_forward=True, **kw)
    if replicas == 1:                    # (a few stretches through all arrivals, or one per arrival)
        assert sum(spans) >= 1 and len(explicit) < 40
    else:
        assert not any(spans) and len(explicit) > 150
    monkeypatch.undo()
    off = simulate(fast_forward=False, **kw)
    assert on.summary == off.summary and on.log.columns() == off.log.columns()


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 10))
    t, reqs = 0.0, []
    for i in range(n):
        t += draw(st.sampled_from([0.0, 0.0, 0.3, 1.0, 5.0]))
        reqs.append((t, draw(st.integers(1, 50)), draw(st.integers(1, 40))))
    return {"requests": reqs, "blocks": draw(st.integers(34, 80)), "budget": draw(st.integers(4, 64)),
            "seqs": draw(st.integers(1, 8)), "replicas": draw(st.sampled_from([1, 1, 2])),
            "per_context": draw(st.sampled_from([0.0, 1e-4]))}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(w=workloads())
def test_random_small_runs_are_identical(scheduler, w):
    reqs = [Request(i, a, p, o) for i, (a, p, o) in enumerate(w["requests"])]
    cm = ConstantCostModel(fixed_s=0.01, per_token_s=1e-4, per_context_token_s=w["per_context"])
    kw = dict(model="tiny", device="cpu", scheduler=scheduler, requests=reqs, cost_model=cm,
              num_kv_blocks=w["blocks"], block_size=4, max_model_len=128, max_num_seqs=w["seqs"],
              replicas=w["replicas"], token_budget=w["budget"],
              max_num_batched_tokens={"vllm": max(w["budget"], 64), "vllm-v0": 128}.get(scheduler))
    on, off = simulate(fast_forward=True, **kw), simulate(fast_forward=False, **kw)
    assert on.summary == off.summary
    assert on.log.columns(replica_ids=True) == off.log.columns(replica_ids=True)
    assert [r.token_times_s for r in on.requests] == [r.token_times_s for r in off.requests]
    assert on.request_columns().keys() == off.request_columns().keys()
    for k, v in on.request_columns().items():
        assert np.array_equal(v, off.request_columns()[k], equal_nan=True), k


def test_capacity_search_is_identical_with_fast_forward_on_and_off(tmp_path):
    # trials stopped early (an SLO violated for certain) report the part simulated: a stretch cut by the stop
    # must leave exactly what the step-by-step engine had measured (simulator.fast_forward.rollback_stretch)
    outs = {}
    for ff in ("--fast-forward", "--no-fast-forward"):
        out = CliRunner().invoke(main, ["capacity", "--num-requests", 400, "--slo-level", "strict",
                                        "--scheduler", "sarathi", ff, "--out", str(tmp_path / ff)])
        assert out.exit_code == 0, out.output
        outs[ff] = [(tmp_path / ff / f).read_bytes() for f in ("capacity.json", "trials.csv")]
    on, off = outs["--fast-forward"], outs["--no-fast-forward"]
    assert b"stopped early" in on[0] or b'"stopped_early": true' in on[0]
    assert on[0].replace(b'"fast_forward": true', b'"fast_forward": false') == off[0]
    assert on[1] == off[1]


def test_a_stretch_crossing_a_chunk_of_streamed_rows_keeps_every_row(tmp_path, monkeypatch):
    # iteration rows stream to disk in chunks of IterationLog.CHUNK; a stretch appends many rows at once, and the
    # rows past the chunk's end must stay for the next chunk (they were dropped before this test)
    from simulator.replica import IterationLog

    monkeypatch.setattr(IterationLog, "CHUNK", 50)
    trace = _trace(tmp_path / "t.csv", 200, seed=5, qps=20.0)
    for scheduler in ("sarathi", "vllm"):
        _both(tmp_path / scheduler, "--trace", trace, "--scheduler", scheduler)
        rows = (tmp_path / scheduler / "on" / "iterations.csv").read_text().count("\n") - 1
        summary = (tmp_path / scheduler / "on" / "summary.json").read_text()
        assert f'"num_iterations": {rows},' in summary and rows > 300


def test_rows_given_as_blocks_stream_in_order_with_the_listed_ones(monkeypatch):
    """``IterationLog.append_block`` (a stretch's rows as arrays) and rows appended one by one stream to the sink
    in the order they came, in pieces of exactly ``FLUSH`` rows (a piece may cut a block), with the same
    statistics as the same rows listed."""
    import numpy as np

    from simulator.replica import IterationLog

    monkeypatch.setattr(IterationLog, "FLUSH", 7)
    monkeypatch.setattr(IterationLog, "CHUNK", 14)

    class Sink:
        def __init__(self):
            self.pieces = []

        def write(self, cols):
            self.pieces.append({k: np.asarray(v).tolist() for k, v in cols.items()})

    def rows(lo, hi):
        return {"start_s": [0.5 * i for i in range(lo, hi)], "duration_s": [0.25 + i for i in range(lo, hi)],
                "batch_size": list(range(lo, hi)), "num_prefill_tokens": [2 * i for i in range(lo, hi)],
                "num_decode_tokens": [3 * i for i in range(lo, hi)], "kv_blocks_used": [i % 5 for i in range(lo, hi)],
                "kv_blocks_total": [10] * (hi - lo), "replica_id": [0] * (hi - lo)}

    def listed(log, lo, hi):
        for k, v in rows(lo, hi).items():
            getattr(log, k).extend(v)
        log.scheduled_s.extend(rows(lo, hi)["start_s"])

    def block(log, lo, hi):
        log.append_block({k: np.asarray(v, dtype=float if k.endswith("_s") else np.int64)
                          for k, v in rows(lo, hi).items()})

    streamed, kept = IterationLog(sink=Sink()), IterationLog()
    for add, lo, hi in [(listed, 0, 3), (block, 3, 12), (listed, 12, 13), (block, 13, 30), (listed, 30, 33)]:
        add(streamed, lo, hi)
        streamed.maybe_flush()
        listed(kept, lo, hi)
        assert len(streamed) == hi
    stats = streamed.stats()
    assert [len(p["start_s"]) for p in streamed.sink.pieces] == [7, 7, 7, 7, 5]
    got = {k: sum((p[k] for p in streamed.sink.pieces), []) for k in streamed.sink.pieces[0]}
    assert got == {k: v for k, v in rows(0, 33).items() if k != "replica_id"}
    assert stats == kept.stats()
