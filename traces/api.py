"""``load_trace``: the single entry point the CLI calls, for built-in workloads and trace files alike, and
``load_columns``, the same trace as numpy columns (``TraceColumns``), which for the i.i.d. built-ins
(sharegpt, arxiv, random) never imports pandas."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .limits import changes_record, drop_examples, over_limit, shrink_requests
from .loaders import RawTrace, read_trace_file
from .schema import TraceColumns, TraceError, make_columns, validate_trace
from .synthetic import _check_count, arrival_times, check_arrival_options, rng_streams
from .workloads import WORKLOADS, checked_workload

if TYPE_CHECKING:
    import pandas as pd


def load_trace(spec: str | Path, *, num_requests: int | None = None, qps: float | None = None, seed: int = 0,
               arrival: str = "poisson", cv: float = 1.0, max_total_tokens: int | None = None,
               shuffle: bool = False, drop_long: bool = False, retime: bool | None = None,
               qps_explicit: bool = False, hash_block_tokens: int | None = None,
               **workload_options) -> pd.DataFrame:
    """Load a request trace: a built-in workload or a trace file.

    Args:
        spec: a built-in name, ``"sharegpt"``, ``"arxiv"``, ``"random"`` or ``"conversation"``
            (``traces.workloads.WORKLOADS``; a built-in name wins over a file of the same name), or the path
            of a trace file: plain CSV, Sarathi-Serve/Vidur CSV, Azure LLM inference 2023 CSV or Mooncake
            JSONL, detected from the extension and columns (see ``traces.loaders``).
        num_requests: number of requests to return. Built-ins: required (>= 1). Files: the first N requests
            (after dropping and shuffling); None keeps all; more than the file holds is an error.
        qps: mean arrival rate in requests per second (> 0), used whenever arrivals are generated (built-ins,
            files without arrival times, ``retime=True``). ``math.inf`` puts every arrival at 0.0.
            Ignored for a file whose own arrival times are kept, unless ``qps_explicit``.
        seed: non-negative integer; all randomness (lengths, arrivals, shuffle) derives from it, so the same
            inputs and seed give a byte-identical DataFrame.
        arrival: ``"poisson"`` (exponential gaps, mean ``1/qps``) or ``"gamma"`` (gamma gaps, mean ``1/qps``,
            coefficient of variation ``cv``; ``cv=1`` is Poisson). Generated arrivals start at the first gap.
        cv: coefficient of variation of the gamma gaps (> 0); must stay 1 for ``"poisson"``.
        max_total_tokens: limit on ``prompt_tokens + output_tokens`` (>= 2), typically the model's
            max_model_len; default None (no limit). Files and built-ins alike: over-long requests are shrunk
            like the Sarathi-Serve artifact (prompt and output both scaled by ``max_total / total``, rounded
            down, each kept >= 1; total then <= the limit; block hashes cut to the blocks still whole in the
            prompt), or dropped if ``drop_long``. Built-ins first draw their lengths as published (sharegpt
            up to 8192, arxiv up to 16384 total tokens), so a limit at or above that changes nothing.
        shuffle: files only: permute the (prompt, output[, hashes]) requests with the seed before taking the
            first N; arrival times stay in time order (kept or generated). No-op for built-ins.
        drop_long: drop over-long requests instead of shrinking them. Files: dropped before taking the first
            N. Built-ins: further requests are drawn so that exactly ``num_requests`` are returned (an error
            if too few fit; see ``traces.synthetic.iid_trace`` and ``traces.conversation``).
        retime: None (default): keep the file's arrival times if it has them, else generate them at ``qps``.
            True: always generate arrivals at ``qps``. False: keep the file's arrivals; a trace without any
            is an error. Azure timestamps become seconds since the file's first request; other formats keep
            their arrival values (Mooncake milliseconds converted to seconds). Built-ins always generate.
        qps_explicit: True when the user explicitly asked for ``qps`` (e.g. passed ``--qps``): then a file
            whose own arrival times would be kept (it has them and ``retime`` is not True) is an error
            instead of silently ignoring the QPS.
        hash_block_tokens: tokens covered by each prefix-block hash: a plain CSV's ``block_hashes`` column
            (default 16), the ``conversation`` workload (default 16); Mooncake's are 512 (another value is
            an error). Ignored by traces without hashes.
        **workload_options: options of the built-in workload (``random``: ``input_len``, ``output_len``,
            ``range_ratio``; ``conversation``: ``traces.conversation.OPTIONS``). An error for files.

    Returns:
        DataFrame with ``request_id`` (int64, 0..N-1 in arrival order), ``arrival_s`` (float64, seconds),
        ``prompt_tokens`` and ``output_tokens`` (int64, >= 1), sorted by arrival, plus ``block_hashes``
        (tuples of ints) and ``attrs["hash_block_tokens"]`` when the source has hashes (``traces.schema``).
        ``attrs["workload_changes"]`` records what the limit changed: ``{"num_requests_in", "num_shrunk",
        "num_dropped", "max_total_tokens", "examples"}`` (``traces.limits``); read attrs right after loading.

    Raises:
        TraceError (a ValueError, one-line message): unknown built-in name (known ones listed), file not found
        or unreadable (a folder, no permission), empty file, missing/unrecognised columns (columns found
        listed), bad values (file, 1-based line with the CSV header as line 1, and field named; token counts
        above ``MAX_TOKENS`` and arrival times beyond ``MAX_ARRIVAL_S`` included), unsorted or malformed
        timestamps (both lines named), a ``qps`` whose generated arrivals would span more than
        ``MAX_ARRIVAL_S``,
        malformed JSON line, bad hashes, missing ``qps`` when arrivals must be generated, an explicit ``qps``
        for a trace that keeps its own arrival times, invalid options.

    Sources: Sarathi-Serve (Agrawal et al., OSDI 2024) Table 2 for sharegpt/arxiv and its
    ``TraceRequestLengthGenerator`` for the shrinking rule; vLLM's ``RandomDataset`` for random; Azure LLM
    inference trace 2023; Mooncake traces (FAST'25).
    """
    return load_columns(spec, num_requests=num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                        max_total_tokens=max_total_tokens, shuffle=shuffle, drop_long=drop_long, retime=retime,
                        qps_explicit=qps_explicit, hash_block_tokens=hash_block_tokens,
                        **workload_options).frame()


def load_columns(spec: str | Path, *, num_requests: int | None = None, qps: float | None = None, seed: int = 0,
                 arrival: str = "poisson", cv: float = 1.0, max_total_tokens: int | None = None,
                 shuffle: bool = False, drop_long: bool = False, retime: bool | None = None,
                 qps_explicit: bool = False, hash_block_tokens: int | None = None,
                 **workload_options) -> TraceColumns:
    """``load_trace`` as ``TraceColumns``: the same arguments, checks and errors, the same trace
    (``load_trace(...)`` is ``load_columns(...).frame()``).

    The sharegpt, arxiv and random workloads are generated as columns without importing pandas, and plain
    integer CSV files are read with the csv module (``traces.loaders``); other trace files and the
    ``conversation`` workload are read or built with pandas and converted.
    """
    check_arrival_options(qps, arrival, cv)
    if num_requests is not None:
        _check_count(num_requests, "num_requests", minimum=1)
    if max_total_tokens is not None:
        _check_count(max_total_tokens, "max_total_tokens", minimum=2)

    name = str(spec)
    if name in WORKLOADS:
        return _load_builtin(name, num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                             max_total_tokens=max_total_tokens, drop_long=drop_long, retime=retime,
                             hash_block_tokens=hash_block_tokens, options=workload_options)
    path = Path(spec)
    try:
        exists = path.exists()
    except OSError as exc:                               # e.g. a folder on the way without permission
        raise TraceError(f"cannot read: {exc.strerror or exc}", name) from None
    if not exists and path.suffix == "" and len(path.parts) == 1:
        known = ", ".join(sorted(WORKLOADS))
        raise TraceError(f"unknown built-in workload {name!r} (known: {known}) and no file of that name")
    if workload_options:
        first = sorted(workload_options)[0]
        raise TraceError(f"option {first!r} applies only to built-in workloads, not to a trace file", str(path),
                         field=first)
    return _load_file(path, num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                      max_total_tokens=max_total_tokens, shuffle=shuffle, drop_long=drop_long, retime=retime,
                      qps_explicit=qps_explicit, hash_block_tokens=hash_block_tokens)


def _load_builtin(name: str, num_requests: int | None, *, qps, seed, arrival, cv, max_total_tokens, drop_long,
                  retime, hash_block_tokens, options: dict) -> TraceColumns:
    if num_requests is None:
        raise TraceError("num_requests is required for a built-in workload", name, field="num_requests")
    if retime is False:
        raise TraceError("a built-in workload has no arrival times to keep (retime=False)", name, field="retime")
    if hash_block_tokens is not None and "hash_block_tokens" in WORKLOADS[name].options:
        options = {"hash_block_tokens": hash_block_tokens, **options}
    workload = checked_workload(name, options)
    kwargs = dict(qps=qps, seed=seed, arrival=arrival, cv=cv, max_total_tokens=max_total_tokens,
                  drop_long=drop_long, **options)
    if workload.columns is not None:
        return workload.columns(num_requests, **kwargs).validate(name)
    return TraceColumns.from_frame(validate_trace(workload.generate(num_requests, **kwargs), name))


def _load_file(path: Path, num_requests: int | None, *, qps, seed, arrival, cv, max_total_tokens, shuffle,
               drop_long, retime, qps_explicit, hash_block_tokens) -> TraceColumns:
    streams = rng_streams(seed)
    raw = read_trace_file(path, hash_block_tokens=hash_block_tokens)
    keeps_arrivals = raw.arrival_s is not None and not retime
    if qps_explicit and qps is not None and keeps_arrivals:
        raise TraceError(f"--qps {qps:g} is ignored because the trace has its own arrival times; pass --retime "
                         f"to re-time it to --qps, or drop --qps", raw.source)

    kept, num_dropped, examples = _drop_over_long(raw, max_total_tokens, drop_long)
    lengths_idx = kept[streams.shuffle.permutation(len(kept))] if shuffle else kept
    arrival_idx = kept                                                 # arrivals stay in time order
    if num_requests is not None:
        if num_requests > len(kept):
            raise TraceError(f"num_requests={num_requests} but the trace has only {len(kept)} requests"
                             + (" after dropping over-long ones" if drop_long else ""), raw.source,
                             field="num_requests")
        lengths_idx, arrival_idx = lengths_idx[:num_requests], arrival_idx[:num_requests]

    hashes = None if raw.block_hashes is None else [raw.block_hashes[i] for i in lengths_idx]
    labels = [f"line {int(raw.lines[i])}" for i in lengths_idx] if max_total_tokens is not None else []
    prompt, output, hashes, num_shrunk, shrunk_examples = shrink_requests(
        raw.prompt_tokens[lengths_idx], raw.output_tokens[lengths_idx], hashes, raw.hash_block_tokens,
        None if drop_long else max_total_tokens, labels)

    if keeps_arrivals:
        arrivals = raw.arrival_s[arrival_idx]
    else:
        if retime is False:
            raise TraceError("the trace has no arrival times and retime=False", raw.source, field="retime")
        if qps is None:
            reason = "retime=True" if retime else f"the trace ({raw.format} format) has no arrival times"
            raise TraceError(f"required because {reason}; pass qps", raw.source, field="qps")
        arrivals = arrival_times(len(prompt), qps, streams.arrivals, arrival=arrival, cv=cv)
    columns = make_columns(arrivals, prompt, output, hashes, raw.hash_block_tokens)
    columns.attrs["workload_changes"] = changes_record(len(raw), num_shrunk, num_dropped, max_total_tokens,
                                                       examples + shrunk_examples)
    return columns.validate(raw.source)


def _drop_over_long(raw: RawTrace, max_total_tokens: int | None, drop_long: bool):
    """Indices of the requests kept (file order), the number dropped and examples of drops."""
    kept = np.arange(len(raw))
    if not drop_long or max_total_tokens is None:
        return kept, 0, []
    over = over_limit(raw.prompt_tokens, raw.output_tokens, max_total_tokens)
    if over.all():
        raise TraceError(f"every request exceeds max_total_tokens={max_total_tokens} (drop_long)",
                         raw.source, field="max_total_tokens")
    labels = [f"line {int(line)}" for line in raw.lines]
    examples = drop_examples(labels, raw.prompt_tokens, raw.output_tokens, over, max_total_tokens)
    return kept[~over], int(over.sum()), examples
