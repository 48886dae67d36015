"""One replica on a shared SimPy clock: its scheduler forms micro-batches, its pipeline stages run them.

The engine step is schedule -> run -> apply (nano-vllm's ``LLMEngine.step``): ``plan = scheduler.schedule(now)``,
the micro-batch runs through the ``pp`` pipeline stages, and when it leaves the last stage its tokens are emitted
(``scheduler.update(plan, now)``). A replica keeps up to ``pp`` micro-batches in flight (Vidur's replica scheduler
keeps ``num_running_batches < num_stages``; vLLM v1's engine core fills a batch queue of ``pp`` entries), and forms
the next one when the first stage is free to start it — as the Sarathi-Serve engine does, which schedules when the
first stage signals the end of a micro-batch (``sarathi/engine/pipeline_parallel_llm_engine.py``
``_microbatch_watch_loop``) — so requests that arrive meanwhile can join it: whenever fewer than ``pp`` are in
flight, stage 0 is idle, and a request arrives, stage 0 finishes a micro-batch or a micro-batch completes.

Each stage runs one micro-batch at a time, in the order they were formed (FIFO): micro-batch ``m`` starts on stage
``s`` at ``max(its end on stage s-1 + the activation transfer, the end of micro-batch m-1 on stage s)`` and is busy
for ``cost_model.stage_time(plan, s)``; the transfer to stage ``s+1`` takes ``cost_model.transfer_time(plan, s)``
and does not occupy either stage. Because stages are FIFO and never preempted, these times are known when the
micro-batch is formed, so one timeout per micro-batch replaces a process per stage — the same schedule a
``simpy.Resource`` per stage would give, at a fraction of the cost. Bubbles follow from uneven micro-batches. With
``pp = 1`` this is the classic loop: schedule, ``yield env.timeout(iteration_time)``, apply.

Nothing here reads a wall clock; each simulation owns its environment, replicas and schedulers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import math

import numpy as np
import simpy

from cost_models.plan import BatchPlan
from simulator.fast_forward import apply_stretch, exact_delay, plan_stretch, rollback_stretch, step_plan
from simulator.fast_forward_admissions import apply_admitting, plan_admitting, rollback_admitting
from simulator.output import unboxed


class StalledError(RuntimeError):
    """The scheduler returned an empty plan although requests are waiting and nothing is running."""


@dataclass
class IterationLog:
    """Columns of the iterations table (one entry per micro-batch), and optionally the plans themselves.

    ``start_s`` is when the micro-batch started on the first stage, ``duration_s`` until it left the last one;
    ``scheduled_s`` when it was formed. With ``pp`` > 1, ``stage_start_s[s]``/``stage_duration_s[s]`` hold each
    stage's timing.
    """

    start_s: list = field(default_factory=list)
    duration_s: list = field(default_factory=list)
    batch_size: list = field(default_factory=list)
    num_prefill_tokens: list = field(default_factory=list)
    num_decode_tokens: list = field(default_factory=list)
    kv_blocks_used: list = field(default_factory=list)
    kv_blocks_total: list = field(default_factory=list)
    replica_id: list = field(default_factory=list)
    scheduled_s: list = field(default_factory=list)
    stage_start_s: list = field(default_factory=list)      # per stage: list of starts
    stage_duration_s: list = field(default_factory=list)   # per stage: list of durations
    plans: list | None = None
    plan_times: list = field(default_factory=list)   # with plans: (start_s, duration_s, replica_id) per plan, kept
    sink: object = None             # an output.ChunkWriter: rows are flushed to it in chunks of FLUSH
    replica_ids: bool = False       # write replica_id (a cluster)
    multi: bool = False             # several replicas append: rows are ordered (``order_rows``) when the run ends
    _done: int = 0                  # rows folded into the statistics
    _flushed: int = 0               # rows flushed to the sink (no longer in the lists)
    _utils: list = field(default_factory=list)     # KV utilizations of flushed rows not yet folded (arrays)
    # with a sink: rows given as arrays (``append_block``), older than the lists' rows, waiting to be flushed
    _blocks: list = field(default_factory=list)
    _block_rows: int = 0
    _util_sum: float = 0.0
    _util_max: float | None = None

    CHUNK = 65536                   # rows the statistics fold at once (their sums are these chunks' sums)
    FLUSH = 16384                   # rows written to the sink at once (what the lists hold, at most, beyond)
    BASE = ("start_s", "duration_s", "batch_size", "num_prefill_tokens", "num_decode_tokens", "kv_blocks_used",
            "kv_blocks_total")

    def columns(self, *, replica_ids: bool = False) -> dict:
        """The table's columns: the base ones, then ``replica_id`` and ``scheduled_s`` (when asked or pp > 1) and
        ``stage{s}_start_s``/``stage{s}_duration_s`` per stage when pp > 1."""
        cols = {k: getattr(self, k) for k in self.BASE}
        pipelined = len(self.stage_start_s) > 1
        if replica_ids or pipelined:
            cols["replica_id"] = self.replica_id
        if pipelined:
            cols["scheduled_s"] = self.scheduled_s
            for s, (starts, durations) in enumerate(zip(self.stage_start_s, self.stage_duration_s)):
                cols[f"stage{s}_start_s"] = starts
                cols[f"stage{s}_duration_s"] = durations
        return cols

    def __len__(self) -> int:
        return self._flushed + self._block_rows + len(self.start_s)

    def append_block(self, cols: dict) -> None:
        """Append rows given as arrays (one per column of ``columns()`` with ``replica_ids``, float64 for times,
        int64 otherwise), to be flushed to the sink as they are: a fast-forwarded stretch's steps, without a
        Python number per field. Only with a sink, one replica and one stage; rows in the lists come first."""
        if self.start_s:
            n = len(self.start_s)
            self._blocks.append(self._take_lists(n))
            self._block_rows += n
        self._blocks.append(cols)
        self._block_rows += len(cols["start_s"])

    def _take_lists(self, n: int) -> dict:
        """The first ``n`` rows of the lists as arrays (dropped from the lists)."""
        cols = {k: unboxed(v[:n], np.float64 if k.endswith("_s") else np.int64)
                for k, v in self.columns(replica_ids=True).items()}
        for name in (*self.BASE, "replica_id", "scheduled_s"):     # rows past ``n`` stay (a stretch may append
            del getattr(self, name)[:n]                             # past a chunk's end)
        for lst in self.stage_start_s + self.stage_duration_s:
            del lst[:n]
        return cols

    def _list_utils(self, lo: int, hi: int) -> np.ndarray:
        """KV-cache utilization of the rows at list positions ``lo .. hi - 1``."""
        return np.asarray(self.kv_blocks_used[lo:hi], dtype=float) / \
            np.asarray(self.kv_blocks_total[lo:hi], dtype=float)

    def _flush(self, n: int) -> None:
        """Write the first ``n`` rows (the blocks', then the lists') to the sink and drop them (their utilizations
        are kept for the statistics)."""
        names = list(self.columns(replica_ids=self.replica_ids))
        parts, left = [], n
        while left and self._blocks:     # the blocks first (older), then the lists
            block = self._blocks[0]
            m = len(block["start_s"])
            if m > left:
                parts.append({k: v[:left] for k, v in block.items()})
                self._blocks[0] = {k: v[left:] for k, v in block.items()}
                m = left
            else:
                parts.append(self._blocks.pop(0))
            self._block_rows -= m
            left -= m
        if left:
            parts.append(self._take_lists(left))
        cols = {k: parts[0][k] if len(parts) == 1 else np.concatenate([p[k] for p in parts]) for k in names}
        self.sink.write(cols)
        self._utils.append(cols["kv_blocks_used"] / cols["kv_blocks_total"])
        self._flushed += n

    def _fold(self, count: int) -> None:
        """Fold the ``count`` rows after ``_done`` into the statistics (flushed rows, with a sink)."""
        if count <= 0:
            return
        if self.sink is not None:
            util = np.concatenate(self._utils) if len(self._utils) > 1 else self._utils[0]
            util, rest = util[:count], util[count:]
            self._utils = [rest] if len(rest) else []
        else:
            util = self._list_utils(self._done, self._done + count)
        if util.size:
            self._util_sum += float(util.sum())
            m = float(util.max())
            self._util_max = m if self._util_max is None else max(self._util_max, m)
        self._done += count

    def order_rows(self) -> None:
        """Put the rows of several replicas in time order: by ``scheduled_s``, then ``replica_id`` (stable, so each
        replica's own order stays) — the order does not depend on how the replicas' events interleaved."""
        order = np.lexsort((np.asarray(self.replica_id), np.asarray(self.scheduled_s, dtype=float))).tolist()
        for name in (*self.BASE, "replica_id", "scheduled_s"):
            col = getattr(self, name)
            col[:] = [col[i] for i in order]
        for lst in self.stage_start_s + self.stage_duration_s:
            lst[:] = [lst[i] for i in order]
        if self.plans is not None:
            self.plans[:] = [self.plans[i] for i in order]
            self.plan_times[:] = [self.plan_times[i] for i in order]

    def maybe_flush(self, *, everything: bool = False) -> None:
        """Flush every complete piece of FLUSH rows to the sink (``everything``: all rows) and fold every complete
        chunk of CHUNK rows into the statistics: statistics are chunked the same way with or without a sink, so a
        streamed run and a kept one give identical numbers. Rows of several replicas wait for the end of the run
        (``order_rows``)."""
        if self.multi:
            return
        if self.sink is not None:
            piece = min(self.FLUSH, self.CHUNK)
            while self._block_rows + len(self.start_s) >= piece:
                self._flush(piece)
            if everything and self._block_rows + len(self.start_s):
                self._flush(self._block_rows + len(self.start_s))
            ready = self._flushed
        else:
            ready = len(self.start_s)
        while ready - self._done >= self.CHUNK:
            self._fold(self.CHUNK)

    def stats(self) -> dict:
        """``num_iterations`` and the KV-cache utilization (blocks used / total after each micro-batch's
        allocations): mean and max. Flushes every row to the sink."""
        if self.multi:
            self.order_rows()
            self.multi = False
        self.maybe_flush(everything=True)
        self._fold(len(self) - self._done)
        n = self._done
        return {"num_iterations": n, "kv_util_mean": self._util_sum / n if n else None,
                "kv_util_max": self._util_max}


class Replica:
    """A replica: a scheduler, a cost model and ``pp`` pipeline stages on the environment ``env``.

    Args:
        env: the shared ``simpy.Environment``.
        scheduler: the replica's policy (owns its KV cache).
        cost_model: prices ``stage_time``/``transfer_time``/``iteration_time`` of a plan (``cost_model.pp`` stages).
        replica_id: index in the cluster (for outputs).
        log: where iteration rows go (shared by the replicas of a cluster, or the replica's own).
        on_iteration: ``on_iteration(plan, start_s, duration_s)`` after each micro-batch is priced (a hook with
            ``reads_plan = False`` gets None for the plan of a fast-forwarded step, which is then not built).
        on_done: ``on_done(replica, requests)`` with the requests each micro-batch finished here.
    Raises StalledError from the process if the scheduler can make no progress (instead of looping forever).
    """

    def __init__(self, env: simpy.Environment, scheduler, cost_model, *, replica_id: int = 0,
                 log: IterationLog | None = None, on_iteration=None, on_done=None):
        self.env = env
        self.scheduler = scheduler
        self.cost_model = cost_model
        self.pp = getattr(cost_model, "pp", 1)
        self.replica_id = replica_id
        self.log = log if log is not None else IterationLog()
        if self.pp > 1 and not self.log.stage_start_s:
            self.log.stage_start_s = [[] for _ in range(self.pp)]
            self.log.stage_duration_s = [[] for _ in range(self.pp)]
        self.on_iteration = on_iteration
        self.on_done = on_done
        self.recorder = None            # a recorder.Recorder counting TBT samples, if any
        self.fast_forward = False       # advance quiet decode stretches at once (simulator.fast_forward)
        self.horizon = lambda: math.inf  # time of the next external event (arrival) the replica must stop for
        self.stop_at_completion = False  # closed loop: a completion sends the next request
        #: nothing reads this replica's state at an arrival (its pool's only replica: the router has no choice, and
        #: the scheduler only queues the request), so a stretch may take the step in flight at the arrival too
        self.spans_arrivals = False
        #: with ``spans_arrivals``: ``next_arrival_from(t)``, the earliest arrival at or after ``t`` of a request not
        #: yet arrived (a stretch with admissions leaves a step ending exactly then to the step-by-step engine);
        #: None if not known in advance
        self.next_arrival_from = None
        #: with ``next_arrival_from``: ``pending_arrival(i)``, the ``i``-th request not yet arrived (in arrival order),
        #: or None; a stretch may admit one that arrives before a step (``Scheduler.add_request`` then skips it)
        self.pending_arrival = None
        #: a stretch's completions may be reported (one ``on_done``, in step order) as it is applied, before the
        #: clock reaches them, and the clock then moved to its end at once: nothing ``on_done`` calls reads the
        #: clock or may stop the run, and no other replica's events can fall between (set by the cluster for a lone
        #: open-loop replica whose completions only go to the recorder and, perhaps, a progress bar)
        self.completions_at_once = False
        #: with ``completions_at_once`` and no hook: ``take_arrivals()`` takes the arrivals a stretch admitted ahead
        #: of them as it is applied (one event instead of one per request), or None
        self.take_arrivals = None
        self.stage_free_s = [0.0] * self.pp
        self.stage_busy_s = [0.0] * self.pp
        self.num_in_flight = 0
        self.stage0_idle = True
        self.num_iterations = 0
        self.closed = False
        self._wakeup = None
        self._preempted: tuple = ()     # preemptions of empty plans, reported with the next micro-batch
        self.process = env.process(self._run())

    # --- inputs -----------------------------------------------------------------------------------------------
    def add(self, request) -> bool:
        """A request arrives now; False if the scheduler rejected it."""
        request.replica_id = self.replica_id if request.replica_id is None else request.replica_id
        ok = self.scheduler.add_request(request)
        self._wake()
        return ok

    def close(self) -> None:
        """No more requests will arrive: the process ends once the replica is idle."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()

    # --- the engine -------------------------------------------------------------------------------------------
    def _record(self, plan: BatchPlan, start: float, duration: float, now: float) -> None:
        log, kv = self.log, self.scheduler.kv
        log.start_s.append(start)
        log.duration_s.append(duration)
        log.batch_size.append(len(plan.request_ids))
        log.num_decode_tokens.append(plan.num_decodes)
        log.num_prefill_tokens.append(plan.num_prefill_tokens)
        log.kv_blocks_used.append(kv.num_used)
        log.kv_blocks_total.append(kv.num_blocks)
        log.replica_id.append(self.replica_id)
        log.scheduled_s.append(now)
        if log.plans is not None:
            log.plans.append(plan)
            log.plan_times.append((start, duration, self.replica_id))
        tracker = getattr(self.cost_model, "tracker", None)
        if tracker is not None:                 # a fitted model counts the shapes beyond its profile
            tracker.add(self.cost_model.outside(plan))
        self.num_iterations += 1
        if len(log.start_s) >= log.FLUSH:
            log.maybe_flush()
        if self.on_iteration is not None:
            self.on_iteration(plan, start, duration)

    def _launch(self, plan: BatchPlan) -> float:
        """Place ``plan`` on the stages (FIFO); return when it leaves the last stage."""
        cm, now = self.cost_model, self.env.now
        t = now
        starts, durations = [], []
        for s in range(self.pp):
            start = t if t > self.stage_free_s[s] else self.stage_free_s[s]
            d = cm.stage_time(plan, s)
            end = start + d
            self.stage_free_s[s] = end
            self.stage_busy_s[s] += d
            starts.append(start)
            durations.append(d)
            t = end + cm.transfer_time(plan, s) if s < self.pp - 1 else end
        for s in range(self.pp):
            self.log.stage_start_s[s].append(starts[s])
            self.log.stage_duration_s[s].append(durations[s])
        self._record(plan, starts[0], t - starts[0], now)
        self.stage0_idle = False
        freed = self.env.timeout(starts[0] + durations[0] - now)
        freed.callbacks.append(self._stage0_freed)
        return t

    def _stage0_freed(self, _event) -> None:
        self.stage0_idle = True
        self._wake()

    def _apply(self, plan: BatchPlan) -> list:
        """Apply a finished micro-batch; its TBT samples go to the recorder."""
        if self.recorder is None:
            return self.scheduler.update(plan, self.env.now)
        gaps: dict = {}
        done = self.scheduler.update(plan, self.env.now, gaps)
        if gaps:
            self.recorder.add_gaps(gaps)
        return done

    def _complete(self, plan: BatchPlan) -> None:
        done = self._apply(plan)
        self.num_in_flight -= 1
        if done and self.on_done is not None:
            self.on_done(self, done)
        self._wake()

    def _stalled(self) -> StalledError:
        s = self.scheduler
        return StalledError(f"{s.name}: empty batch at t={self.env.now:.3f}s with {len(s.waiting)} waiting "
                            f"and {len(s.running)} running requests (replica {self.replica_id})")

    def _schedule(self) -> BatchPlan:
        """The scheduler's next plan; preemptions made while forming empty plans ride on the next non-empty one."""
        plan = self.scheduler.schedule(self.env.now)
        if not plan:
            if plan.preempted_ids:
                self._preempted += plan.preempted_ids
        elif self._preempted:
            plan = replace(plan, preempted_ids=self._preempted + plan.preempted_ids)
            self._preempted = ()
        return plan

    def _advance(self, durations, ends, i: int, j: int):
        """Move the clock from the end of stretch step ``i`` (-1: its start) to the end of step ``j``."""
        if j <= i:
            return
        d = exact_delay(self.env.now, ends[j])
        if d is not None:
            yield self.env.timeout(d)
            return
        for k in range(i + 1, j + 1):
            yield self.env.timeout(durations[k])

    def _stretch(self, plan: BatchPlan, first_s: float):
        """Fast-forward the quiet stretch starting at ``plan`` (``first_s``: its duration; see
        ``simulator.fast_forward``); True if it ran."""
        hook, at = self.on_iteration, -1
        plans = hook is not None and getattr(hook, "reads_plan", True)
        s = None
        if self.scheduler.waiting or self.pending_arrival is not None:
            s = plan_admitting(self, plan, first_s, plans)
        if s is False:
            return False
        admitting = s is not None
        if admitting:
            completions = dict(apply_admitting(self, s))
            undo = lambda upto, launched: rollback_admitting(self, s, upto, launched)    # noqa: E731
        else:
            s = plan_stretch(self, plan, self.horizon(), self.stop_at_completion, first_s)
            if s is None:
                return False
            completions = dict(apply_stretch(self, plan, s))
            undo = lambda upto, launched: rollback_stretch(self, s, upto)                # noqa: E731
        ends, durations, starts = s["ends"], s["durations"], s["starts"]
        if hook is None and self.completions_at_once:    # reported at once, in step order, the clock moved once
            if completions:
                last = max(completions)
                try:
                    self.on_done(self, [r for j in sorted(completions) for r in completions[j]])
                except BaseException:
                    undo(last, last)
                    raise
            yield from self._advance(durations, ends, -1, len(ends) - 1)
            return True
        for j in range(len(ends)) if hook is not None else sorted(completions):
            if hook is not None:
                if admitting and at < j - 1 and self.horizon() < starts[j]:   # an arrival before step j comes
                    yield from self._advance(durations, ends, at, j - 1)      # before the hook sees it
                    at = j - 1
                try:
                    hook(step_plan(s, j) if plans else None, starts[j], durations[j])
                except BaseException:        # the run stops at step j's launch: steps before it are done
                    undo(j - 1, j)
                    raise
            done = completions.get(j)
            if done:
                yield from self._advance(durations, ends, at, j)
                at = j
                if self.on_done is not None:
                    try:
                        self.on_done(self, done)
                    except BaseException:    # the run stops as step j's completions are reported
                        undo(j, j)
                        raise
        yield from self._advance(durations, ends, at, len(ends) - 1)
        return True

    def _run(self):
        env, scheduler = self.env, self.scheduler
        if self.pp == 1:
            cm = self.cost_model
            while True:
                plan = self._schedule()
                if plan:
                    duration = cm.iteration_time(plan)
                    if self.fast_forward and self.log.plans is None and \
                            (yield from self._stretch(plan, duration)):
                        continue
                    start = env.now
                    self.stage_busy_s[0] += duration
                    self._record(plan, start, duration, start)
                    yield env.timeout(duration)
                    done = self._apply(plan)
                    if done and self.on_done is not None:
                        self.on_done(self, done)
                    continue
                if scheduler.running or (scheduler.waiting and not plan.preempted_ids):
                    raise self._stalled()
                if scheduler.waiting:        # everything was preempted this step: try again
                    continue
                if self.closed:
                    return
                self._wakeup = env.event()
                yield self._wakeup
        while True:
            while self.num_in_flight < self.pp and self.stage0_idle:
                plan = self._schedule()
                if not plan:
                    if plan.preempted_ids and scheduler.waiting:
                        continue
                    break
                self.num_in_flight += 1
                ends = self._launch(plan)
                done = env.timeout(ends - env.now)
                done.callbacks.append(lambda _, p=plan: self._complete(p))
            if self.num_in_flight == 0:
                if scheduler.has_work():
                    raise self._stalled()
                if self.closed:
                    return
            self._wakeup = env.event()
            yield self._wakeup

    # --- load, for routers ----------------------------------------------------------------------------------
    def busy_fractions(self, makespan_s: float) -> list[float]:
        """Per stage: busy time / ``makespan_s``."""
        return [b / makespan_s if makespan_s > 0 else 0.0 for b in self.stage_busy_s]


def run_replica(requests, scheduler, cost_model, *, record_plans: bool = False, on_iteration=None, on_finish=None,
                until_s: float | None = None) -> IterationLog:
    """Replay ``requests`` (sorted by ``arrival_s``) through one replica on its own environment.

    Args:
        on_iteration: called as ``on_iteration(plan, start_s, duration_s)`` after each micro-batch is priced.
        on_finish: called with the list of requests each micro-batch completed (e.g. to drive a progress bar).
        until_s: stop the simulated clock here (requests not finished by then stay unfinished).
    Returns the iteration log; requests are updated in place (timestamps, token times, preemptions).
    Raises StalledError if the scheduler can make no progress.
    """
    env = simpy.Environment()
    log = IterationLog(plans=[] if record_plans else None)
    replica = Replica(env, scheduler, cost_model, log=log, on_iteration=on_iteration,
                      on_done=(lambda _, done: on_finish(done)) if on_finish is not None else None)

    def arrivals():
        for r in requests:
            if r.arrival_s > env.now:
                yield env.timeout(r.arrival_s - env.now)
            replica.add(r)
        replica.close()

    env.process(arrivals())
    env.run(until=replica.process if until_s is None else until_s)
    return log
