"""Import of Vidur-format profiling tables (microsoft/vidur, Agrawal et al., MLSys 2024) as servesim profile rows,
so that their A100/H100 measurements drive ``servesim fit`` and the simulator.

Vidur's tables hold times in **milliseconds** as ``time_stats.<operator>.{min,max,mean,median,std}`` plus
model-shape columns; every time is converted to seconds here. ``read_vidur_profile(root, model, tp=)`` searches
``root`` recursively for:

- ``mlp.csv``: rows whose ``n_head, n_kv_head, n_embd, n_expanded_embd, use_gated_mlp`` equal the model's and
  ``num_tensor_parallel_workers == tp``. Operators ``emb, input_layernorm, attn_pre_proj, attn_rope,
  attn_post_proj, post_attention_layernorm, mlp_up_proj, mlp_act, mlp_down_proj, add`` keep their names
  (Vidur's ``add`` is one residual add, as servesim's). A vocabulary that differs from the model's is recorded,
  and the fitted model then prices ``emb``/``lm_head`` with the roofline.
- ``attention.csv``: prefill rows (one chunk of ``prefill_chunk_size`` after ``kv_cache_size`` cached tokens) become
  ``attn_prefill``; decode rows (``batch_size`` sequences of ``kv_cache_size`` cached tokens each, so
  ``kv_cache_size + 1`` keys read) become ``attn_decode`` with the ``uniform`` KV pattern. The FlashAttention
  wrapper's ``attn_input_reshape``/``attn_output_reshape`` are added to the kernel time; ``attn_kv_cache_save``,
  when present, becomes the token operator of that name.
  **Shapes**: a table is used as is when its per-GPU shape (``n_q_head/tp``, ``n_kv_head/tp``, head size
  ``n_embd/n_q_head``) equals the model's. Otherwise, when the head size is the same, each row is *derived*: its
  time is multiplied by the ratio of the roofline's time for the model's per-GPU shape to the roofline's time for
  the table's shape at the same (chunk, context) or (batch, KV length), on the same device — i.e. the
  measurement supplies the kernel's efficiency, the roofline how work scales with the head counts (prefill
  FLOPs with query heads, decode bytes with KV heads). With another head size no attention is imported and the
  roofline prices attention (a note says so).
- ``all_reduce.csv`` (only for ``tp > 1``): rows with ``num_workers == devices_per_node == tp`` (one node, as
  Vidur uses them); ``size`` is the message in bytes.
- ``send_recv.csv``: rows with ``devices_per_node == 2`` (a pair inside one node), for pipeline parallelism.
- ``cpu_overheads.csv``: per batch size, ``schedule + sampler_e2e + prepare_inputs_e2e + process_model_outputs``
  medians (Vidur's CPU overhead without Ray's RPC time) become ``cpu_overhead``; rows at ``tp`` when present.

Errors: ``VidurError`` (a ValueError) naming the file, the row and the field, or the shapes that were looked for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cost_models.plan import BatchPlan
from cost_models.specs import ModelSpec, load_device, load_model

MLP_OPERATORS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
                 "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
CPU_OVERHEAD_PARTS = ("schedule", "sampler_e2e", "prepare_inputs_e2e", "process_model_outputs")
STATS = {"min": "time_min_s", "median": "time_median_s", "mean": "time_mean_s", "std": "time_std_s"}
MS = 1e-3


class VidurError(ValueError):
    """A Vidur table that is missing, malformed, or holds no rows for the requested model shape."""


def _read(path: Path, required: tuple) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise VidurError(f"{path}: not a readable CSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise VidurError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def _times(df: pd.DataFrame, op: str, path: Path, extra: tuple = ()) -> pd.DataFrame:
    """Seconds columns of operator ``op`` (+ the medians/means of ``extra`` operators added), validated."""
    out = pd.DataFrame(index=df.index)
    for stat, col in STATS.items():
        name = f"time_stats.{op}.{stat}"
        if name not in df.columns:
            raise VidurError(f"{path}: missing column {name}")
        values = pd.to_numeric(df[name], errors="coerce")
        for other in extra:
            other_col = f"time_stats.{other}.{stat}"
            if other_col in df.columns and stat != "std":
                values = values + pd.to_numeric(df[other_col], errors="coerce").fillna(0.0)
        out[col] = values * MS
    bad = out["time_median_s"].isna() | ~(out["time_median_s"] > 0)
    if bad.all():
        raise VidurError(f"{path}: field time_stats.{op}.median: no positive value")
    out["time_min_s"] = out["time_min_s"].where(out["time_min_s"] > 0, out["time_median_s"])
    out["time_mean_s"] = out["time_mean_s"].fillna(out["time_median_s"])
    out["time_std_s"] = out["time_std_s"].fillna(0.0)
    return out[~bad]


def _rows(op: str, times: pd.DataFrame, **shape) -> pd.DataFrame:
    n = len(times)
    cols = {"operator": [op] * n}
    for key in ("num_tokens", "chunk_size", "context_len", "batch_size", "kv_len", "kv_total", "message_bytes",
                "num_workers"):
        value = shape.get(key, 0)
        cols[key] = np.asarray(value).astype("int64") if np.ndim(value) else np.full(n, int(value))
    cols["kv_pattern"] = [shape.get("kv_pattern", "")] * n
    out = pd.DataFrame(cols, index=times.index)
    out = pd.concat([out, times], axis=1)
    out["num_runs"] = 0          # Vidur does not record how many runs a median is of
    return out


def _matches_mlp(df: pd.DataFrame, model: ModelSpec, tp: int) -> pd.Series:
    gated = df["use_gated_mlp"].astype(str).str.lower().isin(["true", "1"])
    return ((df["n_head"] == model.num_attention_heads) & (df["n_kv_head"] == model.num_kv_heads)
            & (df["n_embd"] == model.hidden_size) & (df["n_expanded_embd"] == model.intermediate_size)
            & (gated == (model.mlp == "gated")) & (df["num_tensor_parallel_workers"] == tp))


def _mlp_rows(root: Path, model: ModelSpec, tp: int, notes: list) -> tuple[pd.DataFrame, Path, int]:
    required = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "use_gated_mlp", "vocab_size", "num_tokens",
                "num_tensor_parallel_workers")
    found, shapes = [], set()
    for path in sorted(root.rglob("mlp.csv")):
        df = _read(path, required)
        hit = df[_matches_mlp(df, model, tp)]
        shapes |= {f"n_head {r.n_head}, n_kv_head {r.n_kv_head}, n_embd {r.n_embd}, ffn {r.n_expanded_embd}, "
                   f"tp {r.num_tensor_parallel_workers}" for r in df.drop_duplicates(
                       ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "num_tensor_parallel_workers"]
                   ).itertuples()}
        if len(hit):
            found.append((path, hit))
    if not found:
        raise VidurError(f"{root}: no mlp.csv matches {model.name} at tp={tp} (n_head {model.num_attention_heads}, "
                         f"n_kv_head {model.num_kv_heads}, n_embd {model.hidden_size}, ffn "
                         f"{model.intermediate_size}); tables hold: {'; '.join(sorted(shapes)) or 'none'}")
    if len(found) > 1:
        raise VidurError(f"{root}: several mlp.csv match {model.name} at tp={tp} "
                         f"({', '.join(str(p) for p, _ in found)}); pass the folder of one")
    path, df = found[0]
    vocab = int(df["vocab_size"].iloc[0])
    if vocab != model.vocab_size:
        notes.append(f"{path.name}: vocabulary {vocab} differs from {model.name}'s {model.vocab_size}; "
                     f"emb and lm_head are priced by the roofline")
    parts = []
    for op in MLP_OPERATORS:
        if f"time_stats.{op}.median" in df.columns:
            t = _times(df, op, path)
            parts.append(_rows(op, t, num_tokens=df.loc[t.index, "num_tokens"]))
    return pd.concat(parts, ignore_index=True), path, vocab


def _attention_model(df: pd.DataFrame, target: ModelSpec) -> tuple[ModelSpec, int]:
    row = df.iloc[0]
    heads, kv_heads, hidden = int(row["n_q_head"]), int(row["n_kv_head"]), int(row["n_embd"])
    spec = ModelSpec(name=f"vidur-attention-{hidden}-{heads}q-{kv_heads}kv", num_layers=1, hidden_size=hidden,
                     num_attention_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                     intermediate_size=target.intermediate_size, vocab_size=target.vocab_size,
                     max_model_len=int(row.get("max_model_len", target.max_model_len)), dtype=target.dtype)
    return spec, int(row["num_tensor_parallel_workers"])


def _per_gpu(model: ModelSpec, tp: int) -> tuple[int, int, int]:
    return model.num_attention_heads // tp, max(1, model.num_kv_heads // tp), model.head_dim


def _roofline_ratio(rows: pd.DataFrame, target, table_model, table_tp: int, tp: int, device) -> np.ndarray:
    """Per row: roofline time of the row's attention shape for ``target`` over that for the table's model."""
    from cost_models.roofline import RooflineCostModel

    mine = RooflineCostModel(target, device, tp=tp)
    theirs = RooflineCostModel(table_model, device, tp=table_tp)
    ratios = []
    for op, c, k, b, kv in zip(rows["operator"], rows["chunk_size"], rows["context_len"], rows["batch_size"],
                               rows["kv_len"]):
        plan = BatchPlan.prefill(int(c), int(k)) if op == "attn_prefill" else BatchPlan.decodes([int(kv) - 1] * int(b))
        ratios.append(mine._attention(plan)[op] / theirs._attention(plan)[op])
    return np.asarray(ratios)


def _attention_rows(root: Path, model: ModelSpec, tp: int, device, notes: list) -> tuple[pd.DataFrame, list]:
    required = ("n_embd", "n_q_head", "n_kv_head", "num_tensor_parallel_workers", "batch_size", "prefill_chunk_size",
                "kv_cache_size", "is_prefill")
    want = _per_gpu(model, tp)
    candidates = []
    for path in sorted(root.rglob("attention.csv")):
        df = _read(path, required)
        for _, group in df.groupby(["n_embd", "n_q_head", "n_kv_head", "num_tensor_parallel_workers"]):
            table_model, table_tp = _attention_model(group, model)
            have = _per_gpu(table_model, table_tp)
            if have[2] != want[2]:
                continue
            candidates.append((have != want, path, group, table_model, table_tp, have))
    if not candidates:
        notes.append(f"attention: no attention.csv under {root} with head size {model.head_dim}; attention is "
                     f"priced by the roofline")
        return pd.DataFrame(), []
    candidates.sort(key=lambda c: (c[0], str(c[1])))
    derived, path, df, table_model, table_tp, have = candidates[0]
    df = df.copy()
    df["is_prefill"] = df["is_prefill"].astype(str).str.lower().isin(["true", "1"])
    extra = ("attn_input_reshape", "attn_output_reshape")
    parts = []
    pre = df[df["is_prefill"]]
    if len(pre) and "time_stats.attn_prefill.median" in pre.columns:
        t = _times(pre, "attn_prefill", path, extra)
        c, k = pre.loc[t.index, "prefill_chunk_size"], pre.loc[t.index, "kv_cache_size"]
        parts.append(_rows("attn_prefill", t, num_tokens=c, chunk_size=c, context_len=k, batch_size=1,
                           kv_len=c + k, kv_total=c + k))
    dec = df[~df["is_prefill"]]
    if len(dec) and "time_stats.attn_decode.median" in dec.columns:
        t = _times(dec, "attn_decode", path, extra)
        b, k = dec.loc[t.index, "batch_size"], dec.loc[t.index, "kv_cache_size"] + 1
        parts.append(_rows("attn_decode", t, num_tokens=b, batch_size=b, kv_len=k, kv_total=b * k,
                           kv_pattern="uniform"))
    if "time_stats.attn_kv_cache_save.median" in df.columns:
        t = _times(df, "attn_kv_cache_save", path)
        tokens = np.where(df.loc[t.index, "is_prefill"], df.loc[t.index, "prefill_chunk_size"],
                          df.loc[t.index, "batch_size"])
        parts.append(_rows("attn_kv_cache_save", t, num_tokens=tokens))
    rows = pd.concat(parts, ignore_index=True)
    backend = str(df["attention_backend"].iloc[0]).split(".")[-1].lower() if "attention_backend" in df else ""
    rows["attention_backend"] = backend
    if derived:
        attn = rows["operator"].isin(["attn_prefill", "attn_decode"])
        ratio = _roofline_ratio(rows[attn], model, table_model, table_tp, tp, device)
        for col in ("time_min_s", "time_median_s", "time_mean_s", "time_std_s"):
            rows.loc[attn, col] = rows.loc[attn, col].to_numpy() * ratio
        notes.append(f"attention: {path} holds {have[0]} query / {have[1]} KV heads per GPU (head size {have[2]}); "
                     f"{model.name} at tp={tp} has {want[0]} / {want[1]}: times scaled per row by the roofline "
                     f"ratio (median x{np.median(ratio):.2f}, range {ratio.min():.2f}-{ratio.max():.2f})")
    return rows, [str(path)]


def _network_rows(root: Path, name: str, tp: int, notes: list) -> tuple[pd.DataFrame, list]:
    required = ("num_workers", "size", "devices_per_node")
    parts, files = [], []
    for path in sorted(root.rglob(f"{name}.csv")):
        df = _read(path, required)
        if name == "all_reduce":
            df = df[(df["num_workers"] == tp) & (df["devices_per_node"] == tp)]
        else:
            df = df[df["devices_per_node"] == 2]
        if len(df):
            t = _times(df, name, path)
            parts.append(_rows(name, t, message_bytes=df.loc[t.index, "size"],
                               num_workers=df.loc[t.index, "num_workers"]))
            files.append(str(path))
    if not parts:
        notes.append(f"{name}: no {name}.csv rows for {tp if name == 'all_reduce' else 2} workers in one node; "
                     f"priced by the roofline")
        return pd.DataFrame(), []
    return pd.concat(parts, ignore_index=True), files


def _cpu_rows(root: Path, tp: int, notes: list) -> tuple[pd.DataFrame, list]:
    required = ("batch_size", "tensor_parallel_degree") + tuple(f"{p}_median" for p in CPU_OVERHEAD_PARTS)
    for path in sorted(root.rglob("cpu_overheads.csv")):
        df = _read(path, required)
        at_tp = df[df["tensor_parallel_degree"] == tp]
        if at_tp.empty:
            notes.append(f"{path.name}: no rows at tp={tp}; using those at tp="
                         f"{', '.join(str(v) for v in sorted(df['tensor_parallel_degree'].unique()))}")
            at_tp = df
        total = sum(pd.to_numeric(at_tp[f"{p}_median"], errors="coerce") for p in CPU_OVERHEAD_PARTS) * MS
        if total.isna().any() or not (total > 0).all():
            i = int(np.flatnonzero(~(total > 0))[0])
            raise VidurError(f"{path}: line {at_tp.index[i] + 2}: CPU overhead medians missing or not positive")
        times = pd.DataFrame({"time_min_s": total, "time_median_s": total, "time_mean_s": total,
                              "time_std_s": 0.0}, index=at_tp.index)
        models = ", ".join(sorted(at_tp["model_name"].astype(str).unique())) if "model_name" in at_tp else "?"
        notes.append(f"cpu_overhead: from {path.name} (measured with {models}; CPU costs depend on the batch, "
                     f"not the model's weights)")
        return _rows("cpu_overhead", times, batch_size=at_tp["batch_size"]), [str(path)]
    notes.append("cpu_overhead: no cpu_overheads.csv; the roofline's iteration overhead is used")
    return pd.DataFrame(), []


def read_vidur_profile(root: str | Path, model, *, tp: int = 1, device="A100-80GB-PCIe"
                       ) -> tuple[pd.DataFrame, dict]:
    """Rows (servesim profile schema, seconds) and a meta dict from the Vidur tables under ``root``.

    Args:
        root: a folder searched recursively (e.g. ``../shared/data/profiles/vidur``).
        model: ModelSpec or name; tp: tensor-parallel degree of the rows to import.
        device: the DeviceSpec (or name) the tables were measured on; the roofline used to derive attention for
            other head counts runs on it, and the fitted model records its name.
    Raises VidurError when ``root`` is missing or no mlp.csv matches the model's shapes.
    """
    from profiler.schema import COLUMNS, model_columns

    root = Path(root)
    if not root.is_dir():
        raise VidurError(f"{root}: Vidur profile folder not found")
    model, device = load_model(model), load_device(device)
    notes: list[str] = []
    mlp, mlp_path, vocab = _mlp_rows(root, model, tp, notes)
    attention, attn_files = _attention_rows(root, model, tp, device, notes)
    parts = [mlp, attention]
    files = [str(mlp_path)] + attn_files
    if tp > 1:
        ar, ar_files = _network_rows(root, "all_reduce", tp, notes)
        parts.append(ar)
        files += ar_files
    sr, sr_files = _network_rows(root, "send_recv", tp, notes)
    cpu, cpu_files = _cpu_rows(root, tp, notes)
    parts += [sr, cpu]
    files += sr_files + cpu_files
    df = pd.concat([p for p in parts if len(p)], ignore_index=True)
    shape = model_columns(model, tp)
    shape["vocab_size"] = vocab
    context = {"device": "cuda", "device_name": device.name, "torch_version": "", "dtype": "float16",
               "num_threads": 0, **shape}
    for key, value in context.items():
        if key not in df.columns:
            df[key] = value
    df["attention_backend"] = df.get("attention_backend", pd.Series("", index=df.index)).fillna("")
    df = df[list(COLUMNS)]
    meta = {"source": "vidur", "vidur_root": str(root), "vidur_files": files, "model": model.name,
            "model_shape": shape, "tp": tp, "device": "cuda", "device_name": device.name, "device_spec": device.name,
            "dtype": "float16", "time_unit": "s", "notes": notes}
    return df, meta
