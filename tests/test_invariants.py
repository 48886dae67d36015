"""Invariants of every scheduling policy over random small traces (hypothesis).

Each example draws a handful of requests (random prompt/output lengths and arrivals), a tiny KV cache (random
block count and watermark), limits (max_model_len, batch size, token budget, max_num_batched_tokens) and a cost
model, replays them with ``run_replica`` and checks, independently of the scheduler's own bookkeeping:

- every non-rejected request completes, with exactly ``output_tokens`` strictly increasing token times, and those
  times are exactly the ends of the iterations that completed its prompt (or recomputation) and its decodes — as
  re-derived here from the plans alone (``context_len`` must equal the tokens computed so far);
- a request is rejected when it cannot fit ``max_model_len`` or the KV cache, and never when it fits the cache less
  the admission watermark (vLLM may also reject prompt + output - 1 > ``max_num_batched_tokens``, which it could
  not re-prefill after a preemption); rejected requests are counted and never scheduled, and ``run_replica``
  returns (no livelock);
- KV blocks are never over capacity, every scheduled request holds blocks for its context + new tokens, and all
  blocks are freed at the end;
- admission is FCFS (first-scheduled times follow arrival order);
- per policy: Sarathi-Serve iterations fit the token budget and never leave a decode out; vLLM never mixes prefill
  and decode, prefills full prompts within ``max_num_batched_tokens`` and decodes every running request;
  Orca and FasterTransformer never preempt; FasterTransformer prefills only when nothing else runs.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from cost_models.base import ConstantCostModel
from simulator.kv_cache import BlockManager
from simulator.replica import run_replica
from simulator.request import Request
from simulator.schedulers import SCHEDULERS

POLICIES = ["vllm", "orca", "sarathi", "fastertransformer"]


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
    }


def build(policy, w):
    bm = BlockManager(w["num_blocks"], block_size=w["block_size"], watermark=w["watermark"])
    cls = SCHEDULERS[policy]
    try:
        if policy == "vllm":
            return cls(bm, max_model_len=w["max_model_len"], max_num_seqs=w["max_batch"],
                       max_num_batched_tokens=w["max_num_batched_tokens"])
        if policy == "sarathi":
            return cls(bm, max_model_len=w["max_model_len"], max_num_seqs=w["max_batch"],
                       token_budget=w["token_budget"])
        return cls(bm, max_model_len=w["max_model_len"], max_batch_size=w["max_batch"])
    except ValueError as exc:           # Orca/FT: max_model_len reservation larger than the cache
        assert policy in ("orca", "fastertransformer") and "max_model_len" in str(exc)
        reject()


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(w=workloads())
def test_scheduler_invariants(policy, w):
    sched = build(policy, w)
    bm = sched.bm
    reqs = [Request(i, a, p, o) for i, (a, p, o) in enumerate(w["requests"])]
    by_id = {r.request_id: r for r in reqs}
    usable = w["num_blocks"] - int(w["watermark"] * w["num_blocks"])
    mnbt = w["max_num_batched_tokens"] or w["max_model_len"]

    computed = {r.request_id: 0 for r in reqs}      # tokens in the KV cache, re-derived from the plans
    generated = {r.request_id: 0 for r in reqs}
    expected_times = {r.request_id: [] for r in reqs}
    plans = []
    preempted_total = 0

    def on_iteration(plan, start_s, duration_s):
        nonlocal preempted_total
        plans.append(plan)
        assert duration_s > 0
        assert 0 <= bm.num_used <= bm.num_blocks and bm.num_free >= 0
        ids = plan.request_ids
        assert len(set(ids)) == len(ids), "a request appears twice in one iteration"
        assert all(n >= 1 for n in plan.num_new_tokens)
        for rid in plan.preempted_ids:
            assert rid not in ids
            computed[rid] = 0
            preempted_total += 1
        running_ids = {r.request_id for r in sched.running}
        assert set(ids) <= running_ids
        for i, (rid, new, ctx) in enumerate(plan.entries()):
            r = by_id[rid]
            known = r.prompt_tokens + generated[rid]
            assert ctx == computed[rid]
            assert bm.held(rid) * w["block_size"] >= ctx + new, "computing tokens the KV cache does not hold"
            if i < plan.num_decodes:
                assert new == 1 and ctx == known - 1
            else:
                assert ctx + new <= known
        # --- per policy ---
        if policy == "vllm":
            assert plan.kind in ("prefill", "decode")
            if plan.kind == "prefill":
                assert all(c == 0 for c in plan.context_lens)
                assert all(n == by_id[rid].prompt_tokens + generated[rid]
                           for rid, n in zip(ids, plan.num_new_tokens))      # full prompt (+ outputs so far)
                assert plan.num_prefill_tokens <= mnbt
            else:
                assert set(ids) == running_ids, "vLLM decodes every running request"
            assert len(running_ids) <= w["max_batch"]
        elif policy == "sarathi":
            assert plan.num_tokens <= w["token_budget"]
            decoding = {r.request_id for r in sched.running if r.is_decoding}
            assert decoding <= set(ids[:plan.num_decodes]), "an ongoing decode was left out (generation stall)"
            assert len(running_ids) <= w["max_batch"]
        else:   # orca, fastertransformer
            assert plan.preempted_ids == ()
            assert len(running_ids) <= w["max_batch"]
            for rid, n, c in zip(ids[plan.num_decodes:], plan.num_new_tokens[plan.num_decodes:],
                                 plan.context_lens[plan.num_decodes:]):
                assert c == 0 and n == by_id[rid].prompt_tokens                  # full prompts, never chunked
            assert all(bm.held(rid) == blocks(w["max_model_len"], w["block_size"]) for rid in running_ids)
            if policy == "orca":
                decoding = {r.request_id for r in sched.running if r.is_decoding}
                assert decoding <= set(ids[:plan.num_decodes])
            else:
                assert plan.kind in ("prefill", "decode")
                # decode-only of the whole batch, or a prefill of new prompts when nothing else runs
                assert set(ids) == running_ids, "FasterTransformer admitted prompts while others decode"

        end = start_s + duration_s
        for rid, new, ctx in plan.entries():
            r = by_id[rid]
            computed[rid] += new
            if computed[rid] == r.prompt_tokens + generated[rid]:
                generated[rid] += 1
                expected_times[rid].append(end)

    run_replica(reqs, sched, ConstantCostModel(fixed_s=w["fixed_s"], per_token_s=w["per_token_s"]),
                on_iteration=on_iteration)

    rejected = {r.request_id for r in sched.rejected}
    for r in reqs:
        total = r.prompt_tokens + r.output_tokens
        must_reject = total > w["max_model_len"] or blocks(total - 1, w["block_size"]) > w["num_blocks"]
        may_reject = (must_reject or blocks(total - 1, w["block_size"]) > usable
                      or (policy == "vllm" and total - 1 > mnbt))
        if must_reject:
            assert r.request_id in rejected
        if not may_reject:
            assert r.request_id not in rejected, f"request {r.request_id} fits but was rejected: {r.rejected}"
        if r.request_id in rejected:
            assert r.rejected and r.scheduled_s is None and r.token_times_s == []
            assert all(r.request_id not in p.request_ids for p in plans)
        else:
            assert r.completion_s is not None, "a request that fits never completed"
            assert len(r.token_times_s) == r.output_tokens
            assert all(a < b for a, b in zip(r.token_times_s, r.token_times_s[1:]))
            assert r.token_times_s == expected_times[r.request_id]
            assert r.arrival_s <= r.scheduled_s < r.first_token_s == r.token_times_s[0]
            assert r.completion_s == r.token_times_s[-1]
    assert len(sched.rejected) == len(rejected)
    assert not sched.waiting and not sched.running
    assert bm.num_used == 0, "KV blocks leaked"

    event(f"preempted: {sched.num_preemptions > 0}, rejected: {bool(rejected)}, "
          f"completed: {len(reqs) - len(rejected) > 0}")
    assert sched.num_preemptions == preempted_total == sum(r.num_preemptions for r in reqs)
    if policy in ("orca", "fastertransformer"):
        assert sched.num_preemptions == 0

    served = sorted((r for r in reqs if r.request_id not in rejected), key=lambda r: (r.arrival_s, r.request_id))
    assert all(a.scheduled_s <= b.scheduled_s for a, b in zip(served, served[1:])), "admission is not FCFS"


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(w=workloads())
def test_same_input_gives_the_same_schedule(policy, w):
    def once():
        sched = build(policy, w)
        reqs = [Request(i, a, p, o) for i, (a, p, o) in enumerate(w["requests"])]
        log = run_replica(reqs, sched, ConstantCostModel(fixed_s=w["fixed_s"], per_token_s=w["per_token_s"]),
                          record_plans=True)
        return log.plans, log.columns(), [r.token_times_s for r in reqs]

    assert once() == once()
