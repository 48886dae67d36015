"""One replica as a SimPy process: ``plan = scheduler.schedule(now)``, ``yield env.timeout(cost(plan))``, apply.

The GPU is not a ``simpy.Resource``: the scheduler decides the batch, the cost model how long it takes. Each call of
``run_replica`` owns its ``simpy.Environment``, so many simulations run side by side in one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from simulator.plan import BatchPlan
from simulator.request import Request


@dataclass
class IterationLog:
    """Columns of the iterations table (one entry per iteration), and optionally the plans themselves."""

    start_s: list = field(default_factory=list)
    duration_s: list = field(default_factory=list)
    batch_size: list = field(default_factory=list)
    num_prefill_tokens: list = field(default_factory=list)
    num_decode_tokens: list = field(default_factory=list)
    kv_blocks_used: list = field(default_factory=list)
    kv_blocks_total: list = field(default_factory=list)
    plans: list | None = None

    def columns(self) -> dict:
        return {k: getattr(self, k) for k in ("start_s", "duration_s", "batch_size", "num_prefill_tokens",
                                              "num_decode_tokens", "kv_blocks_used", "kv_blocks_total")}


class StalledError(RuntimeError):
    """The scheduler returned an empty plan although requests are waiting and nothing is running."""


def run_replica(requests: list[Request], scheduler, cost_model, *, record_plans: bool = False,
                on_iteration=None, on_finish=None, until_s: float | None = None) -> IterationLog:
    """Replay ``requests`` (sorted by ``arrival_s``) through ``scheduler`` priced by ``cost_model``.

    Args:
        on_iteration: called as ``on_iteration(plan, start_s, duration_s)`` after each iteration's plan is priced.
        on_finish: called with the list of requests each iteration completed (e.g. to drive a progress bar).
        until_s: stop the simulated clock here (requests not finished by then stay unfinished).
    Returns the iteration log; requests are updated in place (timestamps, token times, preemptions).
    Raises StalledError if the scheduler can make no progress (instead of looping forever).
    """
    env = simpy.Environment()
    log = IterationLog(plans=[] if record_plans else None)
    state = {"wakeup": None, "arrived": 0}
    bm = scheduler.bm

    def arrivals():
        for r in requests:
            if r.arrival_s > env.now:
                yield env.timeout(r.arrival_s - env.now)
            scheduler.add_request(r)
            state["arrived"] += 1
            if state["wakeup"] is not None and not state["wakeup"].triggered:
                state["wakeup"].succeed()

    def engine():
        while True:
            plan: BatchPlan = scheduler.schedule(env.now)
            if not plan:
                if scheduler.running or (scheduler.waiting and not plan.preempted_ids):
                    raise StalledError(
                        f"{scheduler.name}: empty batch at t={env.now:.3f}s with {len(scheduler.waiting)} waiting "
                        f"and {len(scheduler.running)} running requests")
                if scheduler.waiting:        # everything was preempted this step: try again
                    continue
                if state["arrived"] == len(requests):
                    return
                state["wakeup"] = env.event()
                yield state["wakeup"]
                continue
            start = env.now
            duration = cost_model.iteration_time(plan)
            log.start_s.append(start)
            log.duration_s.append(duration)
            log.batch_size.append(len(plan.request_ids))
            log.num_decode_tokens.append(plan.num_decodes)
            log.num_prefill_tokens.append(plan.num_prefill_tokens)
            log.kv_blocks_used.append(bm.num_used)
            log.kv_blocks_total.append(bm.num_blocks)
            if log.plans is not None:
                log.plans.append(plan)
            if on_iteration is not None:
                on_iteration(plan, start, duration)
            yield env.timeout(duration)
            done = scheduler.finish(plan, env.now)
            if done and on_finish is not None:
                on_finish(done)

    env.process(arrivals())
    env.run(until=env.process(engine()) if until_s is None else until_s)
    return log
