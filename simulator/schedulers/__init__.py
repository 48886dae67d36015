"""Scheduling policies, one per file. ``SCHEDULERS`` maps the CLI name to the class; each class declares its
options (``options``), its default batch-size cap (``default_max_num_seqs``) and whether it supports prefix caching.

Which to pick:

- ``vllm``: today's vLLM (v1 engine, 0.32): one token budget, chunked prefill, running requests first. Use it to
  plan a vLLM deployment.
- ``vllm-v0``: the 2023 prefill-prioritizing vLLM the Sarathi-Serve paper compared against. Use it to reproduce
  the paper.
- ``sarathi``: Sarathi-Serve (chunked prefills + stall-free hybrid batching under a token budget).
- ``simple-chunking``: Sarathi-Serve's chunked-prefills-only ablation (Table 4).
- ``orca``: Orca's iteration-level batching with worst-case KV reservation.
- ``fastertransformer``: request-level (static) batching.
"""
from simulator.schedulers.base import Scheduler
from simulator.schedulers.fastertransformer import FasterTransformerScheduler
from simulator.schedulers.orca import OrcaScheduler
from simulator.schedulers.sarathi import SarathiScheduler
from simulator.schedulers.simple_chunking import SimpleChunkingScheduler
from simulator.schedulers.vllm import VLLMScheduler
from simulator.schedulers.vllm_v0 import VLLMv0Scheduler

SCHEDULERS = {
    "vllm": VLLMScheduler,
    "vllm-v0": VLLMv0Scheduler,
    "sarathi": SarathiScheduler,
    "simple-chunking": SimpleChunkingScheduler,
    "orca": OrcaScheduler,
    "fastertransformer": FasterTransformerScheduler,
}



def foreign_options(scheduler: str) -> set[str]:
    """Options other schedulers declare (``Scheduler.options``) that ``scheduler`` does not use, e.g.
    ``token_budget`` for ``vllm``. KeyError for an unknown scheduler."""
    own = SCHEDULERS[scheduler].options
    return {k for c in SCHEDULERS.values() for k in c.options} - set(own)


__all__ = ["SCHEDULERS", "foreign_options", "Scheduler", "VLLMScheduler", "VLLMv0Scheduler", "SarathiScheduler",
           "SimpleChunkingScheduler", "OrcaScheduler", "FasterTransformerScheduler"]
