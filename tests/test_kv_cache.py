"""The paged KV-cache block manager and its sizing (issue 2: 16-token blocks, 1% admission watermark,
blocks = (memory x 0.9 - weights - activation reserve) / (2 x 16 x kv_heads/TP x head_dim x layers x dtype bytes)).
"""
from __future__ import annotations

import pytest

from cost_models.specs import load_device, load_model
from simulator.kv_cache import (BlockManager, activation_reserve_bytes, kv_bytes_per_block, num_kv_blocks)

GIB = 2**30


# --- block arithmetic ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, blocks", [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3), (4096, 256)])
def test_blocks_for_rounds_up_to_whole_16_token_blocks(tokens, blocks):
    assert BlockManager(10).blocks_for(tokens) == blocks


def test_default_block_size_and_watermark_are_vllms():
    bm = BlockManager(1000)
    assert bm.block_size == 16
    assert bm.watermark_blocks == 10          # 1% of 1000
    assert bm.num_free == 1000 and bm.num_used == 0 and bm.utilization() == 0.0


def test_non_positive_block_count_is_an_error():
    with pytest.raises(ValueError):
        BlockManager(0)


class R:
    """The least a block manager reads of a request: its id, known tokens and prompt block hashes."""

    def __init__(self, request_id, num_tokens=1, block_hashes=()):
        self.request_id, self.num_tokens, self.block_hashes = request_id, num_tokens, tuple(block_hashes)


def test_watermark_is_a_reserve_the_caller_passes():
    bm = BlockManager(100, watermark=0.1)     # 10 blocks kept free at admission
    assert bm.watermark_blocks == 10
    r1, r2 = R(1), R(2)
    assert not bm.allocate(r1, 90 * 16 + 1, reserve_blocks=bm.watermark_blocks)   # 91 blocks would leave 9
    assert bm.num_free == 100 and bm.held(1) == 0                                   # nothing changed
    assert bm.allocate(r1, 90 * 16, reserve_blocks=bm.watermark_blocks)            # 100 - 90 = 10 >= 10
    assert bm.num_free == 10 and bm.held(1) == 90
    assert not bm.allocate(r2, 1, reserve_blocks=bm.watermark_blocks)              # would dip below it
    # ... but a running request may grow into the watermark, up to the last block.
    assert not bm.allocate(r1, 100 * 16 + 1)
    assert bm.allocate(r1, 100 * 16)
    assert bm.num_free == 0 and bm.num_used == 100 and bm.utilization() == 1.0


def test_allocate_grow_free_bookkeeping():
    bm = BlockManager(10, watermark=0.0)
    r7, r8 = R(7), R(8)
    assert bm.allocate(r7, 17)                # 2 blocks
    assert (bm.held(7), bm.num_free) == (2, 8)
    assert bm.allocate(r7, 32)                # still 2 blocks: no change
    assert (bm.held(7), bm.num_free) == (2, 8)
    assert bm.allocate(r7, 33)                # a 3rd block
    assert (bm.held(7), bm.num_free) == (3, 7)
    assert bm.allocate(r7, 20)                # never shrinks
    assert bm.held(7) == 3
    assert bm.allocate(r8, 16 * 7)
    assert bm.num_free == 0 and bm.num_used == 10
    bm.free(r7)
    assert (bm.held(7), bm.num_free) == (0, 3)
    bm.free(r7)                               # freeing twice is harmless
    assert bm.num_free == 3
    bm.free(r8)
    assert bm.num_free == 10 and bm.num_used == 0
    bm.check()


def test_a_refused_allocation_changes_nothing():
    bm = BlockManager(4, watermark=0.0)
    r1, r2 = R(1), R(2)
    assert bm.allocate(r1, 48)
    assert not bm.allocate(r2, 17)
    assert bm.num_free == 1 and bm.held(2) == 0
    assert not bm.allocate(r1, 16 * 5 + 1)
    assert bm.num_free == 1 and bm.held(1) == 3


# --- sizing -------------------------------------------------------------------------------------------------

def test_bytes_per_block_mistral_7b():
    model = load_model("Mistral-7B")
    # 2 (K, V) x 16 tokens x 8 KV heads x 128 head_dim x 32 layers x 2 bytes (fp16) = 2 MiB
    assert kv_bytes_per_block(model) == 2 * 16 * 8 * 128 * 32 * 2 == 2 * 2**20
    assert kv_bytes_per_block(model, tp=2) == 2 * 16 * 4 * 128 * 32 * 2       # KV heads split over 2 GPUs
    assert kv_bytes_per_block(model, pp=2) == 2 * 16 * 8 * 128 * 16 * 2       # half the layers per stage


def test_num_kv_blocks_mistral_7b_on_a100_by_hand():
    model, device = load_model("Mistral-7B"), load_device("A100-80GB-SXM")
    h, q, kv, f, V, L = 4096, 32 * 128, 8 * 128, 14336, 32000, 32
    per_layer = h * (q + 2 * kv) + q * h + 2 * h * f + f * h + 2 * h   # QKV, O, gate+up, down, 2 norms
    weights = (L * per_layer + 2 * V * h) * 2                          # + embedding and LM head, fp16
    assert weights == 14_483_456_000                                   # 7.24 B parameters
    # Activation reserve (kv_cache.activation_reserve_bytes docstring), 8192 batched tokens, 128 sequences:
    # per token 2h + (q + 2kv) + 3f elements of 2 bytes, plus fp32 logits of 128 sequences.
    activations = 8192 * (2 * h + (q + 2 * kv) + 3 * f) * 2 + 128 * V * 4
    assert activation_reserve_bytes(model, 8192, 128) == activations
    expected = int((80 * GIB * 0.9 - weights - activations) // (2 * 16 * 8 * 128 * 32 * 2))
    assert expected == 29501
    assert num_kv_blocks(model, device, max_num_batched_tokens=8192, max_num_seqs=128) == expected


def test_num_kv_blocks_grows_with_tensor_parallelism_and_memory():
    model = load_model("Mistral-7B")
    a100, h200 = load_device("A100"), load_device("H200")
    one = num_kv_blocks(model, a100)
    assert num_kv_blocks(model, a100, tp=2) > 2 * one          # half the weights and half the KV per GPU
    assert num_kv_blocks(model, h200) > one
    assert num_kv_blocks(model, a100, gpu_memory_utilization=0.5) < one


def test_model_that_does_not_fit_names_model_and_device():
    with pytest.raises(ValueError) as err:
        num_kv_blocks(load_model("Llama-2-70B"), load_device("A100"))
    msg = str(err.value)
    assert "Llama-2-70B" in msg and "A100-80GB-SXM" in msg and "\n" not in msg
    assert num_kv_blocks(load_model("Llama-2-70B"), load_device("A100"), tp=4) > 0
