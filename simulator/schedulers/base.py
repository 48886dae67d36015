"""What every scheduling policy shares: requests held by id, FCFS queues, the KV block manager, rejection, and
applying a finished micro-batch.

A policy subclasses ``Scheduler``, declares its options (``options``: name -> default; the CLI and config take
them from here) and writes one method, ``schedule(now_s) -> BatchPlan``, reading like its paper's algorithm. It
builds the plan with ``make_plan``, which advances every scheduled request (``Request.schedule``: progress is
counted when scheduled, as vLLM v1's ``_update_after_schedule``) and marks it in flight. ``update(plan, now_s)``
applies the micro-batch once it leaves the last pipeline stage: each request in the plan is looked up by id, emits
its token if the micro-batch computed its last known token, and is freed when done. No list aligned with a plan is
kept. A policy must never schedule an in-flight request (``Request.in_flight``) — with pipeline parallelism a
request is in at most one micro-batch at a time — nor preempt one.

What a policy does NOT do: schedule events, read a clock or record metrics (the replica does); time is passed in.
"""
from __future__ import annotations

import bisect
from collections import deque

from cost_models.plan import BatchPlan
from simulator.kv_cache import BlockManager
from simulator.request import Request


def arrival_key(r: Request):
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
    #: option name -> default; ``None`` means "derived" (documented by the policy). The factory passes these.
    options: dict = {}
    #: whether the policy implements prefix caching (``--enable-prefix-caching``)
    supports_prefix_caching = False
    #: default ``max_num_seqs`` (the batch-size cap) of the policy
    default_max_num_seqs = 128
    #: a prefill replica of a disaggregated cluster keeps a handed-off request's blocks until its KV is sent
    hold_kv_after_prefill = False
    #: while requests wait but cannot be admitted, the policy keeps decoding every running request until a
    #: completion frees KV blocks or a slot (False: it may admit on another turn; see ``decode_steady``)
    steady_with_waiting = True

    #: after a step whose prefills all finish (nothing waiting), the policy runs decode-only steps until an arrival
    #: (False for a policy whose state, e.g. a turn, changes step by step; see ``decode_steady``)
    steady_after_prefill = False
    #: while requests wait, nothing is admitted until a completion frees a slot or blocks, whatever the step (a
    #: policy that reserves blocks up front and admits when slots free: after a prefill step, the stretch then
    #: runs until the first completion instead of not at all)
    waits_for_completion = False

    #: admission watermark (fraction of the KV blocks kept free) when the config leaves it unset
    default_watermark = 0.01

    @classmethod
    def configure(cls, config, *, max_model_len: int, device) -> dict:
        """Constructor keywords from a ``SimConfig``: ``max_model_len``, ``max_num_seqs`` and every declared option
        (a None config value takes the policy's default). Policies with derived defaults override this."""
        kw = {"max_model_len": max_model_len, "max_num_seqs": config.max_num_seqs or cls.default_max_num_seqs}
        for key, default in cls.options.items():
            value = getattr(config, key, None)
            kw[key] = default if value is None else value
        return kw

    @classmethod
    def peak_batched_tokens(cls, kw: dict) -> int:
        """Tokens of the largest forward pass the policy runs with these keywords (sizes the activation reserve)."""
        return kw.get("token_budget") or kw.get("max_num_batched_tokens") or kw["max_model_len"]

    def __init__(self, block_manager: BlockManager, *, max_model_len: int, max_num_seqs: int = 128,
                 reserve_tokens: int | None = None):
        self.kv = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.reserve_tokens = reserve_tokens
        self.requests: dict[int, Request] = {}    # every queued, running or preempted request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.rejected: list[Request] = []
        #: ids of requests a fast-forwarded stretch admitted before they arrived (``add_request`` then skips them)
        self.pre_admitted: set[int] = set()
        self.num_preemptions = 0
        if block_manager.prefix_caching and not self.supports_prefix_caching:
            raise ValueError(f"--enable-prefix-caching: scheduler {self.name} does not support prefix caching")
        if reserve_tokens is not None:
            usable = block_manager.num_blocks - block_manager.watermark_blocks
            if block_manager.blocks_for(reserve_tokens) > usable:
                raise ValueError(f"{self.name}: reserving {reserve_tokens} tokens per request needs "
                                 f"{block_manager.blocks_for(reserve_tokens)} KV blocks but the cache has {usable}; "
                                 f"lower max_model_len")

    @property
    def bm(self) -> BlockManager:
        """The KV block manager (old name, kept for readability in tests)."""
        return self.kv

    # --- arrivals -------------------------------------------------------------------------------------------
    def rejection_reason(self, r: Request) -> str | None:
        """Why ``r`` can never be served by this replica, or None. Policies may add their own limits."""
        if r.prompt_tokens + r.output_tokens > self.max_model_len:
            return f"prompt + output = {r.prompt_tokens + r.output_tokens} tokens > max_model_len {self.max_model_len}"
        usable = self.kv.num_blocks - self.kv.watermark_blocks
        if self.kv.blocks_for(r.max_kv_tokens) > usable:
            return f"needs {self.kv.blocks_for(r.max_kv_tokens)} KV blocks at its peak, the cache has {usable}"
        return None

    def add_request(self, r: Request) -> bool:
        """Queue ``r`` (FCFS); return False and record it in ``rejected`` if it can never be served. A request a
        fast-forwarded stretch already admitted (``pre_admitted``) is left as it is."""
        if r.request_id in self.pre_admitted:
            self.pre_admitted.discard(r.request_id)
            return True
        reason = self.rejection_reason(r)
        if reason is not None:
            r.rejected = reason
            self.rejected.append(r)
            return False
        self.requests[r.request_id] = r
        self.waiting.append(r)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_outstanding(self) -> int:
        """Requests queued or running here."""
        return len(self.requests)

    # --- helpers for policies -------------------------------------------------------------------------------
    def prefix_hit(self, r: Request) -> tuple[int, tuple]:
        """``(cached tokens, blocks)`` for a request about to be admitted with nothing computed yet."""
        if r.num_computed_tokens or not self.kv.prefix_caching:
            return 0, ()
        return self.kv.lookup(r)

    def adopt_hit(self, r: Request, cached_tokens: int) -> None:
        """Start an admitted request at its cached length (and count the hit once, at its first admission)."""
        if not self.kv.prefix_caching or r.num_computed_tokens:
            return
        r.num_computed_tokens = cached_tokens
        if r.num_preemptions == 0:
            r.num_cached_tokens = cached_tokens
            self.kv.hit_tokens += cached_tokens
            self.kv.queried_tokens += r.prompt_tokens

    def admit(self, r: Request, tokens: int, *, reserve_blocks: int | None = None, hit=(0, ())) -> bool:
        """Try to move the waiting head ``r`` to running (kept in arrival order) with blocks for ``tokens`` (or the
        worst-case reservation), keeping ``reserve_blocks`` (default: the watermark) free; True on success."""
        reserve = self.kv.watermark_blocks if reserve_blocks is None else reserve_blocks
        if not self.kv.allocate(r, self.reserve_tokens or tokens, reserve_blocks=reserve, hit=hit[1]):
            return False
        self.adopt_hit(r, hit[0])
        self.waiting.popleft()
        bisect.insort(self.running, r, key=arrival_key)
        return True

    def preempt(self, r: Request) -> None:
        """Recompute preemption: free ``r``'s blocks and put it at the front of the waiting queue."""
        assert not r.in_flight, "an in-flight request cannot be preempted"
        self.running.remove(r)
        self.kv.free(r)
        r.preempt()
        self.waiting.appendleft(r)
        self.num_preemptions += 1

    def decode_running(self, preempted: list, partial: list | None = None) -> list[Request]:
        """Every running decode (not in flight), in FCFS order, gets one token; when one needs a KV block and none
        is free, the latest-arrived running request not yet looked at is preempted by recompute — or the request
        itself when none is left, which then waits (vLLM's rule, Kwon et al. SOSP'23 §4.5; Sarathi-Serve §4.3
        Algorithm 2). Returns the decodes; preempted requests are appended to ``preempted``, running requests that
        are not decoding (partial prefills) to ``partial`` (dropped if None)."""
        decodes = []
        running = [r for r in self.running if not r.in_flight]   # FCFS order; the tail is the latest arrival
        allocate = self.kv.allocate
        capacity = self.kv.capacity
        i, end = 0, len(running)                                 # running[i:end] are still to look at
        while i < end:
            r = running[i]
            i += 1
            c, g = r.num_computed_tokens, r.num_generated
            if not (g > 0 and c == r.prompt_tokens + g - 1):    # not decoding (Request.is_decoding)
                if partial is not None:
                    partial.append(r)
                continue
            if c < capacity.get(r.request_id, 0):                # its blocks hold the new token already
                decodes.append(r)
                continue
            while not allocate(r, c + 1):
                if i < end:
                    end -= 1
                    victim = running[end]                        # later in FCFS order than r
                else:
                    victim = r
                self.preempt(victim)
                preempted.append(victim)
                if victim is r:
                    break
            else:
                decodes.append(r)
        return decodes

    def make_plan(self, decodes: list[Request], prefills: list[tuple[Request, int]], now_s: float,
                  preempted: list[Request] = ()) -> BatchPlan:
        """Build the plan (decodes first; a 1-token entry of a decoding request counts as a decode) and advance
        every scheduled request (``Request.schedule``)."""
        if any(n == 1 and r.is_decoding for r, n in prefills):
            decodes = decodes + [r for r, n in prefills if n == 1 and r.is_decoding]
            prefills = [(r, n) for r, n in prefills if not (n == 1 and r.is_decoding)]
        ids = tuple([r.request_id for r in decodes] + [r.request_id for r, _ in prefills])
        ctx = tuple([r.num_computed_tokens for r in decodes] + [r.num_computed_tokens for r, _ in prefills])
        new = (1,) * len(decodes) + tuple([n for _, n in prefills])
        for r in decodes:            # Request.schedule(1, now_s), inlined: a decode was scheduled before
            r.num_computed_tokens += 1
            r.in_flight = True
            if r.decode_scheduled_s is None and r.decode_replica_id is not None:
                r.decode_scheduled_s = now_s
        for r, n in prefills:
            r.schedule(n, now_s)
        return BatchPlan(ids, new, ctx, len(decodes), tuple(r.request_id for r in preempted))

    def decode_steady(self, plan: BatchPlan) -> str | None:
        """Whether the steps after ``plan`` take one steady shape as long as nothing external happens, so that the
        engine may fast-forward them (``simulator.fast_forward``): every running request decodes one token (the
        plan's prefills that finish in it decode from the next step on), and the one partial prefill left, if any
        (the plan's last entry, see ``steady_prefill_budget``), gets its next chunk. Returns ``"open"`` when
        nothing waits (only an arrival ends it), ``"until-completion"`` when the plan is all decodes and requests
        wait for KV blocks or a slot (a completion may admit one), ``"full-budget"`` when a prefill goes on and
        requests wait (none can be admitted while its chunks fill the budget: the stretch ends before the step
        whose chunk leaves tokens over), None when not (a preemption, prefix caching, a request in flight or not
        in the plan, more than one partial prefill, finished prefills while requests wait unless the policy
        ``waits_for_completion``, or a policy that is not ``steady_after_prefill``)."""
        if plan.preempted_ids or self.kv.prefix_caching or len(plan.request_ids) != len(self.running):
            return None
        d, ids = plan.num_decodes, plan.request_ids
        if d == len(ids):
            if self.waiting:
                return "until-completion" if self.steady_with_waiting else None
            return "open"
        requests = self.requests
        partial = [rid for rid in ids[d:] if requests[rid].remaining_tokens > 0]
        if partial:
            if len(partial) > 1 or partial[0] != ids[-1]:
                return None
            return "full-budget" if self.waiting else "open"
        if not self.steady_after_prefill:
            return None
        if self.waiting:
            return "until-completion" if self.waits_for_completion else None
        return "open"

    def admission_rule(self) -> dict | None:
        """How the policy's step admits requests, for stretches that admit them (``simulator.fast_forward_admissions``),
        or None (the default) when its step is not of that form: every running decode gets one token, partial
        prefills ``min(remaining, budget left)`` in running order, then waiting requests FCFS while budget, a slot
        (``max_num_seqs``) and blocks last, each with ``min(prompt, budget left)`` tokens. Keys: ``budget`` (tokens
        per step, None: no limit), ``reserve_tokens`` (an admission allocates this many tokens, None: its prompt),
        ``blocks_per_chunk`` (a prefill allocates its chunk's slots as it goes, not its prompt's at admission),
        ``full_must_fit`` (with ``blocks_per_chunk``: admitted only if its whole prompt fits), ``insort`` (admitted
        into the running order by arrival, else appended), ``reserve_when_idle`` (the watermark is kept free even
        when nothing runs), ``in_running_order`` (the budget is handed out in running order: decodes after a
        partial prefill could go without)."""
        return None

    def steady_prefill_budget(self, plan: BatchPlan) -> int | None:
        """Tokens per step when the steps after ``plan`` (all running requests in it; ``decode_steady`` says
        whether requests wait) give every decode one token and the plan's one partial prefill
        ``min(remaining, budget - decodes)`` tokens (blocks allocated as ``allocate(request, computed + chunk)``
        would); None when the policy's steps are not of that form (the default: fast-forward then covers only
        stretches without a partial prefill)."""
        return None

    # --- policy ---------------------------------------------------------------------------------------------
    def schedule(self, now_s: float) -> BatchPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, plan: BatchPlan, now_s: float, gaps: dict | None = None) -> list[Request]:
        """Apply a micro-batch that left the last stage at ``now_s``; return the requests it finished here.

        ``gaps`` (the engine's TBT tally, ``{gap_s: count}``) receives, for each request that emits a token and had
        one before, the time since its previous token."""
        done = []
        requests = self.requests
        d = plan.num_decodes
        ids = plan.request_ids
        for rid in ids[:d] if d else ():           # decodes: Request.complete inlined (each emits a token)
            r = requests[rid]
            times = r.token_times_s
            if gaps is not None and times:
                g = now_s - times[-1]
                gaps[g] = gaps.get(g, 0) + 1
            r.in_flight = False
            n = r.num_generated = r.num_generated + 1
            times.append(now_s)
            if n >= r.output_tokens:
                r.completion_s = now_s
                self.kv.free(r)
                del requests[rid]
                done.append(r)
        for rid in ids[d:] if d else ids:
            r = requests[rid]
            if gaps is not None and r.token_times_s and \
                    r.num_computed_tokens == r.prompt_tokens + r.num_generated:
                g = now_s - r.token_times_s[-1]
                gaps[g] = gaps.get(g, 0) + 1
            if r.complete(now_s) and r.is_done_here:
                if not (self.hold_kv_after_prefill and r.prefill_only and not r.is_finished):
                    self.kv.free(r)
                del requests[rid]
                done.append(r)
        if done:
            self.running = [r for r in self.running if r.request_id in requests]
        return done
