"""The trace schema every generator and loader returns, and the one error type for bad input.

A trace is a ``pandas.DataFrame`` with exactly these columns, in this order, sorted by arrival:

========================  =========  ==============================================================
column                    dtype      meaning
========================  =========  ==============================================================
``request_id``            int64      0..N-1 in arrival order
``arrival_s``             float64    arrival time in seconds (finite, >= 0, non-decreasing)
``prompt_tokens``         int64      prompt (prefill) length in tokens, >= 1
``output_tokens``         int64      output (decode) length in tokens, >= 1
========================  =========  ==============================================================
"""
from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS: tuple[str, ...] = ("request_id", "arrival_s", "prompt_tokens", "output_tokens")


class TraceError(ValueError):
    """Bad trace input or bad trace options. The message is always a single line.

    Format: ``"<source>: <unit> <line>: <field>: <problem>"``, leaving out the parts that do not apply,
    e.g. ``"conv.csv: line 7: ContextTokens: must be an integer >= 1, got '0'"``.

    Attributes:
        problem: what is wrong, without the location.
        source: the file path (or a label such as ``"trace"``), or None.
        line: the 1-based line number in the file (``unit="line"``) or the 0-based row position in a
            DataFrame (``unit="row"``), or None.
        field: the column / JSON key concerned, or None.
    """

    def __init__(self, problem: str, source: str | None = None, line: int | None = None,
                 field: str | None = None, unit: str = "line"):
        self.problem = problem
        self.source = None if source is None else str(source)
        self.line = line
        self.field = field
        self.unit = unit
        parts = [self.source, None if line is None else f"{unit} {line}", field, problem]
        message = ": ".join(p for p in parts if p)
        super().__init__(" ".join(message.split()))  # guarantee a single line

    def __reduce__(self):  # keep the structured fields across pickling (joblib workers)
        return (type(self), (self.problem, self.source, self.line, self.field, self.unit))


def make_trace(arrival_s, prompt_tokens, output_tokens) -> pd.DataFrame:
    """Assemble a trace from aligned arrays that are already in arrival order (stable-sorted here anyway)."""
    arrival_s = np.asarray(arrival_s, dtype=np.float64)
    order = np.argsort(arrival_s, kind="stable")
    return pd.DataFrame({
        "request_id": np.arange(len(arrival_s), dtype=np.int64),
        "arrival_s": arrival_s[order],
        "prompt_tokens": np.asarray(prompt_tokens, dtype=np.int64)[order],
        "output_tokens": np.asarray(output_tokens, dtype=np.int64)[order],
    })


def validate_trace(df: pd.DataFrame, source: str = "trace") -> pd.DataFrame:
    """Check that ``df`` follows the trace schema (see the module docstring); return it unchanged.

    Raises:
        TraceError: naming ``source``, the first offending row as ``row <i>`` (0-based position, which
            equals its ``request_id`` in a valid trace) and the column. Checks: a DataFrame with exactly
            the columns ``request_id, arrival_s, prompt_tokens, output_tokens`` in that order; at least
            one row; integer dtypes for ids and token counts, float for ``arrival_s``; ``request_id`` is
            0..N-1; ``arrival_s`` finite, >= 0 and non-decreasing; token counts >= 1.
    """
    if not isinstance(df, pd.DataFrame):
        raise TraceError(f"expected a pandas DataFrame, got {type(df).__name__}", source)
    found = list(df.columns)
    if found != list(COLUMNS):
        raise TraceError(f"expected columns {list(COLUMNS)}, found {found}", source)
    if len(df) == 0:
        raise TraceError("trace has no requests", source)
    for col in ("request_id", "prompt_tokens", "output_tokens"):
        if not pd.api.types.is_integer_dtype(df[col].dtype):
            raise TraceError(f"dtype must be integer, got {df[col].dtype}", source, field=col)
    if not pd.api.types.is_float_dtype(df["arrival_s"].dtype):
        raise TraceError(f"dtype must be float, got {df['arrival_s'].dtype}", source, field="arrival_s")

    def fail_at(mask_ok: np.ndarray, col: str, problem: str):
        if not mask_ok.all():
            i = int(np.argmin(mask_ok))
            value = df[col].iloc[i]
            raise TraceError(f"{problem}, got {value!r}", source, i, col, unit="row")

    fail_at(df["request_id"].to_numpy() == np.arange(len(df)), "request_id", "must equal the row position 0..N-1")
    arrivals = df["arrival_s"].to_numpy()
    fail_at(np.isfinite(arrivals), "arrival_s", "must be finite")
    fail_at(arrivals >= 0, "arrival_s", "must be >= 0")
    fail_at(np.concatenate([[True], np.diff(arrivals) >= 0]), "arrival_s",
            "must be non-decreasing (earlier than the previous row)")
    for col in ("prompt_tokens", "output_tokens"):
        fail_at(df[col].to_numpy() >= 1, col, "must be >= 1")
    return df
