"""Capacity: the highest arrival rate (QPS) at which one replica meets a latency SLO, found by simulation.

Each *trial* simulates the configuration at one QPS from scratch. Every trial of a search replays the same
requests — ``load_trace`` draws lengths and arrivals from independent streams of one seed, so changing only the
QPS re-times the same Poisson (or gamma) arrivals and keeps every length (a file trace is re-timed with
``retime=True``). A trial at QPS ``q`` is therefore byte-for-byte ``servesim simulate --qps q`` (plus
``--retime`` for a file).

Search (as Sarathi-Serve's and Etalon's capacity searches do, with geometric steps): starting at ``qps_start``,
*bracket* by doubling after a pass or halving after a failure until one QPS passes and a higher one fails, then
*bisect* at the geometric mean of the bracket until ``hi / lo - 1 <= rel_tol`` (2.5% by default) or
``max_trials`` (20) trials ran. The capacity is the highest passing QPS ``lo``; the true threshold lies in
``[lo, hi)``. Every trial is reported. The search assumes the SLO holds below some QPS and fails above it.

Early stop (exact): a trial ends as soon as its failure is certain — when enough samples of one limit's metric
already exceed the limit that the final percentile must too (``slo.certain_violation_count``). Scheduling delays
are lower-bounded by ``now - arrival`` for requests still waiting; TBT gaps and deadline-miss rates count once a
request completes. The final sample counts are known up front (requests the scheduler would reject are known
from their lengths), so an early-stopped trial fails exactly when the full run would.

A workload the deployment cannot serve has no capacity: the search refuses to start (``CapacityError``) when any
request would be rejected (it can never fit the KV cache or max_model_len), and when loading changed the workload
— requests shrunk to ``max_model_len`` — unless the change was asked for (``shrink_long``, or ``drop_long``, which
drops them); what changed is recorded in ``capacity.json`` (``workload``).

Errors: ``CapacityError`` (a ``ValueError``) for invalid search settings or a workload the deployment cannot
serve; the simulator's own errors otherwise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

import numpy as np

from simulator.config import SimConfig
from simulator.metrics import summarize
from simulator.recorder import Recorder
from simulator.replica import IterationLog
from simulator.simulation import build, ignored_options, load_requests, profiled_range, run_deployment
from simulator.slo import SLO, certain_violation_count, evaluate_slo, fluidity_of, make_slo, predicted_prefill_s
from traces import BUILTIN_WORKLOADS
from traces.tables import write_atomic, write_json_atomic

SUMMARY_KEYS = [("ttft_s", "p50"), ("ttft_s", "p99"), ("tbt_s", "p50"), ("tbt_s", "p99"),
                ("scheduling_delay_s", "p50"), ("scheduling_delay_s", "p99"), ("e2e_s", "p50")]
COUNT_KEYS = ["requests_completed", "requests_rejected", "num_preemptions", "num_iterations",
              "throughput_tokens_per_s", "makespan_s"]


class CapacityError(ValueError):
    """Invalid capacity-search settings."""


class _CertainViolation(Exception):
    """Raised inside the simulation to end a trial whose SLO failure is already certain."""


@dataclass(frozen=True)
class Trial:
    """One simulation at ``qps``. ``values``: each SLO limit's measured value (None if stopped early).

    ``summary``: latency percentiles and counts of the run (of the part simulated, if ``stopped_early``);
    ``simulated_s``: simulated seconds reached; ``stop_reason``: why the run was cut short.
    """

    qps: float
    met: bool
    values: dict
    stopped_early: bool
    stop_reason: str | None
    simulated_s: float
    summary: dict

    def row(self) -> dict:
        """Flat dict for a table: qps, met, stopped_early, the limit values, then the summary keys."""
        return {"qps": self.qps, "met": self.met, "stopped_early": self.stopped_early, **self.values,
                **self.summary, "simulated_s": self.simulated_s, "stop_reason": self.stop_reason}


class _Monitor:
    """Counts samples that already exceed each SLO limit and raises ``_CertainViolation`` once one is decided."""

    def __init__(self, slo: SLO, requests, deployment, cost_model, enabled: bool = True):
        self.num_iterations, self.clock_s = 0, 0.0
        served = [r for r in requests if deployment.rejection_reason(r) is None]
        self.served_ids = {r.request_id for r in served}
        self.delay_checks, self.finish_checks = [], []
        for lim in slo.limits:
            if lim.metric == "scheduling_delay_s":
                need = certain_violation_count(len(served), lim.percentile)
                self.delay_checks.append([lim, need, 0, 0])          # limit, needed, count, pointer
            elif lim.metric == "tbt_s":
                n = sum(r.output_tokens - 1 for r in served)
                self.finish_checks.append([lim, certain_violation_count(n, lim.percentile), 0])
            elif lim.metric == "tpot_s":
                n = sum(1 for r in served if r.output_tokens > 1)
                self.finish_checks.append([lim, certain_violation_count(n, lim.percentile), 0])
            else:
                self.finish_checks.append([lim, certain_violation_count(len(served), lim.percentile), 0])
        if not enabled:
            self.delay_checks, self.finish_checks = [], []
        self.served = sorted(served, key=lambda r: (r.arrival_s, r.request_id))
        self.slo, self.cost_model = slo, cost_model
        self.deadlines: dict[int, float] = {}
        self.log = IterationLog()

    def on_iteration(self, plan, start_s, duration_s):
        self.num_iterations += 1
        self.clock_s = max(self.clock_s, start_s + duration_s)
        # A request not scheduled when this micro-batch was formed cannot be before it starts (the next one is formed
        # when the first stage frees, after this start), so its delay is known to exceed now - arrival.
        now = start_s
        for check in self.delay_checks:
            lim, need, count, i = check
            limit, served = lim.max_value, self.served
            while i < len(served) and served[i].arrival_s < now - limit:
                r = served[i]          # arrived > limit ago: its delay is known, or > limit if still unscheduled
                if r.scheduled_s is None or r.scheduled_s - r.arrival_s > limit:
                    count += 1
                i += 1
            check[2], check[3] = count, i
            if count >= need:
                raise _CertainViolation(f"{lim.describe()} violated for certain at t={now:.1f} s: "
                                        f"{count} of {len(served)} requests already above")

    on_iteration.reads_plan = False       # only the times: fast-forwarded steps need not build their plans

    def on_finish(self, done):
        for check in self.finish_checks:
            lim, need, count = check
            for r in done:
                if r.request_id not in self.served_ids:
                    continue
                if lim.metric == "tbt_s":
                    times, top = r.token_times_s, lim.max_value
                    if len(times) > 48:          # the same differences and comparisons, in one array operation
                        count += int(np.count_nonzero(np.diff(np.array(times)) > top))
                    else:
                        count += sum(1 for a, b in zip(times, islice(times, 1, None)) if b - a > top)
                elif lim.metric == "ttft_s":
                    count += r.first_token_s - r.arrival_s > lim.max_value
                elif lim.metric == "tpot_s":
                    count += r.output_tokens > 1 and \
                        (r.completion_s - r.first_token_s) / (r.output_tokens - 1) > lim.max_value
                else:
                    missed, total = fluidity_of(r, self._ttft_deadline(r), self.slo.decode_deadline_s)
                    count += bool(total) and missed / total > lim.max_value
            check[2] = count
            if count >= need:
                raise _CertainViolation(f"{lim.describe()} violated for certain at t={done[0].completion_s:.1f} s:"
                                        f" {count} samples already above (of {need} that decide it)")

    def _ttft_deadline(self, r) -> float:
        d = self.deadlines.get(r.prompt_tokens)
        if d is None:
            d = self.deadlines[r.prompt_tokens] = predicted_prefill_s(self.cost_model, r.prompt_tokens) \
                + self.slo.ttft_slack_s
        return d


def trial_config(config: SimConfig, qps: float) -> SimConfig:
    """``config`` at ``qps``; a file trace is re-timed (capacity needs arrivals at each QPS)."""
    return config.with_(qps=float(qps), retime=None if config.trace in BUILTIN_WORKLOADS else True)


def run_trial(config: SimConfig, slo: SLO, qps: float, *, cost_model=None, early_stop: bool = True,
              deployment=None) -> Trial:
    """Simulate ``config`` at ``qps`` and check ``slo``; stop early once the failure is certain if ``early_stop``.

    ``cost_model`` replaces the one the config names; ``deployment`` (``simulation.build``) is reused across
    trials (its cost models cache per-size costs).
    """
    config = trial_config(config, qps)
    dep = replace(deployment, config=config) if deployment is not None else build(config, cost_model=cost_model)
    requests = load_requests(config, dep.model)
    cost_model = dep.cost_model_for(dep.specs[0])
    monitor = _Monitor(slo, requests, dep, cost_model, early_stop)
    recorder = Recorder(len(requests), on_finish=monitor.on_finish if early_stop and monitor.finish_checks else None)
    reason = None
    extrapolation: dict = {}
    try:
        with profiled_range(dep) as extrapolation:
            run_deployment(dep, requests, on_iteration=monitor.on_iteration, log=monitor.log, recorder=recorder)
    except _CertainViolation as exc:
        reason = str(exc)
        recorder.close(requests)              # the part simulated: requests as far as they got
    summary = summarize(recorder, {"num_iterations": 0, "kv_util_mean": None, "kv_util_max": None})
    summary["requests_rejected"] = len(requests) - len(monitor.served_ids)
    flat = {f"{k}_{q}": summary[k][q] for k, q in SUMMARY_KEYS}
    flat.update({k: summary[k] for k in COUNT_KEYS})
    flat["num_iterations"] = monitor.num_iterations
    arrivals = [r.arrival_s for r in requests]
    span = max(arrivals) - min(arrivals) if arrivals else 0.0
    # the trace's own request rate: equals qps for open-loop traces; lower for a multi-turn workload whose later
    # turns follow think times rather than qps
    flat["arrival_qps"] = (len(arrivals) - 1) / span if span > 0 else None
    # a fitted model's micro-batches priced beyond its profile (None: not a fitted model, or stopped early)
    flat["extrapolated_share"] = extrapolation.get("share")
    if reason is not None:
        return Trial(float(qps), False, {lim.label: None for lim in slo.limits}, True, reason,
                     monitor.clock_s, flat)
    check = evaluate_slo(slo, requests, cost_model)
    return Trial(float(qps), check.met, check.values, False, None, monitor.clock_s, flat)


@dataclass
class CapacityResult:
    """Outcome of a search. ``capacity_qps``: highest passing QPS (0.0 if none passed);
    ``lo_qps``/``hi_qps``: the final bracket (None where not found); ``trials`` in the order they ran."""

    config: SimConfig
    slo: SLO
    capacity_qps: float
    lo_qps: float | None
    hi_qps: float | None
    converged: bool
    note: str
    rel_tol: float
    max_trials: int
    trials: list = field(default_factory=list)
    workload: dict = field(default_factory=dict)

    @property
    def capacity_trial(self) -> Trial | None:
        return next((t for t in self.trials if t.qps == self.lo_qps), None)

    def trials_table(self):
        """One row per trial (``Trial.row``), in the order they ran (pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame([t.row() for t in self.trials])

    def to_dict(self) -> dict:
        return {
            "capacity_qps": self.capacity_qps,
            "slo": self.slo.to_dict(),
            "search": {"lo_qps": self.lo_qps, "hi_qps": self.hi_qps, "converged": self.converged,
                       "note": self.note, "rel_tol": self.rel_tol, "max_trials": self.max_trials,
                       "num_trials": len(self.trials)},
            "config": self.config.to_dict(),
            "ignored_options": ignored_options(self.config),
            "workload": self.workload,
            "trials": [asdict(t) for t in self.trials],
        }

    def write(self, out_dir: str | Path) -> Path:
        """Write ``capacity.json`` (everything) and ``trials.csv`` into ``out_dir`` (created); return the JSON path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "capacity.json"
        write_atomic(out / "trials.csv", self.trials_table().to_csv(index=False))
        write_json_atomic(path, self.to_dict())
        return path


def check_workload(config: SimConfig, deployment) -> dict:
    """What loading the trace does to the workload (``traces`` ``workload_changes`` + rejections); raises
    CapacityError when a request can never be served or requests were shrunk without ``shrink_long``."""
    changes: dict = {}
    requests = load_requests(config.with_(qps=config.effective_qps), deployment.model, changes=changes)
    reasons = [(r.request_id, deployment.rejection_reason(r)) for r in requests]
    rejected = [(i, why) for i, why in reasons if why is not None]
    changes["num_rejected"] = len(rejected)
    if rejected:
        i, why = rejected[0]
        raise CapacityError(f"{len(rejected)} of {len(requests)} requests can never be served by this deployment "
                            f"(e.g. request {i}: {why}); a workload the deployment cannot serve has no capacity")
    shrunk = changes.get("num_shrunk") or 0
    if shrunk and not config.shrink_long:
        limit = changes.get("max_total_tokens")
        raise CapacityError(
            f"{shrunk} of {changes.get('num_requests_in', len(requests))} requests exceed max_model_len {limit} and "
            f"would be shrunk, so the capacity would be of another workload; raise --max-model-len (with "
            f"--allow-long-max-model-len beyond the model's context), or accept the change with --shrink-long or "
            f"--drop-long")
    return changes


def _round_qps(q: float, lo: float, hi: float) -> float:
    """``q`` to 4 significant digits when that stays strictly inside ``(lo, hi)`` (readable trial QPS)."""
    r = float(f"{q:.4g}")
    return r if lo < r < hi else q


def find_capacity(config: SimConfig | None = None, slo: SLO | None = None, *, qps_start: float | None = None,
                  rel_tol: float = 0.025, max_trials: int = 20, min_qps: float | None = None, cost_model=None,
                  early_stop: bool = True, on_trial=None) -> CapacityResult:
    """Search the highest QPS at which ``config`` meets ``slo`` (see the module docstring for the method).

    Args:
        config: the simulation (its ``qps`` is ignored; its seed and trace are used at every trial).
        slo: default ``make_slo("sarathi", model=config.model)`` (the paper's strict TBT SLO).
        qps_start: first trial's QPS (default ``config.qps``).
        rel_tol: stop bisecting when ``hi / lo - 1 <= rel_tol``.
        max_trials: most simulations in the search (>= 2).
        min_qps: give up halving below this (default ``qps_start / 64``): the SLO is not met at any tried load.
        cost_model: replaces the configured one (e.g. a roofline with other constants).
        early_stop: end a trial as soon as its failure is certain (exact; see the module docstring).
        on_trial: called with each ``Trial`` as it completes (e.g. to print progress).
    Returns a ``CapacityResult``. Raises CapacityError for invalid settings.
    """
    config = config or SimConfig()
    qps = float(config.effective_qps if qps_start is None else qps_start)
    if not (qps > 0 and math.isfinite(qps)):
        raise CapacityError(f"qps_start: must be a positive finite number, got {qps_start!r}")
    if not rel_tol > 0:
        raise CapacityError(f"rel_tol: must be positive, got {rel_tol!r}")
    if not (isinstance(max_trials, int) and max_trials >= 2):
        raise CapacityError(f"max_trials: must be an integer >= 2, got {max_trials!r}")
    min_qps = qps / 64 if min_qps is None else float(min_qps)
    slo = slo or make_slo("sarathi", model=config.model)
    deployment = build(config, cost_model=cost_model)
    workload = check_workload(config, deployment)

    trials: dict[float, Trial] = {}
    order: list[Trial] = []

    def trial(q: float) -> Trial:
        if q not in trials:
            t = run_trial(config, slo, q, early_stop=early_stop, deployment=deployment)
            trials[q] = t
            order.append(t)
            if on_trial is not None:
                on_trial(t)
        return trials[q]

    lo = hi = None
    note = ""
    while len(order) < max_trials:                      # bracket
        if trial(qps).met:
            lo = qps
            if hi is not None:
                break
            qps *= 2
        else:
            hi = qps
            if lo is not None:
                break
            if qps / 2 < min_qps:
                note = f"SLO not met at any QPS tried (lowest {qps:g})"
                break
            qps /= 2
    if lo is not None and hi is None:
        note = f"SLO still met at the highest QPS tried ({lo:g}) after {len(order)} trials"
    while lo is not None and hi is not None and hi / lo - 1 > rel_tol and len(order) < max_trials:   # bisect
        mid = _round_qps(math.sqrt(lo * hi), lo, hi)
        if trial(mid).met:
            lo = mid
        else:
            hi = mid
    converged = lo is not None and hi is not None and hi / lo - 1 <= rel_tol
    if lo is not None and hi is not None and not converged:
        note = f"stopped after max_trials={max_trials} with the bracket [{lo:g}, {hi:g})"
    return CapacityResult(config, slo, lo if lo is not None else 0.0, lo, hi, converged, note, rel_tol,
                          max_trials, order, workload)
