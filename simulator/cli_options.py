"""Options and error handling shared by every ``servesim`` command that runs simulations.

Command modules (``simulator.cli``, ``simulator.cli_experiments``, ``simulator.cli_profile``, ``simulator.cli_validate``)
import from here, and only ``simulator.cli`` registers commands, so no import cycle exists whichever module a
process imports first.
"""
from __future__ import annotations

import functools
import sys

import click

from simulator.config import SimConfig, load_config

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError)


def _click_type(key: str, f):
    from simulator.config import _CHECKS

    kind, allowed = _CHECKS[key]
    if kind == "choice":
        return click.Choice(allowed)
    if kind in ("posint", "optposint", "nonnegint"):
        return int
    if kind in ("posfloat", "optposfloat", "optnonnegfloat", "fraction", "optfraction", "unitfraction"):
        return float
    return str


def config_options() -> list:
    """One click option per ``SimConfig`` key, generated from the dataclass, ``config.HELP`` and the value checks:
    same name (``--token-budget`` = ``token_budget``), same type, the default shown. Unset flags are None, so a
    ``--config`` file's values stand unless a flag is given."""
    from dataclasses import MISSING, fields

    from simulator.config import FLAG_ALIASES, HELP, _CHECKS

    options = []
    for f in fields(SimConfig):
        flag = "--" + f.name.replace("_", "-")
        names = (flag, *FLAG_ALIASES.get(f.name, ()))
        default = f.default if f.default is not MISSING else None
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        kind = _CHECKS[f.name][0]
        if kind in ("bool", "optbool"):
            names = (f"{flag}/--no-{flag[2:]}",)
            options.append(click.option(*names, f.name, default=None, show_default=shown, help=HELP[f.name]))
        else:
            options.append(click.option(*names, f.name, type=_click_type(f.name, f), default=None,
                                        show_default=shown, help=HELP[f.name]))
    return options


def simulate_options(func):
    """The options shared by every command that runs simulations (simulate, capacity, validate, ...): ``--config``
    and one flag per config key (``config_options``)."""
    options = [click.option("--config", "config_path", type=click.Path(dir_okay=False),
                            help="YAML file of these keys (flags override it).")] + config_options()
    for option in reversed(options):
        func = option(func)
    return func


def config_from_options(config_path=None, **flags) -> SimConfig:
    """Defaults < YAML file < flags (None flags ignored)."""
    keys = set(SimConfig.keys())
    return load_config(config_path, **{k: v for k, v in flags.items() if k in keys})


def user_errors(func):
    """Turn bad input into a one-line ``error: …`` with exit status 2, an unusable file or folder (OSError: no
    permission, disk full, ...) into ``error: FILE: reason`` with status 2, and any other exception (a bug) into
    ``error: internal error in servesim CMD: Type: message (rerun with --debug for the traceback)`` with status
    1; ``servesim --debug`` (or ``SERVESIM_DEBUG=1``) lets that exception through with its traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except USER_ERRORS as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(2)
        except Exception as exc:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().params.get("debug"):
                raise
            name = f"servesim {ctx.info_name}" if ctx is not None and ctx.parent is not None else "servesim"
            msg = " ".join(str(exc).split()) or "(no message)"
            click.echo(f"error: internal error in {name}: {type(exc).__name__}: {msg} "
                       f"(rerun with --debug for the traceback)", err=True)
            sys.exit(1)
    return wrapper
