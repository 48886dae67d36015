"""Shape grids of a profile run: which operator is timed at which shapes.

- Token operators (``profiler.ops.TOKEN_OPERATORS``) at token counts ``1..dense_tokens`` then geometric with ratio
  ``token_growth`` up to ``max_tokens`` (``token_counts``); ``cpu_overhead`` the same up to ``max_batch`` sequences.
- ``lm_head`` at (sequences B, iteration tokens T) pairs: B of ``head_batches`` up to ``max_batch``, T = B (a
  decode-only iteration) and each of ``head_tokens`` above B up to ``max_tokens`` (``head_shapes``): on a CPU the
  LM head's time depends on what the iteration's layers read before it (``profiler.ops.PRECEDING_OPERATORS``). A
  GPU run times it without them (its weights cycled through twice the L2 cache), so there the rows of one B agree.
- ``attn_prefill`` at (chunk, context) pairs with ``chunk + context <= max_context`` (``prefill_shapes``).
- ``attn_decode`` at (batch, KV length) pairs, each with two KV patterns: ``uniform`` (every sequence holds
  ``kv_len`` tokens) and ``linear`` (sequence ``i`` of ``b`` holds ``ceil(kv_len*(i+1)/b)``, so the longest holds
  ``kv_len`` and the batch about half the uniform total) — so that total and longest KV length vary apart
  (``decode_shapes``, ``decode_kv_lens``).

``build_grid`` filters the shapes by a memory budget (``shape_bytes``) and orders them largest first, so that a run
that cannot fit fails in its first minute, not its last. Nothing here needs torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from profiler.schema import ATTENTION_OPERATORS, SEQUENCE_OPERATORS, SHAPE_COLUMNS, TOKEN_OPERATORS


KV_PATTERNS = ("uniform", "linear")


@dataclass(frozen=True)
class GridSpec:
    """Bounds of a grid. Tokens and sequences are counts; ``token_growth`` > 1 is the geometric step."""

    max_tokens: int = 8192
    dense_tokens: int = 64
    token_growth: float = 1.1
    max_batch: int = 256
    max_context: int = 8192
    prefill_chunks: tuple = (1, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
    prefill_contexts: tuple = (0, 16, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144)
    decode_batches: tuple = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    decode_kv_lens: tuple = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
    head_batches: tuple = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    head_tokens: tuple = (64, 256, 1024, 4096, 8192)

    @classmethod
    def full(cls, max_context: int = 8192, max_tokens: int | None = None) -> "GridSpec":
        """The default (GPU) grid up to ``max_context`` tokens of context (the model's context length)."""
        return cls(max_tokens=max_tokens or max_context, max_context=max_context)

    @classmethod
    def quick(cls, max_context: int = 4096, max_tokens: int | None = None) -> "GridSpec":
        """A small grid for CPUs and CI (chunks up to 512, Sarathi-Serve's default token budget; contexts up to
        4096, the ``tiny`` model's max_model_len; decode batches up to 64), so a simulation of ``tiny`` on its
        defaults prices no shape beyond the profile (the run header says when one does)."""
        return cls(max_tokens=max_tokens or 1024, dense_tokens=16, token_growth=1.12, max_batch=64,
                   max_context=max_context,
                   prefill_chunks=(1, 4, 16, 32, 64, 96, 128, 192, 256, 384, 512),
                   prefill_contexts=(0, 16, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4032),
                   decode_batches=(1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64),
                   decode_kv_lens=(16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096),
                   head_tokens=(64, 256, 512, 1024))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "GridSpec":
        return replace(cls(), **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def token_counts(max_tokens: int, dense_tokens: int = 64, growth: float = 1.1) -> list[int]:
    """``1..dense_tokens`` then ``round(previous x growth)`` (at least +1) up to and including ``max_tokens``."""
    if max_tokens < 1 or growth <= 1:
        raise ValueError(f"token_counts: need max_tokens >= 1 and growth > 1, got {max_tokens}, {growth}")
    counts = list(range(1, min(dense_tokens, max_tokens) + 1))
    n = counts[-1]
    while n < max_tokens:
        n = min(max_tokens, max(n + 1, round(n * growth)))
        counts.append(n)
    return counts


def head_shapes(spec: GridSpec) -> list[tuple[int, int]]:
    """``(sequences B, tokens T)`` pairs of ``lm_head``: each B of ``head_batches`` up to ``max_batch`` at T = B and
    at each T of ``head_tokens`` above B, up to ``max_tokens`` (included)."""
    batches = [b for b in spec.head_batches if b <= spec.max_batch] or [spec.max_batch]
    tokens = sorted({t for t in spec.head_tokens if t < spec.max_tokens} | {spec.max_tokens})
    return [(b, t) for b in batches for t in [b] + [t for t in tokens if t > b]]


def prefill_shapes(spec: GridSpec) -> list[tuple[int, int]]:
    """``(chunk, context)`` pairs of the spec with ``chunk + context <= max_context``."""
    return [(c, k) for c in spec.prefill_chunks for k in spec.prefill_contexts if c + k <= spec.max_context]


def decode_kv_lens(batch_size: int, kv_len: int, pattern: str) -> list[int]:
    """Per-sequence KV lengths of a decode shape (see the module docstring). Raises ValueError for a bad pattern."""
    if pattern == "uniform":
        return [kv_len] * batch_size
    if pattern == "linear":
        return [max(1, math.ceil(kv_len * (i + 1) / batch_size)) for i in range(batch_size)]
    raise ValueError(f"decode KV pattern must be one of {', '.join(KV_PATTERNS)}, got {pattern!r}")


def decode_shapes(spec: GridSpec) -> list[tuple[int, int, str]]:
    """``(batch, kv_len, pattern)`` triples; the ``linear`` pattern only for batches > 1 (else it is uniform)."""
    out = []
    for b in spec.decode_batches:
        if b > spec.max_batch:
            continue
        for kv in spec.decode_kv_lens:
            if kv > spec.max_context:
                continue
            out.append((b, kv, "uniform"))
            if b > 1:
                out.append((b, kv, "linear"))
    return out


def shape_row(operator: str, *, num_tokens: int = 0, chunk_size: int = 0, context_len: int = 0,
              batch_size: int = 0, kv_lens=None, kv_pattern: str = "") -> dict:
    """The shape columns of one profile row (see ``profiler`` for their meaning)."""
    row = {"operator": operator, "num_tokens": num_tokens, "chunk_size": chunk_size, "context_len": context_len,
           "batch_size": batch_size, "kv_len": 0, "kv_total": 0, "kv_pattern": kv_pattern, "message_bytes": 0,
           "num_workers": 0}
    if operator == "attn_prefill":
        row.update(num_tokens=chunk_size, batch_size=1, kv_len=context_len + chunk_size,
                   kv_total=context_len + chunk_size)
    elif operator == "attn_decode":
        row.update(num_tokens=len(kv_lens), batch_size=len(kv_lens), kv_len=max(kv_lens), kv_total=sum(kv_lens))
    elif operator == "lm_head":
        row.update(batch_size=batch_size or num_tokens)
    elif operator in SEQUENCE_OPERATORS:
        row.update(batch_size=num_tokens)
    return row


def shape_key(row: dict) -> tuple:
    """The identity of a row for resuming: operator and shape columns."""
    return (str(row["operator"]),) + tuple(str(row[c]) if c == "kv_pattern" else int(row[c]) for c in SHAPE_COLUMNS)


def shape_bytes(row: dict, shapes, dtype_bytes: int, device_type: str = "cuda") -> int:
    """Upper estimate of the memory one shape needs beside the layer weights (bytes): inputs, outputs and
    intermediates, the KV cache it reads, and on CPUs the attention score matrix (materialized there)."""
    s, dt = shapes, dtype_bytes
    op, T = row["operator"], row["num_tokens"]
    width = max(s.hidden_size, s.q_size + 2 * s.kv_size, s.mlp_in)
    if op in TOKEN_OPERATORS:
        return 3 * T * width * dt + 2 * T * 2 * s.kv_size * dt
    if op in SEQUENCE_OPERATORS:
        return row["batch_size"] * (s.hidden_size + s.vocab_size) * dt + (3 * T * width * dt if op == "lm_head" else 0)
    kv = 2 * row["kv_len"] * row["batch_size"] * s.kv_size * dt
    scores = T * row["kv_len"] * s.num_q_heads * 4 if device_type == "cpu" else 0
    return kv + 2 * T * s.q_size * dt + scores


def build_grid(spec: GridSpec, shapes, dtype_bytes: int, *, device_type: str = "cuda",
               memory_budget_bytes: int | None = None, operators=None) -> list[dict]:
    """All shape rows of ``spec`` for ``operators`` (default: all), at most ``memory_budget_bytes`` each,
    ordered by that estimate from largest to smallest (ties by operator name, then shape)."""
    wanted = set(operators or TOKEN_OPERATORS + SEQUENCE_OPERATORS + ATTENTION_OPERATORS)
    rows = []
    for op in TOKEN_OPERATORS:
        if op in wanted:
            rows += [shape_row(op, num_tokens=t) for t in token_counts(spec.max_tokens, spec.dense_tokens,
                                                                        spec.token_growth)]
    if "cpu_overhead" in wanted:
        rows += [shape_row("cpu_overhead", num_tokens=b) for b in token_counts(spec.max_batch, 16, spec.token_growth)]
    if "lm_head" in wanted:
        rows += [shape_row("lm_head", num_tokens=t, batch_size=b) for b, t in head_shapes(spec)]
    if "attn_prefill" in wanted:
        rows += [shape_row("attn_prefill", chunk_size=c, context_len=k) for c, k in prefill_shapes(spec)]
    if "attn_decode" in wanted:
        rows += [shape_row("attn_decode", kv_lens=decode_kv_lens(b, kv, p), kv_pattern=p)
                 for b, kv, p in decode_shapes(spec)]
    sized = [(shape_bytes(r, shapes, dtype_bytes, device_type), r) for r in rows]
    if memory_budget_bytes is not None:
        sized = [(b, r) for b, r in sized if b <= memory_budget_bytes]
    sized.sort(key=lambda br: (-br[0], shape_key(br[1])))
    return [r for _, r in sized]
