"""Paged KV-cache block manager (vLLM's PagedAttention, Kwon et al., SOSP'23 §4).

Memory is cut into blocks of ``block_size`` tokens (16 in vLLM and Sarathi-Serve). A request holds
``ceil(tokens / block_size)`` blocks. Admission keeps a watermark of free blocks (1% of all blocks, vLLM's
``watermark=0.01``) so that running requests can still grow; growth during decode may use the watermark.

Sizing (``num_kv_blocks``) follows vLLM's profiling rule: the blocks that fit in
``memory x utilization - weights - activation peak``.
"""
from __future__ import annotations

import math


def kv_bytes_per_block(model, tp: int = 1, pp: int = 1, block_size: int = 16) -> int:
    """Bytes of one KV block on one GPU: 2 (K,V) x block_size x kv_heads/tp x head_dim x layers/pp x dtype bytes."""
    return block_size * model.kv_bytes_per_token(tp, pp)


def activation_reserve_bytes(model, max_num_batched_tokens: int, max_num_seqs: int, tp: int = 1) -> int:
    """Peak activation memory of one forward pass, which vLLM measures with a dummy run and keeps free.

    Estimate (bytes): per batched token the widest live tensors — the residual stream and its norm (2 x hidden),
    the fused QKV output ((q + 2 kv)/tp) and the gate/up output and its activation (3 x ffn/tp for a gated MLP)
    in the model dtype — plus fp32 logits for each sequence (max_num_seqs x vocab x 4).
    """
    per_token = 2 * model.hidden_size + (model.q_size + 2 * model.kv_size) // tp
    per_token += (3 if model.mlp == "gated" else 2) * model.intermediate_size // tp
    return int(max_num_batched_tokens * per_token * model.dtype_bytes + max_num_seqs * model.vocab_size * 4)


def num_kv_blocks(model, device, *, tp: int = 1, pp: int = 1, block_size: int = 16,
                  gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int = 8192,
                  max_num_seqs: int = 128) -> int:
    """KV blocks one replica holds: ``(memory x utilization - weights - activation reserve) / bytes per block``.

    Raises ValueError naming the model and device when the weights and activations alone do not fit.
    """
    free = (device.memory_bytes * gpu_memory_utilization - model.weight_bytes(tp, pp)
            - activation_reserve_bytes(model, max_num_batched_tokens, max_num_seqs, tp))
    blocks = int(free // kv_bytes_per_block(model, tp, pp, block_size))
    if blocks <= 0:
        raise ValueError(
            f"{model.name} does not fit on {device.name} with tp={tp}, pp={pp}: weights "
            f"{model.weight_bytes(tp, pp) / 2**30:.1f} GiB per GPU of {device.memory_bytes / 2**30:.0f} GiB "
            f"x {gpu_memory_utilization}; use more tensor/pipeline parallelism or a larger device")
    return blocks


class BlockManager:
    """Counts KV blocks per request. Units: tokens and blocks.

    ``allocate``/``grow`` raise RuntimeError if asked for more blocks than are free: schedulers must check first
    (``can_allocate``/``can_grow``), so the cache is never over capacity.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01):
        if num_blocks <= 0:
            raise ValueError("BlockManager: num_blocks must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.num_free = num_blocks
        self._held: dict[int, int] = {}     # request_id -> blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def held(self, request_id: int) -> int:
        return self._held.get(request_id, 0)

    def can_allocate(self, tokens: int) -> bool:
        """Admission check: blocks for ``tokens`` fit while keeping the watermark free."""
        return self.num_free - self.blocks_for(tokens) >= self.watermark_blocks

    def allocate(self, request_id: int, tokens: int) -> None:
        """Give ``request_id`` (holding nothing) the blocks for ``tokens``."""
        need = self.blocks_for(tokens)
        if need > self.num_free:
            raise RuntimeError(f"KV cache over capacity: request {request_id} needs {need} blocks, {self.num_free} free")
        self._held[request_id] = need
        self.num_free -= need

    def can_grow(self, request_id: int, tokens: int) -> bool:
        """Whether ``request_id`` can hold ``tokens`` tokens (may use the watermark)."""
        return self.blocks_for(tokens) - self._held.get(request_id, 0) <= self.num_free

    def grow(self, request_id: int, tokens: int) -> None:
        """Make ``request_id`` hold enough blocks for ``tokens`` tokens."""
        extra = self.blocks_for(tokens) - self._held.get(request_id, 0)
        if extra <= 0:
            return
        if extra > self.num_free:
            raise RuntimeError(f"KV cache over capacity: request {request_id} needs {extra} more blocks, "
                               f"{self.num_free} free")
        self._held[request_id] = self._held.get(request_id, 0) + extra
        self.num_free -= extra

    def free(self, request_id: int) -> None:
        self.num_free += self._held.pop(request_id, 0)

    def utilization(self) -> float:
        return self.num_used / self.num_blocks
