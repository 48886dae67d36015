"""The profiler (issue 3): shape grids, timing statistics, the torch operators' semantics, the profile CSV schema,
resuming an interrupted run, and the ``servesim profile`` command."""
from __future__ import annotations

import csv
import json

import pytest

from cost_models.specs import load_model
from profiler.grid import (GridSpec, build_grid, decode_kv_lens, decode_shapes, head_shapes, prefill_shapes,
                           shape_bytes, shape_key, token_counts)
from profiler.schema import COLUMNS, PROFILE_CSV, LayerShapes, ProfileError, read_profile
from profiler.timing import TimingStats

TINY = load_model("tiny")


# --- grids (no torch) ------------------------------------------------------------------------------------------

def test_token_counts_dense_then_geometric():
    # 1..4 dense, then x1.5 rounded: 6, 9, 13.5 -> 14, 21 capped at 20
    assert token_counts(20, 4, 1.5) == [1, 2, 3, 4, 6, 9, 14, 20]
    assert token_counts(3, 8, 1.1) == [1, 2, 3]
    assert token_counts(12, 2, 1.01) == list(range(1, 13))      # growth below +1 still steps by one
    with pytest.raises(ValueError, match="growth > 1"):
        token_counts(10, 2, 1.0)


def test_decode_kv_patterns():
    assert decode_kv_lens(3, 100, "uniform") == [100, 100, 100]
    assert decode_kv_lens(4, 100, "linear") == [25, 50, 75, 100]
    assert decode_kv_lens(3, 10, "linear") == [4, 7, 10]         # ceil(10/3), ceil(20/3), 10
    with pytest.raises(ValueError, match="pattern"):
        decode_kv_lens(2, 10, "random")


def test_prefill_and_decode_shapes_respect_bounds():
    spec = GridSpec(max_context=512, max_batch=8, prefill_chunks=(1, 256, 512), prefill_contexts=(0, 256, 512),
                    decode_batches=(1, 4, 16), decode_kv_lens=(128, 1024))
    assert prefill_shapes(spec) == [(1, 0), (1, 256), (256, 0), (256, 256), (512, 0)]
    # batch 16 > max_batch and kv 1024 > max_context are dropped; linear only for batches > 1
    assert decode_shapes(spec) == [(1, 128, "uniform"), (4, 128, "uniform"), (4, 128, "linear")]


def test_head_shapes_pair_each_batch_with_its_decode_and_larger_iterations():
    spec = GridSpec(max_tokens=300, max_batch=70, head_batches=(1, 64, 128), head_tokens=(64, 256, 1024))
    # B = 128 > max_batch is dropped; T = 1024 > max_tokens is replaced by max_tokens; T = 64 is not above B = 64
    assert head_shapes(spec) == [(1, 1), (1, 64), (1, 256), (1, 300), (64, 64), (64, 256), (64, 300)]
    rows = build_grid(spec, LayerShapes.of(TINY), 4, operators=["lm_head"])
    assert sorted((r["batch_size"], r["num_tokens"]) for r in rows) == head_shapes(spec)


def test_build_grid_filters_by_memory_and_orders_largest_first():
    shapes = LayerShapes.of(TINY)
    spec = GridSpec.quick()
    rows = build_grid(spec, shapes, 4, device_type="cpu")
    sizes = [shape_bytes(r, shapes, 4, "cpu") for r in rows]
    assert sizes == sorted(sizes, reverse=True)
    assert len({shape_key(r) for r in rows}) == len(rows)          # no duplicate shapes
    budget = sizes[len(sizes) // 2]
    kept = build_grid(spec, shapes, 4, device_type="cpu", memory_budget_bytes=budget)
    assert 0 < len(kept) < len(rows)
    assert all(shape_bytes(r, shapes, 4, "cpu") <= budget for r in kept)
    ops = {r["operator"] for r in build_grid(spec, shapes, 4, operators=["add", "attn_decode"])}
    assert ops == {"add", "attn_decode"}


def test_layer_shapes_shard_heads_ffn_and_vocab():
    s = LayerShapes.of(load_model("Llama-3-8B"), tp=4)
    assert (s.num_q_heads, s.num_kv_heads, s.ffn_size, s.vocab_size) == (8, 2, 3584, 32064)
    assert s.mlp_in == 2 * 3584 and s.q_size == 8 * 128
    assert LayerShapes.of(load_model("Llama-3-8B"), tp=16).num_kv_heads == 1   # replicated when fewer than tp
    with pytest.raises(ValueError, match="tp=3"):
        LayerShapes.of(TINY, tp=3)


def test_timing_stats_from_samples():
    s = TimingStats.from_samples([3.0, 1.0, 2.0, 6.0], calls_per_sample=5)
    assert (s.time_min_s, s.time_median_s, s.time_mean_s, s.num_runs) == (1.0, 2.5, 3.0, 20)
    assert s.time_std_s == pytest.approx((((3 - 3) ** 2 + 4 + 1 + 9) / 4) ** 0.5)
    with pytest.raises(ValueError):
        TimingStats.from_samples([])


def test_read_profile_names_the_bad_line_and_field(tmp_path):
    path = tmp_path / PROFILE_CSV
    row = {c: 0 for c in COLUMNS} | {"operator": "add", "num_tokens": 4, "kv_pattern": "", "time_min_s": 1e-6,
                                      "time_median_s": 2e-6, "time_mean_s": 2e-6, "time_std_s": 0.0}
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerow(row)
        w.writerow(row | {"time_median_s": -1})
    with pytest.raises(ProfileError, match=r"line 3: field time_median_s"):
        read_profile(tmp_path)
    with pytest.raises(ProfileError, match="profile not found"):
        read_profile(tmp_path / "missing")


# --- torch operators -------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def layer():
    from profiler.ops import Layer

    torch.manual_seed(0)
    lay = Layer(LayerShapes.of(TINY), device="cpu", dtype="float32", max_positions=256)
    lay.ensure_kv_cache(4, 64)
    return lay


def _reference_attention(q, k, v, visible):
    """Plain softmax attention of one head: q [n, d], k/v [L, d], visible [n, L] booleans."""
    scores = (q @ k.T) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_prefill_chunk_attends_bottom_right_causal(layer):
    from profiler.ops import attention_prefill, prefill_metadata

    s, ctx, c = layer.shapes, 20, 6
    q = torch.randn(c, s.q_size)
    out = attention_prefill(q, layer.k_cache, layer.v_cache, prefill_metadata(c, ctx, slot=1))
    group = s.num_q_heads // s.num_kv_heads
    visible = torch.arange(ctx + c)[None, :] <= ctx + torch.arange(c)[:, None]   # query i sees keys 0..ctx+i
    for h in range(s.num_q_heads):
        k = layer.k_cache[1, h // group, :ctx + c]
        v = layer.v_cache[1, h // group, :ctx + c]
        ref = _reference_attention(q.view(c, -1, s.head_dim)[:, h], k, v, visible)
        assert torch.allclose(out.view(c, -1, s.head_dim)[:, h], ref, atol=1e-5)


def test_decode_batch_reads_each_sequence_up_to_its_length(layer):
    from profiler.ops import attention_decode, decode_metadata

    s, lens = layer.shapes, [9, 30, 17]
    q = torch.randn(3, s.q_size)
    out = attention_decode(q, layer.k_cache, layer.v_cache, decode_metadata(lens))
    group = s.num_q_heads // s.num_kv_heads
    for i, n in enumerate(lens):
        for h in range(s.num_q_heads):
            k, v = layer.k_cache[i, h // group, :n], layer.v_cache[i, h // group, :n]
            ref = _reference_attention(q.view(3, -1, s.head_dim)[i, h][None], k, v, torch.ones(1, n, dtype=bool))
            assert torch.allclose(out.view(3, -1, s.head_dim)[i, h], ref[0], atol=1e-5)
    with pytest.raises(ValueError, match=">= 1"):
        decode_metadata([3, 0])


def test_kv_cache_save_writes_slots_and_positions(layer):
    from profiler.ops import kv_cache_save

    s = layer.shapes
    k, v = torch.randn(3, s.kv_size), torch.randn(3, s.kv_size)
    kv_cache_save(k, v, layer.k_cache, layer.v_cache, torch.tensor([0, 2, 2]), torch.tensor([5, 7, 8]))
    assert torch.equal(layer.k_cache[2, :, 7], k[1].view(s.num_kv_heads, s.head_dim))
    assert torch.equal(layer.v_cache[2, :, 8], v[2].view(s.num_kv_heads, s.head_dim))


def test_rms_norm_and_rope_by_hand(layer):
    from profiler.ops import rms_norm, rope_cache, rotary_embedding

    x = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(rms_norm(x, torch.ones(2), eps=0.0), x / (12.5 ** 0.5))
    d = layer.shapes.head_dim
    q, k = torch.randn(5, layer.shapes.q_size), torch.randn(5, layer.shapes.kv_size)
    table = rope_cache(64, d)
    q0, k0 = rotary_embedding(q, k, torch.zeros(5, dtype=torch.long), table, d)
    assert torch.allclose(q0, q) and torch.allclose(k0, k)             # position 0: no rotation
    q7, _ = rotary_embedding(q, k, torch.full((5,), 7), table, d)
    norms = lambda t: t.view(5, -1, d).norm(dim=-1)                    # noqa: E731 - a rotation keeps lengths
    assert torch.allclose(norms(q7), norms(q), atol=1e-5)


def test_every_operator_has_a_callable(layer):
    from profiler.ops import OPERATORS, operator_callable

    for op in OPERATORS:
        fn = operator_callable(layer, op, num_tokens=5, chunk_size=4, context_len=3, kv_lens=[4, 6])
        fn()
    with pytest.raises(ValueError, match="unknown operator"):
        operator_callable(layer, "softmax", num_tokens=1)


def test_time_operator_on_cpu():
    from profiler.timing import TimingConfig, time_operator

    x = torch.randn(64, 64)
    stats = time_operator(lambda: x @ x, "cpu", TimingConfig(warmup=1, min_samples=3, min_run_time_s=0.0),
                          num_threads=1)
    assert 0 < stats.time_min_s <= stats.time_median_s and stats.num_runs >= 3
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        time_operator(lambda: None, "tpu")


# --- profile runs: schema, meta, resume -----------------------------------------------------------------------

SMALL = GridSpec(max_tokens=6, dense_tokens=3, token_growth=1.5, max_batch=3, max_context=16,
                 prefill_chunks=(1, 8), prefill_contexts=(0, 8), decode_batches=(1, 3), decode_kv_lens=(4, 16))
OPS = ["add", "attn_pre_proj", "lm_head", "attn_prefill", "attn_decode"]


def _run(out, **kw):
    from profiler.run import run_profile
    from profiler.timing import TimingConfig

    fast = TimingConfig(warmup=0, min_samples=2, max_samples=3, min_run_time_s=0.0)
    return run_profile(TINY, device="cpu", out_dir=out, grid=SMALL, timing=fast, operators=OPS, progress=False,
                       **kw)


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_profile_csv_schema_and_meta(tmp_path):
    path = _run(tmp_path)
    df = read_profile(tmp_path)
    assert list(df.columns) == list(COLUMNS)
    expected = build_grid(SMALL, LayerShapes.of(TINY), 4, device_type="cpu", operators=OPS)
    assert sorted(shape_key(r) for r in _rows(path)) == sorted(shape_key(r) for r in expected)
    assert (df["time_min_s"] <= df["time_median_s"]).all() and (df["time_median_s"] > 0).all()
    assert set(df["device"]) == {"cpu"} and set(df["dtype"]) == {"float32"} and set(df["num_threads"]) == {1}
    assert set(df["attention_backend"]) == {"torch_sdpa"} and set(df["model"]) == {"tiny"}
    assert set(df["torch_version"]) == {torch.__version__} and set(df["hidden_size"]) == {256}
    dec = df[df["operator"] == "attn_decode"]
    assert set(zip(dec["batch_size"], dec["kv_len"], dec["kv_total"], dec["kv_pattern"])) == {
        (1, 4, 4, "uniform"), (1, 16, 16, "uniform"), (3, 4, 12, "uniform"), (3, 4, 2 + 3 + 4, "linear"),
        (3, 16, 48, "uniform"), (3, 16, 6 + 11 + 16, "linear")}
    pre = df[df["operator"] == "attn_prefill"]
    assert set(zip(pre["chunk_size"], pre["context_len"], pre["kv_len"])) == {(1, 0, 1), (1, 8, 9), (8, 0, 8),
                                                                              (8, 8, 16)}
    head = df[df["operator"] == "lm_head"]            # B sequences after layers of T tokens (T = B: decodes)
    assert set(zip(head["batch_size"], head["num_tokens"])) == {(1, 1), (1, 6), (2, 2), (2, 6), (3, 3), (3, 6)}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["complete"] and meta["num_rows"] == len(df) and meta["device"] == "cpu"
    assert meta["torch_version"] == torch.__version__ and meta["num_threads"] == 1 and meta["tp"] == 1
    assert meta["model_shape"]["num_kv_heads"] == 2 and meta["time_unit"] == "s"
    assert meta["reference_kernel_s"]["start"] > 0 and meta["reference_kernel_s"]["end"] > 0    # the machine's speed


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    path = _run(tmp_path)
    full = _rows(path)
    lines = path.read_text().splitlines(keepends=True)
    # keep the header and 5 rows, then half of the 6th row: a run killed while writing
    path.write_text("".join(lines[:6]) + lines[6][: len(lines[6]) // 2])
    kept = _rows(path)[:5]
    _run(tmp_path)
    again = _rows(path)
    assert len(again) == len(full)
    assert sorted(shape_key(r) for r in again) == sorted(shape_key(r) for r in full)
    assert again[:5] == kept                                            # finished rows are not redone
    _run(tmp_path)                                                      # a complete run adds nothing
    assert len(_rows(path)) == len(full)


def test_folder_of_another_profile_is_refused(tmp_path):
    _run(tmp_path)
    with pytest.raises(ProfileError, match="dtype"):
        _run(tmp_path, dtype="bfloat16")


def test_profile_command(tmp_path):
    from click.testing import CliRunner

    from simulator.cli import main

    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["profile", "--model", "tiny", "--exec-device", "cpu", "--operators", "add",
                                    "--max-tokens", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "profiled tiny" in res.output and len(read_profile(out)) == 3
    bad = CliRunner().invoke(main, ["profile", "--model", "tiny", "--exec-device", "cpu", "--operators", "softmax",
                                    "--out", str(out)])
    assert bad.exit_code == 2 and "unknown softmax" in bad.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(main, ["profile", "--model", "tiny", "--exec-device", "cuda", "--out", str(out)])
        assert res.exit_code == 2 and "no CUDA device" in res.output


def test_collectives_by_message_size_on_cpu_gloo(tmp_path):
    from profiler.collectives import message_sizes

    assert message_sizes(10000) == [2048, 4096, 8192, 10000]
    from profiler.run import run_profile
    from profiler.timing import TimingConfig

    kw = dict(device="cpu", tp=2, out_dir=tmp_path, operators=["add"], progress=False, collectives=True,
              grid=GridSpec(max_tokens=8, dense_tokens=2, token_growth=2.0),
              timing=TimingConfig(warmup=1, min_samples=3, min_run_time_s=0.0))
    run_profile(TINY, **kw)
    df = read_profile(tmp_path)
    coll = df[df["operator"].isin(["all_reduce", "send_recv"])]
    sizes = message_sizes(8 * 256 * 4)                                   # max tokens x hidden x float32
    assert sorted(coll.loc[coll["operator"] == "all_reduce", "message_bytes"]) == sizes
    assert set(coll.loc[coll["operator"] == "all_reduce", "num_workers"]) == {2}
    assert (coll["time_median_s"] > 0).all() and set(df["tp"]) == {2}
    run_profile(TINY, **kw)                                              # resumes: nothing added
    assert len(read_profile(tmp_path)) == len(df)


def test_cold_calls_cycle_weight_copies_and_kv_slots():
    from profiler.ops import Layer, cache_flush_bytes, operator_callable

    flush = cache_flush_bytes("cpu")
    assert flush >= 2 << 20
    lay = Layer(LayerShapes.of(TINY), device="cpu", dtype="float32", max_positions=64, with_vocab=False)
    lay.ensure_kv_cache(32, 64)
    pool = lay.weight_pool("w_qkv", flush)
    nbytes = lay.w_qkv.numel() * 4
    assert pool[0] is lay.w_qkv and len(pool) == min(256, max(1, round(flush / nbytes)))
    assert not torch.equal(pool[0], pool[1]) and pool[1].shape == lay.w_qkv.shape
    x_ops = operator_callable(lay, "attn_pre_proj", num_tokens=2, cold=True)
    first, second = x_ops(), x_ops()
    assert not torch.equal(first, second)                    # same input, another copy of the weights
    warm = operator_callable(lay, "attn_pre_proj", num_tokens=2)
    assert torch.equal(warm(), warm())
    dec = operator_callable(lay, "attn_decode", kv_lens=[8] * 4, cold=True)
    outs = [dec() for _ in range(9)]                         # 32 slots / 4 per call: 8 slot groups, then repeats
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[8])


def test_each_shape_keeps_its_fastest_round(tmp_path, monkeypatch):
    import profiler.run as run
    from profiler.timing import TimingConfig

    calls = []

    def fake_time(fn, device, config, num_threads=None, flush_bytes=0, before=None):
        calls.append(1)
        slow = len(calls) % 2 == 1                     # every other measurement hit a busy machine
        t = 2e-3 if slow else 1e-3
        return TimingStats(t, t, t, 0.0, 4)

    monkeypatch.setattr(run, "time_operator", fake_time)
    run.run_profile(TINY, device="cpu", out_dir=tmp_path, operators=["add"], progress=False,
                    grid=GridSpec(max_tokens=5, dense_tokens=5),
                    timing=TimingConfig(warmup=0, min_samples=2, rounds=2))
    df = read_profile(tmp_path)
    assert len(df) == 5 and len(calls) == 10 and set(df["time_median_s"]) == {1e-3}


# --- noise: spaced rounds, cache flushes --------------------------------------------------------------------------

def test_spaced_rounds_by_hand():
    """Items a, b, c, d; each measurement takes 4 s of a fake clock; a round starts at least 10 s after the item's
    previous round ended. a (0-4), b (4-8), c (8-12): a is not due at 12 (8 s after), so d runs (12-16); then a is
    due (16 >= 4 + 10), b at 20, c at 24, d at 28. Yields come in first-round order with every round's result;
    with one round, items pass straight through."""
    from profiler.timing import spaced_rounds

    now = [0.0]
    calls = []

    def measure(item):
        calls.append((item, now[0]))
        now[0] += 4.0
        return f"{item}{sum(1 for c in calls if c[0] == item)}"

    got = list(spaced_rounds("abcd", measure, 2, gap_s=10.0, clock=lambda: now[0]))
    assert got == [("a", ["a1", "a2"]), ("b", ["b1", "b2"]), ("c", ["c1", "c2"]), ("d", ["d1", "d2"])]
    assert calls == [("a", 0.0), ("b", 4.0), ("c", 8.0), ("d", 12.0), ("a", 16.0), ("b", 20.0), ("c", 24.0),
                     ("d", 28.0)]
    now[0] = 0.0
    calls.clear()
    assert [item for item, _ in spaced_rounds("ab", measure, 3, gap_s=100.0, clock=lambda: now[0])] == ["a", "b"]
    assert [c[0] for c in calls] == ["a", "b", "a", "b", "a", "b"]     # never due: finished at the end, in turn
    assert list(spaced_rounds("xy", measure, 1)) == [("x", ["x1"]), ("y", ["y1"])]
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        list(spaced_rounds("a", measure, 0))


def test_flushed_cpu_timing_times_single_calls():
    from profiler.ops import private_cache_flush_bytes
    from profiler.timing import TimingConfig, time_operator

    calls = []
    config = TimingConfig(warmup=1, min_samples=5, max_samples=5, min_run_time_s=0.0)
    stats = time_operator(lambda: calls.append(1), "cpu", config, num_threads=1, flush_bytes=1 << 16)
    assert stats.num_runs == 5 and len(calls) == 1 + 5       # one warm-up, then one call per sample
    assert private_cache_flush_bytes() >= 1 << 16
    with pytest.raises(ValueError, match="flush_bytes must be an integer >= 0"):
        time_operator(lambda: None, "cpu", config, flush_bytes=-1)


def test_cpu_timing_after_preceding_operators_runs_them_before_each_sample():
    from profiler.timing import TimingConfig, time_operator

    order = []
    config = TimingConfig(warmup=1, min_samples=4, max_samples=4, min_run_time_s=0.0)
    stats = time_operator(lambda: order.append("op"), "cpu", config, num_threads=1, flush_bytes=1 << 16,
                          before=lambda: order.append("before"))
    assert stats.num_runs == 4
    assert order == ["op"] + ["before", "op"] * 4            # the warm-up, then each timed call right after before()


def test_preceding_operators_are_a_layers_order(layer):
    """Each operator is timed after the ones before it in a decoder layer, back to the last GEMM; the embedding and
    cpu_overhead start an iteration and have none (the profiler flushes the core's caches instead)."""
    import profiler.ops as ops

    layer_order = ["input_layernorm", "attn_pre_proj", "attn_rope", "attn_kv_cache_save", "attn_decode",
                   "attn_post_proj", "add", "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj",
                   "add"]
    gemms = {"attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "lm_head"}
    for op, before in ops.PRECEDING_OPERATORS.items():
        assert before and all(b in ops.OPERATORS for b in before), op
        if op == "input_layernorm":                   # after the previous layer's MLP
            assert before == ("mlp_down_proj", "add")
        elif op not in ("attn_post_proj", "attn_prefill", "add"):
            i = layer_order.index(op)
            assert list(before) == layer_order[i - len(before):i], op
        if op in gemms - {"lm_head", "attn_post_proj"}:  # (the O projection: the attention's stand-ins)
            assert len(before) == 1, op                  # a GEMM streams its weights: only its input's producer
        else:
            assert before[0] in gemms, op                # back to the last operator that streamed weights
    assert ops.preceding_callable(layer, "emb", num_tokens=4) is None
    assert ops.preceding_callable(layer, "cpu_overhead", num_tokens=4) is None
    calls = []
    real = ops.operator_callable

    def spy(lay, name, **kw):
        calls.append((name, kw["num_tokens"]))
        return real(lay, name, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "operator_callable", spy)
        run = ops.preceding_callable(layer, "attn_decode", kv_lens=[5, 7, 9])
        ops.preceding_callable(layer, "attn_prefill", chunk_size=6)
        ops.preceding_callable(layer, "mlp_act", num_tokens=5)()
    run()
    assert calls == [("attn_pre_proj", 3), ("attn_rope", 3), ("attn_kv_cache_save", 3),     # a decode's B tokens
                     ("attn_pre_proj", 6), ("attn_rope", 6), ("attn_kv_cache_save", 6),     # a chunk's tokens
                     ("mlp_up_proj", 5)]


def test_lm_head_follows_the_layers_of_its_iteration(layer):
    """The LM head of B sequences in an iteration of T tokens is timed after the model's layers (at most
    HEAD_PRECEDING_LAYERS) at that iteration: B - 1 decodes and a chunk of T - B + 1 tokens, or B decodes."""
    import profiler.ops as ops

    calls = []
    real = ops.operator_callable

    def spy(lay, name, **kw):
        calls.append((name, kw.get("num_tokens") or kw.get("chunk_size") or len(kw.get("kv_lens") or ()),
                      kw.get("context_len", kw.get("kv_lens", [None])[0] if kw.get("kv_lens") else None)))
        return real(lay, name, **kw)

    layer.ensure_kv_cache(4, ops.HEAD_PRECEDING_CONTEXT + 16)
    ctx = ops.HEAD_PRECEDING_CONTEXT
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "operator_callable", spy)
        ops.preceding_callable(layer, "lm_head", num_tokens=8, batch_size=3, num_layers=2)()
        one_layer = calls[:]
        calls.clear()
        ops.preceding_callable(layer, "lm_head", num_tokens=3, batch_size=3, num_layers=1)()
    per_layer = [(op, 8, None) for op in ops.LAYER_OPERATORS[:4]] + [("attn_decode", 2, ctx),
                                                                    ("attn_prefill", 6, ctx)] + \
                [(op, 8, None) for op in ops.LAYER_OPERATORS[5:]]
    assert one_layer == per_layer                          # built once, run for each of the 2 layers
    assert ("attn_decode", 3, ctx) in calls and not any(c[0] == "attn_prefill" for c in calls)


def test_preceding_outputs_stay_alive_through_the_timed_call(layer):
    """A timed call's output is not allocated where its predecessors' outputs were: they are still alive."""
    import profiler.ops as ops

    with torch.inference_mode():
        for op in ("input_layernorm", "mlp_act", "post_attention_layernorm"):
            before = ops.preceding_callable(layer, op, num_tokens=64)
            call = ops.operator_callable(layer, op, num_tokens=64)
            for _ in range(3):
                held = before()
                out = call()
                assert held and out.data_ptr() not in {t.data_ptr() for t in held if isinstance(t, torch.Tensor)}


def test_cold_weights_cycle_through_one_iterations_reads():
    """The reuse distance of a weight is the model's weights read in one iteration (plus its KV), capped at twice
    the last-level cache: the tiny model (2 layers, hidden 256, FFN 688, vocab 32000, float32) reads 38,572,032
    bytes: per layer 256 x 512 (QKV) + 256 x 256 (O) + 256 x 1376 (gate/up) + 688 x 256 (down) + 2 x 256 (norms)
    = 725,504 elements, twice, plus the 256 x 32000 LM head, x 4 bytes."""
    from profiler.ops import Layer, cache_flush_bytes, iteration_weight_bytes, reuse_bytes

    shapes = LayerShapes.of(load_model("tiny"))
    assert iteration_weight_bytes(shapes, 2, 4) == (2 * 725_504 + 256 * 32_000) * 4 == 38_572_032
    flush = cache_flush_bytes("cpu")
    assert reuse_bytes("cpu", shapes, 2, 4) == min(flush, 38_572_032)
    assert reuse_bytes("cpu", shapes, 2, 4, kv_bytes=1000) == min(flush, 38_574_032)
    assert reuse_bytes("cpu", shapes, None, 4) == flush
    assert reuse_bytes("cpu", shapes, 10_000, 4) == flush          # a model larger than the cache: from memory
    lay = Layer(shapes, device="cpu", dtype="float32", max_positions=8, with_vocab=True)
    head = 256 * 32_000 * 4
    assert len(lay.weight_pool("w_lm_head", 38_572_032)) == 1        # 1.18 copies: the nearest whole number
    assert len(lay.weight_pool("w_lm_head", 2 * head + head // 2 + 1)) == 3


def test_lm_head_and_cpu_overhead_do_what_an_iteration_does(layer):
    """lm_head: the final norm of the B last tokens, then the projection; cpu_overhead: the executor's own input
    preparation (profiler.ops.iteration_inputs) for B decodes and the argmax over their logits."""
    from profiler.ops import iteration_inputs, operator_callable
    from cost_models.plan import BatchPlan

    out = operator_callable(layer, "lm_head", num_tokens=3)()
    assert out.shape == (3, layer.shapes.vocab_size)
    assert operator_callable(layer, "cpu_overhead", num_tokens=4)().shape == (4,)
    plan = BatchPlan.from_entries([(7, 1, 5), (9, 1, 2), (4, 3, 6)], num_decodes=2)
    inputs = iteration_inputs(plan, {7: 1, 9: 0, 4: 2}, layer.shapes.vocab_size)
    assert inputs["positions"].tolist() == [5, 2, 6, 7, 8] and inputs["slots"].tolist() == [1, 0, 2, 2, 2]
    assert inputs["last"].tolist() == [0, 1, 4] and len(inputs["chunks"]) == 1
    meta, to_slot_order, to_plan_order = inputs["decode"]
    assert meta.batch_size == 2 and meta.max_kv_len == 6 and to_slot_order.tolist() == [1, 0]
