"""``simulate(config)``: build the trace, KV cache, scheduler and cost model of one replica, run it, measure it.

Nothing here is global: each call makes its own objects, so simulations can run side by side (threads, processes,
notebooks) and the same config and seed give byte-identical outputs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cost_models.roofline import RooflineCostModel
from cost_models.specs import load_device, load_model
from simulator.config import DEFAULT_NUM_REQUESTS, ConfigError, SimConfig
from simulator.kv_cache import BlockManager, num_kv_blocks
from simulator.metrics import ITERATION_COLUMNS, requests_table, summarize
from simulator.replica import IterationLog, run_replica
from simulator.request import Request
from simulator.schedulers import SCHEDULERS
from simulator.slo import fluidity_per_request, token_times_table

DEFAULT_MAX_BATCH_SIZE = {"vllm": 128, "sarathi": 128, "orca": 16, "fastertransformer": 16}


@dataclass
class SimResult:
    """The outcome of one simulation: per-request objects, the iteration table, the summary and the config."""

    config: SimConfig
    requests: list
    iterations: pd.DataFrame
    summary: dict
    log: IterationLog
    cost_model: object = None

    def requests_table(self) -> pd.DataFrame:
        """One row per request: ``metrics.REQUEST_COLUMNS`` then the Etalon fluidity columns
        (``slo.FLUIDITY_COLUMNS``: TTFT deadline, deadlines, misses, miss rate, fluidity index)."""
        table = requests_table(self.requests)
        if self.cost_model is None:
            return table
        return table.merge(fluidity_per_request(self.requests, self.cost_model), on="request_id", how="left")

    def write(self, out_dir: str | Path, *, tokens: bool = False) -> Path:
        """Write ``summary.json``, ``requests.csv`` and ``iterations.csv`` (and ``tokens.csv``, one row per output
        token, if ``tokens``) into ``out_dir`` (created)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({**self.summary, "config": self.config.to_dict()}, indent=2) + "\n")
        self.requests_table().to_csv(out / "requests.csv", index=False)
        self.iterations.to_csv(out / "iterations.csv", index=False)
        if tokens:
            token_times_table(self.requests).to_csv(out / "tokens.csv", index=False)
        return out


def effective_max_model_len(config: SimConfig, model) -> int:
    return config.max_model_len or model.max_model_len


def load_requests(config: SimConfig, model=None) -> list[Request]:
    """The config's trace as Requests (generated or loaded; see ``traces.load_trace``)."""
    from traces import BUILTIN_WORKLOADS, load_trace

    model = model or load_model(config.model)
    builtin = config.trace in BUILTIN_WORKLOADS
    num_requests = config.num_requests or (DEFAULT_NUM_REQUESTS if builtin else None)
    df = load_trace(config.trace, num_requests=num_requests, qps=config.qps, seed=config.seed,
                    arrival=config.arrival, cv=config.cv, shuffle=config.shuffle, drop_long=config.drop_long,
                    retime=True if config.retime else None,
                    max_total_tokens=None if builtin else effective_max_model_len(config, model))
    return requests_from_frame(df)


def requests_from_frame(df: pd.DataFrame) -> list[Request]:
    """Requests from a trace table with columns request_id, arrival_s, prompt_tokens, output_tokens."""
    return [Request(int(i), float(a), int(p), int(o)) for i, a, p, o in
            zip(df["request_id"], df["arrival_s"], df["prompt_tokens"], df["output_tokens"])]


def build_cost_model(config: SimConfig, model=None, device=None):
    """The roofline model, or the fitted one in ``config.cost_model`` (a folder made by ``servesim fit``)."""
    model = model or load_model(config.model)
    device = device or load_device(config.device)
    if config.cost_model:
        from cost_models.fitted import load_cost_model
        return load_cost_model(config.cost_model, model=model, device=device, tp=config.tp, pp=config.pp)
    return RooflineCostModel(model, device, tp=config.tp, pp=config.pp)


def build_scheduler(config: SimConfig, model=None, device=None):
    """The config's scheduling policy over a KV cache sized for the model, device and parallelism."""
    model = model or load_model(config.model)
    device = device or load_device(config.device)
    max_len = effective_max_model_len(config, model)
    max_batch = config.max_batch_size or DEFAULT_MAX_BATCH_SIZE[config.scheduler]
    if model.num_layers % config.pp:
        raise ConfigError(f"pp: {model.name} has {model.num_layers} layers, which do not divide by pp={config.pp}")
    if config.scheduler == "vllm" and config.max_num_batched_tokens and config.max_num_batched_tokens < max_len:
        # vLLM without chunked prefill refuses this too (SchedulerConfig._verify_args): a prompt longer than the
        # per-iteration token limit could never be prefilled.
        raise ConfigError(f"max_num_batched_tokens: {config.max_num_batched_tokens} is below max_model_len "
                          f"{max_len}; vLLM cannot prefill longer prompts (lower --max-model-len instead)")
    if config.scheduler == "sarathi":
        peak_tokens = config.token_budget
    else:
        peak_tokens = config.max_num_batched_tokens or max_len
    blocks = num_kv_blocks(model, device, tp=config.tp, pp=config.pp, block_size=config.block_size,
                           gpu_memory_utilization=config.gpu_memory_utilization,
                           max_num_batched_tokens=peak_tokens, max_num_seqs=max_batch)
    bm = BlockManager(blocks, config.block_size, config.watermark)
    cls = SCHEDULERS[config.scheduler]
    if config.scheduler == "vllm":
        return cls(bm, max_model_len=max_len, max_num_seqs=max_batch,
                   max_num_batched_tokens=config.max_num_batched_tokens)
    if config.scheduler == "sarathi":
        return cls(bm, max_model_len=max_len, max_num_seqs=max_batch, token_budget=config.token_budget)
    return cls(bm, max_model_len=max_len, max_batch_size=max_batch)


def simulate(config: SimConfig | None = None, *, requests: list[Request] | None = None, cost_model=None,
             progress: bool = False, record_plans: bool = False, **overrides) -> SimResult:
    """Run one replica on ``config`` (defaults + ``overrides``) and return its ``SimResult``.

    ``requests`` replaces the config's trace (they are copied, not modified); ``cost_model`` replaces the one the
    config names. ``progress`` shows a tqdm bar of completed requests. Raises SpecError/ConfigError/TraceError
    for bad input and ValueError when the model does not fit the device.
    """
    config = (config or SimConfig()).with_(**overrides)
    model, device = load_model(config.model), load_device(config.device)
    if requests is None:
        requests = load_requests(config, model)
    else:
        requests = [Request(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests]
    cost_model = cost_model or build_cost_model(config, model, device)
    scheduler = build_scheduler(config, model, device)

    bar = None
    on_finish = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), unit="req", desc=f"simulate {config.scheduler}", leave=False)
        on_finish = lambda done: bar.update(len(done))  # noqa: E731
    try:
        log = run_replica(requests, scheduler, cost_model, record_plans=record_plans, on_finish=on_finish)
    finally:
        if bar is not None:
            bar.close()
    iterations = pd.DataFrame(log.columns(), columns=ITERATION_COLUMNS)
    summary = summarize(requests, iterations, num_rejected=len(scheduler.rejected),
                        num_preemptions=scheduler.num_preemptions)
    if scheduler.rejected:
        summary["rejected_examples"] = [f"request {r.request_id}: {r.rejected}" for r in scheduler.rejected[:5]]
    return SimResult(config, requests, iterations, summary, log, cost_model)
