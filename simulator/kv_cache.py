"""Paged KV cache: the block pool, with optional prefix caching (vLLM's PagedAttention, Kwon et al., SOSP'23 §4;
automatic prefix caching as in vLLM v1 ``vllm/v1/core/block_pool.py`` and nano-vllm ``engine/block_manager.py``).

Memory is cut into blocks of ``block_size`` tokens (16 in vLLM and Sarathi-Serve). A request holds
``ceil(tokens / block_size)`` blocks. ``allocate(request, tokens, reserve_blocks=)`` makes a request hold the blocks
for its first ``tokens`` tokens, or returns False (changing nothing) when more would be taken than ``num_free -
reserve_blocks``: policies pass their admission watermark as ``reserve_blocks`` (vLLM v0 keeps 1% free at
admission, ``watermark=0.01``; vLLM v1's default is 0) and grow running requests with no reserve.

``BlockManager`` only counts blocks (fast; no prefix caching). ``PrefixCachingBlockManager`` keeps block ids, a
reference count per block, ``hash -> block`` for the full blocks of prompts (keys from ``Request.block_hashes``,
each identifying the whole prefix through its block) and an LRU queue of free blocks: a freed block keeps its hash
and stays reusable until evicted (the least recently freed first; a request's blocks are queued tail first, so its
last blocks go first, as vLLM frees them in reverse). ``lookup(request)`` returns the longest cached prefix —
never the whole prompt: at least its last token is computed (vLLM 0.32 ``kv_cache_manager.py``
``get_computed_blocks``: ``max_cache_hit_length = num_tokens - 1``) — and ``allocate(..., hit=)`` adopts those
blocks (raising their reference counts) before taking new ones. Blocks are registered in the cache when allocated
for tokens the request computes (vLLM caches at ``allocate_slots`` time, so a request scheduled later — even in the
same step — hits them). A referenced block is never evicted.

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
    """Counts KV blocks per request. Units: tokens and blocks. No prefix caching (``lookup`` finds nothing).

    Args:
        num_blocks: blocks in the cache (> 0). block_size: tokens per block. watermark: the admission reserve as a
            fraction of all blocks (``watermark_blocks``; policies pass it to ``allocate`` as ``reserve_blocks``).
    """

    prefix_caching = False

    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01):
        if num_blocks <= 0:
            raise ValueError("BlockManager: num_blocks must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free = num_blocks
        self._held: dict[int, int] = {}     # request_id -> blocks
        #: request_id -> tokens its blocks hold (blocks x block_size): ``tokens <= capacity.get(id, 0)`` means
        #: ``allocate(request, tokens)`` has nothing to do (the schedulers' per-decode fast check)
        self.capacity: dict[int, int] = {}
        self.hit_tokens = 0                  # prompt tokens served from the cache (at first admission)
        self.queried_tokens = 0              # prompt tokens looked up (at first admission)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free, or cached but unreferenced)."""
        return self._free

    @property
    def num_used(self) -> int:
        """Blocks referenced by requests."""
        return self.num_blocks - self._free

    def held(self, request_id: int) -> int:
        return self._held.get(request_id, 0)

    def utilization(self) -> float:
        return self.num_used / self.num_blocks

    def lookup(self, request) -> tuple[int, tuple]:
        """``(cached tokens, blocks)`` of ``request``'s longest cached prefix: nothing without prefix caching."""
        return 0, ()

    def need(self, request, tokens: int, hit: tuple = ()) -> int:
        """Free blocks that ``allocate(request, tokens, hit=hit)`` would take."""
        return max(0, self.blocks_for(tokens) - self._held.get(request.request_id, 0))

    def allocate(self, request, tokens: int, *, reserve_blocks: int = 0, hit: tuple = ()) -> bool:
        """Make ``request`` hold blocks for its first ``tokens`` tokens, keeping ``reserve_blocks`` free; return
        False and change nothing if that does not fit."""
        extra = self.blocks_for(tokens) - self._held.get(request.request_id, 0)
        if extra <= 0:
            return True
        if extra > self._free - reserve_blocks:
            return False
        rid = request.request_id
        held = self._held[rid] = self._held.get(rid, 0) + extra
        self.capacity[rid] = held * self.block_size
        self._free -= extra
        return True

    def allocate_many(self, items) -> None:
        """``allocate(request, tokens)`` for each ``(request, tokens)`` of ``items``, in order, where the caller
        has counted that they fit (a fast-forwarded stretch's KV state); raises ValueError if one does not."""
        held, capacity, bs, free = self._held, self.capacity, self.block_size, self._free
        for request, tokens in items:
            rid = request.request_id
            have = held.get(rid, 0)
            extra = -(-tokens // bs) - have
            if extra > 0:
                if extra > free:
                    self._free = free
                    raise ValueError(f"allocate_many: request {rid} needs {extra} blocks, {free} are free")
                held[rid] = have + extra
                capacity[rid] = (have + extra) * bs
                free -= extra
        self._free = free

    def free(self, request) -> None:
        """Release every block of ``request`` (finished or preempted)."""
        self._free += self._held.pop(request.request_id, 0)
        self.capacity.pop(request.request_id, None)

    def check(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests)."""
        assert 0 <= self._free <= self.num_blocks
        assert sum(self._held.values()) == self.num_blocks - self._free
        assert self.capacity == {rid: n * self.block_size for rid, n in self._held.items()}


class PrefixCachingBlockManager(BlockManager):
    """Block ids, reference counts, ``hash -> block`` and an LRU free queue (see the module docstring)."""

    prefix_caching = True

    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01):
        super().__init__(num_blocks, block_size, watermark)
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list = [None] * num_blocks
        self.cached: dict = {}                          # hash -> block id
        self.free_queue: dict = dict.fromkeys(range(num_blocks))   # insertion order = LRU order (head first)
        self.blocks: dict[int, list] = {}               # request_id -> block ids in token order
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def held(self, request_id: int) -> int:
        return len(self.blocks.get(request_id, ()))

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def lookup(self, request) -> tuple[int, tuple]:
        hashes = request.block_hashes
        limit = min(len(hashes), (request.num_tokens - 1) // self.block_size)
        hit = []
        for h in hashes[:limit]:
            b = self.cached.get(h)
            if b is None:
                break
            hit.append(b)
        return len(hit) * self.block_size, tuple(hit)

    def need(self, request, tokens: int, hit: tuple = ()) -> int:
        held = len(self.blocks.get(request.request_id, ()))
        fresh = max(0, self.blocks_for(tokens) - held - len(hit))
        return fresh + sum(1 for b in hit if self.ref_cnt[b] == 0)   # adopting a free cached block takes it

    def allocate(self, request, tokens: int, *, reserve_blocks: int = 0, hit: tuple = ()) -> bool:
        rid = request.request_id
        mine = self.blocks.get(rid)
        held = len(mine) if mine else 0
        fresh = self.blocks_for(tokens) - held - len(hit)
        if fresh <= 0 and not hit:
            return True
        if self.need(request, tokens, hit) > len(self.free_queue) - reserve_blocks:
            return False
        if mine is None:
            mine = self.blocks[rid] = []
        for b in hit:
            if self.ref_cnt[b] == 0:
                del self.free_queue[b]
            self.ref_cnt[b] += 1
            mine.append(b)
        for _ in range(max(0, fresh)):
            b = next(iter(self.free_queue))
            del self.free_queue[b]
            h = self.block_hash[b]
            if h is not None:                           # evict the least recently freed cached block
                del self.cached[h]
                self.block_hash[b] = None
                self.num_evictions += 1
            self.ref_cnt[b] = 1
            mine.append(b)
        self._register(request, mine, tokens)
        self.capacity[rid] = len(mine) * self.block_size
        return True

    def _register(self, request, mine: list, tokens: int) -> None:
        """Cache the request's full prompt blocks among its first ``tokens`` tokens."""
        hashes = request.block_hashes
        upto = min(len(hashes), tokens // self.block_size, len(mine))
        for j in range(upto):
            b = mine[j]
            if self.block_hash[b] is None:
                h = hashes[j]
                if h not in self.cached:
                    self.cached[h] = b
                    self.block_hash[b] = h

    def free(self, request) -> None:
        self.capacity.pop(request.request_id, None)
        for b in reversed(self.blocks.pop(request.request_id, ())):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free_queue[b] = None

    def check(self) -> None:
        referenced = [b for bs in self.blocks.values() for b in bs]
        counts = {}
        for b in referenced:
            counts[b] = counts.get(b, 0) + 1
        for b in range(self.num_blocks):
            assert self.ref_cnt[b] == counts.get(b, 0), f"block {b}: ref_cnt {self.ref_cnt[b]} != {counts.get(b, 0)}"
            assert (b in self.free_queue) == (self.ref_cnt[b] == 0), f"block {b} freed while referenced"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
        assert self.capacity == {rid: len(bs) * self.block_size for rid, bs in self.blocks.items() if bs}


def make_block_manager(num_blocks: int, block_size: int = 16, watermark: float = 0.01, *,
                       enable_prefix_caching: bool = False) -> BlockManager:
    """A ``PrefixCachingBlockManager`` if ``enable_prefix_caching``, else the counting ``BlockManager``."""
    cls = PrefixCachingBlockManager if enable_prefix_caching else BlockManager
    return cls(num_blocks, block_size, watermark)
