"""The built-in ``random`` workload: fixed-range uniform lengths, as vLLM's benchmark ``random`` dataset.

Source: vLLM 0.32 ``vllm/benchmarks/datasets/utils.py`` ``get_sampling_params`` (used by ``RandomDataset.sample``
in ``vllm/benchmarks/datasets/datasets.py`` line 617), lines 70-98::

    input_low   = floor(input_len * (1 - range_ratio))
    input_high  = ceil(input_len * (1 + range_ratio))
    output_low  = max(1, floor(output_len * (1 - range_ratio)))
    output_high = max(1, ceil(output_len * (1 + range_ratio)))
    input_lens  = rng.integers(input_low, input_high + 1, size=num_requests)
    output_lens = rng.integers(output_low, output_high + 1, size=num_requests)

with ``rng = numpy.random.default_rng(seed)`` (``RandomDataset.__init__``; ``vllm bench serve`` passes
``--seed``) and ``0 <= range_ratio < 1``. So for the same seed the lengths here equal vLLM's, except that vLLM
first subtracts the tokenizer's special tokens (``num_special_tokens_to_add()``, e.g. 1 for a BOS) from
``input_len`` and the server adds them back; here no tokenizer is involved, so ``prompt_tokens`` is the length
the server sees (exactly ``input_len`` when ``range_ratio == 0``). Arrivals come from servesim's own arrival
stream (``traces.synthetic.arrival_times``), not vLLM's.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .schema import MAX_TOKENS, TraceColumns, TraceError
from .synthetic import _check_count, iid_columns

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_INPUT_LEN = 1024     # vLLM RandomDataset.DEFAULT_INPUT_LEN
DEFAULT_OUTPUT_LEN = 128     # vLLM RandomDataset.DEFAULT_OUTPUT_LEN
DEFAULT_RANGE_RATIO = 0.0    # vLLM RandomDataset.DEFAULT_RANGE_RATIO


def length_ranges(input_len: int, output_len: int, range_ratio: float) -> tuple[int, int, int, int]:
    """``(input_low, input_high, output_low, output_high)``, inclusive token ranges, vLLM's rule.

    Raises:
        TraceError: ``input_len``/``output_len`` not an integer >= 1, ``range_ratio`` outside ``[0, 1)``,
            or an input range reaching below 1 token.
    """
    _check_count(input_len, "input_len", minimum=1, maximum=MAX_TOKENS)
    _check_count(output_len, "output_len", minimum=1, maximum=MAX_TOKENS)
    if isinstance(range_ratio, bool) or not isinstance(range_ratio, (int, float, np.number)) \
            or not 0.0 <= range_ratio < 1.0:
        raise TraceError(f"must be a number in [0, 1) (as in vLLM), got {range_ratio!r}", "random",
                         field="range_ratio")
    r = float(range_ratio)
    input_low, input_high = math.floor(input_len * (1 - r)), math.ceil(input_len * (1 + r))
    output_low = max(1, math.floor(output_len * (1 - r)))
    output_high = max(1, math.ceil(output_len * (1 + r)))
    if input_low < 1:
        raise TraceError(f"input_len={input_len} with range_ratio={r} can draw prompts of {input_low} tokens; "
                         "increase input_len or decrease range_ratio", "random", field="input_len")
    return input_low, input_high, output_low, output_high


def random_lengths(num_requests: int, seed: int, *, input_len: int = DEFAULT_INPUT_LEN,
                   output_len: int = DEFAULT_OUTPUT_LEN, range_ratio: float = DEFAULT_RANGE_RATIO):
    """``(prompt_tokens, output_tokens)``, two int64 arrays of shape ``(num_requests,)``, uniform integers in
    the ranges of ``length_ranges``, drawn as vLLM does (``numpy.random.default_rng(seed)``, inputs first)."""
    _check_count(num_requests, "num_requests", minimum=1)
    _check_count(seed, "seed", minimum=0)
    input_low, input_high, output_low, output_high = length_ranges(input_len, output_len, range_ratio)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(input_low, input_high + 1, size=num_requests)
    output = rng.integers(output_low, output_high + 1, size=num_requests)
    return prompt.astype(np.int64), output.astype(np.int64)


def generate_random(num_requests: int, *, qps: float, seed: int, arrival: str = "poisson", cv: float = 1.0,
                    max_total_tokens: int | None = None, drop_long: bool = False,
                    input_len: int = DEFAULT_INPUT_LEN, output_len: int = DEFAULT_OUTPUT_LEN,
                    range_ratio: float = DEFAULT_RANGE_RATIO) -> pd.DataFrame:
    """Generate the ``random`` workload: i.i.d. uniform lengths (vLLM's rule, see the module docstring).

    Args:
        num_requests: number of requests (>= 1).
        qps: mean arrival rate in requests per second (> 0); ``math.inf`` puts every arrival at 0.0.
        seed: non-negative integer; same arguments give a byte-identical DataFrame.
        arrival, cv: the arrival process (``traces.synthetic.arrival_times``).
        max_total_tokens: limit on ``prompt + output``; over-long requests are shrunk, or dropped and redrawn
            with ``drop_long`` (``traces.synthetic.iid_trace``; with drop_long the draw of size ``n`` is a
            fresh vLLM draw, so the kept requests are not those of the shrinking variant).
        input_len: mean prompt length in tokens (vLLM ``--random-input-len``, default 1024).
        output_len: mean output length in tokens (vLLM ``--random-output-len``, default 128).
        range_ratio: half-width of the uniform ranges relative to the means, in ``[0, 1)``
            (vLLM ``--random-range-ratio``, default 0: every request is exactly input_len / output_len).

    Returns:
        A trace DataFrame (``traces.schema``) with ``attrs["workload_changes"]``.

    Raises:
        TraceError: invalid lengths, range ratio, arrival options or seed.
    """
    return generate_random_columns(num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                                   max_total_tokens=max_total_tokens, drop_long=drop_long, input_len=input_len,
                                   output_len=output_len, range_ratio=range_ratio).frame()


def generate_random_columns(num_requests: int, *, qps: float, seed: int, arrival: str = "poisson",
                            cv: float = 1.0, max_total_tokens: int | None = None, drop_long: bool = False,
                            input_len: int = DEFAULT_INPUT_LEN, output_len: int = DEFAULT_OUTPUT_LEN,
                            range_ratio: float = DEFAULT_RANGE_RATIO) -> TraceColumns:
    """``generate_random`` as ``TraceColumns`` (same arguments, same trace, no pandas)."""
    length_ranges(input_len, output_len, range_ratio)            # validate before anything is drawn

    def draw(n: int):
        return random_lengths(n, seed, input_len=input_len, output_len=output_len, range_ratio=range_ratio)

    return iid_columns(draw, num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                       max_total_tokens=max_total_tokens, drop_long=drop_long, source="random")
