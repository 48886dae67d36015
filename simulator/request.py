"""A request and its progress through a replica.

Progress is counted in tokens, as in vLLM v1: ``num_computed_tokens`` are in the KV cache, ``num_tokens`` are known
(prompt + outputs generated so far). The iteration that computes the last known token emits one output token.
So a fresh request prefills its whole prompt (possibly in chunks) and emits its first output token, then decodes one
token per iteration (``context_len = num_tokens - 1``). A request preempted by recompute drops its KV cache
(``num_computed_tokens = 0``) and later re-prefills prompt + outputs so far (vLLM's RECOMPUTE preemption, Kwon et
al., SOSP'23 §4.5), emitting its next token at the end of that prefill. The last output token is never fed back, so a
request's KV cache peaks at ``prompt_tokens + output_tokens - 1`` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class Request:
    """One request. Times in seconds of simulated time; lengths in tokens."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    num_computed_tokens: int = 0
    num_generated: int = 0
    scheduled_s: float | None = None      # first time any of its tokens was scheduled
    first_token_s: float | None = None
    completion_s: float | None = None
    token_times_s: list = field(default_factory=list)
    num_preemptions: int = 0
    rejected: str | None = None           # why it can never run, if so

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
    def max_kv_tokens(self) -> int:
        """KV-cache tokens this request holds at its peak: prompt + output - 1."""
        return self.prompt_tokens + self.output_tokens - 1

    def advance(self, num_new_tokens: int, now_s: float) -> bool:
        """Account ``num_new_tokens`` computed by an iteration ending at ``now_s``; return True if it emitted a token."""
        self.num_computed_tokens += num_new_tokens
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
