"""``simulate(config)``: build the trace, the deployment (replicas, their KV caches, schedulers, cost models and
placement on nodes) and run it on one SimPy clock, then measure it.

``build(config)`` makes a ``Deployment`` without running it — the study layer (capacity search, sweeps,
validation) builds on it instead of repeating the set-up. Nothing here is global: each call makes its own objects,
so simulations can run side by side (threads, processes, notebooks) and the same config and seed give
byte-identical outputs.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import simpy

from cost_models.roofline import RooflineCostModel
from cost_models.specs import load_device, load_model
from cost_models.topology import default_node, load_node, place_cluster
from simulator.cluster import Cluster, Pool, Transfer
from simulator.config import DEFAULT_NUM_REQUESTS, ConfigError, SimConfig
from simulator.kv_cache import make_block_manager, num_kv_blocks
from simulator.metrics import NULLABLE_INTS, iteration_table, request_columns, summarize
from simulator.output import ChunkWriter, table_path, write_table
from simulator.recorder import Recorder
from simulator.replica import IterationLog, Replica
from simulator.request import Request, RequestStream, requests_from_columns
from simulator.routers import ROUTERS
from simulator.schedulers import SCHEDULERS, foreign_options
from simulator.slo import DEFAULT_DECODE_DEADLINE_S, DEFAULT_TTFT_SLACK_S, predicted_prefill_s
from traces.tables import write_atomic, write_json_atomic

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_DEVICE = "A100-80GB-SXM"


@dataclass
class Outputs:
    """Where a run streams what grows with its length, while it runs: ``out_dir`` and the table format; the
    iteration rows always, the token rows if ``tokens``."""

    out_dir: Path
    fmt: str = "csv"
    tokens: bool = False


@dataclass
class SimResult:
    """The outcome of one simulation: its recorder (per-request rows, TBT samples), the iteration log, the
    summary, the config and the deployment. ``requests`` holds the request objects (with token times) unless the
    run was made with ``keep_requests=False``."""

    config: SimConfig
    requests: list | None
    summary: dict
    log: IterationLog
    recorder: object
    cost_model: object = None
    deployment: object = None
    outputs: Outputs | None = None
    requests_written: Path | None = None    # where ``simulate`` already wrote the requests table (streamed runs)

    @property
    def iterations(self):
        """One row per micro-batch (pandas DataFrame; not available when the rows were streamed to disk)."""
        if self.log.sink is not None:
            raise ValueError("iterations: the rows were streamed to the output folder")
        return iteration_table(self.log, replica_ids=self._cluster)

    @property
    def _cluster(self) -> bool:
        return self.deployment is not None and self.deployment.num_replicas > 1

    def request_columns(self, cols: dict | None = None, first_id: int = 0) -> dict:
        """The requests table's columns (``metrics.request_columns``) of ``cols`` (default: every request's)."""
        return _request_columns(self.deployment, self.recorder, self.recorder.cols if cols is None else cols,
                                first_id)

    def _write_requests(self, path: Path, fmt: str) -> None:
        """The requests table, in one piece, or (a long run's rows, kept in a file) a block at a time."""
        if self.recorder.rows.in_memory:
            write_table(self.request_columns(), path, fmt, NULLABLE_INTS)
            return
        _write_request_blocks(self.deployment, self.recorder, path, fmt)

    def requests_table(self):
        """One row per request (pandas DataFrame): ``metrics.REQUEST_COLUMNS`` (plus the cluster columns, see
        ``metrics.request_columns``) then the Etalon fluidity columns (``slo.FLUIDITY_COLUMNS``)."""
        import pandas as pd

        table = pd.DataFrame(self.request_columns())
        for col in NULLABLE_INTS:
            if col in table:
                table[col] = table[col].astype("Int64")
        return table

    def write(self, out_dir: str | Path | None = None, *, tokens: bool = False, plans: bool = False,
              fmt: str | None = None) -> Path:
        """Write ``summary.json``, ``requests.csv`` and ``iterations.csv`` (or ``.parquet`` with ``fmt``; and
        ``tokens.csv``, one row per output token, if ``tokens``; ``plans.jsonl``, one line per micro-batch, if
        ``plans``) into ``out_dir`` (created; default: the folder the run streamed to). Every file goes through a
        temporary name and a rename."""
        streamed = self.outputs
        out = Path(out_dir) if out_dir is not None else streamed.out_dir
        fmt = fmt or (streamed.fmt if streamed else "csv")
        out.mkdir(parents=True, exist_ok=True)
        path = table_path(out, "requests", fmt)
        if path != self.requests_written:
            self._write_requests(path, fmt)
        if self.log.sink is None:
            write_table(self.log.columns(replica_ids=self._cluster), table_path(out, "iterations", fmt), fmt)
        if tokens and not (streamed and streamed.tokens):
            from simulator.slo import token_times_table
            if self.requests is None:
                raise ValueError("tokens: the run dropped token times (ask for tokens when it starts)")
            write_table({k: v.to_numpy() for k, v in token_times_table(self.requests).items()},
                        table_path(out, "tokens", fmt), fmt)
        if plans:
            write_atomic(out / "plans.jsonl", plans_jsonl(self.log))
        write_json_atomic(out / "summary.json", {**self.summary, "config": self.config.to_dict()})
        return out


def _request_columns(dep, recorder, cols: dict, first_id: int = 0) -> dict:
    """``metrics.request_columns`` of the recorded ``cols`` of a run of deployment ``dep`` (or None)."""
    return request_columns(cols, cluster=dep is not None and dep.num_replicas > 1,
                           disaggregated=dep is not None and dep.config.disaggregated,
                           prefix_caching=dep is not None and dep.prefix_caching,
                           fluidity=recorder.ttft_deadline is not None, first_id=first_id)


def _write_request_blocks(dep, recorder, path: Path, fmt: str) -> None:
    """A long run's requests table (its rows kept in a file), a block of rows at a time."""
    writer = ChunkWriter(path, fmt, NULLABLE_INTS)
    for lo, cols in recorder.blocks():
        writer.write(_request_columns(dep, recorder, cols, lo))
    writer.close()


def plans_jsonl(log: IterationLog) -> str:
    """One JSON line per micro-batch: ``step``, ``start_s``, ``duration_s``, ``num_new_tokens`` and
    ``context_lens`` (objects keyed by request id, in plan order), ``preempted_ids`` (and ``replica_id`` when
    more than one replica ran). The format ``servesim observe`` writes for a real engine."""
    if log.plans is None:
        raise ValueError("plans: the run did not record plans (simulate(record_plans=True))")
    many = len({rid for _, _, rid in log.plan_times}) > 1
    lines = []
    for i, (plan, (start, duration, rid)) in enumerate(zip(log.plans, log.plan_times)):
        row = {"step": i, "start_s": start, "duration_s": duration,
               "num_new_tokens": {str(r): n for r, n in zip(plan.request_ids, plan.num_new_tokens)},
               "context_lens": {str(r): k for r, k in zip(plan.request_ids, plan.context_lens)},
               "preempted_ids": list(plan.preempted_ids)}
        if many:
            row["replica_id"] = rid
        lines.append(json.dumps(row))
    return "\n".join(lines) + ("\n" if lines else "")


def effective_max_model_len(config: SimConfig, model) -> int:
    """``config.max_model_len`` or the model's context length. Raises ConfigError above the model's limit unless
    ``allow_long_max_model_len`` (vLLM refuses it too unless ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``)."""
    if config.max_model_len is None:
        return model.max_model_len
    if config.max_model_len > model.max_context and not config.allow_long_max_model_len:
        raise ConfigError(f"max_model_len: {config.max_model_len} exceeds {model.name}'s context length "
                          f"{model.max_context}; pass --allow-long-max-model-len to force it")
    return config.max_model_len


def load_requests(config: SimConfig, model=None, *, changes: dict | None = None) -> list[Request]:
    """The config's trace as Requests (generated or loaded; see ``traces.load_trace``), limited to the effective
    ``max_model_len`` like the Sarathi-Serve artifact (shrunk, or dropped with ``drop_long``). ``changes`` (a
    dict) receives the trace's ``workload_changes`` (requests shrunk and dropped). With prefix caching, trace
    block hashes are mapped onto the KV block size (``traces.prefix.block_hashes_for``). The built-in i.i.d.
    workloads are loaded as numpy columns (``traces.load_columns``), without pandas."""
    return list(stream_requests(config, model, changes=changes, chunk=None)[1])


def stream_requests(config: SimConfig, model=None, *, changes: dict | None = None, chunk: int | None = 4096):
    """``(number of requests, RequestStream)`` of the config's trace: the Requests ``load_requests`` gives, made
    ``chunk`` at a time while the stream is iterated (None: all at once) or one by one by position, so that a long
    run holds only the requests it is serving (the trace's numpy columns stay, 24 bytes a request)."""
    from traces import WORKLOADS, load_columns

    model = model or load_model(config.model)
    builtin = config.trace in WORKLOADS
    num_requests = config.num_requests or (DEFAULT_NUM_REQUESTS if builtin else None)
    trace = load_columns(config.trace, num_requests=num_requests, qps=config.effective_qps, seed=config.seed,
                         arrival=config.arrival, cv=config.cv, shuffle=config.shuffle, drop_long=config.drop_long,
                         retime=True if config.retime else None,
                         qps_explicit=config.qps is not None and not config.concurrency,
                         max_total_tokens=effective_max_model_len(config, model), **config.workload_options)
    if changes is not None:
        changes.update(trace.attrs.get("workload_changes", {}))
    hashes = None
    if config.enable_prefix_caching and trace.block_hashes is not None:
        from traces.prefix import block_hashes_for

        H = trace.hash_block_tokens
        hashes = [block_hashes_for(h, H, p, config.block_size)
                  for h, p in zip(trace.block_hashes, trace.prompt_tokens.tolist())]
    return len(trace), RequestStream(trace.arrival_s, trace.prompt_tokens, trace.output_tokens, hashes,
                                     chunk=chunk or max(len(trace), 1))


def requests_from_frame(df: pd.DataFrame, block_hashes=None) -> list[Request]:
    """Requests from a trace table with columns request_id, arrival_s, prompt_tokens, output_tokens (and the
    prefix-cache keys of each request's prompt blocks, if given)."""
    columns = (df[c].tolist() for c in ("request_id", "arrival_s", "prompt_tokens", "output_tokens"))
    return requests_from_columns(*columns, block_hashes)


def resolve_hardware(config: SimConfig):
    """``(device, node)`` of the config. Raises ConfigError when ``--device`` and the node spec's disagree."""
    node = load_node(config.node) if config.node else None
    if node is not None:
        if config.device and load_device(config.device).name != node.device.name:
            raise ConfigError(f"device: {config.device} differs from node {node.name}'s {node.device.name}; "
                              f"drop --device or use another --node")
        return node.device, node
    device = load_device(config.device or DEFAULT_DEVICE)
    return device, default_node(device)


@dataclass
class ReplicaSpec:
    """One replica of a deployment: its pool (``replicas``, ``prefill`` or ``decode``), parallelism and placement."""

    pool: str
    tp: int
    pp: int
    placement: object = None


@dataclass
class Deployment:
    """A built, not yet run, deployment: model, device, node, replica specs and the objects of one run."""

    config: SimConfig
    model: object
    device: object
    node: object
    max_model_len: int
    specs: list
    scheduler_kw: dict
    watermark: float
    prefix_caching: bool
    cost_model_override: object = None
    cost_models: dict = field(default_factory=dict)     # (tp, pp, links) -> cost model
    _probe: object = None                               # a scheduler to ask rejection_reason

    @property
    def num_replicas(self) -> int:
        return len(self.specs)

    @property
    def gpus(self) -> int:
        return sum(s.tp * s.pp for s in self.specs)

    def describe(self) -> dict:
        """What the config resolved to: model, device, node, GPUs, scheduler options and the cost model."""
        cm = self.cost_model_for(self.specs[0])
        return {"model": self.model.name, "device": self.device.name, "node": self.node.name, "gpus": self.gpus,
                "max_model_len": self.max_model_len, "scheduler": self.config.scheduler,
                "scheduler_options": dict(self.scheduler_kw), "watermark": self.watermark,
                "prefix_caching": self.prefix_caching, "kv_blocks_per_replica": self.kv_blocks(self.specs[0]),
                "block_size": self.config.block_size,
                "cost_model": cm.describe() if hasattr(cm, "describe") else {"kind": type(cm).__name__}}

    def cost_model_for(self, spec: ReplicaSpec):
        """The cost model of a replica (shared by replicas of the same shape and links)."""
        if self.cost_model_override is not None:
            return self.cost_model_override
        key = (spec.tp, spec.pp, spec.placement.tp_link(0), tuple(spec.placement.pp_link(s)
                                                                  for s in range(spec.pp - 1)))
        cm = self.cost_models.get(key)
        if cm is None:
            cm = self.cost_models[key] = build_cost_model(self.config, self.model, self.device, tp=spec.tp,
                                                          pp=spec.pp, placement=spec.placement)
        return cm

    def kv_blocks(self, spec: ReplicaSpec) -> int:
        """KV blocks of a replica of ``spec``'s shape (``num_kv_blocks`` overrides the computed size)."""
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        cls = SCHEDULERS[self.config.scheduler]
        return num_kv_blocks(self.model, self.device, tp=spec.tp, pp=spec.pp, block_size=self.config.block_size,
                             gpu_memory_utilization=self.config.gpu_memory_utilization,
                             max_num_batched_tokens=cls.peak_batched_tokens(self.scheduler_kw),
                             max_num_seqs=self.scheduler_kw["max_num_seqs"])

    def make_scheduler(self, spec: ReplicaSpec):
        cls = SCHEDULERS[self.config.scheduler]
        kv = make_block_manager(self.kv_blocks(spec), self.config.block_size, self.watermark,
                                enable_prefix_caching=self.prefix_caching)
        return cls(kv, **self.scheduler_kw)

    def rejection_reason(self, request) -> str | None:
        """Why the deployment can never serve ``request`` (the entry pool's first replica decides), or None."""
        if self._probe is None:
            self._probe = self.make_scheduler(self.specs[0])
        return self._probe.rejection_reason(request)


def build_cost_model(config: SimConfig, model=None, device=None, *, tp: int | None = None, pp: int | None = None,
                     placement=None):
    """The roofline model, or the fitted one in ``config.cost_model`` (a folder made by ``servesim fit``)."""
    model = model or load_model(config.model)
    device = device or resolve_hardware(config)[0]
    tp = config.tp if tp is None else tp
    pp = config.pp if pp is None else pp
    if config.cost_model:
        from cost_models.fitted import load_cost_model
        return load_cost_model(config.cost_model, model=model, device=device, tp=tp, pp=pp, placement=placement,
                               engine=config.engine)
    return RooflineCostModel(model, device, tp=tp, pp=pp, placement=placement, engine=config.engine)


def build(config: SimConfig, *, cost_model=None) -> Deployment:
    """Resolve the config into a ``Deployment`` (model, hardware, placement, scheduler options). Raises
    SpecError/ConfigError for bad input and ValueError when the model does not fit the device."""
    model = load_model(config.model)
    device, node = resolve_hardware(config)
    max_len = effective_max_model_len(config, model)
    cls = SCHEDULERS[config.scheduler]
    prefix = bool(config.enable_prefix_caching)
    if prefix and not cls.supports_prefix_caching:
        supported = ", ".join(n for n, c in SCHEDULERS.items() if c.supports_prefix_caching)
        raise ConfigError(f"enable_prefix_caching: scheduler {config.scheduler} does not support prefix caching "
                          f"(supported: {supported})")
    if config.router not in ROUTERS:
        raise ConfigError(f"router: unknown {config.router!r}; known: {', '.join(ROUTERS)}")
    if config.disaggregated:
        shapes = [("prefill", config.prefill_tp or config.tp, config.prefill_pp or config.pp)] * \
            config.prefill_replicas + \
            [("decode", config.decode_tp or config.tp, config.decode_pp or config.pp)] * config.decode_replicas
    else:
        shapes = [("replicas", config.tp, config.pp)] * config.replicas
    for pool, tp, pp in shapes:
        flag = "pp" if pool == "replicas" else f"{pool}_pp"
        if model.num_layers % pp:
            raise ConfigError(f"{flag}: {model.name} has {model.num_layers} layers, which do not divide by "
                              f"pp={pp}")
        if model.num_attention_heads % tp:
            tflag = "tp" if pool == "replicas" else f"{pool}_tp"
            raise ConfigError(f"{tflag}: {model.name} has {model.num_attention_heads} attention heads, which do not "
                              f"divide by tp={tp}")
    what = "prefill_replicas, decode_replicas" if config.disaggregated else "replicas"
    placements = place_cluster(node, [(tp, pp) for _, tp, pp in shapes], num_nodes=config.num_nodes, what=what)
    specs = [ReplicaSpec(pool, tp, pp, pl) for (pool, tp, pp), pl in zip(shapes, placements)]
    kw = cls.configure(config, max_model_len=max_len, device=device)
    watermark = cls.default_watermark if config.watermark is None else config.watermark
    return Deployment(config, model, device, node, max_len, specs, kw, watermark, prefix, cost_model)


def ignored_options(config: SimConfig) -> dict:
    """Config keys set away from their defaults that this deployment does not use, each with the reason
    (``{key: reason}``): another scheduler's options (``Scheduler.options``: e.g. ``token_budget`` with ``vllm``),
    ``router`` with a single replica, the pools' ``prefill_*``/``decode_*`` shapes and the KV-transfer link
    without disaggregation, ``replicas`` with it, and ``qps`` in a closed loop (``concurrency``). ``simulate``
    prints them as notes and records them in ``summary.json`` (``ignored_options``)."""
    defaults = SimConfig()
    changed = [k for k in SimConfig.keys() if getattr(config, k) != getattr(defaults, k)]
    foreign = foreign_options(config.scheduler)
    ignored = {}
    for key in changed:
        if key in foreign:
            users = ", ".join(n for n, c in SCHEDULERS.items() if key in c.options)
            ignored[key] = f"scheduler {config.scheduler} does not use it (only {users})"
        elif key == "router" and config.replicas == 1 and not config.disaggregated:
            ignored[key] = "one replica: nothing to route"
        elif key in ("prefill_tp", "prefill_pp", "decode_tp", "decode_pp", "kv_transfer_bandwidth",
                     "kv_transfer_latency") and not config.disaggregated:
            ignored[key] = "only for a disaggregated cluster (--prefill-replicas and --decode-replicas)"
        elif key == "replicas" and config.disaggregated:
            ignored[key] = "a disaggregated cluster has --prefill-replicas and --decode-replicas instead"
        elif key in ("qps", "arrival", "cv", "retime") and config.concurrency:
            ignored[key] = "closed loop (--concurrency): each client sends its next request when one completes"
    return ignored


def _kv_transfer(dep: Deployment) -> Transfer:
    c, node = dep.config, dep.node
    link = node.network or node.links["pcie"]
    return Transfer(dep.model.kv_bytes_per_token(1, 1),
                    c.kv_transfer_bandwidth or link.bandwidth_bytes_per_s,
                    link.latency_s if c.kv_transfer_latency is None else c.kv_transfer_latency)


def run_deployment(dep: Deployment, requests, *, num_requests: int | None = None, record_plans: bool = False,
                   on_iteration=None, on_finish=None, until_s: float | None = None,
                   log: IterationLog | None = None, recorder: Recorder | None = None):
    """Run ``requests`` (fresh, sorted by arrival; a list, or a ``RequestStream`` with ``num_requests`` given) on a new
    cluster of ``dep`` and return the cluster (``cluster.recorder`` holds what was measured). ``log`` receives the
    iteration rows (a new one by default; its ``scheduled_s[-1]`` is the clock in ``on_iteration``)."""
    env = simpy.Environment()
    if log is None:
        log = IterationLog(plans=[] if record_plans else None)
    if recorder is None:
        recorder = Recorder(len(requests) if num_requests is None else num_requests, on_finish=on_finish)
    pools: dict[str, list] = {}
    for spec in dep.specs:
        pools.setdefault(spec.pool, []).append(spec)
    log.multi = dep.num_replicas > 1
    # a hook watching the cluster's clock (the capacity search) needs the replicas' steps in time order
    ff = dep.config.fast_forward and not (on_iteration is not None and dep.num_replicas > 1)
    cluster = Cluster(env, {}, log, _kv_transfer(dep) if dep.config.disaggregated else None, recorder.finish,
                      concurrency=dep.config.concurrency, fast_forward=ff)
    cluster.recorder = recorder
    router = ROUTERS[dep.config.router]
    index = 0
    for name, specs in pools.items():
        replicas = []
        for spec in specs:
            rep = Replica(env, dep.make_scheduler(spec), dep.cost_model_for(spec), replica_id=index, log=log,
                          on_iteration=on_iteration, on_done=cluster.on_done)
            rep.spec = spec
            rep.recorder = recorder
            replicas.append(rep)
            index += 1
        cluster.pools[name] = Pool(name, replicas, router)
    cluster.run(requests, until_s=until_s)
    leftovers = [r for rep in cluster.replicas for r in (*rep.scheduler.rejected, *rep.scheduler.requests.values())]
    recorder.close(sorted(leftovers, key=lambda r: r.request_id))
    return cluster


def _token_sink(writer: ChunkWriter):
    """A recorder ``token_sink`` writing each finished request's tokens (request_id, token_index, time_s)."""
    import numpy as np

    def sink(r):
        n = len(r.token_times_s)
        if n:
            writer.write({"request_id": np.full(n, r.request_id, dtype=np.int64),
                          "token_index": np.arange(n, dtype=np.int64), "time_s": np.asarray(r.token_times_s)})
    return sink


def simulate(config: SimConfig | None = None, *, requests: list[Request] | None = None, cost_model=None,
             progress: bool = False, record_plans: bool = False, on_iteration=None, on_finish=None,
             keep_requests: bool = True, outputs: Outputs | None = None, **overrides) -> SimResult:
    """Run the deployment of ``config`` (defaults + ``overrides``) and return its ``SimResult``.

    ``requests`` replaces the config's trace (they are copied, not modified); ``cost_model`` replaces the one the
    config names (for every replica): a cost-model object, or a ``servesim fit`` folder (as the config key).
    ``progress`` shows a tqdm bar of completed requests. ``on_iteration(plan, start_s, duration_s)`` and ``on_finish(requests)`` are called as the run goes (the capacity search stops a
    trial from them). ``keep_requests=False`` drops each request's token times once it is measured (memory stays
    bounded; ``SimResult.requests`` is then None); ``outputs`` streams the iteration (and token) rows into a folder
    while the run goes (``SimResult.write()`` then completes it). Raises SpecError/ConfigError/TraceError for bad
    input and ValueError when the model does not fit the device.
    """
    if isinstance(cost_model, (str, Path)):     # a fitted-model folder, as the config's cost_model key takes
        overrides["cost_model"], cost_model = str(cost_model), None
    config = (config or SimConfig()).with_(**overrides)
    dep = build(config, cost_model=cost_model)
    changes: dict = {}
    if requests is not None:
        requests = [r.fresh_copy() for r in requests]
        num_requests = len(requests)
    elif keep_requests or config.concurrency:     # a closed loop takes them from a list
        requests = load_requests(config, dep.model, changes=changes)
        num_requests = len(requests)
    else:                                         # created as they arrive, dropped once measured
        num_requests, requests = stream_requests(config, dep.model, changes=changes)

    bar = None
    finish = on_finish
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_requests, unit="req", desc=f"simulate {config.scheduler}", leave=False)

        def finish(done):
            bar.update(len(done))
            if on_finish is not None:
                on_finish(done)
        # (the bar alone neither reads the clock nor stops the run: a stretch may report its completions at once)
        finish.clock_free = on_finish is None
    first = dep.cost_model_for(dep.specs[0])
    recorder = Recorder(num_requests, on_finish=finish, keep_requests=keep_requests,
                        ttft_deadline=lambda p: predicted_prefill_s(first, p) + DEFAULT_TTFT_SLACK_S,
                        decode_deadline_s=DEFAULT_DECODE_DEADLINE_S)
    log = IterationLog(plans=[] if record_plans else None)
    token_writer = None
    if outputs is not None:
        outputs.out_dir.mkdir(parents=True, exist_ok=True)
        log.sink = ChunkWriter(table_path(outputs.out_dir, "iterations", outputs.fmt), outputs.fmt)
        log.replica_ids = dep.num_replicas > 1
        if outputs.tokens:
            token_writer = ChunkWriter(table_path(outputs.out_dir, "tokens", outputs.fmt), outputs.fmt)
            recorder.token_sink = _token_sink(token_writer)
    try:
        with profiled_range(dep) as extrapolation:
            cluster = run_deployment(dep, requests, num_requests=num_requests, record_plans=record_plans,
                                     on_iteration=on_iteration, log=log, recorder=recorder)
    finally:
        if bar is not None:
            bar.close()
    early = None
    if outputs is not None and not recorder.rows.in_memory:
        # a long run's requests table is written (its rows read back, formatted by the writer's thread) while the
        # run is measured: the measuring and the formatting share the two cores
        from concurrent.futures import ThreadPoolExecutor

        path = table_path(outputs.out_dir, "requests", outputs.fmt)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="servesim-requests")
        early = pool.submit(_write_request_blocks, dep, recorder, path, outputs.fmt)
        pool.shutdown(wait=False)
    try:
        result = measure(dep, cluster, changes)
    except BaseException:
        if early is not None:
            early.exception()            # (the writer done first; the measuring's error is the one raised)
        raise
    if early is not None:
        early.result()                   # (written, or its error raised)
        result.requests_written = path
    if extrapolation:
        result.summary["extrapolation"] = extrapolation
    if not keep_requests:
        result.requests = None
    if log.sink is not None:
        log.sink.close(empty_columns={k: [] for k in log.columns(replica_ids=log.replica_ids)})
    if token_writer is not None:
        token_writer.close(empty_columns={"request_id": [], "token_index": [], "time_s": []})
    result.outputs = outputs
    return result


@contextmanager
def profiled_range(dep: Deployment):
    """Count, while the block runs, the micro-batches the deployment's fitted cost models price beyond their
    profile: yields a dict that is filled on exit with ``RangeTracker.report`` (``{iterations, extrapolated,
    share, by_dimension}``), and stays empty for cost models that record no profiled range (the roofline).
    The trackers are detached on exit, so a cost model shared by later runs starts afresh."""
    fitted = []
    for spec in dep.specs:
        cm = dep.cost_model_for(spec)
        if getattr(cm, "limits", None) and all(cm is not m for m in fitted):
            fitted.append(cm)
    report: dict = {}
    if not fitted:
        yield report
        return
    from cost_models.fitted import RangeTracker

    tracker = RangeTracker()
    for cm in fitted:
        cm.tracker = tracker
    try:
        yield report
    finally:
        for cm in fitted:
            cm.tracker = None
    report.update(tracker.report(fitted[0].limits))


def measure(dep: Deployment, cluster: Cluster, changes: dict | None = None) -> SimResult:
    """The SimResult of a finished run (``changes``: what loading did to the workload)."""
    log, recorder = cluster.log, cluster.recorder
    summary = summarize(recorder, log.stats(), cluster=cluster, deployment=dep)
    summary["workload"] = {**(changes or {}), "num_rejected": summary["requests_rejected"]}
    summary["ignored_options"] = ignored_options(dep.config)
    first = dep.cost_model_for(dep.specs[0])
    kept = sorted(recorder.requests, key=lambda r: r.request_id) if recorder.keep_requests else None
    return SimResult(dep.config, kept, summary, log, recorder, first, dep)
