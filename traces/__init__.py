"""Request traces for servesim: built-in workloads and loaders for published trace files.

Every generator and loader returns a ``pandas.DataFrame`` with the columns ``request_id`` (int, 0..N-1 in
arrival order), ``arrival_s`` (float seconds), ``prompt_tokens`` and ``output_tokens`` (int >= 1), sorted by
arrival, plus an optional ``block_hashes`` column (a tuple of ints per request, prefix-block hashes covering
``df.attrs["hash_block_tokens"]`` tokens each) when the source has them; ``df.attrs["workload_changes"]``
records what the ``max_total_tokens`` limit changed (see ``traces.schema``, ``traces.limits``). Bad input
raises ``TraceError`` (a ``ValueError``) with a one-line message naming the file, the line and the field.
``load_columns`` gives the same trace as numpy arrays (``TraceColumns``; ``.frame()`` is ``load_trace``'s
DataFrame); it imports pandas only for the ``conversation`` workload and for trace files other than plain
integer CSVs (Sarathi-Serve/Vidur or plain, without arrival times or hashes), and importing ``traces`` never does.

    >>> from traces import load_trace
    >>> df = load_trace("sharegpt", num_requests=2048, qps=4.0, seed=0)
    >>> df = load_trace("conversation", num_requests=2048, qps=4.0, seed=0)    # with block_hashes
    >>> df = load_trace("random", num_requests=512, qps=float("inf"), input_len=1024, output_len=128)
    >>> df = load_trace("azure_llm_inference_2023_conv.csv")            # keeps the trace's arrivals
    >>> df = load_trace("arxiv_summarization_stats.csv", qps=2.0, shuffle=True, max_total_tokens=16384)
    >>> hit_rate(df["block_hashes"], df.attrs["hash_block_tokens"], df["prompt_tokens"])  # prefix-cache reference
    >>> cols = load_columns("sharegpt", num_requests=2048, qps=4.0, seed=0)  # cols.arrival_s, cols.prompt_tokens, ...
"""
from .api import load_columns, load_trace
from .conversation import ConversationParams, generate_conversation, sample_sessions
from .limits import changes_record, shrink_lengths
from .loaders import FORMATS, detect_format, read_trace_file
from .prefix import block_hashes_for, direct_hit_tokens, full_block_hashes, hit_rate, mix_hash
from .random_dataset import generate_random, random_lengths
from .schema import COLUMNS, HASH_COLUMN, TraceColumns, TraceError, validate_trace
from .synthetic import BUILTIN_WORKLOADS, BuiltinWorkload, arrival_times, fit_lognormal_params, generate
from .workloads import WORKLOADS, Workload, generate_workload

__all__ = [
    "BUILTIN_WORKLOADS", "BuiltinWorkload", "COLUMNS", "ConversationParams", "FORMATS", "HASH_COLUMN",
    "TraceColumns", "TraceError", "WORKLOADS", "Workload", "arrival_times", "block_hashes_for", "changes_record",
    "detect_format", "direct_hit_tokens", "fit_lognormal_params", "full_block_hashes", "generate",
    "generate_conversation", "generate_random", "generate_workload", "hit_rate", "load_columns", "load_trace",
    "mix_hash", "random_lengths", "read_trace_file", "sample_sessions", "shrink_lengths", "validate_trace",
]
