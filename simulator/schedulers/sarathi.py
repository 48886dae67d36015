"""Sarathi-Serve (Agrawal et al., OSDI'24 §4): chunked prefills with stall-free batching.

Each iteration fills a token budget (``token_budget``, 512 by default), in this order:

1. every running decode, one token each (when a decode needs a KV block and none is free, preempt the
   latest-arrived running request by recompute, as vLLM does; §4.3, Algorithm 2 lines 5-10);
2. the next chunk of each partially-prefilled running request;
3. new requests from the waiting queue, FCFS, while running < ``max_num_seqs`` and blocks for the whole prompt can
   be allocated at admission (above the watermark; with prefix caching the cached prefix is adopted and only the
   rest is prefilled).

Each prefill chunk is ``min(remaining prompt, budget left)``. Ongoing decodes are never paused for a prefill,
so no generation stall happens. Admission also keeps running ≤ ``token_budget`` so all decodes always fit the budget.
Requests in an in-flight micro-batch (pipeline parallelism) are skipped: they are neither scheduled nor preempted.
"""
from __future__ import annotations

from simulator.schedulers.base import Scheduler


class SarathiScheduler(Scheduler):
    name = "sarathi"
    options = {"token_budget": 512}
    supports_prefix_caching = True
    steady_after_prefill = True                     # stateless: decodes follow a finished prefill

    def __init__(self, block_manager, *, max_model_len: int, max_num_seqs: int = 128, token_budget: int = 512):
        super().__init__(block_manager, max_model_len=max_model_len, max_num_seqs=min(max_num_seqs, token_budget))
        self.token_budget = token_budget

    def schedule(self, now_s):
        partial, preempted = [], []
        decodes = self.decode_running(preempted, partial)      # 1. every running decode (preempting if short)
        budget = self.token_budget - len(decodes)
        prefills = []
        for r in partial:                                      # 2. chunks of partially prefilled requests
            if budget <= 0:
                break
            chunk = min(r.remaining_tokens, budget)
            prefills.append((r, chunk))
            budget -= chunk
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:     # 3. new requests
            r = self.waiting[0]
            if not self.admit(r, r.num_tokens, hit=self.prefix_hit(r)):
                break
            chunk = min(r.remaining_tokens, budget)
            prefills.append((r, chunk))
            budget -= chunk
        return self.make_plan(decodes, prefills, now_s, preempted)

    def steady_prefill_budget(self, plan):
        """With one partial prefill, each step is every decode plus the chunk ``min(remaining, token_budget -
        decodes)`` (its prompt's blocks were allocated at admission); a waiting request is considered only with
        budget left over (step 3)."""
        return self.token_budget

    def admission_rule(self):
        """Steps 1-3 above: whole prompts allocated at admission, kept in arrival order."""
        return {"budget": self.token_budget, "reserve_tokens": None, "blocks_per_chunk": False, "full_must_fit": True,
                "insort": True, "reserve_when_idle": True, "in_running_order": False}
