"""Benchmark: how long fitting a profile takes, and how long a fitted model takes to price one iteration.

Fits a profile (a ``servesim profile`` folder with ``--profile``, else Vidur's A100 tables for ``--model``), then
prices the plans of a real simulation (Sarathi-Serve, sharegpt, recorded with the roofline) twice — cold (empty
caches) and warm — and prints microseconds per iteration next to the roofline's.

    python experiments/bench/fit_speed.py [--vidur ../shared/data/profiles/vidur --model Llama-3-8B]
        [--profile DIR] [--num-requests 500] [--repeat 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from cost_models.fitted import FittedCostModel, load_cost_model, save_fitted
from cost_models.fitting import fit_profile
from cost_models.roofline import RooflineCostModel
from cost_models.specs import ModelSpec
from simulator import SimConfig, simulate


def per_iteration_us(cost_model, plans) -> float:
    start = time.perf_counter()
    for plan in plans:
        cost_model.iteration_time(plan)
    return (time.perf_counter() - start) / len(plans) * 1e6


def main():
    here = Path(__file__).resolve()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vidur", default=str(here.parents[3] / "shared/data/profiles/vidur"))
    ap.add_argument("--model", default="Llama-3-8B")
    ap.add_argument("--device", default="A100-80GB-SXM")
    ap.add_argument("--profile", help="a servesim profile folder (instead of Vidur tables)")
    ap.add_argument("--num-requests", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    if args.profile:
        from profiler.schema import read_meta, read_profile
        df, meta = read_profile(args.profile), read_meta(args.profile)
        model = ModelSpec(**{k: v for k, v in meta["model_spec"].items() if k in ModelSpec.__dataclass_fields__})
        device = meta.get("device_spec") or ("cpu" if meta.get("device") == "cpu" else args.device)
    else:
        from profiler.vidur import read_vidur_profile
        df, meta = read_vidur_profile(args.vidur, args.model, device=args.device)
        model, device = args.model, args.device
    start = time.perf_counter()
    fitted = fit_profile(df, meta)
    fit_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        save_fitted(fitted, tmp)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        load_cost_model(tmp, model=model, device=device)
        load_s = time.perf_counter() - start
    ops = df["operator"].value_counts()
    print(f"profile: {len(df)} rows, {len(ops)} operators ({meta.get('source', 'servesim profile')}, "
          f"{meta.get('model')})")
    print(f"fit {fit_s:.1f} s (cross-validated grid + held-out evaluation + tables), save {save_s:.2f} s, "
          f"load {load_s:.2f} s")

    config = SimConfig(model=meta.get("model") or args.model, device=device, num_requests=args.num_requests,
                       max_model_len=8192)
    plans = [p for p in simulate(config, record_plans=True).log.plans if p]
    kinds = pd.Series([p.kind for p in plans]).value_counts().to_dict()
    print(f"pricing {len(plans)} iterations of a Sarathi-Serve sharegpt run ({kinds}):")
    print(f"{'cost model':<12} {'cold us/iter':>13} {'warm us/iter':>13}")
    for name, make in (("fitted", lambda: FittedCostModel(fitted, model, device)),
                       ("roofline", lambda: RooflineCostModel(config.model, config.device))):
        cold, warm = [], []
        for _ in range(args.repeat):
            cm = make()
            cold.append(per_iteration_us(cm, plans))
            warm.append(per_iteration_us(cm, plans))
        print(f"{name:<12} {min(cold):>13.1f} {min(warm):>13.1f}")


if __name__ == "__main__":
    main()
