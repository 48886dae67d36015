"""One flat configuration for a simulation. YAML files and CLI flags share these keys (``token_budget`` in YAML is
``--token-budget`` on the command line).

Errors: ``ConfigError`` (a ``ValueError``) naming the file and the unknown or malformed key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

SCHEDULER_NAMES = ("vllm", "orca", "sarathi", "fastertransformer")
DEFAULT_NUM_REQUESTS = 2048


class ConfigError(ValueError):
    """A configuration key that is unknown or has a bad value."""


# key -> (kind, allowed values or None). Kinds: "posint", "optposint", "nonnegint", "posfloat", "fraction",
# "unitfraction", "bool", "str", "optstr", "choice".
_CHECKS = {
    "model": ("str", None), "device": ("str", None), "tp": ("posint", None), "pp": ("posint", None),
    "scheduler": ("choice", SCHEDULER_NAMES), "token_budget": ("posint", None),
    "max_batch_size": ("optposint", None), "max_num_batched_tokens": ("optposint", None),
    "max_model_len": ("optposint", None), "block_size": ("posint", None),
    "gpu_memory_utilization": ("unitfraction", None), "watermark": ("fraction", None),
    "cost_model": ("optstr", None), "trace": ("str", None), "num_requests": ("optposint", None),
    "qps": ("posfloat", None), "arrival": ("choice", ("poisson", "gamma")), "cv": ("posfloat", None),
    "retime": ("bool", None), "shuffle": ("bool", None), "drop_long": ("bool", None), "seed": ("nonnegint", None),
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
        "fraction": is_num and 0 <= value < 1,
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
            "unitfraction": "a number in (0, 1]", "bool": "true or false", "str": "a non-empty string",
            "optstr": "a non-empty string or null", "choice": "one of " + ", ".join(allowed or ()),
        }[kind]
        raise ConfigError(f"{key}: must be {want}, got {value!r}")


@dataclass(frozen=True)
class SimConfig:
    """Everything needed to rerun a simulation. Units: seconds, tokens, requests per second.

    ``max_batch_size``: None means each policy's paper default (128 sequences for vLLM and Sarathi-Serve, 16 for
    Orca and FasterTransformer). ``max_model_len``: None means the model spec's context length.
    ``max_num_batched_tokens`` (vLLM only): None means ``max_model_len``. ``cost_model``: None prices iterations
    with the roofline model; a folder made by ``servesim fit`` uses that fitted model.
    Trace keys: ``trace`` is ``sharegpt``, ``arxiv`` or a file; ``num_requests`` None means
    ``DEFAULT_NUM_REQUESTS`` (2048, the Sarathi-Serve capacity trials) for a built-in workload and every request of a file; ``qps`` sets arrivals of generated traces and of
    files without arrival times, or of any file when ``retime`` is true; ``arrival`` is ``poisson`` or ``gamma``
    (with coefficient of variation ``cv``).
    """

    model: str = "Mistral-7B"
    device: str = "A100-80GB-SXM"
    tp: int = 1
    pp: int = 1
    scheduler: str = "sarathi"
    token_budget: int = 512
    max_batch_size: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    watermark: float = 0.01
    cost_model: str | None = None
    trace: str = "sharegpt"
    num_requests: int | None = None
    qps: float = 2.0
    arrival: str = "poisson"
    cv: float = 1.0
    retime: bool = False
    shuffle: bool = False
    drop_long: bool = False
    seed: int = 42

    def __post_init__(self):
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name))

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "SimConfig":
        """A copy with ``changes`` applied (None values are ignored, so CLI flags left unset keep the file's)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def read_yaml_mapping(path: str | Path, error: type[ValueError], what: str) -> dict:
    """Read a YAML file holding one mapping. Raises ``error`` naming the file when it is missing, is not valid
    YAML (first line of the parser's message) or is not a mapping (``what`` says what it should hold)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {what}")
    return data


def read_yaml_config(path: str | Path) -> dict:
    """Read a YAML mapping of ``SimConfig`` keys; raise ConfigError naming the file and any unknown key."""
    data = read_yaml_mapping(path, ConfigError, "configuration keys")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
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
