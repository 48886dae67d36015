"""The table of built-in workloads ``load_trace`` knows by name, and the one call that generates any of them.

=============  ==========================================================  ===============================
name           what                                                        options (keyword arguments)
=============  ==========================================================  ===============================
sharegpt       i.i.d. lognormal lengths fitted to Sarathi-Serve Table 2     none
               (openchat_sharegpt4), own max total 8192 tokens
arxiv          same for arxiv_summarization, own max total 16384            none
random         vLLM's ``random`` benchmark dataset: uniform lengths         ``input_len``, ``output_len``,
               around input_len / output_len (``traces.random_dataset``)   ``range_ratio``
conversation   multi-turn sessions sharing system prompts, with prefix-    ``traces.conversation.OPTIONS``
               block hashes (``traces.conversation``)
=============  ==========================================================  ===============================

``BUILTIN_WORKLOADS`` (``traces.synthetic``) keeps only the two lognormal workloads with their fitted
constants; ``WORKLOADS`` here lists every built-in name. Every generator takes ``num_requests``, ``qps``,
``seed``, ``arrival``, ``cv``, ``max_total_tokens`` and ``drop_long`` and returns a trace DataFrame with
``attrs["workload_changes"]`` (``traces.limits``); the i.i.d. ones (sharegpt, arxiv, random) also have a
generator of ``TraceColumns`` (``Workload.columns``), which ``traces.load_columns`` uses to skip pandas.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from . import conversation, random_dataset
from .schema import TraceColumns, TraceError
from .synthetic import BUILTIN_WORKLOADS, generate, generate_columns

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Workload:
    """A built-in workload: its generator, the names of the extra keyword options it accepts and, if it has
    one, the generator of the same trace as ``TraceColumns`` (same arguments)."""

    name: str
    generate: Callable[..., pd.DataFrame]
    options: tuple[str, ...] = ()
    columns: Callable[..., TraceColumns] | None = None


WORKLOADS: dict[str, Workload] = {
    **{name: Workload(name, partial(generate, name), columns=partial(generate_columns, name))
       for name in BUILTIN_WORKLOADS},
    "random": Workload("random", random_dataset.generate_random, ("input_len", "output_len", "range_ratio"),
                       random_dataset.generate_random_columns),
    "conversation": Workload("conversation", conversation.generate_conversation, conversation.OPTIONS),
}


def checked_workload(name: str, options=()) -> Workload:
    """The built-in workload ``name``, checking that it takes every option in ``options`` (names).

    Raises:
        TraceError: unknown name (known ones listed) or an option the workload does not take (its options
            listed).
    """
    if name not in WORKLOADS:
        raise TraceError(f"unknown built-in workload {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    workload = WORKLOADS[name]
    unknown = sorted(set(options) - set(workload.options))
    if unknown:
        takes = ", ".join(workload.options) if workload.options else "none"
        raise TraceError(f"unknown option {unknown[0]!r} for workload {name!r} (options: {takes})", name,
                         field=unknown[0])
    return workload


def generate_workload(name: str, num_requests: int, *, qps: float, seed: int, arrival: str = "poisson",
                      cv: float = 1.0, max_total_tokens: int | None = None, drop_long: bool = False,
                      **options) -> pd.DataFrame:
    """Generate the built-in workload ``name`` (a key of ``WORKLOADS``) with its ``options``.

    Raises:
        TraceError: unknown name (known ones listed), an option the workload does not take (its options
            listed), or whatever the generator raises for bad values.
    """
    return checked_workload(name, options).generate(num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                                                    max_total_tokens=max_total_tokens, drop_long=drop_long,
                                                    **options)
