"""Benchmark: wall time of one capacity search on one core (Mistral-7B, A100, sharegpt, 2048 requests per trial).

Runs ``find_capacity`` per scheduler in this process (one core) and prints the capacity, the number of trials,
how many ended early, and the wall seconds of the whole search; then the Sarathi-Serve / vLLM capacity ratio
(the Sarathi-Serve paper, OSDI'24 §5, reports 2.6x for this setting under the strict SLO).

    python experiments/bench/capacity_speed.py [--schedulers vllm,orca,sarathi] [--slo-level strict]
                                               [--num-requests 2048] [--no-early-stop]
"""
from __future__ import annotations

import argparse
import time

from simulator import SimConfig
from simulator.capacity import find_capacity
from simulator.slo import make_slo


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedulers", default="vllm,orca,sarathi")
    ap.add_argument("--token-budget", type=int, default=512)
    ap.add_argument("--slo-level", default="strict", choices=["strict", "relaxed"])
    ap.add_argument("--trace", default="sharegpt")
    ap.add_argument("--num-requests", type=int, default=2048)
    ap.add_argument("--no-early-stop", action="store_true")
    args = ap.parse_args()
    slo = make_slo("sarathi", model="Mistral-7B", level=args.slo_level)
    print(f"Mistral-7B, A100-80GB-SXM, {args.trace}, {args.num_requests} requests, SLO: {slo.describe()}, "
          f"early stop {'off' if args.no_early_stop else 'on'}")
    print(f"{'scheduler':<14} {'capacity QPS':>12} {'trials':>7} {'early':>6} {'search s':>9} {'s/trial':>8}")
    capacities = {}
    for name in args.schedulers.split(","):
        config = SimConfig(model="Mistral-7B", device="A100-80GB-SXM", scheduler=name, trace=args.trace,
                           num_requests=args.num_requests, token_budget=args.token_budget,
                           max_model_len=16384 if args.trace == "arxiv" else None)
        start = time.perf_counter()
        result = find_capacity(config, slo, early_stop=not args.no_early_stop)
        wall = time.perf_counter() - start
        capacities[name] = result.capacity_qps
        label = f"{name} {args.token_budget}" if name == "sarathi" else name
        early = sum(t.stopped_early for t in result.trials)
        print(f"{label:<14} {result.capacity_qps:>12.4g} {len(result.trials):>7d} {early:>6d} {wall:>9.1f} "
              f"{wall / len(result.trials):>8.2f}")
    if capacities.get("vllm") and "sarathi" in capacities:
        paper = " (paper: 2.6x)" if args.slo_level == "strict" and args.trace == "sharegpt" else ""
        print(f"Sarathi-Serve / vLLM capacity: {capacities['sarathi'] / capacities['vllm']:.2f}x{paper}")


if __name__ == "__main__":
    main()
