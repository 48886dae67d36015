"""``servesim`` command line (click). Flags and YAML config keys are the same names (``--token-budget`` is
``token_budget``); flags override the file, the file overrides the defaults.

Bad input (unknown model/device/scheduler, malformed trace or config) ends with a one-line ``error: …`` and exit
status 2, never a traceback.
"""
from __future__ import annotations

import gc
import sys

import click

from simulator.cli_options import config_from_options, simulate_options, user_errors

GC_THRESHOLD = 20_000   # the cyclic collector's generation-0 threshold during a command (see OneLineErrors.main)


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
    from simulator.output import text_table

    lines = text_table(rows).split("\n")
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
    if summary.get("prefix_cache"):
        pc = summary["prefix_cache"]
        rate = "-" if pc["hit_rate"] is None else f"{pc['hit_rate']:.1%}"
        lines.append(f"prefix cache hit rate {rate} ({pc['hit_tokens']} of {pc['prompt_tokens']} prompt tokens), "
                     f"{pc['evictions']} evictions")
    for rep in summary.get("replicas", []) if len(summary.get("replicas", [])) > 1 or \
            any(r["pp"] > 1 for r in summary.get("replicas", [])) else []:
        busy = ", ".join(f"{f:.0%}" for f in rep["stage_busy_fraction"])
        lines.append(f"replica {rep['replica_id']} ({rep['pool']}, tp={rep['tp']}, pp={rep['pp']}): "
                     f"{rep['num_iterations']} micro-batches, stages busy {busy}")
    if summary.get("pools"):
        t = summary["kv_transfer_s"]
        lines.append(f"KV transfer per request: mean {_fmt(t['mean'])}, p99 {_fmt(t['p99'])}; decode queueing "
                     f"p50 {_fmt(summary['pools']['decode']['queueing_s']['p50'])}")
    for example in summary.get("rejected_examples", []):
        lines.append(f"rejected: {example}")
    w = summary.get("workload") or {}
    if w.get("num_shrunk") or w.get("num_dropped"):
        lines.append(f"workload changed: {w.get('num_shrunk', 0)} requests shrunk and {w.get('num_dropped', 0)} "
                     f"dropped to fit max_model_len {w.get('max_total_tokens')} (e.g. {'; '.join(w.get('examples', [])[:2])})")
    for key, reason in (summary.get("ignored_options") or {}).items():
        lines.append(f"note: --{key.replace('_', '-')} ignored: {reason}")
    load = summary.get("load") or {}
    if load.get("overloaded"):
        lines.append(f"WARNING: overloaded: {load['reason']}; latencies grow with the trace length")
    return "\n".join(lines)


class OneLineErrors(click.Group):
    """A command group whose usage errors (unknown option, bad choice, missing value) end with one line
    ``error: …`` naming the option and exit status 2, like every other bad input; ``lazy_commands`` maps a command
    name to ``"module:attribute"``, imported when the command is used (click's lazy subcommands pattern)."""

    lazy_commands: dict = {}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx, name):
        if name in self.lazy_commands and name not in self.commands:
            import importlib

            module, attr = self.lazy_commands[name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        """The command list of ``--help``, without importing the lazy commands."""
        rows = [(name, cmd.get_short_help_str(limit=70)) for name, cmd in self.commands.items()]
        rows += [(name, text) for name, (_, text) in self.lazy_commands.items() if name not in self.commands]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        # A run allocates and frees millions of small containers (plans, rows, token arrays) and makes almost no
        # reference cycles: at the default threshold (700) the cyclic collector ran some 1,600 times for 300,000
        # requests and found nothing to free, 2-3% of the run. Collect after 20,000 more containers instead.
        thresholds = gc.get_threshold()
        gc.set_threshold(GC_THRESHOLD, *thresholds[1:])
        try:
            return super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.exceptions.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        finally:
            gc.set_threshold(*thresholds)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--debug", is_flag=True, envvar="SERVESIM_DEBUG",
              help="Show the traceback of an internal error (a bug) instead of one line.")
@click.version_option(package_name="servesim")
def main(debug):
    """servesim: simulate LLM serving (Orca, vLLM, Sarathi-Serve) with profiled or analytical GPU cost models."""


@main.command()
@simulate_options
@click.option("--out", type=click.Path(file_okay=False), default="runs/simulate", show_default=True,
              help="Folder for summary.json, requests.csv, iterations.csv.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--tokens", is_flag=True, help="Also write tokens.csv, one row per output token (large).")
@click.option("--plans", is_flag=True, help="Also write plans.jsonl, one line per micro-batch: {request: tokens}.")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True,
              help="Format of the tables (requests, iterations, tokens).")
@user_errors
def simulate(out, progress, tokens, plans, fmt, **flags):
    """Simulate a deployment (one replica, a cluster, or prefill/decode pools) and write summary.json,
    requests.csv and iterations.csv."""
    from pathlib import Path

    from simulator.simulation import Outputs, simulate as run

    config = config_from_options(**flags)
    if progress is None:
        progress = sys.stderr.isatty()
    result = run(config, progress=progress, record_plans=plans, keep_requests=False,
                 outputs=Outputs(Path(out), fmt, tokens))
    path = result.write(plans=plans)
    click.echo(run_header(result))
    click.echo(summary_table(result.summary))
    extra = (f", tokens.{fmt}" if tokens else "") + (", plans.jsonl" if plans else "")
    click.echo(f"wrote {path}/summary.json, requests.{fmt}, iterations.{fmt}{extra}")


def run_header(result) -> str:
    """The first lines of a run: the deployment (``deployment_line``) and the offered load."""
    from simulator.cli_experiments import deployment_line

    load = result.summary.get("load") or {}
    offered = load.get("offered_qps")
    rate = f"{offered:.3g} QPS offered" if offered else "all at once"
    lines = [deployment_line(result.deployment), f"{result.recorder.n} requests, {rate}"]
    ext = result.summary.get("extrapolation")
    if ext is not None:
        from cost_models.fitted import describe_extrapolation

        lines.append(describe_extrapolation(ext))
    return "\n".join(lines)




@main.command("specs")
@user_errors
def specs():
    """The built-in models (parameters, KV bytes per token, context), devices (peak FLOP/s, bandwidth, memory,
    calibration of their cost constants), nodes (GPUs, links) and engine-overhead profiles."""
    from cost_models.roofline import describe_calibration
    from cost_models.specs import known_devices, known_models, load_device, load_model
    from cost_models.topology import known_nodes, load_node

    from simulator.output import text_table

    def table(rows):
        return text_table(rows, left=(0, -1), rule=False)

    rows = [("model", "params (B)", "layers", "hidden", "heads/kv", "KV bytes/token", "max_model_len", "context")]
    for name in known_models():
        m = load_model(name)
        rows.append((m.name, f"{m.num_params() / 1e9:.2f}", m.num_layers, m.hidden_size,
                     f"{m.num_attention_heads}/{m.num_kv_heads}", m.kv_bytes_per_token(), m.max_model_len,
                     m.max_context))
    click.echo(table(rows))
    click.echo("")
    rows = [("device", "fp16 TFLOP/s", "HBM GB/s", "memory GiB", "cost constants")]
    for name in known_devices():
        d = load_device(name)
        status = describe_calibration(d.name)
        rows.append((d.name, f"{d.flops('float16') / 1e12:.4g}", f"{d.memory_bandwidth_bytes_per_s / 1e9:.0f}",
                     f"{d.memory_bytes / 2**30:.0f}", status))
    click.echo(table(rows))
    click.echo("")
    rows = [("node", "device", "GPUs", "NVLink group", "links (GB/s per direction)")]
    for name in known_nodes():
        n = load_node(name)
        links = ", ".join(f"{k} {v.bandwidth_bytes_per_s / 1e9:.3g}" for k, v in n.links.items())
        rows.append((n.name, n.device.name, n.gpus_per_node, n.nvlink_group, links))
    click.echo(table(rows))
    click.echo("")
    from cost_models.engine_overhead import DEFAULT_ENGINE, PROFILES

    click.echo("engine profiles (--engine; per-iteration overhead beside the GPU time, default marked *):")
    for name in sorted(PROFILES):
        click.echo(f"{'*' if name == DEFAULT_ENGINE else ' '} {PROFILES[name].describe()}")


# Commands of other parts of servesim live beside the code they drive and are imported only when run (click's
# lazily loaded subcommands), so `servesim --help` and `servesim simulate` import nothing they do not use. Their
# modules must not import torch at import time (only inside the command), so they work without torch.
LAZY_COMMANDS = {       # name -> ("module:attribute", the line `servesim --help` shows)
    "capacity": ("simulator.cli_experiments:capacity", "Highest QPS meeting an SLO (capacity search)."),
    "replicas": ("simulator.cli_experiments:replicas", "How many replicas serve a target QPS under an SLO."),
    "sweep": ("simulator.cli_experiments:sweep", "A grid of capacity searches or QPS points (resumable)."),
    "plot": ("simulator.cli_experiments:plot", "Figures from sweep tables and simulate folders."),
    "regress": ("simulator.cli_experiments:regress", "Check the capacity baseline (CI)."),
    "reproduce": ("simulator.cli_experiments:reproduce", "The Sarathi-Serve paper's results beside servesim's."),
    "profile": ("simulator.cli_profile:profile", "Time a layer's operators over a shape grid (torch)."),
    "fit": ("simulator.cli_profile:fit", "Fit per-operator cost models to a profile (or import Vidur's)."),
    "validate": ("simulator.cli_validate:validate", "Replay simulated batches on a device; compare the times."),
    "observe": ("simulator.observe.cli:observe", "Run the real vLLM engine on a trace and record its steps."),
}
main.lazy_commands = LAZY_COMMANDS
