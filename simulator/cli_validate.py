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
              show_default="cuda when available, else cpu",
              help="Torch device that executes the batches. "
                   "--device stays the device SPEC that the cost model and KV-cache sizing use.")
@click.option("--max-iterations", type=click.IntRange(min=1), default=None,
              show_default="every iteration, which also re-times the requests",
              help="Execute a stratified sample of N iterations (prefill-only, decode-only, mixed).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Untimed runs of each iteration before timing.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs of each iteration (the median is reported).")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              show_default="2 for a sample on a CPU, else 1",
              help="Measure each sampled iteration N times, 20 s apart, keeping the lowest median: a shared machine "
                   "runs slower in spells, as the CPU profiler's two rounds allow for.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              show_default="those the --cost-model was profiled with, else 1", help="CPU threads for torch.")
@click.option("--cpu-clock", type=click.Choice(["thread", "wall"]), default="thread", show_default=True,
              help="CPU timing: the executing thread's CPU time (with one thread; leaves out time slices other "
                   "processes take on a shared machine) or wall time.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/validate", show_default=True,
              help="Folder for validation.csv, validation.png, validation_summary.json (resumes if present).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
@click.option("--observed", type=click.Path(file_okay=False), default=None, show_default="none",
              help="Instead of executing batches: check servesim against a real engine's run (a `servesim observe` "
                   "folder): step-by-step schedule agreement and TTFT/TBT/E2E error, priced by --cost-model on "
                   "--device (default cpu). The workload and scheduler settings come from the observed run.")
@user_errors
def validate(exec_device, max_iterations, warmup, repeats, rounds, threads, cpu_clock, out, progress, observed,
             **flags):
    """Simulate, execute the simulated iterations on a device and print the predicted-vs-measured error
    (or, with --observed, compare servesim with a real vLLM run)."""
    if observed:
        return _validate_observed(observed, out, flags)
    from simulator.validate import (ValidationError, error_table, latency_table, machine_speed_line, median_error_line,
                                    run_validation)

    if importlib.util.find_spec("torch") is None:
        raise ValidationError("validate executes on a device with torch: pip install -e '.[profile]'")
    config = config_from_options(**flags)
    if progress is None:
        progress = sys.stderr.isatty()
    exec_device = exec_device or _default_exec_device()
    report = run_validation(config, out_dir=out, exec_device=exec_device, max_iterations=max_iterations,
                            warmup=warmup, repeats=repeats, rounds=rounds, threads=threads, cpu_clock=cpu_clock,
                            progress=progress, echo=click.echo)
    c = config
    click.echo(f"{c.model}: cost model {c.cost_model or 'roofline'} for device {c.device}, scheduler {c.scheduler}, "
               f"trace {c.trace}, executed on {exec_device}")
    click.echo(error_table(report.summary))
    if report.latency is not None:
        click.echo("")
        click.echo(latency_table(report.latency["predicted"], report.latency["measured"]))
    click.echo(median_error_line(report.summary))
    speed = machine_speed_line(report.machine_speed)
    if speed:
        click.echo(speed)
    click.echo(f"wrote {report.out_dir}/validation.csv, validation.png, validation_summary.json")


def _validate_observed(observed: str, out: str, flags: dict) -> None:
    """``servesim validate --observed DIR``: ``simulator.validate_observed.validate_observed`` and its report."""
    from simulator.validate_observed import validate_observed

    ctx = click.get_current_context()
    kept = {"cost_model", "device", "config_path"}
    ignored = sorted(k for k in flags if k not in kept
                     and ctx.get_parameter_source(k) not in (None, click.core.ParameterSource.DEFAULT))
    if flags.get("config_path"):
        ignored.append("config")
    for name in ignored:
        click.echo(f"note: --{name.replace('_', '-')} ignored with --observed: the observed run fixes the "
                   f"workload and the scheduler settings", err=True)
    report = validate_observed(observed, out, cost_model=flags.get("cost_model"), device=flags.get("device") or "cpu")
    sched = report["schedule"]
    click.echo(f"observed {report['engine']} {report['vllm_version']} run {report['observed']}; "
               f"cost model: {report['cost_model'].get('kind', 'roofline')}")
    click.echo(f"schedule agreement: {sched['agreeing']}/{sched['steps']} steps "
               f"({100 * (sched['agreement'] or 0):.1f}%); preemptions observed {report['observed_preemptions']}, "
               f"simulated {report['simulated_preemptions']}")
    first = sched["first_divergence"]
    if first:
        click.echo(f"first divergence at step {first['step']} (t={first['start_s']:.4f} s): observed "
                   f"{first['observed']}, simulated {first['simulated']}")
    click.echo(f"{'metric':<8} {'':>4} {'observed':>12} {'predicted':>12} {'error':>8}")
    for metric, rows in report["latency"].items():
        for q, row in rows.items():
            o, p, e = row["observed"], row["predicted"], row["error"]
            click.echo(f"{metric[:-2].upper():<8} {q:>4} {_ms(o):>12} {_ms(p):>12} "
                       f"{'-' if e is None else f'{100 * e:+.1f}%':>8}")
    click.echo(f"wrote {out}/observed_validation.json, agreement.csv, observed_validation.png")


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f} ms"
