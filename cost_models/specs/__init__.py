"""Model and device specifications, loaded from the YAML files beside this module.

``load_model(name_or_path)`` accepts a built-in name (case-insensitive: ``Mistral-7B``, ``llama-2-70b``, ``tiny`` …),
a path to one of our YAML specs, or a path to a Hugging Face ``config.json`` (or a folder holding one).
``load_device(name_or_path)`` accepts a built-in name or alias (``A100``, ``H100``, ``a40`` …) or a YAML path.

Errors: ``SpecError`` (a ``ValueError``), one line, naming the unknown name and listing the known ones, or naming the
file and field that is missing or malformed. Validation (``model_problem``, ``device_problem``; run on every load
and when a spec is constructed): every size and count of a model (layers, hidden size, heads, KV heads, head_dim, FFN
size, vocabulary, max_model_len, context_length when given) is a positive integer and the attention heads divide
by the KV heads (grouped-query attention shares each KV head among a whole number of query heads); ``mlp``,
``norm`` and ``dtype`` are known values; a device's memory, memory bandwidth and every peak FLOP/s are positive, its
interconnect bandwidth positive when given (0 = not given) and its latency not negative.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

SPEC_DIR = Path(__file__).resolve().parent
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8": 1}


class SpecError(ValueError):
    """A model or device spec that is unknown or malformed."""


MODEL_POSITIVE_INTS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
                       "intermediate_size", "vocab_size", "max_model_len")
MLP_KINDS = ("gated", "plain")
NORM_KINDS = ("rmsnorm", "layernorm")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def model_problem(values: dict, keys: dict | None = None) -> str | None:
    """The first problem of a model's field ``values`` as ``"KEY: must be ..., got V"``, or None.

    ``keys`` maps a field to the name it has in the source file (a Hugging Face config names ``num_layers``
    ``num_hidden_layers``); the message names both then."""
    keys = keys or {}

    def name(field):
        return f"{keys[field]} ({field})" if keys.get(field, field) != field else field

    for field in MODEL_POSITIVE_INTS + ("context_length",):
        v = values.get(field)
        if field == "context_length" and v is None:
            continue
        if not (_is_int(v) and v > 0):
            return f"{name(field)}: must be a positive integer, got {v!r}"
    heads, kv = values["num_attention_heads"], values["num_kv_heads"]
    if heads % kv:
        return (f"{name('num_attention_heads')}: {heads} attention heads do not divide by "
                f"{name('num_kv_heads')} = {kv} KV heads")
    for field, allowed in (("mlp", MLP_KINDS), ("norm", NORM_KINDS), ("dtype", tuple(DTYPE_BYTES))):
        if field in values and values[field] not in allowed:
            return f"{name(field)}: must be one of {', '.join(allowed)}, got {values[field]!r}"
    return None


def device_problem(values: dict) -> str | None:
    """The first problem of a device's field ``values`` as ``"KEY: must be ..., got V"``, or None."""
    for field in ("memory_bytes", "memory_bandwidth_bytes_per_s"):
        v = values.get(field)
        if not (_is_number(v) and v > 0):
            return f"{field}: must be a positive number, got {v!r}"
    for dtype, v in dict(values.get("peak_flops") or {}).items():
        if not (_is_number(v) and v > 0):
            return f"peak_flops.{dtype}: must be a positive number, got {v!r}"
    v = values.get("interconnect_bandwidth_bytes_per_s", 0.0)
    if not (_is_number(v) and v >= 0):
        return f"interconnect_bandwidth_bytes_per_s: must be a positive number (or 0: not given), got {v!r}"
    v = values.get("interconnect_latency_s", 0.0)
    if not (_is_number(v) and v >= 0):
        return f"interconnect_latency_s: must be a number >= 0, got {v!r}"
    return None


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only transformer. Token counts are tokens; sizes are elements unless named ``_bytes``.

    ``mlp`` is ``"gated"`` (SwiGLU: gate and up projections of ``hidden x ffn`` each, then down) or ``"plain"``
    (one up projection, GELU, down; Falcon). ``norm`` is ``"rmsnorm"`` or ``"layernorm"``.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_model_len: int
    mlp: str = "gated"
    norm: str = "rmsnorm"
    dtype: str = "float16"
    hf_id: str = ""
    parallel_attn: bool = False
    context_length: int | None = None      # the model's position limit; None: max_model_len

    def __post_init__(self):
        problem = model_problem(asdict(self))
        if problem:
            raise SpecError(f"model {self.name}: {problem}")

    @property
    def max_context(self) -> int:
        """The longest sequence the model supports (``context_length``, else ``max_model_len``); a longer
        ``--max-model-len`` needs ``--allow-long-max-model-len``."""
        return self.context_length or self.max_model_len

    @property
    def layer_all_reduces(self) -> int:
        """All-reduces per layer under tensor parallelism: 2 (after attention and after the MLP), or 1 for a
        parallel attention + MLP block whose outputs are summed before one reduction (Falcon; vLLM
        ``FalconDecoderLayer`` with ``reduce_row_parallel_results=False``)."""
        return 1 if self.parallel_attn else 2

    @property
    def layer_norms(self) -> int:
        """Norms per layer: 2 (before attention and before the MLP), or 1 shared by a parallel block."""
        return 1 if self.parallel_attn else 2

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Weights of one decoder layer (elements), excluding norms' negligible vectors."""
        qkv = self.hidden_size * (self.q_size + 2 * self.kv_size)
        out = self.q_size * self.hidden_size
        mlp_in = (2 if self.mlp == "gated" else 1) * self.hidden_size * self.intermediate_size
        mlp_out = self.intermediate_size * self.hidden_size
        return qkv + out + mlp_in + mlp_out + 2 * self.hidden_size

    def num_params(self) -> int:
        """All weights (elements): layers, input embedding and untied LM head."""
        return self.num_layers * self.layer_params() + 2 * self.vocab_size * self.hidden_size

    def weight_bytes(self, tp: int = 1, pp: int = 1) -> int:
        """Weight bytes held by one GPU under tensor parallelism ``tp`` and pipeline parallelism ``pp``."""
        return int(self.num_params() * self.dtype_bytes / (tp * pp))

    def kv_bytes_per_token(self, tp: int = 1, pp: int = 1) -> int:
        """KV-cache bytes one token occupies on one GPU: 2 (K,V) x kv_heads/tp x head_dim x layers/pp x dtype."""
        kv_heads = max(1, self.num_kv_heads // tp)
        return 2 * kv_heads * self.head_dim * (self.num_layers // pp) * self.dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator. FLOPs are per second dense (no sparsity); bandwidths bytes per second per direction."""

    name: str
    memory_bytes: int
    peak_flops: dict = field(default_factory=dict)
    memory_bandwidth_bytes_per_s: float = 0.0
    interconnect_bandwidth_bytes_per_s: float = 0.0
    interconnect_latency_s: float = 0.0
    aliases: tuple = ()

    def __post_init__(self):
        problem = device_problem(asdict(self))
        if problem:
            raise SpecError(f"device {self.name}: {problem}")

    def flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for ``dtype``; falls back to float16. Raises SpecError if neither is given."""
        value = self.peak_flops.get(dtype, self.peak_flops.get("float16"))
        if value is None:
            raise SpecError(f"device {self.name}: peak_flops has no entry for {dtype} (nor float16); "
                            f"has {', '.join(self.peak_flops) or 'none'}")
        return float(value)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d


_MODEL_FIELDS = {f for f in ModelSpec.__dataclass_fields__}
_DEVICE_FIELDS = {f for f in DeviceSpec.__dataclass_fields__}


def safe_load_yaml(text: str):
    """``yaml.safe_load(text)``, parsed by libyaml (``yaml.CSafeLoader``, several times faster: the spec files are
    read on every run) when PyYAML was built with it. The values are the same: the same resolver and constructor
    turn the events into objects. Text libyaml rejects is parsed again by the pure-Python loader, so that errors
    (``yaml.YAMLError``) read as ``safe_load``'s."""
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is not None:
        try:
            return yaml.load(text, Loader=loader)
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)


def _read_yaml(path: Path) -> dict:
    try:
        data = safe_load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (YAML expected)") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields")
    return data


def _build(cls, data: dict, required: set, source: str):
    missing = sorted(required - set(data))
    if missing:
        raise SpecError(f"{source}: missing field(s) {', '.join(missing)}")
    kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
    check = model_problem if cls is ModelSpec else device_problem
    if cls is ModelSpec:
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        problem = check({**defaults, **kwargs}) if not (set(MODEL_POSITIVE_INTS) - set(kwargs)) else None
    else:
        problem = check(kwargs)
    if problem:
        raise SpecError(f"{source}: {problem}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SpecError(f"{source}: {exc}") from None


@lru_cache(maxsize=None)
def _builtin(kind: str) -> dict:
    """Map lower-cased name/alias/file stem -> file path, for ``kind`` in {"models", "devices"}."""
    table = {}
    for path in sorted((SPEC_DIR / kind).glob("*.yaml")):
        data = _read_yaml(path)
        for key in [path.stem, data.get("name", path.stem), data.get("hf_id", ""), *data.get("aliases", [])]:
            if key:
                table[str(key).lower()] = path
    return table


def known_models() -> list[str]:
    return sorted({_read_yaml(p)["name"] for p in _builtin("models").values()})


def known_devices() -> list[str]:
    return sorted({_read_yaml(p)["name"] for p in _builtin("devices").values()})


def _from_hf_config(path: Path) -> ModelSpec:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (JSON expected)") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{path}: expected a JSON object of fields")
    keys: dict[str, str] = {}          # ModelSpec field -> the config key it was read from

    def get(field, *names, default=None):
        for n in names:
            if n in cfg and cfg[n] is not None:
                keys[field] = n
                return cfg[n]
        if default is None:
            raise SpecError(f"{path}: missing field {names[0]}")
        return default

    hidden = get("hidden_size", "hidden_size", "d_model", "n_embd")
    heads = get("num_attention_heads", "num_attention_heads", "n_head", "num_heads")
    kv_heads = get("num_kv_heads", "num_key_value_heads", "num_kv_heads", "n_head_kv", default=heads)
    if cfg.get("multi_query") and "num_kv_heads" not in cfg:
        kv_heads = 1
    ffn = get("intermediate_size", "intermediate_size", "ffn_hidden_size", "n_inner",
              default=4 * hidden if _is_int(hidden) else hidden)
    if cfg.get("head_dim"):
        keys["head_dim"] = "head_dim"
        head_dim = cfg["head_dim"]
    else:      # hidden / heads, once both are valid (else the check below names the bad one)
        head_dim = hidden // heads if _is_int(hidden) and _is_int(heads) and heads > 0 else hidden
    act = cfg.get("hidden_act") or cfg.get("activation_function") or cfg.get("activation")
    if act is None:   # Falcon, GPT-2, OPT, BLOOM, GPT-NeoX configs name no activation or use their own key: GELU
        act = "gelu" if cfg.get("model_type") in ("falcon", "RefinedWeb", "RefinedWebModel", "gpt2", "opt", "bloom",
                                                     "gpt_neox", "gptj") else "silu"
    act = str(act).lower()
    torch_dtype = str(cfg.get("torch_dtype", "float16")).replace("torch.", "")
    values = dict(
        name=str(cfg.get("_name_or_path") or path.parent.name or "hf-model"),
        num_layers=get("num_layers", "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=ffn,
        vocab_size=get("vocab_size", "vocab_size"),
        max_model_len=get("max_model_len", "max_position_embeddings", "n_positions", "max_seq_len", default=4096),
        mlp="gated" if act in ("silu", "swiglu", "swish") else "plain",
        norm="layernorm" if "layer_norm_epsilon" in cfg or "layer_norm_eps" in cfg else "rmsnorm",
        dtype=torch_dtype if torch_dtype in DTYPE_BYTES else "float16",
        parallel_attn=bool(cfg.get("parallel_attn", False)),
    )
    for field in MODEL_POSITIVE_INTS:      # JSON writers may spell an integer 4096.0; 4096.5 stays an error
        v = values[field]
        if isinstance(v, float) and v.is_integer():
            values[field] = int(v)
    problem = model_problem(values, keys)
    if problem:
        raise SpecError(f"{path}: {problem}")
    return ModelSpec(**values)


def load_model(name_or_path: str | Path) -> ModelSpec:
    """Return the ModelSpec for a built-in name, a YAML spec path, or a Hugging Face config.json (or its folder)."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    key = str(name_or_path)
    path = Path(key)
    if path.is_dir() and (path / "config.json").exists():
        path = path / "config.json"
    if path.is_file():
        if path.suffix == ".json":
            return _from_hf_config(path)
        data = _read_yaml(path)
        return _build(ModelSpec, data, _MODEL_FIELDS - {"mlp", "norm", "dtype", "hf_id", "parallel_attn",
                                                        "context_length"}, str(path))
    found = _builtin("models").get(key.lower())
    if found is None:
        raise SpecError(f"unknown model {key!r}; known models: {', '.join(known_models())} "
                        f"(or pass a YAML spec or a Hugging Face config.json path)")
    return _build(ModelSpec, _read_yaml(found), set(), str(found))


def load_device(name_or_path: str | Path) -> DeviceSpec:
    """Return the DeviceSpec for a built-in name or alias, or a YAML spec path."""
    if isinstance(name_or_path, DeviceSpec):
        return name_or_path
    key = str(name_or_path)
    path = Path(key)
    if path.is_file():
        data = _read_yaml(path)
        source = str(path)
    else:
        found = _builtin("devices").get(key.lower())
        if found is None:
            raise SpecError(f"unknown device {key!r}; known devices: {', '.join(known_devices())} "
                            f"(or pass a YAML spec path)")
        data, source = _read_yaml(found), str(found)
    data = dict(data)
    data["aliases"] = tuple(data.get("aliases", ()))
    # PyYAML (YAML 1.1) reads 2.039e12 without a sign as a string: coerce every number explicitly.
    try:
        for key in ("memory_bytes", "memory_bandwidth_bytes_per_s", "interconnect_bandwidth_bytes_per_s",
                    "interconnect_latency_s"):
            if key in data:
                data[key] = float(data[key]) if key != "memory_bytes" else int(float(data[key]))
        key = "peak_flops"
        data["peak_flops"] = {k: float(v) for k, v in dict(data.get("peak_flops") or {}).items()}
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{source}: field {key} is not a number: {exc}") from None
    if "peak_flops" in data and "float16" not in data["peak_flops"]:
        raise SpecError(f"{source}: field peak_flops needs a float16 entry (the fallback for other dtypes); "
                        f"has {', '.join(data['peak_flops']) or 'none'}")
    return _build(DeviceSpec, data, {"name", "memory_bytes", "peak_flops", "memory_bandwidth_bytes_per_s"}, source)
