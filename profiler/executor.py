"""Execute a ``BatchPlan`` for real: the model's full layer stack on ``cuda`` or ``cpu`` with a real KV cache.

The validator (``simulator/validate.py``) replays a simulation's iterations through this executor and compares
the measured time of each with the cost model's prediction.

What one iteration computes (shapes as in vLLM's Llama/Mistral/Falcon implementations; T = tokens of the plan,
B = entries of the plan, h = hidden size, q/kv = query/KV heads x head_dim, f = FFN size):

- input preparation: token ids, positions and KV-cache (slot, position) pairs of the T new tokens, the decodes'
  padding mask and the prefill chunks' masks (the attention metadata, built once per iteration as engines do);
- embedding lookup ``[T, h]``; per layer: norm, fused QKV projection ``[T, q + 2kv]``, rotary embedding, KV-cache
  write of the T new keys and values, attention, output projection, residual add, norm, MLP (SwiGLU: fused
  gate/up ``[T, 2f]``, SiLU(gate) x up, down; or plain: up, GELU, down), residual add;
- attention, all entries in the same forward: the ``num_decodes`` leading 1-token decodes in one batched call,
  each reading its whole KV (context + its new token), padded to the longest with a mask; each prefill chunk of
  ``c`` new tokens attending to its ``k`` cached tokens plus itself, causal with the mask aligned to the
  bottom-right (query ``i`` sees keys ``0 .. k + i``), as FlashAttention-2 and vLLM's chunked prefill do;
- final norm, LM head over the last token of every entry (``[B, vocab]``, as the cost models price it) and
  greedy sampling (argmax).

The layers and kernels are the profiler's (``profiler.ops``: ``Layer`` weights, ``rotary_embedding``,
``kv_cache_save``, ``attention_prefill``/``attention_decode`` over ``scaled_dot_product_attention``), so a
validation measures how well the fitted sum of operators predicts a whole iteration, not two implementations.

Weights are random (seeded) at the model's dtype; token ids are a fixed function of (request id, position), so
the same request computes the same hidden states however its prompt is chunked.

KV cache (``SlotKVCache``): contiguous per request, one slot of ``capacity`` tokens each, layout
``[slot, kv_head, position, head_dim]`` per layer for K and V (``profiler.ops.Layer``'s). Before each iteration
(untimed) the decodes are moved into slots ``0 .. d-1`` so their batched attention reads the cache in place. The
cache is filled with random values when allocated, so *setting* a request's context to ``L`` tokens
(``set_context``) only gives it a slot: the attention then reads ``L`` real (random) cached tokens. Iteration time
depends on the lengths, not on the values, which lets the validator time a sampled iteration without replaying
the ones before it.

Memory: before allocating anything the executor estimates weights + KV cache + activation peak from the
ModelSpec and raises ``ExecutorMemoryError`` (one line) if that exceeds the device's free memory (CUDA: the
driver's free memory; CPU: ``MemAvailable`` of /proc/meminfo).

Timing (``time_call``): warm-up runs, then repeated runs; on CUDA each run between two CUDA events after a
synchronize; on CPU, with the thread count set explicitly (``torch.set_num_threads``), the calling thread's CPU
time when torch runs on one thread (``cpu_clock``: time slices given to other processes on a shared machine are
left out), else ``time.perf_counter``. Reported: median, min, mean, std, the number of runs and the clock.
"""
from __future__ import annotations

import heapq
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cost_models.specs import load_model



class ExecutorMemoryError(ValueError):
    """The model weights, the KV cache or the activations of a plan do not fit the device."""


class PlanStateError(ValueError):
    """A plan's context length disagrees with the KV tokens the executor holds for that request."""


# --- memory --------------------------------------------------------------------------------------------------
def available_memory_bytes(device: str | torch.device) -> int:
    """Free memory of ``device`` in bytes: CUDA's free device memory, or the CPU's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def kv_cache_bytes(model, num_slots: int, capacity: int) -> int:
    """Bytes of the KV cache: ``num_slots x capacity`` tokens x 2 (K, V) x kv heads x head_dim x layers x dtype."""
    return num_slots * capacity * model.kv_bytes_per_token()


def activation_bytes(model, plans, device_type: str = "cpu") -> int:
    """Peak bytes of the temporaries of one forward over the largest of ``plans`` (an over-estimate).

    Per token: residual stream and its norm (2h), QKV output (q + 2kv), MLP input/activation (3f gated, 2f plain)
    in the model dtype. Decode attention with a padding mask may run on the math kernel, which repeats grouped
    K/V heads: 2 x decodes x longest context x q in the model dtype. On CPU, where the math kernel may
    materialize them: fp32 scores of the largest chunk (heads x c x (k + c)) and of the decodes (heads x B x
    longest context). LM head: fp32 logits ``[B, vocab]``.
    """
    dt = model.dtype_bytes
    per_token = 2 * model.hidden_size + model.q_size + 2 * model.kv_size
    per_token += (3 if model.mlp == "gated" else 2) * model.intermediate_size
    peak = 0
    for plan in plans:
        if not plan:
            continue
        d = plan.num_decodes
        longest = max((k + 1 for k in plan.context_lens[:d]), default=0)
        scores = 0
        if device_type == "cpu":
            chunk = max((n * (n + k) for n, k in plan.prefill_chunks), default=0)
            scores = 4 * model.num_attention_heads * (chunk + d * longest)
        logits = 4 * len(plan) * model.vocab_size
        repeated_kv = 2 * d * longest * model.q_size * dt if model.num_kv_heads != model.num_attention_heads else 0
        peak = max(peak, sum(plan.num_new_tokens) * per_token * dt + scores + logits + repeated_kv)
    return int(peak)


def check_fits(model, device, *, num_slots: int, capacity: int, extra_bytes: int = 0) -> dict:
    """Raise ExecutorMemoryError if weights + KV cache + ``extra_bytes`` exceed ``device``'s free memory.

    Returns ``{"weight_bytes", "kv_bytes", "activation_bytes", "available_bytes"}``.
    """
    weights = model.weight_bytes()
    kv = kv_cache_bytes(model, num_slots, capacity)
    avail = available_memory_bytes(device)
    need = weights + kv + extra_bytes
    if need > avail:
        gib = 2 ** 30
        raise ExecutorMemoryError(
            f"{model.name} needs {need / gib:.2f} GiB on {torch.device(device).type} (weights {weights / gib:.2f} GiB, "
            f"KV cache {kv / gib:.2f} GiB for {num_slots} requests x {capacity} tokens, activations "
            f"{extra_bytes / gib:.2f} GiB) but {avail / gib:.2f} GiB is free; use a smaller model, fewer requests, "
            f"a smaller --max-num-seqs or --max-iterations")
    return {"weight_bytes": weights, "kv_bytes": kv, "activation_bytes": extra_bytes, "available_bytes": avail}


# --- timing --------------------------------------------------------------------------------------------------
CLOCKS = ("thread", "wall")


@dataclass(frozen=True)
class Timing:
    """Seconds of ``runs`` timed runs of one call (after the warm-up runs), read on ``clock``
    (``cuda_events``, ``thread`` CPU time or ``wall`` time)."""

    median_s: float
    min_s: float
    mean_s: float
    std_s: float
    runs: int
    clock: str = "wall"


def cpu_clock(requested: str = "thread") -> str:
    """The clock CPU runs are timed with: ``thread`` (the calling thread's CPU time, ``time.thread_time``) when
    ``requested`` and torch runs on one thread, else ``wall`` (``time.perf_counter``).

    With one thread every kernel runs in the calling thread, so its CPU time is the run's time on an uncontended
    core: on a shared machine the scheduler's time slices given to other processes, which stretch a 50 ms
    iteration far more than the short operators the profiler times, are left out. With more threads only wall
    time is meaningful. Raises ValueError for an unknown clock.
    """
    if requested not in CLOCKS:
        raise ValueError(f"cpu clock must be one of {', '.join(CLOCKS)}, got {requested!r}")
    return "thread" if requested == "thread" and torch.get_num_threads() == 1 else "wall"


def time_call(fn, device: str | torch.device, *, warmup: int = 2, repeats: int = 5, clock: str = "thread"
              ) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed runs, then ``repeats`` timed runs.

    CUDA: synchronize, record a start event, run, record an end event, synchronize; elapsed time between the events.
    CPU: ``cpu_clock(clock)`` around each run (set the thread count beforehand with ``torch.set_num_threads``).
    Raises ValueError when ``repeats`` < 1 or ``warmup`` < 0, or for an unknown clock.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_call: need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    used = "cuda_events" if device.type == "cuda" else cpu_clock(clock)
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        now = time.thread_time if used == "thread" else time.perf_counter
        for _ in range(repeats):
            t0 = now()
            fn()
            samples.append(now() - t0)
    return Timing(statistics.median(samples), min(samples), statistics.fmean(samples),
                  statistics.pstdev(samples), len(samples), used)


# --- the KV cache --------------------------------------------------------------------------------------------
class SlotKVCache:
    """A contiguous KV cache per request (FasterTransformer/Orca style; the ``[slot, kv_head, position, head_dim]``
    layout of FlashAttention's ``flash_attn_with_kvcache`` and of ``profiler.ops.Layer``): per layer one K and one V
    tensor of ``num_slots x kv_heads x capacity x head_dim``. A request holds one slot while it has cached tokens.

    ``arrange(decode_ids)`` moves the decodes of an iteration into slots ``0 .. d-1`` (swapping slot contents,
    outside any timed region), so the batched decode attention reads its keys in place, as a paged-attention
    kernel does, rather than through a gather copy that no serving kernel makes. Units: tokens and slots.
    Raises ExecutorMemoryError when no slot is free or a request outgrows ``capacity``.
    """

    def __init__(self, num_layers: int, num_slots: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype, device, generator: torch.Generator):
        self.num_slots, self.capacity = num_slots, capacity
        shape = (num_slots, kv_heads, capacity, head_dim)
        def random_cache():
            return torch.empty(shape, dtype=dtype, device=device).normal_(generator=generator)

        self.k = [random_cache() for _ in range(num_layers)]
        self.v = [random_cache() for _ in range(num_layers)]
        self._free = list(range(num_slots))            # a min-heap: the lowest free slot first
        self.slot_of: dict[int, int] = {}
        self.owner: dict[int, int] = {}
        self.lengths: dict[int, int] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def length(self, request_id: int) -> int:
        """KV tokens held for ``request_id`` (0 if none)."""
        return self.lengths.get(request_id, 0)

    def reserve(self, request_id: int, tokens: int) -> None:
        """Give ``request_id`` a slot (if it has none) able to hold ``tokens`` tokens; its length is unchanged."""
        if tokens > self.capacity:
            raise ExecutorMemoryError(f"KV cache: request {request_id} needs {tokens} tokens, a slot holds "
                                      f"{self.capacity}")
        if request_id in self.slot_of:
            return
        if not self._free:
            raise ExecutorMemoryError(f"KV cache full: request {request_id} needs a slot, all {self.num_slots} are "
                                      f"taken")
        slot = heapq.heappop(self._free)
        self.slot_of[request_id], self.owner[slot] = slot, request_id
        self.lengths[request_id] = 0

    def set_length(self, request_id: int, tokens: int) -> None:
        """Declare ``tokens`` tokens of ``request_id`` cached (slot reserved; values are whatever the slot holds)."""
        self.reserve(request_id, tokens)
        self.lengths[request_id] = tokens

    def free(self, request_id: int) -> None:
        """Return ``request_id``'s slot (a no-op if it holds none)."""
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            del self.owner[slot]
            self.lengths.pop(request_id)
            heapq.heappush(self._free, slot)

    def _swap(self, a: int, b: int) -> None:
        """Exchange the contents and owners of slots ``a`` and ``b`` (either may be free)."""
        ra, rb = self.owner.get(a), self.owner.get(b)
        n = max(self.lengths.get(ra, 0), self.lengths.get(rb, 0))
        if n:
            for cache in (*self.k, *self.v):
                tmp = cache[a, :, :n].clone()
                cache[a, :, :n] = cache[b, :, :n]
                cache[b, :, :n] = tmp
        for slot, rid in ((a, rb), (b, ra)):
            if rid is None:
                self.owner.pop(slot, None)
            else:
                self.owner[slot], self.slot_of[rid] = rid, slot
        if (ra is None) != (rb is None):          # the free slot becomes taken and the other one free
            taken, freed = (a, b) if ra is None else (b, a)
            self._free.remove(taken)
            self._free.append(freed)
            heapq.heapify(self._free)

    def arrange(self, decode_ids) -> None:
        """Move the requests ``decode_ids`` (each holding a slot) into slots ``0 .. len(decode_ids) - 1``."""
        d = len(decode_ids)
        decode = set(decode_ids)
        targets = [t for t in range(d) if self.owner.get(t) not in decode]
        misplaced = [rid for rid in decode_ids if self.slot_of[rid] >= d]
        for rid, t in zip(misplaced, targets):
            self._swap(self.slot_of[rid], t)


# --- the model -----------------------------------------------------------------------------------------------
# --- the model -----------------------------------------------------------------------------------------------
class Executor:
    """The full layer stack of ``model`` with random weights and a per-request KV cache on ``device``.

    Each decoder layer is a ``profiler.ops.Layer`` (weights ``[in, out]``, applied as ``x @ w``) and runs the
    profiler's kernels in the cost models' operator order: ``input_layernorm``, ``attn_pre_proj``, ``attn_rope``,
    ``attn_kv_cache_save``, ``attn_prefill``/``attn_decode``, ``attn_post_proj``, ``add``,
    ``post_attention_layernorm``, ``mlp_up_proj``, ``mlp_act``, ``mlp_down_proj``, ``add``; once per iteration
    ``emb``, and ``lm_head`` after a final norm, then greedy sampling.

    Args:
        model: a ModelSpec or a name ``load_model`` knows (all its layers are built: tp = pp = 1).
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        num_slots: requests that can hold KV at once; ``capacity``: tokens each can hold.
        threads: CPU threads for torch (set explicitly; None keeps torch's current setting).
        seed: seeds the weights (layer ``i`` uses ``seed + i``) and the KV cache's values.
        activation_bytes: activation peak to include in the memory check (see ``activation_bytes``).
        max_positions: rows of the rotary table (default: the spec's ``max_model_len``, at least ``capacity``).
    Raises:
        ExecutorMemoryError (one line) before allocating when weights + KV cache + activations exceed the free
        memory; ValueError for a dtype torch cannot run or a CUDA device that is not available.
    """

    def __init__(self, model, device: str = "cpu", *, num_slots: int, capacity: int, threads: int | None = None,
                 seed: int = 0, activation_bytes: int = 0, max_positions: int | None = None):
        from profiler.ops import TORCH_DTYPES, Layer
        from profiler.schema import LayerShapes

        self.model = m = load_model(model)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("exec device cuda: torch finds no CUDA device; use --exec-device cpu")
        if m.dtype not in TORCH_DTYPES:
            raise ValueError(f"{m.name}: dtype {m.dtype} cannot be executed; known: {', '.join(TORCH_DTYPES)}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.memory = check_fits(m, self.device, num_slots=num_slots, capacity=capacity,
                                 extra_bytes=activation_bytes)
        shapes = LayerShapes.of(m, 1)
        positions = max(max_positions or m.max_model_len, capacity)
        self.layers = [Layer(shapes, device=self.device, dtype=m.dtype, max_positions=positions if i == 0 else 1,
                             with_vocab=i == 0, seed=seed + i) for i in range(m.num_layers)]
        self.vocab = self.layers[0]                     # holds the embedding, the LM head and the rotary table
        g = torch.Generator(device=self.device).manual_seed(seed)
        self.kv = SlotKVCache(m.num_layers, num_slots, capacity, shapes.num_kv_heads, shapes.head_dim,
                              self.vocab.dtype, self.device, g)

    # --- state ---------------------------------------------------------------------------------------------
    def kv_len(self, request_id: int) -> int:
        """KV tokens cached for ``request_id``."""
        return self.kv.length(request_id)

    def free(self, request_id: int) -> None:
        """Drop ``request_id``'s KV cache (finished or preempted)."""
        self.kv.free(request_id)

    def set_context(self, request_id: int, tokens: int) -> None:
        """Make ``request_id`` hold ``tokens`` cached tokens (random values; see the module docstring)."""
        self.kv.set_length(request_id, tokens)

    def prepare(self, plan, *, fill: bool = False) -> None:
        """Get the KV state ready for ``plan``: drop ``plan.preempted_ids``; check (``fill=False``) or set
        (``fill=True``) each request's cached length to its ``context_len``; reserve room for the new tokens;
        move the decodes into slots ``0 .. d-1``.

        Raises PlanStateError (``fill=False``) naming the first request whose cached length differs, and
        ExecutorMemoryError when the cache has no room.
        """
        for rid in plan.preempted_ids:
            self.kv.free(rid)
        for rid, n, k in plan.entries():
            if self.kv.length(rid) != k:
                if not fill:
                    raise PlanStateError(f"request {rid}: executor holds {self.kv.length(rid)} KV tokens but the "
                                         f"plan's context_len is {k}")
                self.kv.set_length(rid, k)
            self.kv.reserve(rid, k + n)
        self.kv.arrange(plan.request_ids[:plan.num_decodes])

    def commit(self, plan) -> None:
        """Advance each request's cached length by its new tokens (after the plan has run)."""
        for rid, n, k in plan.entries():
            self.kv.lengths[rid] = k + n

    def step(self, plan, *, fill: bool = False):
        """Run ``plan`` once and advance the KV state; return ``(last_hidden [B, h], next_tokens [B])``."""
        self.prepare(plan, fill=fill)
        out = self.forward(plan)
        self.commit(plan)
        return out

    def measure(self, plan, *, fill: bool = False, warmup: int = 2, repeats: int = 5, clock: str = "thread"
                ) -> Timing:
        """Time ``plan`` (``time_call``: input preparation + forward + sampling) and advance the KV state.

        Every timed run writes the same KV positions and reads the same lengths, so repeats are identical work.
        """
        self.prepare(plan, fill=fill)
        timing = time_call(lambda: self.forward(plan), self.device, warmup=warmup, repeats=repeats, clock=clock)
        self.commit(plan)
        return timing

    # --- one iteration -------------------------------------------------------------------------------------
    def _inputs(self, plan) -> dict:
        """Token ids, positions, KV-cache slots and attention metadata of ``plan`` (``profiler.ops.iteration_inputs``)."""
        from profiler.ops import iteration_inputs

        return iteration_inputs(plan, self.kv.slot_of, self.model.vocab_size, self.device)

    def _attention(self, q, layer: int, inputs: dict, d: int):
        """Attention of all ``T`` queries ``[T, Hq x dh]`` against the KV cache; returns ``[T, Hq x dh]``."""
        from profiler.ops import attention_decode, attention_prefill

        kc, vc = self.kv.k[layer], self.kv.v[layer]
        parts = []
        if d:
            meta, to_slot_order, to_plan_order = inputs["decode"]
            qd = q[:d] if to_slot_order is None else q[:d].index_select(0, to_slot_order)
            o = attention_decode(qd, kc, vc, meta)
            parts.append(o if to_plan_order is None else o.index_select(0, to_plan_order))
        start = d
        for meta in inputs["chunks"]:
            parts.append(attention_prefill(q[start:start + meta.chunk_len], kc, vc, meta))
            start += meta.chunk_len
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.inference_mode()
    def forward(self, plan):
        """One iteration of ``plan`` on the current KV state (room must be reserved: see ``prepare``).

        Writes the new tokens' K/V into the cache but does not advance the cached lengths (``commit`` does).
        Returns ``(last_hidden [B, h], next_tokens [B])``: the final-norm hidden state of each entry's last token
        and its greedy next token.
        """
        from profiler.ops import kv_cache_save, rotary_embedding

        m, vocab = self.model, self.vocab
        inputs = self._inputs(plan)
        d = plan.num_decodes
        slots, positions = inputs["slots"], inputs["positions"]
        x = F.embedding(inputs["token_ids"], vocab.emb)
        for i, layer in enumerate(self.layers):
            qkv = layer.norm(x) @ layer.w_qkv
            q, k, v = qkv.split([m.q_size, m.kv_size, m.kv_size], dim=-1)
            q, k = rotary_embedding(q, k, positions, vocab.cos_sin, m.head_dim)
            kv_cache_save(k, v, self.kv.k[i], self.kv.v[i], slots, positions)
            x = x + self._attention(q, i, inputs, d) @ layer.w_o
            x = x + layer.activation(layer.norm(x) @ layer.w_up) @ layer.w_down
        last = vocab.norm(x.index_select(0, inputs["last"]))
        return last, (last @ vocab.w_lm_head).argmax(dim=-1)


__all__ = ["CLOCKS", "Executor", "ExecutorMemoryError", "PlanStateError", "SlotKVCache", "Timing",
           "activation_bytes", "available_memory_bytes", "check_fits", "cpu_clock", "kv_cache_bytes", "time_call"]
