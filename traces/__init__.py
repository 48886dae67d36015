"""Request traces for servesim: built-in synthetic workloads and loaders for published trace files.

Every generator and loader returns a ``pandas.DataFrame`` with exactly the columns ``request_id`` (int,
0..N-1 in arrival order), ``arrival_s`` (float seconds), ``prompt_tokens`` and ``output_tokens`` (int >= 1),
sorted by arrival (see ``traces.schema``). Bad input raises ``TraceError`` (a ``ValueError``) with a one-line
message naming the file, the line and the field.

    >>> from traces import load_trace
    >>> df = load_trace("sharegpt", num_requests=2048, qps=4.0, seed=0)
    >>> df = load_trace("azure_llm_inference_2023_conv.csv")            # keeps the trace's arrivals
    >>> df = load_trace("arxiv_summarization_stats.csv", qps=2.0, shuffle=True, max_total_tokens=16384)
"""
from .api import load_trace
from .loaders import FORMATS, detect_format, read_trace_file
from .schema import COLUMNS, TraceError, validate_trace
from .synthetic import BUILTIN_WORKLOADS, BuiltinWorkload, arrival_times, fit_lognormal_params, generate

__all__ = [
    "BUILTIN_WORKLOADS", "BuiltinWorkload", "COLUMNS", "FORMATS", "TraceError", "arrival_times",
    "detect_format", "fit_lognormal_params", "generate", "load_trace", "read_trace_file", "validate_trace",
]
