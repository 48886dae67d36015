"""The cost-model protocol: the time in seconds of one iteration from its batch composition.

A plan is ``simulator.plan.BatchPlan`` (cost models only read its attributes, so nothing here imports the
simulator): aligned tuples ``request_ids``, ``num_new_tokens`` and ``context_lens`` with the first
``num_decodes`` entries decodes of one token each and the rest prefill chunks.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class CostModel(Protocol):
    """Prices one iteration of a replica.

    ``iteration_time(plan)`` returns seconds (> 0 for a non-empty plan). ``breakdown(plan)`` returns
    ``{operator_name: seconds}`` summed over all layers, whose values add up to ``iteration_time(plan)``.
    """

    def iteration_time(self, plan) -> float: ...

    def breakdown(self, plan) -> dict[str, float]: ...


class ConstantCostModel:
    """A simple model for tests and hand-computed schedules: ``fixed_s + per_token_s x num_tokens``
    (+ ``per_context_token_s`` x tokens attended). Units: seconds and tokens."""

    def __init__(self, fixed_s: float = 0.01, per_token_s: float = 0.0, per_context_token_s: float = 0.0):
        self.fixed_s = fixed_s
        self.per_token_s = per_token_s
        self.per_context_token_s = per_context_token_s

    def breakdown(self, plan) -> dict[str, float]:
        tokens = sum(plan.num_new_tokens)
        context = sum(plan.context_lens)
        return {"fixed": self.fixed_s, "tokens": self.per_token_s * tokens,
                "context": self.per_context_token_s * context}

    def iteration_time(self, plan) -> float:
        return sum(self.breakdown(plan).values())
