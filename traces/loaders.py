"""Readers for request traces stored in files. Each returns a ``RawTrace``: token counts (int64 arrays),
when the file has them arrival times in seconds and prefix-block hashes; ``traces.load_trace`` turns it into
a trace DataFrame.

Formats (auto-detected by ``detect_format``: JSON Lines by extension ``.jsonl``/``.json`` or a first
character ``{``; otherwise CSV, recognised by its header, first match wins):

=========  ====================================================  =========================================
format     columns / keys                                        arrivals
=========  ====================================================  =========================================
azure      ``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``  wall-clock strings such as
           (Azure LLM inference trace 2023)                      ``2023-11-16 18:15:46.6805900``, parsed by
                                                                 pandas (ISO 8601), made relative to the
                                                                 first row: seconds since the first request
sarathi    ``num_prefill_tokens``, ``num_decode_tokens``,          ``arrived_at`` in seconds, kept as given
           optional ``arrived_at`` (Sarathi-Serve / Vidur         (none in the ``*_stats_llama2_tokenizer``
           processed traces; other columns ignored)               files)
csv        ``prompt_tokens``, ``output_tokens``, optional         ``arrival_s`` in seconds, kept as given
           ``arrival_s``, optional ``block_hashes``
mooncake   JSON Lines with ``timestamp`` (milliseconds),          ``timestamp / 1000`` seconds, kept as given
           ``input_length``, ``output_length``, optional
           ``hash_ids``
=========  ====================================================  =========================================

Prefix-block hashes (kept in the trace's ``block_hashes`` column, see ``traces.prefix``):

* Mooncake ``hash_ids``: a JSON list of integers (``true``/``false`` are not integers), one per 512 prompt
  tokens (``MOONCAKE_HASH_BLOCK_TOKENS``; Mooncake FAST'25 release, kvcache-ai/Mooncake
  ``FAST25-release/traces``), the last one covering the partial block. Its length must be exactly
  ``ceil(input_length / 512)``: it is in every record of both published traces (conversation: 12,031 of
  12,031; synthetic: 3,993 of 3,993), so another length means the file's lengths and hashes disagree and is
  an error. Either every record has ``hash_ids`` or none has (then the trace has no hashes).
* Plain CSV ``block_hashes``: integers separated by spaces and/or ``;`` (e.g. ``"7 8 9"`` or ``"7;8;9"``),
  an empty cell meaning no hashes for that request; each hash covers ``hash_block_tokens`` tokens (a
  ``load_trace`` argument, default ``CSV_HASH_BLOCK_TOKENS`` = 16, the KV block size of vLLM on GPUs and of
  servesim); at most ``ceil(prompt_tokens / hash_block_tokens)`` of them (a shorter list simply leaves the
  later blocks without hashes, e.g. when only full blocks are hashed, as vLLM does).

Line numbers in errors are the physical, 1-based line numbers of the file as an editor shows them: for CSV
the header is line 1, so the first data row is line 2; for JSON Lines the first record is line 1. Blank
lines are skipped but still counted. Token counts must be integers >= 1 and <= ``MAX_TOKENS`` (2**31 - 1);
arrival times must be finite, >= 0, at most ``MAX_ARRIVAL_S`` (1e9 s, after unit conversion) and
non-decreasing (an earlier time than the line before is an error naming both lines). A file that cannot be
read (a folder, no permission, an I/O error) is a ``TraceError`` naming it and the reason.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .schema import MAX_ARRIVAL_S, MAX_TOKENS, TraceError, short_repr

if TYPE_CHECKING:
    import pandas as pd

# CSV format -> (prompt column, output column, arrival column); the arrival column is optional except for azure
CSV_FORMATS: dict[str, tuple[str, str, str]] = {
    "azure": ("ContextTokens", "GeneratedTokens", "TIMESTAMP"),
    "sarathi": ("num_prefill_tokens", "num_decode_tokens", "arrived_at"),
    "csv": ("prompt_tokens", "output_tokens", "arrival_s"),
}
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")
MOONCAKE_HASH_KEY = "hash_ids"
MOONCAKE_HASH_BLOCK_TOKENS = 512
CSV_HASH_COLUMN = "block_hashes"
CSV_HASH_BLOCK_TOKENS = 16
FORMATS = (*CSV_FORMATS, "mooncake")


@dataclass
class RawTrace:
    """Requests in file order.

    ``lines``: the 1-based file line of each request (int64). ``arrival_s`` is None when the file has no
    arrival times; ``block_hashes`` (a list of int tuples, one per request) and ``hash_block_tokens`` are
    None when it has no prefix-block hashes.
    """

    source: str
    format: str
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    arrival_s: np.ndarray | None
    lines: np.ndarray
    block_hashes: list[tuple[int, ...]] | None = None
    hash_block_tokens: int | None = None

    def __len__(self) -> int:
        return len(self.prompt_tokens)


def read_trace_file(path: str | Path, *, hash_block_tokens: int | None = None) -> RawTrace:
    """Read and validate a trace file of any supported format (see the module docstring).

    ``hash_block_tokens``: tokens per hash of a plain CSV's ``block_hashes`` column (default 16); for
    Mooncake it can only be 512; ignored for files without hashes.

    Raises:
        TraceError: file not found or unreadable (a folder, no permission), empty file, unrecognised columns (the columns found are listed), a bad
            value (the message names the file, the line and the field), or a ``hash_block_tokens`` that
            contradicts the format.
    """
    path = Path(path)
    source = str(path)
    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError as exc:
        raise TraceError(f"cannot read: {exc.strerror or exc}", source) from None
    if not is_file:
        raise TraceError("file not found" if not exists else "not a regular file", source)
    try:
        return _read_trace_file(path, source, hash_block_tokens)
    except OSError as exc:                        # permission denied, I/O error, removed meanwhile, ...
        raise TraceError(f"cannot read: {exc.strerror or exc}", source) from None


def _read_trace_file(path: Path, source: str, hash_block_tokens: int | None) -> RawTrace:
    if hash_block_tokens is not None and (isinstance(hash_block_tokens, bool)
                                          or not isinstance(hash_block_tokens, (int, np.integer))
                                          or hash_block_tokens < 1):
        raise TraceError(f"must be an integer >= 1, got {hash_block_tokens!r}", source, field="hash_block_tokens")
    fmt = detect_format(path)
    if fmt == "mooncake":
        raw = read_jsonl(path)
        if raw.block_hashes is not None and hash_block_tokens not in (None, MOONCAKE_HASH_BLOCK_TOKENS):
            raise TraceError(f"Mooncake hash_ids cover {MOONCAKE_HASH_BLOCK_TOKENS} tokens each, not "
                             f"hash_block_tokens={hash_block_tokens}", source, field="hash_block_tokens")
        return raw
    return read_csv(path, fmt, hash_block_tokens=hash_block_tokens)


def detect_format(path: str | Path) -> str:
    """One of ``FORMATS``, from the extension, the first character and the CSV header."""
    path = Path(path)
    source = str(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise TraceError("empty file", source)
    if path.suffix.lower() in (".jsonl", ".json") or head.lstrip().startswith(b"{"):
        return "mooncake"
    header = _plain_header(head)
    for fmt, (prompt_col, output_col, _) in CSV_FORMATS.items():
        if header and prompt_col in header and output_col in header:
            return fmt
    header = _read_csv(path, source, nrows=0).columns.str.strip()
    for fmt, (prompt_col, output_col, _) in CSV_FORMATS.items():
        if prompt_col in header and output_col in header:
            return fmt
    expected = "; ".join(f"{fmt}: {p}, {o}" for fmt, (p, o, _) in CSV_FORMATS.items())
    raise TraceError(f"unrecognised columns {list(header)}; expected one of [{expected}] "
                     f"or a .jsonl file with {', '.join(MOONCAKE_KEYS)}", source, 1)


def _read_csv(path: Path, source: str, **kwargs) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=str, skip_blank_lines=False, **kwargs)
    except pd.errors.EmptyDataError:
        raise TraceError("empty file", source) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise TraceError(f"malformed CSV ({exc})", source, int(match.group(1)) if match else None) from None


def _plain_header(head: bytes) -> list[str] | None:
    """The stripped column names of a CSV's first line read by the standard library, or None if it is not
    plain (then pandas reads it)."""
    try:
        line = head.decode("utf-8-sig").splitlines()[0]
        names = [c.strip() for c in next(csv.reader([line]))]
    except (UnicodeDecodeError, IndexError, StopIteration, csv.Error):
        return None
    return names if names and all(names) and len(set(names)) == len(names) else None


def _read_plain_csv(path: Path, source: str, fmt: str) -> RawTrace | None:
    """The common CSV trace read with the standard library, no pandas: a Sarathi-Serve/Vidur or plain CSV
    without arrival times or block hashes, every row as long as the header and its token counts plain decimal
    integers in ``[1, MAX_TOKENS]``. None for anything else, which ``read_csv`` then reads with pandas (and
    names the line and field of a bad value): the same trace either way."""
    prompt_col, output_col, arrival_col = CSV_FORMATS[fmt]
    if fmt not in ("sarathi", "csv"):
        return None
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            rows = csv.reader(f)
            header = [c.strip() for c in next(rows)]
            if len(set(header)) != len(header) or arrival_col in header or CSV_HASH_COLUMN in header or \
                    prompt_col not in header or output_col not in header:
                return None
            width, p, o = len(header), header.index(prompt_col), header.index(output_col)
            prompts, outputs = [], []
            for row in rows:
                if len(row) != width:
                    return None
                prompts.append(row[p])
                outputs.append(row[o])
        except (UnicodeDecodeError, StopIteration, csv.Error):
            return None
    if not prompts:
        return None
    counts = []
    for column in (prompts, outputs):
        if not all(v.isascii() and v.isdigit() and len(v) <= 10 for v in column):   # MAX_TOKENS has 10 digits
            return None
        values = np.array([int(v) for v in column], dtype=np.int64)
        if values.min() < 1 or values.max() > MAX_TOKENS:
            return None
        counts.append(values)
    return RawTrace(source, fmt, counts[0], counts[1], None, np.arange(len(prompts), dtype=np.int64) + 2)


def read_csv(path: str | Path, fmt: str, *, hash_block_tokens: int | None = None) -> RawTrace:
    """Read a CSV trace of format ``fmt`` (``"azure"``, ``"sarathi"`` or ``"csv"``); a plain CSV's
    ``block_hashes`` column covers ``hash_block_tokens`` tokens per hash (default 16)."""
    path = Path(path)
    source = str(path)
    plain = _read_plain_csv(path, source, fmt)
    if plain is not None:
        return plain
    prompt_col, output_col, arrival_col = CSV_FORMATS[fmt]
    df = _read_csv(path, source)
    df.columns = df.columns.str.strip()
    required = [prompt_col, output_col] + ([arrival_col] if fmt == "azure" else [])
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise TraceError(f"missing column {missing[0]!r}; found {list(df.columns)}", source, 1)
    lines = np.arange(len(df)) + 2                                   # header is line 1
    blank = df.isna().all(axis=1).to_numpy()
    if blank.any():
        df, lines = df.loc[~blank], lines[~blank]
    if len(df) == 0:
        raise TraceError("no data rows (empty trace)", source)
    prompt = positive_ints(df[prompt_col], lines, source, prompt_col)
    output = positive_ints(df[output_col], lines, source, output_col)
    arrivals = None
    if fmt == "azure":
        arrivals = _wall_clock_seconds(df[arrival_col], lines, source, arrival_col)
    elif arrival_col in df.columns:
        arrivals = arrival_seconds(df[arrival_col], lines, source, arrival_col)
    raw = RawTrace(source, fmt, prompt, output, arrivals, lines)
    if fmt == "csv" and CSV_HASH_COLUMN in df.columns:
        h = CSV_HASH_BLOCK_TOKENS if hash_block_tokens is None else int(hash_block_tokens)
        raw.block_hashes = [_csv_hashes(text, prompt[i], h, source, int(lines[i]))
                            for i, text in enumerate(df[CSV_HASH_COLUMN].tolist())]
        raw.hash_block_tokens = h
    return raw


def read_jsonl(path: str | Path) -> RawTrace:
    """Read a Mooncake JSON Lines trace (``timestamp`` in ms, ``input_length``, ``output_length``, optional
    ``hash_ids``; see the module docstring)."""
    path = Path(path)
    source = str(path)
    rows, lines, hash_lists = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"malformed JSON ({exc.msg}, column {exc.colno})", source, lineno) from None
            if not isinstance(record, dict):
                raise TraceError(f"expected a JSON object, got {type(record).__name__}", source, lineno)
            for key in MOONCAKE_KEYS:
                if key not in record:
                    raise TraceError(f"missing field {key!r}; found {list(record)}", source, lineno, key)
            rows.append(tuple(record[k] for k in MOONCAKE_KEYS))
            hash_lists.append(record.get(MOONCAKE_HASH_KEY, _ABSENT))
            lines.append(lineno)
    if not rows:
        raise TraceError("empty file", source)
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(MOONCAKE_KEYS), dtype=object)
    lines = np.asarray(lines, dtype=np.int64)
    prompt = positive_ints(df["input_length"], lines, source, "input_length")
    output = positive_ints(df["output_length"], lines, source, "output_length")
    arrivals = arrival_seconds(df["timestamp"], lines, source, "timestamp", unit_s=1e-3) / 1000.0
    raw = RawTrace(source, "mooncake", prompt, output, arrivals, lines)
    present = [value is not _ABSENT for value in hash_lists]
    if any(present):
        raw.block_hashes = _mooncake_hashes(hash_lists, present, prompt, lines, source)
        raw.hash_block_tokens = MOONCAKE_HASH_BLOCK_TOKENS
    return raw


_ABSENT = object()   # marks a record without hash_ids


def _mooncake_hashes(values: list, present: list[bool], prompt: np.ndarray, lines: np.ndarray,
                     source: str) -> list[tuple[int, ...]]:
    """Validated Mooncake ``hash_ids``: all records have them, lists of ints of ``ceil(input_length/512)``."""
    if not all(present):
        i = present.index(False)
        j = present.index(True)
        raise TraceError(f"missing field {MOONCAKE_HASH_KEY!r} (line {int(lines[j])} has it; either every "
                         f"record has hash_ids or none)", source, int(lines[i]), MOONCAKE_HASH_KEY)
    h = MOONCAKE_HASH_BLOCK_TOKENS
    hashes = []
    for i, value in enumerate(values):
        if not isinstance(value, list) or not all(_is_int(x) for x in value):
            raise TraceError(f"must be a list of integers, got {short_repr(value)}", source, int(lines[i]),
                             MOONCAKE_HASH_KEY)
        need = -(-int(prompt[i]) // h)
        if len(value) != need:
            raise TraceError(f"has {len(value)} ids but input_length {int(prompt[i])} needs "
                             f"ceil({int(prompt[i])} / {h}) = {need} (one per {h}-token block)", source,
                             int(lines[i]), MOONCAKE_HASH_KEY)
        hashes.append(tuple(value))
    return hashes


_HASH_SEPARATORS = re.compile(r"[;\s]+")
_INTEGER = re.compile(r"[+-]?\d+")


def _csv_hashes(text, prompt_tokens: int, hash_block_tokens: int, source: str, line: int) -> tuple[int, ...]:
    """One CSV ``block_hashes`` cell: integers separated by spaces and/or ``;``; empty means none."""
    import pandas as pd

    if text is None or pd.isna(text):
        return ()
    parts = [part for part in _HASH_SEPARATORS.split(str(text).strip()) if part]
    bad = next((part for part in parts if not _INTEGER.fullmatch(part)), None)
    if bad is not None:
        raise TraceError(f"not an integer: {short_repr(bad)} (expected integers separated by spaces or ';')",
                         source, line, CSV_HASH_COLUMN)
    most = -(-int(prompt_tokens) // hash_block_tokens)
    if len(parts) > most:
        raise TraceError(f"{len(parts)} hashes but prompt_tokens {int(prompt_tokens)} has only "
                         f"ceil({int(prompt_tokens)} / {hash_block_tokens}) = {most} blocks of "
                         f"{hash_block_tokens} tokens", source, line, CSV_HASH_COLUMN)
    return tuple(int(part) for part in parts)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------------------
# Column checks: vectorised, the first offending line is reported
# --------------------------------------------------------------------------------------------------------

def _first_bad(ok: np.ndarray) -> int | None:
    return None if ok.all() else int(np.argmin(ok))


def _numbers(raw: pd.Series, lines: np.ndarray, source: str, field: str) -> np.ndarray:
    """Finite float64 values; TraceError at the first missing, non-numeric or non-finite value."""
    import pandas as pd

    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if raw.dtype == object:                                          # JSON true/false are not numbers
        values = np.where(raw.map(type).eq(bool).to_numpy(), np.nan, values)
    i = _first_bad(np.isfinite(values))
    if i is not None:
        value = raw.iloc[i]
        problem = "missing value" if pd.isna(value) or str(value).strip() == "" else f"not a finite number: {value!r}"
        raise TraceError(problem, source, int(lines[i]), field)
    return values


def positive_ints(raw: pd.Series, lines: np.ndarray, source: str, field: str) -> np.ndarray:
    """Token counts as int64; TraceError at the first value that is not an integer in [1, ``MAX_TOKENS``]
    (checked before the conversion, so a huge value is named rather than wrapped around)."""
    values = _numbers(raw, lines, source, field)
    i = _first_bad((values >= 1) & (values == np.floor(values)))
    if i is not None:
        raise TraceError(f"must be an integer >= 1, got {raw.iloc[i]!r}", source, int(lines[i]), field)
    i = _first_bad(values <= MAX_TOKENS)
    if i is not None:
        raise TraceError(f"{short_repr(raw.iloc[i])} tokens is more than {MAX_TOKENS} (2**31 - 1), the most a "
                         f"request may have", source, int(lines[i]), field)
    return values.astype(np.int64)


def _check_sorted(values: np.ndarray, raw: pd.Series, lines: np.ndarray, source: str, field: str) -> None:
    i = _first_bad(np.concatenate([[True], np.diff(values) >= 0]))
    if i is not None:
        raise TraceError(f"timestamps not sorted: {raw.iloc[i]!r} is earlier than {raw.iloc[i - 1]!r} "
                         f"on line {int(lines[i - 1])}", source, int(lines[i]), field)


def arrival_seconds(raw: pd.Series, lines: np.ndarray, source: str, field: str, unit_s: float = 1.0
                    ) -> np.ndarray:
    """Numeric arrival times (file units of ``unit_s`` seconds), finite, >= 0, at most ``MAX_ARRIVAL_S``
    seconds and non-decreasing."""
    values = _numbers(raw, lines, source, field)
    i = _first_bad(values >= 0)
    if i is not None:
        raise TraceError(f"must be >= 0, got {raw.iloc[i]!r}", source, int(lines[i]), field)
    _check_horizon(values * unit_s, raw, lines, source, field)
    _check_sorted(values, raw, lines, source, field)
    return values


def _check_horizon(seconds: np.ndarray, raw: pd.Series, lines: np.ndarray, source: str, field: str) -> None:
    i = _first_bad(seconds <= MAX_ARRIVAL_S)
    if i is not None:
        raise TraceError(f"arrival {short_repr(raw.iloc[i])} is {seconds[i]:.3g} s, beyond {MAX_ARRIVAL_S:g} s "
                         f"(about 31.7 years): not a plausible arrival time (wrong unit?)", source,
                         int(lines[i]), field)


def _wall_clock_seconds(raw: pd.Series, lines: np.ndarray, source: str, field: str) -> np.ndarray:
    """Wall-clock timestamps -> seconds since the first row; TraceError at a malformed or unsorted one."""
    import pandas as pd

    try:
        stamps = pd.to_datetime(raw.str.strip(), format="ISO8601", errors="coerce")
    except (ValueError, TypeError) as exc:                          # e.g. mixed time zones
        raise TraceError(f"cannot parse timestamps ({exc})", source, field=field) from None
    i = _first_bad(stamps.notna().to_numpy())
    if i is not None:
        value = raw.iloc[i]
        problem = ("missing value" if pd.isna(value) or not value.strip()
                   else f"malformed timestamp {value!r} (expected e.g. '2023-11-16 18:15:46.6805900')")
        raise TraceError(problem, source, int(lines[i]), field)
    seconds = (stamps - stamps.iloc[0]).dt.total_seconds().to_numpy(dtype=np.float64)
    _check_sorted(seconds, raw, lines, source, field)
    _check_horizon(seconds, raw, lines, source, field)
    return seconds
