"""A profile run: time every operator of one layer of a model over a shape grid into ``DIR/profile.csv`` and
``DIR/meta.json``.

``run_profile(model, device="cpu", out_dir=...)`` writes ``meta.json`` first, then appends the CSV lines of each
block of ``ROUND_BLOCK`` shapes once all its rounds are done, flushed and fsynced. Every shape of a block is timed
``TimingConfig.rounds`` times (2 on a CPU), each round of the block at least ``profiler.timing.ROUND_GAP_S`` (20 s)
after its previous one, interleaved with later blocks (``profiler.timing.spaced_rounds``), and the round with the
lowest median is kept: a spell of a slower machine spoils one round, not the shape (the "lowest of repeated
measurements" rule of Python's ``timeit`` documentation). An interrupted run loses the blocks whose rounds were
not finished (about 20 s of measuring). Run again with the same arguments
and it resumes: rows already in the CSV (same operator and shape columns) are skipped, and nothing is duplicated.
The CSV goes through the shared resumable-table writer (``traces.tables.ResumableTable``): a torn last row (no
newline, the wrong number of fields, fields that do not parse) is dropped with a note; a damaged row elsewhere
or a CSV with other columns is an error. ``meta.json`` is always replaced atomically (temporary file and
rename), so a kill leaves the old or the new one; one left unreadable by an older servesim is rewritten with a
note, the rows' own model/device/dtype columns then vouching for the folder. The folder is locked while a run
writes to it (``traces.tables.FolderLock``). A folder holding a profile of another model, parallelism, dtype or
device is refused (``ProfileError``) rather than mixed.

Torch is imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from profiler.grid import GridSpec, build_grid, decode_kv_lens, shape_bytes, shape_key
from profiler.schema import (COLUMNS, META_JSON, PROFILE_CSV, TIME_COLUMNS, LayerShapes, ProfileError,
                             check_profile_row, model_columns)
from profiler.timing import TimingConfig, reference_kernel_s, spaced_rounds, time_operator
from traces.tables import FolderLock, ResumableTable, ensure_dir, write_json_atomic

# Shapes timed together: each is timed ``TimingConfig.rounds`` times, the rounds of a block 20 s apart
# (``profiler.timing.spaced_rounds``), and the round with the lowest median is kept; the block's rows are then written.
ROUND_BLOCK = 48
# meta.json fields that must match for a run to resume into an existing folder.
_IDENTITY = ("model_shape", "tp", "dtype", "device", "device_name", "attention_backend", "num_threads",
             "cold_cache", "private_cache_flush_bytes", "reuse_bytes", "cpu_cache_state")
#: what a cold CPU call follows (meta.json ``cpu_cache_state``): its preceding operators in a layer, their outputs
#: alive through the call (``profiler.ops.PRECEDING_OPERATORS``), the layers of an iteration for the LM head, or a
#: private-cache flush for those without
CPU_CACHE_STATE = "preceding-operators-held-and-layers"


def device_info(device_type: str) -> dict:
    """``device`` ("cuda"/"cpu"), ``device_name``, ``driver`` (NVIDIA driver, CUDA only), CUDA/torch versions."""
    import torch

    info = {"device": device_type, "torch_version": torch.__version__, "python_version": platform.python_version(),
            "platform": platform.platform()}
    if device_type == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda_version"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
        info["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["device_name"] = _cpu_name()
        info["cpu_count"] = os.cpu_count()
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _memory_budget(device_type: str) -> int:
    """Bytes a single shape may use: 80% of free CUDA memory, or half the available host memory."""
    import torch

    if device_type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.8)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 4 << 30


# Row columns that must match this run's for it to append to an existing profile.csv.
_ROW_IDENTITY = ("device", "device_name", "dtype", "attention_backend", "num_threads", "model", "hidden_size",
                 "num_attention_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size", "mlp",
                 "norm", "tp")


def open_profile_table(csv_path: Path) -> ResumableTable:
    """``profile.csv`` opened for appending: created with its header, a torn last row dropped (``table.notes``);
    ProfileError for a CSV with other columns or a damaged row."""
    return ResumableTable(csv_path, COLUMNS, check_row=check_profile_row, error=ProfileError,
                          owner="another program or servesim version (not this profile schema)").open()


def _read_done(csv_path: Path) -> set:
    """Keys of the complete rows of ``csv_path``; drops a torn last line (a run killed mid-write) off the file."""
    table = open_profile_table(csv_path)
    table.close()
    return {shape_key(row) for row in table.rows}


def _old_meta(out: Path, notes: list) -> dict | None:
    """The folder's meta.json, None when absent or unreadable (then with a note: it is rewritten)."""
    path = out / META_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        notes.append(f"{path}: unreadable ({' '.join(str(exc).split())}), left by an interrupted run; rewritten, "
                     f"the rows of {PROFILE_CSV} checked against this run instead")
        return None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _check_meta(out: Path, meta: dict, old: dict | None = None) -> None:
    path = out / META_JSON
    if old is None:
        if not path.exists():
            return
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(old, dict):
        raise ProfileError(f"{path}: not a profile's meta.json (not a JSON object); use another --out")
    for key in _IDENTITY:
        if old.get(key) != meta.get(key):
            raise ProfileError(f"{path}: this folder holds a profile with {key}={old.get(key)!r}, not "
                               f"{meta.get(key)!r}; use another --out")


def _check_rows(table: ResumableTable, constant: dict) -> None:
    """The first row's model and device columns equal this run's (meta.json aside, the rows say what they are)."""
    if not table.rows:
        return
    row = table.rows[0]
    for key in _ROW_IDENTITY:
        if row[key] != str(constant[key]):
            raise ProfileError(f"{table.path}: line 2: this folder holds a profile with {key}={row[key]!r}, not "
                               f"{str(constant[key])!r}; use another --out")


def run_profile(model, *, device: str = "cpu", tp: int = 1, dtype: str | None = None, quick: bool = False,
                out_dir: str | Path, num_threads: int | None = None, grid: GridSpec | None = None,
                timing: TimingConfig | None = None, operators=None, max_context: int | None = None,
                max_tokens: int | None = None, collectives: bool | None = None, cold_cache: bool = True,
                progress: bool = True, echo=None) -> Path:
    """Profile one layer of ``model`` (a ModelSpec) and return the CSV path.

    Args:
        device: "cuda" or "cpu". dtype: "float16", "bfloat16" or "float32" (default: the model's).
        tp: tensor-parallel degree, profiled by sharding heads, FFN and vocabulary on this one device.
        quick: the small grid and shorter timing (CPU/CI). grid/timing: override both.
        num_threads: CPU threads (default 1: steadier timings on shared machines); recorded on every row.
        operators: subset of operator names (default all). max_context/max_tokens: grid bounds (default: the
            model's context length, at most 4096 with ``quick`` and 8192 otherwise).
        collectives: also time all-reduce over ``tp`` workers and send/recv by message size
            (``profiler.collectives``); default: on CUDA when ``tp`` > 1 and that many GPUs are visible.
        cold_cache: cycle weights and KV slots between calls through what one iteration of the model reads
            (at most twice the last-level cache), so operators read them from memory, or from the shared cache
            when the model fits in it, as inside an iteration, and on a CPU run each timed call right after the
            operators that precede it in a layer (``profiler.ops.PRECEDING_OPERATORS``; a flush of the core's
            private caches for the embedding and ``cpu_overhead``) (``profiler.ops``, ``profiler.timing``); False
            times them cached.
        echo: called with each note (``"note: ..."``: a torn row dropped, a stale lock taken over); default stderr.
    Raises ProfileError for an unavailable device, a folder holding another profile, a locked, unreadable or
    unwritable folder, a damaged profile.csv, or a shape that runs out of memory (the largest shapes run first,
    so that happens early; see ``_measuring_order``).
    """
    import torch

    from profiler.ops import TORCH_DTYPES

    if device not in ("cuda", "cpu"):
        raise ProfileError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ProfileError("device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    dtype = dtype or model.dtype
    if dtype not in TORCH_DTYPES:
        raise ProfileError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    for name, value in (("num_threads", num_threads), ("max_context", max_context), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ProfileError(f"{name}: must be an integer >= 1, got {value!r}")
    shapes = LayerShapes.of(model, tp)
    threads = num_threads or 1
    if device == "cpu":
        torch.set_num_threads(threads)
    cap = 4096 if quick else 8192
    context = min(max_context or min(model.max_model_len, cap), model.max_model_len)
    grid = grid or (GridSpec.quick(context, max_tokens) if quick else GridSpec.full(context, max_tokens))
    if timing is None:
        timing = TimingConfig.quick() if quick else TimingConfig()
        if device == "cpu":
            # two rounds of half the measurement each: about the same time, robust to a busy moment
            timing = replace(timing, rounds=2, min_samples=max(4, timing.min_samples // 2 + 1),
                             min_run_time_s=timing.min_run_time_s / 2)
    dtype_bytes = torch.tensor([], dtype=TORCH_DTYPES[dtype]).element_size()

    out = ensure_dir(Path(out_dir), error=ProfileError)
    with FolderLock(out, "profile", error=ProfileError) as lock:
        return _run_locked(model, out, lock, device=device, tp=tp, dtype=dtype, quick=quick, threads=threads,
                           grid=grid, timing=timing, operators=operators, collectives=collectives,
                           cold_cache=cold_cache, progress=progress, dtype_bytes=dtype_bytes, shapes=shapes,
                           say=echo or (lambda text: print(text, file=sys.stderr, flush=True)))


def _run_locked(model, out, lock, *, device, tp, dtype, quick, threads, grid, timing, operators, collectives,
                cold_cache, progress, dtype_bytes, shapes, say) -> Path:
    import torch

    from profiler.ops import ATTENTION_BACKEND, Layer, cache_flush_bytes, private_cache_flush_bytes, reuse_bytes

    notes = list(lock.notes)
    info = device_info(device)
    meta = {"model": model.name, "model_shape": model_columns(model, tp), "model_spec": model.to_dict(), "tp": tp,
            "dtype": dtype, **info, "attention_backend": ATTENTION_BACKEND,
            "num_threads": threads if device == "cpu" else None, "quick": quick, "cold_cache": cold_cache,
            "cache_flush_bytes": None, "grid": grid.to_dict(),
            "timing": timing.__dict__, "columns": list(COLUMNS), "time_unit": "s", "complete": False}
    if cold_cache:
        meta["cache_flush_bytes"] = cache_flush_bytes(device)
        meta["reuse_bytes"] = reuse_bytes(device, shapes, model.num_layers, dtype_bytes)
        if device == "cpu":
            meta["private_cache_flush_bytes"] = private_cache_flush_bytes()
            meta["cpu_cache_state"] = CPU_CACHE_STATE
    old = _old_meta(out, notes)
    if old is not None:
        _check_meta(out, meta, old)
    meta["reference_kernel_s"] = {"start": reference_kernel_s(device)}     # the machine's speed (validate)
    constant = {"device": device, "device_name": info["device_name"], "torch_version": torch.__version__,
                "dtype": dtype, "attention_backend": ATTENTION_BACKEND,
                "num_threads": threads if device == "cpu" else 0, **model_columns(model, tp)}
    csv_path = out / PROFILE_CSV
    table = open_profile_table(csv_path)
    try:
        notes += table.notes
        for note in notes:
            say(f"note: {note}")
        _check_rows(table, constant)
        done = {shape_key(row) for row in table.rows}
        write_json_atomic(out / META_JSON, meta, error=ProfileError)

        budget = _memory_budget(device)
        rows = build_grid(grid, shapes, dtype_bytes, device_type=device, memory_budget_bytes=budget,
                          operators=operators)
        todo = _measuring_order([r for r in rows if shape_key(r) not in done])
        max_slots = max([r["batch_size"] for r in rows if r["operator"] == "attn_decode"] + [16])
        max_kv = max([r["kv_len"] for r in rows if r["operator"].startswith("attn_")] + [1])
        layer = None
        if todo:
            layer = Layer(shapes, device=device, dtype=dtype, max_positions=max(max_kv, grid.max_tokens) + 1,
                          with_vocab=any(r["operator"] in ("emb", "lm_head") for r in todo))
            layer.ensure_kv_cache(max_slots, max_kv)

        bar = None
        if progress and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), unit="shape", desc=f"profile {model.name} {device}", leave=False)
        flush = meta.get("private_cache_flush_bytes") or 0

        def time_block(block):
            return [_time_row(layer, row, device, timing, threads, shapes, dtype_bytes, cold_cache, flush,
                              model.num_layers) for row in block]

        blocks = [todo[start:start + ROUND_BLOCK] for start in range(0, len(todo), ROUND_BLOCK)]
        for block, rounds in spaced_rounds(blocks, time_block, max(1, timing.rounds)):
            best = [min(per_row, key=lambda stats: stats.time_median_s) for per_row in zip(*rounds)]
            table.append_many({**row, **stats.to_dict(), **constant} for row, stats in zip(block, best))
            if bar is not None:
                bar.update(len(block))
        if bar is not None:
            bar.close()
        if collectives is None:
            collectives = device == "cuda" and tp > 1 and torch.cuda.device_count() >= tp
        meta["collectives"] = bool(collectives)
        added = _profile_collectives(table, done, model, tp, device, dtype, grid, timing, constant, dtype_bytes) \
            if collectives else 0
    finally:
        table.close()
    meta["reference_kernel_s"]["end"] = reference_kernel_s(device)
    meta.update(complete=True, num_rows=len(done) + len(todo) + added)
    write_json_atomic(out / META_JSON, meta, error=ProfileError)
    return csv_path


def _profile_collectives(table, done, model, tp, device, dtype, grid, timing, constant, dtype_bytes) -> int:
    """Append all-reduce and send/recv rows not yet in the CSV (messages up to max_tokens activations)."""
    from profiler.collectives import message_sizes, profile_collectives
    from profiler.grid import shape_row

    if tp < 2:
        raise ProfileError("collectives need tp >= 2 (all-reduce over the tensor-parallel workers)")
    sizes = message_sizes(grid.max_tokens * model.hidden_size * dtype_bytes)

    def row(op, nbytes):
        return {**shape_row(op), "message_bytes": nbytes, "num_workers": tp if op == "all_reduce" else 2}

    todo = [n for n in sizes if any(shape_key(row(op, n)) not in done for op in ("all_reduce", "send_recv"))]
    if not todo:
        return 0
    rows = profile_collectives(tp, device=device, dtype=dtype, sizes=todo, timing=timing)
    full = [{**row(r["operator"], r["message_bytes"]), **{k: r[k] for k in TIME_COLUMNS}, **constant} for r in rows]
    table.append_many(f for f in full if shape_key(f) not in done)
    return len(rows)


def _measuring_order(todo: list[dict]) -> list[dict]:
    """The largest ``ROUND_BLOCK`` shapes first (an out-of-memory shape fails early), then the rest in a fixed
    random order (seed 0): on a shared machine a core can run 1.3-1.6x slower for tens of seconds, and measured
    in grid order such a spell would slow a whole run of neighbouring shapes, which the fit cannot tell from the
    operator's cost; shuffled, it slows scattered shapes that their neighbours outvote."""
    import random

    head, tail = todo[:ROUND_BLOCK], todo[ROUND_BLOCK:]
    random.Random(0).shuffle(tail)
    return head + tail


def _time_row(layer, row, device, timing, threads, shapes, dtype_bytes, cold_cache, flush_bytes, num_layers):
    """Time one shape; on a CPU with ``cold_cache`` each call follows its preceding operators (or a flush)."""
    import torch

    from profiler.ops import operator_callable, preceding_callable

    kv_lens = None
    if row["operator"] == "attn_decode":
        kv_lens = decode_kv_lens(row["batch_size"], row["kv_len"], row["kv_pattern"])
    try:
        with torch.inference_mode():
            rows = row["batch_size"] if row["operator"] == "lm_head" else row["num_tokens"]
            fn = operator_callable(layer, row["operator"], num_tokens=rows,
                                   chunk_size=row["chunk_size"], context_len=row["context_len"], kv_lens=kv_lens,
                                   cold=cold_cache, num_layers=num_layers)
            before = None
            if device == "cpu" and cold_cache:
                before = preceding_callable(layer, row["operator"], num_tokens=row["num_tokens"],
                                            chunk_size=row["chunk_size"], kv_lens=kv_lens,
                                            batch_size=row["batch_size"], cold=True, num_layers=num_layers)
            return time_operator(fn, device, timing, num_threads=threads, flush_bytes=flush_bytes, before=before)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        need = shape_bytes(row, shapes, dtype_bytes, device)
        shape = ", ".join(f"{k}={row[k]}" for k in ("num_tokens", "context_len", "batch_size", "kv_len") if row[k])
        raise ProfileError(f"{row['operator']} at {shape}: out of memory on {device} (estimated "
                           f"{need / 2**30:.2f} GiB); lower --max-tokens or --max-context") from None


__all__ = ["run_profile", "device_info", "TIME_COLUMNS"]
