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
        if self.scheduler not in SCHEDULER_NAMES:
            raise ConfigError(f"scheduler: unknown {self.scheduler!r}; known: {', '.join(SCHEDULER_NAMES)}")
        for key in ("tp", "pp", "token_budget", "block_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be a positive integer, got {getattr(self, key)!r}")
        for key in ("max_batch_size", "max_num_batched_tokens", "max_model_len", "num_requests"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{key}: must be a positive integer, got {v!r}")
        if not self.qps > 0:
            raise ConfigError(f"qps: must be positive, got {self.qps!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "SimConfig":
        """A copy with ``changes`` applied (None values are ignored, so CLI flags left unset keep the file's)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def read_yaml_config(path: str | Path) -> dict:
    """Read a YAML mapping of ``SimConfig`` keys; raise ConfigError naming the file and any unknown key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of configuration keys")
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
