"""vLLM v0 (Kwon et al., SOSP'23), as the baseline of Sarathi-Serve (Agrawal et al., OSDI'24 §2.3, §5):
prefill-prioritizing iteration-level batching; each iteration is either prefill-only or decode-only.

1. Walk the waiting queue head-of-line and admit while the request's blocks fit above the watermark,
   Σ tokens to prefill ≤ ``max_num_batched_tokens`` and running < ``max_num_seqs``; stop at the first that fails.
2. If anything was admitted, run a prefill-only iteration of those full prompts (a request preempted earlier
   re-prefills its prompt and the outputs it had generated).
3. Otherwise run a decode-only iteration of every running request. When a decode needs a new block and none is
   free, preempt the latest-arrived running request by recompute (free its blocks, put it at the front of the
   waiting queue); if that is the request itself, it waits.

A waiting request whose KV cache is already present (the decode pool of a disaggregated cluster) is admitted
without a prefill and joins the next decode iteration. Requests in an in-flight micro-batch are skipped.
This is the scheduler the Sarathi-Serve paper measured; ``vllm`` is today's v1 engine.
"""
from __future__ import annotations

from simulator.schedulers.base import Scheduler


class VLLMv0Scheduler(Scheduler):
    name = "vllm-v0"
    options = {"max_num_batched_tokens": None}      # None: max_model_len (vLLM v0 without chunked prefill)
    steady_after_prefill = True                     # stateless: decodes follow a finished prefill

    @classmethod
    def configure(cls, config, *, max_model_len: int, device) -> dict:
        kw = super().configure(config, max_model_len=max_model_len, device=device)
        kw["max_num_batched_tokens"] = kw["max_num_batched_tokens"] or max_model_len
        if kw["max_num_batched_tokens"] < max_model_len:
            # vLLM v0 without chunked prefill refuses this too (SchedulerConfig._verify_args): a prompt longer than
            # the per-iteration token limit could never be prefilled.
            raise ValueError(f"max_num_batched_tokens: {kw['max_num_batched_tokens']} is below max_model_len "
                             f"{max_model_len}; vLLM v0 cannot prefill longer prompts (lower --max-model-len)")
        return kw

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
            n = 0 if r.is_decoding else r.remaining_tokens
            if batched + n > self.max_num_batched_tokens or len(self.running) >= self.max_num_seqs:
                break
            if not self.admit(r, r.num_tokens):
                break
            if n:
                prefills.append((r, n))
                batched += n
        if prefills:
            return self.make_plan([], prefills, now_s)

        preempted = []
        decodes = self.decode_running(preempted)
        return self.make_plan(decodes, [], now_s, preempted)
