"""``servesim`` command line (click). Flags and YAML config keys are the same names (``--token-budget`` is
``token_budget``); flags override the file, the file overrides the defaults.

Bad input (unknown model/device/scheduler, malformed trace or config) ends with a one-line ``error: …`` and exit
status 2, never a traceback.
"""
from __future__ import annotations

import sys

import click

from simulator.cli_options import config_from_options, simulate_options, user_errors


def _fmt(seconds):
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def summary_table(summary: dict) -> str:
    """A readable table of a run's summary."""
    rows = [("metric", "mean", "p50", "p90", "p99", "max")]
    for key, label in [("ttft_s", "TTFT"), ("tbt_s", "TBT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E latency"),
                       ("scheduling_delay_s", "scheduling delay")]:
        d = summary[key]
        rows.append((label, *(_fmt(d[k]) for k in ("mean", "p50", "p90", "p99", "max"))))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    kv = summary.get("kv_cache_utilization", {})
    lines += [
        "",
        f"requests completed {summary['requests_completed']}, rejected {summary['requests_rejected']}, "
        f"preemptions {summary['num_preemptions']}, iterations {summary.get('num_iterations', '-')}",
        f"throughput {summary['throughput_tokens_per_s']:.0f} tokens/s "
        f"({summary.get('output_throughput_tokens_per_s', 0):.0f} output tokens/s, "
        f"{summary.get('throughput_requests_per_s', 0):.2f} requests/s) over {summary['makespan_s']:.1f} s",
    ]
    if kv.get("mean") is not None:
        lines.append(f"KV-cache utilization mean {kv['mean']:.1%}, max {kv['max']:.1%}")
    for example in summary.get("rejected_examples", []):
        lines.append(f"rejected: {example}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="servesim")
def main():
    """servesim: simulate LLM serving (Orca, vLLM, Sarathi-Serve) with profiled or analytical GPU cost models."""


@main.command()
@simulate_options
@click.option("--out", type=click.Path(file_okay=False), default="runs/simulate", show_default=True,
              help="Folder for summary.json, requests.csv, iterations.csv.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--tokens", is_flag=True, help="Also write tokens.csv, one row per output token (large).")
@user_errors
def simulate(out, progress, tokens, **flags):
    """Simulate one replica and write summary.json, requests.csv and iterations.csv."""
    from simulator.simulation import simulate as run

    config = config_from_options(**flags)
    if progress is None:
        progress = sys.stderr.isatty()
    result = run(config, progress=progress)
    path = result.write(out, tokens=tokens)
    c = config
    click.echo(f"{c.model} on {c.device} (tp={c.tp}, pp={c.pp}), scheduler {c.scheduler}"
               + (f" budget {c.token_budget}" if c.scheduler == "sarathi" else "")
               + f", trace {c.trace}, {len(result.requests)} requests, seed {c.seed}")
    click.echo(summary_table(result.summary))
    click.echo(f"wrote {path}/summary.json, requests.csv, iterations.csv" + (", tokens.csv" if tokens else ""))


@main.command("specs")
def specs():
    """List the built-in models and devices."""
    from cost_models.specs import known_devices, known_models
    click.echo("models:  " + ", ".join(known_models()))
    click.echo("devices: " + ", ".join(known_devices()))


# Commands of other parts of servesim live beside the code they drive and register here. Their modules must
# not import torch at import time (only inside the command), so `servesim simulate` works without torch.
from profiler.cli import fit as _fit, profile as _profile  # noqa: E402  (profiling and fitting, issue 3)
from profiler.cli_validate import validate as _validate  # noqa: E402  (validation, issue 4)
from simulator.cli_experiments import capacity, plot, regress, sweep  # noqa: E402  (issue 5)

for _command in (_profile, _fit, _validate, capacity, sweep, plot, regress):
    main.add_command(_command)
