"""The batch plan: what one iteration of a replica computes. Every layer speaks it.

For each scheduled request: ``(request_id, num_new_tokens, context_len)``, where ``context_len`` is the number of
tokens already in that request's KV cache before this iteration. A decode computes 1 new token; a prefill chunk
computes ``num_new_tokens >= 1`` prompt tokens. As in vLLM v1 there is no separate prefill or decode *phase* —
only tokens per request per iteration — but the plan keeps decodes first so that cost models can price the two
attention kernels apart (``num_decodes`` leading entries are decodes, the rest prefill chunks).

Schedulers produce it, cost models price it (``cost_models.base.CostModel``), the validator executes it and the
metrics read it. It is immutable and holds plain tuples so that building one per iteration is cheap. It lives in
``cost_models`` — the package every other one imports — so that cost models and the profiler use it without
importing the simulator's engine. A plan carries everything needed to apply it: the engine looks each request up
by ``request_id``; no list aligned with the plan is kept anywhere else.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """One iteration. Tuples are aligned; entries ``[:num_decodes]`` are decodes (1 new token each).

    Attributes:
        request_ids: ids of the scheduled requests.
        num_new_tokens: tokens computed for each request in this iteration (tokens).
        context_lens: tokens already in each request's KV cache before this iteration (tokens).
        num_decodes: how many leading entries are decodes.
        preempted_ids: requests preempted (KV freed, to be recomputed) while building this plan.
    """

    request_ids: tuple[int, ...] = ()
    num_new_tokens: tuple[int, ...] = ()
    context_lens: tuple[int, ...] = ()
    num_decodes: int = 0
    preempted_ids: tuple[int, ...] = ()

    def __post_init__(self):
        n = len(self.request_ids)
        if len(self.num_new_tokens) != n or len(self.context_lens) != n:
            raise ValueError("BatchPlan: request_ids, num_new_tokens and context_lens must have equal length")
        if not 0 <= self.num_decodes <= n:
            raise ValueError("BatchPlan: num_decodes out of range")

    @classmethod
    def from_entries(cls, entries, num_decodes: int | None = None) -> "BatchPlan":
        """Build from ``[(request_id, num_new_tokens, context_len), ...]``; decodes must come first.

        If ``num_decodes`` is omitted, the leading entries with ``num_new_tokens == 1`` count as decodes.
        """
        entries = list(entries)
        if num_decodes is None:
            num_decodes = 0
            while num_decodes < len(entries) and entries[num_decodes][1] == 1:
                num_decodes += 1
        ids, new, ctx = (tuple(col) for col in zip(*entries)) if entries else ((), (), ())
        return cls(ids, new, ctx, num_decodes)

    @classmethod
    def prefill(cls, num_tokens: int, context_len: int = 0, request_id: int = 0) -> "BatchPlan":
        """One prefill chunk of ``num_tokens`` new tokens after ``context_len`` cached ones."""
        return cls((request_id,), (int(num_tokens),), (int(context_len),), 0)

    @classmethod
    def decodes(cls, context_lens) -> "BatchPlan":
        """A decode-only batch: one new token for each of ``context_lens`` (tokens already cached), ids 0..B-1."""
        ctx = tuple(int(k) for k in context_lens)
        return cls(tuple(range(len(ctx))), (1,) * len(ctx), ctx, len(ctx))

    def __len__(self) -> int:
        return len(self.request_ids)

    def __bool__(self) -> bool:
        return bool(self.request_ids)

    def entries(self):
        """Iterate ``(request_id, num_new_tokens, context_len)``."""
        return zip(self.request_ids, self.num_new_tokens, self.context_lens)

    @property
    def batch_size(self) -> int:
        return len(self.request_ids)

    @property
    def num_prefills(self) -> int:
        return len(self.request_ids) - self.num_decodes

    @property
    def prefill_chunks(self) -> list[tuple[int, int]]:
        """``[(num_new_tokens, context_len), ...]`` of the prefill entries."""
        d = self.num_decodes
        return list(zip(self.num_new_tokens[d:], self.context_lens[d:]))

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.num_new_tokens[self.num_decodes:])

    @property
    def num_tokens(self) -> int:
        return self.num_decodes + self.num_prefill_tokens

    @property
    def kind(self) -> str:
        """``"decode"``, ``"prefill"``, ``"mixed"`` or ``"empty"``."""
        if not self.request_ids:
            return "empty"
        if self.num_decodes == len(self.request_ids):
            return "decode"
        return "prefill" if self.num_decodes == 0 else "mixed"
