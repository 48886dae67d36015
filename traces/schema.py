"""The trace schema every generator and loader returns, and the one error type for bad input.

A trace is a ``pandas.DataFrame`` with these columns, in this order, sorted by arrival (``COLUMNS`` are
required; ``block_hashes`` is present only when the source has prefix-block hashes), or the same data as
aligned numpy arrays in a ``TraceColumns`` (``traces.load_columns``; no pandas needed):

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

``TraceColumns.attrs`` holds the same keys; ``TraceColumns.frame()`` and ``TraceColumns.from_frame(df)``
convert between the two forms exactly.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
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


@dataclasses.dataclass(frozen=True, eq=False)
class TraceColumns:
    """A trace as aligned numpy columns, sorted by arrival: the DataFrame schema above without pandas.

    Row ``i`` is request ``i`` (the ``request_id`` column is implicitly ``0..N-1``).

    Attributes:
        arrival_s: float64 array of shape ``(N,)``, arrival times in seconds, non-decreasing.
        prompt_tokens: int64 array of shape ``(N,)``, prompt lengths in tokens (>= 1).
        output_tokens: int64 array of shape ``(N,)``, output lengths in tokens (>= 1).
        block_hashes: None, or a list of ``N`` tuples of Python ints (the ``block_hashes`` column), each hash
            covering ``attrs["hash_block_tokens"]`` prompt tokens.
        attrs: the DataFrame's ``attrs``: ``"hash_block_tokens"`` (exactly when there are hashes) and
            ``"workload_changes"`` (``traces.limits.changes_record``) when the trace was loaded.
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    block_hashes: list[tuple[int, ...]] | None = None
    attrs: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def hash_block_tokens(self) -> int | None:
        """Tokens covered by each block hash, or None without hashes."""
        return self.attrs.get("hash_block_tokens")

    def frame(self) -> pd.DataFrame:
        """The trace as a DataFrame (``request_id, arrival_s, prompt_tokens, output_tokens[, block_hashes]``,
        int64/float64/int64/int64[/object]) with a copy of ``attrs`` as its ``attrs``."""
        import pandas as pd

        df = pd.DataFrame({
            "request_id": np.arange(len(self), dtype=np.int64),
            "arrival_s": self.arrival_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
        })
        if self.block_hashes is not None:
            df[HASH_COLUMN] = pd.Series(self.block_hashes, dtype=object)
        df.attrs.update(copy.deepcopy(self.attrs))
        return df

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> TraceColumns:
        """The columns of a valid trace DataFrame (``validate_trace``; its ``request_id`` is not kept, being
        ``0..N-1``), with a copy of its ``attrs``."""
        hashes = df[HASH_COLUMN].tolist() if HASH_COLUMN in df.columns else None
        return cls(df["arrival_s"].to_numpy(dtype=np.float64), df["prompt_tokens"].to_numpy(dtype=np.int64),
                   df["output_tokens"].to_numpy(dtype=np.int64), hashes, copy.deepcopy(df.attrs))

    def validate(self, source: str = "trace") -> TraceColumns:
        """The checks of ``validate_trace`` on the columns (same messages); return self unchanged.

        Raises:
            TraceError: columns of other shapes or dtypes, no rows, or a bad value (see ``validate_trace``).
        """
        n = len(self)
        for name in ("arrival_s", "prompt_tokens", "output_tokens"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.shape != (n,):
                raise TraceError(f"must be a numpy array of shape ({n},), got {short_repr(a)}", source, field=name)
        if n == 0:
            raise TraceError("trace has no requests", source)
        for name in ("prompt_tokens", "output_tokens"):
            if getattr(self, name).dtype.kind not in "iu":
                raise TraceError(f"dtype must be integer, got {getattr(self, name).dtype}", source, field=name)
        if self.arrival_s.dtype.kind != "f":
            raise TraceError(f"dtype must be float, got {self.arrival_s.dtype}", source, field="arrival_s")
        check_values(self.arrival_s, self.prompt_tokens, self.output_tokens, source)
        if self.block_hashes is not None:
            if not isinstance(self.block_hashes, list) or len(self.block_hashes) != n:
                raise TraceError(f"must be a list of {n} tuples, got {short_repr(self.block_hashes)}", source,
                                 field=HASH_COLUMN)
            check_hashes(self.block_hashes, self.prompt_tokens.tolist(), self.hash_block_tokens, source)
        return self


def make_columns(arrival_s, prompt_tokens, output_tokens, block_hashes=None,
                 hash_block_tokens: int | None = None) -> TraceColumns:
    """Assemble a trace from aligned arrays that are already in arrival order (stable-sorted here anyway).

    ``block_hashes`` (optional): one sequence of ints per request; it becomes ``block_hashes`` (tuples) and
    ``hash_block_tokens`` is stored in ``attrs["hash_block_tokens"]`` (required with it).
    """
    arrival_s = np.asarray(arrival_s, dtype=np.float64)
    order = np.argsort(arrival_s, kind="stable")
    hashes, attrs = None, {}
    if block_hashes is not None:
        if hash_block_tokens is None:
            raise TraceError("required with block_hashes", field="hash_block_tokens")
        given = list(block_hashes)
        hashes = [tuple(given[i]) for i in order]
        attrs["hash_block_tokens"] = int(hash_block_tokens)
    return TraceColumns(arrival_s[order], np.asarray(prompt_tokens, dtype=np.int64)[order],
                        np.asarray(output_tokens, dtype=np.int64)[order], hashes, attrs)


def make_trace(arrival_s, prompt_tokens, output_tokens, block_hashes=None,
               hash_block_tokens: int | None = None) -> pd.DataFrame:
    """``make_columns(...)`` as a DataFrame: the ``block_hashes`` column (tuples) when hashes are given and
    ``df.attrs["hash_block_tokens"]`` with them."""
    return make_columns(arrival_s, prompt_tokens, output_tokens, block_hashes, hash_block_tokens).frame()


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
    import pandas as pd

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
    check_values(df["arrival_s"].to_numpy(), df["prompt_tokens"].to_numpy(), df["output_tokens"].to_numpy(),
                 source, request_id=df["request_id"].to_numpy())
    if HASH_COLUMN in df.columns:
        h = df.attrs.get("hash_block_tokens")
        _check_hash_block_tokens(h, source)
        if df[HASH_COLUMN].dtype != object:
            raise TraceError(f"dtype must be object (tuples of ints), got {df[HASH_COLUMN].dtype}", source,
                             field=HASH_COLUMN)
        check_hashes(df[HASH_COLUMN].tolist(), df["prompt_tokens"].tolist(), h, source)
    return df


def check_values(arrival_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray, source: str,
                 request_id: np.ndarray | None = None) -> None:
    """The value checks of a trace's aligned columns (arrays of shape ``(N,)``), shared by ``validate_trace``
    and ``TraceColumns.validate``: ``request_id`` (if given) is ``0..N-1``; ``arrival_s`` (seconds) finite,
    >= 0, <= ``MAX_ARRIVAL_S`` and non-decreasing; token counts >= 1 and <= ``MAX_TOKENS``.

    Raises:
        TraceError: naming ``source``, the first offending ``row <i>`` (0-based), the column and its value.
    """
    def fail_at(values: np.ndarray, ok: np.ndarray, col: str, problem: str):
        if not ok.all():
            i = int(np.argmin(ok))
            raise TraceError(f"{problem}, got {values[i]!r}", source, i, col, unit="row")

    if request_id is not None:
        fail_at(request_id, request_id == np.arange(len(request_id)), "request_id",
                "must equal the row position 0..N-1")
    fail_at(arrival_s, np.isfinite(arrival_s), "arrival_s", "must be finite")
    fail_at(arrival_s, arrival_s >= 0, "arrival_s", "must be >= 0")
    fail_at(arrival_s, arrival_s <= MAX_ARRIVAL_S, "arrival_s", f"must be <= {MAX_ARRIVAL_S:g} s (about 31.7 years)")
    fail_at(arrival_s, np.concatenate([[True], np.diff(arrival_s) >= 0]), "arrival_s",
            "must be non-decreasing (earlier than the previous row)")
    for col, values in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)):
        fail_at(values, values >= 1, col, "must be >= 1")
        fail_at(values, values <= MAX_TOKENS, col, f"must be <= {MAX_TOKENS} tokens")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (``...`` marks the cut) for one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_hash_block_tokens(h, source: str) -> None:
    if not _is_int(h) or h < 1:
        raise TraceError(f"df.attrs['hash_block_tokens'] must be an integer >= 1 with a {HASH_COLUMN!r} column, "
                         f"got {h!r}", source, field="hash_block_tokens")


def check_hashes(hashes: list, prompts: list[int], h, source: str) -> None:
    """The ``block_hashes`` checks of ``validate_trace`` on the hashes and prompt lengths (lists of ``N``):
    ``h`` (tokens per hash) an integer >= 1, every value a tuple of Python ints (bool is not an int), at most
    ``ceil(prompt / h)`` of them."""
    _check_hash_block_tokens(h, source)
    for i, value in enumerate(hashes):
        if type(value) is not tuple or not set(map(type, value)) <= {int}:     # bool's type is bool, not int
            raise TraceError(f"must be a tuple of Python ints, got {short_repr(value)}", source, i, HASH_COLUMN,
                             unit="row")
        most = -(-prompts[i] // h)
        if len(value) > most:
            raise TraceError(f"{len(value)} hashes but the prompt of {prompts[i]} tokens has only "
                             f"ceil({prompts[i]} / {h}) = {most} blocks", source, i, HASH_COLUMN, unit="row")
