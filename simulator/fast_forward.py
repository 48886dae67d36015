"""Fast-forward of quiet stretches: many decode iterations of one replica computed at once, with results identical
to the step-by-step engine.

A *quiet stretch* starts at a decode-only micro-batch that every running request is in (``Scheduler.decode_steady``
says whether the policy would keep scheduling exactly "every running request decodes one token" while nothing
external happens). Its steps ``j = 0, 1, ...`` are then known in advance: step ``j`` decodes the requests that
still have tokens to emit (request ``i`` emits at steps ``0 .. rem_i - 1`` and finishes at step ``rem_i - 1``),
each with context ``ctx0_i + j``. The stretch ends before the first of:

- a step that would end at or after the next arrival (``horizon_s``): at the arrival, the router reads the loads
  and the scheduler its queue as they are step by step — the step in flight then runs as usual;
- the first completion, when requests are waiting (freed KV blocks or a freed slot could admit one) or the load
  is closed-loop (a completion sends the next request);
- a step whose KV growth could fail: all members' extra blocks up to that step, frees ignored, must fit in the free
  blocks at the start (so no preemption can happen);
- ``MAX_STEPS`` steps, or the last member's last token.

Each step's duration is the cost model's ``iteration_time`` of that decode batch — the vectorized
``decode_iteration_times`` where the cost model has one (the same floating-point operations in the same order),
else ``iteration_time`` per step — and times accumulate as the event loop's clock does (``now + duration``). Token
times, TBT samples (``(gap, count)`` per step, in the order the step-by-step engine counts them), iteration rows, KV
blocks, stage busy time and completions are then applied in bulk. A test compares every output with fast-forward
on and off (``tests/test_fast_forward.py``).

Not fast-forwarded (the step-by-step engine runs instead): pipeline parallelism (several micro-batches in flight),
prefix caching (eviction order), disaggregated clusters (KV transfers arrive at times not known in advance), runs
recording their plans, and runs stopped at a given time.
"""
from __future__ import annotations

import math

import numpy as np

from cost_models.plan import BatchPlan

MAX_STEPS = 4096
FIRST_WINDOW = 32


def _blocks(tokens: np.ndarray, block_size: int) -> np.ndarray:
    return -(-tokens // block_size)


def plan_stretch(replica, plan: BatchPlan, horizon_s: float, stop_at_completion: bool):
    """The quiet stretch starting with ``plan`` (already scheduled at ``env.now``), or None when it is one step.

    Returns a dict with the members, their steps and the per-step arrays (see ``apply_stretch``).
    """
    sched = replica.scheduler
    mode = sched.decode_steady(plan)
    if mode is None:
        return None
    if mode == "until-completion":
        stop_at_completion = True
    kv = sched.kv
    members = [sched.requests[rid] for rid in plan.request_ids]
    m0 = len(members)
    ctx0 = np.fromiter(plan.context_lens, dtype=np.int64, count=m0)
    rem = np.fromiter((r.output_tokens - r.num_generated for r in members), dtype=np.int64, count=m0)
    K_max = min(int(rem.min()) if stop_at_completion else int(rem.max()), MAX_STEPS)
    if K_max < 2:
        return None
    # compute a window of steps, widened until the stretch ends inside it (most end at the next arrival): as many
    # steps as the first one's duration fits before the horizon, plus slack
    K = min(K_max, FIRST_WINDOW)
    if math.isfinite(horizon_s):
        first = _durations(replica.cost_model, np.array([m0]), np.array([int(ctx0.sum())]),
                           np.array([int(ctx0.max())]), ctx0, None, 1)[0]
        fit = (horizon_s - replica.env.now) / first if first > 0 else K_max
        K = int(min(K_max, max(2, math.ceil(fit * 1.25) + 2)))
    while True:
        s = _window(replica, plan, members, ctx0, rem, K, horizon_s)
        if s is None or s["K"] < K or K == K_max:
            return s
        K = min(K_max, 4 * K)


def _durations(cm, batch, ctx_sum, ctx_max, ctx0, active, K: int) -> np.ndarray:
    """Seconds of the stretch's first ``K`` steps (``active``: member i decodes at step j; None = all at step 0)."""
    if hasattr(cm, "decode_iteration_times"):
        return cm.decode_iteration_times(batch, ctx_sum, ctx_max)
    if active is None:
        return np.array([cm.iteration_time(BatchPlan.decodes(ctx0.tolist()))])
    return np.array([cm.iteration_time(BatchPlan.decodes((ctx0[active[:, j]] + j).tolist())) for j in range(K)])


def _window(replica, plan, members, ctx0, rem, K: int, horizon_s: float):
    """The first ``K`` steps of the stretch, cut where it must end (KV growth, horizon); None if under 2 steps."""
    kv = replica.scheduler.kv
    m0 = len(members)
    bs = kv.block_size
    held = np.fromiter((kv.held(rid) for rid in plan.request_ids), dtype=np.int64, count=m0)
    steps = np.arange(K, dtype=np.int64)
    last = np.minimum(steps[None, :], rem[:, None] - 1)                  # a finished member stays at its last
    extra = np.maximum(_blocks(ctx0[:, None] + last + 1, bs) - held[:, None], 0)
    fits = extra.sum(axis=0) <= kv.num_free
    if not fits.all():
        K = int(np.argmin(fits))
        if K < 2:
            return None
        extra, steps = extra[:, :K], steps[:K]
    active = rem[:, None] > steps[None, :]                                # member i decodes at step j
    batch = active.sum(axis=0)
    ctx = ctx0[:, None] + steps[None, :]
    ctx_sum = np.where(active, ctx, 0).sum(axis=0)
    ctx_max = np.where(active, ctx, -1).max(axis=0)
    durations = _durations(replica.cost_model, batch, ctx_sum, ctx_max, ctx0, active, K)
    now = replica.env.now
    ends = np.cumsum(np.concatenate(([now], durations)))[1:]            # sequential, as the clock adds
    starts = np.concatenate(([now], ends[:-1]))
    late = ends >= horizon_s              # a router reading loads at the arrival must find the step-by-step state
    if late.any():
        K = int(np.argmax(late))
        if K < 2:
            return None
    # blocks in use when step j is recorded: its allocations done, members finished before it freed
    finished_before = rem[:, None] <= steps[None, :]
    used = kv.num_used - np.where(finished_before, held[:, None], 0).sum(axis=0) + \
        np.where(active, extra, 0).sum(axis=0)
    return {"members": members, "ctx0": ctx0, "rem": rem, "K": K, "batch": batch[:K], "ctx_sum": ctx_sum[:K],
            "durations": durations[:K],
            "starts": starts[:K], "ends": ends[:K], "used": used[:K], "active": active[:, :K]}


def apply_stretch(replica, plan: BatchPlan, s: dict) -> list:
    """Apply a planned stretch to the replica's requests, KV cache, log and recorder; return the completions as
    ``[(step, [requests])]`` in step order (the caller reports them at the end of their step)."""
    sched, kv, log = replica.scheduler, replica.scheduler.kv, replica.log
    K, members, rem, ctx0 = s["K"], s["members"], s["rem"], s["ctx0"]
    ends = s["ends"].tolist()
    starts, durations = s["starts"].tolist(), s["durations"].tolist()
    batch, used = s["batch"].tolist(), s["used"].tolist()
    # TBT samples: step 0 groups members by their previous token; later steps all came from the step before
    recorder = replica.recorder
    if recorder is not None:
        gaps: dict = {}
        e0 = ends[0]
        for r in members:
            if r.token_times_s:
                g = e0 - r.token_times_s[-1]
                gaps[g] = gaps.get(g, 0) + 1
        recorder.add_gaps(gaps)
        recorder.add_gap_arrays([ends[j] - ends[j - 1] for j in range(1, K)], batch[1:])
    # requests
    done_at: dict[int, list] = {}
    emitted = np.minimum(rem, K).tolist()
    for r, n, c in zip(members, emitted, ctx0.tolist()):
        r.token_times_s.extend(ends[:n])
        r.num_generated += n
        r.num_computed_tokens = c + n
        r.in_flight = False
        if r.num_generated >= r.output_tokens:
            r.completion_s = ends[n - 1]
            done_at.setdefault(n - 1, []).append(r)
        else:
            kv.allocate(r, c + n)
    for j in sorted(done_at):
        for r in done_at[j]:
            kv.free(r)
            del sched.requests[r.request_id]
    if done_at:
        sched.running = [r for r in sched.running if r.request_id in sched.requests]
    # iteration rows, busy time
    rid = replica.replica_id
    log.start_s.extend(starts)
    log.duration_s.extend(durations)
    log.batch_size.extend(batch)
    log.num_decode_tokens.extend(batch)
    log.num_prefill_tokens.extend([0] * K)
    log.kv_blocks_used.extend(used)
    log.kv_blocks_total.extend([kv.num_blocks] * K)
    log.replica_id.extend([rid] * K)
    log.scheduled_s.extend(starts)
    busy = replica.stage_busy_s[0]
    for d in durations:
        busy += d
    replica.stage_busy_s[0] = busy
    replica.num_iterations += K
    if getattr(replica.cost_model, "tracker", None) is not None:
        replica.cost_model.track_decodes(s["batch"], s["ctx_sum"])
    log.maybe_flush()
    return [(j, done_at[j]) for j in sorted(done_at)]


def step_plan(s: dict, j: int) -> BatchPlan:
    """The plan of stretch step ``j`` (for ``on_iteration`` hooks)."""
    active = s["active"][:, j]
    ids = [r.request_id for r, a in zip(s["members"], active) if a]
    return BatchPlan(tuple(ids), (1,) * len(ids), tuple((s["ctx0"][active] + j).tolist()), len(ids))


def exact_delay(now: float, end: float) -> float | None:
    """A delay ``d`` with ``now + d == end`` exactly (so one timeout lands where the steps would), or None."""
    d = end - now
    return d if now + d == end and math.isfinite(d) else None
