"""Prefix-block hashes: how a trace's per-request block hashes map onto the simulator's KV blocks, and the
reference prefix-cache hit rate the simulator is tested against.

A trace may carry, per request, a tuple of integer **trace hashes**, one per ``hash_block_tokens`` (``H``)
tokens of the prompt, *prefix-chained*: equal hash at position ``k`` in two requests means their prompts are
equal over the whole prefix ``[0, (k + 1) * H)`` (Mooncake's ``hash_ids``, with ``H = 512``; see
``traces.loaders``). The trace DataFrame keeps them in the optional ``block_hashes`` column, with ``H`` in
``df.attrs["hash_block_tokens"]`` (``traces.schema``).

Functions:

* ``block_hashes_for`` maps one request's trace hashes onto simulator KV blocks of ``block_size`` tokens;
* ``direct_hit_tokens`` / ``hit_rate``: the prompt tokens an *unbounded* prefix cache with block size ``H``
  would serve, request by request in trace order; the reference value for the simulator's prefix cache;
* ``full_block_hashes`` cuts a request's hashes to the blocks wholly inside a (shrunk) prompt;
* ``mix_hash`` is the stable 64-bit integer hash all of this uses (never Python's randomised ``hash()``).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .schema import TraceError

MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 output function on a uint64 array (wrapping arithmetic).

    Source: Steele, Lea and Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014; constants
    of Vigna's ``splitmix64.c`` (https://prng.di.unimi.it/splitmix64.c).
    """
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def _as_uint64(values) -> np.ndarray:
    """Integers (Python ints of any size, or an integer array) as uint64, taken modulo 2**64."""
    if isinstance(values, np.ndarray) and values.dtype == np.uint64:
        return values
    if isinstance(values, np.ndarray) and np.issubdtype(values.dtype, np.integer):
        return values.astype(np.uint64)                       # two's complement: the same as modulo 2**64
    return np.fromiter((int(v) & MASK64 for v in np.atleast_1d(np.asarray(values, dtype=object))),
                       dtype=np.uint64)


def mix_hash(*columns) -> np.ndarray:
    """Stable 64-bit hash of integer tuples, element-wise: ``mix_hash(a, b)[i]`` hashes ``(a[i], b[i])``.

    Each column is an int, a sequence of ints or an integer array (broadcast against the others); values
    are taken modulo 2**64. ``h = 0; for c in columns: h = splitmix64(h ^ splitmix64(c))``, so the order of
    the columns matters. Returns a uint64 array; the same inputs give the same hash on every machine and run.
    """
    arrays = np.broadcast_arrays(*(_as_uint64(c) if np.ndim(c) else _as_uint64([c]) for c in columns))
    h = np.zeros(arrays[0].shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in arrays:
            h = _splitmix64(h ^ _splitmix64(c))
    return h


def _check_positive(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TraceError(f"must be an integer >= 1, got {value!r}", field=field)
    return int(value)


def block_hashes_for(trace_hashes: Sequence[int], hash_block_tokens: int, prompt_tokens: int,
                     block_size: int) -> tuple[int, ...]:
    """Prefix-cache keys of one request's simulator KV blocks, from its trace hashes.

    Rule: simulator block ``j`` holds prompt tokens ``[j*b, (j+1)*b)`` (``b = block_size``). It gets a key only
    if it is a FULL block inside the prompt (``(j+1)*b <= prompt_tokens``) and the trace has a hash for the
    trace block holding its last token, ``k = ((j+1)*b - 1) // H``. Trace hash ``k`` identifies the prompt
    prefix through the end of trace block ``k``, which contains block ``j`` and everything before it, so
    ``key_j = mix_hash(trace_hashes[k], j)`` identifies the whole prefix through block ``j`` (the ``j``
    tells apart the blocks inside one trace block when ``b < H``). Blocks past the trace's hashes get no key,
    so the result may be shorter than ``prompt_tokens // b``; block ``j`` of a request is cached under
    ``result[j]``.

    This is conservative: two prompts that agree on part of a trace block but not all of it have different
    trace hashes there, so sharing inside a partially matching trace block is not detected (with
    ``b < H`` the first ``floor(matching tokens / b)`` blocks of that trace block would really be shared).

    Args:
        trace_hashes: the request's trace hashes (ints), prefix-chained, one per ``H`` prompt tokens.
        hash_block_tokens: ``H``, tokens covered by one trace hash (``df.attrs["hash_block_tokens"]``).
        prompt_tokens: the request's prompt length in tokens (>= 1).
        block_size: the simulator's KV block size in tokens (>= 1).

    Returns:
        Keys as Python ints in ``[0, 2**64)``, one per keyed block, for blocks ``0, 1, ...`` in order.

    Raises:
        TraceError: a non-positive or non-integer ``hash_block_tokens``, ``prompt_tokens`` or ``block_size``.
    """
    h = _check_positive(hash_block_tokens, "hash_block_tokens")
    b = _check_positive(block_size, "block_size")
    p = _check_positive(prompt_tokens, "prompt_tokens")
    j = np.arange(p // b, dtype=np.int64)
    k = ((j + 1) * b - 1) // h                         # trace block of block j's last token (non-decreasing)
    n = int(np.searchsorted(k, len(trace_hashes)))     # blocks whose trace block has a hash
    if n == 0:
        return ()
    ids = _as_uint64(list(trace_hashes))[k[:n]]
    return tuple(mix_hash(ids, j[:n]).tolist())


def full_block_hashes(hashes: Sequence[int], hash_block_tokens: int, prompt_tokens: int) -> tuple[int, ...]:
    """The hashes of the trace blocks wholly inside a prompt of ``prompt_tokens``: ``hashes[:prompt // H]``.

    Used when a request is shrunk (its prompt cut at the tail): a block that no longer fits whole loses its
    hash, since its hash describes tokens the shrunk prompt no longer has.
    """
    return tuple(hashes[: int(prompt_tokens) // int(hash_block_tokens)])


def direct_hit_tokens(hash_lists: Iterable[Sequence[int]], hash_block_tokens: int,
                      prompt_lens: Iterable[int]) -> np.ndarray:
    """Prompt tokens served by an unbounded prefix cache with block size ``H``, for each request in order.

    Request ``i`` hits the longest prefix of its hashes that were all seen in EARLIER requests (any
    position: under the prefix-chain property a hash identifies its position and everything before it),
    ``m`` blocks, i.e. ``m * H`` tokens, capped at ``floor((prompt_len - 1) / H) * H``: at least the last
    prompt token is always computed, and the cache serves whole blocks only (vLLM 0.32
    ``vllm/v1/core/kv_cache_manager.py`` ``get_computed_blocks``: ``max_cache_hit_length =
    request.num_tokens - 1``, then the longest hit of full blocks below it). Every request's hashes enter the
    cache after its own lookup; nothing is evicted and output tokens are never cached (traces hash prompts).

    Args:
        hash_lists: per request, its trace hashes (e.g. ``df["block_hashes"]``).
        hash_block_tokens: ``H``, tokens per hash (e.g. ``df.attrs["hash_block_tokens"]``).
        prompt_lens: per request, its prompt length in tokens (>= 1), same length as ``hash_lists``.

    Returns:
        int64 array of shape ``(num_requests,)``: hit tokens per request, each in ``[0, prompt_len - 1]``.

    Raises:
        TraceError: ``hash_lists`` and ``prompt_lens`` of different lengths, a prompt length < 1, or a bad
            ``hash_block_tokens``.
    """
    h = _check_positive(hash_block_tokens, "hash_block_tokens")
    hash_lists = list(hash_lists)
    prompts = np.asarray(list(prompt_lens), dtype=np.int64)
    if len(hash_lists) != len(prompts):
        raise TraceError(f"{len(hash_lists)} hash lists but {len(prompts)} prompt lengths", field="prompt_lens")
    if len(prompts) and prompts.min() < 1:
        raise TraceError(f"prompt lengths must be >= 1, got {int(prompts.min())}", field="prompt_lens")
    seen: set[int] = set()
    hits = np.zeros(len(prompts), dtype=np.int64)
    for i, (ids, prompt) in enumerate(zip(hash_lists, prompts.tolist())):
        matched = 0
        for x in ids:
            if x not in seen:
                break
            matched += 1
        hits[i] = min(matched * h, (prompt - 1) // h * h)
        seen.update(ids)
    return hits


def hit_rate(hash_lists: Iterable[Sequence[int]], hash_block_tokens: int, prompt_lens: Iterable[int]) -> float:
    """``sum(direct_hit_tokens(...)) / sum(prompt_lens)``: the fraction of prompt tokens an unbounded prefix
    cache with block size ``H`` serves (see ``direct_hit_tokens``; same arguments and errors)."""
    prompts = np.asarray(list(prompt_lens), dtype=np.int64)
    hits = direct_hit_tokens(hash_lists, hash_block_tokens, prompts)
    total = int(prompts.sum())
    return float(hits.sum() / total) if total else 0.0
