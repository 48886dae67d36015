"""The operators of one decoder layer in plain torch, on any device (CUDA or CPU), with random weights.

Operator names are the cost models' (``cost_models/roofline.py``): ``input_layernorm``, ``attn_pre_proj`` (QKV),
``attn_rope``, ``attn_kv_cache_save``, ``attn_prefill``, ``attn_decode``, ``attn_post_proj`` (O),
``post_attention_layernorm``, ``mlp_up_proj`` (gate+up for SwiGLU), ``mlp_act``, ``mlp_down_proj``, ``add`` (one
residual add; a layer has two), and once per iteration ``emb``, ``lm_head`` and ``cpu_overhead`` (the host-side
work of an iteration outside the layers: input preparation and greedy sampling; see ``operator_callable``).
Shapes follow vLLM's Llama/Mistral implementation; tensor parallelism is modelled by sharding on one device
(``LayerShapes.of(model, tp)`` holds the per-GPU heads, FFN and vocabulary).

Building blocks (usable by the profiler and by a plan executor):

- ``Layer(shapes, device=, dtype=)``: random weights, a RoPE cos/sin table and a contiguous KV cache of
  ``kv_slots`` sequences x ``max_kv_len`` tokens, layout ``[slot, kv_head, position, head_dim]`` (one K and one V
  tensor per layer; a slot is one sequence's cache, like FlashAttention's ``flash_attn_with_kvcache``).
- Functional kernels: ``rms_norm``, ``rotary_embedding`` (NeoX style, Su et al. 2021), ``kv_cache_save``,
  ``attention_prefill`` and ``attention_decode`` (``torch.nn.functional.scaled_dot_product_attention``, grouped-query
  heads via ``enable_gqa``), ``silu_and_mul`` (SwiGLU, Shazeer 2020), ``gelu``.
- Attention metadata (``prefill_metadata``, ``decode_metadata``) is built once per iteration, as serving engines do,
  and is not part of an operator's time.
- ``operator_callable(layer, name, **shape)``: a no-argument closure over prepared random inputs that runs one
  operator once, for ``profiler.timing.time_operator``. With ``cold=True`` (the profiler's default) successive
  calls read different copies of the weights and different KV-cache slots, cycling through what one iteration of
  the whole model reads between two reads of the same data (``reuse_bytes``: every weight and every cached key is
  read once per iteration, the other layers and the LM head in between), capped at twice the last-level cache
  (``cache_flush_bytes``). A model bigger than the cache is then read from memory, as a real iteration reads it;
  one that fits (the tiny model in a CPU's L3 of hundreds of MiB) is read from the cache, as it is inside a real
  iteration there. Repeating an operator on the same weights instead keeps them in the core's own caches: on the
  tiny model on a CPU that made a 1-token projection 3-4x and a small-batch LM head 1.3x faster than inside an
  iteration.
  Activations are not rotated, but on a CPU the profiler times each call right after the operators that precede it
  inside a layer (``PRECEDING_OPERATORS``, ``preceding_callable``; ``profiler.timing``'s ``before``): a norm after
  the GEMM that streamed its weights through the core's caches, a GEMM after the norm that wrote its input, the LM
  head after the layers of an iteration of its sequences and tokens. The predecessors' outputs stay alive through
  the timed call, as a layer's do, so its output is not allocated where theirs just were: freed at once, they left
  a norm's output a hot block, 0.16-0.19 ms at 512 tokens against 0.22-0.23 ms inside the executor. The embedding
  and ``cpu_overhead``, which start an iteration, follow a flush of the core's private caches instead
  (``private_cache_flush_bytes``).

Attention semantics: a prefill chunk of ``c`` new tokens of a sequence with ``k`` tokens already cached attends to
all ``k + c`` keys with a causal mask aligned to the bottom-right (token ``i`` of the chunk sees keys ``0..k+i``),
after its keys were written to the cache. A decode batch is ``b`` sequences of one query token each with KV lengths
``kv_lens`` (including the new token); the keys are read from the cache padded to ``max(kv_lens)`` with a padding
mask (none when all lengths are equal), so this backend's cost follows ``b x max(kv_lens)``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from profiler.schema import OPERATORS, LayerShapes

ATTENTION_BACKEND = "torch_sdpa"
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_HAS_GQA = _TORCH_VERSION >= (2, 5)


def _cpu0_caches() -> list[tuple[int, int, str]]:
    """``(level, bytes, shared_cpu_list)`` of each cache of CPU 0, from sysfs; [] when unreadable."""
    caches = []
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.is_dir() else []:
        try:
            text = (index / "size").read_text().strip().upper()
            level = int((index / "level").read_text())
            shared = (index / "shared_cpu_list").read_text().strip()
            size = int(text.rstrip("KMG") or 0) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        except (OSError, ValueError):
            continue
        caches.append((level, size, shared))
    return caches


def private_cache_flush_bytes() -> int:
    """Twice the largest cache of CPU 0 that it does not share with another CPU (its L2 on current x86 and Arm
    servers), from sysfs (``shared_cpu_list``); 4 MiB when unknown. Writing this many bytes evicts a core's
    private caches; see ``profiler.timing`` (``flush_bytes``)."""
    size = max((b for _, b, shared in _cpu0_caches() if shared in ("0", "")), default=0)
    return 2 * size if size else 4 << 20


def cache_flush_bytes(device) -> int:
    """Twice the last-level cache of ``device``: CUDA L2 (``get_device_properties().L2_cache_size``), else the
    CPU's L3 from sysfs; 64 MiB when unknown. Data cycled through this many bytes is read from memory."""
    device = torch.device(device)
    if device.type == "cuda":
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    else:
        size = max((b for level, b, _ in _cpu0_caches() if level >= 2), default=0)
    return 2 * size if size else 64 << 20


def iteration_weight_bytes(shapes: LayerShapes, num_layers: int, dtype_bytes: int) -> int:
    """Bytes of weights one GPU reads in one iteration of the whole model (``num_layers`` decoder layers of
    ``shapes``, the LM head; the embedding reads only its tokens' rows): the reuse distance of every weight, since
    each is read once per iteration. Where it is below the last-level cache a real iteration finds the weights
    there, and the profiler's cold calls cycle through this many bytes instead of twice the cache
    (``reuse_bytes``): the tiny model's 39 MB on a CPU with 480 MiB of L3 ran its 1-token LM head in 1.3 ms
    inside an iteration and in 2.0 ms read from memory."""
    s = shapes
    layer = s.hidden_size * (s.q_size + 2 * s.kv_size) + s.q_size * s.hidden_size + s.hidden_size * s.mlp_in \
        + s.ffn_size * s.hidden_size + 2 * s.hidden_size
    return (num_layers * layer + s.hidden_size * s.vocab_size) * dtype_bytes


def reuse_bytes(device, shapes: LayerShapes, num_layers: int | None, dtype_bytes: int, kv_bytes: int = 0) -> int:
    """Bytes a cold call cycles its weights (and KV slots) through: what one iteration reads between two reads
    of the same data — the model's weights (``iteration_weight_bytes``) plus ``kv_bytes`` of KV cache per layer
    times the layers — capped at twice the last-level cache (``cache_flush_bytes``: beyond it data comes from
    memory anyway). ``num_layers`` None: twice the cache."""
    flush = cache_flush_bytes(device)
    if num_layers is None:
        return flush
    return min(flush, iteration_weight_bytes(shapes, num_layers, dtype_bytes) + num_layers * kv_bytes)


class Layer:
    """Random weights of one decoder layer on ``device`` at ``dtype``.

    Projection weights are stored ``[in, out]`` and applied as ``x @ w``: the layout whose GEMMs run fastest on
    CPUs (``F.linear`` with ``[out, in]`` weights took up to 3x longer for some shapes on x86 with MKL); cuBLAS
    runs both layouts alike.

    Args:
        shapes: per-GPU shapes (``LayerShapes.of(model, tp)``).
        device: a torch device or name ("cuda", "cpu").
        dtype: "float16", "bfloat16", "float32" or a torch dtype.
        kv_slots, max_kv_len: KV cache size (sequences x tokens); 0 allocates none (``ensure_kv_cache`` grows it).
        max_positions: rows of the RoPE cos/sin table.
        with_vocab: also allocate the embedding and LM head (``vocab_size x hidden`` each).
        seed: seed of the random weights.
    """

    def __init__(self, shapes: LayerShapes, *, device="cpu", dtype="float16", kv_slots: int = 0,
                 max_kv_len: int = 0, max_positions: int = 8192, with_vocab: bool = True, seed: int = 0):
        self.shapes = shapes
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
        gen = torch.Generator(device="cpu").manual_seed(seed)
        h, s = shapes.hidden_size, shapes

        def weight(*size, scale=None):
            w = torch.randn(*size, generator=gen) * (scale if scale is not None else size[-1] ** -0.5)
            return w.to(device=self.device, dtype=self.dtype)

        self.w_qkv = weight(h, s.q_size + 2 * s.kv_size, scale=h ** -0.5)
        self.w_o = weight(s.q_size, h, scale=s.q_size ** -0.5)
        self.w_up = weight(h, s.mlp_in, scale=h ** -0.5)
        self.w_down = weight(s.ffn_size, h, scale=s.ffn_size ** -0.5)
        self.norm_weight = torch.ones(h, device=self.device, dtype=self.dtype)
        self.norm_bias = torch.zeros(h, device=self.device, dtype=self.dtype) if s.norm == "layernorm" else None
        self.emb = weight(s.vocab_size, h, scale=1.0) if with_vocab else None
        self.w_lm_head = weight(h, s.vocab_size, scale=h ** -0.5) if with_vocab else None
        self.cos_sin = rope_cache(max_positions, s.head_dim, device=self.device, dtype=self.dtype)
        self.k_cache = self.v_cache = None
        self._pools: dict[str, list] = {}
        if kv_slots and max_kv_len:
            self.ensure_kv_cache(kv_slots, max_kv_len)

    def weight_pool(self, name: str, flush_bytes: int) -> list:
        """``self.<name>`` and random copies of it, together as close to ``flush_bytes`` as whole copies come (at
        least one, at most 256): cycling through them reads each copy again after about ``flush_bytes``, as an
        iteration reads a weight again after the rest of the model (a 33 MB LM head of a 39 MB model is one copy,
        not two)."""
        w = getattr(self, name)
        pool = self._pools.get(name, [w])
        want = min(256, max(1, round(flush_bytes / (w.numel() * w.element_size()))))
        gen = torch.Generator(device="cpu").manual_seed(len(pool))
        while len(pool) < want:
            pool.append((torch.randn(w.shape, generator=gen) * w.float().std().item()).to(w.device, w.dtype))
        self._pools[name] = pool
        return pool[:want]

    def ensure_kv_cache(self, kv_slots: int, max_kv_len: int, seed: int = 1) -> None:
        """Make the KV cache hold at least ``kv_slots`` sequences of ``max_kv_len`` tokens (random contents)."""
        if self.k_cache is not None and self.k_cache.shape[0] >= kv_slots and self.k_cache.shape[2] >= max_kv_len:
            return
        if self.k_cache is not None:
            kv_slots, max_kv_len = max(kv_slots, self.k_cache.shape[0]), max(max_kv_len, self.k_cache.shape[2])
        self.k_cache = self.v_cache = None
        size = (kv_slots, self.shapes.num_kv_heads, max_kv_len, self.shapes.head_dim)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.k_cache = torch.empty(size, device=self.device, dtype=self.dtype).normal_(generator=gen)
        self.v_cache = torch.empty(size, device=self.device, dtype=self.dtype).normal_(generator=gen)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input/post-attention norm (RMSNorm or LayerNorm) of ``x`` [T, hidden]."""
        if self.shapes.norm == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias)
        return rms_norm(x, self.norm_weight)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of ``x`` [T, 2 x ffn] for gated MLPs, GELU of ``x`` [T, ffn] otherwise."""
        return silu_and_mul(x) if self.shapes.gated else gelu(x)


# --- kernels -----------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich, NeurIPS 2019) of ``x`` [T, h], computed in float32 like Hugging Face Llama."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def rope_cache(max_positions: int, head_dim: int, *, base: float = 10000.0, device="cpu", dtype=torch.float32
               ) -> torch.Tensor:
    """``[max_positions, head_dim]`` table: cos of the rotation angles in the first half, sin in the second."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device=device, dtype=dtype)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary embedding (RoFormer, Su et al. 2021, eq. 34) of ``q`` [T, Hq x d] and ``k`` [T, Hkv x d]
    at token ``positions`` [T]; returns new tensors of the same shapes."""
    cos, sin = cos_sin.index_select(0, positions).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = head_dim // 2

    def rotate(x):
        x = x.view(x.shape[0], -1, head_dim)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(1)

    return rotate(q), rotate(k)


def kv_cache_save(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, positions: torch.Tensor) -> None:
    """Write keys/values ``k``, ``v`` [T, Hkv x d] into the caches at (``slots`` [T], ``positions`` [T])."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    k_cache[slots, :, positions] = k.view(-1, kv_heads, head_dim)
    v_cache[slots, :, positions] = v.view(-1, kv_heads, head_dim)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation (Shazeer 2020): ``silu(gate) * up`` of ``x`` = [gate | up] [T, 2f] -> [T, f]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation, Hendrycks & Gimpel 2016) of ``x`` [T, f]."""
    return F.gelu(x, approximate="tanh")


def _sdpa(q, k, v, *, attn_mask=None, is_causal=False):
    if _HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


@dataclass
class PrefillMetadata:
    """One prefill chunk: ``chunk_len`` new tokens of the sequence in cache ``slot`` after ``context_len`` cached
    ones; ``mask`` is the bottom-right causal mask (None when ``context_len`` is 0: top-left causal suffices)."""

    slot: int
    context_len: int
    chunk_len: int
    mask: object = None


def prefill_metadata(chunk_len: int, context_len: int, slot: int = 0, device="cpu") -> PrefillMetadata:
    """Metadata of one prefill chunk (built once per iteration, shared by all layers)."""
    if context_len == 0:
        return PrefillMetadata(slot, 0, chunk_len, None)
    total = context_len + chunk_len
    try:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(chunk_len, total)
    except ImportError:  # torch < 2.3: an explicit boolean mask
        mask = torch.ones(chunk_len, total, dtype=torch.bool, device=device).tril(diagonal=context_len)
    return PrefillMetadata(slot, context_len, chunk_len, mask)


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PrefillMetadata
                      ) -> torch.Tensor:
    """Attention of one chunk's queries ``q`` [c, Hq x d] over its sequence's ``context_len + c`` cached keys
    (already saved with ``kv_cache_save``); returns [c, Hq x d]."""
    c, head_dim = meta.chunk_len, k_cache.shape[3]
    total = meta.context_len + c
    qh = q.view(c, -1, head_dim).transpose(0, 1).unsqueeze(0)
    k = k_cache[meta.slot:meta.slot + 1, :, :total]
    v = v_cache[meta.slot:meta.slot + 1, :, :total]
    if meta.mask is None:
        out = _sdpa(qh, k, v, is_causal=True)
    else:
        out = _sdpa(qh, k, v, attn_mask=meta.mask)
    return out[0].transpose(0, 1).reshape(c, -1)


@dataclass
class DecodeMetadata:
    """A decode batch: ``max_kv_len`` keys read per sequence, a padding ``mask`` [b, 1, 1, max] (None when all
    lengths are equal) and the cache ``slots`` (None: slots ``first_slot .. first_slot+b-1``, read as a view)."""

    batch_size: int
    max_kv_len: int
    total_kv_len: int
    mask: object = None
    slots: object = None
    first_slot: int = 0


def decode_metadata(kv_lens, device="cpu", slots=None) -> DecodeMetadata:
    """Metadata of a decode batch with per-sequence KV lengths ``kv_lens`` (tokens, including the new one)."""
    kv_lens = [int(n) for n in kv_lens]
    if not kv_lens or min(kv_lens) < 1:
        raise ValueError(f"decode_metadata: KV lengths must be >= 1, got {kv_lens[:8]}")
    longest = max(kv_lens)
    mask = None
    if min(kv_lens) != longest:
        lens = torch.tensor(kv_lens, device=device)
        mask = (torch.arange(longest, device=device) < lens[:, None]).view(len(kv_lens), 1, 1, longest)
    if slots is not None:
        slots = torch.as_tensor(slots, device=device)
    return DecodeMetadata(len(kv_lens), longest, sum(kv_lens), mask, slots)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata
                     ) -> torch.Tensor:
    """Attention of ``b`` single-token queries ``q`` [b, Hq x d] over their cached keys; returns [b, Hq x d]."""
    b, head_dim, m = meta.batch_size, k_cache.shape[3], meta.max_kv_len
    qh = q.view(b, -1, 1, head_dim)
    if meta.slots is None:
        lo = meta.first_slot
        k, v = k_cache[lo:lo + b, :, :m], v_cache[lo:lo + b, :, :m]
    else:
        k, v = k_cache[meta.slots, :, :m], v_cache[meta.slots, :, :m]
    return _sdpa(qh, k, v, attn_mask=meta.mask).view(b, -1)


def iteration_inputs(plan, slot_of, vocab_size: int, device="cpu") -> dict:
    """The host-side input preparation of one iteration, as a serving engine's ``prepare_inputs`` does it: token
    ids, positions, KV-cache slots and the index of each entry's last token (``[T]`` / ``[B]`` int64 tensors moved
    to ``device``), the decode attention metadata of the first ``plan.num_decodes`` entries (with the permutations
    to and from slot order when their slots are not ``0 .. d-1``) and one ``prefill_metadata`` per prefill chunk.

    ``plan``: a ``cost_models.plan.BatchPlan`` (decodes first); ``slot_of``: request id -> KV-cache slot (the
    decodes' slots must be a permutation of ``0 .. d-1``). Token ids are a fixed function of request and position
    (the weights are random, so their values do not matter). Used by ``profiler.executor.Executor`` and timed as
    the ``cpu_overhead`` operator.
    """
    dev, d = device, plan.num_decodes
    pos = np.concatenate([np.arange(k, k + n, dtype=np.int64) for _, n, k in plan.entries()])
    rids = np.repeat(np.asarray(plan.request_ids, dtype=np.int64), plan.num_new_tokens)
    slots = np.repeat(np.asarray([slot_of[rid] for rid in plan.request_ids], dtype=np.int64), plan.num_new_tokens)
    to_dev = lambda a: torch.from_numpy(a).to(dev, non_blocking=True)  # noqa: E731
    out = {"token_ids": to_dev((rids * 7919 + pos * 104729 + 12345) % vocab_size),
           "positions": to_dev(pos), "slots": to_dev(slots),
           "last": to_dev(np.cumsum(plan.num_new_tokens) - 1), "decode": None, "chunks": []}
    if d:
        dec_slots = slots[:d]
        by_slot = np.empty(d, dtype=np.int64)
        by_slot[dec_slots] = np.asarray(plan.context_lens[:d]) + 1
        ordered = np.array_equal(dec_slots, np.arange(d))
        out["decode"] = (decode_metadata(by_slot.tolist(), dev),
                         None if ordered else to_dev(np.argsort(dec_slots)), None if ordered else to_dev(dec_slots))
    for rid, n, k in list(plan.entries())[d:]:
        out["chunks"].append(prefill_metadata(n, k, slot_of[rid], dev))
    return out


# --- profiling closures ------------------------------------------------------------------------------------------

# The matrix multiplications: operator -> (width of its input rows, the Layer weight it multiplies by).
GEMM_INPUTS = {
    "attn_pre_proj": ("hidden_size", "w_qkv"),
    "attn_post_proj": ("q_size", "w_o"),
    "mlp_up_proj": ("hidden_size", "w_up"),
    "mlp_down_proj": ("ffn_size", "w_down"),
    "lm_head": ("hidden_size", "w_lm_head"),
}


#: The operators that run before each one inside a decoder layer, back to the last one that streamed weights (a
#: GEMM), in order (vLLM's Llama layer: norm, QKV projection, RoPE, KV-cache write, attention, O projection,
#: residual add, norm, gate/up projection, activation, down projection, residual add). The CPU profiler runs them,
#: untimed, before each timed call (``preceding_callable``), so the call finds the caches as inside an iteration.
#: ``attn_post_proj`` follows the attention, whose shape its row does not give: the operators before the attention
#: stand in. The LM head follows the whole layer stack instead (``LAYER_OPERATORS``, ``HEAD_PRECEDING_LAYERS``):
#: what the iteration's layers read evicts its weights, so that on the tiny model on a CPU it took 1.7 ms for 3 to
#: 5 sequences after its own predecessors in a layer, 2.7-3.4 ms inside a 512-token iteration and 2.4 (4.3) ms
#: inside a decode of 8 sequences of 100 (3000) tokens. The embedding and ``cpu_overhead`` start an iteration
#: (after the host's input preparation): none, the profiler flushes the core's caches instead.
PRECEDING_OPERATORS = {
    "input_layernorm": ("mlp_down_proj", "add"),
    "attn_pre_proj": ("input_layernorm",),
    "attn_rope": ("attn_pre_proj",),
    "attn_kv_cache_save": ("attn_pre_proj", "attn_rope"),
    "attn_prefill": ("attn_pre_proj", "attn_rope", "attn_kv_cache_save"),
    "attn_decode": ("attn_pre_proj", "attn_rope", "attn_kv_cache_save"),
    "attn_post_proj": ("attn_pre_proj", "attn_rope", "attn_kv_cache_save"),
    "add": ("attn_post_proj",),
    "post_attention_layernorm": ("attn_post_proj", "add"),
    "mlp_up_proj": ("post_attention_layernorm",),
    "mlp_act": ("mlp_up_proj",),
    "mlp_down_proj": ("mlp_act",),
}
#: one decoder layer's operators in order (``attention`` is the decode batch's, then the prefill chunk's)
LAYER_OPERATORS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_kv_cache_save", "attention",
                   "attn_post_proj", "add", "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj",
                   "add")
#: the layers run before a timed LM head (the model's, at most this many: enough to stream a small model's
#: working set, as the layers before the LM head do; a model larger than the cache reads it from memory anyway)
HEAD_PRECEDING_LAYERS = 4
#: the KV length of each decode, and the cached context of the prefill chunk, in the layers run before a timed LM
#: head (a stand-in for the contexts an iteration's attention reads: its row gives sequences and tokens only)
HEAD_PRECEDING_CONTEXT = 1024


def preceding_callable(layer: Layer, name: str, *, num_tokens: int = 0, chunk_size: int = 0, kv_lens=None,
                       batch_size: int = 0, cold: bool = False, num_layers: int | None = None):
    """A no-argument function running, once each, the ``PRECEDING_OPERATORS`` of ``name`` on the same number of
    tokens (``num_tokens``; a prefill's ``chunk_size``, a decode's ``len(kv_lens)``), with the same ``cold``
    rotation as ``operator_callable``; for ``lm_head``, ``min(num_layers, HEAD_PRECEDING_LAYERS)`` whole layers
    (``LAYER_OPERATORS``) of an iteration of ``batch_size`` sequences and ``num_tokens`` tokens (all decodes when
    they are equal, else ``batch_size - 1`` decodes and one chunk of the rest, at ``HEAD_PRECEDING_CONTEXT``);
    None for an operator without predecessors (the caller flushes instead). A layer operator's predecessors'
    outputs, which the function returns, stay alive until its next call (through the timed call, as in a layer)."""
    if name == "lm_head":
        return _layers_callable(layer, max(1, batch_size), max(1, num_tokens, batch_size), num_layers=num_layers)
    before = PRECEDING_OPERATORS.get(name)
    if not before:
        return None
    T = chunk_size if name == "attn_prefill" else len(kv_lens or ()) if name == "attn_decode" else num_tokens
    T = max(1, T)
    calls = [operator_callable(layer, op, num_tokens=T, cold=cold, num_layers=num_layers, seed=1 + i)
             for i, op in enumerate(before)]
    held: list = []

    def run():
        # their outputs stay alive through the timed call, as inside a layer, so that the call's own output is
        # not allocated where a predecessor's just was (and still is in the caches); returned for inspection
        held[:] = [call() for call in calls]
        return held
    return run


def _layers_callable(layer: Layer, B: int, T: int, *, num_layers: int | None):
    """The layers run before a timed LM head (``preceding_callable``). They read the same weights and KV slots at
    every call, as an engine's successive iterations read the same requests' (the LM head's own weights rotate)."""
    decodes = B if T == B else B - 1
    ctx = HEAD_PRECEDING_CONTEXT
    calls = []
    for i, op in enumerate(LAYER_OPERATORS):
        if op != "attention":
            calls.append(operator_callable(layer, op, num_tokens=T, seed=1 + i))
            continue
        if decodes:
            calls.append(operator_callable(layer, "attn_decode", kv_lens=[ctx] * decodes, seed=1 + i))
        if T > decodes:
            calls.append(operator_callable(layer, "attn_prefill", chunk_size=T - decodes, context_len=ctx,
                                           seed=1 + i))
    calls *= max(1, min(num_layers or 1, HEAD_PRECEDING_LAYERS))

    def run():
        for call in calls:
            call()
    return run


def operator_callable(layer: Layer, name: str, *, num_tokens: int = 0, chunk_size: int = 0, context_len: int = 0,
                      kv_lens=None, seed: int = 0, cold: bool = False, num_layers: int | None = None):
    """A no-argument function running operator ``name`` once on random inputs of the given shape.

    Shapes: token operators, ``lm_head`` and ``cpu_overhead`` take ``num_tokens`` (rows; for the last two the
    sequences B of the iteration: the profile's ``batch_size``), ``attn_prefill`` a ``chunk_size`` with
    ``context_len`` cached tokens, ``attn_decode`` a list ``kv_lens``; ``cold`` rotates weights and KV slots
    (module docstring; the KV cache must then hold spare slots, e.g. ``ensure_kv_cache``) through
    ``reuse_bytes``: one iteration's reads of a ``num_layers``-layer model (twice the last-level cache when None
    or larger). ``lm_head`` is the final norm of the B sequences' last tokens and their projection to ``vocab/tp``
    logits. ``cpu_overhead`` is what an engine does per iteration
    outside the layers, as Vidur's ``prepare_inputs`` and ``sampler`` (Agrawal et al., MLSys 2024, §4.3): the
    executor's own input preparation (``iteration_inputs``) for B decodes of unequal lengths, and greedy sampling
    (argmax over ``[B, vocab/tp]`` logits).
    Raises ValueError for an unknown operator name.
    """
    s, dev, dt = layer.shapes, layer.device, layer.dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=dev, dtype=dt)

    T = num_tokens
    dtype_bytes = torch.tensor([], dtype=dt).element_size()
    flush = reuse_bytes(dev, s, num_layers, dtype_bytes) if cold else 0

    def weights(attr):
        """A function returning the weight to use for the next call (cycling through copies when cold)."""
        if not cold:
            w = getattr(layer, attr)
            return lambda: w
        return itertools.cycle(layer.weight_pool(attr, flush)).__next__

    def kv_rotation(slots_per_call: int, region_bytes: int) -> list[int]:
        """First slots of successive calls: disjoint slot ranges covering the reuse distance of a call's KV
        (the weights and every layer's ``region_bytes``), as far as they fit."""
        if not cold:
            return [0]
        cover = reuse_bytes(dev, s, num_layers, dtype_bytes, region_bytes)
        spare = layer.k_cache.shape[0] // slots_per_call
        return [i * slots_per_call for i in range(max(1, min(spare, math.ceil(cover / max(region_bytes, 1)))))]

    if name == "lm_head":                   # the final norm of each sequence's last token, then the projection
        x = rand(T, s.hidden_size)
        last = torch.arange(T, device=dev)
        w = weights("w_lm_head")
        return lambda: layer.norm(x.index_select(0, last)) @ w()
    if name in GEMM_INPUTS:
        width, attr = GEMM_INPUTS[name]
        x = rand(T, getattr(s, width))
        w = weights(attr)
        return lambda: x @ w()
    if name in ("input_layernorm", "post_attention_layernorm"):
        x = rand(T, s.hidden_size)
        return lambda: layer.norm(x)
    if name == "attn_rope":                 # on the query and key views of the QKV projection's output, as inside
        q, k, _ = rand(T, s.q_size + 2 * s.kv_size).split([s.q_size, s.kv_size, s.kv_size], dim=-1)   # a layer
        positions = torch.randint(0, layer.cos_sin.shape[0], (T,), generator=gen).to(dev)
        return lambda: rotary_embedding(q, k, positions, layer.cos_sin, s.head_dim)
    if name == "attn_kv_cache_save":
        slots_needed = max(1, min(T, 16))
        per_slot = -(-T // slots_needed)
        layer.ensure_kv_cache(slots_needed, per_slot)
        k = rand(T, s.kv_size)              # the rotated keys; the values a view of the QKV projection's output
        v = rand(T, s.q_size + 2 * s.kv_size)[:, s.q_size + s.kv_size:]
        idx = torch.arange(T)
        slots, positions = (idx % slots_needed).to(dev), (idx // slots_needed).to(dev)
        return lambda: kv_cache_save(k, v, layer.k_cache, layer.v_cache, slots, positions)
    if name == "mlp_act":
        x = rand(T, s.mlp_in)
        return lambda: layer.activation(x)
    if name == "add":
        x, residual = rand(T, s.hidden_size), rand(T, s.hidden_size)
        return lambda: x + residual
    if name == "emb":
        ids = torch.randint(0, s.vocab_size, (T,), generator=gen).to(dev)
        table = weights("emb")
        return lambda: F.embedding(ids, table())
    if name == "cpu_overhead":
        from cost_models.plan import BatchPlan

        logits = rand(T, s.vocab_size)
        plan = BatchPlan.decodes([16 + (997 * i) % 1009 for i in range(T)])    # unequal lengths, fixed
        slot_of = {rid: rid for rid in plan.request_ids}

        def host_work():
            iteration_inputs(plan, slot_of, s.vocab_size, dev)
            return logits.argmax(dim=-1)
        return host_work
    if name == "attn_prefill":
        layer.ensure_kv_cache(1, context_len + chunk_size)
        q = rand(chunk_size, s.q_size)
        region = 2 * (context_len + chunk_size) * s.kv_size * layer.k_cache.element_size()
        metas = itertools.cycle([prefill_metadata(chunk_size, context_len, slot, dev)
                                 for slot in kv_rotation(1, region)]).__next__
        return lambda: attention_prefill(q, layer.k_cache, layer.v_cache, metas())
    if name == "attn_decode":
        kv_lens = list(kv_lens or [])
        meta = decode_metadata(kv_lens, dev)
        layer.ensure_kv_cache(meta.batch_size, meta.max_kv_len)
        q = rand(meta.batch_size, s.q_size)
        region = 2 * meta.batch_size * meta.max_kv_len * s.kv_size * layer.k_cache.element_size()
        metas = itertools.cycle([DecodeMetadata(meta.batch_size, meta.max_kv_len, meta.total_kv_len, meta.mask,
                                                None, first)
                                 for first in kv_rotation(meta.batch_size, region)]).__next__
        return lambda: attention_decode(q, layer.k_cache, layer.v_cache, metas())
    raise ValueError(f"unknown operator {name!r}; known: {', '.join(OPERATORS)}")
