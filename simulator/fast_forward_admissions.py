"""Fast-forward with admissions: stretches in which requests finish and waiting requests are admitted, for a policy
whose step is Sarathi-Serve's or a variant of it (Orca, vLLM v1), with results identical to the step-by-step engine.

``simulator.fast_forward`` stops a stretch where a request could be admitted. Under load that is every few steps:
each completion frees a slot, each last prefill chunk leaves budget over, and the waiting queue is never empty. Here
the steps are walked with the policy's own rule instead, admissions included, as long as everything the rule reads
is known in advance. A policy describes its step with ``Scheduler.admission_rule`` (Sarathi-Serve, Agrawal et al.,
OSDI'24 §4; Orca and vLLM 0.32 state how theirs differ: no budget, reservations, slots per chunk, appended order):

1. every running decode gets one token (``Scheduler.decode_running``; a preemption ends the stretch: a step is
   taken only if every new KV block of the running requests fits in the free blocks);
2. the partial prefills, in running order, get ``min(remaining, budget left)`` tokens each;
3. while budget is left, requests wait and fewer than ``max_num_seqs`` run, the head of the waiting queue is admitted
   (its whole prompt's blocks, or its reservation, or its first chunk's, keeping the watermark free) with a chunk of
   ``min(tokens to compute, budget left)``; the first head whose blocks do not fit stops admission.

A request preempted by recompute is admitted like the others where the policy appends admissions (vLLM): its prefill
covers prompt and outputs so far, and its next token, at the end of it, adds a TBT sample. Where admissions keep the
arrival order (Sarathi-Serve, Orca) it would re-enter the middle of the running order: the stretch ends there. A
stretch ends before a step whose allocation could fail (a preemption); the next one starts at that step's plan, which
the scheduler built (preempting, and admitting nothing), so a KV-bound vLLM run is walked all in stretches.

The requests a stretch may admit are those waiting when it starts and, on a replica that is its pool's only one
(``Replica.spans_arrivals``: nothing reads its state at an arrival), those arriving before a step starts: the
open-loop stream is read ahead (``Replica.pending_arrival``), and the scheduler skips such a request when its arrival
comes (``Scheduler.pre_admitted``). A step ending exactly at an arrival is left to the step-by-step engine (the order
of two events at one instant is the event loop's). On a routed replica the stretch ends before the step that would
end at or after the next arrival, or that would admit past the requests waiting at its start.

Each step costs a few integer updates, not a pass over the requests: decodes are summed per step (their count, the
sum of ``context - step``, the largest where the cost model reads it), the decodes needing a KV block at step ``j``
are counted by the residue of ``j`` modulo the block size, and requests join and leave these sums when their prompt
is in and after their last token. Runs of decode-only steps in which nothing can be admitted are taken in bulk up to
the next last token, growth start, arrival or failing allocation (running sums and bisection). Steps are priced by
the cost model's ``step_time`` (``chunks_step_time`` for several prefill chunks, ``decode_step_times`` for a run), the
same floating-point operations as ``iteration_time`` of their plans.

Not covered (the other fast-forward or the step-by-step engine runs instead): prefix caching, pipeline parallelism,
closed-loop load, a cost model without ``step_time``, a step of several prefill chunks for one without
``chunks_step_time`` (a fitted model: the stretch ends there), and hooks that read each step's plan. A fitted model's
range tracker records every step, in step order, as the step-by-step engine does.
"""
from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from itertools import accumulate

import numpy as np

from cost_models.plan import BatchPlan
from simulator.fast_forward import MAX_STEPS
from simulator.output import unboxed


def _key(r):
    return (r.arrival_s, r.request_id)


def plan_admitting(replica, plan: BatchPlan, first_s: float, reads_plan: bool):
    """The stretch starting with ``plan`` (scheduled at ``env.now``, lasting ``first_s``) with the admissions the
    policy makes, None when it is not covered, or False when it would be under 2 steps (a preemption, an arrival or
    an admission this walk does not take comes at once: no stretch is worth trying then).

    Returns a dict of the steps (``ends``, ``durations``, rows) and, per request, what the steps do to it (see
    ``apply_admitting``)."""
    sched, cm = replica.scheduler, replica.cost_model
    kv = sched.kv
    rule = sched.admission_rule()
    pending = replica.pending_arrival if replica.spans_arrivals else None    # arrivals it may admit
    if rule is None or reads_plan or kv.prefix_caching or replica.stop_at_completion \
            or not (sched.waiting or pending is not None) or len(plan.request_ids) != len(sched.running):
        return None
    price = getattr(cm, "step_time", None)
    if price is None:
        return None
    price_many = getattr(cm, "chunks_step_time", None)
    now = replica.env.now
    horizon = replica.horizon()
    spans = replica.spans_arrivals
    next_arrival = replica.next_arrival_from
    end0 = now + first_s
    if spans:
        if next_arrival is None or next_arrival(end0) == end0:
            return None
    elif end0 >= horizon:
        return None

    requests, bs = sched.requests, kv.block_size
    ids, d0 = plan.request_ids, plan.num_decodes
    # decode members: (request, base, first, last, f, held0): it emits at steps first..last with context base + j
    # at step j, holds held0 blocks when it starts and needs a new one at steps f, f + bs, ... (f > last: never)
    members: list = []
    heap: list = []              # (-base, index) of the decoding members, deleted lazily (``alive``)
    alive: list = []
    ending: dict[int, list] = {}     # last step -> members
    growing = [0] * bs           # decoding members needing a block at the steps = r (mod bs)
    grow_start: dict[int, list] = {}
    B = S = 0                    # decoding members, the sum of their bases
    end_heap: list = []          # last steps of the members (a run of decode steps ends at the first)
    grow_heap: list = []         # their first growth steps

    longest = getattr(cm, "uses_ctx_max", True)      # (the roofline reads only the context sum)

    def join(r, base, first, last, held0, heaps=True):
        nonlocal B, S
        f = held0 * bs - base    # context base + f fills its blocks: that step's token needs a new one
        i = len(members)
        members.append((r, base, first, last, f, held0))
        alive.append(True)
        ending.setdefault(last, []).append(i)
        if f <= last:
            grow_start.setdefault(f, []).append(i)
        if heaps:                # (the stretch's first members are heapified at once)
            if longest:
                heapq.heappush(heap, (-base, i))
            heapq.heappush(end_heap, last)
            if f <= last:
                heapq.heappush(grow_heap, f)
        B += 1
        S += base

    prefill_done: dict[int, list] = {}   # step -> requests finished by the token their prefill emits, plan order
    first_token: dict[int, int] = {}     # request_id -> step whose end its prefill emits a token at
    chunk_log: dict[int, list] = {}      # request_id -> [(step, steps, tokens a step)] of its prefill chunks
    # [request, computed, held blocks, tokens to compute (prompt + outputs so far: a request preempted by
    # recompute prefills its outputs too)] still prefilling, in running order
    partials: list = []
    held_of: dict[int, int] = {}         # request_id -> blocks of a request finished by its prefill
    recompute_gaps: dict[int, list] = {}     # step -> TBT samples of recomputing prefills that emit then
    running = sched.running
    position = {r.request_id: i for i, r in enumerate(running)}   # running order (completions are reported so)
    held = kv.held
    for rid in ids[:d0]:
        r = requests[rid]
        join(r, r.num_computed_tokens - 1, 0, r.output_tokens - r.num_generated - 1, held(rid), False)
    for rid, n in zip(ids[d0:], plan.num_new_tokens[d0:]):
        r = requests[rid]
        if r.num_generated and rule["insort"]:   # re-admitted into the middle of the running order
            return None
        chunk_log[rid] = [(0, 1, n)]
        total = r.prompt_tokens + r.num_generated
        if r.num_computed_tokens == total:
            first_token[rid] = 0
            if r.num_generated + 1 >= r.output_tokens:
                prefill_done.setdefault(0, []).append(r)
                held_of[rid] = held(rid)
            else:
                join(r, total - 1, 1, r.output_tokens - r.num_generated - 1, held(rid), False)
        else:
            partials.append([r, r.num_computed_tokens, held(rid), total])
    if [p[0] for p in partials] != [r for r in running if r.remaining_tokens]:
        return None
    next_position = len(running)
    end_heap = [m[3] for m in members]
    grow_heap = [m[4] for m in members if m[4] <= m[3]]
    heapq.heapify(end_heap)
    heapq.heapify(grow_heap)
    if longest:
        heap = [(-m[1], i) for i, m in enumerate(members)]
        heapq.heapify(heap)
    if rule["in_running_order"] and partials and running[len(running) - len(partials):] != [p[0] for p in partials]:
        return None                      # budget goes in running order: a partial prefill before decodes
    last_key = _key(running[-1]) if running else None
    waiting = sched.waiting
    n_wait = len(waiting)
    wi = 0                               # the next to admit: waiting[wi], or arrived[wi - n_wait]
    arrived: list = []                   # requests arriving during the stretch, before the step being walked
    pi = 0                               # pending(pi): the next request to arrive
    nxt = pending(0) if pending is not None else None
    rejected = sched.rejection_reason
    admitted: list = []                  # (request, step)
    budget_total = rule["budget"] if rule["budget"] is not None else 1 << 62
    max_seqs, watermark = sched.max_num_seqs, kv.watermark_blocks
    chunked, insort, idle_reserve = rule["blocks_per_chunk"], rule["insort"], rule["reserve_when_idle"]
    in_order = rule["in_running_order"]
    num_blocks = kv.num_blocks
    free = kv.num_free
    running_count = len(running)

    def release(j):
        """Blocks and slots of the requests whose last token is at step j (back before step j + 1)."""
        nonlocal free, running_count
        for i in ending.get(j, ()):
            _, base, _, last, _, held0 = members[i]
            grown = -(-(base + last + 1) // bs)
            free += grown if grown > held0 else held0
            running_count -= 1
        for r in prefill_done.get(j, ()):
            free += held_of[r.request_id]
            running_count -= 1

    release(0)
    ends, durations, used = [end0], [first_s], [kv.num_used]
    # the batch sizes, decode and prefill tokens of the steps, by runs of equal steps: run k is run_len[k] steps
    run_len, batch, n_decode, n_prefill = [1], [len(ids)], [d0], [plan.num_prefill_tokens]
    tracked = getattr(cm, "tracker", None) is not None     # a fitted model counts shapes beyond its profile
    ctx_sums: list = [0]                 # (with a tracker) each step's decode context sum, and its chunks
    step_chunks: dict[int, tuple] = {}
    t = end0
    K = 1
    decode_times = getattr(cm, "decode_step_times", None)
    chunk_times = getattr(cm, "chunk_step_times", None)

    def _arrival_cut(run_ends, taken):
        """``(steps, ended)``: how many of a run's first ``taken`` steps (ending at ``run_ends``) come before one
        that ends exactly at an arrival (on a routed replica: at or after the next one), which ends the stretch."""
        nonlocal na
        if not taken or run_ends[taken - 1] < na:    # (no step reaches the next arrival)
            return taken, False
        k = bisect_left(run_ends, na, 0, taken)
        while k < taken:
            if spans:
                na = next_arrival(run_ends[k])
            if not spans or na == run_ends[k]:
                return k, True
            k = bisect_left(run_ends, na, k + 1, taken)
        return taken, False

    def _append_run(j0, taken, run_ends, durs, run_used, d, chunk):
        """Take a run's first ``taken`` steps from step ``j0``: ``d`` decodes and a prefill chunk of ``chunk``
        tokens each (0: none), ending at ``run_ends``, the KV blocks used before them and after each in
        ``run_used``."""
        nonlocal t, free, K
        t = run_ends[taken - 1]
        if taken == len(run_ends):       # (the whole run: no slices)
            ends.extend(run_ends)
            durations.extend(durs)
        else:
            ends.extend(run_ends[:taken])
            durations.extend(durs[:taken])
        used.extend(run_used[1:taken + 1])
        free = num_blocks - run_used[taken]
        run_len.append(taken)
        batch.append(d + 1 if chunk else d)
        n_decode.append(d)
        n_prefill.append(chunk)
        if tracked:
            ctx_sums.extend([S + k * d for k in range(j0, j0 + taken)])
        K = j0 + taken

    def _starts_before(j, e):
        """The growth starts after step ``j`` and before step ``e`` as ``[(step, members)]`` in step order, taken off
        ``grow_heap`` (a run takes its steps with them: ``_growth``, then ``_commit_starts``)."""
        out = []
        while grow_heap and grow_heap[0] < e:
            f = heapq.heappop(grow_heap)
            if f > j and not (out and out[-1][0] == f):
                out.append((f, len(grow_start[f])))
        return out

    def _growth(lo, hi, starts):
        """KV blocks the decodes need at each step ``lo .. hi - 1`` of a run: ``growing`` by residue, plus the
        members whose growth starts (``starts``) from their start step on, every ``bs`` steps."""
        r, n = lo % bs, hi - lo          # ``growing`` from residue ``lo``, repeated (slices: no loop per step)
        g = growing[r:r + n] if r + n <= bs else ((growing[r:] + growing[:r]) * (n // bs + 1))[:n]
        for f, count in starts:
            if f >= hi:
                break
            for k in range(f if f >= lo else f + -(-(lo - f) // bs) * bs, hi, bs):
                g[k - lo] += count
        return g

    def _commit_starts(starts, last):
        """A run took its steps up to ``last``: the growth starts up to it join ``growing`` (as the steps' own
        updates would have), the later ones go back on ``grow_heap``."""
        for f, count in starts:
            if f <= last:
                growing[f % bs] += count
                del grow_start[f]
            else:
                for _ in range(count):
                    heapq.heappush(grow_heap, f)

    def _chunk_run(j, c):
        """Take the steps from ``j`` in which ``partials[0]`` gets ``c`` tokens (the budget the ``B`` decodes leave)
        and still has more to compute, as the general step would (the same rows, KV growth and arrival checks);
        return ``(steps taken, whether the stretch ends after them)``, ``(0, False)`` when fewer than 2 could be
        (the general step takes step ``j`` then)."""
        while end_heap and end_heap[0] < j:
            heapq.heappop(end_heap)
        p = partials[0]
        n = min((p[3] - p[1] - 1) // c, (end_heap[0] + 1 if end_heap else MAX_STEPS) - j, MAX_STEPS - j)
        if n < 2:
            return 0, False
        starts = _starts_before(j, j + n)
        d, k0 = B, p[1]
        if chunk_times is not None:
            durs = chunk_times(d, S + j * d, n, c, k0)
        else:
            top = j - heap_top(heap, alive) if d and longest else -1
            durs = [price(d, S + (j + i) * d, top + i if d and longest else -1, c, k0 + i * c) for i in range(n)]
        run_ends = list(accumulate(durs, initial=t))[1:]
        grow = _growth(j, j + n, starts)
        if chunked:                      # its slots are allocated chunk by chunk
            held = p[2]
            for i in range(n):
                after = -(-(k0 + (i + 1) * c) // bs)
                grow[i] += after - held
                held = after
        run_used = list(accumulate(grow, initial=num_blocks - free))
        taken = bisect_right(run_used, num_blocks, 1) - 1    # steps whose KV growth fits (no preemption)
        stopped = taken < n
        taken, at_arrival = _arrival_cut(run_ends, taken)
        stopped = stopped or at_arrival
        if taken:
            _append_run(j, taken, run_ends, durs, run_used, d, c)
            if tracked:
                for i in range(taken):
                    step_chunks[j + i] = ((c,), (k0 + i * c,))
            chunk_log[p[0].request_id].append((j, taken, c))
            p[1] += taken * c
            if chunked:
                p[2] = -(-p[1] // bs)
            release(j + taken - 1)       # (nothing ends before the run's last step)
        _commit_starts(starts, j + taken - 1)
        return taken, stopped
    na = next_arrival(end0) if spans else horizon     # the next arrival at or after t (lone replica)
    j = 0
    while j + 1 < MAX_STEPS:
        j += 1
        for i in ending.pop(j - 1, ()):      # members whose last token was at step j - 1 leave the sums
            _, base, _, last, f, _ = members[i]
            alive[i] = False
            B -= 1
            S -= base
            if f <= last:
                growing[f % bs] -= 1
        for i in grow_start.pop(j, ()):
            growing[j % bs] += 1
        while nxt is not None and nxt.arrival_s < t:     # arrived before step j is scheduled
            if rejected(nxt) is None:
                arrived.append(nxt)
            pi += 1
            nxt = pending(pi)
        d = B
        if in_order and d > budget_total:    # the budget would run out before the last decode
            break
        queued = n_wait + len(arrived)
        head = (waiting[wi] if wi < n_wait else arrived[wi - n_wait]) if wi < queued else None
        if d and not partials and _admits_none(head, running_count, max_seqs, budget_total - d,
                                               free - growing[j % bs], rule, bs, watermark, pending is not None):
            # decode-only steps until the next member's last token: the same decodes each step
            while end_heap[0] < j:
                heapq.heappop(end_heap)
            e = end_heap[0] + 1
            if e > MAX_STEPS:
                e = MAX_STEPS
            starts = _starts_before(j, e)
            top = j - heap_top(heap, alive) if longest else -1
            until = nxt.arrival_s if head is None and nxt is not None else None   # a slot waits for it
            stopped = cut = False
            j0, block = j, 64            # priced in growing blocks: a run may stop long before e
            if until is not None:        # first as many as should reach the arrival (durations vary slowly)
                guess = (until - t) / durations[-1] + 2
                if guess < block:
                    block = int(guess) if guess > 2 else 2
            while j0 < e and not (stopped or cut):
                if until is not None and until < t:   # it arrived before step j0: admitted then
                    cut = True
                    break
                e0 = j0 + block
                if e0 > e:
                    e0 = e
                block *= 2
                n = e0 - j0
                if decode_times is not None:
                    durs = decode_times(d, S + j0 * d, n)
                else:
                    durs = [price(d, S + k * d, top + k - j, 0, 0) for k in range(j0, e0)]
                run_ends = list(accumulate(durs, initial=t))[1:]   # (t + d, sequentially: as the clock adds)
                run_used = list(accumulate(_growth(j0, e0, starts), initial=num_blocks - free))
                taken = n
                if until is not None:    # step k is admitted at if the request arrived before it starts
                    taken = min(n, bisect_right(run_ends, until) + 1)
                cut = taken < n
                fits = bisect_right(run_used, num_blocks, 1) - 1   # steps whose KV growth fits (no preemption)
                stopped = fits < taken
                taken, at_arrival = _arrival_cut(run_ends, fits if stopped else taken)
                stopped = stopped or at_arrival
                if taken:
                    _append_run(j0, taken, run_ends, durs, run_used, d, 0)
                j0 += taken
            _commit_starts(starts, j0 - 1)
            if stopped:
                break
            if cut:                      # the general step admits the arrival
                j = j0 - 1
                continue
            release(e - 1)               # (nothing ends before the run's last step)
            j = e - 1
            continue
        c = budget_total - d
        if partials and 0 < c and (partials[0][3] - partials[0][1] - 1) // c >= 2:
            # steps in which the first partial prefill takes all the budget the decodes leave (no other prefill
            # gets a token, nothing is admitted) until the next member's last token or growth start
            taken, stopped = _chunk_run(j, c)
            if stopped:                  # an allocation or an arrival ended the stretch
                break
            if taken:
                j += taken - 1
                continue
        grow = growing[j % bs]
        budget = budget_total - d
        entries = []                     # (request, chunk, context) of the step's prefills, in plan order
        decode_like = False
        for p in partials:
            if budget <= 0:
                break
            n = min(p[3] - p[1], budget)
            if p[3] - p[1] == 1 and p[0].num_generated:     # its last token would be scheduled as a decode
                decode_like = True
                break
            entries.append((p[0], n, p[1]))
            budget -= n
            if chunked:                  # its slots are allocated chunk by chunk
                grow += -(-(p[1] + n) // bs) - p[2]
        if decode_like:
            break
        if grow > free:                  # an allocation of the running requests could fail: a preemption
            break
        f_step = free - grow
        new = []
        rc, key = running_count, last_key
        stop = False
        while budget > 0 and wi + len(new) < queued and rc < max_seqs:
            i = wi + len(new)
            r = waiting[i] if i < n_wait else arrived[i - n_wait]
            if r.num_computed_tokens or (insort and (r.num_generated or (key is not None and _key(r) <= key))):
                stop = True              # re-admitted into the middle of the running order: step by step
                break
            reserve = watermark if rc or idle_reserve else 0
            need, must_fit = _admission_blocks(r, budget, rule, bs)
            if must_fit > f_step - reserve:
                break
            n = min(r.prompt_tokens + r.num_generated, budget)
            f_step -= need
            rc += 1
            entries.append((r, n, 0))
            new.append((r, need))
            budget -= n
            key = _key(r)
        if stop:
            break
        if pending is None and budget > 0 and rc < max_seqs and wi + len(new) == n_wait and horizon <= t:
            break                        # admission would reach a request that arrived during the stretch
        if not d and not entries:
            break
        if len(entries) <= 1:
            chunk, kctx = (entries[0][1], entries[0][2]) if entries else (0, 0)
            dur = price(d, S + j * d, j - heap_top(heap, alive) if d and longest else -1, chunk, kctx)
        elif price_many is not None:
            dur = price_many(d, S + j * d, j - heap_top(heap, alive) if d and longest else -1,
                             tuple([e[1] for e in entries]), tuple([e[2] for e in entries]))
        else:
            break
        t_end = t + dur
        if t_end >= na:
            if not spans:
                break
            na = next_arrival(t_end)
            if na == t_end:
                break                    # a step ending exactly at an arrival: left to the step-by-step engine
        # step j is taken
        t = t_end
        ends.append(t)
        durations.append(dur)
        free = f_step
        used.append(num_blocks - free)
        run_len.append(1)
        batch.append(d + len(entries))
        n_decode.append(d)
        n_prefill.append(budget_total - d - budget)     # (the tokens its prefills took from the budget)
        if tracked:
            ctx_sums.append(S + j * d)
            if entries:
                step_chunks[j] = (tuple([e[1] for e in entries]), tuple([e[2] for e in entries]))
        running_count, last_key = rc, key
        for r, need in new:
            admitted.append((r, j))
            partials.append([r, 0, need, r.prompt_tokens + r.num_generated])
            chunk_log[r.request_id] = []
            position[r.request_id] = next_position
            next_position += 1
        wi += len(new)
        still = []
        for p, (r, n, _) in zip(partials, entries):     # (the step's prefills are the first partials, in order)
            chunk_log[r.request_id].append((j, 1, n))
            p[1] += n
            if chunked:
                p[2] = -(-p[1] // bs)
            total = p[3]
            if p[1] < total:
                still.append(p)
                continue
            first_token[r.request_id] = j
            g = r.num_generated
            if g:                        # a recomputed request emits its next token: a TBT sample
                recompute_gaps.setdefault(j, []).append(t - r.token_times_s[-1])
            if g + 1 >= r.output_tokens:
                prefill_done.setdefault(j, []).append(r)
                held_of[r.request_id] = p[2]
            else:
                join(r, total - j - 1, j + 1, j + r.output_tokens - g - 1, p[2])
        still += partials[len(entries):]
        partials = still
        release(j)
        K = j + 1
    if K < 2:
        return False
    return {"kind": "admitting", "K": K, "ends": ends, "durations": durations, "starts": [now] + ends[:-1],
            "used": used, "run_len": run_len, "batch": batch, "n_decode": n_decode,
            "n_prefill": n_prefill, "members": members,
            "first_token": first_token, "prefill_done": prefill_done, "chunk_log": chunk_log,
            "admitted": admitted, "from_waiting": min(len(admitted), n_wait), "plan": plan, "free": free,
            "partials": [(p[0], p[2]) for p in partials], "position": position, "recompute_gaps": recompute_gaps,
            "ctx_sums": ctx_sums, "step_chunks": step_chunks}


def _admits_none(head, running: int, max_seqs: int, budget: int, free: int, rule: dict, bs: int, watermark: int,
                 arrivals_known: bool) -> bool:
    """Whether no request can be admitted in a decode-only step, nor in the ones after it while nothing finishes
    (the free blocks only shrink): no budget or slot left, or the waiting ``head`` does not fit; with nothing
    waiting, only if arrivals are known in advance (the steps then stop at the next one)."""
    if budget <= 0 or running >= max_seqs:
        return True
    if head is None:
        return arrivals_known
    if head.num_computed_tokens or (head.num_generated and rule["insort"]):
        return False
    reserve = watermark if running or rule["reserve_when_idle"] else 0
    return _admission_blocks(head, budget, rule, bs)[1] > free - reserve


def _admission_blocks(r, budget: int, rule: dict, bs: int) -> tuple[int, int]:
    """``(blocks admitting r allocates, free blocks it needs)`` with ``budget`` tokens left in the step: its first
    chunk's slots (and, if the whole prompt must fit, that many free) or its prompt's (or the reservation's)."""
    total = r.prompt_tokens + r.num_generated
    if rule["blocks_per_chunk"]:
        need = -(-min(total, budget) // bs)
        return need, (-(-total // bs) if rule["full_must_fit"] else need)
    need = -(-(rule["reserve_tokens"] or total) // bs)
    return need, need


def heap_top(heap: list, alive: list) -> int:
    """The smallest value of a heap of ``(value, index)`` whose dead entries (``alive[index]`` False) are popped."""
    while not alive[heap[0][1]]:
        heapq.heappop(heap)
    return heap[0][0]


def _requests_to(s: dict, tokens_upto: int, scheduled_upto: int) -> None:
    """Set the stretch's requests as the steps up to ``tokens_upto`` left them (their tokens, first-token and
    completion times), with the admissions up to ``scheduled_upto`` scheduled."""
    ends, starts, ends_array = s["ends"], s["starts"], s["ends_array"]
    for r, a in s["admitted"]:
        if a <= scheduled_upto and r.scheduled_s is None:     # (a request preempted in its prefill keeps its first)
            r.scheduled_s = starts[a]
    first_token = s["first_token"]
    computed0 = s["computed0"]
    for rid, log in s["chunk_log"].items():
        r = s["by_id"][rid]
        computed = computed0[rid]
        for j, k, n in log:              # (steps 1 .. tokens_upto of each run of chunks)
            lo, hi = (j if j > 0 else 1), (j + k - 1 if j + k - 1 < tokens_upto else tokens_upto)
            if hi >= lo:
                computed += (hi - lo + 1) * n
        r.num_computed_tokens = computed
        e = first_token.get(rid)
        if e is not None and e <= tokens_upto:
            r.num_generated += 1
            r.token_times_s.append(ends[e])
            if r.first_token_s is None:
                r.first_token_s = ends[e]
            if r.num_generated >= r.output_tokens:
                r.completion_s = ends[e]
    step_bytes = memoryview(ends_array).cast("B")    # (an engine's array takes its slice's bytes: one copy)
    for r, base, first, last, _, _ in s["members"]:
        top = last if last < tokens_upto else tokens_upto
        if top < first:
            continue
        times = r.token_times_s
        if type(times) is array and times.typecode == "d":
            times.frombytes(step_bytes[8 * first:8 * top + 8])
        else:
            times.extend(ends_array[first:top + 1])
        r.num_generated += top - first + 1
        r.num_computed_tokens = base + top + 1
        if last <= tokens_upto:
            r.completion_s = ends[last]
    for r in s["by_id"].values():
        r.in_flight = False


def apply_admitting(replica, s: dict) -> list:
    """Apply a planned admitting stretch to the requests, the scheduler's queues, the KV cache, the iteration log and
    the recorder; return the completions as ``[(step, [requests])]`` in step order and, within a step, in the order
    the step-by-step engine reports them (its decodes in running order, then the requests its prefills finished)."""
    sched, kv, log = replica.scheduler, replica.scheduler.kv, replica.log
    plan, K, ends = s["plan"], s["K"], s["ends"]
    by_id = {r.request_id: r for r in sched.running}
    for r, _ in s["admitted"]:
        by_id[r.request_id] = r
    s["by_id"] = by_id
    s["ends_array"] = array("d", ends)   # (requests' token times are slices of it: copied, not unboxed)
    runs = unboxed(s["run_len"], np.int64)   # the steps' batch sizes and tokens, from their runs
    steps = {k: np.repeat(unboxed(s[k], np.int64), runs) for k in ("batch", "n_decode", "n_prefill")}
    recorder = replica.recorder
    if replica.on_iteration is not None or (recorder is not None and recorder.on_finish is not None):
        # a hook or a completion callback may stop the run inside the stretch, and the run is then measured
        # (rollback_admitting); without one an exception only aborts it
        s["snapshot"] = [(r, r.num_computed_tokens, r.num_generated, len(r.token_times_s), r.scheduled_s,
                          r.first_token_s, r.completion_s) for r in by_id.values()]
    s["computed0"] = {rid: by_id[rid].num_computed_tokens for rid in s["chunk_log"]}
    if recorder is not None:             # TBT samples, as Scheduler.update counts them step by step
        e0 = ends[0]
        d0 = plan.num_decodes
        # step 0: its decodes by their previous token (plan order)
        gaps = Counter([e0 - times[-1] for times in [by_id[rid].token_times_s for rid in plan.request_ids[:d0]]
                        if times])
        for rid in plan.request_ids[d0:]:    # and a recomputing prefill that emits
            r = by_id[rid]
            if r.token_times_s and r.num_computed_tokens == r.prompt_tokens + r.num_generated:
                g = e0 - r.token_times_s[-1]
                gaps[g] = gaps.get(g, 0) + 1
        extra = s["recompute_gaps"]
        base = recorder.num_gap_pairs
        recorder.add_gaps(gaps)
        if extra or K < 32:
            n_decode = steps["n_decode"].tolist()
            values, counts = [], []      # later steps: the decodes' one gap, then any recomputed prefill's
            pair_steps, per_step = [], []
            for j in range(1, K):
                if j in extra:
                    step: dict = {ends[j] - ends[j - 1]: n_decode[j]} if n_decode[j] else {}
                    for g in extra[j]:
                        step[g] = step.get(g, 0) + 1
                    values.extend(step)
                    counts.extend(step.values())
                    pair_steps.append(j)
                    per_step.append(len(step))
                elif n_decode[j]:
                    values.append(ends[j] - ends[j - 1])
                    counts.append(n_decode[j])
                    pair_steps.append(j)
                    per_step.append(1)
            recorder.add_gap_arrays(values, counts)
        else:                            # the same pairs, one per step with decodes, from arrays
            decodes = steps["n_decode"][1:]
            pair_steps = np.flatnonzero(decodes) + 1
            times = np.frombuffer(s["ends_array"])
            pairs = np.empty((len(pair_steps), 2))
            np.subtract(times[pair_steps], times[pair_steps - 1], out=pairs[:, 0])
            pairs[:, 1] = decodes[pair_steps - 1]
            recorder.add_gap_pairs(pairs)
            per_step = None
        # (for rollback_admitting: the pairs before the stretch, step 0's, and the later ones' steps and numbers)
        s["gap_mark"] = (base, len(gaps), pair_steps, per_step)
    _requests_to(s, K - 1, K - 1)
    # completions, in the order of each step's report
    done_at: dict[int, list] = {}
    for r, _, _, last, _, _ in s["members"]:
        if last < K:
            done_at.setdefault(last, []).append(r)
    position = s["position"]
    for j, rs in done_at.items():
        if len(rs) > 1:
            rs.sort(key=lambda r: position[r.request_id])
    for j, rs in s["prefill_done"].items():
        done_at.setdefault(j, []).extend(rs)
    finished = set()
    for rs in done_at.values():
        for r in rs:
            finished.add(r.request_id)
    # the queues and the KV cache as the steps leave them
    for _ in range(s["from_waiting"]):
        sched.waiting.popleft()
    requests = sched.requests
    for r, _ in s["admitted"][s["from_waiting"]:]:     # admitted before they arrive (Replica.add, at their
        requests[r.request_id] = r                      # arrival, then only sets their replica)
        sched.pre_admitted.add(r.request_id)
    if replica.take_arrivals is not None:
        replica.take_arrivals()
    for rid in finished:
        kv.free(by_id[rid])
        del requests[rid]
    running = [r for r in sched.running if r.request_id not in finished]
    for r, _ in s["admitted"]:
        if r.request_id not in finished:
            running.append(r)
    bs = kv.block_size
    for r, held in s["partials"]:        # still prefilling: the blocks its chunks (or its admission) took
        kv.allocate(r, held * bs)
    capacity = kv.capacity
    grown = []
    for r, base, first, last, _, held0 in s["members"]:
        if last >= K:
            need = base + K if first < K else 0      # decoding at the last step: a slot for that token
            if held0 * bs > need:
                need = held0 * bs
            if need > capacity.get(r.request_id, 0):
                grown.append((r, need))
    kv.allocate_many(grown)
    sched.running = running
    assert kv.num_free == s["free"], "fast-forward with admissions: KV blocks out of step"
    # iteration rows, busy time
    starts = s["starts"]
    durations = unboxed(s["durations"])
    if log.sink is not None and not log.multi:      # streamed: as arrays (the starts are the step ends' bytes)
        start_s = np.empty(K)
        start_s[0] = starts[0]
        start_s[1:] = np.frombuffer(s["ends_array"])[:-1]
        log.append_block({"start_s": start_s, "duration_s": durations,
                          "batch_size": steps["batch"], "num_prefill_tokens": steps["n_prefill"],
                          "num_decode_tokens": steps["n_decode"],
                          "kv_blocks_used": unboxed(s["used"], np.int64),
                          "kv_blocks_total": np.full(K, kv.num_blocks, dtype=np.int64),
                          "replica_id": np.full(K, replica.replica_id, dtype=np.int64)})
    else:
        log.start_s.extend(starts)
        log.duration_s.extend(s["durations"])
        log.batch_size.extend(steps["batch"].tolist())
        log.num_decode_tokens.extend(steps["n_decode"].tolist())
        log.num_prefill_tokens.extend(steps["n_prefill"].tolist())
        log.kv_blocks_used.extend(s["used"])
        log.kv_blocks_total.extend([kv.num_blocks] * K)
        log.replica_id.extend([replica.replica_id] * K)
        log.scheduled_s.extend(starts)
    busy = np.empty(K + 1)               # the busy time plus each step's, in step order (as the clock adds them:
    busy[0] = replica.stage_busy_s[0]    # a cumulative sum adds in order, unlike a sum's pairwise reduction)
    busy[1:] = durations
    replica.stage_busy_s[0] = float(np.cumsum(busy, out=busy)[-1])
    replica.num_iterations += K
    cm = replica.cost_model
    if getattr(cm, "tracker", None) is not None:     # in step order: step 0's plan, then chunks or decode runs
        cm.tracker.add(cm.outside(plan))
        n_decode, ctx_sums, step_chunks = steps["n_decode"].tolist(), s["ctx_sums"], s["step_chunks"]
        j = 1
        while j < K:
            if j in step_chunks:
                chunks, cached = step_chunks[j]
                cm.tracker.add(cm.outside_counts(n_decode[j], ctx_sums[j], chunks, cached))
                j += 1
                continue
            k = j
            while k < K and k not in step_chunks:
                k += 1
            cm.track_decodes(n_decode[j:k], ctx_sums[j:k])
            j = k
    log.maybe_flush()
    return [(j, done_at[j]) for j in sorted(done_at)]


def rollback_admitting(replica, s: dict, upto: int, launched: int) -> None:
    """Undo what an applied admitting stretch did after step ``upto`` to its requests and the recorder's TBT samples,
    the admissions of steps up to ``launched`` kept (a hook raised as step ``launched`` was launched, or a
    completion callback as step ``upto`` reported), so that the stopped run reports what the step-by-step engine
    would have measured. The scheduler, the KV cache and the iteration rows are left as they are. Nothing is
    undone for a run without a hook or a completion callback (``apply_admitting`` took no snapshot): an exception
    there aborts it, and nothing measures it afterwards."""
    if "snapshot" not in s:
        return
    for r, computed, generated, n_times, scheduled, first, completion in s["snapshot"]:
        r.num_computed_tokens, r.num_generated = computed, generated
        del r.token_times_s[n_times:]
        r.scheduled_s, r.first_token_s, r.completion_s = scheduled, first, completion
    _requests_to(s, upto, launched)
    recorder = replica.recorder
    if recorder is not None:
        base, step0, pair_steps, per_step = s["gap_mark"]
        if upto < 0:
            keep = base
        else:
            upto_pairs = bisect_right(pair_steps, upto)      # (the steps are in order)
            keep = base + step0 + (upto_pairs if per_step is None else sum(per_step[:upto_pairs]))
        recorder.truncate_gaps(keep)
