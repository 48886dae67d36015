"""Time the collectives tensor and pipeline parallelism need: all-reduce over ``world_size`` workers and a
send/recv between two, by message size (bytes), with ``torch.distributed``.

One process per worker (``torch.multiprocessing.spawn``) on this machine: NCCL with one GPU each on CUDA, Gloo on
CPU (which only exercises the code path; CPU tensor parallelism is not what a serving system runs). Rank 0 times
each call (CUDA events or ``time.perf_counter`` — the other ranks' work is not on this thread) after a barrier, as
Vidur's collective profiler does, and returns rows in the profile schema (``operator`` ``all_reduce`` or
``send_recv``, ``message_bytes``, ``num_workers``).
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

from profiler.timing import TimingConfig, TimingStats


def message_sizes(max_bytes: int, min_bytes: int = 2048, growth: float = 2.0) -> list[int]:
    """``min_bytes`` times powers of ``growth`` up to ``max_bytes`` (included), multiples of 2048 bytes."""
    sizes, n = [], float(min_bytes)
    while n < max_bytes:
        sizes.append(int(n) // 2048 * 2048 or 2048)
        n *= growth
    sizes.append(max_bytes)
    return sorted(set(sizes))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, device: str, dtype_name: str, sizes: list, timing: dict, port: int,
            out_path: str):
    import torch
    import torch.distributed as dist

    from profiler.ops import TORCH_DTYPES

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    dtype = TORCH_DTYPES[dtype_name]
    config = TimingConfig(**timing)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    rows = []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for op in ("all_reduce", "send_recv"):
        for nbytes in sizes:
            buf = torch.empty(max(1, nbytes // torch.tensor([], dtype=dtype).element_size()), dtype=dtype,
                              device=dev)
            if op == "all_reduce":
                def fn():
                    dist.all_reduce(buf)
            else:
                def fn():
                    if rank == 0:
                        dist.send(buf, 1)
                    elif rank == 1:
                        dist.recv(buf, 0)
            for _ in range(max(1, config.warmup)):
                fn()
            sync()
            samples = []
            for _ in range(config.min_samples):
                dist.barrier()
                sync()
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    torch.cuda.synchronize()
                    samples.append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - t0)
            if rank == 0:
                stats = TimingStats.from_samples(samples)
                rows.append({"operator": op, "message_bytes": nbytes,
                             "num_workers": world_size if op == "all_reduce" else 2, **stats.to_dict()})
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))


def profile_collectives(world_size: int, *, device: str = "cuda", dtype: str = "float16",
                        sizes: list[int] | None = None, max_bytes: int = 1 << 26,
                        timing: TimingConfig | None = None) -> list[dict]:
    """Rows (operator, message_bytes, num_workers, time_* seconds, num_runs) of all-reduce over ``world_size``
    workers and send/recv between two. Raises ValueError when fewer than 2 workers or GPUs are available."""
    import torch
    import torch.multiprocessing as mp

    if world_size < 2:
        raise ValueError(f"collectives need at least 2 workers, got {world_size}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"collectives over {world_size} GPUs: only {torch.cuda.device_count()} visible")
    timing = timing or TimingConfig()
    sizes = sizes or message_sizes(max_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(world_size, device, dtype, sizes, timing.__dict__, _free_port(), out),
                 nprocs=world_size, join=True)
        return json.loads(Path(out).read_text())
