"""Invariants of every scheduling policy over random small traces (hypothesis), on one replica or a cluster of 3,
with 1, 2 or 4 pipeline stages.

Each example draws a handful of requests (random prompt/output lengths and arrivals), a tiny KV cache (random
block count and watermark), limits (max_model_len, batch size, token budget, max_num_batched_tokens), a cost
model (``ConstantCostModel`` split over ``pp`` stages with a transfer between them) and a number of replicas behind
round-robin routing, replays them and checks, independently of the scheduler's own bookkeeping:

- every non-rejected request completes, with exactly ``output_tokens`` strictly increasing token times (each output
  token produced once), and those times are exactly the ends of the micro-batches that completed its prompt (or
  recomputation) and its decodes — as re-derived here from the plans alone (``context_len`` must equal the tokens
  computed so far);
- no request is in two in-flight micro-batches, and a preempted request is never in flight;
- a request is rejected when it cannot fit ``max_model_len`` or the KV cache, and never when it fits the cache less
  the admission watermark (vLLM v0 may also reject prompt + output - 1 > ``max_num_batched_tokens``, which it could
  not re-prefill after a preemption); rejected requests are counted and never scheduled, and the run returns (no
  livelock);
- KV blocks are never over capacity, every scheduled request holds blocks for its context + new tokens, the block
  manager's bookkeeping is consistent, and all blocks are freed at the end;
- admission is FCFS per replica (first-scheduled times follow arrival order);
- per policy: Sarathi-Serve iterations fit the token budget and never leave a decode out; vLLM v1 steps fit
  ``max_num_batched_tokens``; vLLM v0 never mixes prefill and decode, prefills full prompts within
  ``max_num_batched_tokens`` and decodes every running request that is not in flight; simple-chunking never mixes
  prefill and decode and keeps prefills within its chunk size; Orca and FasterTransformer never preempt;
  FasterTransformer prefills only when nothing else runs.
"""
from __future__ import annotations

import pytest
import simpy
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from cost_models.base import ConstantCostModel
from simulator.cluster import Cluster, Pool
from simulator.kv_cache import BlockManager
from simulator.replica import IterationLog, Replica
from simulator.request import Request
from simulator.routers import ROUTERS
from simulator.schedulers import SCHEDULERS

POLICIES = sorted(SCHEDULERS)
SHAPES = [(1, 1), (2, 1), (4, 1), (1, 3), (2, 3)]      # (pp, replicas)


def blocks(tokens, block_size):
    return -(-tokens // block_size)


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 8))
    gaps = draw(st.lists(st.sampled_from([0, 0, 0, 1, 2, 4, 8]), min_size=n, max_size=n))   # quarter seconds
    arrivals, t = [], 0.0
    for g in gaps:
        t += g / 4
        arrivals.append(t)
    prompts = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    outputs = draw(st.lists(st.integers(1, 14), min_size=n, max_size=n))
    block_size = draw(st.sampled_from([4, 16]))
    peaks = [blocks(p + o - 1, block_size) for p, o in zip(prompts, outputs)]
    if draw(st.booleans()):     # under memory pressure: every request fits alone, not all together
        num_blocks = draw(st.integers(max(peaks) + 1, max(max(peaks) + 1, sum(peaks))))
    else:
        num_blocks = draw(st.integers(1, 24))
    return {
        "requests": list(zip(arrivals, prompts, outputs)),
        "block_size": block_size,
        "num_blocks": num_blocks,
        "watermark": draw(st.sampled_from([0.0, 0.01, 0.1, 0.25])),
        "max_model_len": draw(st.one_of(st.integers(2, 80), st.just(80), st.just(80))),
        "max_batch": draw(st.integers(1, 6)),
        "token_budget": draw(st.integers(1, 48)),
        "max_num_batched_tokens": draw(st.one_of(st.none(), st.integers(1, 160))),
        "fixed_s": draw(st.sampled_from([0.25, 1.0])),
        "per_token_s": draw(st.sampled_from([0.0, 0.01])),
        "transfer_s": draw(st.sampled_from([0.0, 0.05])),
    }


def build(policy, w):
    bm = BlockManager(w["num_blocks"], block_size=w["block_size"], watermark=w["watermark"])
    cls = SCHEDULERS[policy]
    kw = {"max_model_len": w["max_model_len"], "max_num_seqs": w["max_batch"]}
    if "token_budget" in cls.options:
        kw["token_budget"] = w["token_budget"]
    if policy in ("vllm", "vllm-v0"):
        kw["max_num_batched_tokens"] = w["max_num_batched_tokens"] or (w["max_model_len"] if policy == "vllm-v0"
                                                                       else 48)
    try:
        return cls(bm, **kw)
    except ValueError as exc:           # Orca/FT: max_model_len reservation larger than the cache
        assert policy in ("orca", "fastertransformer") and "max_model_len" in str(exc)
        reject()


def run(policy, w, pp, num_replicas, on_iteration=None, record_plans=False, state=None):
    """Replay the workload on ``num_replicas`` replicas of ``pp`` stages; return (requests, schedulers, log).
    ``state`` (a dict) receives the schedulers and the log before the run, for ``on_iteration``."""
    schedulers = [build(policy, w) for _ in range(num_replicas)]
    env = simpy.Environment()
    log = IterationLog(plans=[] if record_plans else None)
    if state is not None:
        state.update(schedulers=schedulers, log=log)
    cost = ConstantCostModel(fixed_s=w["fixed_s"], per_token_s=w["per_token_s"], pp=pp, transfer_s=w["transfer_s"])
    cluster = Cluster(env, {}, log)
    replicas = [Replica(env, s, cost, replica_id=i, log=log, on_done=cluster.on_done,
                        on_iteration=(lambda plan, start, d, i=i: on_iteration(i, plan, start, d))
                        if on_iteration else None)
                for i, s in enumerate(schedulers)]
    cluster.pools["replicas"] = Pool("replicas", replicas, ROUTERS["round-robin"])
    reqs = [Request(i, a, p, o) for i, (a, p, o) in enumerate(w["requests"])]
    cluster.run(reqs)
    return reqs, schedulers, log


@pytest.mark.parametrize("pp, num_replicas", SHAPES)
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(w=workloads())
def test_scheduler_invariants(policy, pp, num_replicas, w):
    build(policy, w)                      # reject configurations a policy refuses up front
    by_id = {i: spec for i, spec in enumerate(w["requests"])}
    usable = w["num_blocks"] - int(w["watermark"] * w["num_blocks"])
    mnbt = w["max_num_batched_tokens"] or w["max_model_len"]

    computed = {i: 0 for i in by_id}      # tokens in the KV cache, re-derived from the plans
    generated = {i: 0 for i in by_id}
    expected_times = {i: [] for i in by_id}
    in_flight: dict[int, float] = {}      # request id -> end of its micro-batch
    replicas_of: dict[int, int] = {}
    preempted_total = 0
    state = {}

    def on_iteration(replica, plan, start_s, duration_s):
        nonlocal preempted_total
        sched, bm = state["schedulers"][replica], state["schedulers"][replica].kv
        formed_s = state["log"].scheduled_s[-1]          # when the replica formed this micro-batch
        end = start_s + duration_s
        # micro-batches that ended by now; one ending within 1e-9 s of it (``end`` here is start + duration, the
        # engine's own end may round the other way) may or may not have been applied before this one was formed
        near = {r for r, e in in_flight.items() if abs(e - formed_s) <= 1e-9}
        for rid in [r for r, e in in_flight.items() if e <= formed_s + 1e-9]:
            del in_flight[rid]
        assert duration_s > 0
        assert 0 <= bm.num_used <= bm.num_blocks and bm.num_free >= 0
        bm.check()
        ids = plan.request_ids
        assert len(set(ids)) == len(ids), "a request appears twice in one micro-batch"
        assert not (set(ids) & set(in_flight)), "a request in two in-flight micro-batches"
        assert all(n >= 1 for n in plan.num_new_tokens)
        for rid in plan.preempted_ids:      # may be re-admitted in the same step, from scratch
            assert rid not in in_flight, "preempted an in-flight request"
            computed[rid] = 0
            preempted_total += 1
        running_ids = {r.request_id for r in sched.running}
        assert set(ids) <= running_ids
        for i, (rid, new, ctx) in enumerate(plan.entries()):
            replicas_of.setdefault(rid, replica)
            assert replicas_of[rid] == replica
            prompt = by_id[rid][1]
            known = prompt + generated[rid]
            assert ctx == computed[rid]
            assert bm.held(rid) * w["block_size"] >= ctx + new, "computing tokens the KV cache does not hold"
            if i < plan.num_decodes:
                assert new == 1 and ctx == known - 1
            else:
                assert ctx + new <= known
        # --- per policy ---
        idle_before = running_ids - set(in_flight)       # running and not in flight when this plan was formed
        surely_idle = idle_before - near
        if policy == "vllm-v0":
            assert plan.kind in ("prefill", "decode")
            if plan.kind == "prefill":
                assert all(c == 0 for c in plan.context_lens)
                assert all(n == by_id[rid][1] + generated[rid] for rid, n in zip(ids, plan.num_new_tokens))
                assert plan.num_prefill_tokens <= mnbt
            else:
                assert surely_idle <= set(ids) <= idle_before, "vLLM v0 decodes every running request"
            assert len(running_ids) <= w["max_batch"]
        elif policy == "vllm":
            assert plan.num_tokens <= (w["max_num_batched_tokens"] or 48)
            assert len(running_ids) <= w["max_batch"]
        elif policy == "simple-chunking":
            assert plan.kind in ("prefill", "decode")
            if plan.kind == "prefill":
                assert plan.num_prefill_tokens <= w["token_budget"]
            assert len(running_ids) <= w["max_batch"]
        elif policy == "sarathi":
            assert plan.num_tokens <= w["token_budget"]
            decoding = {r.request_id for r in sched.running if r.is_decoding and not r.in_flight}
            assert not decoding, "an ongoing decode was left out (generation stall)"
            assert len(running_ids) <= w["max_batch"]
        else:   # orca, fastertransformer
            assert plan.preempted_ids == ()
            assert len(running_ids) <= w["max_batch"]
            for rid, n, c in zip(ids[plan.num_decodes:], plan.num_new_tokens[plan.num_decodes:],
                                 plan.context_lens[plan.num_decodes:]):
                assert c == 0 and n == by_id[rid][1]                              # full prompts, never chunked
            assert all(bm.held(rid) == blocks(w["max_model_len"], w["block_size"]) for rid in running_ids)
            if policy == "orca":
                decoding = {r.request_id for r in sched.running if r.is_decoding and not r.in_flight}
                assert not decoding
            else:
                assert plan.kind in ("prefill", "decode")
                # decode-only of the whole batch, or a prefill of new prompts when nothing else runs
                assert surely_idle <= set(ids) <= idle_before, \
                    "FasterTransformer admitted prompts while others decode"

        for rid, new, ctx in plan.entries():
            in_flight[rid] = end
            computed[rid] += new
            if computed[rid] == by_id[rid][1] + generated[rid]:
                generated[rid] += 1
                expected_times[rid].append(end)


    reqs, schedulers, log = run(policy, w, pp, num_replicas, on_iteration=on_iteration, state=state)

    rejected = {r.request_id for s in schedulers for r in s.rejected}
    for r in reqs:
        total = r.prompt_tokens + r.output_tokens
        must_reject = total > w["max_model_len"] or blocks(total - 1, w["block_size"]) > w["num_blocks"]
        may_reject = (must_reject or blocks(total - 1, w["block_size"]) > usable
                      or (policy == "vllm-v0" and total - 1 > mnbt))
        if must_reject:
            assert r.request_id in rejected
        if not may_reject:
            assert r.request_id not in rejected, f"request {r.request_id} fits but was rejected: {r.rejected}"
        if r.request_id in rejected:
            assert r.rejected and r.scheduled_s is None and len(r.token_times_s) == 0
            assert r.request_id not in replicas_of
        else:
            assert r.completion_s is not None, "a request that fits never completed"
            assert len(r.token_times_s) == r.output_tokens
            assert all(a < b for a, b in zip(r.token_times_s, r.token_times_s[1:]))
            assert list(r.token_times_s) == pytest.approx(expected_times[r.request_id], abs=1e-9)
            assert r.arrival_s <= r.scheduled_s < r.first_token_s == r.token_times_s[0]
            assert r.completion_s == r.token_times_s[-1]
    for s in schedulers:
        assert not s.waiting and not s.running and not s.requests
        assert s.kv.num_used == 0, "KV blocks leaked"
        s.kv.check()

    num_preemptions = sum(s.num_preemptions for s in schedulers)
    event(f"preempted: {num_preemptions > 0}, rejected: {bool(rejected)}, "
          f"completed: {len(reqs) - len(rejected) > 0}")
    assert num_preemptions == preempted_total == sum(r.num_preemptions for r in reqs)
    if policy in ("orca", "fastertransformer"):
        assert num_preemptions == 0

    for replica in range(num_replicas):
        served = sorted((r for r in reqs if replicas_of.get(r.request_id) == replica),
                        key=lambda r: (r.arrival_s, r.request_id))
        assert all(a.scheduled_s <= b.scheduled_s for a, b in zip(served, served[1:])), "admission is not FCFS"


@pytest.mark.parametrize("pp, num_replicas", [(1, 1), (2, 3)])
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(w=workloads())
def test_same_input_gives_the_same_schedule(policy, pp, num_replicas, w):
    build(policy, w)

    def once():
        reqs, _, log = run(policy, w, pp, num_replicas, record_plans=True)
        return log.plans, log.columns(replica_ids=True), [r.token_times_s for r in reqs]

    assert once() == once()
