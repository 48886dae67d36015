"""The profile format: operator names, CSV columns, per-GPU layer shapes and a validating reader (no torch).

See the ``profiler`` package docstring for the meaning of every column. ``read_profile(path)`` returns the rows
as a DataFrame and raises ``ProfileError`` (a ValueError) naming the file, the row and the field of bad input.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

TOKEN_OPERATORS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_kv_cache_save", "attn_post_proj",
                   "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "emb")
SEQUENCE_OPERATORS = ("lm_head", "cpu_overhead")
ATTENTION_OPERATORS = ("attn_prefill", "attn_decode")
OPERATORS = TOKEN_OPERATORS + SEQUENCE_OPERATORS + ATTENTION_OPERATORS
COLLECTIVE_OPERATORS = ("all_reduce", "send_recv")

SHAPE_COLUMNS = ("num_tokens", "chunk_size", "context_len", "batch_size", "kv_len", "kv_total", "kv_pattern",
                 "message_bytes", "num_workers")
TIME_COLUMNS = ("time_min_s", "time_median_s", "time_mean_s", "time_std_s", "num_runs")
CONTEXT_COLUMNS = ("device", "device_name", "torch_version", "dtype", "attention_backend", "num_threads")
MODEL_COLUMNS = ("model", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "intermediate_size",
                 "vocab_size", "mlp", "norm", "tp")
COLUMNS = ("operator",) + SHAPE_COLUMNS + TIME_COLUMNS + CONTEXT_COLUMNS + MODEL_COLUMNS
PROFILE_CSV = "profile.csv"
META_JSON = "meta.json"


class ProfileError(ValueError):
    """A profile folder, CSV or meta.json that is missing or malformed."""


@dataclass(frozen=True)
class LayerShapes:
    """Per-GPU shapes of one decoder layer under tensor parallelism ``tp`` (elements).

    ``num_q_heads``/``num_kv_heads``/``ffn_size``/``vocab_size`` are divided by ``tp`` (KV heads at least 1, i.e.
    replicated when fewer than ``tp``); ``hidden_size`` and ``head_dim`` are not.
    """

    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    gated: bool = True
    norm: str = "rmsnorm"
    tp: int = 1

    @classmethod
    def of(cls, model, tp: int = 1) -> "LayerShapes":
        """Shapes of ``model`` (a ``ModelSpec``) on one of ``tp`` GPUs. Raises ValueError when heads do not divide."""
        if tp < 1 or model.num_attention_heads % tp or model.intermediate_size % tp:
            raise ValueError(f"{model.name}: {model.num_attention_heads} heads / FFN {model.intermediate_size} "
                             f"do not divide by tp={tp}")
        return cls(hidden_size=model.hidden_size, num_q_heads=model.num_attention_heads // tp,
                   num_kv_heads=max(1, model.num_kv_heads // tp), head_dim=model.head_dim,
                   ffn_size=model.intermediate_size // tp, vocab_size=-(-model.vocab_size // tp),
                   gated=model.mlp == "gated", norm=model.norm, tp=tp)

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_in(self) -> int:
        """Output width of the up projection: gate and up (2 x FFN) for SwiGLU, FFN otherwise."""
        return (2 if self.gated else 1) * self.ffn_size

    def to_dict(self) -> dict:
        return asdict(self)


def model_columns(model, tp: int) -> dict:
    """The model-shape columns of every row of a profile of ``model`` (a ``ModelSpec``) at ``tp``."""
    return {"model": model.name, "hidden_size": model.hidden_size, "num_attention_heads": model.num_attention_heads,
            "num_kv_heads": model.num_kv_heads, "head_dim": model.head_dim,
            "intermediate_size": model.intermediate_size, "vocab_size": model.vocab_size, "mlp": model.mlp,
            "norm": model.norm, "tp": tp}


_INT_COLUMNS = tuple(c for c in SHAPE_COLUMNS if c != "kv_pattern") + ("num_runs", "num_threads", "hidden_size",
                                                                       "num_attention_heads", "num_kv_heads",
                                                                       "head_dim", "intermediate_size",
                                                                       "vocab_size", "tp")


def check_profile_row(row: dict) -> None:
    """One ``profile.csv`` row as text (``{column: str}``): raises ValueError naming the first field that does not
    parse (unknown operator, a shape that is no integer, a time that is not a positive finite number) — the
    check ``profiler.run`` applies to the last row when it resumes (a row failing it there is a torn one)."""
    if row["operator"] not in OPERATORS + COLLECTIVE_OPERATORS:
        raise ValueError(f"operator: unknown {row['operator'][:40]!r}")
    for col in _INT_COLUMNS:
        try:
            int(row[col])
        except ValueError:
            raise ValueError(f"{col}: not an integer: {row[col][:40]!r}") from None
    for col in TIME_COLUMNS:
        if col == "num_runs":
            continue
        try:
            value = float(row[col])
        except ValueError:
            raise ValueError(f"{col}: not a number: {row[col][:40]!r}") from None
        low_ok = value >= 0 if col == "time_std_s" else value > 0
        if not (math.isfinite(value) and low_ok):
            raise ValueError(f"{col}: not a positive finite number of seconds: {row[col][:40]!r}")


def read_profile(path: str | Path) -> pd.DataFrame:
    """Rows of a profile (a folder holding ``profile.csv``, or the CSV itself), validated.

    Raises ProfileError naming the file, the first bad row (1-based data line + 1 for the header) and the field:
    missing columns, non-numeric shapes, or times that are not positive finite seconds.
    """
    path = Path(path)
    csv = path / PROFILE_CSV if path.is_dir() else path
    if not csv.is_file():
        raise ProfileError(f"{csv}: profile not found (run `servesim profile --out DIR` first)")
    try:
        df = pd.read_csv(csv, keep_default_na=False, dtype={"kv_pattern": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{csv}: not a readable CSV: {str(exc).splitlines()[0]}") from None
    except pd.errors.EmptyDataError:
        raise ProfileError(f"{csv}: empty file (no header)") from None
    except OSError as exc:                                  # no permission, an I/O error
        raise ProfileError(f"{csv}: cannot read: {exc.strerror or exc}") from None
    missing = [c for c in ("operator",) + SHAPE_COLUMNS + TIME_COLUMNS if c not in df.columns]
    if missing:
        raise ProfileError(f"{csv}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise ProfileError(f"{csv}: no rows")
    for col in _INT_COLUMNS + TIME_COLUMNS:
        if col not in df.columns:
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna()
        if col.startswith("time_"):
            bad |= ~(values.abs() < float("inf"))
            if col != "time_std_s":
                bad |= values <= 0
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise ProfileError(f"{csv}: line {i + 2}: field {col}: bad value {df[col].iloc[i]!r}")
        df[col] = values.astype("int64") if col in _INT_COLUMNS else values.astype("float64")
    return df


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of a profile folder ({} when absent). Raises ProfileError when it is unreadable, not
    valid JSON or not an object."""
    meta = Path(path) / META_JSON
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{meta}: not valid JSON: {exc}") from None
    except OSError as exc:
        raise ProfileError(f"{meta}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{meta}: not a profile's meta.json (expected a JSON object)")
    return data
