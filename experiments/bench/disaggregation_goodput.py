"""Benchmark: does prefill/decode disaggregation pay? Goodput per GPU of colocated and disaggregated deployments
under a TTFT + TPOT SLO (DistServe, Zhong et al., OSDI'24: goodput = the highest rate at which 90% of requests meet
both; ``--slo distserve`` checks P90 TTFT and P90 TPOT), on the same GPUs and workload.

Deployments of ``--gpus`` GPUs (default 2) of Mistral-7B on A100-80GB (one GPU per replica):

- colocated vLLM v1 (``vllm``) and Sarathi-Serve (budget 512) replicas behind round-robin;
- disaggregated: ``P`` prefill + ``D`` decode replicas for every split of the GPUs (vLLM v1 in both pools), KV
  transferred over the node's link.

Prints the capacity (QPS) and QPS per GPU of each, best of the disaggregated splits marked.

    python experiments/bench/disaggregation_goodput.py [--gpus 2] [--ttft-slo 1.0] [--tpot-slo 0.04]
        [--trace sharegpt] [--num-requests 1024] [--node dgx-a100]
"""
from __future__ import annotations

import argparse
import time

from simulator import SimConfig
from simulator.capacity import find_capacity
from simulator.slo import make_slo


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tpot-slo", type=float, default=0.04)
    ap.add_argument("--trace", default="sharegpt")
    ap.add_argument("--num-requests", type=int, default=1024, help="requests per GPU in each trial")
    ap.add_argument("--node", default="dgx-a100")
    args = ap.parse_args()
    slo = make_slo("distserve", ttft_slo_s=args.ttft_slo, tpot_slo_s=args.tpot_slo)
    n = args.num_requests * args.gpus
    base = SimConfig(model="Mistral-7B", node=args.node, trace=args.trace, num_requests=n, qps=1.0 * args.gpus)
    deployments = {
        f"colocated vllm x{args.gpus}": base.with_(scheduler="vllm", replicas=args.gpus),
        f"colocated sarathi-512 x{args.gpus}": base.with_(scheduler="sarathi", replicas=args.gpus),
    }
    for p in range(1, args.gpus):
        deployments[f"disaggregated {p}P+{args.gpus - p}D vllm"] = base.with_(
            scheduler="vllm", prefill_replicas=p, decode_replicas=args.gpus - p)
    print(f"Mistral-7B on {args.gpus} GPUs of {args.node}, {args.trace}, {n} requests per trial; SLO: {slo.describe()}")
    print(f"{'deployment':<34} {'capacity QPS':>12} {'QPS/GPU':>8} {'trials':>7} {'s':>6}")
    for name, config in deployments.items():
        start = time.perf_counter()
        result = find_capacity(config, slo)
        wall = time.perf_counter() - start
        print(f"{name:<34} {result.capacity_qps:>12.4g} {result.capacity_qps / args.gpus:>8.4g} "
              f"{len(result.trials):>7d} {wall:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
