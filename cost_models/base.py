"""The cost-model protocol: the time in seconds of one micro-batch from its batch composition.

A plan is ``cost_models.plan.BatchPlan``: aligned tuples ``request_ids``, ``num_new_tokens`` and ``context_lens``
with the first ``num_decodes`` entries decodes of one token each and the rest prefill chunks.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class CostModel(Protocol):
    """Prices one micro-batch of a replica with ``pp`` pipeline stages (``pp`` = 1: one iteration).

    - ``stage_time(plan, stage)``: seconds stage ``stage`` (0-based) is busy with ``plan``;
    - ``transfer_time(plan, stage)``: seconds to send the activations from stage ``stage`` to ``stage + 1``;
    - ``iteration_time(plan)``: the micro-batch's latency, every stage plus every transfer (> 0 for a non-empty
      plan; with ``pp`` = 1, ``stage_time(plan, 0)``);
    - ``breakdown(plan)``: ``{operator_name: seconds}`` over all layers and stages, adding up to
      ``iteration_time(plan)``.

    Optional: ``step_time(d, ctx_sum, ctx_max, chunk=0, chunk_ctx=0)``, ``iteration_time`` (``pp`` = 1) bit for bit
    of ``d`` decodes whose contexts sum to ``ctx_sum`` (the longest ``ctx_max``) plus one prefill chunk of
    ``chunk`` tokens after ``chunk_ctx``, without a plan: ``simulator.fast_forward`` prices stretch steps with it;
    ``chunks_step_time(d, ctx_sum, ctx_max, chunks, chunk_ctxs)``, the same with several chunks in plan order
    (``simulator.fast_forward_admissions``); ``decode_step_times(d, ctx_sum, n)``, ``n`` decode-only steps of the
    same ``d`` sequences, each ``d`` context tokens longer than the one before.
    """

    pp: int

    def iteration_time(self, plan) -> float: ...

    def stage_time(self, plan, stage: int) -> float: ...

    def transfer_time(self, plan, stage: int) -> float: ...

    def breakdown(self, plan) -> dict[str, float]: ...


class ConstantCostModel:
    """A simple model for tests and hand-computed schedules. Units: seconds and tokens.

    A micro-batch costs ``fixed_s + per_token_s x tokens + per_context_token_s x tokens attended``, split evenly
    over ``pp`` stages, with ``transfer_s`` between consecutive stages.
    """

    def __init__(self, fixed_s: float = 0.01, per_token_s: float = 0.0, per_context_token_s: float = 0.0,
                 *, pp: int = 1, transfer_s: float = 0.0):
        self.fixed_s = fixed_s
        self.per_token_s = per_token_s
        self.per_context_token_s = per_context_token_s
        self.pp = pp
        self.transfer_s = transfer_s

    def _compute(self, plan) -> dict[str, float]:
        tokens = sum(plan.num_new_tokens)
        context = sum(plan.context_lens)
        return {"fixed": self.fixed_s, "tokens": self.per_token_s * tokens,
                "context": self.per_context_token_s * context}

    def describe(self) -> dict:
        return {"kind": "constant", "fixed_s": self.fixed_s, "per_token_s": self.per_token_s,
                "per_context_token_s": self.per_context_token_s}

    def breakdown(self, plan) -> dict[str, float]:
        out = self._compute(plan)
        if self.pp > 1:
            out["send_recv"] = (self.pp - 1) * self.transfer_s
        return out

    def stage_time(self, plan, stage: int) -> float:
        return sum(self._compute(plan).values()) / self.pp

    def transfer_time(self, plan, stage: int) -> float:
        return self.transfer_s if stage < self.pp - 1 else 0.0

    def iteration_time(self, plan) -> float:
        return sum(self.breakdown(plan).values())

    uses_ctx_max = False          # step_time does not read ctx_max

    def step_time(self, d: int, ctx_sum: int, ctx_max: int, chunk: int = 0, chunk_ctx: int = 0) -> float:
        """``iteration_time`` of a micro-batch of ``d`` decodes whose context lengths sum to ``ctx_sum``, plus a
        prefill chunk of ``chunk`` tokens after ``chunk_ctx`` cached ones, bit for bit (pp = 1; see
        ``simulator.fast_forward``)."""
        if self.pp != 1:
            raise ValueError("step_time prices one stage (pp = 1)")
        return self.fixed_s + self.per_token_s * (d + chunk) + self.per_context_token_s * (ctx_sum + chunk_ctx)

    def decode_step_times(self, d: int, ctx_sum: int, n: int) -> list[float]:
        """``step_time`` of ``n`` decode-only steps of ``d`` sequences, contexts summing to ``ctx_sum + k * d``."""
        if self.pp != 1:
            raise ValueError("step_time prices one stage (pp = 1)")
        return [self.fixed_s + self.per_token_s * d + self.per_context_token_s * (ctx_sum + k * d) for k in range(n)]

    def chunk_step_times(self, d: int, ctx_sum: int, n: int, chunk: int, chunk_ctx: int) -> list[float]:
        """``step_time`` of ``n`` steps of ``d`` decodes and a ``chunk``-token chunk, the decode contexts summing to
        ``ctx_sum + k * d`` and the chunk after ``chunk_ctx + k * chunk`` cached tokens at step ``k``."""
        if self.pp != 1:
            raise ValueError("step_time prices one stage (pp = 1)")
        return [self.step_time(d, ctx_sum + k * d, 0, chunk, chunk_ctx + k * chunk) for k in range(n)]

    def chunks_step_time(self, d: int, ctx_sum: int, ctx_max: int, chunks: tuple, chunk_ctxs: tuple) -> float:
        """``step_time`` with several prefill chunks (``chunks[k]`` tokens after ``chunk_ctxs[k]`` cached ones)."""
        if self.pp != 1:
            raise ValueError("step_time prices one stage (pp = 1)")
        return self.fixed_s + self.per_token_s * (d + sum(chunks)) + \
            self.per_context_token_s * (ctx_sum + sum(chunk_ctxs))
