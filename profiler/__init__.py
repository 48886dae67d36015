"""Profiler: time one decoder layer's operators (torch, CUDA or CPU) over a shape grid into a tidy CSV.

Modules: ``ops`` (the operators in torch), ``timing`` (CUDA events / ``torch.utils.benchmark``), ``grid`` (shape
grids), ``run`` (resumable profile runs), ``collectives`` (all-reduce and send/recv across processes), ``schema``
(names, columns, reader), ``executor`` (runs a batch's operators, for ``servesim validate``), ``vidur`` (Vidur's
profiling tables as profile rows). The commands are ``simulator.cli_profile`` (``servesim profile``, ``servesim
fit``); the profiler imports nothing of ``simulator``. Importing ``profiler``,
``profiler.schema``, ``profiler.grid`` or ``profiler.vidur`` does not import torch; ``profiler.ops`` does.

Profile folder format (``servesim profile --out DIR``)
=====================================================

``DIR/profile.csv`` — one row per (operator, shape); every row carries the full context, so rows of several runs
can be concatenated. Columns, in this order (``profiler.schema.COLUMNS``):

====================  ========================================================================================
column                meaning
====================  ========================================================================================
operator              ``input_layernorm``, ``attn_pre_proj`` (QKV), ``attn_rope``, ``attn_kv_cache_save``,
                      ``attn_post_proj`` (O), ``post_attention_layernorm``, ``mlp_up_proj`` (gate+up),
                      ``mlp_act``, ``mlp_down_proj``, ``add`` (ONE residual add; a layer has two), ``emb``,
                      ``lm_head``, ``cpu_overhead`` (per-iteration input preparation + greedy sampling, see
                      ``ops.operator_callable``), ``attn_prefill``, ``attn_decode``; with ``tp`` > 1 GPUs
                      ``all_reduce`` (over ``tp`` workers) and ``send_recv`` (between two)
num_tokens            query tokens the operator processes: T for token operators, the iteration's tokens T for
                      ``lm_head`` (it projects B rows after layers of T tokens), rows (= sequences) for
                      ``cpu_overhead``, the chunk for ``attn_prefill``, the batch for ``attn_decode``
chunk_size            ``attn_prefill``: new tokens of the chunk (else 0)
context_len           ``attn_prefill``: tokens already cached before the chunk (else 0)
batch_size            sequences: ``attn_decode`` b, ``attn_prefill`` 1, ``lm_head``/``cpu_overhead`` B (else 0)
kv_len                attention: longest KV length read per sequence, new tokens included
                      (prefill: context + chunk; decode: max of the per-sequence lengths) (else 0)
kv_total              attention: KV tokens read summed over sequences (else 0)
kv_pattern            ``attn_decode``: ``uniform`` (all sequences ``kv_len``) or ``linear`` (sequence i of b holds
                      ceil(kv_len*(i+1)/b)); see ``profiler.grid.decode_kv_lens`` (else empty)
message_bytes         collectives: message size in bytes (else 0)
num_workers           collectives: GPUs taking part (else 0)
time_min_s            minimum over samples, seconds (CPU runs time each shape in 2 rounds at least 20 s apart
                      and keep the one with the lower median; all ``time_*``/``num_runs`` describe that round)
time_median_s         median over samples, seconds (what ``servesim fit`` fits)
time_mean_s           mean over samples, seconds
time_std_s            population standard deviation over samples, seconds
num_runs              operator calls timed (CPU: samples x calls per sample, one call per sample when the cold
                      cache flushes before each call; 0 = unknown, e.g. Vidur imports)
device                ``cuda`` or ``cpu``
device_name           ``torch.cuda.get_device_name()`` or the CPU model name
torch_version         ``torch.__version__``
dtype                 ``float16``, ``bfloat16`` or ``float32``
attention_backend     ``torch_sdpa`` (``profiler.ops``; imports keep theirs, e.g. ``flash_attention``)
num_threads           CPU threads (0 on CUDA)
model                 model spec name
hidden_size .. tp     the model's (unsharded) shape: ``hidden_size, num_attention_heads, num_kv_heads,
                      head_dim, intermediate_size, vocab_size, mlp, norm`` and the tensor-parallel degree ``tp``
                      at which the weights were sharded (per-GPU heads = heads / tp; see ``schema.LayerShapes``)
====================  ========================================================================================

``DIR/meta.json`` — ``model``, ``model_shape`` (the model columns), ``model_spec`` (the full ModelSpec), ``tp``,
``dtype``, ``device``, ``device_name``, ``driver`` (NVIDIA driver version, CUDA only), ``cuda_version``,
``torch_version``, ``python_version``, ``platform``, ``attention_backend``, ``num_threads``, ``quick``,
``cold_cache``, ``cache_flush_bytes`` (twice the last-level cache), ``reuse_bytes`` (weights cycled through that
many bytes between calls: one iteration's weights, at most ``cache_flush_bytes``; ``profiler.ops.reuse_bytes``),
on a CPU ``cpu_cache_state`` (what a timed call follows: ``preceding-operators``, ``profiler.ops.PRECEDING_OPERATORS``)
and ``private_cache_flush_bytes`` (the flush before the embedding and ``cpu_overhead``), ``grid``
(``grid.GridSpec`` fields), ``timing`` (``timing.TimingConfig`` fields), ``columns``, ``time_unit`` ("s"),
``collectives`` (whether all-reduce/send-recv rows were timed), ``reference_kernel_s`` (``start``/``end``: the
median seconds of a fixed GEMM when the run started and ended, ``timing.reference_kernel_s``: ``servesim validate``
compares the machine's speed then and while it validates), ``complete`` (false while running or after an
interruption) and ``num_rows``.

Read a profile with ``profiler.schema.read_profile(DIR)`` (validates and raises ``ProfileError`` naming file, line
and field) and ``read_meta(DIR)``.
"""
from profiler.schema import (COLUMNS, OPERATORS, SHAPE_COLUMNS, TIME_COLUMNS, LayerShapes, ProfileError, read_meta,
                             read_profile)

__all__ = ["COLUMNS", "OPERATORS", "SHAPE_COLUMNS", "TIME_COLUMNS", "LayerShapes", "ProfileError", "read_meta",
           "read_profile"]
