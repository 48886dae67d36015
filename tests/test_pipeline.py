"""Pipeline parallelism (issue 8): micro-batches in flight, FIFO stages, transfers between them, per-stage timing.

The hand-computed schedule uses ``ConstantCostModel(per_token_s=1, pp=2, transfer_s=0.5)``: a micro-batch of T
tokens keeps each stage busy T/2 s and its activations take 0.5 s from stage 0 to stage 1.
"""
from __future__ import annotations

import pytest

from cost_models.base import ConstantCostModel
from simulator.kv_cache import BlockManager
from simulator.replica import run_replica
from simulator.request import Request
from simulator.schedulers import SarathiScheduler
from simulator.simulation import simulate


def test_two_stages_three_requests_by_hand():
    # Sarathi, budget 4; r0 (prompt 4, 2 outputs), r1 (2, 1), r2 (6, 1), all at t=0. Up to 2 micro-batches fly;
    # the next is formed when stage 0 is free.
    # MB1 (formed 0): r0 4 tokens.          stage 0 [0, 2]   -> +0.5 -> stage 1 [2.5, 4.5]
    # MB2 (formed 2): r1 2 + r2 2 (chunk).  stage 0 [2, 4]   -> +0.5 -> stage 1 [4.5, 6.5] (waits for MB1)
    # t=4.5 MB1 done: r0's first token. MB3: r0's decode only (r2 is in flight in MB2, so it is not scheduled).
    #                                       stage 0 [4.5, 5] -> +0.5 -> 5.5, stage 1 busy until 6.5: [6.5, 7]
    # t=6.5 MB2 done: r1 finishes; r2's chunk gives no token. MB4: r2's last 4 tokens.
    #                                       stage 0 [6.5, 8.5] -> 9, stage 1 [9, 11] -> r2's token at 11
    # t=7   MB3 done: r0's second token (finished). Nothing else to schedule until 11.
    sched = SarathiScheduler(BlockManager(100, watermark=0.0), max_model_len=64, token_budget=4)
    reqs = [Request(0, 0.0, 4, 2), Request(1, 0.0, 2, 1), Request(2, 0.0, 6, 1)]
    log = run_replica(reqs, sched, ConstantCostModel(fixed_s=0.0, per_token_s=1.0, pp=2, transfer_s=0.5),
                      record_plans=True)
    assert [(p.request_ids, p.num_new_tokens, p.context_lens) for p in log.plans] == [
        ((0,), (4,), (0,)),
        ((1, 2), (2, 2), (0, 0)),
        ((0,), (1,), (4,)),
        ((2,), (4,), (2,)),
    ]
    assert log.scheduled_s == [0, 2, 4.5, 6.5]
    assert log.stage_start_s == [[0, 2, 4.5, 6.5], [2.5, 4.5, 6.5, 9]]
    assert log.stage_duration_s == [[2, 2, 0.5, 2], [2, 2, 0.5, 2]]
    assert [s + d for s, d in zip(log.start_s, log.duration_s)] == [4.5, 6.5, 7, 11]
    assert [list(r.token_times_s) for r in reqs] == [[4.5, 7], [6.5], [11]]
    cols = log.columns()
    assert {"stage0_start_s", "stage0_duration_s", "stage1_start_s", "stage1_duration_s", "scheduled_s"} <= set(cols)


def _single_request(pp, node=None, **kw):
    res = simulate(requests=[Request(0, 0.0, 512, 64)], pp=pp, node=node, **kw)
    return res


@pytest.mark.parametrize("model, device", [("Mistral-7B", "A100"), ("Llama-3-8B", "A40")])
def test_a_single_request_is_never_faster_with_more_stages(model, device):
    one = _single_request(1, model=model, device=device)
    for pp in (2, 4):
        many = _single_request(pp, model=model, device=device)
        assert many.summary["tbt_s"]["p50"] >= one.summary["tbt_s"]["p50"]
        assert many.summary["ttft_s"]["p50"] >= one.summary["ttft_s"]["p50"]
        # ... only by the activation transfers between the stages (a decode sends 1 x hidden x 2 bytes)
        cm = many.cost_model
        extra = many.summary["tbt_s"]["p50"] - one.summary["tbt_s"]["p50"]
        from cost_models.plan import BatchPlan
        transfers = sum(cm.transfer_time(BatchPlan.decodes([600]), s) for s in range(pp - 1))
        assert extra == pytest.approx(transfers, rel=0.05, abs=2e-6)


def test_pipeline_across_nodes_pays_the_network_link():
    # Falcon-180B TP4-PP2 on two 4 x A100 nodes: stage 1 is on the second node, over 100 Gbps Ethernet
    res = simulate(model="Falcon-180B", node="a100-pcie-pairwise-nvlink", tp=4, pp=2, num_requests=4, qps=0.01)
    rep = res.summary["replicas"][0]
    assert "node(s) 0,1" in rep["placement"] and "stages linked by network" in rep["placement"]
    assert "all-reduce over pcie" in rep["placement"]
    assert res.summary["gpus"] == 8
    cm = res.cost_model
    from cost_models.plan import BatchPlan
    plan = BatchPlan.decodes([1000] * 32)
    assert cm.transfer_time(plan, 0) == pytest.approx(14e-6 + 32 * 14848 * 2 / 2.35e9)


def test_pipeline_serves_more_tokens_per_second_under_decode_load_and_reports_busy_stages():
    # 256 long decodes under vLLM's 128-token step budget: one GPU runs 128 of them per step while the rest wait;
    # two stages keep two micro-batches of 128 in flight, each stage doing half the layers.
    reqs = [Request(i, 0.0, 64, 400) for i in range(256)]
    kw = dict(requests=reqs, scheduler="vllm", max_num_seqs=256, max_num_batched_tokens=128)
    one, two = simulate(pp=1, **kw), simulate(pp=2, **kw)
    assert two.summary["output_throughput_tokens_per_s"] > 1.4 * one.summary["output_throughput_tokens_per_s"]
    busy = two.summary["replicas"][0]["stage_busy_fraction"]
    # the last stage (LM head, sampling and output processing) is the bottleneck; the first idles in bubbles
    assert len(busy) == 2 and 0.5 < busy[0] < busy[1] <= 1.0 and busy[1] > 0.95
    assert one.summary["replicas"][0]["stage_busy_fraction"][0] == pytest.approx(1.0, abs=0.01)
