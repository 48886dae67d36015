"""``load_trace``: the single entry point the CLI calls, for built-in workloads and trace files alike."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .loaders import RawTrace, read_trace_file
from .schema import TraceError, make_trace, validate_trace
from .synthetic import (BUILTIN_WORKLOADS, _check_count, arrival_times, check_arrival_options, generate,
                        rng_streams)


def load_trace(spec: str | Path, *, num_requests: int | None = None, qps: float | None = None, seed: int = 0,
               arrival: str = "poisson", cv: float = 1.0, max_total_tokens: int | None = None,
               shuffle: bool = False, drop_long: bool = False, retime: bool | None = None) -> pd.DataFrame:
    """Load a request trace: a built-in synthetic workload or a trace file.

    Args:
        spec: ``"sharegpt"`` or ``"arxiv"`` (``BUILTIN_WORKLOADS``; a built-in name wins over a file of the
            same name), or the path of a trace file: plain CSV, Sarathi-Serve/Vidur CSV, Azure LLM inference
            2023 CSV or Mooncake JSONL, detected from the extension and columns (see ``traces.loaders``).
        num_requests: number of requests to return. Built-ins: required (>= 1). Files: the first N requests
            (after dropping and shuffling); None keeps all; more than the file holds is an error.
        qps: mean arrival rate in requests per second (> 0), used whenever arrivals are generated (built-ins,
            files without arrival times, ``retime=True``). ``math.inf`` puts every arrival at 0.0.
            Ignored for a file whose own arrival times are kept.
        seed: non-negative integer; all randomness (lengths, arrivals, shuffle) derives from it, so the same
            inputs and seed give a byte-identical DataFrame.
        arrival: ``"poisson"`` (exponential gaps, mean ``1/qps``) or ``"gamma"`` (gamma gaps, mean ``1/qps``,
            coefficient of variation ``cv``; ``cv=1`` is Poisson). Generated arrivals start at the first gap.
        cv: coefficient of variation of the gamma gaps (> 0); must stay 1 for ``"poisson"``.
        max_total_tokens: limit on ``prompt_tokens + output_tokens`` (>= 2). Built-ins: default 8192
            (sharegpt) / 16384 (arxiv), over-long draws are rejected and redrawn. Files: default None (no
            limit); over-long requests are shrunk like the Sarathi-Serve artifact (prompt and output both
            scaled by ``max_total / total``, rounded down, each kept >= 1; total then <= the limit), or
            dropped if ``drop_long``.
        shuffle: files only: permute the (prompt, output) pairs with the seed before taking the first N;
            arrival times stay in time order (kept or generated). No-op for built-ins (already i.i.d.).
        drop_long: files only: drop over-long requests instead of shrinking them.
        retime: None (default): keep the file's arrival times if it has them, else generate them at ``qps``.
            True: always generate arrivals at ``qps``. False: keep the file's arrivals; a trace without any
            is an error. Azure timestamps become seconds since the file's first request; other formats keep
            their arrival values (Mooncake milliseconds converted to seconds).

    Returns:
        DataFrame with exactly ``request_id`` (int64, 0..N-1 in arrival order), ``arrival_s`` (float64,
        seconds), ``prompt_tokens`` and ``output_tokens`` (int64, >= 1), sorted by arrival.

    Raises:
        TraceError (a ValueError, one-line message): unknown built-in name (known ones listed), file not found,
        empty file, missing/unrecognised columns (columns found listed), bad values (file, 1-based line with
        the CSV header as line 1, and field named), unsorted or malformed timestamps (both lines named),
        malformed JSON line, missing ``qps`` when arrivals must be generated, invalid options.

    Sources: Sarathi-Serve (Agrawal et al., OSDI 2024) Table 2 for the built-ins and its
    ``TraceRequestLengthGenerator`` for the shrinking rule; Azure LLM inference trace 2023; Mooncake traces.
    """
    check_arrival_options(qps, arrival, cv)
    if num_requests is not None:
        _check_count(num_requests, "num_requests", minimum=1)
    if max_total_tokens is not None:
        _check_count(max_total_tokens, "max_total_tokens", minimum=2)
    streams = rng_streams(seed)

    name = str(spec)
    if name in BUILTIN_WORKLOADS:
        if num_requests is None:
            raise TraceError("num_requests is required for a built-in workload", name, field="num_requests")
        if retime is False:
            raise TraceError("a built-in workload has no arrival times to keep (retime=False)", name, field="retime")
        return generate(name, num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                        max_total_tokens=max_total_tokens)

    path = Path(spec)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:
        known = ", ".join(sorted(BUILTIN_WORKLOADS))
        raise TraceError(f"unknown built-in workload {name!r} (known: {known}) and no file of that name")
    raw = read_trace_file(path)
    prompt, output, arrivals = _limit_lengths(raw, max_total_tokens, drop_long)
    if shuffle:
        perm = streams.shuffle.permutation(len(prompt))
        prompt, output = prompt[perm], output[perm]
    if num_requests is not None:
        if num_requests > len(prompt):
            raise TraceError(f"num_requests={num_requests} but the trace has only {len(prompt)} requests"
                             + (" after dropping over-long ones" if drop_long else ""), raw.source,
                             field="num_requests")
        prompt, output = prompt[:num_requests], output[:num_requests]
        arrivals = None if arrivals is None else arrivals[:num_requests]

    if retime or arrivals is None:
        if retime is False:
            raise TraceError("the trace has no arrival times and retime=False", raw.source, field="retime")
        if qps is None:
            reason = "retime=True" if retime else f"the trace ({raw.format} format) has no arrival times"
            raise TraceError(f"required because {reason}; pass qps", raw.source, field="qps")
        arrivals = arrival_times(len(prompt), qps, streams.arrivals, arrival=arrival, cv=cv)
    return validate_trace(make_trace(arrivals, prompt, output), raw.source)


def _limit_lengths(raw: RawTrace, max_total_tokens: int | None, drop_long: bool):
    """Apply the ``prompt + output <= max_total_tokens`` limit: shrink proportionally or drop."""
    prompt, output, arrivals = raw.prompt_tokens, raw.output_tokens, raw.arrival_s
    if max_total_tokens is None:
        return prompt, output, arrivals
    total = prompt + output
    over = total > max_total_tokens
    if not over.any():
        return prompt, output, arrivals
    if drop_long:
        keep = ~over
        if not keep.any():
            raise TraceError(f"every request exceeds max_total_tokens={max_total_tokens} (drop_long)",
                             raw.source, field="max_total_tokens")
        return prompt[keep], output[keep], None if arrivals is None else arrivals[keep]
    # floor(x * M / T) == x - ceil((T - M) * x / T): the Sarathi-Serve rule, in exact integer arithmetic.
    m = np.int64(max_total_tokens)
    prompt = np.where(over, np.maximum(1, prompt * m // total), prompt)
    output = np.where(over, np.maximum(1, output * m // total), output)
    return prompt, output, arrivals
