"""The ``prompt + output <= max_total_tokens`` limit, applied the same way to files and built-in workloads,
and the record of what it changed (``df.attrs["workload_changes"]``).

An over-long request is either **shrunk** like the Sarathi-Serve artifact (prompt and output each scaled by
``max_total / total``, rounded down, each kept >= 1: ``TraceRequestLengthGenerator`` in
microsoft/sarathi-serve ``sarathi/benchmark/request_generator/trace_request_length_generator.py``; the total
is then <= the limit) or **dropped** (``drop_long``). Shrinking cuts the prompt at its tail, so a request's
block hashes are cut to the blocks still wholly inside the shrunk prompt (``traces.prefix.full_block_hashes``).
Nothing is changed silently: every load records

    {"num_requests_in": ..., "num_shrunk": ..., "num_dropped": ..., "max_total_tokens": ..., "examples": [...]}

``num_requests_in`` counts the requests considered (the file's requests, or those a generator drew),
``num_shrunk``/``num_dropped`` those changed, and ``examples`` describes the first three changes as short
strings such as ``"line 3: prompt 9000 -> 7372, output 1000 -> 819 tokens"``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .prefix import full_block_hashes
from .schema import MAX_TOKENS

MAX_EXAMPLES = 3
DROP_DRAW_FACTOR = 64   # with drop_long, built-ins generate at most this many times num_requests


def over_limit(prompt: np.ndarray, output: np.ndarray, max_total_tokens: int | None) -> np.ndarray:
    """Boolean mask of requests with ``prompt + output > max_total_tokens`` (all False without a limit);
    exact for any int64 lengths (Python integers when the int64 sum could overflow)."""
    if max_total_tokens is None:
        return np.zeros(len(prompt), dtype=bool)
    prompt, output = np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64)
    if len(prompt) == 0 or (int(prompt.max()) <= MAX_TOKENS and int(output.max()) <= MAX_TOKENS):
        return (prompt + output) > max_total_tokens
    return np.array([a + b > max_total_tokens for a, b in zip(prompt.tolist(), output.tolist())], dtype=bool)


def shrink_lengths(prompt: np.ndarray, output: np.ndarray, max_total_tokens: int):
    """The Sarathi-Serve shrinking rule on int64 arrays: ``(prompt, output, shrunk_mask)``.

    For each request with ``total = prompt + output > max_total_tokens``: ``x -> max(1, x * max // total)``
    for both lengths, i.e. ``x - ceil((total - max) * x / total)`` in exact integer arithmetic. The results
    are exact for any int64 inputs: when ``total`` or ``x * max`` could leave int64 (lengths or the limit above
    ``MAX_TOKENS``) the over-long requests are computed with Python integers, so nothing wraps around.
    """
    prompt, output = np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64)
    m = int(max_total_tokens)
    small = (m <= MAX_TOKENS and (len(prompt) == 0 or (
        int(prompt.min()) >= 0 and int(output.min()) >= 0
        and int(prompt.max()) <= MAX_TOKENS and int(output.max()) <= MAX_TOKENS)))
    if small:                                          # every product <= 2**62: int64 is exact
        total = prompt + output
        over = total > m
        mm = np.int64(m)
        new_prompt = np.where(over, np.maximum(1, prompt * mm // np.maximum(total, 1)), prompt)
        new_output = np.where(over, np.maximum(1, output * mm // np.maximum(total, 1)), output)
        return new_prompt, new_output, over
    p, o = prompt.tolist(), output.tolist()
    over = np.array([a + b > m for a, b in zip(p, o)], dtype=bool)
    new_prompt, new_output = prompt.copy(), output.copy()
    for i in np.flatnonzero(over):
        total = p[i] + o[i]
        new_prompt[i] = max(1, p[i] * m // total)
        new_output[i] = max(1, o[i] * m // total)
    return new_prompt, new_output, over


def describe_shrink(where: str, prompt: int, output: int, new_prompt: int, new_output: int) -> str:
    return f"{where}: prompt {prompt} -> {new_prompt}, output {output} -> {new_output} tokens"


def describe_drop(where: str, prompt: int, output: int, max_total_tokens: int) -> str:
    return f"{where}: dropped (prompt {prompt} + output {output} = {prompt + output} > {max_total_tokens} tokens)"


def drop_examples(labels: Sequence[str], prompt: np.ndarray, output: np.ndarray, dropped: np.ndarray,
                  max_total_tokens: int) -> list[str]:
    """``describe_drop`` strings for the first ``MAX_EXAMPLES`` dropped requests (mask ``dropped``)."""
    return [describe_drop(labels[i], int(prompt[i]), int(output[i]), max_total_tokens)
            for i in np.flatnonzero(dropped)[:MAX_EXAMPLES]]


def shrink_requests(prompt: np.ndarray, output: np.ndarray, hashes: list | None, hash_block_tokens: int | None,
                    max_total_tokens: int | None, labels: Sequence[str]):
    """Shrink the over-long requests (if a limit is given) and cut their hashes.

    Args:
        prompt, output: int64 arrays of shape ``(n,)``, tokens.
        hashes: None, or a list of ``n`` tuples of ints (block hashes, ``hash_block_tokens`` tokens each).
        labels: ``n`` short names of the requests for the examples (e.g. ``"line 7"``).

    Returns:
        ``(prompt, output, hashes, num_shrunk, examples)``; the inputs are not modified.
    """
    if max_total_tokens is None:
        return prompt, output, hashes, 0, []
    new_prompt, new_output, over = shrink_lengths(prompt, output, max_total_tokens)
    changed = np.flatnonzero(over)
    if hashes is not None and len(changed):
        hashes = list(hashes)
        for i in changed:
            hashes[i] = full_block_hashes(hashes[i], hash_block_tokens, new_prompt[i])
    examples = [describe_shrink(labels[i], int(prompt[i]), int(output[i]), int(new_prompt[i]), int(new_output[i]))
                for i in changed[:MAX_EXAMPLES]]
    return new_prompt, new_output, hashes, len(changed), examples


def changes_record(num_requests_in: int, num_shrunk: int, num_dropped: int, max_total_tokens: int | None,
                   examples: list[str]) -> dict:
    """The ``df.attrs["workload_changes"]`` dict (plain ints, None or strings; see the module docstring)."""
    return {"num_requests_in": int(num_requests_in), "num_shrunk": int(num_shrunk),
            "num_dropped": int(num_dropped),
            "max_total_tokens": None if max_total_tokens is None else int(max_total_tokens),
            "examples": list(examples[:MAX_EXAMPLES])}
