"""Sarathi-Serve's "chunked-prefills-only" ablation (Agrawal et al., OSDI'24 §5.4, Table 4): chunked prefills
without hybrid batching, as ``SimpleChunkingScheduler`` in microsoft/sarathi-serve
(``sarathi/core/scheduler/simple_chunking_scheduler.py``).

Iterations are prefill-only or decode-only and take turns:

- On a *prefill turn*, chunks of the partially-prefilled running requests, then of newly admitted waiting requests
  (FCFS, blocks for the whole prompt above the watermark, running < ``max_num_seqs``), fill up to ``chunk_size``
  tokens. If any chunk was scheduled, the next turn is a decode turn; if there was nothing to prefill, the
  iteration decodes instead.
- On a *decode turn*, every running request that finished its prefill decodes one token (preempting the
  latest-arrived running request by recompute when a block is needed and none is free); the next turn is a
  prefill turn.

Compared with Sarathi-Serve, decodes are not piggybacked onto prefill chunks, so a decode waits one prefill
iteration whenever prompts are pending. Requests in an in-flight micro-batch are skipped.
"""
from __future__ import annotations

from simulator.schedulers.base import Scheduler


class SimpleChunkingScheduler(Scheduler):
    name = "simple-chunking"
    options = {"token_budget": 512}              # the artifact's chunk_size
    steady_with_waiting = False                  # a prefill turn may admit a waiting request after a decode turn

    def __init__(self, block_manager, *, max_model_len: int, max_num_seqs: int = 128, token_budget: int = 512):
        super().__init__(block_manager, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
        self.chunk_size = token_budget
        self.prefill_turn = True

    def _prefills(self) -> list:
        budget, prefills = self.chunk_size, []
        for r in self.running:
            if budget <= 0:
                break
            if not r.in_flight and not r.is_decoding:
                chunk = min(r.remaining_tokens, budget)
                prefills.append((r, chunk))
                budget -= chunk
        if prefills:
            return prefills
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if r.is_decoding:        # KV already present (disaggregated decode pool): admit, decode next turn
                if not self.admit(r, r.num_tokens):
                    break
                continue
            if not self.admit(r, r.num_tokens):
                break
            chunk = min(r.remaining_tokens, budget)
            prefills.append((r, chunk))
            budget -= chunk
        return prefills

    def schedule(self, now_s):
        if self.prefill_turn:
            prefills = self._prefills()
            if prefills:
                self.prefill_turn = False
                return self.make_plan([], prefills, now_s)
        preempted = []
        decodes = self.decode_running(preempted)
        self.prefill_turn = True
        if not decodes and not preempted:         # nothing to decode: the artifact's engine idles one empty step,
            prefills = self._prefills()            # then takes the prefill turn; take it at once
            if prefills:
                self.prefill_turn = False
                return self.make_plan([], prefills, now_s)
        return self.make_plan(decodes, [], now_s, preempted)
