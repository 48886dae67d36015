"""Request- and token-level metrics, as defined by Sarathi-Serve (Agrawal et al., OSDI'24 §2, §5) and vLLM's
benchmarks. All times in seconds of simulated time.

- TTFT (time to first token) = first output token time − arrival.
- Scheduling delay = time the request was first scheduled (any of its tokens in a batch) − arrival.
- TBT (time between tokens) = gap between consecutive output tokens of one request; a preempted request's gap
  includes the time it spent preempted and recomputing. Percentiles pool every gap of every request
  (Sarathi-Serve reports P99 TBT this way).
- TPOT (time per output token) = (completion − first token) / (output tokens − 1), per request; undefined for
  one-token outputs.
- E2E latency = completion − arrival; normalized latency = E2E / output tokens.
- Throughput = tokens (prompt + output) of completed requests / makespan; output throughput counts outputs only.
  Makespan = last completion − first arrival.
- KV-cache utilization = blocks used / blocks in the cache, after each iteration's allocations.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

PERCENTILES = {"p50": 50, "p90": 90, "p99": 99}

REQUEST_COLUMNS = ["request_id", "arrival_s", "prompt_tokens", "output_tokens", "scheduled_s", "first_token_s",
                   "completion_s", "ttft_s", "scheduling_delay_s", "e2e_s", "tpot_s", "num_preemptions"]
ITERATION_COLUMNS = ["start_s", "duration_s", "batch_size", "num_prefill_tokens", "num_decode_tokens",
                     "kv_blocks_used", "kv_blocks_total"]


def distribution(values) -> dict:
    """``{mean, p50, p90, p99, max}`` of ``values`` (NaNs ignored); all None when there are none."""
    a = np.asarray(values, dtype=float)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return {"mean": None, **{k: None for k in PERCENTILES}, "max": None}
    out = {"mean": float(a.mean())}
    out.update({k: float(np.percentile(a, q)) for k, q in PERCENTILES.items()})
    out["max"] = float(a.max())
    return out


def requests_table(requests) -> pd.DataFrame:
    """One row per request (completed, unfinished or rejected) with the REQUEST_COLUMNS; times NaN when unknown."""
    rows = []
    nan = float("nan")
    for r in requests:
        first = r.first_token_s if r.first_token_s is not None else nan
        done = r.completion_s if r.completion_s is not None else nan
        sched = r.scheduled_s if r.scheduled_s is not None else nan
        tpot = (done - first) / (r.output_tokens - 1) if r.output_tokens > 1 else nan
        rows.append((r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens, sched, first, done,
                     first - r.arrival_s, sched - r.arrival_s, done - r.arrival_s, tpot, r.num_preemptions))
    return pd.DataFrame.from_records(rows, columns=REQUEST_COLUMNS)


def tbt_gaps(requests) -> np.ndarray:
    """All gaps between consecutive output tokens of every request (seconds), pooled."""
    gaps = [np.diff(r.token_times_s) for r in requests if len(r.token_times_s) > 1]
    return np.concatenate(gaps) if gaps else np.zeros(0)


def summarize(requests, iterations: pd.DataFrame, *, num_rejected: int, num_preemptions: int) -> dict:
    """The summary of a run: latency distributions, counts, throughput and KV-cache utilization."""
    table = requests_table(requests)
    done = table[table["completion_s"].notna()]
    makespan = float(done["completion_s"].max() - table["arrival_s"].min()) if len(done) else 0.0
    total_tokens = int(done["prompt_tokens"].sum() + done["output_tokens"].sum())
    output_tokens = int(done["output_tokens"].sum())
    util = (iterations["kv_blocks_used"] / iterations["kv_blocks_total"]) if len(iterations) else pd.Series(dtype=float)
    return {
        "ttft_s": distribution(done["ttft_s"]),
        "tbt_s": distribution(tbt_gaps(requests)),
        "tpot_s": distribution(done["tpot_s"]),
        "e2e_s": distribution(done["e2e_s"]),
        "scheduling_delay_s": distribution(table["scheduling_delay_s"]),
        "normalized_latency_s_per_token": distribution(done["e2e_s"] / done["output_tokens"]),
        "requests_completed": int(len(done)),
        "requests_rejected": int(num_rejected),
        "num_preemptions": int(num_preemptions),
        "throughput_tokens_per_s": total_tokens / makespan if makespan > 0 else 0.0,
        "output_throughput_tokens_per_s": output_tokens / makespan if makespan > 0 else 0.0,
        "throughput_requests_per_s": len(done) / makespan if makespan > 0 else 0.0,
        "makespan_s": makespan,
        "num_iterations": int(len(iterations)),
        "kv_cache_utilization": {"mean": float(util.mean()) if len(util) else None,
                                 "max": float(util.max()) if len(util) else None},
    }
