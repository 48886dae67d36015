"""vLLM v1's scheduler, as in vLLM 0.32.0 (``vllm/v1/core/sched/scheduler.py`` ``Scheduler.schedule``,
``vllm/v1/core/kv_cache_manager.py`` ``allocate_slots``, ``vllm/config/scheduler.py``): what people run today.

No prefill or decode phase: each step gives tokens to requests under one token budget
(``max_num_batched_tokens``) so that their computed tokens catch up with their known tokens
(``scheduler.py`` "NOTE(woosuk) on the scheduling algorithm"). Chunked prefill is on.

1. RUNNING requests first, in the order they were admitted (``self.running``): each gets
   ``min(remaining tokens, budget left, max_model_len - computed - 1)`` tokens — a decode one, a partial prefill
   its next chunk. Its slots are allocated (``allocate_slots``, no watermark for running requests); when that fails,
   the last running request is preempted by recompute (``self.running.pop()``, FCFS policy), until the
   allocation fits or the request preempted itself, in which case no further running request is scheduled this
   step (``if new_blocks is None: break``).
2. WAITING requests, FCFS, only if nothing was preempted this step (``if not preempted_reqs``), while the budget
   lasts and fewer than ``max_num_seqs`` run: a fresh request looks up its cached prefix (prefix caching), then gets
   ``min(num_tokens - computed, budget left)`` tokens; it is admitted only if the KV cache can hold its *whole*
   prompt (``scheduler_reserve_full_isl=True``: ``full_sequence_must_fit``) plus the watermark (applied to
   waiting requests when any request is running; ``watermark=0.0`` by default), and the first chunk's slots are
   allocated. The first request that does not fit stops admission (head-of-line). An admitted request is
   appended to ``running``; a preempted one re-enters at the front of ``waiting`` with nothing computed.

Differences, stated: with pipeline parallelism vLLM may schedule the next prefill chunk of a request whose previous
chunk is still in flight; servesim never schedules an in-flight request (Sarathi-Serve's and Vidur's rule) nor
preempts one. ``long_prefill_token_threshold`` (default 0, off), speculative decoding, encoder inputs, LoRA,
KV connectors and async scheduling are not modelled.

Defaults (``vllm/engine/arg_utils.py`` ``get_batch_defaults``, ``vllm serve``): ``max_num_batched_tokens`` 2048 and
``max_num_seqs`` 256 on A100 and GPUs under 70 GiB, 8192 and 1024 on H100/H200-class GPUs (>= 70 GiB, not A100),
16384 and 1024 at >= 160 GiB; ``default_limits(device)`` returns them.
"""
from __future__ import annotations

from simulator.schedulers.base import Scheduler

GIB = 2**30


def default_limits(device) -> tuple[int, int]:
    """``(max_num_batched_tokens, max_num_seqs)`` of ``vllm serve`` 0.32 on ``device`` (a DeviceSpec)."""
    memory, name = device.memory_bytes, device.name.lower()
    if memory >= 160 * GIB:
        return 16384, 1024
    if memory >= 70 * GIB and "a100" not in name:
        return 8192, 1024
    return 2048, 256


class VLLMScheduler(Scheduler):
    name = "vllm"
    options = {"max_num_batched_tokens": None, "scheduler_reserve_full_isl": True}   # None: default_limits
    supports_prefix_caching = True
    steady_after_prefill = True                     # stateless: decodes follow a finished prefill
    default_max_num_seqs = None                     # default_limits(device)

    default_watermark = 0.0                         # vllm/config/scheduler.py: watermark = 0.0

    @classmethod
    def configure(cls, config, *, max_model_len: int, device) -> dict:
        tokens, seqs = default_limits(device)
        kw = super().configure(config, max_model_len=max_model_len, device=device)
        kw["max_num_batched_tokens"] = config.max_num_batched_tokens or tokens
        kw["max_num_seqs"] = config.max_num_seqs or seqs
        return kw

    def __init__(self, block_manager, *, max_model_len: int, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, scheduler_reserve_full_isl: bool = True):
        super().__init__(block_manager, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.scheduler_reserve_full_isl = scheduler_reserve_full_isl

    def _victim(self, exclude_before: int):
        """The last running request that is not in flight (index >= ``exclude_before``), or None."""
        for i in range(len(self.running) - 1, exclude_before - 1, -1):
            if not self.running[i].in_flight:
                return self.running[i]
        return None

    def schedule(self, now_s):
        budget = self.max_num_batched_tokens
        decodes, scheduled, preempted = [], [], []
        kv = self.kv
        running, capacity, max_len = self.running, kv.capacity, self.max_model_len

        # 1. running requests, in admission order
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            c, g = r.num_computed_tokens, r.num_generated
            n = r.prompt_tokens + g - c                     # min(remaining tokens, budget, max_model_len - c - 1)
            if n > budget:
                n = budget
            if n > max_len - c - 1:
                n = max_len - c - 1
            if r.in_flight or n <= 0:
                i += 1
                continue
            if c + n > capacity.get(r.request_id, 0):       # needs blocks
                fits = True
                while not kv.allocate(r, c + n):
                    victim = self._victim(i)
                    if victim is None:
                        fits = False
                        break
                    self.preempt(victim)
                    preempted.append(victim)
                    if victim is r:
                        fits = False
                        break
                if not fits:
                    break
            if n == 1 and g > 0 and c == r.prompt_tokens + g - 1:     # a decode (Request.is_decoding)
                decodes.append(r)
            else:
                scheduled.append((r, n))
            budget -= n
            i += 1

        # 2. waiting requests, FCFS, only when nothing was preempted
        if not preempted:
            while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
                r = self.waiting[0]
                cached, hit = self.prefix_hit(r)
                computed = r.num_computed_tokens or cached
                n = min(r.num_tokens - computed, budget)
                reserve = kv.watermark_blocks if self.running else 0
                if self.scheduler_reserve_full_isl and \
                        kv.need(r, min(r.num_tokens, self.max_model_len), hit) > kv.num_free - reserve:
                    break
                if not kv.allocate(r, computed + n, reserve_blocks=reserve, hit=hit):
                    break
                self.adopt_hit(r, cached)
                self.waiting.popleft()
                self.running.append(r)
                scheduled.append((r, n))
                budget -= n
        return self.make_plan(decodes, scheduled, now_s, preempted)

    def steady_prefill_budget(self, plan):
        """With the partial prefill last in ``running``, each step serves the decodes before
        it, then gives it ``min(remaining, max_num_batched_tokens - decodes)`` tokens (the ``max_model_len - 1``
        cap never binds a prompt: an admitted request has prompt + output <= max_model_len) and allocates its
        slots; None otherwise."""
        if not self.running or self.running[-1].request_id != plan.request_ids[-1]:
            return None
        if len(self.running) > self.max_num_batched_tokens:      # the decodes alone could exhaust the budget
            return None
        return self.max_num_batched_tokens

    def admission_rule(self):
        """Budget in running order (the partial prefill is last), slots allocated chunk by chunk, admitted only if
        the whole prompt fits (``scheduler_reserve_full_isl``), appended to ``running``, the watermark applied only
        while requests run."""
        return {"budget": self.max_num_batched_tokens, "reserve_tokens": None, "blocks_per_chunk": True,
                "full_must_fit": self.scheduler_reserve_full_isl, "insort": False, "reserve_when_idle": False,
                "in_running_order": True}
