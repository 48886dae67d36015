"""The executor computes what a batch plan says: real KV lengths, chunking-invariant prefills, mixed batches."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="the executor needs torch (the 'profile' extra)")

from cost_models.specs import load_model  # noqa: E402
from profiler.executor import (Executor, ExecutorMemoryError, PlanStateError, SlotKVCache, Timing,  # noqa: E402
                               activation_bytes, check_fits, time_call)
from simulator.validate import last_iterations  # noqa: E402
from simulator.kv_cache import activation_reserve_bytes, kv_bytes_per_block  # noqa: E402
from cost_models.plan import BatchPlan  # noqa: E402
from simulator.request import Request  # noqa: E402
from simulator.simulation import simulate  # noqa: E402

TINY = load_model("tiny")


@pytest.fixture(scope="module")
def executor():
    return Executor(TINY, "cpu", num_slots=8, capacity=256, threads=1, seed=0)


def prefill(rid, n, ctx=0):
    return BatchPlan((rid,), (n,), (ctx,), 0)


def small_device(tmp_path, *, kv_blocks: int, peak_tokens: int, max_seqs: int = 128):
    """A device spec whose memory leaves exactly ``kv_blocks`` KV blocks for the tiny model (forces preemption)."""
    need = (TINY.weight_bytes() + activation_reserve_bytes(TINY, peak_tokens, max_seqs)
            + kv_blocks * kv_bytes_per_block(TINY))
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({"name": "small-cpu", "memory_bytes": math.ceil(need / 0.9) + 64,
                                    "peak_flops": {"float16": 2e10, "float32": 1e11},
                                    "memory_bandwidth_bytes_per_s": 2e10}))
    return str(path)


@pytest.mark.parametrize("scheduler,budget,peak", [("sarathi", 64, 64), ("vllm-v0", 512, 4096)])
def test_kv_lengths_follow_the_simulated_context_lengths(tmp_path, scheduler, budget, peak):
    """Replay every plan of a small simulation for real: before each iteration the executor's KV length of every
    scheduled request is the plan's context_len (what the simulator says is cached), after it context + new tokens;
    preempted requests restart from an empty cache; decodes sit in the first slots; at the end every slot is back."""
    rng = np.random.default_rng(0)
    requests = [Request(i, 0.01 * i, int(rng.integers(20, 120)), int(rng.integers(5, 40))) for i in range(10)]
    device = small_device(tmp_path, kv_blocks=24, peak_tokens=peak)
    result = simulate(model="tiny", device=device, scheduler=scheduler, token_budget=budget, requests=requests,
                      record_plans=True)
    plans = result.log.plans
    assert result.summary["requests_completed"] == 10
    assert result.summary["num_preemptions"] >= 1, "the test should cover preemption"
    if scheduler == "sarathi":
        assert any(p.kind == "mixed" for p in plans) and any(p.num_prefills and p.context_lens[-1] for p in plans)

    ex = Executor(TINY, "cpu", num_slots=10, capacity=160, threads=1)
    last = last_iterations(plans)
    computed = {r.request_id: 0 for r in requests}          # the simulator's bookkeeping, recomputed independently
    for i, plan in enumerate(plans):
        for rid in plan.preempted_ids:
            computed[rid] = 0
        ex.prepare(plan)                                      # raises PlanStateError on any mismatch
        assert [ex.kv_len(rid) for rid in plan.request_ids] == list(plan.context_lens)
        decode_slots = sorted(ex.kv.slot_of[rid] for rid in plan.request_ids[:plan.num_decodes])
        assert decode_slots == list(range(plan.num_decodes))
        assert list(plan.context_lens) == [computed[rid] for rid in plan.request_ids]
        hidden, tokens = ex.forward(plan)
        ex.commit(plan)
        assert hidden.shape == (len(plan), TINY.hidden_size) and tokens.shape == (len(plan),)
        assert torch.isfinite(hidden).all()
        for rid, n, k in plan.entries():
            computed[rid] = k + n
            assert ex.kv_len(rid) == k + n
            if last[rid] == i:
                ex.free(rid)
    by_id = {r.request_id: r for r in result.requests}
    assert all(computed[rid] == by_id[rid].max_kv_tokens for rid in computed)
    assert ex.kv.num_free_slots == 10 and not ex.kv.lengths


def test_chunked_prefill_matches_unchunked(executor):
    whole, _ = executor.step(prefill(7, 100))
    executor.free(7)
    for n, ctx in [(30, 0), (45, 30), (25, 75)]:
        chunked, _ = executor.step(prefill(7, n, ctx))
    executor.free(7)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


def test_decode_reads_the_whole_kv(executor):
    """A decode after a 100-token prefill computes the same last hidden state as a 101-token prefill."""
    executor.step(prefill(3, 100))
    decoded, tok_a = executor.step(BatchPlan((3,), (1,), (100,), 1))
    executor.free(3)
    whole, tok_b = executor.step(prefill(3, 101))
    executor.free(3)
    torch.testing.assert_close(decoded, whole, rtol=1e-4, atol=1e-4)
    assert torch.equal(tok_a, tok_b)


def test_mixed_batch_equals_each_entry_alone(executor):
    """Decodes and prefill chunks in one forward do not see each other's keys."""
    executor.step(prefill(1, 40))
    executor.step(prefill(2, 70))
    executor.step(prefill(4, 20))
    mixed, _ = executor.step(BatchPlan((1, 2, 4, 5), (1, 1, 30, 12), (40, 70, 20, 0), 2))
    alone = []
    for rid in (1, 2, 4, 5):
        executor.free(rid)
    for plans in ([prefill(1, 41)], [prefill(2, 71)], [prefill(4, 20), prefill(4, 30, 20)], [prefill(5, 12)]):
        for p in plans:
            out, _ = executor.step(p)
        alone.append(out[0])
    for rid in (1, 2, 4, 5):
        executor.free(rid)
    torch.testing.assert_close(mixed, torch.stack(alone), rtol=1e-4, atol=1e-4)


def test_context_mismatch_is_refused_and_fill_sets_it(executor):
    executor.step(prefill(9, 10))
    with pytest.raises(PlanStateError,
                       match=r"request 9: executor holds 10 KV tokens but the plan's context_len is 40"):
        executor.prepare(BatchPlan((9,), (1,), (40,), 1))
    timing = executor.measure(BatchPlan((9, 11), (1, 5), (40, 33), 1), fill=True, warmup=0, repeats=2)
    assert timing.runs == 2 and timing.min_s > 0
    assert executor.kv_len(9) == 41 and executor.kv_len(11) == 38
    executor.step(BatchPlan((11,), (1,), (0,), 1, preempted_ids=()), fill=True)   # fill can also shrink
    assert executor.kv_len(11) == 1
    executor.step(BatchPlan((12,), (4,), (0,), 0, preempted_ids=(9, 11)))
    assert executor.kv_len(9) == 0 and executor.kv_len(11) == 0
    executor.free(12)
    assert executor.kv.num_free_slots == 8


def test_slot_cache_moves_decodes_to_the_front_with_their_kv():
    g = torch.Generator().manual_seed(0)
    cache = SlotKVCache(1, num_slots=4, capacity=8, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu",
                        generator=g)
    for rid, n in [(10, 3), (11, 5), (12, 2)]:
        cache.set_length(rid, n)
    assert cache.slot_of == {10: 0, 11: 1, 12: 2} and cache.num_free_slots == 1
    cache.free(10)
    before = {rid: cache.k[0][cache.slot_of[rid], :, :cache.length(rid)].clone() for rid in (11, 12)}
    cache.arrange([12])                     # 12 moves into the free slot 0
    assert cache.slot_of == {11: 1, 12: 0} and cache.num_free_slots == 2
    cache.arrange([12, 11])                 # already in place
    assert cache.slot_of == {11: 1, 12: 0}
    cache.set_length(13, 4)                 # lowest free slot: 2
    cache.arrange([13])                     # swaps with 12, whose values travel with it
    assert cache.slot_of == {11: 1, 12: 2, 13: 0}
    for rid in (11, 12):
        torch.testing.assert_close(cache.k[0][cache.slot_of[rid], :, :cache.length(rid)], before[rid])
    assert cache.owner == {0: 13, 1: 11, 2: 12} and sorted(cache._free) == [3]
    with pytest.raises(ExecutorMemoryError, match="request 14 needs 9 tokens, a slot holds 8"):
        cache.reserve(14, 9)
    cache.set_length(14, 1)
    with pytest.raises(ExecutorMemoryError, match="KV cache full: request 15 needs a slot, all 4 are taken"):
        cache.reserve(15, 1)


def test_memory_refusal_before_allocating():
    with pytest.raises(ExecutorMemoryError,
                       match=r"^Falcon-180B needs .* GiB on cpu \(weights .*\) but .* GiB is free"):
        Executor("falcon-180b", "cpu", num_slots=1, capacity=16)
    with pytest.raises(ExecutorMemoryError, match=r"KV cache 128\.00 GiB for 16384 requests x 4096 tokens"):
        check_fits(TINY, "cpu", num_slots=2 ** 14, capacity=4096)
    fits = check_fits(TINY, "cpu", num_slots=10, capacity=16, extra_bytes=1000)
    assert fits["kv_bytes"] == 10 * 16 * TINY.kv_bytes_per_token() and fits["activation_bytes"] == 1000


def test_activation_estimate_grows_with_the_batch():
    small = activation_bytes(TINY, [prefill(0, 16)])
    assert small >= 16 * (2 * 256 + 256 + 2 * 128 + 3 * 688) * 4 + 4 * TINY.vocab_size
    assert activation_bytes(TINY, [prefill(0, 16), prefill(0, 512, 1000)]) > small
    assert activation_bytes(TINY, []) == 0


def test_time_call_counts_runs():
    calls = []
    t = time_call(lambda: calls.append(1), "cpu", warmup=2, repeats=3)
    assert isinstance(t, Timing) and t.runs == 3 and len(calls) == 5
    assert 0 <= t.min_s <= t.median_s and t.std_s >= 0
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_call(lambda: None, "cpu", repeats=0)
    with pytest.raises(ValueError, match="cpu clock must be one of thread, wall, got 'cpu'"):
        time_call(lambda: None, "cpu", clock="cpu")


def test_thread_clock_leaves_out_time_not_running():
    """With one torch thread the CPU clock is the thread's CPU time: a 30 ms sleep costs ~0 on it, 30 ms on the wall."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        asleep = time_call(lambda: time.sleep(0.03), "cpu", warmup=0, repeats=2)
        wall = time_call(lambda: time.sleep(0.03), "cpu", warmup=0, repeats=2, clock="wall")
        assert asleep.clock == "thread" and asleep.median_s < 0.005
        assert wall.clock == "wall" and wall.median_s >= 0.03
        torch.set_num_threads(2)
        assert time_call(lambda: None, "cpu", warmup=0, repeats=1).clock == "wall"   # CPU time sums threads
    finally:
        torch.set_num_threads(threads)
