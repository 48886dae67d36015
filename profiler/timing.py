"""Timing one operator: warm-up, then repeated runs; CUDA events on a GPU, ``torch.utils.benchmark`` on a CPU.

``time_operator(fn, device)`` returns a ``TimingStats`` in **seconds** (min, median, mean, std over the measured
samples and the number of calls timed). ``fn`` takes no arguments and runs the operator once on tensors it already
holds (see ``profiler.ops.operator_callable``).

- CUDA: each sample is one call bracketed by two ``torch.cuda.Event(enable_timing=True)`` records on the current
  stream; the device is synchronized after the warm-up and after the last sample, and the event pairs are read
  afterwards (``Event.elapsed_time`` is in milliseconds). This is how Vidur (``CudaTimer``) and the PyTorch
  "CUDA semantics" notes time kernels without host-side launch gaps.
- CPU: ``torch.utils.benchmark.Timer.timeit(number)`` with an explicit thread count; each sample is the mean of
  ``number`` back-to-back calls, ``number`` chosen so a sample lasts about ``sample_s``. With one thread the clock
  is the thread's CPU time (``time.thread_time``), which does not advance while the OS runs other processes, so
  timings on a shared, loaded machine stay close to those on an idle one; with more threads it is wall time
  (``time.perf_counter``), since worker threads' CPU time would be summed. CPU timings remain noisy, so callers
  should fit to the median (``time_median_s``).

Samples are collected until both ``min_samples`` samples and ``min_run_time_s`` seconds of measurement are
reached, but never more than ``max_samples`` samples.

``before`` (CPU; the profiler passes ``profiler.ops.preceding_callable``, the operators that precede this one inside
a decoder layer): each sample is then one call, right after an untimed ``before()``, so the call starts with the
caches as a real iteration leaves them. Repeated back to back an operator finds its inputs, code and weights in
the core's caches; inside an iteration the operators before it (a GEMM streaming its weights) have evicted some of
them: on this project's 2-core Xeon VM an RMSNorm of 512 x 256 float32 took 0.10 ms when repeated back to back,
0.38 ms right after a GEMM and 0.43 ms inside the executor's forward pass. ``flush_bytes`` (for operators without
predecessors: the profiler passes ``profiler.ops.private_cache_flush_bytes()``): each sample is one call after
writing a scratch buffer of that many bytes (untimed), so it starts with the core's private caches holding none of
its data. The same idea as Triton's ``do_bench``, which clears the GPU's L2 between calls.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TimingStats:
    """Statistics of the measured samples, in seconds; ``num_runs`` counts the operator calls timed."""

    time_min_s: float
    time_median_s: float
    time_mean_s: float
    time_std_s: float
    num_runs: int

    @classmethod
    def from_samples(cls, samples_s: list[float], calls_per_sample: int = 1) -> "TimingStats":
        """Stats of per-call times ``samples_s`` (seconds), each the mean of ``calls_per_sample`` calls."""
        if not samples_s:
            raise ValueError("TimingStats: no samples")
        std = statistics.pstdev(samples_s) if len(samples_s) > 1 else 0.0
        return cls(min(samples_s), statistics.median(samples_s), statistics.fmean(samples_s), std,
                   len(samples_s) * calls_per_sample)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TimingConfig:
    """How long to measure one shape. Times in seconds.

    ``warmup``: untimed calls first (kernel selection, caches, lazy allocation).
    ``min_samples``/``max_samples``: fewest/most samples; ``min_run_time_s``: least measured time;
    ``sample_s``: target length of one CPU sample (``number`` calls averaged); ``rounds``: how many times a profile
    run measures each shape, seconds apart, keeping the round with the lowest median (``profiler.run``).
    """

    warmup: int = 2
    min_samples: int = 9
    max_samples: int = 200
    min_run_time_s: float = 0.03
    sample_s: float = 1e-3
    rounds: int = 1

    def __post_init__(self):
        for name, low in (("warmup", 0), ("min_samples", 1), ("max_samples", 1), ("rounds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TimingConfig: {name} must be an integer >= {low}, got {value!r}")
        if self.max_samples < self.min_samples:
            raise ValueError(f"TimingConfig: max_samples ({self.max_samples}) < min_samples ({self.min_samples})")
        if not (isinstance(self.min_run_time_s, (int, float)) and 0 <= self.min_run_time_s < math.inf):
            raise ValueError(f"TimingConfig: min_run_time_s must be a finite number >= 0, got {self.min_run_time_s!r}")
        if not (isinstance(self.sample_s, (int, float)) and 0 < self.sample_s < math.inf):
            raise ValueError(f"TimingConfig: sample_s must be a finite number > 0, got {self.sample_s!r}")

    @classmethod
    def quick(cls) -> "TimingConfig":
        """Shorter measurements for ``--quick`` CPU runs (still medians of >= 7 samples)."""
        return cls(warmup=1, min_samples=7, max_samples=100, min_run_time_s=0.01, sample_s=1e-3)


def time_operator(fn, device_type: str, config: TimingConfig | None = None, *, num_threads: int | None = None,
                  flush_bytes: int = 0, before=None) -> TimingStats:
    """Time ``fn()`` on ``device_type`` ("cuda" or "cpu"); see the module docstring (``flush_bytes`` and
    ``before``: CPU only). Raises ValueError for another device or a negative ``flush_bytes``."""
    config = config or TimingConfig()
    if device_type == "cuda":
        return time_cuda(fn, config)
    if device_type == "cpu":
        return time_cpu(fn, config, num_threads=num_threads, flush_bytes=flush_bytes, before=before)
    raise ValueError(f"time_operator: device must be 'cuda' or 'cpu', got {device_type!r}")


#: the reference kernel's shapes (``reference_kernel_s``): a float32 GEMM ``[m, k] @ [k, n]``
REFERENCE_GEMM = (64, 1024, 1024)


def reference_kernel_s(device_type: str = "cpu") -> float:
    """Median seconds of a fixed kernel, a float32 GEMM of ``REFERENCE_GEMM`` (64 x 1024 by 1024 x 1024, 134 MFLOP,
    on warm caches; one thread on a CPU, the thread count restored after), timed by ``time_operator``: a gauge of
    how fast the machine runs now. A profile records it when it starts and ends (meta.json ``reference_kernel_s``)
    and ``servesim validate`` times it again, so that a machine that ran slower or faster while validating than
    while profiling says so: a shared VM's speed drifts by up to 20% over minutes."""
    import torch

    m, k, n = REFERENCE_GEMM
    gen = torch.Generator().manual_seed(0)
    device = "cuda" if device_type == "cuda" else "cpu"
    a, b = torch.randn(m, k, generator=gen).to(device), torch.randn(k, n, generator=gen).to(device)
    config = TimingConfig(warmup=3, min_samples=21, max_samples=400, min_run_time_s=0.2)
    threads = torch.get_num_threads()
    try:
        return time_operator(lambda: a @ b, device_type, config, num_threads=1).time_median_s
    finally:
        torch.set_num_threads(threads)


def time_cuda(fn, config: TimingConfig) -> TimingStats:
    """CUDA-event timing of ``fn`` on the current stream (one call per sample)."""
    import torch

    for _ in range(max(1, config.warmup)):
        fn()
    torch.cuda.synchronize()
    # One probe call sets how many samples fit in the time limits.
    probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_start.record()
    fn()
    probe_end.record()
    torch.cuda.synchronize()
    probe_s = max(probe_start.elapsed_time(probe_end) / 1e3, 1e-7)
    n = min(config.max_samples, max(config.min_samples, math.ceil(config.min_run_time_s / probe_s)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return TimingStats.from_samples([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def cpu_clock(num_threads: int):
    """The clock CPU timing uses: the thread's CPU time with one thread, wall time otherwise."""
    return time.thread_time if num_threads == 1 else time.perf_counter


def time_cpu(fn, config: TimingConfig, *, num_threads: int | None = None, flush_bytes: int = 0,
             before=None) -> TimingStats:
    """``torch.utils.benchmark`` timing of ``fn`` on the CPU with ``num_threads`` threads (default: torch's); with
    ``before`` (a no-argument function), single calls each right after an untimed ``before()``; else with
    ``flush_bytes`` > 0, single calls each after a cache flush (module docstring)."""
    import torch
    from torch.utils import benchmark

    if isinstance(flush_bytes, bool) or not isinstance(flush_bytes, int) or flush_bytes < 0:
        raise ValueError(f"time_cpu: flush_bytes must be an integer >= 0, got {flush_bytes!r}")
    threads = num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    for _ in range(config.warmup):
        fn()
    clock = cpu_clock(threads)
    if before is not None:
        return _time_after(fn, config, clock, before)
    if flush_bytes:
        scratch = torch.empty(max(1, flush_bytes // 4), dtype=torch.float32)
        return _time_after(fn, config, clock, lambda: scratch.fill_(1.0))
    t0 = clock()
    fn()
    probe_s = max(clock() - t0, 1e-7)
    number = max(1, math.ceil(config.sample_s / probe_s))
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, timer=cpu_clock(threads))
    samples: list[float] = []
    began = time.perf_counter()
    while True:
        samples.append(timer.timeit(number).mean)
        enough = len(samples) >= config.min_samples and time.perf_counter() - began >= config.min_run_time_s
        if enough or len(samples) >= config.max_samples:
            break
    return TimingStats.from_samples(samples, calls_per_sample=number)


def _time_after(fn, config: TimingConfig, clock, before) -> TimingStats:
    """One call per sample, each after an untimed ``before()``; the same stopping rule as ``time_cpu``."""
    samples: list[float] = []
    began = time.perf_counter()
    while True:
        before()
        t0 = clock()
        fn()
        samples.append(clock() - t0)
        enough = len(samples) >= config.min_samples and time.perf_counter() - began >= config.min_run_time_s
        if enough or len(samples) >= config.max_samples:
            break
    return TimingStats.from_samples(samples)


#: seconds between two rounds of the same item (profile blocks, sampled validation iterations)
ROUND_GAP_S = 20.0


def spaced_rounds(items, measure, rounds: int, *, gap_s: float = ROUND_GAP_S, clock=time.monotonic):
    """Measure each of ``items`` ``rounds`` times, each round of an item at least ``gap_s`` seconds after its
    previous one, interleaved with the first rounds of later items, and yield ``(item, results)`` (the list of its
    ``rounds`` results, in order) as soon as an item's last round is done; items still waiting at the end are
    finished without waiting. Order of the yields: first-round order.

    A shared machine can run a core 1.3-1.6x slower for tens of seconds (measured on this project's 2-core VMs:
    one iteration's median time 0.64x or 1.29x of another run's, in spells). Rounds seconds apart fall in
    different spells, and the lowest of them is the machine's undisturbed speed (the "lowest of repeated
    measurements" rule of Python's ``timeit`` documentation). ``measure(item)`` returns any result; ``clock``
    returns seconds (monotonic). Raises ValueError when ``rounds`` < 1 or ``gap_s`` < 0.
    """
    from collections import deque

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not gap_s >= 0:
        raise ValueError(f"gap_s must be >= 0, got {gap_s!r}")
    waiting = deque()                   # [item, results, time of its last round]
    done = {}                           # position -> (item, results), yielded in first-round order
    order = 0

    def finish_ready(force: bool):
        while waiting and (force or clock() - waiting[0][2] >= gap_s):
            entry = waiting.popleft()
            entry[1].append(measure(entry[0]))
            entry[2] = clock()
            if len(entry[1]) < rounds:
                waiting.append(entry)
            else:
                done[entry[3]] = (entry[0], entry[1])

    def drain():
        nonlocal order
        while order in done:
            yield done.pop(order)
            order += 1

    for position, item in enumerate(items):
        results = [measure(item)]
        if rounds == 1:
            done[position] = (item, results)
        else:
            waiting.append([item, results, clock(), position])
        finish_ready(force=False)
        yield from drain()
    finish_ready(force=True)
    yield from drain()
