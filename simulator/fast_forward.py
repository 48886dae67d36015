"""Fast-forward of quiet stretches: many iterations of one replica computed at once, with results identical to the
step-by-step engine.

A *quiet stretch* starts at a micro-batch that every running request is in, after which the policy would keep
scheduling the same shape of step while nothing external happens (``Scheduler.decode_steady``): every running
decode gets one token (a prefill that finishes in the micro-batch decodes from the next step on), and the one
partial prefill left, if any (the plan's last entry; the policy says how many tokens a step holds,
``Scheduler.steady_prefill_budget``), gets its next chunk, ``min(remaining, budget - decodes)``. Its steps
``j = 0, 1, ...`` are then known in advance: decode member ``i`` emits at steps ``0 .. rem_i - 1`` (context
``ctx0_i + j``) and finishes at step ``rem_i - 1``; the prefill computes its chunks, emits its first token at the
end of its last chunk (step ``s``) and decodes from step ``s + 1`` on. The stretch ends before the first of:

- a step that would end at or after the next arrival (``horizon_s``): at the arrival, the router reads the loads
  as they are step by step — the step in flight then runs as usual. When nothing reads the replica's state at an
  arrival (``Replica.spans_arrivals``: its pool's only replica, whose scheduler just queues the request), the step
  in flight at the arrival, scheduled before it, is the stretch's last (one ending exactly at the arrival is left
  to the step-by-step engine);
- the first completion, when requests are waiting (freed KV blocks or a freed slot could admit one) or the load
  is closed-loop (a completion sends the next request); with a prefill going on while requests wait, the step
  whose chunk leaves budget over (it would admit one);
- a step whose KV growth could fail: all members' extra blocks up to that step, frees ignored, must fit in the free
  blocks at the start (so no preemption can happen);
- a step in which the prefill would get no token; ``MAX_STEPS`` steps, or the last member's last token.

The steps are walked one at a time in plain Python (a stretch is a handful of steps: 6 at the median of the
default run), each a few integer updates rather than a pass over the members (see ``_window``). Each step's
duration is the cost model's ``iteration_time`` of that batch: the plan's own for step 0, then ``step_time`` of
its counts where the cost model has it (the same floating-point operations in the same order, without a plan),
else ``iteration_time`` of each step's plan; times accumulate as the event loop's clock does (``now +
duration``), and steps are priced only up to the horizon. Token times, TBT samples (``(gap, count)`` per step),
iteration rows, KV blocks, stage busy time and completions (in the order the step-by-step engine reports them)
are then applied in bulk. When a hook or a completion callback stops the
run inside a stretch, ``rollback_stretch`` takes back what the steps after the stop did to the requests and the
TBT samples. A test compares every output with fast-forward on and off (``tests/test_fast_forward.py``).

Not fast-forwarded (the step-by-step engine runs instead): pipeline parallelism (several micro-batches in flight),
prefix caching (eviction order), disaggregated clusters (KV transfers arrive at times not known in advance), a
partial prefill that recomputes a preempted request's outputs, runs recording their plans, and runs stopped at a
given time.
"""
from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections import Counter
from itertools import accumulate

from cost_models.plan import BatchPlan

MAX_STEPS = 4096
NEVER = 1 << 40          # the step of an event that does not happen in the stretch


def plan_stretch(replica, plan: BatchPlan, horizon_s: float, stop_at_completion: bool,
                 first_s: float | None = None):
    """The quiet stretch starting with ``plan`` (already scheduled at ``env.now``; ``first_s``: its
    ``iteration_time`` if known), or None when it is one step.

    Returns a dict with the members, their steps and the per-step arrays (see ``apply_stretch``).
    """
    sched = replica.scheduler
    mode = sched.decode_steady(plan)
    if mode is None:
        return None
    if mode == "until-completion":
        stop_at_completion = True
    now = replica.env.now
    if first_s is None:
        first_s = replica.cost_model.iteration_time(plan)
    if now + first_s >= horizon_s:           # the next arrival comes during step 0
        return None
    # the decode members, in running order: the plan's decodes and its prefills that finish in it (they emit at
    # the end of step 0 and decode from step 1 on); the partial prefill, if any, is the plan's last entry
    q = sched.requests[plan.request_ids[-1]] if plan.num_decodes < len(plan.request_ids) else None
    if q is not None and q.remaining_tokens == 0:
        q = None
    regular = [r for r in sched.running if r is not q] if q is not None else list(sched.running)
    rem = [r.output_tokens - r.num_generated for r in regular]     # tokens each still emits, step 0's included
    st = {"regular": regular, "q": q, "rem": rem, "ctx0": [r.num_computed_tokens - 1 for r in regular],
          "first_s": first_s, "prefill": None}
    pick = min if stop_at_completion else max
    last = pick(rem) - 1 if rem else None                          # the step of the first (last) member's last token
    k_cap = MAX_STEPS
    if q is not None:
        pre = _prefill_steps(sched, plan, q, rem, full_only=mode == "full-budget")
        if pre is None:
            return None
        st["prefill"] = pre
        last = pre["last"] if last is None else pick(last, pre["last"])
        if pre["end"] is None or mode == "full-budget":   # the stretch ends with its chunks (a request waiting
            k_cap = len(pre["chunks"])                      # could be admitted in the step after the last one)
    K_max = min(last + 1, k_cap)
    if K_max < 2:
        return None
    return _window(replica, plan, st, K_max, horizon_s)


def _prefill_steps(sched, plan: BatchPlan, p, rem: list, full_only: bool) -> dict | None:
    """The chunks the partial prefill ``p`` (the plan's last entry) gets at steps 0, 1, ... while every decode of
    ``rem`` (tokens each still emits) keeps decoding, and what it does once its prompt is in; ``full_only``
    (requests wait): only the steps whose chunk fills the budget (a step with tokens over would admit one). None
    when the policy does not schedule such steps or ``p`` recomputes outputs (its last token would be scheduled as
    a decode)."""
    budget = sched.steady_prefill_budget(plan)
    if budget is None or p.num_generated:
        return None
    chunks, ctx = [plan.num_new_tokens[-1]], [plan.context_lens[-1]]
    c = p.num_computed_tokens
    left = p.prompt_tokens - c
    srt, n_dec = sorted(rem), len(rem)
    j = 0
    while left > 0 and j + 1 < MAX_STEPS:
        j += 1
        room = budget - (n_dec - bisect_right(srt, j))              # decodes at step j: rem_i > j
        n = min(left, room)
        if n <= 0 or (full_only and n < room):
            break
        chunks.append(n)
        ctx.append(c)
        c += n
        left -= n
    end = len(chunks) - 1 if left == 0 else None                     # the step of its first token
    ndec = p.output_tokens - 1                                       # decode steps after it
    pos = sched.running.index(p)             # where it decodes among the others (running order)
    return {"chunks": chunks, "ctx": ctx, "end": end, "ndec": ndec, "pos": pos,
            "last": NEVER if end is None else end + ndec}


def _window(replica, plan: BatchPlan, st: dict, K_max: int, horizon_s: float):
    """The stretch's steps, walked one by one up to the first that must not be taken (KV growth, horizon, ``K_max``);
    None if under 2 steps.

    Each step costs a few integer updates, not a pass over the members: they are sorted by their decode counts (those
    still decoding at step ``j`` are a suffix, whose context sum and longest context are precomputed from the end);
    the members needing a new KV block at step ``j`` are counted per residue of ``j`` modulo the block size (member
    ``i`` needs one at ``f_i, f_i + block_size, ...``), updated when a member starts growing or finishes; the
    prefill member adds its chunk or decode. Then the step is priced, by ``step_time`` where the cost model has it
    (else ``iteration_time`` of its plan)."""
    kv = replica.scheduler.kv
    regular, pre, q = st["regular"], st["prefill"], st["q"]
    rem, ctx0 = st["rem"], st["ctx0"]
    d0, bs = len(regular), kv.block_size
    # member i needs a new block at steps f_i, f_i + bs, ... (ctx0 + j + 1 tokens outgrow the tokens its blocks hold)
    # up to its last step, rem_i - 1
    capacity = kv.capacity
    first_new = [capacity.get(r.request_id, 0) - c for r, c in zip(regular, ctx0)]
    rs, cs, fs = zip(*sorted(zip(rem, ctx0, first_new))) if d0 else ((), (), ())
    sums = list(accumulate(reversed(cs), initial=0))[::-1]            # over the sorted members [i:]
    maxes = list(accumulate(reversed(cs), max, initial=-1))[::-1]
    starting = Counter(first_new)            # members whose first new block is at step f
    unborn: dict[int, int] = {}              # of those, members finished before it
    growing = [0] * bs                       # members still decoding that need a block at steps = r (mod bs)
    if pre is not None:
        chunks, chunk_ctx, n_chunks = pre["chunks"], pre["ctx"], len(pre["chunks"])
        p_last, p_prompt, p_held = pre["last"], q.prompt_tokens, kv.held(q.request_id)
        start = pre["end"] + 1 if pre["end"] is not None else None
        p_new = 0
    cm = replica.cost_model
    price = getattr(cm, "step_time", None)
    num_free, num_used, base = kv.num_free, kv.num_used, 0
    spans = replica.spans_arrivals
    now = t = replica.env.now
    ends, durations, used = [], [], []
    batch, ctx_sums, prefill_tokens = [], [], []    # each step's decodes, their context sum, its prefill chunk
    extra = ptr = 0
    K = K_max
    for j in range(K_max):
        freed = 0                            # blocks of the members whose last step was j - 1
        while ptr < d0 and rs[ptr] <= j:
            n, f = rs[ptr], fs[ptr]
            if f < n:                        # it grew at f, f + bs, ... up to n - 1
                growing[f % bs] -= 1
                freed += (f + cs[ptr]) // bs + (n - 1 - f) // bs + 1
            else:
                unborn[f] = unborn.get(f, 0) + 1
                freed += (f + cs[ptr]) // bs
            ptr += 1
        if j in starting:
            growing[j % bs] += starting[j] - unborn.get(j, 0)
        b = d0 - ptr
        ctx_sum = sums[ptr] + j * b
        cmax = maxes[ptr] + j if b else -1
        grow = growing[j % bs]
        chunk = kctx = 0
        if pre is not None:                  # the prefill member: a chunk, or (its prompt in) a decode
            if j < n_chunks:
                chunk, kctx = chunks[j], chunk_ctx[j]
                tokens = kctx + chunk
            else:
                tokens = p_prompt + (min(j, p_last) - start) + 1
                if j <= p_last:
                    pc = p_prompt + (j - start)
                    b, ctx_sum, cmax = b + 1, ctx_sum + pc, max(cmax, pc)
                elif j == p_last + 1:            # its blocks come back
                    freed += p_held + p_new
            new = max(-(-tokens // bs) - p_held, 0)
            grow += new - p_new
            p_new = new
        extra += grow
        if extra > num_free:                 # this step's KV growth could fail: a preemption could happen
            K = j
            break
        if j == 0:
            d = st["first_s"]
        elif price is not None:
            d = price(b, ctx_sum, cmax, chunk, kctx)
        else:
            d = cm.iteration_time(step_plan({**st, "plans": [plan], "n_pre": n_chunks if pre else 0}, j))
        t += d                               # sequential, as the clock adds
        last_step = t >= horizon_s           # the next arrival comes during step j
        if last_step and not (spans and t > horizon_s):
            K = j                            # a router reading loads then must find the step-by-step state
            break
        base += freed
        ends.append(t)
        durations.append(d)
        used.append(num_used + extra - base)
        batch.append(b)
        ctx_sums.append(ctx_sum)
        prefill_tokens.append(chunk)
        if last_step:                        # scheduled before the arrival, it runs as the stretch says
            K = j + 1
            break
    if K < 2:
        return None
    n_pre = min(n_chunks, K) if pre is not None else 0
    return {"regular": regular, "q": q, "rem": rem, "ctx0": ctx0, "first_new": first_new, "prefill": pre,
            "n_pre": n_pre, "plans": [plan],
            "K": K, "batch": batch, "ctx_sum": ctx_sums, "prefill_tokens": prefill_tokens,
            "durations": durations, "starts": [now] + ends[:K - 1],
            "ends": ends, "used": used}


def apply_stretch(replica, plan: BatchPlan, s: dict) -> list:
    """Apply a planned stretch to the replica's requests, KV cache, log and recorder; return the completions as
    ``[(step, [requests])]`` in step order and, within a step, in the order the step-by-step engine reports them
    (the caller reports them at the end of their step)."""
    sched, kv, log = replica.scheduler, replica.scheduler.kv, replica.log
    K, regular, q, pre = s["K"], s["regular"], s["q"], s["prefill"]
    n_pre = s["n_pre"]
    ends, starts, durations, batch, used = s["ends"], s["starts"], s["durations"], s["batch"], s["used"]
    end = pre["end"] if pre is not None and pre["end"] is not None and pre["end"] < K else None
    # TBT samples: step 0 groups members by their previous token; later steps all came from the step before
    recorder = replica.recorder
    if recorder is not None:
        gaps: dict = {}
        e0 = ends[0]
        for prev, n in Counter([r.token_times_s[-1] for r in regular if r.token_times_s]).items():
            g = e0 - prev                    # (in the order of the members, as step by step)
            gaps[g] = gaps.get(g, 0) + n
        s["gap_mark"] = (recorder.num_gap_pairs, len(gaps))        # for rollback_stretch
        recorder.add_gaps(gaps)
        recorder.add_gap_arrays([ends[j] - ends[j - 1] for j in range(1, K)], batch[1:])
    # requests
    done_at: dict[int, list] = {}
    s["first_set"] = first_set = []          # members whose first token the stretch emitted
    allocate = kv.allocate
    ends_array = array("d", ends)        # (token times are slices of it: copied, not unboxed)
    for r, rem, c, f in zip(regular, s["rem"], s["ctx0"], s["first_new"]):
        if rem > K:                          # it decodes through the stretch
            r.token_times_s.extend(ends_array)
            r.num_generated += K
            r.num_computed_tokens = c + K
            if f < K:                        # its growth needed blocks (its first new one at step f)
                allocate(r, c + K)
        else:
            r.token_times_s.extend(ends_array[:rem])
            r.num_generated += rem
            r.num_computed_tokens = c + rem
            r.completion_s = ends[rem - 1]
            done_at.setdefault(rem - 1, []).append(r)
        r.in_flight = False
        if r.first_token_s is None:          # it prefilled in step 0
            r.first_token_s = ends[0]
            first_set.append(r)
    if 0 in done_at and len(done_at[0]) > 1 and plan.num_decodes < len(plan.request_ids):
        index = {rid: i for i, rid in enumerate(plan.request_ids)}    # step 0 reports in plan order
        done_at[0].sort(key=lambda r: index[r.request_id])
    if q is not None:
        q.in_flight = False
        if end is None:                      # still prefilling after the stretch
            q.num_computed_tokens = pre["ctx"][K - 1] + pre["chunks"][K - 1]
            kv.allocate(q, q.num_computed_tokens)
        else:
            n = 1 + min(pre["ndec"], K - 1 - end)
            q.token_times_s.extend(ends_array[end:end + n])
            q.num_generated += n
            q.num_computed_tokens = q.prompt_tokens + n - 1
            if q.first_token_s is None:
                q.first_token_s = ends[end]
                first_set.append(q)
            if q.num_generated >= q.output_tokens:
                step = end + n - 1
                q.completion_s = ends[step]
                finishing = done_at.setdefault(step, [])
                if step == end:              # finished by its prefill: reported after the step's decodes
                    finishing.append(q)
                else:                        # a decode: in running order among the others
                    before = set(id(r) for r in regular[:pre["pos"]])
                    finishing.insert(sum(1 for r in finishing if id(r) in before), q)
            else:
                kv.allocate(q, q.num_computed_tokens)
    for j in sorted(done_at):
        for r in done_at[j]:
            kv.free(r)
            del sched.requests[r.request_id]
    if done_at:
        sched.running = [r for r in sched.running if r.request_id in sched.requests]
    # iteration rows (step 0's are the plan's), busy time
    rid = replica.replica_id
    log.start_s.extend(starts)
    log.duration_s.extend(durations)
    log.batch_size.append(len(plan.request_ids))
    log.num_decode_tokens.append(plan.num_decodes)
    log.num_prefill_tokens.append(plan.num_prefill_tokens)
    if n_pre > 1:
        log.batch_size.extend([b + 1 for b in batch[1:n_pre]])
        log.batch_size.extend(batch[n_pre:])
    else:
        log.batch_size.extend(batch[1:])
    log.num_prefill_tokens.extend(s["prefill_tokens"][1:])
    log.num_decode_tokens.extend(batch[1:])
    log.kv_blocks_used.extend(used)
    log.kv_blocks_total.extend([kv.num_blocks] * K)
    log.replica_id.extend([rid] * K)
    log.scheduled_s.extend(starts)
    busy = replica.stage_busy_s[0]
    for d in durations:
        busy += d
    replica.stage_busy_s[0] = busy
    replica.num_iterations += K
    cm = replica.cost_model
    if getattr(cm, "tracker", None) is not None:
        for j in range(max(n_pre, 1)):
            cm.tracker.add(cm.outside(step_plan(s, j)))
        cm.track_decodes(s["batch"][max(n_pre, 1):], s["ctx_sum"][max(n_pre, 1):])
    log.maybe_flush()
    return [(j, done_at[j]) for j in sorted(done_at)]


def rollback_stretch(replica, s: dict, upto: int) -> None:
    """Undo what an applied stretch did after step ``upto`` (-1: after scheduling step 0) to its requests' tokens,
    first-token and completion times and to the recorder's TBT samples, so that a run stopped there (an
    ``on_iteration`` hook or a completion callback raised) reports what the step-by-step engine would have
    measured. The scheduler, the KV cache and the iteration rows are left as they are: the run does not go on."""
    K = s["K"]
    for r, rem in zip(s["regular"], s["rem"]):
        n, keep = min(rem, K), max(0, min(rem, upto + 1))
        if n > keep:
            del r.token_times_s[len(r.token_times_s) - (n - keep):]
            r.num_generated -= n - keep
            r.num_computed_tokens -= n - keep
            r.completion_s = None
    q, pre = s["q"], s["prefill"]
    if q is not None and pre["end"] is not None and pre["end"] < K:
        n = 1 + min(pre["ndec"], K - 1 - pre["end"])
        keep = 0 if upto < pre["end"] else 1 + min(pre["ndec"], upto - pre["end"])
        if n > keep:
            del q.token_times_s[len(q.token_times_s) - (n - keep):]
            q.num_generated -= n - keep
            q.completion_s = None
    for r in s["first_set"]:
        if not r.token_times_s:
            r.first_token_s = None
    recorder = replica.recorder
    if recorder is not None:
        base, step0 = s["gap_mark"]
        keep = base if upto < 0 else base + step0 + upto
        recorder.truncate_gaps(keep)


def step_plan(s: dict, j: int) -> BatchPlan:
    """The plan of stretch step ``j`` (for ``on_iteration`` hooks, range tracking, and cost models without
    ``step_time``)."""
    plans = s["plans"]
    if j < len(plans):
        return plans[j]
    regular, q, pre, rem = s["regular"], s["q"], s["prefill"], s["rem"]
    ids = [r.request_id for r, n in zip(regular, rem) if n > j]
    ctxs = [c + j for c, n in zip(s["ctx0"], rem) if n > j]
    if q is None:
        return BatchPlan(tuple(ids), (1,) * len(ids), tuple(ctxs), len(ids))
    if j < s["n_pre"]:                       # a chunk step: the decodes, then the chunk
        return BatchPlan(tuple(ids) + (q.request_id,), (1,) * len(ids) + (pre["chunks"][j],),
                         tuple(ctxs) + (pre["ctx"][j],), len(ids))
    if pre["end"] is not None and j <= pre["last"]:     # the prefill now decodes, in running order
        k = sum(1 for n in rem[:pre["pos"]] if n > j)
        ids.insert(k, q.request_id)
        ctxs.insert(k, q.prompt_tokens + j - pre["end"] - 1)
    return BatchPlan(tuple(ids), (1,) * len(ids), tuple(ctxs), len(ids))


def exact_delay(now: float, end: float) -> float | None:
    """A delay ``d`` with ``now + d == end`` exactly (so one timeout lands where the steps would), or None."""
    d = end - now
    return d if now + d == end and math.isfinite(d) else None
