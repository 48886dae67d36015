"""What every scheduling policy shares: FCFS queues, the KV block manager, rejection and iteration bookkeeping.

A policy subclasses ``Scheduler`` and writes one method, ``schedule(now_s) -> BatchPlan``, reading like its paper's
algorithm. ``finish(plan, now_s)`` then advances every scheduled request (``Request.advance``) and frees the
blocks of finished ones. Time is always passed in; nothing here reads a clock or holds module-level state.
"""
from __future__ import annotations

import bisect
from collections import deque

from simulator.kv_cache import BlockManager
from simulator.plan import BatchPlan
from simulator.request import Request


def _arrival_key(r: Request):
    return (r.arrival_s, r.request_id)


class Scheduler:
    """FCFS queues over one replica's KV cache.

    Args:
        block_manager: the replica's KV cache.
        max_model_len: longest request (prompt + output tokens) the model serves; longer ones are rejected.
        max_num_seqs: most requests running (holding KV blocks) at once.
        reserve_tokens: if set, every admitted request reserves blocks for this many tokens up front (Orca's and
            FasterTransformer's worst-case reservation) instead of growing on demand.
    """

    name = "base"

    def __init__(self, block_manager: BlockManager, *, max_model_len: int, max_num_seqs: int = 128,
                 reserve_tokens: int | None = None):
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.reserve_tokens = reserve_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # kept in FCFS (arrival) order
        self.rejected: list[Request] = []
        self.num_preemptions = 0
        self._scheduled: list[Request] = []       # requests of the last plan, aligned with it
        if reserve_tokens is not None:
            usable = block_manager.num_blocks - block_manager.watermark_blocks
            if block_manager.blocks_for(reserve_tokens) > usable:
                raise ValueError(f"{self.name}: reserving {reserve_tokens} tokens per request needs "
                                 f"{block_manager.blocks_for(reserve_tokens)} KV blocks but the cache has {usable}; "
                                 f"lower max_model_len")

    # --- arrivals -------------------------------------------------------------------------------------------
    def rejection_reason(self, r: Request) -> str | None:
        """Why ``r`` can never be served by this replica, or None. Policies may add their own limits."""
        if r.prompt_tokens + r.output_tokens > self.max_model_len:
            return f"prompt + output = {r.prompt_tokens + r.output_tokens} tokens > max_model_len {self.max_model_len}"
        usable = self.bm.num_blocks - self.bm.watermark_blocks
        if self.bm.blocks_for(r.max_kv_tokens) > usable:
            return f"needs {self.bm.blocks_for(r.max_kv_tokens)} KV blocks at its peak, the cache has {usable}"
        return None

    def add_request(self, r: Request) -> bool:
        """Queue ``r`` (FCFS); return False and record it in ``rejected`` if it can never be served."""
        reason = self.rejection_reason(r)
        if reason is not None:
            r.rejected = reason
            self.rejected.append(r)
            return False
        self.waiting.append(r)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- helpers for policies -------------------------------------------------------------------------------
    def admit(self, r: Request, tokens: int) -> None:
        """Move the waiting head ``r`` to running with blocks for ``tokens`` (or the worst-case reservation)."""
        self.bm.allocate(r.request_id, self.reserve_tokens or tokens)
        self.waiting.popleft()
        bisect.insort(self.running, r, key=_arrival_key)

    def can_admit(self, tokens: int) -> bool:
        return self.bm.can_allocate(self.reserve_tokens or tokens)

    def preempt(self, r: Request) -> None:
        """Recompute preemption: free ``r``'s blocks and put it at the front of the waiting queue."""
        self.running.remove(r)
        self.bm.free(r.request_id)
        r.preempt()
        self.waiting.appendleft(r)
        self.num_preemptions += 1

    def make_plan(self, decodes: list[Request], prefills: list[tuple[Request, int]], now_s: float,
                  preempted: list[Request] = ()) -> BatchPlan:
        """Build the plan (decodes first) and remember its requests for ``finish``."""
        scheduled = decodes + [r for r, _ in prefills]
        for r in scheduled:
            if r.scheduled_s is None:
                r.scheduled_s = now_s
        self._scheduled = scheduled
        return BatchPlan(
            tuple(r.request_id for r in scheduled),
            (1,) * len(decodes) + tuple(n for _, n in prefills),
            tuple(r.num_computed_tokens for r in scheduled),
            len(decodes),
            tuple(r.request_id for r in preempted),
        )

    # --- policy ---------------------------------------------------------------------------------------------
    def schedule(self, now_s: float) -> BatchPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, plan: BatchPlan, now_s: float) -> list[Request]:
        """Apply an iteration that ended at ``now_s``; return the requests it finished."""
        done = []
        for r, n in zip(self._scheduled, plan.num_new_tokens):
            if r.advance(n, now_s) and r.completion_s is not None:
                self.bm.free(r.request_id)
                done.append(r)
        if done:
            finished = set(id(r) for r in done)
            self.running = [r for r in self.running if id(r) not in finished]
        self._scheduled = []
        return done
