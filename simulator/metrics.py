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
- Load (over the N requests served; rejected ones are counted apart): offered QPS = (N - 1) / (last arrival -
  first arrival); served QPS = completed / makespan. A run is
  *overloaded* when the requests in the system (arrived, not finished) keep growing over the arrivals — their mean
  over the last quarter of arrivals exceeds the mean over the second quarter by more than 3 x its square root
  (the Poisson fluctuation of a stable queue) plus 5 — or requests complete at less than 80% of the rate they
  arrive, both measured over their middle halves: N/2 / (time from completion N/4 to completion 3N/4) against
  N/2 / (time from arrival N/4 to arrival 3N/4). The queue then grows without bound and every latency depends on
  the trace length. (The whole-run served QPS is not compared: its makespan includes the first latency and the
  drain of the last requests, which dominate short runs.)
- Disaggregation: KV transfer time = KV arrival at the decode replica - first token; decode queueing = first
  decode scheduled - KV arrival.
"""
from __future__ import annotations

import numpy as np

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


FLUIDITY_FIELDS = ["ttft_deadline_s", "deadlines", "deadline_misses", "deadline_miss_rate", "fluidity_index"]
NULLABLE_INTS = ("replica_id", "decode_replica_id", "deadlines", "deadline_misses")


def request_columns(cols: dict, *, cluster: bool = False, disaggregated: bool = False,
                    prefix_caching: bool = False, fluidity: bool = True, first_id: int = 0) -> dict:
    """The requests table as ``{column: array}`` from a recorder's per-request columns (``recorder.REQUEST_FIELDS``,
    index = request id): REQUEST_COLUMNS, then ``num_cached_tokens`` (prefix caching), ``replica_id`` (a cluster;
    the prefill replica when disaggregated), ``decode_replica_id``, ``kv_transfer_s`` and ``decode_queue_s``
    (disaggregated), then Etalon's fluidity columns (``slo.FLUIDITY_COLUMNS``): the first-token deadline,
    deadlines, misses, miss rate and fluidity index (NaN for a request without output tokens). ``first_id``: the
    id of the first row (``cols`` a block of ``Recorder.blocks``)."""
    n = len(cols["arrival_s"])
    arrival, first, done, sched = cols["arrival_s"], cols["first_token_s"], cols["completion_s"], cols["scheduled_s"]
    out = cols["output_tokens"]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (done - first) / (out - 1), np.nan)
    table = {"request_id": np.arange(first_id, first_id + n, dtype=np.int64), "arrival_s": arrival,
             "prompt_tokens": cols["prompt_tokens"].astype(np.int64), "output_tokens": out.astype(np.int64),
             "scheduled_s": sched, "first_token_s": first, "completion_s": done, "ttft_s": first - arrival,
             "scheduling_delay_s": sched - arrival, "e2e_s": done - arrival, "tpot_s": tpot,
             "num_preemptions": cols["num_preemptions"].astype(np.int64)}
    if prefix_caching:
        table["num_cached_tokens"] = cols["num_cached_tokens"].astype(np.int64)
    if cluster or disaggregated:
        table["replica_id"] = cols["replica_id"]
    if disaggregated:
        table["decode_replica_id"] = cols["decode_replica_id"]
        table["kv_transfer_s"] = cols["kv_transfer_s"]
        table["decode_queue_s"] = cols["decode_scheduled_s"] - first - cols["kv_transfer_s"]
    if fluidity:
        total, missed = cols["deadlines"], cols["deadline_misses"]
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(total > 0, missed / total, np.nan)
        table.update({"ttft_deadline_s": cols["ttft_deadline_s"], "deadlines": total, "deadline_misses": missed,
                      "deadline_miss_rate": rate, "fluidity_index": 1.0 - rate})
    return table


def recorded(requests, **recorder_kw):
    """A ``recorder.Recorder`` holding ``requests`` (finished or not), ids 0..max id."""
    from simulator.recorder import Recorder

    requests = list(requests)
    rec = Recorder(max((r.request_id for r in requests), default=-1) + 1, **recorder_kw)
    for r in requests:
        rec.record(r)
        if len(r.token_times_s) > 1:
            gaps = np.diff(r.token_times_s)
            rec.add_gap_arrays(gaps.tolist(), [1] * len(gaps))
    return rec


def requests_table(requests, *, cluster: bool = False, disaggregated: bool = False,
                   prefix_caching: bool = False):
    """One row per request (completed, unfinished or rejected) with the REQUEST_COLUMNS (and the cluster columns,
    see ``request_columns``); times NaN when unknown. Rows of the given requests only, in their order."""
    import pandas as pd

    requests = list(requests)
    cols = request_columns(recorded(requests).cols, cluster=cluster, disaggregated=disaggregated,
                           prefix_caching=prefix_caching, fluidity=False)
    ids = np.array([r.request_id for r in requests], dtype=np.int64)
    table = pd.DataFrame({k: np.asarray(v)[ids] for k, v in cols.items()})
    for col in ("replica_id", "decode_replica_id"):
        if col in table:
            table[col] = table[col].astype("Int64")
    return table


def iteration_table(log, *, replica_ids: bool = False):
    """One row per micro-batch (``replica.IterationLog.columns``), as a pandas DataFrame."""
    import pandas as pd

    cols = log.columns(replica_ids=replica_ids)
    return pd.DataFrame(cols, columns=list(cols))


def tbt_gaps(requests) -> np.ndarray:
    """All gaps between consecutive output tokens of every request (seconds), pooled."""
    gaps = [np.diff(r.token_times_s) for r in requests if len(r.token_times_s) > 1]
    return np.concatenate(gaps) if gaps else np.zeros(0)


def load_report(arrival_s, completion_s, makespan: float) -> dict:
    """Offered vs served rate and queue growth of a run (see the module docstring); ``overloaded`` and why."""
    completion_s = np.asarray(completion_s, dtype=float)
    kept = ~np.isnan(completion_s)             # the others were rejected (never fit) and are reported as such
    arrivals = np.sort(np.asarray(arrival_s, dtype=float)[kept])
    n = len(arrivals)
    span = float(arrivals[-1] - arrivals[0]) if n > 1 else 0.0
    done = np.sort(completion_s[kept])
    in_system = np.arange(1, n + 1) - np.searchsorted(done, arrivals, side="right")
    q = n // 4
    second = float(in_system[q:2 * q].mean()) if q else None
    last = float(in_system[3 * q:].mean()) if q else None
    quartiles = (float(arrivals[q]), float(arrivals[3 * q]), float(done[q]), float(done[3 * q])) if q else None
    return load_verdict(n, span, makespan, second, last, quartiles)


def load_verdict(n: int, span: float, makespan: float, second: float | None, last: float | None,
                 quartiles: tuple | None) -> dict:
    """``load_report`` from its statistics: ``n`` completed requests whose arrivals span ``span`` seconds, the mean
    requests in the system at the arrivals of the second and last quarters, and the arrival and completion times
    of ranks ``n // 4`` and ``3 n // 4`` (``(arrival q, arrival 3q, completion q, completion 3q)``, None when
    ``n < 4``)."""
    offered = (n - 1) / span if span > 0 else None
    served = n / makespan if makespan > 0 else None
    q = n // 4
    reasons = []
    if second is not None and last - second > 3 * np.sqrt(second) + 5:
        reasons.append(f"requests in the system grew from {second:.1f} (second quarter of arrivals) to {last:.1f} "
                       f"(last quarter)")
    if q and n > 3 * q:
        a_q, a_3q, d_q, d_3q = quartiles
        arrive_span, complete_span = a_3q - a_q, d_3q - d_q
        if 0 < arrive_span < 0.8 * complete_span:            # completion rate < 80% of the arrival rate
            reasons.append(f"the middle half of the requests completed at {2 * q / complete_span:.3g} requests/s, "
                           f"arriving at {2 * q / arrive_span:.3g}")
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


def summarize(recorder, log_stats: dict, *, cluster=None, deployment=None, num_rejected: int | None = None) -> dict:
    """The summary of a run (from its ``recorder.Recorder`` and ``IterationLog.stats()``): latency distributions,
    counts, throughput, KV-cache utilization, load and, for a deployment, its GPUs, per-replica stage busy
    fractions, prefix-cache hit rate and per-pool sections."""
    disagg = deployment is not None and deployment.config.disaggregated
    if not recorder.rows.in_memory:                  # a long run's rows, read back a block at a time
        from concurrent.futures import ThreadPoolExecutor

        from simulator.out_of_core import request_summary

        # (its pooled TBT sample is summarised meanwhile by another thread: numpy passes over the spilled pairs,
        # which give the GIL back, on the other core)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="servesim-tbt") as pool:
            tbt = pool.submit(recorder.tbt_distribution)
            req = request_summary(recorder, disaggregated=disagg)
            tbt = tbt.result()
    else:
        req = _request_summary(recorder, disagg)
        tbt = recorder.tbt_distribution()
    makespan = req["makespan_s"]
    completed = req["requests_completed"]
    schedulers = [rep.scheduler for rep in cluster.replicas] if cluster is not None else []
    out = {
        "ttft_s": req["ttft_s"],
        "tbt_s": tbt,
        "tpot_s": req["tpot_s"],
        "e2e_s": req["e2e_s"],
        "scheduling_delay_s": req["scheduling_delay_s"],
        "normalized_latency_s_per_token": req["normalized_latency_s_per_token"],
        "requests_completed": completed,
        "requests_rejected": int(sum(len(s.rejected) for s in schedulers) if num_rejected is None else num_rejected),
        "num_preemptions": req["num_preemptions"],
        "throughput_tokens_per_s": req["total_tokens"] / makespan if makespan > 0 else 0.0,
        "output_throughput_tokens_per_s": req["output_tokens"] / makespan if makespan > 0 else 0.0,
        "throughput_requests_per_s": completed / makespan if makespan > 0 else 0.0,
        "makespan_s": makespan,
        "num_iterations": int(log_stats["num_iterations"]),
        "kv_cache_utilization": {"mean": log_stats["kv_util_mean"], "max": log_stats["kv_util_max"]},
        "load": req["load"],
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
        pools["prefill"]["queueing_s"] = req["scheduling_delay_s"]
        pools["decode"]["queueing_s"] = req["decode_queue_s"]
        out["pools"] = pools
        out["kv_transfer_s"] = req["kv_transfer_s"]
    return out


def request_samples(t: dict, disaggregated: bool = False) -> tuple[dict, dict]:
    """What the summary reads from requests-table columns ``t`` (``request_columns``, all rows or a block): the
    latency samples ``{name: (m,) seconds}`` its distributions are of (completed requests' TTFT, TPOT, E2E latency
    and E2E per output token; every request's scheduling delay; when disaggregated, decode queueing and KV
    transfer) and the counts it sums (``requests_completed``, ``num_preemptions``, ``total_tokens``,
    ``output_tokens``)."""
    done = ~np.isnan(t["completion_s"])
    out = t["output_tokens"][done]
    e2e = t["e2e_s"][done]
    samples = {"ttft_s": t["ttft_s"][done], "tpot_s": t["tpot_s"][done], "e2e_s": e2e,
               "scheduling_delay_s": t["scheduling_delay_s"], "normalized_latency_s_per_token": e2e / out}
    if disaggregated:
        samples["decode_queue_s"] = t["decode_queue_s"]
        samples["kv_transfer_s"] = t["kv_transfer_s"]
    counts = {"requests_completed": int(done.sum()), "num_preemptions": int(t["num_preemptions"].sum()),
              "total_tokens": int(t["prompt_tokens"][done].sum() + out.sum()), "output_tokens": int(out.sum())}
    return samples, counts


def _request_summary(recorder, disaggregated: bool) -> dict:
    """``out_of_core.request_summary`` of a recorder whose rows are in memory, from whole columns."""
    t = request_columns(recorder.cols, disaggregated=disaggregated, fluidity=False)
    samples, counts = request_samples(t, disaggregated)
    done = ~np.isnan(t["completion_s"])
    arrivals = t["arrival_s"]
    makespan = float(t["completion_s"][done].max() - np.nanmin(arrivals)) if done.any() else 0.0
    return {**{k: distribution(v) for k, v in samples.items()}, **counts, "makespan_s": makespan,
            "load": load_report(arrivals, t["completion_s"], makespan) if len(arrivals) else None}
