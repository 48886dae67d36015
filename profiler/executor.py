"""Execute a ``BatchPlan`` for real: the model's full layer stack on ``cuda`` or ``cpu`` with a paged KV cache.

The validator (``profiler/validate.py``) replays a simulation's iterations through this executor and compares
the measured time of each with the cost model's prediction.

What one iteration computes (shapes as in vLLM's Llama/Mistral/Falcon implementations; T = tokens of the plan,
B = entries of the plan, h = hidden size, q/kv = query/KV heads x head_dim, f = FFN size):

- input preparation: token ids, positions and KV-cache slots of the T new tokens, block tables of the decodes;
- embedding lookup ``[T, h]``; per layer: norm, fused QKV projection ``[T, q + 2kv]``, rotary embedding
  (Su et al., "RoFormer", 2021; the rotate-half form of GPT-NeoX/Llama, theta 10000), KV-cache write of the T
  new keys and values, attention, output projection, residual add, norm, MLP (SwiGLU: fused gate/up ``[T, 2f]``,
  SiLU x up, down; or plain: up, GELU, down), residual add;
- attention, all entries in the same forward: the ``num_decodes`` leading 1-token decodes in one batched call,
  each reading its whole KV (context + its new token) through its block table; each prefill chunk of ``c`` new
  tokens attending to its ``k`` cached tokens plus itself, causal with the mask aligned to the bottom-right
  (query ``i`` sees keys ``0 .. k + i``), as FlashAttention-2 and vLLM's chunked prefill do;
- final norm, LM head over the last token of every entry (``[B, vocab]``, as the roofline prices it) and greedy
  sampling (argmax).

Weights are random (normal, std 0.02, seeded) at the model's dtype; token ids are a fixed function of
(request id, position), so the same request computes the same hidden states however its prompt is chunked.

KV cache: paged (Kwon et al., SOSP'23 §4): per layer one pool of ``num_blocks x block_size`` slots for K and one
for V (``[slots, kv_heads, head_dim]``), a block table per request, blocks handed out on demand and returned on
``free``. The pools are filled with random values when allocated, so *setting* a request's context to ``L``
tokens (``set_context``) only hands it the blocks: the attention then reads ``L`` real (random) cached tokens.
Iteration time depends on the lengths, not on the values, which lets the validator time a sampled iteration
without replaying the ones before it.

Memory: before allocating anything the executor estimates weights + KV pool + activation peak from the
ModelSpec and raises ``ExecutorMemoryError`` (one line) if that exceeds the device's free memory (CUDA: the
driver's free memory; CPU: ``MemAvailable`` of /proc/meminfo).

Timing (``time_call``): warm-up runs, then repeated runs; on CUDA each run between two CUDA events after a
synchronize; on CPU ``time.perf_counter`` around each run with the thread count set explicitly
(``torch.set_num_threads``). Reported: median, min, mean, std and the number of runs.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from cost_models.specs import load_model

ROPE_THETA = 10000.0
INIT_STD = 0.02
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def kv_pool_bytes(model, num_blocks: int, block_size: int) -> int:
    """Bytes of the KV pools: ``num_blocks x block_size`` tokens x 2 (K, V) x kv heads x head_dim x layers x dtype."""
    return num_blocks * block_size * model.kv_bytes_per_token()


def activation_bytes(model, plans, device_type: str = "cpu") -> int:
    """Peak bytes of the temporaries of one forward over the largest of ``plans`` (an over-estimate).

    Per token: residual stream and its norm (2h), QKV output (q + 2kv), MLP input/activation (3f gated, 2f plain)
    in the model dtype. Attention: the gathered K/V of every entry (2 x kv x tokens read) in the model dtype and,
    on CPU where the math kernel may materialize them, fp32 scores of the largest chunk (heads x c x (k + c)) and
    of the decodes (heads x B x longest context). LM head: fp32 logits ``[B, vocab]``.
    """
    dt = model.dtype_bytes
    per_token = 2 * model.hidden_size + model.q_size + 2 * model.kv_size
    per_token += (3 if model.mlp == "gated" else 2) * model.intermediate_size
    peak = 0
    for plan in plans:
        if not plan:
            continue
        d = plan.num_decodes
        tokens = sum(plan.num_new_tokens)
        read = sum(k + n for n, k in zip(plan.num_new_tokens, plan.context_lens))
        longest = max((k + 1 for k in plan.context_lens[:d]), default=0)
        gathered = 2 * model.kv_size * (read + d * longest) * dt
        scores = 0
        if device_type == "cpu":
            chunk = max((n * (n + k) for n, k in plan.prefill_chunks), default=0)
            scores = 4 * model.num_attention_heads * (chunk + d * longest)
        logits = 4 * len(plan) * model.vocab_size
        peak = max(peak, tokens * per_token * dt + gathered + scores + logits)
    return int(peak)


def check_fits(model, device, *, num_kv_blocks: int, block_size: int, extra_bytes: int = 0) -> dict:
    """Raise ExecutorMemoryError if weights + KV pool + ``extra_bytes`` exceed ``device``'s free memory.

    Returns ``{"weight_bytes", "kv_bytes", "activation_bytes", "available_bytes"}``.
    """
    weights = model.weight_bytes()
    kv = kv_pool_bytes(model, num_kv_blocks, block_size)
    avail = available_memory_bytes(device)
    need = weights + kv + extra_bytes
    if need > avail:
        gib = 2 ** 30
        raise ExecutorMemoryError(
            f"{model.name} needs {need / gib:.2f} GiB on {torch.device(device).type} (weights {weights / gib:.2f} GiB, "
            f"KV cache {kv / gib:.2f} GiB for {num_kv_blocks * block_size} tokens, activations "
            f"{extra_bytes / gib:.2f} GiB) but {avail / gib:.2f} GiB is free; use a smaller model, fewer requests "
            f"or --max-iterations")
    return {"weight_bytes": weights, "kv_bytes": kv, "activation_bytes": extra_bytes, "available_bytes": avail}


# --- timing --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Seconds of ``runs`` timed runs of one call (after the warm-up runs)."""

    median_s: float
    min_s: float
    mean_s: float
    std_s: float
    runs: int


def time_call(fn, device: str | torch.device, *, warmup: int = 2, repeats: int = 5) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed runs, then ``repeats`` timed runs.

    CUDA: synchronize, record a start event, run, record an end event, synchronize; elapsed time between the events.
    CPU: ``time.perf_counter`` around each run (set the thread count beforehand with ``torch.set_num_threads``).
    Raises ValueError when ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_call: need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
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
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), min(samples), statistics.fmean(samples),
                  statistics.pstdev(samples), len(samples))


# --- the KV cache --------------------------------------------------------------------------------------------
class PagedKVCache:
    """Per-layer K and V pools of ``num_blocks x block_size`` slots (``[slots, kv_heads, head_dim]``) and a block
    table per request. Slot of position ``p`` of request ``r``: ``table[r][p // block_size] * block_size +
    p % block_size``. Units: tokens and blocks. Raises ExecutorMemoryError when a request needs more blocks than
    are free."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype, device, generator: torch.Generator):
        slots = num_blocks * block_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (slots, kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device).normal_(generator=generator) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device).normal_(generator=generator) for _ in range(num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))     # pop() hands out block 0 first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def length(self, request_id: int) -> int:
        """KV tokens held for ``request_id`` (0 if none)."""
        return self.lengths.get(request_id, 0)

    def reserve(self, request_id: int, tokens: int) -> None:
        """Make ``request_id`` hold blocks for at least ``tokens`` tokens (its length is unchanged)."""
        table = self.tables.setdefault(request_id, [])
        need = -(-tokens // self.block_size) - len(table)
        if need > len(self._free):
            raise ExecutorMemoryError(f"KV cache full: request {request_id} needs {need} more blocks of "
                                      f"{self.block_size} tokens, {len(self._free)} free of {self.num_blocks}")
        for _ in range(max(0, need)):
            table.append(self._free.pop())
        self.lengths.setdefault(request_id, 0)

    def set_length(self, request_id: int, tokens: int) -> None:
        """Declare ``tokens`` tokens of ``request_id`` cached (blocks reserved; values are whatever the slots hold)."""
        self.reserve(request_id, tokens)
        self.lengths[request_id] = tokens

    def free(self, request_id: int) -> None:
        """Return ``request_id``'s blocks (a no-op if it holds none)."""
        self._free.extend(reversed(self.tables.pop(request_id, [])))
        self.lengths.pop(request_id, None)

    def slots(self, request_id: int, start: int, end: int) -> np.ndarray:
        """Slot indices of positions ``start .. end-1`` of ``request_id`` (int64)."""
        table = np.asarray(self.tables[request_id], dtype=np.int64)
        pos = np.arange(start, end, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


# --- the model -----------------------------------------------------------------------------------------------
class Executor:
    """The full layer stack of ``model`` with random weights and a paged KV cache on ``device``.

    Args:
        model: a ModelSpec or a name ``load_model`` knows (all its layers are built: tp = pp = 1).
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        num_kv_blocks: KV blocks in the pool (``block_size`` tokens each).
        threads: CPU threads for torch (set explicitly; None keeps torch's current setting).
        seed: seeds the weights, the KV pool's values and nothing else.
        activation_bytes: activation peak to include in the memory check (see ``activation_bytes``).
    Raises:
        ExecutorMemoryError (one line) before allocating when weights + KV pool + activations exceed the free memory;
        ValueError for a dtype torch cannot run or a CUDA device that is not available.
    """

    def __init__(self, model, device: str = "cpu", *, num_kv_blocks: int, block_size: int = 16,
                 threads: int | None = None, seed: int = 0, activation_bytes: int = 0):
        self.model = m = load_model(model)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("exec device cuda: torch finds no CUDA device; use --exec-device cpu")
        if m.dtype not in TORCH_DTYPES:
            raise ValueError(f"{m.name}: dtype {m.dtype} cannot be executed; known: {', '.join(TORCH_DTYPES)}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.memory = check_fits(m, self.device, num_kv_blocks=num_kv_blocks, block_size=block_size,
                                 extra_bytes=activation_bytes)
        self.dtype = TORCH_DTYPES[m.dtype]
        g = torch.Generator(device=self.device).manual_seed(seed)
        dev, dt = self.device, self.dtype

        def weight(*shape):
            return torch.empty(shape, dtype=dt, device=dev).normal_(0.0, INIT_STD, generator=g)

        h, q, kv, f = m.hidden_size, m.q_size, m.kv_size, m.intermediate_size
        mlp_in = 2 * f if m.mlp == "gated" else f
        self.embedding = weight(m.vocab_size, h)
        self.layers = []
        for _ in range(m.num_layers):
            self.layers.append({
                "norm1": torch.ones(h, dtype=dt, device=dev), "norm2": torch.ones(h, dtype=dt, device=dev),
                "qkv": weight(q + 2 * kv, h), "o": weight(h, q), "up": weight(mlp_in, h), "down": weight(h, f),
            })
        self.final_norm = torch.ones(h, dtype=dt, device=dev)
        self.lm_head = weight(m.vocab_size, h)
        self.zero_bias = torch.zeros(h, dtype=dt, device=dev)
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, m.head_dim, 2, dtype=torch.float32) / m.head_dim)
        angles = torch.outer(torch.arange(m.max_model_len, dtype=torch.float32), inv_freq)
        self.cos = angles.cos().to(device=dev, dtype=dt)       # [max_model_len, head_dim / 2]
        self.sin = angles.sin().to(device=dev, dtype=dt)
        self.kv = PagedKVCache(m.num_layers, num_kv_blocks, block_size, m.num_kv_heads, m.head_dim, dt, dev, g)
        self._gqa = m.num_attention_heads != m.num_kv_heads

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
        (``fill=True``) each request's cached length to its ``context_len``; reserve blocks for the new tokens.

        Raises PlanStateError (``fill=False``) naming the first request whose cached length differs.
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

    def measure(self, plan, *, fill: bool = False, warmup: int = 2, repeats: int = 5) -> Timing:
        """Time ``plan`` (``time_call``: input preparation + forward + sampling) and advance the KV state.

        Every timed run writes the same KV slots and reads the same lengths, so repeats are identical work.
        """
        self.prepare(plan, fill=fill)
        timing = time_call(lambda: self.forward(plan), self.device, warmup=warmup, repeats=repeats)
        self.commit(plan)
        return timing

    # --- one iteration -------------------------------------------------------------------------------------
    def _inputs(self, plan) -> dict:
        """Token ids, positions, KV slots and attention metadata of ``plan`` as device tensors."""
        m, bs, dev = self.model, self.kv.block_size, self.device
        pos = np.concatenate([np.arange(k, k + n, dtype=np.int64) for _, n, k in plan.entries()])
        rids = np.repeat(np.asarray(plan.request_ids, dtype=np.int64), plan.num_new_tokens)
        token_ids = (rids * 7919 + pos * 104729 + 12345) % m.vocab_size
        slots = np.concatenate([self.kv.slots(rid, k, k + n) for rid, n, k in plan.entries()])
        d = plan.num_decodes
        out = {
            "token_ids": torch.from_numpy(token_ids).to(dev, non_blocking=True),
            "positions": torch.from_numpy(pos).to(dev, non_blocking=True),
            "slots": torch.from_numpy(slots).to(dev, non_blocking=True),
            "last": torch.from_numpy(np.cumsum(plan.num_new_tokens) - 1).to(dev, non_blocking=True),
        }
        if d:
            lens = np.asarray(plan.context_lens[:d], dtype=np.int64) + 1
            width = -(-int(lens.max()) // bs)
            tables = np.zeros((d, width), dtype=np.int64)
            for i, rid in enumerate(plan.request_ids[:d]):
                t = self.kv.tables[rid][:width]
                tables[i, :len(t)] = t
            p = np.arange(int(lens.max()), dtype=np.int64)
            dec_slots = tables[:, p // bs] * bs + p % bs                    # [d, longest]
            out["dec_slots"] = torch.from_numpy(dec_slots).to(dev, non_blocking=True)
            out["dec_mask"] = torch.from_numpy(p[None, :] < lens[:, None])[:, None, None, :].to(dev, non_blocking=True)
        out["chunks"] = [(n, k, torch.from_numpy(self.kv.slots(rid, 0, k + n)).to(dev, non_blocking=True))
                         for rid, n, k in list(plan.entries())[d:]]
        return out

    def _norm(self, x, weight):
        if self.model.norm == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), weight, self.zero_bias)
        return F.rms_norm(x, (x.shape[-1],), weight, eps=1e-5)

    def _rope(self, x, cos, sin):
        """Rotate-half rotary embedding of ``x`` ``[T, heads, head_dim]`` with ``cos``/``sin`` ``[T, 1, head_dim/2]``."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _attention(self, q, layer: int, inputs: dict, d: int):
        """Attention of all ``T`` queries ``[T, Hq, dh]`` against the KV cache; returns ``[T, Hq * dh]``."""
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        parts = []
        if d:
            s = inputs["dec_slots"]                                          # [d, L]
            k = kc[s].transpose(1, 2)                                        # [d, Hkv, L, dh]
            v = vc[s].transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:d].unsqueeze(2), k, v, attn_mask=inputs["dec_mask"],
                                               enable_gqa=self._gqa)        # [d, Hq, 1, dh]
            parts.append(o.reshape(d, -1))
        start = d
        for n, ctx, slots in inputs["chunks"]:
            qc = q[start:start + n].transpose(0, 1).unsqueeze(0)             # [1, Hq, n, dh]
            k = kc[slots].transpose(0, 1).unsqueeze(0)                      # [1, Hkv, ctx + n, dh]
            v = vc[slots].transpose(0, 1).unsqueeze(0)
            if ctx:
                mask = causal_lower_right(n, ctx + n)
                o = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, enable_gqa=self._gqa)
            else:
                o = F.scaled_dot_product_attention(qc, k, v, is_causal=True, enable_gqa=self._gqa)
            parts.append(o[0].transpose(0, 1).reshape(n, -1))
            start += n
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.inference_mode()
    def forward(self, plan):
        """One iteration of ``plan`` on the current KV state (blocks must be reserved: see ``prepare``).

        Writes the new tokens' K/V into the cache but does not advance the cached lengths (``commit`` does).
        Returns ``(last_hidden [B, h], next_tokens [B])``: the final-norm hidden state of each entry's last token
        and its greedy next token.
        """
        m = self.model
        inputs = self._inputs(plan)
        d = plan.num_decodes
        T = inputs["token_ids"].shape[0]
        hq, hkv, dh = m.num_attention_heads, m.num_kv_heads, m.head_dim
        cos = self.cos[inputs["positions"]].unsqueeze(1)
        sin = self.sin[inputs["positions"]].unsqueeze(1)
        x = F.embedding(inputs["token_ids"], self.embedding)
        for i, w in enumerate(self.layers):
            residual = x
            qkv = F.linear(self._norm(x, w["norm1"]), w["qkv"])
            q, k, v = qkv.split([hq * dh, hkv * dh, hkv * dh], dim=-1)
            q = self._rope(q.view(T, hq, dh), cos, sin)
            k = self._rope(k.view(T, hkv, dh), cos, sin)
            self.kv.k[i].index_copy_(0, inputs["slots"], k)
            self.kv.v[i].index_copy_(0, inputs["slots"], v.view(T, hkv, dh))
            x = F.linear(self._attention(q, i, inputs, d), w["o"]) + residual
            residual = x
            y = F.linear(self._norm(x, w["norm2"]), w["up"])
            if m.mlp == "gated":
                gate, up = y.chunk(2, dim=-1)
                y = F.silu(gate) * up
            else:
                y = F.gelu(y)
            x = F.linear(y, w["down"]) + residual
        last = self._norm(x[inputs["last"]], self.final_norm)
        next_tokens = F.linear(last, self.lm_head).argmax(dim=-1)
        return last, next_tokens


def kv_blocks_for(lengths, block_size: int) -> int:
    """Blocks needed to hold every length in ``lengths`` (tokens)."""
    return sum(math.ceil(n / block_size) for n in lengths)


__all__ = ["Executor", "ExecutorMemoryError", "PagedKVCache", "PlanStateError", "Timing", "activation_bytes",
           "available_memory_bytes", "check_fits", "kv_blocks_for", "kv_pool_bytes", "time_call"]
