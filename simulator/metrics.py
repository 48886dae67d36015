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
- Prefix-cache hit rate = prompt tokens served from the cache / prompt tokens, at each request's first admission.
- Busy fraction of a pipeline stage = its compute time / makespan; bubbles are the rest.
- Load: offered QPS = (N - 1) / (last arrival - first arrival); served QPS = completed / makespan. A run is
  *overloaded* when the requests in the system (arrived, not finished) keep growing over the arrivals — their mean
  over the last quarter of arrivals exceeds the mean over the second quarter by more than 3 x its square root
  (the Poisson fluctuation of a stable queue) plus 5 — or the served rate is below 80% of the offered rate: the
  queue then grows without bound and every latency depends on the trace length.
- Disaggregation: KV transfer time = KV arrival at the decode replica - first token; decode queueing = first
  decode scheduled - KV arrival.
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


def _opt(v):
    return float("nan") if v is None else v


def requests_table(requests, *, cluster: bool = False, disaggregated: bool = False,
                   prefix_caching: bool = False) -> pd.DataFrame:
    """One row per request (completed, unfinished or rejected) with the REQUEST_COLUMNS; times NaN when unknown.
    Extra columns: ``num_cached_tokens`` (prefix caching), ``replica_id`` (a cluster; the prefill replica when
    disaggregated), ``decode_replica_id``, ``kv_transfer_s`` and ``decode_queue_s`` (disaggregated)."""
    rows = []
    nan = float("nan")
    for r in requests:
        first = _opt(r.first_token_s)
        done = _opt(r.completion_s)
        sched = _opt(r.scheduled_s)
        tpot = (done - first) / (r.output_tokens - 1) if r.output_tokens > 1 else nan
        row = [r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens, sched, first, done,
               first - r.arrival_s, sched - r.arrival_s, done - r.arrival_s, tpot, r.num_preemptions]
        if prefix_caching:
            row.append(r.num_cached_tokens)
        if cluster or disaggregated:
            row.append(nan if r.replica_id is None else r.replica_id)
        if disaggregated:
            transfer = _opt(r.kv_transfer_s)
            row += [nan if r.decode_replica_id is None else r.decode_replica_id, transfer,
                    _opt(r.decode_scheduled_s) - first - transfer]
        rows.append(row)
    columns = list(REQUEST_COLUMNS)
    if prefix_caching:
        columns.append("num_cached_tokens")
    if cluster or disaggregated:
        columns.append("replica_id")
    if disaggregated:
        columns += ["decode_replica_id", "kv_transfer_s", "decode_queue_s"]
    table = pd.DataFrame.from_records(rows, columns=columns)
    for col in ("replica_id", "decode_replica_id"):
        if col in table:
            table[col] = table[col].astype("Int64")
    return table


def iteration_table(log, *, replica_ids: bool = False) -> pd.DataFrame:
    """One row per micro-batch (``replica.IterationLog.columns``)."""
    cols = log.columns(replica_ids=replica_ids)
    return pd.DataFrame(cols, columns=list(cols))


def tbt_gaps(requests) -> np.ndarray:
    """All gaps between consecutive output tokens of every request (seconds), pooled."""
    gaps = [np.diff(r.token_times_s) for r in requests if len(r.token_times_s) > 1]
    return np.concatenate(gaps) if gaps else np.zeros(0)


def load_report(table: pd.DataFrame, makespan: float) -> dict:
    """Offered vs served rate and queue growth of a run (see the module docstring); ``overloaded`` and why."""
    arrivals = np.sort(table["arrival_s"].to_numpy(dtype=float))
    n = len(arrivals)
    span = float(arrivals[-1] - arrivals[0]) if n > 1 else 0.0
    offered = (n - 1) / span if span > 0 else None
    done = np.sort(table["completion_s"].dropna().to_numpy(dtype=float))
    served = len(done) / makespan if makespan > 0 else None
    in_system = np.arange(1, n + 1) - np.searchsorted(done, arrivals, side="right")
    q = n // 4
    second = float(in_system[q:2 * q].mean()) if q else None
    last = float(in_system[3 * q:].mean()) if q else None
    reasons = []
    if second is not None and last - second > 3 * np.sqrt(second) + 5:
        reasons.append(f"requests in the system grew from {second:.1f} (second quarter of arrivals) to {last:.1f} "
                       f"(last quarter)")
    if offered and served is not None and served < 0.8 * offered:
        reasons.append(f"served {served:.3g} requests/s of {offered:.3g} offered")
    served = None if served is None else float(served)
    return {"offered_qps": offered, "served_qps": served, "in_system_second_quarter": second,
            "in_system_last_quarter": last, "overloaded": bool(reasons), "reason": "; ".join(reasons) or None}


def _replica_rows(cluster, deployment, makespan: float) -> list[dict]:
    rows = []
    for rep in cluster.replicas:
        spec = getattr(rep, "spec", None)
        sched = rep.scheduler
        row = {"replica_id": rep.replica_id, "pool": spec.pool if spec else "replicas",
               "tp": spec.tp if spec else 1, "pp": rep.pp,
               "placement": spec.placement.describe() if spec and spec.placement else None,
               "num_iterations": rep.num_iterations, "num_preemptions": sched.num_preemptions,
               "requests_rejected": len(sched.rejected), "kv_blocks_total": sched.kv.num_blocks,
               "stage_busy_s": [float(b) for b in rep.stage_busy_s],
               "stage_busy_fraction": [float(f) for f in rep.busy_fractions(makespan)]}
        if sched.kv.prefix_caching:
            row["prefix_cache_hit_rate"] = sched.kv.hit_tokens / sched.kv.queried_tokens \
                if sched.kv.queried_tokens else None
        rows.append(row)
    return rows


def summarize(requests, iterations: pd.DataFrame, *, cluster=None, deployment=None,
              num_rejected: int | None = None, num_preemptions: int | None = None) -> dict:
    """The summary of a run: latency distributions, counts, throughput, KV-cache utilization and, for a
    deployment, its GPUs, per-replica stage busy fractions, prefix-cache hit rate and per-pool sections."""
    disagg = deployment is not None and deployment.config.disaggregated
    table = requests_table(requests, disaggregated=disagg)
    done = table[table["completion_s"].notna()]
    makespan = float(done["completion_s"].max() - table["arrival_s"].min()) if len(done) else 0.0
    total_tokens = int(done["prompt_tokens"].sum() + done["output_tokens"].sum())
    output_tokens = int(done["output_tokens"].sum())
    util = (iterations["kv_blocks_used"] / iterations["kv_blocks_total"]) if len(iterations) else pd.Series(dtype=float)
    schedulers = [rep.scheduler for rep in cluster.replicas] if cluster is not None else []
    if num_rejected is None:
        num_rejected = sum(len(s.rejected) for s in schedulers)
    if num_preemptions is None:
        num_preemptions = sum(s.num_preemptions for s in schedulers)
    out = {
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
        "load": load_report(table, makespan) if len(table) else None,
    }
    rejected = [r for s in schedulers for r in s.rejected]
    if rejected:
        rejected.sort(key=lambda r: r.request_id)
        out["rejected_examples"] = [f"request {r.request_id}: {r.rejected}" for r in rejected[:5]]
    if deployment is None:
        return out
    out["gpus"] = deployment.gpus
    out["num_replicas"] = deployment.num_replicas
    out["deployment"] = deployment.describe()
    if deployment.prefix_caching:
        hit = sum(s.kv.hit_tokens for s in schedulers)
        queried = sum(s.kv.queried_tokens for s in schedulers)
        out["prefix_cache"] = {"hit_rate": hit / queried if queried else None, "hit_tokens": int(hit),
                               "prompt_tokens": int(queried),
                               "evictions": int(sum(getattr(s.kv, "num_evictions", 0) for s in schedulers))}
    out["replicas"] = _replica_rows(cluster, deployment, makespan)
    if disagg:
        pools = {}
        for name in ("prefill", "decode"):
            rows = [r for r in out["replicas"] if r["pool"] == name]
            pools[name] = {"num_replicas": len(rows), "gpus": sum(r["tp"] * r["pp"] for r in rows),
                           "busy_fraction_mean": float(np.mean([np.mean(r["stage_busy_fraction"]) for r in rows]))
                           if rows else None}
        pools["prefill"]["queueing_s"] = distribution(table["scheduling_delay_s"])
        pools["decode"]["queueing_s"] = distribution(table["decode_queue_s"])
        out["pools"] = pools
        out["kv_transfer_s"] = distribution(table["kv_transfer_s"])
    return out
