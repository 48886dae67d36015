"""Orca (Yu et al., OSDI'22), as configured in Sarathi-Serve's evaluation (OSDI'24 §5).

Iteration-level scheduling with mixed batches of full prompts and decodes:

1. Every running request decodes one token.
2. New requests are admitted FCFS with their full prompt while running < ``max_num_seqs`` and KV blocks for the
   full ``max_model_len`` can be reserved for each (worst-case reservation).

Because memory is reserved up front, Orca never preempts. Requests in an in-flight micro-batch are skipped.
"""
from __future__ import annotations

from simulator.schedulers.base import Scheduler


class OrcaScheduler(Scheduler):
    name = "orca"
    default_max_num_seqs = 16
    steady_after_prefill = True                     # stateless: decodes follow a finished prefill
    waits_for_completion = True                     # KV reserved up front: only a completion admits

    def __init__(self, block_manager, *, max_model_len: int, max_num_seqs: int = 16):
        super().__init__(block_manager, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                         reserve_tokens=max_model_len)

    def schedule(self, now_s):
        decodes = [r for r in self.running if not r.in_flight]
        prefills = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if not self.admit(r, r.num_tokens):
                break
            prefills.append((r, r.remaining_tokens))
        return self.make_plan(decodes, prefills, now_s)

    def admission_rule(self):
        """No token budget; each admission reserves ``max_model_len`` tokens; full prompts (one step each)."""
        return {"budget": None, "reserve_tokens": self.reserve_tokens, "blocks_per_chunk": False,
                "full_must_fit": True, "insort": True, "reserve_when_idle": True, "in_running_order": False}
