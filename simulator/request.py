"""A request and its progress through a replica.

The model of progress, stated once (vLLM v1's, ``vllm/v1/core/sched/scheduler.py`` ``schedule``): there is no
prefill or decode *phase*; each request has ``num_tokens`` known tokens (prompt + outputs generated so far) and
``num_computed_tokens`` tokens in the KV cache, and every iteration lets the latter catch up with the former under a
token budget. A fresh request prefills its whole prompt (possibly in chunks; a prefix-cache hit starts it at its
cached length), and the micro-batch that computes its last known token emits one output token; then it decodes
one token per iteration (``context_len = num_tokens - 1``). A request preempted by recompute drops its KV cache
(``num_computed_tokens = 0``) and later re-prefills prompt + outputs so far (vLLM's RECOMPUTE preemption, Kwon et
al., SOSP'23 §4.5), emitting its next token at the end of that prefill. The last output token is never fed back, so
a request's KV cache peaks at ``prompt_tokens + output_tokens - 1`` tokens.

``num_computed_tokens`` is advanced **when the request is scheduled** (``schedule``, as vLLM v1's
``_update_after_schedule``), and the request is then *in flight* until its micro-batch leaves the last pipeline
stage (``complete``); schedulers never schedule an in-flight request again (Sarathi-Serve's and Vidur's rule for
pipeline parallelism), so a request is in at most one micro-batch at a time.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class Request:
    """One request. Times in seconds of simulated time; lengths in tokens.

    ``block_hashes``: prefix-cache keys of the prompt's full KV blocks at the simulator's block size (empty
    without prefix caching; ``traces.prefix.block_hashes_for``). ``prefill_only``: this replica hands the request
    on after its first token (the prefill pool of a disaggregated cluster). ``token_times_s``: when each output
    token was emitted, an ``array.array("d")`` (a sequence of float64 seconds, 8 bytes a token: a long run copies
    a fast-forwarded stretch's step ends into it and reads it back as numpy without unboxing a Python float per
    token); compare it with a list as ``list(r.token_times_s)``.
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple = ()
    num_computed_tokens: int = 0
    num_generated: int = 0
    in_flight: bool = False
    prefill_only: bool = False
    scheduled_s: float | None = None      # first time any of its tokens was scheduled
    first_token_s: float | None = None
    completion_s: float | None = None
    token_times_s: array = field(default_factory=lambda: array("d"))
    num_preemptions: int = 0
    num_cached_tokens: int = 0            # prompt tokens served by the prefix cache at first admission
    rejected: str | None = None           # why it can never run, if so
    replica_id: int | None = None
    decode_replica_id: int | None = None
    kv_transfer_s: float | None = None
    decode_scheduled_s: float | None = None   # first scheduled on its decode replica (disaggregated)

    @property
    def num_tokens(self) -> int:
        """Tokens known so far: prompt + generated outputs."""
        return self.prompt_tokens + self.num_generated

    @property
    def remaining_tokens(self) -> int:
        """Tokens still to compute before the next output token is emitted."""
        return self.prompt_tokens + self.num_generated - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """True once the prompt (and any recomputed outputs) is in the KV cache: next step is a 1-token decode."""
        return self.num_generated > 0 and self.num_computed_tokens == self.prompt_tokens + self.num_generated - 1

    @property
    def is_finished(self) -> bool:
        return self.num_generated >= self.output_tokens

    @property
    def is_done_here(self) -> bool:
        """Finished, or (``prefill_only``) ready to hand on after its first token."""
        return self.num_generated >= self.output_tokens or (self.prefill_only and self.num_generated >= 1)

    @property
    def max_kv_tokens(self) -> int:
        """KV-cache tokens this request holds at its peak: prompt + output - 1 (prompt alone if prefill-only)."""
        return self.prompt_tokens if self.prefill_only else self.prompt_tokens + self.output_tokens - 1

    def schedule(self, num_new_tokens: int, now_s: float) -> None:
        """Account ``num_new_tokens`` scheduled at ``now_s``: advance ``num_computed_tokens``, mark in flight."""
        if self.scheduled_s is None:
            self.scheduled_s = now_s
        elif self.decode_replica_id is not None and self.decode_scheduled_s is None:
            self.decode_scheduled_s = now_s
        self.num_computed_tokens += num_new_tokens
        self.in_flight = True

    def complete(self, now_s: float) -> bool:
        """Its micro-batch ended at ``now_s``; return True if that emitted an output token."""
        self.in_flight = False
        if self.num_computed_tokens < self.prompt_tokens + self.num_generated:
            return False
        self.num_generated += 1
        self.token_times_s.append(now_s)
        if self.first_token_s is None:
            self.first_token_s = now_s
        if self.num_generated >= self.output_tokens:
            self.completion_s = now_s
        return True

    def preempt(self) -> None:
        """Drop the KV cache (recompute preemption); the request re-prefills prompt + outputs so far."""
        self.num_computed_tokens = 0
        self.num_preemptions += 1

    def fresh_copy(self) -> "Request":
        """The request as it arrived: same id, arrival, lengths and hashes; no progress."""
        return Request(self.request_id, self.arrival_s, self.prompt_tokens, self.output_tokens, self.block_hashes)


def requests_from_columns(ids, arrivals, prompts, outputs, block_hashes=None) -> list[Request]:
    """Fresh Requests from aligned sequences: ids, arrival times (seconds), prompt and output lengths (tokens) and,
    if given, each request's prompt-block prefix-cache keys."""
    rows = zip(ids, arrivals, prompts, outputs)
    if block_hashes is None:
        return [Request(int(i), float(a), int(p), int(o)) for i, a, p, o in rows]
    return [Request(int(i), float(a), int(p), int(o), h) for (i, a, p, o), h in zip(rows, block_hashes)]


class RequestStream:
    """The requests of a trace, made from its columns when they are needed: in order by iterating (``chunk`` at a
    time), or a range of positions with ``make`` — so that a run holds Request objects only for the requests it is
    serving, not for those still to arrive or waiting in a long queue (``Cluster``). Made twice, a request is two
    equal fresh objects.

    Args:
        arrival_s: (N,) float64 numpy array, seconds, sorted; the request at position i has id i.
        prompt_tokens, output_tokens: (N,) integer numpy arrays.
        block_hashes: N tuples of prefix-cache keys of the prompt's full KV blocks, or None.
        chunk: requests made at once while iterating.
    """

    def __init__(self, arrival_s, prompt_tokens, output_tokens, block_hashes=None, *, chunk: int = 4096):
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.block_hashes = block_hashes
        self.chunk = max(int(chunk), 1)

    def __len__(self) -> int:
        return len(self.arrival_s)

    def make(self, lo: int, hi: int) -> list[Request]:
        """Fresh Requests for positions ``lo`` to ``hi - 1`` (fewer past the end)."""
        return requests_from_columns(range(lo, min(hi, len(self))), self.arrival_s[lo:hi].tolist(),
                                     self.prompt_tokens[lo:hi].tolist(), self.output_tokens[lo:hi].tolist(),
                                     None if self.block_hashes is None else self.block_hashes[lo:hi])

    def __iter__(self):
        for lo in range(0, len(self), self.chunk):
            yield from self.make(lo, lo + self.chunk)
