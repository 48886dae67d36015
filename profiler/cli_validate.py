"""``servesim validate``: execute a simulation's batches on a real device and report the cost model's error.

Kept free of torch at import time (torch is imported when the command runs), so ``servesim simulate`` works
without torch installed.
"""
from __future__ import annotations

import importlib.util
import sys

import click

from simulator.cli_options import config_from_options, simulate_options, user_errors


def _default_exec_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command("validate")
@simulate_options
@click.option("--exec-device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Torch device that executes the batches (default: cuda when available, else cpu). "
                   "--device stays the device SPEC that the cost model and KV-cache sizing use.")
@click.option("--max-iterations", type=click.IntRange(min=1), default=None,
              help="Execute a stratified sample of N iterations (prefill-only, decode-only, mixed); "
                   "default: every iteration, which also re-times the requests.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Untimed runs of each iteration before timing.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs of each iteration (the median is reported).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: those the --cost-model was profiled with, else 1).")
@click.option("--cpu-clock", type=click.Choice(["thread", "wall"]), default="thread", show_default=True,
              help="CPU timing: the executing thread's CPU time (with one thread; leaves out time slices other "
                   "processes take on a shared machine) or wall time.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/validate", show_default=True,
              help="Folder for validation.csv, validation.png, validation_summary.json (resumes if present).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
@user_errors
def validate(exec_device, max_iterations, warmup, repeats, threads, cpu_clock, out, progress, **flags):
    """Simulate, execute the simulated iterations on a device and print the predicted-vs-measured error."""
    from profiler.validate import ValidationError, error_table, latency_table, median_error_line, run_validation

    if importlib.util.find_spec("torch") is None:
        raise ValidationError("validate executes on a device with torch: pip install -e '.[profile]'")
    config = config_from_options(**flags)
    if progress is None:
        progress = sys.stderr.isatty()
    exec_device = exec_device or _default_exec_device()
    report = run_validation(config, out_dir=out, exec_device=exec_device, max_iterations=max_iterations,
                            warmup=warmup, repeats=repeats, threads=threads, cpu_clock=cpu_clock,
                            progress=progress, echo=click.echo)
    c = config
    click.echo(f"{c.model}: cost model {c.cost_model or 'roofline'} for device {c.device}, scheduler {c.scheduler}, "
               f"trace {c.trace}, executed on {exec_device}")
    click.echo(error_table(report.summary))
    if report.latency is not None:
        click.echo("")
        click.echo(latency_table(report.latency["predicted"], report.latency["measured"]))
    click.echo(median_error_line(report.summary))
    click.echo(f"wrote {report.out_dir}/validation.csv, validation.png, validation_summary.json")
