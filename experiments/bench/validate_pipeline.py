"""Benchmark: profile -> fit -> validate of the tiny model on this CPU through the CLI (issue 4's CI goal: under
three minutes, median absolute percentage error of iteration time under 15%).

Prints the wall time of each step and of the pipeline, then the median and P95 absolute percentage error of the
validated iterations, overall and per batch kind (prefill-only, decode-only, mixed). ``--roofline`` skips profile
and fit and validates the roofline model instead (the CPU device spec's figures are order-of-magnitude only).

    python experiments/bench/validate_pipeline.py [--out runs/bench_validate] [--num-requests 200] [--qps 0.5]
        [--max-model-len N] [--max-iterations 120] [--cpu-clock thread] [--roofline]

The defaults are the README's CPU pipeline: with 200 requests at 0.5 QPS the tiny model is idle often enough that
the sample has 40 prefill-only iterations (100 requests held 35 in earlier runs, but 17 in one), so it has at least
20 of each kind (issue 10).

On the defaults the requests reach the tiny model's max_model_len (4096), which the quick profile covers;
iterations priced beyond the profile (none expected) are reported apart as 'extrapolated'.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(step: str, args: list) -> float:
    """Run ``servesim <step> <args>``, echo its output, return its wall seconds; exit on failure."""
    exe = shutil.which("servesim") or str(Path(sys.executable).with_name("servesim"))
    start = time.perf_counter()
    done = subprocess.run([exe, step, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    sys.stdout.write(done.stdout)
    if done.returncode:
        sys.exit(f"servesim {step} failed ({done.returncode}): {done.stderr.strip()}")
    return wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_validate", help="working folder (replaced)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--qps", type=float, default=0.5)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's (tiny: 4096)")
    ap.add_argument("--max-iterations", type=int, default=120)
    ap.add_argument("--cpu-clock", choices=["thread", "wall"], default="thread")
    ap.add_argument("--roofline", action="store_true", help="validate the roofline model (no profile, no fit)")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    walls = {}
    validate = ["--model", "tiny", "--device", "cpu", "--exec-device", "cpu", "--num-requests", args.num_requests,
                "--qps", args.qps, "--max-iterations", args.max_iterations,
                "--cpu-clock", args.cpu_clock, "--out", out / "validate"]
    if args.max_model_len:
        validate += ["--max-model-len", args.max_model_len]
    if not args.roofline:
        walls["profile"] = run("profile", ["--model", "tiny", "--exec-device", "cpu", "--quick", "--out", out / "profile"])
        walls["fit"] = run("fit", [out / "profile", "--out", out / "model"])
        validate += ["--cost-model", out / "model"]
    walls["validate"] = run("validate", validate)
    summary = json.loads((out / "validate" / "validation_summary.json").read_text())
    print()
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items())
          + f"; pipeline {sum(walls.values()):.1f} s")
    print(f"{'batch kind':<15} {'iterations':>10} {'median |err|':>13} {'P95 |err|':>10}")
    for kind, s in summary["errors"].items():
        print(f"{kind:<15} {s['iterations']:>10} {s['median_abs_error_pct']:>12.1f}% {s['p95_abs_error_pct']:>9.1f}%")
    drift = (summary.get("machine_speed") or {}).get("drift_pct")
    if drift is not None:
        print(f"machine speed while validating against profiling: {drift:+.1f}% (a reference GEMM's time)")


if __name__ == "__main__":
    main()
