"""The trace schema every generator and loader returns, and the one error type for bad input.

A trace is a ``pandas.DataFrame`` with these columns, in this order, sorted by arrival (``COLUMNS`` are
required; ``block_hashes`` is present only when the source has prefix-block hashes):

========================  =========  ==============================================================
column                    dtype      meaning
========================  =========  ==============================================================
``request_id``            int64      0..N-1 in arrival order
``arrival_s``             float64    arrival time in seconds (finite, >= 0, non-decreasing)
``prompt_tokens``         int64      prompt (prefill) length in tokens, >= 1
``output_tokens``         int64      output (decode) length in tokens, >= 1
``block_hashes``          object     OPTIONAL. A tuple of Python ints per row (possibly empty): the
                                     request's prefix-chained hashes, hash ``k`` covering prompt tokens
                                     ``[k*H, (k+1)*H)`` and identifying the whole prefix through them
                                     (``traces.prefix``); at most ``ceil(prompt_tokens / H)`` of them
========================  =========  ==============================================================

``df.attrs`` (pandas' metadata dict; pandas copies it through many operations even when it no longer
describes the result, and drops it on others, e.g. ``concat`` of frames with different attrs, so read it
right after ``load_trace``):

* ``"hash_block_tokens"``: ``H``, tokens covered by each hash; present exactly when ``block_hashes`` is.
* ``"workload_changes"``: what loading changed, set by ``traces.load_trace`` and the built-in generators
  (``traces.limits.changes_record``): ``{"num_requests_in", "num_shrunk", "num_dropped",
  "max_total_tokens", "examples"}``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS: tuple[str, ...] = ("request_id", "arrival_s", "prompt_tokens", "output_tokens")
HASH_COLUMN = "block_hashes"

# Bounds of sane values. A token count above 2**31 - 1 is no real request, and such counts would overflow the
# int64 arithmetic downstream (prompt + output, the shrinking rule's x * max_total, tokens x bytes of KV).
MAX_TOKENS = 2**31 - 1
# An arrival later than 1e9 s (about 31.7 years) is a unit mistake; at such magnitudes float64 seconds keep
# about 0.1 microsecond, and at 1e300 nothing: every latency would read as 0.
MAX_ARRIVAL_S = 1e9


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


def make_trace(arrival_s, prompt_tokens, output_tokens, block_hashes=None,
               hash_block_tokens: int | None = None) -> pd.DataFrame:
    """Assemble a trace from aligned arrays that are already in arrival order (stable-sorted here anyway).

    ``block_hashes`` (optional): one sequence of ints per request; it becomes the ``block_hashes`` column
    (tuples) and ``hash_block_tokens`` is stored in ``df.attrs["hash_block_tokens"]`` (required with it).
    """
    arrival_s = np.asarray(arrival_s, dtype=np.float64)
    order = np.argsort(arrival_s, kind="stable")
    df = pd.DataFrame({
        "request_id": np.arange(len(arrival_s), dtype=np.int64),
        "arrival_s": arrival_s[order],
        "prompt_tokens": np.asarray(prompt_tokens, dtype=np.int64)[order],
        "output_tokens": np.asarray(output_tokens, dtype=np.int64)[order],
    })
    if block_hashes is not None:
        if hash_block_tokens is None:
            raise TraceError("required with block_hashes", field="hash_block_tokens")
        hashes = list(block_hashes)
        df[HASH_COLUMN] = pd.Series([tuple(hashes[i]) for i in order], dtype=object)
        df.attrs["hash_block_tokens"] = int(hash_block_tokens)
    return df


def validate_trace(df: pd.DataFrame, source: str = "trace") -> pd.DataFrame:
    """Check that ``df`` follows the trace schema (see the module docstring); return it unchanged.

    Raises:
        TraceError: naming ``source``, the first offending row as ``row <i>`` (0-based position, which
            equals its ``request_id`` in a valid trace) and the column. Checks: a DataFrame with exactly
            the columns ``request_id, arrival_s, prompt_tokens, output_tokens`` in that order, optionally
            followed by ``block_hashes``; at least one row; integer dtypes for ids and token counts, float
            for ``arrival_s``; ``request_id`` is 0..N-1; ``arrival_s`` finite, >= 0, <= ``MAX_ARRIVAL_S``
            and non-decreasing; token counts >= 1 and <= ``MAX_TOKENS``. With ``block_hashes``:
            ``df.attrs["hash_block_tokens"]`` an integer >= 1, object dtype, every value a tuple of Python
            ints (bool is not an int), at most ``ceil(prompt_tokens / hash_block_tokens)`` of them.
    """
    if not isinstance(df, pd.DataFrame):
        raise TraceError(f"expected a pandas DataFrame, got {type(df).__name__}", source)
    found = list(df.columns)
    if found not in (list(COLUMNS), [*COLUMNS, HASH_COLUMN]):
        raise TraceError(f"expected columns {list(COLUMNS)} (optionally followed by {HASH_COLUMN!r}), "
                         f"found {found}", source)
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
    fail_at(arrivals <= MAX_ARRIVAL_S, "arrival_s", f"must be <= {MAX_ARRIVAL_S:g} s (about 31.7 years)")
    fail_at(np.concatenate([[True], np.diff(arrivals) >= 0]), "arrival_s",
            "must be non-decreasing (earlier than the previous row)")
    for col in ("prompt_tokens", "output_tokens"):
        fail_at(df[col].to_numpy() >= 1, col, "must be >= 1")
        fail_at(df[col].to_numpy() <= MAX_TOKENS, col, f"must be <= {MAX_TOKENS} tokens")
    if HASH_COLUMN in df.columns:
        _validate_hashes(df, source)
    return df


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (``...`` marks the cut) for one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate_hashes(df: pd.DataFrame, source: str) -> None:
    """The ``block_hashes`` checks of ``validate_trace``."""
    h = df.attrs.get("hash_block_tokens")
    if not _is_int(h) or h < 1:
        raise TraceError(f"df.attrs['hash_block_tokens'] must be an integer >= 1 with a {HASH_COLUMN!r} column, "
                         f"got {h!r}", source, field="hash_block_tokens")
    col = df[HASH_COLUMN]
    if col.dtype != object:
        raise TraceError(f"dtype must be object (tuples of ints), got {col.dtype}", source, field=HASH_COLUMN)
    prompts = df["prompt_tokens"].tolist()
    for i, value in enumerate(col.tolist()):
        if type(value) is not tuple or not set(map(type, value)) <= {int}:     # bool's type is bool, not int
            raise TraceError(f"must be a tuple of Python ints, got {short_repr(value)}", source, i, HASH_COLUMN,
                             unit="row")
        most = -(-prompts[i] // h)
        if len(value) > most:
            raise TraceError(f"{len(value)} hashes but the prompt of {prompts[i]} tokens has only "
                             f"ceil({prompts[i]} / {h}) = {most} blocks", source, i, HASH_COLUMN, unit="row")
