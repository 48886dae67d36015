"""Hand-computed schedules of vLLM v1 (``vllm``, vLLM 0.32) and Sarathi-Serve's chunked-prefills-only ablation
(``simple-chunking``), issue 9. Every iteration costs 1 s (``unit_cost``); KV blocks hold 4 tokens, no watermark.
Plans are written as ``{request_id: num_new_tokens}``.
"""
from __future__ import annotations

from simulator.kv_cache import BlockManager
from simulator.schedulers import SarathiScheduler, SimpleChunkingScheduler, VLLMScheduler


def steps(out):
    return [dict(zip(p.request_ids, p.num_new_tokens)) for p in out.plans]


def test_vllm_running_first_then_waiting_under_one_token_budget(make_requests, replay):
    # budget 8. t=0: r0 (prompt 10) gets a chunk of 8 (budget 0), r1 waits.
    # t=1: running r0 first: its last 2 prompt tokens (budget 6); then waiting r1's whole prompt (5).
    #      Both prompts complete: first tokens at t=2.
    # t=2: both decode; both finish at t=3. No prefill or decode phase: a step mixes whatever catches up.
    sched = VLLMScheduler(BlockManager(100, block_size=4, watermark=0.0), max_model_len=64, max_num_seqs=4,
                          max_num_batched_tokens=8)
    reqs = make_requests((0, 10, 2), (0, 5, 2))
    out = replay(sched, reqs)
    assert steps(out) == [{0: 8}, {0: 2, 1: 5}, {0: 1, 1: 1}]
    assert [p.context_lens for p in out.plans] == [(0,), (8, 0), (10, 5)]
    assert out.token_times() == {0: [2, 3], 1: [2, 3]}


def test_vllm_preempts_from_the_tail_and_admits_nothing_in_that_step(make_requests, replay):
    # 4 blocks of 4 tokens, budget 16.
    # t=0: r0 (8 tokens, 2 blocks), r1 (4, 1 block), r2 (4, 1 block) all admitted: cache full. First tokens at
    #      t=1; r2 (1 output) finishes and frees its block.
    # t=1: r0's decode needs a 3rd block: takes the free one. r1's decode needs a 2nd block, none free: preempt
    #      the last running request -- r1 itself -- and stop scheduling running requests (``new_blocks is None:
    #      break``). Nothing waiting is admitted in a step that preempted. Step {r0: 1}, preempted (1,).
    # t=2: r0 decodes within its 3 blocks; r1 (5 tokens to recompute, 2 blocks) waits: 1 block free.
    # t=3: r0 finished at t=3 and freed 3 blocks; r1 recomputes prompt + its output (5) -> 2nd token at t=4.
    # t=4: r1 decodes -> 3rd token at t=5.
    sched = VLLMScheduler(BlockManager(4, block_size=4, watermark=0.0), max_model_len=64, max_num_seqs=8,
                          max_num_batched_tokens=16)
    reqs = make_requests((0, 8, 3), (0, 4, 3), (0, 4, 1))
    out = replay(sched, reqs)
    assert steps(out) == [{0: 8, 1: 4, 2: 4}, {0: 1}, {0: 1}, {1: 5}, {1: 1}]
    assert [p.preempted_ids for p in out.plans] == [(), (1,), (), (), ()]
    assert out.kv_used == [4, 3, 3, 2, 2]
    assert out.token_times() == {0: [1, 2, 3], 1: [1, 4, 5], 2: [1]}
    assert sched.num_preemptions == 1 and reqs[1].num_preemptions == 1


def test_vllm_admits_only_when_the_whole_prompt_fits(make_requests, replay):
    # 4 blocks of 4 tokens, budget 4 (chunks of 4).
    # t=0: r0 (prompt 8): the whole prompt fits (2 blocks) -> chunk 4. t=1: its next 4 -> first token at 2.
    # t=2: r0's decode takes a 3rd block (1 free). r1 (prompt 12) would fit a 3-token chunk in that block, but
    #      its whole prompt needs 3 blocks: refused (scheduler_reserve_full_isl=True, vLLM 0.32's default).
    # t=3: r0 finished, 4 free: r1 in chunks of 4 at t=3, 4, 5 -> its token at 6.
    reqs = make_requests((0, 8, 2), (0, 12, 1))
    sched = VLLMScheduler(BlockManager(4, block_size=4, watermark=0.0), max_model_len=64, max_num_seqs=8,
                          max_num_batched_tokens=4)
    out = replay(sched, reqs)
    assert steps(out) == [{0: 4}, {0: 4}, {0: 1}, {1: 4}, {1: 4}, {1: 4}]
    assert out.token_times() == {0: [2, 3], 1: [6]}
    # without the full-prompt reservation the first chunk is admitted into the last free block at t=2
    reqs = make_requests((0, 8, 2), (0, 12, 1))
    sched = VLLMScheduler(BlockManager(4, block_size=4, watermark=0.0), max_model_len=64, max_num_seqs=8,
                          max_num_batched_tokens=4, scheduler_reserve_full_isl=False)
    out = replay(sched, reqs)
    assert steps(out)[2] == {0: 1, 1: 3}


def test_vllm_max_num_seqs_caps_admission_not_running_requests(make_requests, replay):
    # max_num_seqs 2: r2 waits until one of r0, r1 finishes (t=2), although budget and blocks are free.
    sched = VLLMScheduler(BlockManager(100, block_size=4, watermark=0.0), max_model_len=64, max_num_seqs=2,
                          max_num_batched_tokens=64)
    reqs = make_requests((0, 4, 2), (0, 4, 1), (0, 4, 1))
    out = replay(sched, reqs)
    assert steps(out) == [{0: 4, 1: 4}, {0: 1, 2: 4}]
    assert out.token_times() == {0: [1, 2], 1: [1], 2: [2]}


def test_simple_chunking_alternates_prefill_and_decode_turns(make_requests, replay):
    # chunk 4. t=0 prefill turn: r0 (prompt 6) chunk 4. t=1 decode turn: nothing decodes, so the prefill turn runs
    # at once: r0's last 2 (partial prefills only; r1 waits) -> r0's first token at 2. t=2 decode turn: r0.
    # t=3 prefill turn: r1's prompt (2) -> first token at 4. t=4 decode turn: r0 and r1 -> both finish at 5.
    sched = SimpleChunkingScheduler(BlockManager(100, block_size=4, watermark=0.0), max_model_len=64, token_budget=4)
    reqs = make_requests((0, 6, 3), (0, 2, 2))
    out = replay(sched, reqs)
    assert steps(out) == [{0: 4}, {0: 2}, {0: 1}, {1: 2}, {0: 1, 1: 1}]
    assert [p.kind for p in out.plans] == ["prefill", "prefill", "decode", "prefill", "decode"]
    assert out.token_times() == {0: [2, 3, 5], 1: [4, 5]}
    # Sarathi-Serve on the same input piggybacks decodes and new prompts onto one budget: done at 4, not 5
    sched = SarathiScheduler(BlockManager(100, block_size=4, watermark=0.0), max_model_len=64, token_budget=4)
    reqs = make_requests((0, 6, 3), (0, 2, 2))
    out = replay(sched, reqs)
    assert steps(out) == [{0: 4}, {0: 2, 1: 2}, {0: 1, 1: 1}, {0: 1}]
    assert out.token_times() == {0: [2, 3, 4], 1: [2, 3]}
