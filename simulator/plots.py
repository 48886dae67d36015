"""Figures of sweeps and runs (matplotlib, Agg; each saved as PNG and SVG).

- ``capacity_figure(table)``: capacity (QPS) vs token budget, one line per scheduler (schedulers without a token
  budget — vLLM, Orca — are horizontal dashed lines); one panel per combination of the other varying keys
  (e.g. trace x SLO level). Input: a capacity-mode sweep table.
- ``latency_figure(table)``: latency-throughput curves — P99 TBT and median TTFT vs QPS, one line per
  configuration. Input: a qps-mode sweep table.
- ``cdf_figure(runs)``: CDFs of TTFT, TBT and scheduling delay of one or more simulate runs.
- ``timeline_figure(iterations)``: batch composition per iteration — prefill and decode tokens (stacked) over
  simulated time. Input: a run's ``iterations.csv``.

``plot_paths`` picks the figures for files and folders (a sweep's ``sweep.csv`` or folder, a ``servesim simulate``
folder). Figures are built on ``matplotlib.figure.Figure`` (no pyplot state) and saved with fixed metadata so the
same input gives the same files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.sweep import CAPACITY_RESULTS, QPS_RESULTS, TABLE

SAVE_FORMATS = ("png", "svg")


class PlotError(ValueError):
    """An input the plots cannot use."""


def save(fig, out_dir: str | Path, name: str) -> list[Path]:
    """Save ``fig`` as ``out_dir/name.png`` (150 dpi) and ``.svg``; return the paths."""
    import matplotlib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "servesim", "svg.fonttype": "none"}):
        for fmt in SAVE_FORMATS:
            path = out / f"{name}.{fmt}"
            meta = {"Date": None} if fmt == "svg" else {"Software": None}
            fig.savefig(path, dpi=150, bbox_inches="tight", metadata=meta)
            paths.append(path)
    return paths


def _figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _point_columns(table: pd.DataFrame, results) -> list[str]:
    return [c for c in table.columns if c != "point_key" and c not in results]


def _varying(table: pd.DataFrame, columns) -> list[str]:
    return [c for c in columns if table[c].nunique(dropna=False) > 1]


def _label(row, keys) -> str:
    parts = []
    for k in keys:
        v = row[k]
        if isinstance(v, float) and np.isnan(v):
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        parts.append(f"{v}" if k in ("scheduler", "trace", "model", "device") else f"{k}={v}")
    return ", ".join(parts) or "all"


def _independent(table: pd.DataFrame, keys) -> list[str]:
    """``keys`` without those fixed by earlier ones (e.g. ``max_model_len`` when it follows ``trace``)."""
    kept = []
    for k in keys:
        if not kept or (table.groupby(kept, dropna=False)[k].nunique(dropna=False) > 1).any():
            kept.append(k)
    return kept


def _grid(n: int) -> tuple[int, int]:
    ncols = n if n <= 3 else math.ceil(math.sqrt(n))
    return ncols, -(-n // ncols)


def _facets(table: pd.DataFrame, keys):
    if not keys:
        return [("", table)]
    return [(_label(group.iloc[0], keys), group) for _, group in table.groupby(keys, sort=False, dropna=False)]


def _context(table: pd.DataFrame) -> str:
    """'model on device (tp=.., pp=..)' from the sweep's constant columns (defaults where absent)."""
    from simulator.config import SimConfig

    def one(col, default):
        if col in table and table[col].nunique(dropna=True) == 1:
            v = table[col].dropna().iloc[0]
            return int(v) if isinstance(v, float) and v.is_integer() else v
        return default if col not in table else None

    model, device = one("model", SimConfig.model), one("device", None) or one("node", None) or "A100-80GB-SXM"
    tp, pp = one("tp", 1), one("pp", 1)
    par = ", ".join(f"{k}={v}" for k, v in (("tp", tp), ("pp", pp)) if v is not None)
    return f"{model} on {device}" + (f" ({par})" if par else "")


def run_label(summary: dict) -> str:
    """A legend entry for a simulate run: scheduler, its budget, and the offered load."""
    c = summary.get("config", {})
    label = c.get("scheduler", "?")
    if c.get("scheduler") in ("sarathi", "simple-chunking"):
        label += f" {c.get('token_budget')}"
    if c.get("replicas", 1) > 1:
        label += f" x{c['replicas']}"
    offered = (summary.get("load") or {}).get("offered_qps")
    if c.get("concurrency"):
        label += f", {c['concurrency']} clients"
    elif offered:
        label += f" @ {offered:.3g} QPS"
    return label


def capacity_figure(table: pd.DataFrame):
    """Capacity vs token budget per scheduler (see the module docstring). Raises PlotError without capacities."""
    if "capacity_qps" not in table or table.empty:
        raise PlotError("capacity plot: the table has no capacity_qps column (is it a capacity-mode sweep?)")
    points = _point_columns(table, CAPACITY_RESULTS)
    facet_keys = _independent(table, [c for c in _varying(table, points) if c not in ("scheduler", "token_budget")])
    facets = _facets(table, facet_keys)
    fig, axes = _figure(*_grid(len(facets)))
    budgets = sorted(table["token_budget"].dropna().unique()) if "token_budget" in table else []
    colors = {}
    for ax, (title, group) in zip(axes.flat, facets):
        for scheduler, rows in group.groupby("scheduler", sort=False):
            color = colors.setdefault(scheduler, f"C{len(colors)}")
            has_budget = "token_budget" in rows and rows["token_budget"].notna().any()
            if has_budget:      # a capacity per budget tried: points, not a line that would interpolate
                rows = rows.sort_values("token_budget")
                ax.plot(rows["token_budget"], rows["capacity_qps"], "o", ms=6, color=color,
                        label=f"{scheduler} (per token budget)")
            else:
                ax.axhline(rows["capacity_qps"].max(), color=color, ls="--", label=f"{scheduler} (no budget)")
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [f"{int(b)}" for b in budgets])
        ax.set_xlabel("token budget (tokens per iteration)")
        ax.set_ylabel("capacity (QPS)")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(facets):]:
        ax.set_visible(False)
    slo = table["slo_description"].dropna().unique() if "slo_description" in table else []
    fig.suptitle(f"{_context(table)}: capacity under the SLO" + (f" {slo[0]}" if len(slo) == 1 else ""),
                 fontsize=11)
    return fig


def latency_figure(table: pd.DataFrame):
    """P99 TBT and median TTFT vs QPS, one line per configuration. Raises PlotError for a non-qps table."""
    if "qps" not in table or "tbt_s_p99" not in table or table.empty:
        raise PlotError("latency plot: needs a qps-mode sweep table with qps and tbt_s_p99 columns")
    points = [c for c in _point_columns(table, QPS_RESULTS) if c != "qps"]
    series_keys = _independent(table, _varying(table, points))
    fig, axes = _figure(2)
    for i, (label, rows) in enumerate(_facets(table, series_keys)):
        rows = rows.sort_values("qps")
        axes[0, 0].plot(rows["qps"], rows["tbt_s_p99"], "o-", color=f"C{i}", label=label)
        axes[0, 1].plot(rows["qps"], rows["ttft_s_p50"], "o-", color=f"C{i}", label=label)
    for ax, what in zip(axes.flat, ("P99 TBT (s)", "median TTFT (s)")):
        ax.set_xlabel("load (QPS)")
        ax.set_ylabel(what)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    if "tbt_slo" in table and table["tbt_slo"].nunique() == 1:
        axes[0, 0].axhline(table["tbt_slo"].iloc[0], color="k", ls=":", label="TBT SLO")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{_context(table)}: latency vs load", fontsize=11)
    return fig


def _cdf(ax, values, label, color):
    a = np.sort(np.asarray(values, dtype=float))
    a = a[~np.isnan(a)]
    if a.size:
        ax.plot(a, np.arange(1, a.size + 1) / a.size, color=color, label=label)


def cdf_figure(runs: dict, title: str = ""):
    """CDFs of TTFT, TBT and scheduling delay. ``runs``: label -> ``(requests table, tbt gaps array)``."""
    fig, axes = _figure(3, width=4.2)
    if title:
        fig.suptitle(title, fontsize=11)
    for i, (label, (requests, gaps)) in enumerate(runs.items()):
        _cdf(axes[0, 0], requests["ttft_s"], label, f"C{i}")
        _cdf(axes[0, 1], gaps, label, f"C{i}")
        _cdf(axes[0, 2], requests["scheduling_delay_s"], label, f"C{i}")
    for ax, what in zip(axes.flat, ("TTFT (s)", "TBT (s)", "scheduling delay (s)")):
        ax.set_xscale("log")
        ax.set_xlabel(what)
        ax.set_ylabel("fraction")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=8)
    return fig


DEFAULT_WINDOW_S = 5.0


def default_window(iterations: pd.DataFrame, length_s: float = DEFAULT_WINDOW_S) -> tuple[float, float]:
    """``length_s`` seconds starting at the iteration with the largest batch (the run at its busiest)."""
    start = float(iterations["start_s"].iloc[int(iterations["batch_size"].to_numpy().argmax())])
    return start, start + length_s


def timeline_figure(iterations: pd.DataFrame, window_s: tuple[float, float] | None = None, title: str = ""):
    """Prefill and decode tokens per iteration over time (stacked steps), batch size below.

    ``window_s``: ``(start, end)`` seconds to show (default ``default_window``: 5 s from the busiest iteration;
    a whole run of 10^5 iterations is unreadable). Raises PlotError when the window holds no iteration.
    """
    window_s = window_s or default_window(iterations)
    it = iterations[(iterations["start_s"] >= window_s[0]) & (iterations["start_s"] < window_s[1])]
    if it.empty:
        raise PlotError("timeline: no iterations in the window")
    fig, axes = _figure(1, 2, width=9, height=2.6)
    t = it["start_s"].to_numpy()
    dec = it["num_decode_tokens"].to_numpy()
    pre = it["num_prefill_tokens"].to_numpy()
    ax = axes[0, 0]
    ax.fill_between(t, 0, dec, step="post", color="C0", alpha=0.8, lw=0, label="decode tokens")
    ax.fill_between(t, dec, dec + pre, step="post", color="C1", alpha=0.8, lw=0, label="prefill tokens")
    ax.set_ylabel("tokens per iteration")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{title or 'Batch composition'} ({window_s[0]:.1f}-{window_s[1]:.1f} s)", fontsize=10)
    axes[1, 0].step(t, it["batch_size"], where="post", color="C2", lw=0.8)
    axes[1, 0].set_ylabel("requests in batch")
    axes[1, 0].set_xlabel("simulated time (s)")
    for a in axes.flat:
        a.grid(alpha=0.3)
        a.set_xlim(t[0], t[-1] + it["duration_s"].iloc[-1])
    return fig


# --- files ----------------------------------------------------------------------------------------------------

def load_run(run_dir: str | Path):
    """``(requests table, TBT gaps, iterations table, summary)`` of a ``servesim simulate`` folder.

    TBT gaps come from ``tokens.csv`` (request_id, token_index, time_s) when present, else the run is replayed
    from ``summary.json``'s config (the simulator is deterministic, so this reproduces the same token times).
    Raises PlotError naming the folder when it is not a simulate output.
    """
    run = Path(run_dir)
    if not (run / "requests.csv").exists():
        raise PlotError(f"{run}: not a simulate output (no requests.csv)")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    requests = pd.read_csv(run / "requests.csv")
    iterations = pd.read_csv(run / "iterations.csv") if (run / "iterations.csv").exists() else None
    if (run / "tokens.csv").exists():
        tokens = pd.read_csv(run / "tokens.csv").sort_values(["request_id", "token_index"])
        same = tokens["request_id"].to_numpy()[1:] == tokens["request_id"].to_numpy()[:-1]
        gaps = np.diff(tokens["time_s"].to_numpy())[same]
    else:
        from simulator.config import SimConfig
        from simulator.metrics import tbt_gaps
        from simulator.simulation import simulate

        config = SimConfig(**summary["config"])
        gaps = tbt_gaps(simulate(config).requests)
    return requests, gaps, iterations, summary


def _sweep_table(path: Path) -> pd.DataFrame | None:
    csv = path / TABLE if path.is_dir() else path
    if csv.suffix == ".csv" and csv.exists() and csv.name != "requests.csv":
        return pd.read_csv(csv)
    return None


def plot_paths(paths, out_dir: str | Path, *, window_s: tuple[float, float] | None = None) -> list[Path]:
    """Write every figure that fits ``paths`` into ``out_dir``; return the files written.

    A sweep table (``sweep.csv`` or its folder) gives ``capacity_vs_token_budget`` (capacity mode) or
    ``latency_vs_qps`` (qps mode); simulate folders give ``cdfs`` (all runs overlaid, labelled by folder name)
    and ``timeline_<name>`` each. Raises PlotError for a path that is neither.
    """
    written, runs, contexts = [], {}, set()
    for p in map(Path, paths):
        table = _sweep_table(p)
        if table is not None:
            if "capacity_qps" in table:
                written += save(capacity_figure(table), out_dir, "capacity_vs_token_budget")
            else:
                written += save(latency_figure(table), out_dir, "latency_vs_qps")
            continue
        if not p.exists():
            raise PlotError(f"{p}: no such file or folder")
        requests, gaps, iterations, summary = load_run(p)
        label = run_label(summary) if summary else p.name
        while label in runs:
            label += "'"
        runs[label] = (requests, gaps)
        dep = summary.get("deployment", {})
        contexts.add(f"{dep.get('model', '?')} on {dep.get('device', '?')}")
        if iterations is not None and len(iterations):
            written += save(timeline_figure(iterations, window_s, title=f"Batch composition: {label}"),
                            out_dir, f"timeline_{p.name}")
    if runs:
        written += save(cdf_figure(runs, title=" / ".join(sorted(contexts))), out_dir, "cdfs")
    return written
