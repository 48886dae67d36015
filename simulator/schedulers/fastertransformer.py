"""FasterTransformer-style request-level batching, the static-batching baseline of Orca (OSDI'22 §2) and
Sarathi-Serve (OSDI'24 §2.3).

While any request is decoding, run decode-only iterations of the running batch. New prompts are admitted only when
nothing runs: then up to ``max_num_seqs`` waiting requests are admitted FCFS, each reserving KV blocks for the
full ``max_model_len`` like Orca, and prefilled together in one iteration. The batch then decodes until its last
request finishes. Never preempts. Requests in an in-flight micro-batch are skipped.
"""
from __future__ import annotations

from simulator.schedulers.base import Scheduler


class FasterTransformerScheduler(Scheduler):
    name = "fastertransformer"
    default_max_num_seqs = 16
    steady_after_prefill = True                     # stateless: decodes follow a finished prefill
    waits_for_completion = True                     # KV reserved up front: only a completion admits

    def __init__(self, block_manager, *, max_model_len: int, max_num_seqs: int = 16):
        super().__init__(block_manager, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                         reserve_tokens=max_model_len)

    def schedule(self, now_s):
        if self.running:
            return self.make_plan([r for r in self.running if not r.in_flight], [], now_s)
        prefills = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if not self.admit(r, r.num_tokens):
                break
            prefills.append((r, r.remaining_tokens))
        return self.make_plan([], prefills, now_s)
