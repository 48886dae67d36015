"""Options and error handling shared by every ``servesim`` command that runs simulations.

Command modules (``simulator.cli``, ``simulator.cli_experiments``, ``profiler.cli``, ``profiler.cli_validate``)
import from here, and only ``simulator.cli`` registers commands, so no import cycle exists whichever module a
process imports first.
"""
from __future__ import annotations

import functools
import sys

import click

from simulator.config import SCHEDULER_NAMES, SimConfig, load_config

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def simulate_options(func):
    """The options shared by every command that runs simulations (simulate, capacity, validate, ...)."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of these keys."),
        click.option("--model", help="Model name (e.g. Mistral-7B), YAML spec or Hugging Face config.json."),
        click.option("--device", help="Device name (A100, A100-80GB-PCIe, H100, H200, A40) or YAML spec."),
        click.option("--tp", type=int, help="Tensor-parallel degree."),
        click.option("--pp", type=int, help="Pipeline-parallel degree."),
        click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), help="Scheduling policy."),
        click.option("--token-budget", type=int, help="Sarathi-Serve token budget per iteration (tokens)."),
        click.option("--max-batch-size", type=int, help="Most running requests (default 128 vLLM/Sarathi, 16 Orca/FT)."),
        click.option("--max-num-batched-tokens", type=int, help="vLLM: most prompt tokens per prefill iteration."),
        click.option("--max-model-len", type=int, help="Longest request (prompt + output tokens)."),
        click.option("--cost-model", help="Folder of a fitted cost model (servesim fit); default: roofline."),
        click.option("--trace", help="sharegpt, arxiv, or a trace file (CSV, Azure CSV, Mooncake JSONL)."),
        click.option("--num-requests", type=int, help="Use the first N requests."),
        click.option("--qps", type=float, help="Arrival rate for generated or re-timed traces (requests/s)."),
        click.option("--arrival", type=click.Choice(["poisson", "gamma"]), help="Arrival process."),
        click.option("--cv", type=float, help="Coefficient of variation of gamma inter-arrival times."),
        click.option("--retime/--no-retime", default=None, help="Re-time a file trace's arrivals to --qps."),
        click.option("--shuffle/--no-shuffle", default=None, help="Seeded shuffle of a file trace."),
        click.option("--drop-long/--no-drop-long", default=None,
                     help="Drop over-long requests instead of shrinking them."),
        click.option("--seed", type=int, help="Seed of every random choice."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def config_from_options(config_path=None, **flags) -> SimConfig:
    """Defaults < YAML file < flags (None flags ignored)."""
    keys = set(SimConfig.keys())
    return load_config(config_path, **{k: v for k, v in flags.items() if k in keys})


def user_errors(func):
    """Turn bad input into a one-line ``error: …`` with exit status 2."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except USER_ERRORS as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)
    return wrapper
