"""Run the real vLLM engine (v1) on a servesim trace and record exactly what its scheduler did each step.

The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so its scheduler object can be wrapped: each
``schedule()`` call is recorded (the batch ``{request: num_new_tokens}`` in the engine's order, each scheduled
request's context length before the step, the requests preempted while building it, the KV blocks in use right
after it) and each ``update_from_output()`` call closes the step (its end time, the tokens it produced and the
requests it finished). Requests are added on the wall clock at their trace arrival times: before each engine step
every request whose arrival has passed is added; when nothing is in the engine the loop sleeps until the next one.

Weights are dummy (``load_format="dummy"``) and there is no tokenizer: prompts are token ids drawn from the seed
(``prompt_token_ids``), outputs are forced to the trace's lengths (``min_tokens = max_tokens``, ``ignore_eos``).

Outputs (``out_dir``), each written atomically (temp name in the same folder, then ``os.replace``):

* ``plans.jsonl``: one line per step that scheduled tokens or preempted requests, keys in this order:
  ``step, start_s, duration_s, num_new_tokens, context_lens, preempted_ids`` (ids are servesim request ids).
* ``requests.csv`` (``REQUEST_COLUMNS``), ``tokens.csv`` (``TOKEN_COLUMNS``), ``iterations.csv``
  (``ITERATION_COLUMNS``) and ``meta.json`` (engine, versions, device, host, model, the effective scheduler and
  cache configs, KV blocks, arrival lag, wall time).

Times are seconds since the run started (``time.perf_counter``). A step starts when ``schedule()`` is called (or
when the previous step ended, if later: with async scheduling vLLM schedules step k+1 before step k's output is
processed) and ends when ``update_from_output()`` returns; tokens produced by a step are emitted at its end.
"""
from __future__ import annotations

import enum
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import deque
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REQUEST_COLUMNS = ["request_id", "arrival_s", "prompt_tokens", "output_tokens", "scheduled_s", "first_token_s",
                   "completion_s", "ttft_s", "scheduling_delay_s", "e2e_s", "tpot_s", "num_preemptions"]
ITERATION_COLUMNS = ["start_s", "duration_s", "batch_size", "num_prefill_tokens", "num_decode_tokens",
                     "kv_blocks_used", "kv_blocks_total"]
TOKEN_COLUMNS = ["request_id", "token_index", "time_s"]
PLAN_KEYS = ("step", "start_s", "duration_s", "num_new_tokens", "context_lens", "preempted_ids")
FORMAT_VERSION = 1
TRACE_COLUMNS = ("request_id", "arrival_s", "prompt_tokens", "output_tokens")

# The config.json keys summarized in meta.json["model"].
MODEL_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings",
              "torch_dtype", "dtype", "tie_word_embeddings", "sliding_window")

# Consecutive empty engine steps with nothing running and no arrival pending before the run is declared stuck.
STALL_STEPS = 1000


# --------------------------------------------------------------------------------------------- small helpers


def write_tiny_llama_config(path, *, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 8,
                            intermediate: int = 1024, vocab: int = 32000, max_position_embeddings: int = 2048,
                            dtype: str = "bfloat16") -> Path:
    """Write a small Llama ``config.json`` (for dummy weights) into folder ``path``; returns the file's path.

    The defaults (512 hidden, 8 layers, ~60 M parameters with the 32000-token vocabulary) run on vLLM's CPU
    backend at tens of milliseconds per step on 2 cores.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
        "max_position_embeddings": max_position_embeddings, "torch_dtype": dtype,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    }
    file = folder / "config.json"
    _atomic_write_text(file, json.dumps(config, indent=2) + "\n")
    return file


def resolve_model_config(model_path) -> tuple[Path, dict]:
    """``(folder holding config.json, its contents)`` for a config.json file or a folder holding one.

    A file with another name is copied into a fresh temporary folder as ``config.json`` (vLLM loads folders).
    Raises FileNotFoundError / ValueError with a one-line message for a missing or malformed file.
    """
    p = Path(model_path).expanduser().resolve()
    if p.is_dir():
        file = p / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{p}: no config.json in this folder")
    elif p.is_file():
        file = p
    else:
        raise FileNotFoundError(f"{p}: no such file or folder (give a Hugging Face config.json or its folder)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a readable JSON file: {' '.join(str(exc).split())}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: a config.json must hold a JSON object")
    for key in ("architectures", "vocab_size"):
        if key not in config:
            raise ValueError(f"{file}: {key}: missing (vLLM needs it to build the model)")
    if file.name == "config.json":
        return file.parent, config
    folder = Path(tempfile.mkdtemp(prefix="servesim-model-"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder, config


def prompt_token_ids(requests_df: pd.DataFrame, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Deterministic prompt token ids for every row of a trace, uniform in ``[0, vocab_size)``.

    Rows without prefix hashes draw from ``numpy.random.default_rng([seed, request_id])``, so ids do not depend on
    the other rows. Prefix sharing (a hook; vLLM only reuses them with prefix caching on): when the trace has a
    ``block_hashes`` column and ``df.attrs["hash_block_tokens"]`` (``H``), the ``H`` tokens covered by hash ``h``
    are drawn from ``default_rng([seed, h])``, so requests with equal prefix hashes get equal prefix tokens; the
    tokens past the hashed prefix are drawn per request as above.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    hashes = requests_df["block_hashes"] if "block_hashes" in requests_df.columns else None
    block = requests_df.attrs.get("hash_block_tokens") if hashes is not None else None
    out = []
    for pos, (rid, n) in enumerate(zip(requests_df["request_id"], requests_df["prompt_tokens"])):
        n = int(n)
        ids: list[int] = []
        if block:
            for h in hashes.iloc[pos] or ():
                if len(ids) >= n:
                    break
                rng = np.random.default_rng([seed, int(h) & (2 ** 64 - 1)])
                ids.extend(rng.integers(0, vocab_size, int(block)).tolist())
            ids = ids[:n]
        if len(ids) < n:
            rng = np.random.default_rng([seed, 2 ** 32 + int(rid)])
            ids.extend(rng.integers(0, vocab_size, n - len(ids)).tolist())
        out.append(ids)
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                    # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    _atomic_write_text(path, df.to_csv(index=False))


def _jsonable(value, depth: int = 0):
    """A JSON-safe copy of a config value (dataclasses and enums become dicts/strings; unknowns their repr)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, (bool, int, float, str)) else value.name
    if depth > 3:
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name, None), depth + 1) for f in fields(value)}
    return repr(value)


def config_dict(config) -> dict:
    """Every field of a vLLM config dataclass (and InitVar-free extras it sets), JSON-safe."""
    if config is None:
        return {}
    if is_dataclass(config):
        return {f.name: _jsonable(getattr(config, f.name, None)) for f in fields(config)}
    return {k: _jsonable(v) for k, v in vars(config).items() if not k.startswith("_")}


def host_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": usable, "platform": platform.platform()}
    try:
        info["load_average"] = list(os.getloadavg())    # other work on the host distorts the step times
    except OSError:
        pass
    return info


def lag_stats(lags) -> dict:
    a = np.asarray(list(lags), dtype=float)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return {"mean": None, "p99": None, "max": None}
    return {"mean": float(a.mean()), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def requests_frame(rows) -> pd.DataFrame:
    """The requests table from dicts holding request_id, arrival_s, prompt_tokens, output_tokens, scheduled_s,
    first_token_s, completion_s, num_preemptions (times NaN when unknown); the derived columns are computed."""
    nan = float("nan")
    records = []
    for r in rows:
        arrival, sched = r["arrival_s"], _nan(r.get("scheduled_s"))
        first, done = _nan(r.get("first_token_s")), _nan(r.get("completion_s"))
        out = int(r["output_tokens"])
        tpot = (done - first) / (out - 1) if out > 1 else nan
        records.append((int(r["request_id"]), arrival, int(r["prompt_tokens"]), out, sched, first, done,
                        first - arrival, sched - arrival, done - arrival, tpot, r.get("num_preemptions", nan)))
    return pd.DataFrame.from_records(records, columns=REQUEST_COLUMNS)


def _nan(x):
    return float("nan") if x is None else float(x)


def check_trace(requests_df: pd.DataFrame, source: str = "requests_df") -> pd.DataFrame:
    """The trace sorted by arrival, with the four required columns checked (one-line ValueError)."""
    if not isinstance(requests_df, pd.DataFrame):
        raise ValueError(f"{source}: must be a pandas DataFrame with columns {', '.join(TRACE_COLUMNS)}")
    missing = [c for c in TRACE_COLUMNS if c not in requests_df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}")
    if len(requests_df) == 0:
        raise ValueError(f"{source}: no requests")
    if requests_df["request_id"].duplicated().any():
        raise ValueError(f"{source}: request_id: values must be unique")
    if (requests_df["prompt_tokens"] < 1).any() or (requests_df["output_tokens"] < 1).any():
        raise ValueError(f"{source}: prompt_tokens and output_tokens must be >= 1")
    arr = requests_df["arrival_s"].to_numpy(dtype=float)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{source}: arrival_s must be finite and >= 0")
    df = requests_df.sort_values(["arrival_s", "request_id"], kind="stable").reset_index(drop=True)
    df.attrs = dict(requests_df.attrs)
    return df


# --------------------------------------------------------------------------------------------- the recorder


class _StepRecord:
    __slots__ = ("sched_s", "start_s", "end_s", "order", "context", "preempted", "kv_used", "decode")

    def __init__(self, sched_s, order, context, preempted, kv_used, decode):
        self.sched_s = sched_s
        self.start_s = None
        self.end_s = None
        self.order = order          # [(vllm_id, num_new_tokens)] in the engine's scheduling order
        self.context = context      # {vllm_id: num_computed_tokens before the step}
        self.preempted = preempted  # [vllm_id]
        self.kv_used = kv_used
        self.decode = decode        # {vllm_id: bool}


class _ReqRecord:
    __slots__ = ("request_id", "arrival_s", "added_s", "prompt_tokens", "output_tokens", "scheduled_s",
                 "token_times", "completion_s", "num_preemptions", "finish_reason")

    def __init__(self, request_id, arrival_s, prompt_tokens, output_tokens):
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.added_s = None
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.scheduled_s = None
        self.token_times: list[float] = []
        self.completion_s = None
        self.num_preemptions = 0
        self.finish_reason = None


class SchedulerRecorder:
    """Wraps a vLLM v1 scheduler's ``schedule`` and ``update_from_output`` (instance attributes) to record steps."""

    def __init__(self, scheduler, clock):
        self.scheduler = scheduler
        self.clock = clock
        self.records: dict[str, _ReqRecord] = {}     # vLLM request id -> record
        self.steps: list[_StepRecord] = []          # closed steps, in completion order
        self._open: dict[int, tuple[object, _StepRecord]] = {}
        self._last_end = 0.0
        self.empty_steps = 0                        # consecutive schedule() calls with nothing scheduled
        self.block_pool = getattr(getattr(scheduler, "kv_cache_manager", None), "block_pool", None)
        self.kv_blocks_total = (self.block_pool.num_gpu_blocks - 1) if self.block_pool is not None else None
        self._orig_schedule = scheduler.schedule
        self._orig_update = scheduler.update_from_output
        scheduler.schedule = self._schedule
        scheduler.update_from_output = self._update_from_output

    def restore(self):
        for name in ("schedule", "update_from_output"):
            self.scheduler.__dict__.pop(name, None)

    def kv_used(self):
        if self.block_pool is None:
            return None
        return self.kv_blocks_total - self.block_pool.get_num_free_blocks()

    def _schedule(self, *args, **kwargs):
        sched_s = self.clock()
        before = {rid: (r.num_computed_tokens, r.num_tokens, getattr(r, "num_output_placeholders", 0))
                  for rid, r in self.scheduler.requests.items()}
        out = self._orig_schedule(*args, **kwargs)
        nst = out.num_scheduled_tokens
        preempted = [rid for rid in out.preempted_req_ids]
        if not nst and not preempted:
            self.empty_steps += 1
            return out
        self.empty_steps = 0
        requests = self.scheduler.requests
        order, context, decode = [], {}, {}
        for rid, n in nst.items():
            n = int(n)
            req = requests[rid]
            # vLLM advances num_computed_tokens inside schedule() (and adopts prefix-cache hits there).
            ctx = int(req.num_computed_tokens) - n
            order.append((rid, n))
            context[rid] = ctx
            _, num_tokens, placeholders = before.get(rid, (0, req.num_tokens, 0))
            known = int(num_tokens) + int(placeholders)   # prompt + outputs delivered or in flight
            decode[rid] = n == 1 and known > req.num_prompt_tokens and ctx == known - 1
        for rid in preempted:
            if rid in self.records:
                self.records[rid].num_preemptions += 1
        rec = _StepRecord(sched_s, order, context, preempted, self.kv_used(), decode)
        self._open[id(out)] = (out, rec)
        if not nst:                      # nothing runs: the step ends now (update_from_output may not follow)
            self._close(out, rec, self.clock(), None)
        return out

    def _update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        result = self._orig_update(scheduler_output, model_runner_output, *args, **kwargs)
        end = self.clock()
        entry = self._open.get(id(scheduler_output))
        if entry is not None and entry[0] is scheduler_output:
            self._close(scheduler_output, entry[1], end, result)
        return result

    def _close(self, out, rec, end, result):
        self._open.pop(id(out), None)
        rec.start_s = max(rec.sched_s, self._last_end)
        rec.end_s = max(end, rec.start_s)
        self._last_end = rec.end_s
        self.steps.append(rec)
        for rid, _ in rec.order:
            r = self.records.get(rid)
            if r is not None and r.scheduled_s is None:
                r.scheduled_s = rec.start_s
        if not result:
            return
        for outputs in result.values():
            for o in getattr(outputs, "outputs", None) or ():
                r = self.records.get(o.request_id)
                if r is None:
                    continue
                r.token_times.extend([rec.end_s] * len(o.new_token_ids or ()))
                if o.finish_reason is not None and r.completion_s is None:
                    r.completion_s = rec.end_s
                    r.finish_reason = str(getattr(o.finish_reason, "name", o.finish_reason)).lower()


# --------------------------------------------------------------------------------------------- observe_vllm


def observe_vllm(model_path, requests_df: pd.DataFrame, out_dir, *, num_gpu_blocks_override: int | None = None,
                 max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                 block_size: int | None = None, enable_prefix_caching: bool = False,
                 enable_chunked_prefill: bool | None = None, seed: int = 0, max_model_len: int | None = None,
                 enforce_eager: bool | None = None, async_scheduling: bool | None = None,
                 threads: int | None = None, extra_engine_args: dict | None = None, progress=None) -> Path:
    """Run vLLM on ``requests_df`` with dummy weights and record every scheduler step into ``out_dir``.

    Args:
        model_path: a Hugging Face ``config.json`` or a folder holding one (weights are dummy).
        requests_df: a servesim trace (``request_id, arrival_s, prompt_tokens, output_tokens``; an optional
            ``block_hashes`` column makes requests with equal prefix hashes share prompt tokens).
        num_gpu_blocks_override ... enable_chunked_prefill, max_model_len, enforce_eager, async_scheduling: passed
            to ``vllm.LLM`` when not None. ``enable_prefix_caching`` is always passed (vLLM 0.32 turns it on by
            default; off here so preempted requests recompute in full, as servesim models them).
        seed: the engine's seed and the seed of the prompt token ids.
        threads: torch intra-op threads for the in-process engine (CPU). On a shared machine 1 keeps step times
            stable (``OMP_NUM_THREADS=1`` does the same); None leaves torch's default.
        extra_engine_args: more ``vllm.LLM`` keyword arguments (they win over the ones above).
        progress: optional callable ``progress(num_finished, num_requests)`` called after each step.
    Returns ``Path(out_dir)``. Raises ImportError when vllm is not installed, ValueError / FileNotFoundError for
    bad input (one line), RuntimeError if the engine stalls.
    """
    t_setup = time.perf_counter()
    df = check_trace(requests_df)
    model_dir, hf_config = resolve_model_config(model_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(df) and max_model_len is not None:
        too_long = df[df["prompt_tokens"] + df["output_tokens"] > max_model_len]
        if len(too_long):
            r = too_long.iloc[0]
            raise ValueError(f"request {int(r.request_id)}: prompt_tokens + output_tokens = "
                             f"{int(r.prompt_tokens + r.output_tokens)} exceeds max_model_len {max_model_len}")

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # keep the engine core (and its scheduler) in-process
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise ImportError(f"vllm is not importable ({exc}); install it with: pip install -e \".[vllm]\"") from exc
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:                                   # older layouts
        from vllm.inputs.data import TokensPrompt
    import torch

    kwargs = dict(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, seed=seed,
                  enable_prefix_caching=enable_prefix_caching)
    on_cuda = _accelerator(torch)
    if not on_cuda:
        kwargs["gpu_memory_utilization"] = 0.25          # on CPU: the fraction of RAM reserved for the KV cache
    for key, value in (("num_gpu_blocks_override", num_gpu_blocks_override),
                       ("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs),
                       ("block_size", block_size), ("enable_chunked_prefill", enable_chunked_prefill),
                       ("max_model_len", max_model_len), ("enforce_eager", enforce_eager),
                       ("async_scheduling", async_scheduling)):
        if value is not None:
            kwargs[key] = value
    kwargs.update(extra_engine_args or {})

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        torch.set_num_threads(threads)                   # before vLLM's CPU worker pins torch.set_num_threads
    t_init = time.perf_counter()
    llm = LLM(**kwargs)
    init_s = time.perf_counter() - t_init
    engine = llm.llm_engine
    try:
        _run(engine, llm, df, out, hf_config=hf_config, model_dir=model_dir, kwargs=kwargs, init_s=init_s,
             setup_s=time.perf_counter() - t_setup - init_s, seed=seed, on_cuda=on_cuda, vllm=vllm, torch=torch,
             SamplingParams=SamplingParams, TokensPrompt=TokensPrompt, progress=progress)
    finally:
        shutdown = getattr(engine.engine_core, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:                            # best effort: the files are written (or the run failed)
                pass
    return out


def _accelerator(torch) -> bool:
    """Whether vLLM runs on an accelerator (its platform, else torch.cuda)."""
    try:
        from vllm.platforms import current_platform
        return not current_platform.is_cpu()
    except Exception:
        return bool(torch.cuda.is_available())


def _device_name(torch) -> str:
    try:
        from vllm.platforms import current_platform
        return str(current_platform.get_device_name())
    except Exception:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown accelerator"


def _run(engine, llm, df, out, *, hf_config, model_dir, kwargs, init_s, setup_s, seed, on_cuda, vllm, torch,
         SamplingParams, TokensPrompt, progress):
    """Drive the engine step by step on the wall clock and write the outputs."""
    vllm_config = engine.vllm_config
    core = getattr(engine.engine_core, "engine_core", None)
    scheduler = getattr(core, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "schedule"):
        raise RuntimeError("vLLM's engine core is not in-process (VLLM_ENABLE_V1_MULTIPROCESSING must be 0 before "
                           "vllm starts); cannot observe its scheduler")

    mm_len = vllm_config.model_config.max_model_len
    too_long = df[df["prompt_tokens"] + df["output_tokens"] > mm_len]
    if len(too_long):
        r = too_long.iloc[0]
        raise ValueError(f"request {int(r.request_id)}: prompt_tokens + output_tokens = "
                         f"{int(r.prompt_tokens + r.output_tokens)} exceeds the engine's max_model_len {mm_len}")

    vocab = int(hf_config.get("vocab_size") or vllm_config.model_config.get_vocab_size())
    token_ids = prompt_token_ids(df, vocab, seed)

    try:
        load_at_start = list(os.getloadavg())
    except OSError:
        load_at_start = None
    t0 = time.perf_counter()

    def clock():
        return time.perf_counter() - t0

    recorder = SchedulerRecorder(scheduler, clock)
    by_vllm_id: dict[str, _ReqRecord] = recorder.records
    pending = deque(range(len(df)))
    arrivals = df["arrival_s"].to_numpy(dtype=float)
    num_finished = 0
    try:
        while True:
            now = clock()
            while pending and arrivals[pending[0]] <= now:
                i = pending.popleft()
                row = df.iloc[i]
                rec = _ReqRecord(int(row.request_id), float(row.arrival_s), int(row.prompt_tokens),
                                 int(row.output_tokens))
                o = rec.output_tokens
                params = SamplingParams(max_tokens=o, min_tokens=o, ignore_eos=True, detokenize=False)
                vid = engine.add_request(str(rec.request_id), TokensPrompt(prompt_token_ids=token_ids[i]), params)
                rec.added_s = clock()
                by_vllm_id[vid if isinstance(vid, str) else str(rec.request_id)] = rec
            if not engine.has_unfinished_requests():
                if not pending:
                    break
                time.sleep(max(0.0, arrivals[pending[0]] - clock()))
                continue
            for output in engine.step():
                if getattr(output, "finished", False):
                    num_finished += 1
            if progress is not None:
                progress(num_finished, len(df))
            if recorder.empty_steps >= STALL_STEPS and not scheduler.running:
                stuck = [r.request_id for r in by_vllm_id.values() if r.completion_s is None]
                raise RuntimeError(f"vLLM scheduled nothing for {STALL_STEPS} steps with nothing running and "
                                   f"requests {stuck[:5]} waiting (does the KV cache hold their prompts?)")
        wall_s = clock()
    finally:
        recorder.restore()

    _write_outputs(out, df, recorder, llm=llm, vllm=vllm, torch=torch, hf_config=hf_config, model_dir=model_dir,
                   kwargs=kwargs, init_s=init_s, wall_s=wall_s, setup_s=setup_s, seed=seed,
                   prefix_sharing=bool("block_hashes" in df.columns and df.attrs.get("hash_block_tokens")),
                   on_cuda=on_cuda, load_at_start=load_at_start)


def _write_outputs(out: Path, df, recorder: SchedulerRecorder, *, llm, vllm, torch, hf_config, model_dir, kwargs,
                   init_s, wall_s, setup_s, seed, prefix_sharing, on_cuda, load_at_start):
    id_of = {vid: r.request_id for vid, r in recorder.records.items()}
    # ---- plans.jsonl and iterations.csv (progress per request tracked for the decode rule's sake)
    plan_lines, iters = [], {k: [] for k in ITERATION_COLUMNS}
    for k, st in enumerate(recorder.steps):
        new_tokens = {str(id_of.get(v, v)): n for v, n in st.order}
        contexts = {str(id_of.get(v, v)): st.context[v] for v, _ in st.order}
        preempted = [int(id_of[v]) if v in id_of else v for v in st.preempted]
        plan = dict(zip(PLAN_KEYS, (k, st.start_s, st.end_s - st.start_s, new_tokens, contexts, preempted)))
        plan_lines.append(json.dumps(plan))
        n_dec = sum(1 for v, _ in st.order if st.decode[v])
        iters["start_s"].append(st.start_s)
        iters["duration_s"].append(st.end_s - st.start_s)
        iters["batch_size"].append(len(st.order))
        iters["num_prefill_tokens"].append(sum(n for v, n in st.order if not st.decode[v]))
        iters["num_decode_tokens"].append(n_dec)
        iters["kv_blocks_used"].append(np.nan if st.kv_used is None else st.kv_used)
        iters["kv_blocks_total"].append(np.nan if recorder.kv_blocks_total is None else recorder.kv_blocks_total)
    _atomic_write_text(out / "plans.jsonl", "".join(line + "\n" for line in plan_lines))
    _atomic_write_csv(out / "iterations.csv", pd.DataFrame(iters, columns=ITERATION_COLUMNS))

    # ---- requests.csv, tokens.csv
    records = sorted(recorder.records.values(), key=lambda r: r.request_id)
    rows, tok_rows, mismatched = [], [], []
    for r in records:
        first = r.token_times[0] if r.token_times else None
        rows.append(dict(request_id=r.request_id, arrival_s=r.arrival_s, prompt_tokens=r.prompt_tokens,
                         output_tokens=r.output_tokens, scheduled_s=r.scheduled_s, first_token_s=first,
                         completion_s=r.completion_s, num_preemptions=r.num_preemptions))
        tok_rows.extend((r.request_id, j, t) for j, t in enumerate(r.token_times))
        if len(r.token_times) != r.output_tokens:
            mismatched.append(r.request_id)
    _atomic_write_csv(out / "requests.csv", requests_frame(rows))
    _atomic_write_csv(out / "tokens.csv", pd.DataFrame.from_records(tok_rows, columns=TOKEN_COLUMNS))

    # ---- meta.json
    vc = llm.llm_engine.vllm_config
    sch = recorder.scheduler
    sched_cfg = config_dict(vc.scheduler_config)
    sched_cfg.update({
        "scheduler_class": f"{type(sch).__module__}.{type(sch).__qualname__}",
        "max_num_scheduled_tokens_effective": getattr(sch, "max_num_scheduled_tokens", None),
        "max_num_running_reqs": getattr(sch, "max_num_running_reqs", None),
        "max_model_len": vc.model_config.max_model_len,
        "num_lookahead_tokens": getattr(sch, "num_lookahead_tokens", None),
        "num_spec_tokens": getattr(sch, "num_spec_tokens", None),
        "speculative_config": None if vc.speculative_config is None else repr(vc.speculative_config),
        "use_v2_model_runner": getattr(vc, "use_v2_model_runner", None),
    })
    cache_cfg = config_dict(vc.cache_config)
    lags = [r.added_s - r.arrival_s for r in records if r.added_s is not None]
    model = {k: hf_config[k] for k in MODEL_KEYS if k in hf_config}
    model.update({"path": str(model_dir), "dtype_used": str(vc.model_config.dtype),
                  "max_model_len": vc.model_config.max_model_len, "load_format": "dummy"})
    device = _device_name(torch) if on_cuda else "cpu"
    nblocks = vc.cache_config.num_gpu_blocks
    host = host_info()
    host["load_average_at_start"] = load_at_start
    host["torch_threads"] = torch.get_num_threads()
    host["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    meta = {
        "engine": "vllm",
        "vllm_version": getattr(vllm, "__version__", None),
        "device": device,
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "host": host,
        "model": model,
        "num_gpu_blocks": nblocks,
        "block_size": getattr(sch, "block_size", vc.cache_config.block_size),
        "kv_blocks_total": recorder.kv_blocks_total,
        "kv_blocks": ("iterations.csv kv_blocks_total = num_gpu_blocks - 1 (vLLM reserves block 0 as its null "
                      "block); kv_blocks_used = that minus the block pool's free blocks right after schedule() "
                      "(prefix-cached blocks no request holds count as free)") if recorder.block_pool is not None
        else "the scheduler's block pool was not reachable: kv_blocks_used/kv_blocks_total are NaN",
        "scheduler_config": sched_cfg,
        "cache_config": cache_cfg,
        "engine_args": _jsonable(kwargs),
        "num_requests": len(df),
        "num_completed": sum(1 for r in records if r.completion_s is not None),
        "num_steps": len(recorder.steps),
        "num_preemptions": sum(len(st.preempted) for st in recorder.steps),
        "output_token_mismatch": mismatched[:20],
        "wall_s": wall_s,
        "engine_init_s": init_s,
        "setup_s": setup_s,
        "arrival_lag_s": {**lag_stats(lags),
                          "meaning": "wall time the request was added minus its trace arrival_s"},
        "requests_added_s": {str(r.request_id): r.added_s for r in records},
        "times": ("seconds since the run started; a step runs from schedule() (or the previous step's end, if "
                  "later) to the end of update_from_output(); its tokens are emitted at its end; arrival_s is the "
                  "trace's"),
        "prompt_token_ids": {"seed": seed, "rule": "simulator.observe.prompt_token_ids", "prefix_sharing":
                             prefix_sharing},
        "plans": True,
        "format_version": FORMAT_VERSION,
    }
    _atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
