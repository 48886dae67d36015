"""Import a ``vllm bench serve --save-result --save-detailed`` JSON into servesim's request and token tables.

The detailed result (``vllm/benchmarks/serve.py``, ``benchmark()``'s result dict merged into the saved JSON) has
one entry per request, in the order the benchmark issued them, in the lists:

* ``input_lens`` (prompt tokens), ``output_lens`` (output tokens; 0 for a failed request), ``ttfts`` (s),
  ``itls`` (a list per request: gaps between streamed chunks after the first, s), ``start_times``
  (``time.perf_counter()`` when the request was sent, s) — required;
* ``latencies`` (s, send to last chunk), ``queue_times`` (client-side concurrency-semaphore wait, s), ``errors``
  (``""`` when it succeeded) — optional (older versions lack some).

Times become seconds since the run's origin: the earliest intended arrival (``start_time - queue_time``), or, with
a ``requests_df`` trace, aligned so that no request was sent before its trace ``arrival_s`` (the lag is in
meta.json). A streamed chunk may carry several tokens: tokens.csv then has one row per chunk (``token_index`` =
chunk index) and meta.json says so. The server's schedule is not observable from the client: no plans.jsonl,
``"plans": false``; ``scheduled_s`` and ``num_preemptions`` are NaN.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.observe.vllm_engine import (FORMAT_VERSION, TOKEN_COLUMNS, _atomic_write_csv, _atomic_write_text,
                                           check_trace, lag_stats, requests_frame)

REQUIRED_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "start_times")
OPTIONAL_KEYS = ("latencies", "queue_times", "errors")
# Scalar fields of the result copied into meta.json["bench"] when present.
BENCH_FIELDS = ("date", "backend", "endpoint_type", "label", "model_id", "tokenizer_id", "num_prompts",
                "request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
                "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
                "total_token_throughput", "max_concurrent_requests")


def _number(value, path, key, index):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        where = f"[{index}]" if index is not None else ""
        raise ValueError(f"{path}: {key}{where}: must be a finite number, got {value!r}")
    return float(value)


def import_vllm_bench(json_path, out_dir, requests_df: pd.DataFrame | None = None) -> Path:
    """Write ``requests.csv``, ``tokens.csv`` and ``meta.json`` into ``out_dir`` from a vLLM bench JSON.

    Args:
        requests_df: optional servesim trace the benchmark replayed, row i = the benchmark's request i (sorted by
            arrival): its ``request_id`` and ``arrival_s`` are used; otherwise ids are 0..N-1 and arrivals are the
            benchmark's own intended send times.
    Returns ``Path(out_dir)``. Raises ValueError (one line, naming the file and the key) for malformed input and
    FileNotFoundError for a missing file.
    """
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (a vllm bench serve --save-result file)")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ValueError(f"{path}: {key}: missing (save the benchmark with --save-result --save-detailed)")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: {key}: must be a list, got {type(data[key]).__name__}")
    n = len(data["input_lens"])
    present = [k for k in REQUIRED_KEYS + OPTIONAL_KEYS if isinstance(data.get(k), list)]
    for key in present:
        if len(data[key]) != n:
            raise ValueError(f"{path}: {key}: has {len(data[key])} entries but input_lens has {n}")
    if n == 0:
        raise ValueError(f"{path}: input_lens: no requests")

    errors = data.get("errors") if isinstance(data.get("errors"), list) else [""] * n
    queue = data.get("queue_times") if isinstance(data.get("queue_times"), list) else None
    latencies = data.get("latencies") if isinstance(data.get("latencies"), list) else None
    prompt, outputs, starts, ttfts, itls, ok = [], [], [], [], [], []
    for i in range(n):
        p = data["input_lens"][i]
        o = data["output_lens"][i]
        for key, v in (("input_lens", p), ("output_lens", o)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{path}: {key}[{i}]: must be an integer >= 0, got {v!r}")
        gaps = data["itls"][i]
        if not isinstance(gaps, list):
            raise ValueError(f"{path}: itls[{i}]: must be a list of seconds, got {type(gaps).__name__}")
        good = (not errors[i]) and o > 0
        prompt.append(p)
        outputs.append(o)
        starts.append(_number(data["start_times"][i], path, "start_times", i))
        ttfts.append(_number(data["ttfts"][i], path, "ttfts", i) if good else math.nan)
        itls.append([_number(g, path, f"itls[{i}]", j) for j, g in enumerate(gaps)] if good else [])
        ok.append(good)
    sent = np.asarray(starts)
    qt = np.asarray([_number(q, path, "queue_times", i) for i, q in enumerate(queue)]) if queue else np.zeros(n)
    intended = sent - qt                                 # when the benchmark meant to send each request

    if requests_df is not None:
        trace = check_trace(requests_df, source="requests_df")
        if len(trace) != n:
            raise ValueError(f"{path}: input_lens: {n} requests but requests_df has {len(trace)}")
        ids = trace["request_id"].astype(int).tolist()
        arrivals = trace["arrival_s"].to_numpy(dtype=float)
        origin = float(np.min(sent - arrivals))          # no request sent before its trace arrival
        prompt_mismatch = int(np.sum(trace["prompt_tokens"].to_numpy() != np.asarray(prompt)))
        trace_outputs = trace["output_tokens"].astype(int).tolist()
    else:
        ids = list(range(n))
        origin = float(np.min(intended))
        arrivals = intended - origin
        prompt_mismatch = None
        trace_outputs = None

    rows, tok_rows, chunked = [], [], 0
    for i in range(n):
        start = sent[i] - origin
        if ok[i]:
            first = start + ttfts[i]
            times = [first] + list(first + np.cumsum(itls[i])) if itls[i] else [first]
            if latencies is not None and latencies[i] is not None:
                done = start + _number(latencies[i], path, "latencies", i)
            else:
                done = times[-1]
            if len(times) != outputs[i]:
                chunked += 1
            tok_rows.extend((ids[i], j, t) for j, t in enumerate(times))
        else:
            first = done = None
        out_tokens = outputs[i] if ok[i] or trace_outputs is None else trace_outputs[i]
        rows.append(dict(request_id=ids[i], arrival_s=float(arrivals[i]), prompt_tokens=prompt[i],
                         output_tokens=out_tokens, scheduled_s=None,
                         first_token_s=first, completion_s=done, num_preemptions=float("nan")))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_csv(out / "requests.csv", requests_frame(rows))
    _atomic_write_csv(out / "tokens.csv", pd.DataFrame.from_records(tok_rows, columns=TOKEN_COLUMNS))
    lag = (sent - origin) - np.asarray(arrivals, dtype=float)
    meta = {
        "engine": "vllm-bench",
        "source": str(path),
        "bench": {k: data[k] for k in BENCH_FIELDS if k in data and not isinstance(data[k], (list, dict))},
        "num_requests": n,
        "num_completed": int(sum(ok)),
        "num_failed": int(n - sum(ok)),
        "keys_missing": [k for k in OPTIONAL_KEYS if not isinstance(data.get(k), list)],
        "num_requests_chunked": chunked,
        "tokens": ("one row per output token" if chunked == 0 else
                   f"one row per streamed chunk: {chunked} requests had chunks carrying several tokens"),
        "arrival_lag_s": {**lag_stats(lag), "meaning": "time the request was sent minus its arrival_s"},
        "prompt_tokens_mismatch": prompt_mismatch,
        "times": "seconds since the run's origin (the earliest intended send time, or aligned to the trace)",
        "plans": False,
        "plans_note": "a remote server's schedule is not observable from the client: no plans.jsonl",
        "format_version": FORMAT_VERSION,
    }
    _atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return out
