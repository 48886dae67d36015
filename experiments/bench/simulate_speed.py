"""Benchmark: how fast the simulator replays the default run (Mistral-7B, A100, sharegpt 2048 requests at 2 QPS).

Prints simulated requests per second and iterations per second of wall time, per scheduler (best of --repeat runs).

    python experiments/bench/simulate_speed.py [--schedulers sarathi,vllm] [--num-requests 2048] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

from simulator import SimConfig, simulate
from simulator.simulation import load_requests


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedulers", default="sarathi,vllm,orca,fastertransformer")
    ap.add_argument("--num-requests", type=int, default=2048)
    ap.add_argument("--qps", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'scheduler':<18} {'wall s':>8} {'requests/s':>11} {'iterations':>11} {'iterations/s':>13}")
    for name in args.schedulers.split(","):
        config = SimConfig(scheduler=name, num_requests=args.num_requests, qps=args.qps)
        requests = load_requests(config)
        best = None
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = simulate(config, requests=requests)
            wall = time.perf_counter() - start
            best = wall if best is None else min(best, wall)
        n_iter = result.summary["num_iterations"]
        print(f"{name:<18} {best:>8.2f} {len(requests) / best:>11.0f} {n_iter:>11d} {n_iter / best:>13.0f}")


if __name__ == "__main__":
    main()
