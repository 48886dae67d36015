"""Stretches with admissions (simulator.fast_forward_admissions): under load they cover almost every step, and what
they leave — requests, queues, KV blocks, rows, TBT samples, and a run stopped inside one — is the step-by-step
engine's, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from cost_models.base import ConstantCostModel
from cost_models.plan import BatchPlan
from cost_models.roofline import RooflineCostModel
from cost_models.specs import load_device, load_model
from simulator.config import SimConfig
from simulator.recorder import Recorder
from simulator.simulation import build, load_requests, run_deployment, simulate


@pytest.mark.parametrize("cm", [RooflineCostModel(load_model("Mistral-7B"), load_device("A100-80GB-SXM")),
                                RooflineCostModel(load_model("Yi-34B"), load_device("A100-80GB-PCIe"), tp=2),
                                ConstantCostModel(fixed_s=0.01, per_token_s=1e-4, per_context_token_s=3e-7)])
def test_several_chunks_and_runs_of_decodes_are_priced_as_their_plans(cm):
    rng = np.random.default_rng(3)
    for _ in range(80):
        ctx = rng.integers(0, 6000, rng.integers(0, 120)).tolist()
        k = int(rng.integers(2, 5))
        chunks = rng.integers(1, 700, k).tolist()
        cached = rng.integers(0, 3000, k).tolist()
        plan = BatchPlan.from_entries([(i, 1, c) for i, c in enumerate(ctx)] +
                                      [(1000 + i, n, c) for i, (n, c) in enumerate(zip(chunks, cached))],
                                      num_decodes=len(ctx))
        got = cm.chunks_step_time(len(ctx), sum(ctx), max(ctx, default=-1), tuple(chunks), tuple(cached))
        assert got == cm.iteration_time(plan)
    for _ in range(20):                  # runs of decode-only steps: every context one token longer each step
        ctx = rng.integers(0, 6000, rng.integers(1, 200)).tolist()
        n = int(rng.integers(1, 40))
        plans = [BatchPlan.decodes([c + k for c in ctx]) for k in range(n)]
        assert cm.decode_step_times(len(ctx), sum(ctx), n) == [cm.iteration_time(p) for p in plans]
    for _ in range(30):                  # runs of steps of one chunk beside the decodes: the chunk moves on each step
        ctx = rng.integers(0, 6000, rng.integers(0, 100)).tolist()
        n, chunk, cached = int(rng.integers(1, 12)), int(rng.integers(1, 700)), int(rng.integers(0, 5000))
        plans = [BatchPlan.from_entries([(i, 1, c + k) for i, c in enumerate(ctx)] +
                                        [(1000, chunk, cached + k * chunk)], num_decodes=len(ctx)) for k in range(n)]
        got = cm.chunk_step_times(len(ctx), sum(ctx), n, chunk, cached)
        assert got == [cm.iteration_time(p) for p in plans]


def test_runs_priced_with_one_roofline_term_match_each_step_near_the_ridge():
    """Where one attention term is the larger at every shape (``_decode_memory_bound``, chunks from
    ``_chunk_compute_bound_from`` tokens) a run forms only it; runs of every shape near those bounds, and on a
    compute-poor CPU roofline where neither holds, are still each step's price."""
    cms = (RooflineCostModel(load_model("Mistral-7B"), load_device("A100-80GB-SXM")),
           RooflineCostModel(load_model("Mistral-7B"), load_device("cpu")),
           RooflineCostModel(load_model("Yi-34B"), load_device("A100-80GB-PCIe"), tp=2))
    assert [cm._decode_memory_bound for cm in cms] == [True, False, True]
    for cm in cms:
        rng = np.random.default_rng(11)
        edge = cm._chunk_compute_bound_from
        for _ in range(200):
            d = int(rng.integers(1, 300))
            ctx_sum = int(rng.integers(0, 40 * d)) if rng.random() < 0.5 else int(rng.integers(0, 4000 * d))
            n = int(rng.integers(1, 200))
            assert cm.decode_step_times(d, ctx_sum, n) == [cm.step_time(d, ctx_sum + k * d, -1) for k in range(n)]
            chunk = int(rng.integers(max(1, edge - 3), edge + 3)) if rng.random() < 0.5 else int(rng.integers(1, 600))
            cached, d, n = int(rng.integers(0, 6000)), int(rng.integers(0, 60)), int(rng.integers(1, 60))
            got = cm.chunk_step_times(d, ctx_sum, n, chunk, cached)
            assert got == [cm.step_time(d, ctx_sum + k * d, -1, chunk, cached + k * chunk) for k in range(n)]
        for T, B in zip(rng.integers(1, 9000, 50).tolist(), rng.integers(1, 300, 50).tolist()):
            # (the once-per-iteration terms, cached by parts, are the sums of the operators' seconds)
            assert cm._fixed_terms(T, B) == (sum(cm._first_stage_ops(T, B).values()),
                                             sum(cm._last_stage_ops(B).values()))
        # at the bound itself the chunk's compute term is the larger from k = 0
        q, kv, dt = cm.q, cm.kv, cm.dt
        a = 4 * q * edge * (0 + (edge + 1) / 2) / cm._prefill_compute
        b = (2 * edge * q + edge * 2 * kv) * dt / cm._prefill_bandwidth
        assert a > b


def _count(monkeypatch):
    import simulator.replica as replica

    steps = {"admitting": 0, "other": 0}
    admitting, stretch = replica.apply_admitting, replica.apply_stretch

    def spy_admitting(rep, s):
        steps["admitting"] += s["K"]
        return admitting(rep, s)

    def spy_stretch(rep, plan, s):
        steps["other"] += s["K"]
        return stretch(rep, plan, s)

    monkeypatch.setattr(replica, "apply_admitting", spy_admitting)
    monkeypatch.setattr(replica, "apply_stretch", spy_stretch)
    return steps


@pytest.mark.parametrize("scheduler", ["sarathi", "vllm", "orca"])
@pytest.mark.parametrize("kw", [dict(qps=50.0, num_requests=1500),                         # overloaded
                                dict(qps=20.0, num_requests=800, num_kv_blocks=1500),      # KV-bound, preempting
                                dict(qps=8.0, num_requests=600, token_budget=128,          # prompts of many chunks
                                     max_num_batched_tokens=256),
                                dict(qps=30.0, num_requests=600, replicas=2)])             # a router: no arrivals
def test_loaded_runs_are_fast_forwarded_with_admissions_and_identical(monkeypatch, scheduler, kw):
    if scheduler != "vllm":
        kw = {k: v for k, v in kw.items() if k != "max_num_batched_tokens"}
    steps = _count(monkeypatch)
    on = simulate(fast_forward=True, scheduler=scheduler, **kw)
    monkeypatch.undo()
    off = simulate(fast_forward=False, scheduler=scheduler, **kw)
    assert on.summary == off.summary
    assert on.log.columns(replica_ids=True) == off.log.columns(replica_ids=True)
    assert [r.token_times_s for r in on.requests] == [r.token_times_s for r in off.requests]
    for k, v in on.request_columns().items():
        assert np.array_equal(v, off.request_columns()[k], equal_nan=True), k
    if "replicas" not in kw:
        # a stretch starts at any step, a preemption's too (vLLM's preempted requests are admitted again inside
        # it); Sarathi-Serve re-admits one into the middle of its running order, which is left to single steps
        share = 0.85 if scheduler == "sarathi" and "num_kv_blocks" in kw else 0.99
        assert steps["admitting"] > share * on.summary["num_iterations"], steps
    if scheduler == "vllm" and "num_kv_blocks" in kw:
        assert on.summary["num_preemptions"] > 50


def test_completions_are_reported_at_once_only_where_nothing_else_can_see_them(monkeypatch):
    """A lone open-loop replica whose completions only go to the recorder reports a stretch's completions as it is
    applied and moves the clock once; a caller's callback (it may read the clock or stop the run) or a router
    keeps the clock at each completion. The numbers are the same."""
    from simulator.replica import Replica

    flags = []
    stretch = Replica._stretch

    def spy(self, plan, first_s):
        flags.append(self.completions_at_once)
        return (yield from stretch(self, plan, first_s))

    monkeypatch.setattr(Replica, "_stretch", spy)
    at_once = simulate(qps=8.0, num_requests=300)
    assert flags and all(flags)
    flags.clear()
    seen = []
    stepwise = simulate(qps=8.0, num_requests=300, on_finish=seen.extend)
    assert flags and not any(flags) and len(seen) == 300
    assert at_once.summary == stepwise.summary
    assert [r.token_times_s for r in at_once.requests] == [r.token_times_s for r in stepwise.requests]
    flags.clear()
    simulate(qps=8.0, num_requests=300, replicas=2)
    assert flags and not any(flags)
    flags.clear()                        # a progress bar alone neither reads the clock nor stops the run
    with_bar = simulate(qps=8.0, num_requests=300, progress=True)
    assert flags and all(flags) and with_bar.summary == stepwise.summary
    flags.clear()
    simulate(qps=8.0, num_requests=300, progress=True, on_finish=seen.extend)
    assert flags and not any(flags)


def test_arrivals_a_stretch_took_ahead_need_no_event_and_move_the_clock_as_theirs_would(monkeypatch):
    """A lone replica's stretch takes the arrivals it admitted ahead as it is applied (``Cluster._take_admitted``);
    the arrivals process runs no event for them but moves its clock as their events would (each lands at
    ``now + (t - now)``), so a later arrival that wakes an idle replica lands on the same float: every number is
    the step-by-step engine's, also where no single delay lands there and the skipped events are replayed."""
    import simpy

    import simulator.cluster as cluster

    events = [0]
    step = simpy.Environment.step

    def counted(env):
        events[0] += 1
        return step(env)

    kw = dict(qps=0.5, num_requests=300)         # idle gaps: arrivals wake the replica
    off = simulate(fast_forward=False, **kw)
    monkeypatch.setattr(simpy.Environment, "step", counted)
    on = simulate(fast_forward=True, **kw)
    assert events[0] < 300, events                # (not one event per arrival)
    monkeypatch.setattr(cluster, "exact_delay", lambda now, end: None)
    replayed = simulate(fast_forward=True, **kw)
    for run in (on, replayed):
        assert run.summary == off.summary
        assert run.log.columns() == off.log.columns()
        assert [r.token_times_s for r in run.requests] == [r.token_times_s for r in off.requests]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("scheduler", ["sarathi", "vllm", "orca"])
@pytest.mark.parametrize("where,at", [("iteration", 7), ("iteration", 150), ("iteration", 901), ("iteration", 2000),
                                      ("completion", 3), ("completion", 150), ("completion", 420)])
def test_a_run_stopped_inside_a_stretch_reports_what_the_steps_measured(scheduler, where, at):
    # the capacity search stops a trial from a hook (at a step's launch) or a completion callback: a stretch cut
    # there must leave every request as the step-by-step engine had it (tokens, first token, completion, scheduled)
    cols = {}
    for ff in (True, False):
        config = SimConfig().with_(scheduler=scheduler, qps=40.0, num_requests=600, fast_forward=ff)
        dep = build(config)
        requests = load_requests(config, dep.model)
        count = [0]

        def tick(*_):
            count[0] += 1
            if count[0] == at:
                raise _Stop

        tick.reads_plan = False
        recorder = Recorder(len(requests), on_finish=tick if where == "completion" else None)
        with pytest.raises(_Stop):
            run_deployment(dep, requests, recorder=recorder, on_iteration=tick if where == "iteration" else None)
        recorder.close(requests)
        cols[ff] = (recorder.cols, [list(r.token_times_s) for r in requests],
                    [(r.scheduled_s, r.first_token_s, r.completion_s, r.num_generated) for r in requests],
                    recorder.num_gap_pairs)
    (a, ta, fa, ga), (b, tb, fb, gb) = cols[True], cols[False]
    assert ta == tb and fa == fb and ga == gb
    for k, v in a.items():
        assert np.array_equal(v, b[k], equal_nan=True), k


def test_runs_step_their_memory_terms_as_floats_only_where_those_are_exact():
    """A run steps the decodes' memory term ``(ctx x 2kv + d x 2q) x dt`` as a float64 (``_integral_terms``) only
    while it is a whole number below 2**53; runs that end just below, cross or start past that bound, and a model
    whose terms are not whole numbers, are each step's price all the same."""
    cm = RooflineCostModel(load_model("Mistral-7B"), load_device("A100-80GB-SXM"))
    assert cm._integral_terms and cm._decode_memory_bound
    for d, n in ((1, 5), (7, 40), (64, 3)):
        # the largest context sum whose run's last term is below 2**53, then ones whose runs cross or pass it
        below = int((2 ** 53 / cm.dt - d * 2 * cm.q) // (2 * cm.kv)) - n * d - 1
        assert ((below + n * d) * 2 * cm.kv + d * 2 * cm.q) * cm.dt < 2 ** 53
        for ctx_sum in (below, below + n * d // 2 + 1, below + 10 * n * d, 2 ** 60):
            assert cm.decode_step_times(d, ctx_sum, n) == [cm.step_time(d, ctx_sum + k * d, -1) for k in range(n)]
            chunk = cm._chunk_compute_bound_from + 10
            assert cm.chunk_step_times(d, ctx_sum, n, chunk, 100) == \
                [cm.step_time(d, ctx_sum + k * d, -1, chunk, 100 + k * chunk) for k in range(n)]
    odd = RooflineCostModel(load_model("Mistral-7B"), load_device("A100-80GB-SXM"))
    odd.q = odd.q + 0.5                          # (a hidden size that is not a whole number: the general path)
    odd._decode_consts = (odd.q, *odd._decode_consts[1:])
    odd._integral_terms = float(odd.q).is_integer()
    assert not odd._integral_terms
    assert odd.decode_step_times(9, 5000, 30) == [odd.step_time(9, 5000 + k * 9, -1) for k in range(30)]
