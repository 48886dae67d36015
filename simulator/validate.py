"""Validation: replay a simulation's iterations on a real device and measure how far the cost model was.

``run_validation(config, out_dir=...)`` runs ``simulate(config, record_plans=True)``, executes the recorded
batch plans with ``profiler.executor.Executor`` and writes into ``out_dir``:

- ``validation.csv``: one row per executed iteration (``VALIDATION_COLUMNS``): its index in the simulation,
  batch composition, ``predicted_s`` (the simulation's duration), ``measured_s`` (median of the timed runs, on
  the ``clock`` column's clock: CUDA events, or on CPU the executing thread's CPU time or wall time),
  ``error_pct`` = 100 x (predicted - measured) / measured and ``abs_error_pct``. Rows are appended as they are
  measured; a run that stops resumes where it left off (same settings), without redoing or duplicating rows.
- ``validation.png``: predicted vs measured iteration time, log-log, coloured by batch kind, with y = x.
- ``validation_summary.json``: median and P95 absolute percentage error overall and per batch kind and, when
  every iteration was executed, TTFT and TBT percentiles of the requests re-timed with the predicted and with
  the measured iteration times.

Two ways to bring each iteration's requests to the KV lengths the plan says:

- every iteration (``max_iterations`` None or >= the number of iterations): the plans run consecutively, so
  prefill chunks attend to what earlier chunks wrote and decodes read what earlier iterations wrote; the executor
  checks before each iteration that its cached length of every request equals the plan's ``context_len``, drops
  preempted requests' KV and frees a request after its last iteration. After a resume the first iterations
  fill (below) whatever the interrupted run had computed.
- a stratified sample of ``max_iterations``: each sampled iteration's requests are given ``context_len`` cached
  tokens of random K/V (``Executor.set_context``) before timing, everything else is freed. Iteration time depends
  on the lengths, not the values, so this times the same work without replaying the iterations in between.

Sampling (``stratified_sample``): the quota is split evenly over the batch kinds present (prefill-only,
decode-only, mixed; a kind with fewer iterations gives its surplus to the others); within a kind the
iterations are sorted by size (new tokens + cached tokens read) and cut into as many equal bins as its quota,
one iteration drawn per bin with the seed, so small and large batches of each kind are covered. The sample is
executed in a seeded random order: on a shared machine a core can run 1.3-1.6x slower for tens of seconds, and in
iteration order such a spell would slow a run of consecutive chunks of one prompt, all of one kind and size;
shuffled, it slows scattered iterations that the medians per kind outvote. On a CPU each sampled iteration is
also measured in two rounds at least 20 s apart and the lower median kept (``rounds``), as the profiler does.

Re-timing (``retime_requests``): the same plans in the same order; iteration ``i`` starts when iteration ``i-1``
ends or when the last of its requests arrives, whichever is later, and lasts the given duration; requests
advance exactly as in the simulator (``simulator.request.Request.advance``). With the predicted durations this
reproduces the simulation's token times.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.metrics import distribution
from simulator.request import Request
from traces.tables import FolderLock, ResumableTable, ensure_dir, write_json_atomic

KINDS = ("prefill", "decode", "mixed")
VALIDATION_COLUMNS = [
    "iteration", "kind", "batch_size", "num_decodes", "num_prefills", "num_prefill_tokens", "num_tokens",
    "decode_kv_tokens", "prefill_context_tokens", "max_context_len", "predicted_s", "measured_s", "measured_min_s",
    "measured_std_s", "runs", "clock", "error_pct", "abs_error_pct",
]
CSV_NAME, PLOT_NAME, SUMMARY_NAME, META_NAME = ("validation.csv", "validation.png", "validation_summary.json",
                                                "validation_meta.json")


class ValidationError(ValueError):
    """Settings that cannot be validated (e.g. tensor/pipeline parallelism, a resume with other settings)."""


# --- which iterations ----------------------------------------------------------------------------------------
def _size_key(plan) -> int:
    """Tokens computed plus cached tokens read: the size of an iteration, independent of any cost model."""
    return plan.num_tokens + sum(plan.context_lens)


def stratified_sample(plans, n: int, seed: int = 0) -> list[int]:
    """Indices (sorted) of ``n`` plans covering prefill-only, decode-only and mixed batches and their sizes.

    Returns every index when ``n`` >= ``len(plans)``. Raises ValueError when ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"max_iterations: must be >= 1, got {n}")
    if n >= len(plans):
        return list(range(len(plans)))
    by_kind = {k: [i for i, p in enumerate(plans) if p.kind == k] for k in KINDS}
    by_kind = {k: v for k, v in by_kind.items() if v}
    quota = dict.fromkeys(by_kind, 0)
    left = n
    while left:
        open_kinds = [k for k in by_kind if quota[k] < len(by_kind[k])]
        share, extra = divmod(left, len(open_kinds))
        for j, k in enumerate(open_kinds):
            give = min(share + (j < extra), len(by_kind[k]) - quota[k])
            quota[k] += give
            left -= give
    rng = np.random.default_rng(seed)
    chosen = []
    for k in KINDS:
        if k not in by_kind or not quota[k]:
            continue
        ordered = sorted(by_kind[k], key=lambda i: (_size_key(plans[i]), i))
        for b in np.array_split(np.asarray(ordered), quota[k]):
            chosen.append(int(b[rng.integers(len(b))]))
    return sorted(chosen)


def last_iterations(plans) -> dict[int, int]:
    """``{request_id: index of the last plan it appears in}``."""
    return {rid: i for i, p in enumerate(plans) for rid in p.request_ids}


def kv_slots_needed(plans, indices, *, consecutive: bool) -> tuple[int, int]:
    """``(slots, capacity)`` of the executor's KV cache to replay ``plans[indices]``: the most requests holding KV
    at once and the longest KV (tokens) any of them reaches.

    ``consecutive``: the plans run in order; a request holds its KV until its last plan or its preemption.
    Otherwise each plan's requests alone hold KV.
    """
    capacity = max((k + n for i in indices for _, n, k in plans[i].entries()), default=0)
    if not consecutive:
        return max((len(plans[i]) for i in indices), default=0), capacity
    last = last_iterations(plans)
    live, peak = set(), 0
    for i in indices:
        plan = plans[i]
        live.difference_update(plan.preempted_ids)
        live.update(plan.request_ids)
        peak = max(peak, len(live))
        live.difference_update(rid for rid in plan.request_ids if last[rid] == i)
    return peak, capacity


# --- one row of validation.csv -------------------------------------------------------------------------------
def composition(plan) -> dict:
    """The batch-composition columns of ``plan``."""
    d = plan.num_decodes
    return {
        "kind": plan.kind, "batch_size": len(plan), "num_decodes": d, "num_prefills": plan.num_prefills,
        "num_prefill_tokens": plan.num_prefill_tokens, "num_tokens": plan.num_tokens,
        "decode_kv_tokens": sum(k + 1 for k in plan.context_lens[:d]),
        "prefill_context_tokens": sum(plan.context_lens[d:]),
        "max_context_len": max(plan.context_lens, default=0),
    }


def validation_row(index: int, plan, predicted_s: float, timing) -> dict:
    """A VALIDATION_COLUMNS row from a plan, its predicted seconds and its ``Timing``."""
    err = 100.0 * (predicted_s - timing.median_s) / timing.median_s
    return {"iteration": index, **composition(plan), "predicted_s": predicted_s, "measured_s": timing.median_s,
            "measured_min_s": timing.min_s, "measured_std_s": timing.std_s, "runs": timing.runs,
            "clock": timing.clock, "error_pct": err, "abs_error_pct": abs(err)}


# --- results -------------------------------------------------------------------------------------------------
def error_summary(table: pd.DataFrame, extrapolated=()) -> dict:
    """``{"all"|kind|"extrapolated"|"inside profile": {"iterations", "median_abs_error_pct", "p95_abs_error_pct",
    "median_error_pct", "median_predicted_s", "median_measured_s"}}`` over the rows of a validation table (groups
    without rows omitted). ``extrapolated``: the iteration numbers whose shapes the fitted model priced beyond its
    profile (``FittedCostModel.outside``); when any are among the rows, they and the others get their own groups."""
    out = {}
    groups = [("all", table)] + [(k, table[table["kind"] == k]) for k in KINDS]
    beyond = table["iteration"].isin(set(extrapolated)) if len(extrapolated) else None
    if beyond is not None and beyond.any():
        groups += [("extrapolated", table[beyond]), ("inside profile", table[~beyond])]
    for name, rows in groups:
        if not len(rows):
            continue
        out[name] = {
            "iterations": int(len(rows)),
            "median_abs_error_pct": float(rows["abs_error_pct"].median()),
            "p95_abs_error_pct": float(np.percentile(rows["abs_error_pct"], 95)),
            "median_error_pct": float(rows["error_pct"].median()),
            "median_predicted_s": float(rows["predicted_s"].median()),
            "median_measured_s": float(rows["measured_s"].median()),
        }
    return out


def error_table(summary: dict) -> str:
    """A readable table of ``error_summary``."""
    rows = [("batch kind", "iterations", "median |err|", "P95 |err|", "median err", "median predicted",
             "median measured")]
    for name, s in summary.items():
        rows.append((name, str(s["iterations"]), f"{s['median_abs_error_pct']:.1f}%", f"{s['p95_abs_error_pct']:.1f}%",
                     f"{s['median_error_pct']:+.1f}%", f"{s['median_predicted_s'] * 1e3:.3f} ms",
                     f"{s['median_measured_s'] * 1e3:.3f} ms"))
    from simulator.output import text_table

    return text_table(rows)


def plot_validation(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Scatter of predicted vs measured iteration time (ms, log-log) by batch kind, with y = x; saved to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    for kind, marker in zip(KINDS, "os^"):
        rows = table[table["kind"] == kind]
        if len(rows):
            ax.scatter(rows["measured_s"] * 1e3, rows["predicted_s"] * 1e3, s=14, marker=marker, alpha=0.7,
                       label=f"{kind} ({len(rows)})")
    lo = float(min(table["measured_s"].min(), table["predicted_s"].min()) * 1e3 / 1.2)
    hi = float(max(table["measured_s"].max(), table["predicted_s"].max()) * 1e3 * 1.2)
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="grey", alpha=0.15,
                    label="±15%")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured iteration time (ms)",
           ylabel="predicted iteration time (ms)", title=title)
    for axis in (ax.xaxis, ax.yaxis):          # plain numbers at 1-2-5 steps; default minor labels overlap
        axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")                 # atomic: a kill leaves the old figure or the new
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def retime_requests(requests, plans, durations_s) -> list[Request]:
    """Fresh copies of ``requests`` advanced through ``plans`` with iteration ``i`` lasting ``durations_s[i]``.

    Iteration ``i`` starts at ``max(end of i-1, latest arrival of its requests)``; preempted requests are reset
    before their iteration runs. Returns the copies (timestamps and token times filled). Raises ValueError when
    the lengths of ``plans`` and ``durations_s`` differ.
    """
    if len(plans) != len(durations_s):
        raise ValueError(f"retime_requests: {len(plans)} plans but {len(durations_s)} durations")
    reqs = {r.request_id: r.fresh_copy() for r in requests}
    now = 0.0
    for plan, duration in zip(plans, durations_s):
        for rid in plan.preempted_ids:
            reqs[rid].preempt()
        start = max([now] + [reqs[rid].arrival_s for rid in plan.request_ids])
        for rid, n, _ in plan.entries():
            reqs[rid].schedule(n, start)
        now = start + float(duration)
        for rid in plan.request_ids:
            reqs[rid].complete(now)
    return list(reqs.values())


def latency_summary(requests) -> dict:
    """``{"ttft_s": distribution, "tbt_s": distribution}`` of completed requests (see ``simulator.metrics``)."""
    from simulator.metrics import tbt_gaps

    done = [r for r in requests if r.completion_s is not None]
    return {"ttft_s": distribution([r.first_token_s - r.arrival_s for r in done]),
            "tbt_s": distribution(tbt_gaps(done))}


def latency_table(predicted: dict, measured: dict) -> str:
    """TTFT and TBT percentiles re-timed both ways, one row per (metric, way)."""
    lines = [f"{'re-timed requests':<24}{'p50':>11}{'p90':>11}{'p99':>11}"]
    for key, label in (("ttft_s", "TTFT"), ("tbt_s", "TBT")):
        for way, d in (("predicted", predicted), ("measured", measured)):
            vals = "".join(f"{d[key][p] * 1e3:>8.2f} ms" if d[key][p] is not None else f"{'-':>11}"
                           for p in ("p50", "p90", "p99"))
            lines.append(f"{label + ' (' + way + ')':<24}{vals}")
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------------------------------------
def profile_meta(cost_model_dir) -> dict:
    """The meta.json of the profile a fitted cost model was made from, as ``servesim fit`` copies it into
    ``model.json`` (``meta``); empty when there is no such folder or field (a roofline model)."""
    if not cost_model_dir:
        return {}
    try:
        meta = json.loads((Path(cost_model_dir) / "model.json").read_text()).get("meta")
    except (OSError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def profiled_threads(cost_model_dir) -> int | None:
    """CPU threads of the profile a fitted cost model was made from (``profile_meta``'s ``num_threads``), or None
    when there is no such folder or field."""
    threads = profile_meta(cost_model_dir).get("num_threads")
    return int(threads) if isinstance(threads, int) and threads > 0 else None


@dataclass
class ValidationReport:
    """What ``run_validation`` measured: the table, its error summary, the re-timed latencies (or None) and paths."""

    table: pd.DataFrame
    summary: dict
    latency: dict | None
    out_dir: Path
    num_iterations: int
    settings: dict
    machine_speed: dict | None = None


def _check_validation_row(row: dict) -> None:
    """A ``validation.csv`` row as text: raises ValueError naming the first field that does not parse."""
    try:
        if int(row["iteration"]) < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"iteration: not an iteration index: {row['iteration'][:40]!r}") from None
    if row["kind"] not in KINDS:
        raise ValueError(f"kind: unknown {row['kind'][:40]!r}")
    for col in ("predicted_s", "measured_s", "error_pct", "abs_error_pct"):
        try:
            value = float(row[col])
        except ValueError:
            raise ValueError(f"{col}: not a number: {row[col][:40]!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{col}: not a finite number: {row[col][:40]!r}")


def _open_table(csv_path: Path) -> ResumableTable:
    return ResumableTable(csv_path, VALIDATION_COLUMNS, check_row=_check_validation_row, error=ValidationError,
                          owner="another program or servesim version (not a validation table)").open()


def _check_resume(out: Path, settings: dict, notes: list | None = None) -> ResumableTable:
    """``validation.csv`` opened for appending (created, torn last row dropped) after checking that ``out``
    holds a validation with the same settings, or none; ValidationError otherwise. ``notes`` gets what was
    repaired."""
    notes = [] if notes is None else notes
    meta_path, csv_path = out / META_NAME, out / CSV_NAME
    torn = None
    try:
        old = json.loads(meta_path.read_text())
    except FileNotFoundError:
        old = None
    except (ValueError, UnicodeDecodeError) as exc:
        old, torn = None, " ".join(str(exc).split())
    except OSError as exc:
        raise ValidationError(f"{meta_path}: cannot read: {exc.strerror or exc}") from None
    if old is not None:
        if not isinstance(old, dict):
            old = {"settings": old}
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            k = diff[0]
            raise ValidationError(f"{meta_path}: holds a validation with other settings ({k}: {old.get(k)!r} "
                                  f"there, {settings.get(k)!r} now); use another --out or remove that folder")
    table = _open_table(csv_path)
    notes.extend(table.notes)
    if old is None and table.rows:
        table.close()
        if torn is not None:
            raise ValidationError(f"{meta_path}: unreadable ({torn}), so the settings of the {len(table.rows)} "
                                  f"rows of {csv_path} are unknown; use another --out or remove that folder")
        raise ValidationError(f"{csv_path}: holds {len(table.rows)} rows but {meta_path.name} is missing, so "
                              f"their settings are unknown; use another --out or remove that folder")
    if torn is not None:
        notes.append(f"{meta_path}: unreadable, left by an interrupted run before any row; starting afresh")
    return table


def _replay(executor, plans, todo, *, consecutive: bool, fill: bool, warmup: int, repeats: int, clock: str):
    """Yield ``(index, Timing)`` for each of ``plans[todo]`` (in that order; ascending when ``consecutive``),
    keeping the executor's KV state:
    ``consecutive`` frees each request after its last plan; otherwise all requests not in the next plan are
    freed first. ``fill`` lets the executor set context lengths it does not hold (see ``Executor.prepare``)."""
    last = last_iterations(plans)
    for i in todo:
        plan = plans[i]
        if not consecutive:
            keep = set(plan.request_ids)
            for rid in [r for r in executor.kv.lengths if r not in keep]:
                executor.free(rid)
        timing = executor.measure(plan, fill=fill, warmup=warmup, repeats=repeats, clock=clock)
        if consecutive:
            for rid in plan.request_ids:
                if last[rid] == i:
                    executor.free(rid)
        yield i, timing


def run_validation(config, *, out_dir: str | Path, exec_device: str = "cpu", max_iterations: int | None = None,
                   warmup: int = 2, repeats: int = 5, rounds: int | None = None, threads: int | None = None,
                   cpu_clock: str = "thread", progress: bool = False, echo=None) -> ValidationReport:
    """Simulate ``config`` (a ``SimConfig``), execute its iterations on ``exec_device`` and compare.

    Args:
        exec_device: torch device to execute on (``cuda``, ``cuda:N`` or ``cpu``), independent of
            ``config.device`` (the device *spec* the cost model and the KV-cache sizing of the simulation use).
        max_iterations: execute a stratified sample of this many iterations; None executes every iteration.
        warmup, repeats: untimed and timed runs per iteration (``profiler.executor.time_call``).
        rounds: times each sampled iteration is measured, each round at least ``ROUND_GAP_S`` seconds after the
            previous one, keeping the round with the lowest median (``profiler.timing.spaced_rounds``, as the CPU
            profiler does); None means 2 for a sample on a CPU, else 1. Replaying every iteration in order
            times each once (a note says so when ``rounds`` > 1).
        threads: CPU threads for torch; None means the thread count the cost model was profiled with
            (``profiled_threads``), else 1 (the profiler's default). Recorded in the meta file.
        cpu_clock: ``thread`` (CPU time of the executing thread when torch runs on one thread) or ``wall``;
            see ``profiler.executor.cpu_clock``.
        echo: called with progress lines (e.g. ``click.echo``); None prints nothing.
    The folder is locked while the run writes to it; ``validation.csv`` goes through the shared resumable-table
    writer (``traces.tables.ResumableTable``: a torn last row is dropped with a note, the table is rewritten
    sorted by iteration at the end) and every JSON file is replaced atomically, so a run killed at any moment
    resumes. Returns a ValidationReport. Raises ValidationError for tp/pp > 1, counts below their minimum, a
    resume with other settings (or rows whose settings are unknown), a damaged or foreign table, a locked or
    unwritable folder, ExecutorMemoryError when the model or the KV cache cannot fit the device, and the simulator's errors.
    """
    import torch

    for name, value, low in (("max_iterations", max_iterations, 1), ("warmup", warmup, 0), ("repeats", repeats, 1),
                             ("rounds", rounds, 1), ("threads", threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValidationError(f"{name}: must be an integer >= {low}, got {value!r}")
    if config.tp != 1 or config.pp != 1:
        raise ValidationError(f"validate executes one device: tp={config.tp}, pp={config.pp} is not supported "
                              f"(use tp=1, pp=1)")
    if torch.device(exec_device).type == "cuda" and not torch.cuda.is_available():
        raise ValidationError("exec device cuda: torch finds no CUDA device; use --exec-device cpu")
    say = echo or (lambda *_: None)
    out = Path(out_dir)
    threads = int(threads or profiled_threads(config.cost_model) or 1)
    if rounds is None:
        rounds = 2 if max_iterations is not None and torch.device(exec_device).type == "cpu" else 1
    settings = {"config": config.to_dict(), "exec_device": exec_device, "max_iterations": max_iterations,
                "warmup": warmup, "repeats": repeats, "rounds": rounds, "threads": threads, "cpu_clock": cpu_clock,
                "torch": torch.__version__}
    ensure_dir(out, error=ValidationError)
    with FolderLock(out, "validate", error=ValidationError) as lock:
        notes = list(lock.notes)
        table = _check_resume(out, settings, notes)
        try:
            for note in notes:
                (echo or _note_to_stderr)(f"note: {note}")
            write_json_atomic(out / META_NAME, settings, error=ValidationError)
            return _run_locked(config, out, table, settings, exec_device=exec_device,
                               max_iterations=max_iterations, warmup=warmup, repeats=repeats, rounds=rounds,
                               threads=threads, cpu_clock=cpu_clock, progress=progress, say=say)
        finally:
            table.close()


def _note_to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_locked(config, out: Path, table: ResumableTable, settings: dict, *, exec_device, max_iterations, warmup,
                repeats, rounds, threads, cpu_clock, progress, say) -> ValidationReport:
    import torch

    from cost_models.specs import load_model
    from profiler.executor import Executor, activation_bytes, cpu_clock as clock_for
    from profiler.timing import ROUND_GAP_S, reference_kernel_s, spaced_rounds
    from simulator.simulation import simulate

    result = simulate(config, record_plans=True, progress=progress)
    plans = result.log.plans
    if result.summary.get("extrapolation") is not None:
        from cost_models.fitted import describe_extrapolation

        say(describe_extrapolation(result.summary["extrapolation"]))
    predicted = result.iterations["duration_s"].to_numpy()
    if not plans:
        raise ValidationError("the simulation ran no iteration (no request was served); nothing to validate")
    every = max_iterations is None or max_iterations >= len(plans)
    indices = list(range(len(plans))) if every else stratified_sample(plans, max_iterations, config.seed)
    done = {int(row["iteration"]) for row in table.rows}
    todo = [i for i in indices if i not in done]
    if not every:       # see the module docstring (Sampling): slow spells fall on scattered iterations
        np.random.default_rng(config.seed).shuffle(todo)

    model = load_model(config.model)
    slots, capacity = kv_slots_needed(plans, indices, consecutive=every)
    device_type = torch.device(exec_device).type
    executor = Executor(model, exec_device, num_slots=slots, capacity=capacity, threads=threads, seed=config.seed,
                        activation_bytes=activation_bytes(model, [plans[i] for i in indices], device_type))
    kinds = pd.Series([plans[i].kind for i in indices]).value_counts().to_dict()
    say(f"executing {len(indices)} of {len(plans)} iterations "
        f"({', '.join(f'{kinds[k]} {k}' for k in KINDS if k in kinds)}"
        f"{'' if every else ', stratified sample'}) of {model.name} on {exec_device} "
        f"(torch {torch.__version__}, {threads} threads, "
        f"{'CUDA events' if device_type == 'cuda' else clock_for(cpu_clock) + ' clock'}, "
        f"{warmup} warm-up + {repeats} timed runs each"
        f"{f', in {rounds} rounds {ROUND_GAP_S:.0f} s apart' if rounds > 1 and not every else ''}; KV cache "
        f"{slots} requests x {capacity} tokens, {executor.memory['kv_bytes'] / 2 ** 20:.0f} MiB)"
        + (f"; resuming after {len(done)} done" if done else ""))

    speed_start = reference_kernel_s(device_type)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="it", desc="validate", leave=False)
    if every and rounds > 1:
        say(f"note: --rounds {rounds} applies to a sample (--max-iterations); replaying every iteration in order "
            f"times each once")
    if every:
        timed = _replay(executor, plans, todo, consecutive=True, fill=bool(done), warmup=warmup, repeats=repeats,
                        clock=cpu_clock)
    else:
        def measure(i):
            return next(_replay(executor, plans, [i], consecutive=False, fill=True, warmup=warmup,
                                repeats=repeats, clock=cpu_clock))[1]
        timed = ((i, min(results, key=lambda t: t.median_s))
                 for i, results in spaced_rounds(todo, measure, rounds))
    for i, timing in timed:
        table.append(validation_row(i, plans[i], float(predicted[i]), timing))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    speed = machine_speed(profile_meta(config.cost_model), device_type, speed_start, reference_kernel_s(device_type))

    # finalize: each iteration once, in order (an interrupted-and-resumed table ends as an uninterrupted one)
    rows = {}
    for row in table.rows:
        rows.setdefault(int(row["iteration"]), row)
    table.rewrite(rows[i] for i in sorted(rows))
    table = pd.read_csv(out / CSV_NAME)
    outside = getattr(result.cost_model, "outside", None)
    extrapolated = [i for i in table["iteration"].tolist() if outside is not None and outside(plans[i])]
    summary = error_summary(table, extrapolated)
    if extrapolated:
        say(f"note: {len(extrapolated)} of the {len(table)} executed iterations lie beyond the fitted model's "
            f"profiled shapes (their error is reported apart: 'extrapolated')")
    latency = None
    if every and len(table) == len(plans):
        measured = table["measured_s"].to_numpy()
        latency = {"predicted": latency_summary(retime_requests(result.requests, plans, predicted)),
                   "measured": latency_summary(retime_requests(result.requests, plans, measured))}
    title = (f"{model.name}: {'fitted' if config.cost_model else 'roofline'} model for {config.device} "
             f"vs measured on {exec_device}")
    plot_validation(table, out / PLOT_NAME, title=title)
    write_json_atomic(out / SUMMARY_NAME, {"errors": summary, "retimed_requests": latency,
                                           "iterations_simulated": len(plans), "iterations_executed": len(table),
                                           "machine_speed": speed, "settings": settings}, error=ValidationError)
    return ValidationReport(table, summary, latency, out, len(plans), settings, speed)


def machine_speed(meta: dict, device_type: str, start_s: float, end_s: float) -> dict:
    """The reference kernel's times (``profiler.timing.reference_kernel_s``, seconds) on ``device_type`` when the
    validation started and ended, those the profile recorded (``meta``, as ``profile_meta`` reads it:
    ``reference_kernel_s`` ``{"start", "end"}``, used only when it was profiled on the same kind of device), and
    ``drift_pct``: how much slower (> 0) the machine ran while validating, mean against mean (None without the
    profile's: a roofline model, an older profile, another kind of device)."""
    from profiler.timing import REFERENCE_GEMM

    m, k, n = REFERENCE_GEMM
    profiled = meta.get("reference_kernel_s") if meta.get("device") == device_type else None
    drift = None
    if isinstance(profiled, dict) and all(isinstance(profiled.get(key), (int, float)) for key in ("start", "end")):
        drift = ((start_s + end_s) / (profiled["start"] + profiled["end"]) - 1.0) * 100.0
    return {"reference_kernel": f"float32 GEMM [{m}, {k}] @ [{k}, {n}], median seconds",
            "validating_s": {"start": start_s, "end": end_s}, "profiling_s": profiled if drift is not None else None,
            "drift_pct": drift}


def machine_speed_line(speed: dict | None) -> str | None:
    """One line on the machine's speed while validating against while profiling; a WARNING past 5%; None when
    the profile recorded none."""
    if not speed or speed.get("drift_pct") is None:
        return None
    v, p, drift = speed["validating_s"], speed["profiling_s"], speed["drift_pct"]
    text = (f"the machine ran {abs(drift):.1f}% {'slower' if drift > 0 else 'faster'} while validating than while "
            f"profiling (a reference GEMM: {(v['start'] + v['end']) / 2 * 1e3:.3f} against "
            f"{(p['start'] + p['end']) / 2 * 1e3:.3f} ms)")
    if abs(drift) >= 5.0:
        return f"WARNING: {text}; the errors above include that drift"
    return f"machine speed: {text}"


def median_error_line(summary: dict) -> str:
    """The one-line headline: median and P95 absolute percentage error over all executed iterations."""
    s = summary["all"]
    return (f"median absolute percentage error {s['median_abs_error_pct']:.1f}% "
            f"(P95 {s['p95_abs_error_pct']:.1f}%) over {s['iterations']} iterations")


__all__ = ["KINDS", "VALIDATION_COLUMNS", "ValidationError", "ValidationReport", "composition", "error_summary",
           "error_table", "kv_slots_needed", "last_iterations", "latency_summary", "latency_table",
           "machine_speed", "machine_speed_line", "median_error_line", "plot_validation", "profile_meta",
           "profiled_threads", "retime_requests", "run_validation", "stratified_sample", "validation_row"]
