"""How many replicas for a target QPS: the smallest N whose cluster meets the SLO at that rate.

Method: one replica's capacity ``c1`` (``find_capacity``) gives a first guess ``N = ceil(target / c1)``; then each
candidate N is checked by ONE trial of N replicas at the target QPS (``capacity.run_trial``, with ``N x
num_requests`` requests so each replica sees as many as the single-replica search did), going down while it passes
and up while it fails. N replicas behind round-robin usually meet the SLO at a little more than ``N x c1`` (round
robin smooths each replica's arrivals), so the first guess is rarely off by more than one.

Errors: ``CapacityError`` when the SLO is not met even by ``max_replicas``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from simulator.capacity import CapacityError, find_capacity, run_trial
from simulator.config import DEFAULT_NUM_REQUESTS, SimConfig


@dataclass
class ReplicaCount:
    """Result: ``replicas`` (smallest N meeting the SLO at ``target_qps``), the single-replica capacity and every
    check (``(N, met, trial)``) in the order it ran."""

    target_qps: float
    replicas: int
    gpus: int
    single_replica_capacity_qps: float
    checks: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"target_qps": self.target_qps, "replicas": self.replicas, "gpus": self.gpus,
                "single_replica_capacity_qps": self.single_replica_capacity_qps,
                "checks": [{"replicas": n, "met": met, "values": t.values, "stop_reason": t.stop_reason}
                           for n, met, t in self.checks]}


def find_replica_count(config: SimConfig, slo, target_qps: float, *, max_replicas: int = 64,
                       on_check=None, **search) -> ReplicaCount:
    """The smallest number of replicas of ``config`` meeting ``slo`` at ``target_qps`` (see the module doc).

    ``search`` goes to the single-replica ``find_capacity``; ``on_check(n, trial)`` is called after each check.
    """
    if not (target_qps > 0 and math.isfinite(target_qps)):
        raise CapacityError(f"target_qps: must be a positive finite number, got {target_qps!r}")
    single = config.with_(replicas=1)
    c1 = find_capacity(single, slo, **search).capacity_qps
    per_replica = config.num_requests or DEFAULT_NUM_REQUESTS
    checks, verdict = [], {}

    def check(n: int) -> bool:
        if n not in verdict:
            trial = run_trial(config.with_(replicas=n, num_requests=n * per_replica), slo, target_qps)
            verdict[n] = trial.met
            checks.append((n, trial.met, trial))
            if on_check is not None:
                on_check(n, trial)
        return verdict[n]

    n = max(1, math.ceil(target_qps / c1)) if c1 > 0 else 1
    n = min(n, max_replicas)
    if check(n):
        while n > 1 and check(n - 1):
            n -= 1
    else:
        while not check(n):
            if n >= max_replicas:
                raise CapacityError(f"max_replicas: {max_replicas} replicas do not meet the SLO at "
                                    f"{target_qps:g} QPS (one replica's capacity is {c1:.4g} QPS)")
            n += 1
    gpus_per_replica = config.tp * config.pp
    return ReplicaCount(float(target_qps), n, n * gpus_per_replica, c1, checks)
