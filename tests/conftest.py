"""Shared fixtures of the test suite.

Simulator-core fixtures: ``unit_cost`` (every iteration takes exactly 1 s, so hand-computed times are integers),
``make_requests`` (Requests from ``(arrival_s, prompt_tokens, output_tokens)`` tuples, ids 0..N-1) and ``replay``
(drive requests through a scheduler with ``run_replica`` and return the plans as plain tuples together with the
KV blocks in use at each iteration).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cost_models.base import ConstantCostModel
from simulator.replica import IterationLog, run_replica
from simulator.request import Request


@dataclass
class Replay:
    """The outcome of ``replay``: one entry per iteration, and the requests by id."""

    log: IterationLog
    requests: dict
    plans: list = field(default_factory=list)        # BatchPlan objects
    kv_used: list = field(default_factory=list)      # blocks in use when each iteration was priced

    def rows(self) -> list[tuple]:
        """Each plan as ``(request_ids, num_new_tokens, context_lens, kind)``."""
        return [(p.request_ids, p.num_new_tokens, p.context_lens, p.kind) for p in self.plans]

    def token_times(self) -> dict:
        return {rid: list(r.token_times_s) for rid, r in self.requests.items()}


@pytest.fixture
def unit_cost():
    """A cost model where every iteration takes exactly 1 s."""
    return ConstantCostModel(fixed_s=1.0)


@pytest.fixture
def make_requests():
    """``make_requests((arrival_s, prompt_tokens, output_tokens), ...)`` -> Requests with ids 0..N-1."""
    def make(*specs):
        return [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(specs)]
    return make


@pytest.fixture
def replay(unit_cost):
    """``replay(scheduler, requests, cost_model=None)`` runs one replica to the end and returns a ``Replay``."""
    def run(scheduler, requests, cost_model=None) -> Replay:
        kv_used = []

        def on_iteration(plan, start_s, duration_s):
            kv_used.append(scheduler.bm.num_used)

        log = run_replica(requests, scheduler, cost_model or unit_cost, record_plans=True,
                          on_iteration=on_iteration)
        return Replay(log, {r.request_id: r for r in requests}, list(log.plans), kv_used)
    return run
