"""``servesim capacity``, ``sweep``, ``plot`` and ``regress``: the experiment commands, and the capacity baseline.

``simulator.cli`` registers these commands; shared options come from ``simulator.cli_options``. Nothing here
imports torch.

The capacity baseline (``experiments/baselines/capacity.json``) holds the capacities of a small fixed set of
configurations (``entries``: a ``name``, a sweep ``point`` and its ``capacity_qps``), the capacity-search settings
(``search``) and the relative ``tolerance``. ``servesim regress`` recomputes every entry and fails (exit 1) with
a table of the ones that moved by more than the tolerance; ``servesim regress --update`` rewrites the numbers.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import click
import yaml

from simulator.cli_options import config_from_options, simulate_options, user_errors
from simulator.slo import DEFAULT_DECODE_DEADLINE_S, DEFAULT_TTFT_SLACK_S, SLO_LEVELS, SLO_NAMES

DEFAULT_BASELINE = Path(__file__).resolve().parent.parent / "experiments" / "baselines" / "capacity.json"


def _fmt_s(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def trial_line(i: int, t) -> str:
    """One line describing a capacity trial."""
    status = "pass" if t.met else "FAIL"
    if t.stopped_early:
        detail = f"stopped early: {t.stop_reason}"
    else:
        detail = ", ".join(f"{k} {v:.3f}" if k.startswith("deadline_miss_rate") and v is not None
                           else f"{k} {_fmt_s(v)}" for k, v in t.values.items())
    return f"trial {i:2d}: {t.qps:8.4g} QPS  {status}  {detail}"


def slo_options(func):
    """The SLO flags of commands that check one (capacity, replicas); the command receives ``slo_flags``."""
    options = [
        click.option("--slo", "slo_name", type=click.Choice(SLO_NAMES), default="sarathi", show_default=True,
                     help="sarathi: P99 TBT and median scheduling delay <= 2 s; vidur: P99 scheduling delay <= 5 s; "
                          "deadline: Etalon fluidity (P99 deadline-miss rate <= 10%); distserve: P90 TTFT and P90 "
                          "TPOT (--ttft-slo, --tpot-slo)."),
        click.option("--slo-level", type=click.Choice(SLO_LEVELS), default="strict", show_default=True,
                     help="The paper's strict or relaxed TBT SLO for the model (sarathi)."),
        click.option("--tbt-slo", type=float, show_default="the paper's for the model and --slo-level",
                     help="P99 TBT limit in seconds (sarathi)."),
        click.option("--ttft-slo", type=float, show_default="none; distserve needs it",
                     help="TTFT limit in seconds (distserve)."),
        click.option("--tpot-slo", type=float, show_default="none; distserve needs it",
                     help="TPOT limit in seconds (distserve)."),
        click.option("--decode-deadline", type=float, show_default=str(DEFAULT_DECODE_DEADLINE_S),
                     help="Decode deadline D_d in seconds (deadline SLO)."),
        click.option("--ttft-slack", type=float, show_default=str(DEFAULT_TTFT_SLACK_S),
                     help="First-token slack over predicted prefill, seconds (deadline SLO)."),
    ]

    @functools.wraps(func)
    def wrapper(*args, slo_name, slo_level, tbt_slo, ttft_slo, tpot_slo, decode_deadline, ttft_slack, **kwargs):
        flags = {"name": slo_name, "level": slo_level, "tbt_slo_s": tbt_slo, "ttft_slo_s": ttft_slo,
                 "tpot_slo_s": tpot_slo, "decode_deadline_s": decode_deadline, "ttft_slack_s": ttft_slack}
        return func(*args, slo_flags=flags, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def make_slo_from(flags: dict, model: str):
    from simulator.slo import make_slo

    flags = dict(flags)
    return make_slo(flags.pop("name"), model=model, **flags)


@click.command("capacity")
@simulate_options
@slo_options
@click.option("--rel-tol", type=float, default=0.025, show_default=True, help="Stop when hi/lo - 1 <= this.")
@click.option("--max-trials", type=click.IntRange(min=2), default=20, show_default=True,
              help="Most simulations in the search.")
@click.option("--min-qps", type=float, show_default="the first trial's QPS / 64", help="Give up below this QPS.")
@click.option("--early-stop/--no-early-stop", default=True, show_default=True,
              help="End a trial once its SLO failure is certain (exact).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/capacity", show_default=True,
              help="Folder for capacity.json and trials.csv.")
@user_errors
def capacity(slo_flags, rel_tol, max_trials, min_qps, early_stop, out, **flags):
    """Find the highest QPS at which the configuration meets the SLO (--qps is the first trial's QPS)."""
    from simulator.capacity import find_capacity
    from simulator.simulation import build

    config = config_from_options(**flags)
    slo = make_slo_from(slo_flags, config.model)
    dep = build(config)
    click.echo(deployment_line(dep) + f"; SLO {slo.name}: {slo.describe()}")
    from simulator.simulation import ignored_options

    for key, reason in ignored_options(config).items():
        click.echo(f"note: --{key.replace('_', '-')} ignored: {reason}")
    counter = iter(range(1, 10**6))
    start = time.perf_counter()
    result = find_capacity(config, slo, rel_tol=rel_tol, max_trials=max_trials, min_qps=min_qps,
                           early_stop=early_stop, on_trial=lambda t: click.echo(trial_line(next(counter), t)))
    wall = time.perf_counter() - start
    path = result.write(out)
    bracket = f" (fails at {result.hi_qps:.4g})" if result.hi_qps is not None else ""
    click.echo(f"capacity: {result.capacity_qps:.4g} QPS{bracket}, {result.capacity_qps / dep.gpus:.4g} QPS per GPU "
               f"on {dep.gpus} GPUs; {len(result.trials)} trials in {wall:.1f} s"
               + (f"; note: {result.note}" if result.note else ""))
    at = [t for t in result.trials if t.qps == result.capacity_qps]
    rate = at[0].summary.get("arrival_qps") if at else None
    beyond = at[0].summary.get("extrapolated_share") if at else None
    if beyond:
        click.echo(f"WARNING: at {result.capacity_qps:.4g} QPS the fitted cost model priced {beyond:.1%} of the "
                   f"micro-batches beyond its profiled shapes (run simulate at that QPS for the dimensions)")
    if rate and abs(rate - result.capacity_qps) > 0.1 * result.capacity_qps:
        click.echo(f"note: at {result.capacity_qps:.4g} QPS the trace's requests arrive at {rate:.4g} per second "
                   f"(first to last arrival): its arrivals do not follow --qps alone (e.g. a multi-turn workload's "
                   f"later turns follow think times), so compare capacities at the arrival rate")
    click.echo(f"wrote {path} and trials.csv")


def deployment_line(dep) -> str:
    """One line naming the deployment: model, device, parallelism and replicas, scheduler, trace, cost model."""
    c = dep.config
    if c.disaggregated:
        shape = (f"{c.prefill_replicas} prefill (tp={c.prefill_tp or c.tp}, pp={c.prefill_pp or c.pp}) + "
                 f"{c.decode_replicas} decode (tp={c.decode_tp or c.tp}, pp={c.decode_pp or c.pp}) replicas")
    else:
        shape = f"tp={c.tp}, pp={c.pp}" + (f", {c.replicas} replicas, router {c.router}" if c.replicas > 1 else "")
    sched = c.scheduler + (f" budget {c.token_budget}" if "token_budget" in dep.scheduler_kw else "")
    cm = dep.describe()["cost_model"]
    cost = {"roofline": lambda: f"roofline, {cm.get('calibration_line') or cm['constants']}",
            "fitted": lambda: f"fitted to profile {cm['profile_hash']} ({cm['profiled_device']})"}.get(
        cm["kind"], lambda: cm["kind"])()
    engine = cm.get("engine") or (cm.get("roofline") or {}).get("engine")
    if engine:
        cost += f"; engine overhead {engine}"
    return (f"{dep.model.name} on {dep.device.name} ({shape}; {dep.gpus} GPUs, node {dep.node.name}), "
            f"scheduler {sched}, trace {c.trace}, seed {c.seed}, cost model {cost}")


@click.command("replicas")
@simulate_options
@slo_options
@click.option("--target-qps", type=float, required=True, help="The arrival rate the cluster must serve.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=64, show_default=True,
              help="Give up above this many replicas.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/replicas", show_default=True,
              help="Folder for replicas.json.")
@user_errors
def replicas(slo_flags, target_qps, max_replicas, out, **flags):
    """How many replicas meet the SLO at --target-qps: the smallest N (a single-replica capacity search, then one
    trial per candidate N at the target rate)."""
    from simulator.simulation import build
    from simulator.sizing import find_replica_count
    from traces.tables import write_json_atomic

    config = config_from_options(**flags)
    slo = make_slo_from(slo_flags, config.model)
    click.echo(deployment_line(build(config.with_(replicas=1))) + f"; SLO {slo.name}: {slo.describe()}")
    result = find_replica_count(config, slo, target_qps, max_replicas=max_replicas,
                                on_check=lambda n, t: click.echo(
                                    f"{n:3d} replicas at {target_qps:g} QPS: {'pass' if t.met else 'FAIL'}"))
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "replicas.json", result.to_dict())
    click.echo(f"{result.replicas} replicas ({result.gpus} GPUs) serve {target_qps:g} QPS under the SLO; one replica's "
               f"capacity is {result.single_replica_capacity_qps:.4g} QPS; wrote {out}/replicas.json")


@click.command("reproduce")
@click.option("--out", type=click.Path(file_okay=False), default="runs/reproduce", show_default=True,
              help="Folder for the sweeps and report.md (resumable).")
@click.option("--only", show_default="all", help="Comma-separated setups: mistral, yi, llama, falcon.")
@click.option("--quick", is_flag=True, help="A small subset (64 requests per trial, Mistral-7B, sharegpt, strict).")
@click.option("--jobs", type=click.IntRange(min=1), show_default="all CPUs", help="Worker processes for the sweeps.")
@user_errors
def reproduce(out, only, quick, jobs):
    """The Sarathi-Serve paper's capacity matrix, Table 4 and batch times beside servesim's: report.md."""
    from simulator.reproduce import reproduce as run

    path = run(out, quick=quick, setups=only.split(",") if only else None, jobs=jobs,
               progress=lambda key: click.echo(f"{key}: done"))
    click.echo(Path(path).read_text())
    click.echo(f"wrote {path}")


def _parse_assignments(items, *, lists: bool) -> dict:
    """``KEY=V`` (or ``KEY=V1,V2`` when ``lists``) strings to a dict; values parsed as YAML scalars."""
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise click.BadParameter(f"{item!r}: no KEY before '='")
        if lists and any(not v.strip() for v in value.split(",")):
            raise click.BadParameter(f"{item!r}: an empty value in the list (write KEY=V1,V2; 'null' for the default)")
        values = [yaml.safe_load(v) for v in value.split(",")] if lists else yaml.safe_load(value)
        out[key] = values
    return out


@click.command("sweep")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Sweep YAML (mode, base, grid, search); see simulator/sweep.py.")
@click.option("--out", type=click.Path(file_okay=False), show_default="runs/sweep/<config name>",
              help="Results folder.")
@click.option("--grid", "grid_items", multiple=True, metavar="KEY=V1,V2", show_default="the file's grid",
              help="Add or replace a grid axis.")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE", show_default="the file's base",
              help="Add or replace a base key.")
@click.option("--mode", type=click.Choice(["capacity", "qps"]), show_default="the file's",
              help="Override the file's mode.")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), show_default="all CPUs", help="Local worker processes.")
@click.option("--ray-address", show_default="start or join a local instance", help="Ray cluster address.")
@click.option("--limit", type=click.IntRange(min=1), show_default="all remaining points",
              help="Run at most N of the remaining points now (resume later).")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write the figures when complete.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def sweep(config_path, out, grid_items, set_items, mode, backend, jobs, ray_address, limit, plot, progress):
    """Run a grid of capacity searches or QPS points; results append to OUT/sweep.csv and resume."""
    from simulator.sweep import load_sweep, run_sweep

    spec = load_sweep(config_path, grid=_parse_assignments(grid_items, lists=True),
                      base=_parse_assignments(set_items, lists=False), mode=mode)
    out = Path(out or Path("runs") / "sweep" / Path(config_path).stem)
    points = spec.points()
    click.echo(f"sweep {config_path}: {len(points)} points ({spec.mode}), backend {backend}, results {out}/sweep.csv")
    progress = sys.stderr.isatty() if progress is None else progress
    table = run_sweep(spec, out, backend=backend, jobs=jobs, ray_address=ray_address, progress=progress,
                      limit=limit)
    if len(table) < len(points):
        click.echo(f"{len(table)} of {len(points)} points done; rerun the same command to finish")
        return
    shown = [c for c in table.columns if c in ("scheduler", "token_budget", "trace", "slo_level", "qps",
                                               "capacity_qps", "tbt_s_p99", "ttft_s_p50")]
    click.echo(table[shown].to_string(index=False))
    if plot:
        from simulator.plots import plot_paths
        paths = plot_paths([out / "sweep.csv"], out)
        click.echo("wrote " + ", ".join(str(p) for p in paths))


@click.command("plot")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default="runs/plots", show_default=True)
@click.option("--window", nargs=2, type=float, metavar="START END", show_default="5 s from the busiest iteration",
              help="Timeline window in simulated seconds.")
@user_errors
def plot(paths, out, window):
    """Figures (PNG and SVG) from sweep tables (capacity vs token budget, latency vs QPS) and simulate folders
    (CDFs of TTFT/TBT/scheduling delay, batch-composition timeline)."""
    from simulator.plots import plot_paths

    written = plot_paths(paths, out, window_s=tuple(window) if window else None)
    click.echo("wrote " + ", ".join(str(p) for p in written))


# --- capacity baseline ----------------------------------------------------------------------------------------

def read_baseline(path: str | Path) -> dict:
    """Read a capacity baseline; raise ValueError naming the file and the missing field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: baseline not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    for key in ("tolerance", "search", "entries"):
        if key not in data:
            raise ValueError(f"{path}: missing field {key!r}")
    for i, entry in enumerate(data["entries"]):
        for key in ("name", "point"):
            if key not in entry:
                raise ValueError(f"{path}: entries[{i}]: missing field {key!r}")
    return data


def compute_capacities(entries, search: dict, jobs: int = 1) -> list[float]:
    """Capacity (QPS) of each baseline entry's point, in order (``jobs`` processes; 1 runs here)."""
    from simulator.sweep import run_point

    if jobs == 1:
        results = [run_point(e["point"], "capacity", search) for e in entries]
    else:
        from joblib import Parallel, delayed
        results = Parallel(n_jobs=jobs)(delayed(run_point)(e["point"], "capacity", search) for e in entries)
    return [row["capacity_qps"] for row, _ in results]


def compare(entries, current: list[float], tolerance: float) -> tuple[list[str], list[str]]:
    """``(table lines, names that moved more than tolerance)``; relative change vs the baseline capacity.

    An entry without a baseline number, or whose capacity moved by more than ``tolerance`` (relative), fails.
    """
    width = max([len("configuration")] + [len(e["name"]) for e in entries])
    lines = [f"{'configuration':<{width}}  {'baseline':>9} {'now':>9} {'change':>8}  status"]
    failed = []
    for entry, now in zip(entries, current):
        base = entry.get("capacity_qps")
        if base is None:
            change, ok = float("nan"), False
        elif base == 0:
            change, ok = (0.0 if now == 0 else float("inf")), now == 0
        else:
            change = now / base - 1
            ok = abs(change) <= tolerance
        if not ok:
            failed.append(entry["name"])
        base_text = "-" if base is None else f"{base:.4g}"
        lines.append(f"{entry['name']:<{width}}  {base_text:>9} {now:>9.4g} {change:>+8.1%}  "
                     f"{'ok' if ok else 'MOVED'}")
    return lines, failed


@click.command("regress")
@click.option("--baseline", "baseline_path", type=click.Path(dir_okay=False), default=str(DEFAULT_BASELINE),
              show_default=True, help="Capacity baseline JSON.")
@click.option("--update", is_flag=True, help="Recompute and rewrite the baseline's capacities.")
@click.option("--only", multiple=True, metavar="NAME", show_default="all entries", help="Check only these entries.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, show_default="one per entry, at most all CPUs",
              help="Worker processes.")
@user_errors
def regress(baseline_path, update, only, jobs):
    """Recompute the baseline capacities; exit 1 with a diff if any moved by more than the tolerance."""
    from traces.tables import write_json_atomic

    data = read_baseline(baseline_path)
    entries = data["entries"]
    if only:
        unknown = sorted(set(only) - {e["name"] for e in entries})
        if unknown:
            raise ValueError(f"{baseline_path}: no entry named {unknown[0]!r}")
        entries = [e for e in entries if e["name"] in only]
    jobs = jobs or min(len(entries), os.cpu_count() or 1)
    start = time.perf_counter()
    current = compute_capacities(entries, data["search"], jobs)
    wall = time.perf_counter() - start
    if update:
        by_name = dict(zip((e["name"] for e in entries), current))
        for e in data["entries"]:
            if e["name"] in by_name:
                e["capacity_qps"] = by_name[e["name"]]
        write_json_atomic(baseline_path, data)
        click.echo(f"updated {len(by_name)} capacities in {baseline_path} ({wall:.0f} s)")
        return
    lines, failed = compare(entries, current, data["tolerance"])
    click.echo("\n".join(lines))
    if failed:
        click.echo(f"capacity regression: {len(failed)} of {len(entries)} configurations moved by more than "
                   f"{data['tolerance']:.0%} ({', '.join(failed)}); if intended, run: servesim regress --update",
                   err=True)
        sys.exit(1)
    click.echo(f"all {len(entries)} capacities within {data['tolerance']:.0%} of the baseline ({wall:.0f} s)")

