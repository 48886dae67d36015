"""One flat configuration for a simulation. YAML files and CLI flags share these keys (``token_budget`` in YAML is
``--token-budget`` on the command line).

Errors: ``ConfigError`` (a ``ValueError``) naming the file and the unknown or malformed key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from cost_models.specs import safe_load_yaml

SCHEDULER_NAMES = ("vllm", "vllm-v0", "sarathi", "simple-chunking", "orca", "fastertransformer")
ROUTER_NAMES = ("round-robin", "least-outstanding", "least-tokens", "kv-aware", "prefix-affinity")
DEFAULT_NUM_REQUESTS = 2048
DEFAULT_QPS = 2.0


#: other names accepted for config keys (vLLM's and earlier servesim's), documented once
ALIASES = {"max_batch_size": "max_num_seqs", "request_rate": "qps"}


class ConfigError(ValueError):
    """A configuration key that is unknown or has a bad value."""


# key -> (kind, allowed values or None). Kinds: "posint", "optposint", "nonnegint", "posfloat", "fraction",
# "unitfraction", "bool", "str", "optstr", "choice".
_CHECKS = {
    "model": ("str", None), "device": ("optstr", None), "node": ("optstr", None), "num_nodes": ("optposint", None),
    "tp": ("posint", None), "pp": ("posint", None), "replicas": ("posint", None), "router": ("choice", ROUTER_NAMES),
    "prefill_replicas": ("nonnegint", None), "decode_replicas": ("nonnegint", None),
    "prefill_tp": ("optposint", None), "prefill_pp": ("optposint", None), "decode_tp": ("optposint", None),
    "decode_pp": ("optposint", None), "kv_transfer_bandwidth": ("optposfloat", None),
    "kv_transfer_latency": ("optnonnegfloat", None),
    "scheduler": ("choice", SCHEDULER_NAMES), "token_budget": ("posint", None),
    "max_num_seqs": ("optposint", None), "max_num_batched_tokens": ("optposint", None),
    "max_model_len": ("optposint", None), "allow_long_max_model_len": ("bool", None), "block_size": ("posint", None),
    "gpu_memory_utilization": ("unitfraction", None), "watermark": ("optfraction", None),
    "num_kv_blocks": ("optposint", None), "enable_prefix_caching": ("optbool", None),
    "cost_model": ("optstr", None), "engine": ("optstr", None), "trace": ("str", None), "num_requests": ("optposint", None),
    "qps": ("optposfloat", None), "concurrency": ("optposint", None), "input_len": ("optposint", None),
    "output_len": ("optposint", None), "range_ratio": ("optfraction", None), "arrival": ("choice", ("poisson", "gamma")), "cv": ("posfloat", None),
    "retime": ("bool", None), "shuffle": ("bool", None), "drop_long": ("bool", None), "shrink_long": ("bool", None), "fast_forward": ("bool", None), "seed": ("nonnegint", None),
}


def _check_field(key: str, value) -> None:
    kind, allowed = _CHECKS[key]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = (is_int or isinstance(value, float)) and value == value
    ok = {
        "posint": is_int and value >= 1,
        "optposint": value is None or (is_int and value >= 1),
        "nonnegint": is_int and value >= 0,
        "posfloat": is_num and value > 0,
        "optposfloat": value is None or (is_num and value > 0),
        "optnonnegfloat": value is None or (is_num and value >= 0),
        "fraction": is_num and 0 <= value < 1,
        "optfraction": value is None or (is_num and 0 <= value < 1),
        "optbool": value is None or isinstance(value, bool),
        "unitfraction": is_num and 0 < value <= 1,
        "bool": isinstance(value, bool),
        "str": isinstance(value, str) and value != "",
        "optstr": value is None or (isinstance(value, str) and value != ""),
        "choice": value in (allowed or ()),
    }[kind]
    if not ok:
        want = {
            "posint": "a positive integer", "optposint": "a positive integer or null",
            "nonnegint": "a non-negative integer", "posfloat": "a positive number", "fraction": "a number in [0, 1)",
            "optposfloat": "a positive number or null", "optnonnegfloat": "a non-negative number or null",
            "optfraction": "a number in [0, 1) or null", "optbool": "true, false or null",
            "unitfraction": "a number in (0, 1]", "bool": "true or false", "str": "a non-empty string",
            "optstr": "a non-empty string or null", "choice": "one of " + ", ".join(allowed or ()),
        }[kind]
        raise ConfigError(f"{key}: must be {want}, got {value!r}")


@dataclass(frozen=True)
class SimConfig:
    """Everything needed to rerun a simulation. Units: seconds, tokens, requests per second, bytes.

    Deployment: ``model``; ``device`` (None: the node spec's device, else A100-80GB-SXM); ``node`` (a node spec,
    ``cost_models/specs/nodes``; None: 8 GPUs of the device on its own interconnect) and ``num_nodes`` (None: as
    many as needed); ``tp``/``pp`` per replica; ``replicas`` identical replicas behind ``router``; or, when
    ``prefill_replicas`` and ``decode_replicas`` are set (> 0), a disaggregated cluster whose pools may override
    ``prefill_tp``/``prefill_pp``/``decode_tp``/``decode_pp`` and whose KV transfers use ``kv_transfer_bandwidth``
    (bytes/s) and ``kv_transfer_latency`` (s) (None: the node's inter-node link).
    Scheduler: ``scheduler`` and its options — ``token_budget`` (sarathi, simple-chunking),
    ``max_num_batched_tokens`` (vllm: None = vLLM 0.32's default for the device; vllm-v0: None = max_model_len);
    ``max_num_seqs`` (None: the policy's default, 128 for Sarathi-Serve and vLLM v0, 16 for Orca and
    FasterTransformer, vLLM's device default for vllm); ``watermark`` (None: the policy's: 0.01 vLLM v0/Sarathi,
    0 for vLLM v1). ``max_model_len``: None means the model spec's context length; above it is an error unless
    ``allow_long_max_model_len`` (vLLM's ``VLLM_ALLOW_LONG_MAX_MODEL_LEN``). KV cache: ``block_size`` tokens per
    block, ``gpu_memory_utilization``, ``num_kv_blocks`` (None: computed from memory; vLLM's
    ``num_gpu_blocks_override``), ``enable_prefix_caching`` (None: off; needs traces with block hashes).
    ``cost_model``: None prices iterations with the roofline model; a folder made by ``servesim fit`` uses that
    fitted model. Trace keys: ``trace`` is a built-in workload or a file; ``num_requests`` None means
    ``DEFAULT_NUM_REQUESTS`` (2048, the Sarathi-Serve capacity trials) for a built-in workload and every request of
    a file; ``qps`` sets arrivals of generated traces and of files without arrival times, or of any file when
    ``retime`` is true; ``arrival`` is ``poisson`` or ``gamma`` (with coefficient of variation ``cv``).
    """

    model: str = "Mistral-7B"
    device: str | None = None
    node: str | None = None
    num_nodes: int | None = None
    tp: int = 1
    pp: int = 1
    replicas: int = 1
    router: str = "round-robin"
    prefill_replicas: int = 0
    decode_replicas: int = 0
    prefill_tp: int | None = None
    prefill_pp: int | None = None
    decode_tp: int | None = None
    decode_pp: int | None = None
    kv_transfer_bandwidth: float | None = None
    kv_transfer_latency: float | None = None
    scheduler: str = "sarathi"
    token_budget: int = 512
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    allow_long_max_model_len: bool = False
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    watermark: float | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool | None = None
    cost_model: str | None = None
    engine: str | None = None
    trace: str = "sharegpt"
    num_requests: int | None = None
    qps: float | None = None
    concurrency: int | None = None
    input_len: int | None = None
    output_len: int | None = None
    range_ratio: float | None = None
    arrival: str = "poisson"
    cv: float = 1.0
    retime: bool = False
    shuffle: bool = False
    drop_long: bool = False
    shrink_long: bool = False
    fast_forward: bool = True
    seed: int = 42

    def __post_init__(self):
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name))
        if (self.prefill_replicas > 0) != (self.decode_replicas > 0):
            raise ConfigError("prefill_replicas, decode_replicas: a disaggregated cluster needs both (> 0)")
        if self.trace != "random":
            for key in ("input_len", "output_len", "range_ratio"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{key}: only for --trace random (the trace is {self.trace!r})")

    @property
    def workload_options(self) -> dict:
        """Keyword options of the built-in workload (``random``'s lengths)."""
        return {k: getattr(self, k) for k in ("input_len", "output_len", "range_ratio") if getattr(self, k) is not None}

    @property
    def disaggregated(self) -> bool:
        return self.prefill_replicas > 0

    @property
    def effective_qps(self) -> float:
        """``qps``, or ``DEFAULT_QPS`` (2.0) when unset; an explicit ``qps`` on a file with its own arrival times
        and no ``retime`` is an error (``traces.load_trace(qps_explicit=True)``)."""
        return DEFAULT_QPS if self.qps is None else self.qps


    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "SimConfig":
        """A copy with ``changes`` applied (None values are ignored, so CLI flags left unset keep the file's)."""
        return replace(self, **{ALIASES.get(k, k): v for k, v in changes.items() if v is not None})

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


#: one line of help per key: the CLI's flags are generated from SimConfig's fields, these texts and _CHECKS
HELP = {
    "model": "Model: a built-in name (servesim specs), a YAML spec or a Hugging Face config.json.",
    "device": "GPU spec (A100, A100-80GB-PCIe, H100, H200, A40, cpu) or YAML; default: the node's, else A100.",
    "node": "Node spec: GPUs per node and links (servesim specs); default: 8 GPUs on the device's interconnect.",
    "num_nodes": "Nodes in the cluster; a deployment needing more is an error (default: as many as needed).",
    "tp": "Tensor-parallel degree of a replica.",
    "pp": "Pipeline-parallel stages of a replica (must divide the layers).",
    "replicas": "Identical replicas behind the router.",
    "router": "Global router assigning arriving requests to replicas.",
    "prefill_replicas": "Disaggregated: replicas of the prefill pool (with --decode-replicas).",
    "decode_replicas": "Disaggregated: replicas of the decode pool (with --prefill-replicas).",
    "prefill_tp": "Disaggregated: tensor parallelism of a prefill replica (default --tp).",
    "prefill_pp": "Disaggregated: pipeline stages of a prefill replica (default --pp).",
    "decode_tp": "Disaggregated: tensor parallelism of a decode replica (default --tp).",
    "decode_pp": "Disaggregated: pipeline stages of a decode replica (default --pp).",
    "kv_transfer_bandwidth": "Disaggregated: KV transfer bandwidth per prefill replica, bytes/s (default: network).",
    "kv_transfer_latency": "Disaggregated: KV transfer latency, seconds (default: the network link's).",
    "scheduler": "Scheduling policy (vllm = vLLM v1 0.32; vllm-v0 = the Sarathi-Serve paper's baseline).",
    "token_budget": "Token budget per iteration of sarathi / chunk size of simple-chunking (tokens).",
    "max_num_seqs": "Most running requests (default: 128 Sarathi/vLLM v0, 16 Orca/FT, vLLM's device default).",
    "max_num_batched_tokens": "vllm: token budget per step (default by device); vllm-v0: prefill tokens per "
                              "iteration (default max_model_len).",
    "max_model_len": "Longest request, prompt + output tokens (default: the model's context length).",
    "allow_long_max_model_len": "Allow --max-model-len above the model's context length.",
    "block_size": "Tokens per KV-cache block.",
    "gpu_memory_utilization": "Fraction of GPU memory for weights, activations and the KV cache.",
    "watermark": "Fraction of KV blocks kept free at admission (default: 0.01 vLLM v0/Sarathi, 0 vLLM v1).",
    "num_kv_blocks": "KV blocks per replica, overriding the computed size (vLLM's num_gpu_blocks_override).",
    "enable_prefix_caching": "Prefix caching of prompt blocks (vllm, sarathi; needs a trace with block hashes).",
    "cost_model": "Folder of a fitted cost model (servesim fit); default: the roofline model.",
    "engine": "Engine whose per-iteration overhead is priced (vidur-vllm-2023, sarathi-serve-2024, vllm-0.32, "
              "trtllm-1.0, none; default vidur-vllm-2023; cost_models/engine_overhead.py).",
    "trace": "Workload: sharegpt, arxiv, conversation, random, or a trace file (CSV, Azure CSV, Mooncake JSONL).",
    "num_requests": "Requests to simulate (default 2048 for built-in workloads, all of a file).",
    "qps": "Arrival rate, requests/s, of generated or re-timed traces (default 2.0).",
    "concurrency": "Closed loop: N clients, each sending its next request when its previous one completes "
                   "(vLLM bench's --max-concurrency); the trace's arrival times are ignored.",
    "input_len": "random workload: prompt tokens (vLLM's --random-input-len; default 1024).",
    "output_len": "random workload: output tokens (vLLM's --random-output-len; default 128).",
    "range_ratio": "random workload: lengths uniform in len x [1 - r, 1 + r] (vLLM's --random-range-ratio; 0).",
    "arrival": "Arrival process.",
    "cv": "Coefficient of variation of gamma inter-arrival times.",
    "retime": "Re-time a file trace's own arrivals to --qps.",
    "shuffle": "Seeded shuffle of a file trace's requests.",
    "drop_long": "Drop requests longer than max_model_len instead of shrinking them.",
    "shrink_long": "Accept a workload shrunk to max_model_len in a capacity search (simulate always shrinks).",
    "fast_forward": "Advance quiet stretches of decode iterations at once (identical results; off to compare).",
    "seed": "Seed of every random choice.",
}

#: extra flag names (vLLM's or earlier servesim's) for a key, documented once here
FLAG_ALIASES = {"qps": ("--request-rate",), "max_num_seqs": ("--max-batch-size",),
                "concurrency": ("--max-concurrency",)}


def read_yaml_mapping(path: str | Path, error: type[ValueError], what: str) -> dict:
    """Read a YAML file holding one mapping. Raises ``error`` naming the file when it is missing, is not valid
    YAML (first line of the parser's message) or is not a mapping (``what`` says what it should hold)."""
    path = Path(path)
    try:
        data = safe_load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (YAML expected)") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {what}")
    return data


def read_yaml_config(path: str | Path) -> dict:
    """Read a YAML mapping of ``SimConfig`` keys; raise ConfigError naming the file and any unknown key."""
    data = read_yaml_mapping(path, ConfigError, "configuration keys")
    data = {ALIASES.get(k, k): v for k, v in ((str(k).replace("-", "_"), v) for k, v in data.items())}
    unknown = sorted(set(data) - set(SimConfig.keys()))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(SimConfig.keys())}")
    return data


def load_config(path: str | Path | None = None, **overrides) -> SimConfig:
    """Defaults, then the YAML file's keys, then non-None ``overrides``."""
    base = SimConfig()
    if path is not None:
        data = read_yaml_config(path)
        try:
            base = replace(base, **data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return base.with_(**overrides)
