"""vLLM (Kwon et al., SOSP'23), as the baseline of Sarathi-Serve (Agrawal et al., OSDI'24 §2.3, §5).

Prefill-prioritizing iteration-level batching: each iteration is either prefill-only or decode-only.

1. Walk the waiting queue head-of-line and admit while the request's blocks fit above the watermark,
   Σ tokens to prefill ≤ ``max_num_batched_tokens`` and running < ``max_num_seqs``; stop at the first that fails.
2. If anything was admitted, run a prefill-only iteration of those full prompts (a request preempted earlier
   re-prefills its prompt and the outputs it had generated).
3. Otherwise run a decode-only iteration of every running request. When a decode needs a new block and none is
   free, preempt the latest-arrived running request by recompute (free its blocks, put it at the front of the
   waiting queue); if that is the request itself, it waits.
"""
from __future__ import annotations

from simulator.schedulers.base import Scheduler


class VLLMScheduler(Scheduler):
    name = "vllm"

    def __init__(self, block_manager, *, max_model_len: int, max_num_seqs: int = 128,
                 max_num_batched_tokens: int | None = None):
        super().__init__(block_manager, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
        self.max_num_batched_tokens = max_num_batched_tokens or max_model_len

    def rejection_reason(self, r):
        # A request preempted late re-prefills up to prompt + output - 1 tokens in one iteration.
        if r.max_kv_tokens > self.max_num_batched_tokens:
            return (f"prompt + output - 1 = {r.max_kv_tokens} tokens > max_num_batched_tokens "
                    f"{self.max_num_batched_tokens}")
        return super().rejection_reason(r)

    def schedule(self, now_s):
        prefills, batched = [], 0
        while self.waiting:
            r = self.waiting[0]
            n = r.remaining_tokens
            if (batched + n > self.max_num_batched_tokens or len(self.running) >= self.max_num_seqs
                    or not self.can_admit(n)):
                break
            self.admit(r, n)
            prefills.append((r, n))
            batched += n
        if prefills:
            return self.make_plan([], prefills, now_s)

        decodes, preempted = [], []
        running = list(self.running)          # FCFS order; the tail is the latest arrival
        while running:
            r = running.pop(0)
            while not self.bm.can_grow(r.request_id, r.num_computed_tokens + 1):
                victim = running.pop() if running else r
                self.preempt(victim)
                preempted.append(victim)
                if victim is r:
                    break
            else:
                self.bm.grow(r.request_id, r.num_computed_tokens + 1)
                decodes.append(r)
        return self.make_plan(decodes, [], now_s, preempted)
