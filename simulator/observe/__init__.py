"""Observe a real serving engine: what its scheduler did each step, in servesim's output format.

* ``observe_vllm`` runs the real vLLM engine (v1, in-process) on a servesim trace, arrivals on the wall clock, and
  records every scheduler step (``plans.jsonl``, the same format as ``simulate --plans``), every request and
  every output token (``requests.csv``, ``tokens.csv``), the iterations (``iterations.csv``) and the engine's
  effective configuration (``meta.json``).
* ``import_vllm_bench`` turns a ``vllm bench serve --save-result --save-detailed`` JSON into the same request and
  token tables (no plans: a remote server's schedule is not observable).

vLLM is optional (``pip install -e ".[vllm]"``); nothing here imports it until ``observe_vllm`` runs.
"""
from simulator.observe.bench_import import import_vllm_bench
from simulator.observe.vllm_engine import (ITERATION_COLUMNS, REQUEST_COLUMNS, TOKEN_COLUMNS, observe_vllm,
                                           prompt_token_ids, write_tiny_llama_config)

__all__ = ["ITERATION_COLUMNS", "REQUEST_COLUMNS", "TOKEN_COLUMNS", "import_vllm_bench", "observe_vllm",
           "prompt_token_ids", "write_tiny_llama_config"]
