"""Clusters (issue 8): replicas behind a router on one clock, and prefill/decode disaggregation with KV transfers.

Hand-computed cases use ``ConstantCostModel(fixed_s=1)`` (every iteration 1 s) and the tiny model, whose KV cache
takes 2048 bytes per token (2 x 2 KV heads x 64 x 2 layers x 4 bytes).
"""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from cost_models.base import ConstantCostModel
from cost_models.specs import load_model
from simulator.cli import main
from simulator.request import Request
from simulator.routers import ROUTERS, ReplicaLoad
from simulator.simulation import simulate

KV_BYTES = 2048        # tiny: bytes of KV cache per token


def test_tiny_kv_bytes_per_token():
    assert load_model("tiny").kv_bytes_per_token(1, 1) == KV_BYTES


def _disaggregated(reqs, **kw):
    return simulate(model="tiny", device="cpu", requests=reqs, prefill_replicas=1, decode_replicas=1,
                    kv_transfer_bandwidth=100.0 * KV_BYTES, kv_transfer_latency=0.25,
                    cost_model=ConstantCostModel(fixed_s=1.0), record_plans=True, **kw)


def test_disaggregated_two_requests_by_hand():
    # Link: 100 tokens of KV per second, 0.25 s latency.
    # r0 (prompt 100, 3 outputs) arrives at 0: prefill [0, 1] on replica 0 -> first token at 1 (TTFT 1 s, prefill
    #   included). KV of 100 tokens: 0.25 latency + 1 s -> at the decode replica at 2.25; decode [2.25, 3.25].
    # r1 (prompt 50, 2 outputs) arrives at 0.5: waits for the prefill replica, prefill [1, 2] -> first token at 2.
    #   KV: 2.25 + 0.5 s (r0's transfer ended at 2.25, so the link is its own) -> at 2.75; the decode replica is
    #   busy until 3.25, so r1 waits 0.5 s and decodes beside r0 in [3.25, 4.25].
    res = _disaggregated([Request(0, 0.0, 100, 3), Request(1, 0.5, 50, 2)])
    rows = [(rid, p.request_ids, p.num_new_tokens, p.context_lens, start)
            for rid, p, start in zip(res.log.replica_id, res.log.plans, res.log.start_s)]
    assert rows == [
        (0, (0,), (100,), (0,), 0.0),
        (0, (1,), (50,), (0,), 1.0),
        (1, (0,), (1,), (100,), 2.25),
        (1, (0, 1), (1, 1), (101, 50), 3.25),
    ]
    r0, r1 = res.requests
    assert list(r0.token_times_s) == [1.0, 3.25, 4.25] and list(r1.token_times_s) == [2.0, 4.25]
    assert (r0.kv_transfer_s, r1.kv_transfer_s) == (pytest.approx(1.25), pytest.approx(0.75))
    assert (r0.replica_id, r0.decode_replica_id) == (0, 1)
    for r in res.requests:      # the first decode never starts before the prefill's end + the KV transfer
        assert r.decode_scheduled_s >= r.first_token_s + r.kv_transfer_s - 1e-12
    table = res.requests_table().set_index("request_id")
    assert table["ttft_s"].tolist() == [1.0, 1.5]
    assert table["decode_queue_s"].tolist() == pytest.approx([0.0, 0.5])
    assert table["decode_replica_id"].tolist() == [1, 1]
    s = res.summary
    assert s["requests_completed"] == 2 and s["gpus"] == 2
    assert s["pools"]["prefill"]["gpus"] == 1 and s["pools"]["decode"]["num_replicas"] == 1
    assert s["kv_transfer_s"]["max"] == pytest.approx(1.25)


def test_concurrent_kv_transfers_share_the_link():
    # Both prompts prefill together in [0, 1]; both transfers start at 1.25 and share 100 tokens/s:
    # r1 (50 tokens) gets 50 tokens/s and ends at 2.25; r0 then has 50 tokens left at 100/s -> 2.75.
    res = _disaggregated([Request(0, 0.0, 100, 2), Request(1, 0.0, 50, 2)])
    r0, r1 = res.requests
    assert r0.first_token_s == r1.first_token_s == 1.0
    assert r1.kv_transfer_s == pytest.approx(1.25) and r0.kv_transfer_s == pytest.approx(1.75)
    # decode replica: r1 in [2.25, 3.25]; r0's KV arrives at 2.75 and waits for it: [3.25, 4.25]
    assert list(r1.token_times_s) == pytest.approx([1.0, 3.25]) and list(r0.token_times_s) == pytest.approx([1.0, 4.25])


def test_a_disaggregated_run_completes_every_request():
    res = simulate(prefill_replicas=1, decode_replicas=1, num_requests=200, qps=1.0)
    s = res.summary
    assert s["requests_completed"] == 200 and s["requests_rejected"] == 0
    table = res.requests_table()
    assert (table["decode_replica_id"] == 1).all() and (table["replica_id"] == 0).all()
    multi = table[table["output_tokens"] > 1]
    assert (multi["kv_transfer_s"] > 0).all()
    # TTFT is the prefill pool's first token; the second token waits for the transfer
    assert (table["ttft_s"] > 0).all()
    assert s["pools"]["prefill"]["busy_fraction_mean"] > 0 and s["pools"]["decode"]["busy_fraction_mean"] > 0


def test_four_replicas_round_robin_at_four_times_the_rate_match_one_replica():
    # Round-robin deals every 4th request of a Poisson stream to a replica, so each replica sees Erlang-4
    # inter-arrival times (coefficient of variation 1/2): one replica fed gamma arrivals with cv 0.5 at 2 QPS is the
    # same queue. Against plain Poisson at 2 QPS the queueing part (TTFT) is lower, the decode part identical.
    erlang = simulate(num_requests=2048, qps=2.0, arrival="gamma", cv=0.5).summary
    poisson = simulate(num_requests=2048, qps=2.0).summary
    four = simulate(num_requests=8192, qps=8.0, replicas=4).summary
    assert four["gpus"] == 4 and len(four["replicas"]) == 4
    for metric in ("ttft_s", "tbt_s", "e2e_s", "scheduling_delay_s"):
        for q in ("p50", "p90", "p99"):
            assert four[metric][q] == pytest.approx(erlang[metric][q], rel=0.1, abs=0.005), (metric, q)
    for q in ("p50", "p90", "p99"):
        assert four["tbt_s"][q] == pytest.approx(poisson["tbt_s"][q], rel=0.05)
        assert four["e2e_s"][q] == pytest.approx(poisson["e2e_s"][q], rel=0.1)
    assert four["ttft_s"]["p90"] < poisson["ttft_s"]["p90"]
    served = [r["num_iterations"] for r in four["replicas"]]
    assert max(served) / min(served) < 1.2


def _heavy_tailed(n=800, qps=18.0, seed=1):
    rng = np.random.default_rng(seed)
    prompts = np.minimum((rng.pareto(1.1, n) + 1) * 300, 7000).astype(int)
    outputs = rng.integers(20, 200, n)
    arrivals = np.cumsum(rng.exponential(1 / qps, n))
    return [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]


def test_least_tokens_beats_round_robin_on_a_heavy_tailed_trace_at_high_load():
    reqs = _heavy_tailed()
    p99 = {router: simulate(replicas=4, router=router, requests=reqs).summary["ttft_s"]["p99"]
           for router in ("round-robin", "least-tokens")}
    assert p99["least-tokens"] < p99["round-robin"]


class _Sched:
    def __init__(self, n, free=10, tokens=()):
        self.requests = {i: Request(i, 0.0, p, 5) for i, p in enumerate(tokens or [1] * n)}

        class KV:
            prefix_caching = False
            num_free = free
            num_blocks = 100
        self.kv = KV()


def test_routers_choose_by_their_own_measure_ties_to_the_lowest_index():
    loads = [ReplicaLoad(0, _Sched(3, free=5, tokens=[10, 10, 10])),
             ReplicaLoad(1, _Sched(1, free=50, tokens=[500])),
             ReplicaLoad(2, _Sched(2, free=5, tokens=[1, 1]))]
    r = Request(99, 0.0, 10, 10)
    assert [ROUTERS["round-robin"](r, loads, seq) for seq in range(4)] == [0, 1, 2, 0]
    assert ROUTERS["least-outstanding"](r, loads, 0) == 1          # 1 request
    assert ROUTERS["least-tokens"](r, loads, 0) == 2               # 2 x (1 + 5) tokens left
    assert ROUTERS["kv-aware"](r, loads, 0) == 1                   # 50 free blocks
    assert ROUTERS["prefix-affinity"](r, loads, 0) == 2            # no cache anywhere: fewest tokens left


# --- bad input ----------------------------------------------------------------------------------------------

def _error(*args):
    out = CliRunner().invoke(main, ["simulate", "--out", "/tmp/servesim-never", *map(str, args)])
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.output, out.output
    return lines[0]


def test_bad_cluster_input_is_a_one_line_error():
    assert "pp" in _error("--pp", 3)                                          # 32 layers
    assert "--tp 16" in _error("--tp", 16, "--model", "Llama-2-70B")          # the default node: 8 GPUs, no network
    line = _error("--prefill-replicas", 2, "--decode-replicas", 3, "--node", "dgx-a100", "--num-nodes", 1,
                  "--tp", 2)
    assert "prefill_replicas, decode_replicas" in line and "10 GPUs" in line
    assert "--router" in _error("--router", "fastest")
    assert "decode_replicas" in _error("--prefill-replicas", 1)


def test_closed_loop_concurrency_by_hand():
    # 8 clients, random workload of exactly 1024 + 128 tokens, every step costs 10 ms and vLLM's 16384-token budget
    # takes all 8 prompts at once: step 1 prefills the 8 prompts (first tokens at 10 ms), 127 decode steps follow,
    # all 8 finish at 1.28 s and their clients send the next 8 at once. Steady state: 8 requests per 1.28 s.
    res = simulate(concurrency=8, trace="random", input_len=1024, output_len=128, num_requests=64, scheduler="vllm",
                   max_num_batched_tokens=16384, cost_model=ConstantCostModel(fixed_s=0.01))
    s = res.summary
    assert s["requests_completed"] == 64 and s["num_iterations"] == 8 * 128
    assert s["throughput_requests_per_s"] == pytest.approx(8 / 1.28)
    assert s["output_throughput_tokens_per_s"] == pytest.approx(8 / 0.01)
    assert s["ttft_s"]["max"] == pytest.approx(0.01) and s["ttft_s"]["p50"] == pytest.approx(0.01)
    assert s["makespan_s"] == pytest.approx(8 * 1.28)
    arrivals = sorted(r.arrival_s for r in res.requests)
    assert arrivals[:8] == [0.0] * 8 and arrivals[8:16] == pytest.approx([1.28] * 8)
    # never more than 8 requests in the system
    table = res.requests_table()
    for t in np.linspace(0, 10, 41):
        inside = ((table["arrival_s"] <= t) & (table["completion_s"] > t)).sum()
        assert inside <= 8


def test_random_workload_options_need_the_random_trace():
    from simulator.config import ConfigError, SimConfig

    with pytest.raises(ConfigError, match="input_len: only for --trace random"):
        SimConfig(trace="sharegpt", input_len=100)


def test_next_arrival_is_the_first_at_or_after_t_of_those_not_arrived(monkeypatch):
    # the window of arrival times the fast-forward asks (read again past its end, or behind the position) answers
    # as a search of the whole stream does, ties with t included
    import math
    from types import SimpleNamespace

    from simulator import cluster

    monkeypatch.setattr(cluster, "ARRIVAL_WINDOW", 7)
    rng = np.random.default_rng(4)
    arrivals = np.sort(np.round(rng.uniform(0, 100, 300), 1))          # (repeated times)
    c = SimpleNamespace(next_arrival_s=-1.0, _window=[], _window_lo=0, _window_t=math.inf, _pos=0,
                        _arrival_s=arrivals, _num=len(arrivals))
    t = 0.0
    for _ in range(3000):
        c._pos = min(len(arrivals), c._pos + int(rng.integers(0, 2)))
        c.next_arrival_s = float(arrivals[c._pos]) if c._pos < len(arrivals) and rng.random() < 0.3 else -1.0
        if rng.random() < 0.05:                                         # mostly later, sometimes anywhere
            t = float(rng.choice(arrivals)) if rng.random() < 0.3 else float(rng.uniform(0, 105))
        else:
            t = min(105.0, t + float(rng.exponential(0.2)))
        later = arrivals[c._pos:][arrivals[c._pos:] >= t]
        want = c.next_arrival_s if c.next_arrival_s >= t else (float(later[0]) if len(later) else math.inf)
        assert cluster.Cluster._next_arrival_from(c, t) == want
