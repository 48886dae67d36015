"""Sweeps: the cross product of simulation settings, each point a capacity search or a run at one QPS.

A sweep file (YAML)::

    mode: capacity              # capacity: one capacity search per point; qps: one simulation per point
    base:                       # SimConfig keys (and SLO keys) shared by every point
      model: Mistral-7B
      num_requests: 2048
    grid:                       # axis -> list of values; the points are the cross product, in this order
      scheduler: [vllm, orca, sarathi]
      token_budget: [512, 2048]
      workload:                 # a list of mappings sets several keys per value (the axis name is a label)
        - {trace: sharegpt}
        - {trace: arxiv, max_model_len: 16384}
    search: {rel_tol: 0.025, max_trials: 20}   # capacity mode: find_capacity settings

Point keys are ``SimConfig`` keys plus the SLO keys ``slo`` (sarathi/vidur/deadline/distserve), ``slo_level``
(strict/relaxed), ``tbt_slo``, ``ttft_slo``, ``tpot_slo``, ``decode_deadline_s`` and ``ttft_slack_s`` (in ``qps`` mode an SLO is optional and
adds ``slo_met``). Scheduler options a point's scheduler does not declare (``Scheduler.options``: e.g.
``token_budget`` outside Sarathi-Serve) are dropped from its points, so vLLM is not searched once per token budget.

Results: ``OUT/sweep.csv``, one row per point, appended (and flushed) as each point completes, keyed by
``point_key`` (a hash of the point, the mode and the search settings). Rerunning the same sweep into the same
folder skips the points already there — an interrupted sweep resumes without redoing or duplicating work (a
half-written last line is dropped). When every point is done the table is rewritten sorted in grid order, so an
interrupted-and-resumed sweep ends byte-identical to an uninterrupted one. Capacity points also write
``OUT/points/<point_key>.json`` (every trial).

Backends: ``local`` (a process pool, default) and ``ray`` (``ray.init(address)``; the optional ``ray`` extra).
Errors: ``SweepError`` (a ``ValueError``) naming the file and the bad key.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from simulator.capacity import COUNT_KEYS, SUMMARY_KEYS, find_capacity
from simulator.config import ConfigError, SimConfig, read_yaml_mapping
from simulator.simulation import simulate
from simulator.slo import SLO_NAMES, evaluate_slo, make_slo

MODES = ("capacity", "qps")
SLO_KEYS = ("slo", "slo_level", "tbt_slo", "ttft_slo", "tpot_slo", "decode_deadline_s", "ttft_slack_s")
SEARCH_KEYS = ("rel_tol", "max_trials", "qps_start", "min_qps", "early_stop")
TABLE = "sweep.csv"

_DIST = ("mean", "p50", "p90", "p99", "max")
QPS_RESULTS = ([f"{m}_{q}" for m in ("ttft_s", "tbt_s", "tpot_s", "e2e_s", "scheduling_delay_s") for q in _DIST]
               + ["requests_completed", "requests_rejected", "num_preemptions", "num_iterations",
                  "throughput_tokens_per_s", "output_throughput_tokens_per_s", "throughput_requests_per_s",
                  "makespan_s", "slo_met", "deadline_miss_rate_p99"])
CAPACITY_RESULTS = (["capacity_qps", "lo_qps", "hi_qps", "converged", "num_trials", "slo_description"]
                    + [f"{k}_{q}" for k, q in SUMMARY_KEYS] + COUNT_KEYS
                    + ["deadline_miss_rate_p99", "trials", "note"])


class SweepError(ValueError):
    """A sweep file or result table that cannot be used."""


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep: ``mode``, ``base`` keys, ``grid`` axes (name -> values) and ``search`` settings."""

    mode: str = "capacity"
    base: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    source: str = "<sweep>"

    def __post_init__(self):
        where = self.source
        if self.mode not in MODES:
            raise SweepError(f"{where}: mode: unknown {self.mode!r}; known: {', '.join(MODES)}")
        allowed = set(SimConfig.keys()) | set(SLO_KEYS)
        for key in self.base:
            if key not in allowed:
                raise SweepError(f"{where}: base: unknown key {key!r}; known: {', '.join(sorted(allowed))}")
        for axis, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{where}: grid: {axis}: expected a non-empty list of values")
            for v in values:
                keys = v.keys() if isinstance(v, dict) else [axis]
                bad = [k for k in keys if k not in allowed]
                if bad:
                    raise SweepError(f"{where}: grid: {axis}: unknown key {bad[0]!r}; "
                                     f"known: {', '.join(sorted(allowed))}")
        for key in self.search:
            if key not in SEARCH_KEYS:
                raise SweepError(f"{where}: search: unknown key {key!r}; known: {', '.join(SEARCH_KEYS)}")

    def points(self) -> list[dict]:
        """The grid's points in order (later axes vary fastest), irrelevant keys dropped, duplicates removed.

        Each point is validated (``SimConfig`` and SLO); raises SweepError naming the file and the point.
        """
        axes = list(self.grid.items())
        seen, out = set(), []
        for combo in itertools.product(*(values for _, values in axes)):
            point = dict(self.base)
            for (axis, _), value in zip(axes, combo):
                point.update(value if isinstance(value, dict) else {axis: value})
            point = drop_foreign_options(point)
            key = point_key(point, self.mode, self.search)
            if key in seen:
                continue
            try:
                split_point(point)
                if self.mode == "capacity" or "slo" in point:
                    slo_of(point)
            except ValueError as exc:
                raise SweepError(f"{self.source}: point {point}: {exc}") from None
            seen.add(key)
            out.append(point)
        return out

    def columns(self) -> list[str]:
        """Table columns: ``point_key``, every point key in order of appearance, then the mode's results."""
        keys = list(self.base)
        for axis, values in self.grid.items():
            for v in values:
                for k in (v.keys() if isinstance(v, dict) else [axis]):
                    if k not in keys:
                        keys.append(k)
        return ["point_key"] + keys + (CAPACITY_RESULTS if self.mode == "capacity" else QPS_RESULTS)


def drop_foreign_options(point: dict) -> dict:
    """``point`` without the scheduler options its scheduler does not declare (see the module docstring)."""
    from simulator.schedulers import SCHEDULERS

    scheduler = point.get("scheduler", SimConfig.scheduler)
    cls = SCHEDULERS.get(scheduler)
    if cls is None:
        return point
    foreign = {k for c in SCHEDULERS.values() for k in c.options} - set(cls.options)
    return {k: v for k, v in point.items() if k not in foreign}


def load_sweep(path: str | Path, *, grid: dict | None = None, base: dict | None = None,
               mode: str | None = None) -> Sweep:
    """Read a sweep YAML file; ``grid``/``base``/``mode`` (e.g. from CLI flags) replace or add axes and keys."""
    path = Path(path)
    data = read_yaml_mapping(path, SweepError, "sections mode, base, grid, search")
    unknown = sorted(set(data) - {"mode", "base", "grid", "search", "description"})
    if unknown:
        raise SweepError(f"{path}: unknown section {unknown[0]!r}; known: mode, base, grid, search, description")
    sections = {}
    for name in ("base", "grid", "search"):
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise SweepError(f"{path}: {name}: expected a mapping")
        sections[name] = {str(k).replace("-", "_"): v for k, v in value.items()}
    sections["base"].update(base or {})
    sections["grid"].update(grid or {})
    return Sweep(mode or data.get("mode", "capacity"), sections["base"], sections["grid"], sections["search"],
                 str(path))


def point_key(point: dict, mode: str, search: dict) -> str:
    """A stable 12-hex-digit key of a point (its keys, the mode and, for capacity, the search settings)."""
    payload = {"mode": mode, "point": point, "search": search if mode == "capacity" else {}}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def split_point(point: dict) -> tuple[SimConfig, dict]:
    """``(SimConfig, slo_keys)`` of a point; raises ConfigError for a bad SimConfig value."""
    sim = {k: v for k, v in point.items() if k not in SLO_KEYS}
    try:
        return SimConfig().with_(**sim), {k: v for k, v in point.items() if k in SLO_KEYS}
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def slo_of(point: dict):
    """The point's SLO (default ``sarathi`` at the model's strict paper TBT SLO)."""
    config, keys = split_point(point)
    name = keys.get("slo", "sarathi")
    if name not in SLO_NAMES:
        raise SweepError(f"slo: unknown {name!r}; known: {', '.join(SLO_NAMES)}")
    return make_slo(name, model=config.model, level=keys.get("slo_level", "strict"),
                    tbt_slo_s=keys.get("tbt_slo"), decode_deadline_s=keys.get("decode_deadline_s"),
                    ttft_slack_s=keys.get("ttft_slack_s"), ttft_slo_s=keys.get("ttft_slo"),
                    tpot_slo_s=keys.get("tpot_slo"))


def run_point(point: dict, mode: str, search: dict) -> tuple[dict, dict | None]:
    """Run one point; return ``(results row without the point keys, detail dict or None)``.

    Capacity mode: ``find_capacity`` with ``search`` settings; the detail is ``CapacityResult.to_dict()``.
    QPS mode: one ``simulate`` (and the SLO check if the point names an SLO).
    """
    config, keys = split_point(point)
    if mode == "capacity":
        result = find_capacity(config, slo_of(point), **search)
        best = result.capacity_trial
        row = {"capacity_qps": result.capacity_qps, "lo_qps": result.lo_qps, "hi_qps": result.hi_qps,
               "converged": result.converged, "num_trials": len(result.trials),
               "slo_description": result.slo.describe(), "note": result.note,
               "trials": " ".join(f"{t.qps:g}:{'pass' if t.met else 'fail'}" for t in result.trials)}
        if best is not None:
            row.update(best.summary)
            row["deadline_miss_rate_p99"] = best.values.get("deadline_miss_rate_p99")
        return row, result.to_dict()
    result = simulate(config)
    s = result.summary
    row = {f"{m}_{q}": s[m][q] for m in ("ttft_s", "tbt_s", "tpot_s", "e2e_s", "scheduling_delay_s") for q in _DIST}
    row.update({k: s[k] for k in QPS_RESULTS if k in s})
    if "slo" in keys:
        check = evaluate_slo(slo_of(point), result.requests, result.cost_model)
        row["slo_met"] = check.met
        row["deadline_miss_rate_p99"] = check.values.get("deadline_miss_rate_p99")
    return row, None


# --- the result table -----------------------------------------------------------------------------------------

def _repair(path: Path) -> None:
    """Drop a half-written last line (a sweep killed mid-write)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def done_keys(path: Path, columns: list[str]) -> set[str]:
    """Keys of the points already in the table at ``path`` (created with its header if missing)."""
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(columns)
        return set()
    _repair(path)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != columns:
            raise SweepError(f"{path}: written by a different sweep (its columns differ); use another --out")
        return {row[0] for row in reader if row}


def _cell(v):
    return "" if v is None else v


def append_row(path: Path, columns: list[str], row: dict) -> None:
    """Append one row and flush it to disk."""
    with path.open("a", newline="") as f:
        csv.writer(f).writerow([_cell(row.get(c)) for c in columns])
        f.flush()
        os.fsync(f.fileno())


def finalize(path: Path, sweep: Sweep) -> pd.DataFrame:
    """Rewrite the table sorted in grid order (atomically) and return it; raises SweepError on foreign rows."""
    table = pd.read_csv(path)
    order = {point_key(p, sweep.mode, sweep.search): i for i, p in enumerate(sweep.points())}
    foreign = sorted(set(table["point_key"]) - set(order))
    if foreign:
        raise SweepError(f"{path}: holds {len(foreign)} point(s) not in this sweep (e.g. {foreign[0]}); "
                         f"use another --out")
    table = table.drop_duplicates("point_key")
    table = table.iloc[table["point_key"].map(order).argsort(kind="stable")].reset_index(drop=True)
    tmp = path.with_suffix(".csv.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return table


# --- running --------------------------------------------------------------------------------------------------

def _local_results(todo, sweep, jobs):
    if jobs == 1:
        for point in todo:
            yield point, run_point(point, sweep.mode, sweep.search)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_point, p, sweep.mode, sweep.search): i for i, p in enumerate(todo)}
        try:
            for fut in as_completed(futures):
                yield todo[futures[fut]], fut.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _ray_results(todo, sweep, address):
    try:
        import ray
    except ImportError:
        raise SweepError("backend ray: ray is not installed (pip install 'servesim[ray]')") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(run_point)
    pending = {remote.remote(p, sweep.mode, sweep.search): p for p in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        point = pending.pop(ready[0])
        yield point, ray.get(ready[0])


def run_sweep(sweep: Sweep, out_dir: str | Path, *, backend: str = "local", jobs: int | None = None,
              ray_address: str | None = None, progress: bool = False, limit: int | None = None) -> pd.DataFrame:
    """Run the points of ``sweep`` not yet in ``out_dir/sweep.csv``, appending each row as it completes.

    Args:
        backend: ``local`` (process pool of ``jobs`` workers, default all CPUs; 1 runs in this process) or ``ray``.
        ray_address: passed to ``ray.init`` (None starts or joins a local Ray instance).
        progress: show a tqdm bar.
        limit: run at most this many points now (the table is then left unsorted and partial; rerun to finish).
    Returns the table (sorted in grid order once complete). Raises SweepError for a foreign table or backend.
    """
    out = Path(out_dir)
    path = out / TABLE
    columns = sweep.columns()
    points = sweep.points()
    done = done_keys(path, columns)
    todo = [p for p in points if point_key(p, sweep.mode, sweep.search) not in done]
    already = len(points) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    if backend == "local":
        results = _local_results(todo, sweep, jobs or os.cpu_count() or 1)
    elif backend == "ray":
        results = _ray_results(todo, sweep, ray_address)
    else:
        raise SweepError(f"backend: unknown {backend!r}; known: local, ray")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(points), initial=already, unit="point", desc=f"sweep ({sweep.mode})")
    try:
        for point, (row, detail) in results:
            key = point_key(point, sweep.mode, sweep.search)
            if detail is not None:
                (out / "points").mkdir(parents=True, exist_ok=True)
                (out / "points" / f"{key}.json").write_text(json.dumps(detail, indent=2) + "\n")
            append_row(path, columns, {"point_key": key, **point, **row})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    remaining = set(point_key(p, sweep.mode, sweep.search) for p in points) - done_keys(path, columns)
    if remaining:
        return pd.read_csv(path)
    return finalize(path, sweep)
