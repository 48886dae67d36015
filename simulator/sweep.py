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

Results: ``OUT/sweep.csv``, one row per point, appended (flushed and fsynced) as each point completes, keyed by
``point_key`` (a hash of the point, the mode and the search settings), through the shared resumable-table writer
``traces.tables.ResumableTable``. Rerunning the same sweep into the same folder skips the points already there —
an interrupted sweep resumes without redoing or duplicating work (a torn last row — no newline, the wrong
number of fields, or a bad point key — is dropped with a note on stderr). When every point is done the table
is rewritten atomically, sorted in grid order, so an interrupted-and-resumed sweep ends byte-identical to an
uninterrupted one. Capacity points also write ``OUT/points/<point_key>.json`` (every trial), atomically and
before their row. Before any point runs: the folder is locked (``OUT/.servesim.lock``; a second sweep on it is
refused, the lock of a killed sweep is taken over with a note) and a table with other columns, or with rows of
points not in this sweep, is refused as a foreign table. An empty ``grid`` is the single point ``base``.
Worker processes never outlive the sweep: SIGTERM terminates them before the sweep ends, and on Linux a
SIGKILL'd sweep takes them along (``prctl(PR_SET_PDEATHSIG)``; elsewhere they notice within 0.2 s).

Backends: ``local`` (a process pool, default) and ``ray`` (``ray.init(address)``; the optional ``ray`` extra).
Errors: ``SweepError`` (a ``ValueError``) naming the file and the bad key.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from simulator.capacity import COUNT_KEYS, SUMMARY_KEYS, find_capacity
from simulator.config import ConfigError, SimConfig, read_yaml_mapping
from simulator.simulation import simulate
from simulator.slo import SLO_NAMES, evaluate_slo, make_slo
from traces.tables import FolderLock, ResumableTable, ensure_dir, write_json_atomic

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
        for key, value in self.search.items():
            if key not in SEARCH_KEYS:
                raise SweepError(f"{where}: search: unknown key {key!r}; known: {', '.join(SEARCH_KEYS)}")
            problem = _search_problem(key, value)
            if problem:
                raise SweepError(f"{where}: search: {key}: {problem}, got {value!r}")

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


def _search_problem(key: str, value) -> str | None:
    """Why ``value`` is no valid ``find_capacity`` setting ``key`` (None when it is), checked before any point runs."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if key == "max_trials" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
        return "must be an integer >= 2"
    if key in ("rel_tol", "qps_start") and not (number and value > 0):
        return "must be a finite number > 0"
    if key == "min_qps" and value is not None and not (number and value > 0):
        return "must be a finite number > 0"
    if key == "early_stop" and not isinstance(value, bool):
        return "must be true or false"
    return None


def drop_foreign_options(point: dict) -> dict:
    """``point`` without the scheduler options its scheduler does not declare (see the module docstring)."""
    from simulator.schedulers import SCHEDULERS, foreign_options

    scheduler = point.get("scheduler", SimConfig.scheduler)
    if scheduler not in SCHEDULERS:
        return point
    foreign = foreign_options(scheduler)
    return {k: v for k, v in point.items() if k not in foreign}


def load_sweep(path: str | Path, *, grid: dict | None = None, base: dict | None = None,
               mode: str | None = None) -> Sweep:
    """Read a sweep YAML file; ``grid``/``base``/``mode`` (e.g. from CLI flags) replace or add axes and keys."""
    path = Path(path)
    try:
        data = read_yaml_mapping(path, SweepError, "sections mode, base, grid, search")
    except OSError as exc:                                   # a folder, no permission, an I/O error
        raise SweepError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SweepError(f"{path}: not a text (UTF-8) file: {exc.reason} at byte {exc.start}") from None
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

_KEY = re.compile(r"[0-9a-f]{12}")


def _check_row(row: dict) -> None:
    """A complete row of a sweep table: a 12-hex-digit point key (``traces.tables.ResumableTable``'s check)."""
    if not _KEY.fullmatch(row["point_key"]):
        raise ValueError(f"point_key: not a point key: {row['point_key'][:20]!r}")


def open_table(path: Path, columns: list[str]) -> ResumableTable:
    """The sweep table at ``path``, created with its header, its torn last row (if any) dropped; SweepError for
    a foreign table (other columns) or a damaged row."""
    return ResumableTable(path, columns, check_row=_check_row, error=SweepError, owner="a different sweep").open()


def done_keys(path: Path, columns: list[str]) -> set[str]:
    """Keys of the points already in the table at ``path`` (created with its header if missing)."""
    table = open_table(path, columns)
    table.close()
    return {row["point_key"] for row in table.rows}


def finalize(table: ResumableTable, sweep: Sweep) -> pd.DataFrame:
    """Rewrite the table sorted in grid order (atomically, each point once) and return it."""
    order = {point_key(p, sweep.mode, sweep.search): i for i, p in enumerate(sweep.points())}
    first = {}
    for row in table.rows:
        first.setdefault(row["point_key"], row)
    table.rewrite(sorted(first.values(), key=lambda r: order[r["point_key"]]))
    return pd.read_csv(table.path)


def _check_count(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SweepError(f"{name}: must be an integer >= 1, got {value!r}")


# --- running --------------------------------------------------------------------------------------------------

def _run_named(point: dict, mode: str, search: dict, label: str):
    """``run_point``, with a bad-input error (ValueError) naming the point: ``SweepError("point LABEL: ...")``."""
    try:
        return run_point(point, mode, search)
    except SweepError:
        raise
    except ValueError as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise SweepError(f"point {label}: {msg}") from None


def _label(point: dict, sweep: Sweep) -> str:
    """``key (axis=value, ...)``: the point key and its values of the grid's keys."""
    axes = []
    for axis, values in sweep.grid.items():
        for v in values:
            for k in (v.keys() if isinstance(v, dict) else [axis]):
                if k not in axes:
                    axes.append(k)
    shown = ", ".join(f"{k}={point[k]}" for k in axes if k in point)
    return point_key(point, sweep.mode, sweep.search) + (f" ({shown})" if shown else "")


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """In a worker process: exit as soon as the sweep process ``parent_pid`` is gone, however it ended.

    On Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` has the kernel kill this process when its parent dies (even by
    SIGKILL); everywhere a daemon thread also polls the parent every 0.2 s. The worker leaves SIGTERM at its
    default (the sweep stops its workers with it) and ignores SIGINT (Ctrl-C reaches the sweep, which stops
    them), and forgets a SIGTERM handler inherited from the sweep process by fork.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    start_ppid = os.getppid()
    if sys.platform.startswith("linux") and start_ppid == parent_pid:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def gone() -> bool:
        if os.getppid() != start_ppid:
            return True
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False

    if gone():                                # the parent died before this worker got here
        os._exit(1)

    def watch():
        while not gone():
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="servesim-parent-watch", daemon=True).start()


def _stop_workers(pool) -> None:
    """Terminate the pool's worker processes now (SIGTERM, then SIGKILL after 5 s); shutdown() alone would wait
    for the points they are running."""
    stop = getattr(pool, "terminate_workers", None)           # Python >= 3.14
    if stop is not None:
        stop()
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _local_results(todo, sweep, jobs):
    if jobs == 1 or not todo:
        for point in todo:
            yield point, _run_named(point, sweep.mode, sweep.search, _label(point, sweep))
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), initializer=_die_with_parent,
                               initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_run_named, p, sweep.mode, sweep.search, _label(p, sweep)): i
                   for i, p in enumerate(todo)}
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except BrokenProcessPool:
                raise SweepError("a worker process died (killed, or out of memory?) while running a point; the "
                                 "points done are saved: rerun to resume, with --jobs 1 to see the point's "
                                 "error") from None
            yield todo[futures[fut]], result
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ray_results(todo, sweep, address):
    try:
        import ray
    except ImportError:
        raise SweepError("backend ray: ray is not installed (pip install 'servesim[ray]')") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(_run_named)
    pending = {remote.remote(p, sweep.mode, sweep.search, _label(p, sweep)): p for p in todo}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            point = pending.pop(ready[0])
            yield point, ray.get(ready[0])
    finally:
        for ref in pending:                                   # interrupted: do not leave tasks running
            ray.cancel(ref, force=True)


class _Stopped(BaseException):
    """Raised in the sweep process by the SIGTERM handler (a BaseException: no ``except Exception`` eats it)."""


@contextlib.contextmanager
def _sigterm_stops():
    """While running: SIGTERM raises ``_Stopped``, so the workers are terminated and the lock released before
    the process ends, by SIGTERM as before. Only where SIGTERM would end the process anyway (its handler is
    the default) and in the main thread; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise _Stopped(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Stopped:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)                  # end as SIGTERM ends a process (status 143)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _note_to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_sweep(sweep: Sweep, out_dir: str | Path, *, backend: str = "local", jobs: int | None = None,
              ray_address: str | None = None, progress: bool = False, limit: int | None = None,
              echo=None) -> pd.DataFrame:
    """Run the points of ``sweep`` not yet in ``out_dir/sweep.csv``, appending each row as it completes.

    Args:
        backend: ``local`` (process pool of ``jobs`` workers, default all CPUs; 1 runs in this process) or ``ray``.
        jobs: worker processes (>= 1). ray_address: passed to ``ray.init`` (None starts or joins a local Ray).
        progress: show a tqdm bar.
        limit: run at most this many points now (>= 1; the table is then left unsorted and partial; rerun).
        echo: called with each note (``"note: ..."``: a torn row dropped, a stale lock taken over); default stderr.
    Before any point runs, the folder is locked against a second sweep (``traces.tables.FolderLock``), the table
    is opened (torn last row dropped) and checked: other columns or rows of points not in this sweep are a
    foreign table. Workers die with the sweep: a SIGTERM'd sweep terminates them, a SIGKILL'd one takes them
    along (``_die_with_parent``). Returns the table (sorted in grid order once complete). Raises SweepError for
    a foreign or damaged table, a locked or unwritable folder, bad ``jobs``/``limit``/``backend``.
    """
    _check_count(jobs, "jobs")
    _check_count(limit, "limit")
    if backend not in ("local", "ray"):
        raise SweepError(f"backend: unknown {backend!r}; known: local, ray")
    say = echo or _note_to_stderr
    out = Path(out_dir)
    path = out / TABLE
    columns = sweep.columns()
    points = sweep.points()
    keys = [point_key(p, sweep.mode, sweep.search) for p in points]
    ensure_dir(out, error=SweepError)
    with _sigterm_stops(), FolderLock(out, "sweep", error=SweepError) as lock:
        table = open_table(path, columns)
        try:
            for note in lock.notes + table.notes:
                say(f"note: {note}")
            done = {row["point_key"] for row in table.rows}
            foreign = sorted(done - set(keys))
            if foreign:
                raise SweepError(f"{path}: foreign table: holds {len(foreign)} point(s) not in this sweep (e.g. "
                                 f"{foreign[0]}); use another --out")
            todo = [p for p, k in zip(points, keys) if k not in done]
            already = len(points) - len(todo)
            if limit is not None:
                todo = todo[:limit]
            if backend == "local":
                results = _local_results(todo, sweep, jobs or os.cpu_count() or 1)
            else:
                results = _ray_results(todo, sweep, ray_address)
            _run(results, table, out, sweep, columns, progress, len(points), already)
            if set(keys) - {row["point_key"] for row in table.rows}:
                table.close()
                return pd.read_csv(path)
            return finalize(table, sweep)
        finally:
            table.close()


def _run(results, table, out, sweep, columns, progress, total, already) -> None:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=already, unit="point", desc=f"sweep ({sweep.mode})")
    try:
        for point, (row, detail) in results:
            key = point_key(point, sweep.mode, sweep.search)
            if detail is not None:                     # before the row: a row in the table has its JSON
                (out / "points").mkdir(parents=True, exist_ok=True)
                write_json_atomic(out / "points" / f"{key}.json", detail, error=SweepError)
            table.append({"point_key": key, **point, **row})
            if bar is not None:
                bar.update(1)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()                                    # a generator: stops the workers if we stopped early
        if bar is not None:
            bar.close()
