"""Import of Vidur-format profiling tables (issue 3): unit conversion (ms -> s), shape matching, attention of
another head count derived by the roofline ratio, collectives and CPU overheads, errors; with Vidur's A100 tables
in ../shared/data (skipped where absent): import, fit and simulate Llama-3-8B on an A100."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from profiler.vidur import VidurError, read_vidur_profile
from profiler.schema import COLUMNS

SHARED_VIDUR = Path(__file__).resolve().parents[2] / "shared" / "data" / "profiles" / "vidur"
STATS = ("min", "max", "mean", "median", "std")


def _stats(op, median_ms):
    return {f"time_stats.{op}.{s}": (median_ms * (0.9 if s == "min" else 1.0) if s != "std" else 0.001)
            for s in STATS}


def write_tables(root: Path, *, n_head=4, n_kv_head=2, n_embd=256, tps=(1, 2)):
    """Small Vidur-format tables of the tiny model's shape (times in ms)."""
    comp = root / "compute" / "cpu" / "tiny"
    comp.mkdir(parents=True)
    mlp = []
    for tp in tps:
        for T in (1, 2, 4, 8, 16):
            mlp.append({**_stats("mlp_up_proj", 0.01 * T / tp), **_stats("add", 0.002 * T), "n_head": n_head,
                        "n_kv_head": n_kv_head, "n_embd": n_embd, "n_expanded_embd": 688, "vocab_size": 32000,
                        "use_gated_mlp": True, "num_tokens": T, "num_tensor_parallel_workers": tp})
    pd.DataFrame(mlp).to_csv(comp / "mlp.csv", index=False)
    att = []
    base = {"n_embd": n_embd, "n_q_head": n_head, "n_kv_head": n_kv_head, "block_size": 16,
            "num_tensor_parallel_workers": 1, "max_model_len": 4096,
            "attention_backend": "AttentionBackend.FLASH_ATTENTION"}
    for c, k in ((64, 0), (64, 128), (128, 0)):
        att.append({**base, **_stats("attn_prefill", 0.001 * c), **_stats("attn_input_reshape", 0.002),
                    **_stats("attn_output_reshape", 0.003), "batch_size": 1, "prefill_chunk_size": c,
                    "kv_cache_size": k, "is_prefill": True})
    for b, k in ((1, 32), (4, 32), (4, 64)):
        att.append({**base, **_stats("attn_decode", 0.0001 * b * k), **_stats("attn_input_reshape", 0.0),
                    **_stats("attn_output_reshape", 0.001), "batch_size": b, "prefill_chunk_size": 0,
                    "kv_cache_size": k, "is_prefill": False})
    pd.DataFrame(att).to_csv(comp / "attention.csv", index=False)
    cpu = pd.DataFrame({"batch_size": [8, 16], "tensor_parallel_degree": [2, 2], "model_name": ["m", "m"],
                        "schedule_median": [0.1, 0.2], "sampler_e2e_median": [0.5, 0.6],
                        "prepare_inputs_e2e_median": [0.2, 0.2], "process_model_outputs_median": [0.3, 0.5]})
    cpu.to_csv(comp / "cpu_overheads.csv")
    net = root / "network"
    net.mkdir()
    pd.DataFrame([{**_stats("all_reduce", 0.01 * i), "rank": 0, "num_workers": w, "size": 2048 * i,
                   "collective": "all_reduce", "devices_per_node": w, "max_devices_per_node": 4}
                  for w in (2, 4) for i in (1, 2, 3)]).to_csv(net / "all_reduce.csv")
    return root


def test_tables_convert_to_seconds_and_servesim_shapes(tmp_path):
    df, meta = read_vidur_profile(write_tables(tmp_path), "tiny", tp=1, device="cpu")
    assert list(df.columns) == list(COLUMNS)
    up = df[df["operator"] == "mlp_up_proj"].set_index("num_tokens")
    assert up.loc[4, "time_median_s"] == pytest.approx(0.04e-3) and up.loc[4, "time_min_s"] == pytest.approx(0.036e-3)
    pre = df[df["operator"] == "attn_prefill"].set_index(["chunk_size", "context_len"])
    assert pre.loc[(64, 128), "time_median_s"] == pytest.approx((0.064 + 0.002 + 0.003) * 1e-3)   # + reshapes
    assert pre.loc[(64, 128), "kv_len"] == 192
    dec = df[df["operator"] == "attn_decode"].set_index(["batch_size", "kv_len"])
    assert dec.loc[(4, 65), "time_median_s"] == pytest.approx((0.0256 + 0.001) * 1e-3)   # kv_cache_size + 1 keys
    assert dec.loc[(4, 65), "kv_total"] == 4 * 65 and set(dec["kv_pattern"]) == {"uniform"}
    cpu = df[df["operator"] == "cpu_overhead"].set_index("batch_size")
    assert cpu.loc[16, "time_median_s"] == pytest.approx(1.5e-3)
    assert "all_reduce" not in set(df["operator"])                       # only needed with tp > 1
    assert set(df.loc[df["operator"].str.startswith("attn_"), "attention_backend"]) == {"flash_attention"}
    assert not any("scaled per row" in n for n in meta["notes"])         # exact shape: no derivation
    assert any("no rows at tp=1" in n for n in meta["notes"])
    assert meta["source"] == "vidur" and meta["model_shape"]["tp"] == 1


def test_tensor_parallel_rows_and_all_reduce(tmp_path):
    df, meta = read_vidur_profile(write_tables(tmp_path), "tiny", tp=2, device="cpu")
    ar = df[df["operator"] == "all_reduce"]
    assert set(ar["num_workers"]) == {2} and sorted(ar["message_bytes"]) == [2048, 4096, 6144]
    up = df[df["operator"] == "mlp_up_proj"].set_index("num_tokens")
    assert up.loc[8, "time_median_s"] == pytest.approx(0.04e-3)          # the TP-2 rows
    # the attention table is at TP 1 (4 q / 2 KV heads per GPU); at TP 2 the model has 2 / 1: derived
    assert any("scaled per row by the roofline ratio" in n for n in meta["notes"])


def test_attention_of_another_head_size_falls_back_with_a_note(tmp_path):
    write_tables(tmp_path)
    att = tmp_path / "compute" / "cpu" / "tiny" / "attention.csv"
    table = pd.read_csv(att)
    table["n_embd"] = 512                                                # head size 128, the model's is 64
    table.to_csv(att, index=False)
    df, meta = read_vidur_profile(tmp_path, "tiny", tp=1, device="cpu")
    assert not df["operator"].isin(["attn_prefill", "attn_decode"]).any()
    assert any("priced by the roofline" in n for n in meta["notes"])


def test_bad_tables_are_one_line_errors(tmp_path):
    with pytest.raises(VidurError, match="not found"):
        read_vidur_profile(tmp_path / "nope", "tiny")
    write_tables(tmp_path)
    with pytest.raises(VidurError, match=r"no mlp.csv matches Llama-3-8B at tp=1 .* tables hold: n_head 4"):
        read_vidur_profile(tmp_path, "Llama-3-8B")
    mlp = tmp_path / "compute" / "cpu" / "tiny" / "mlp.csv"
    pd.read_csv(mlp).drop(columns=["use_gated_mlp"]).to_csv(mlp, index=False)
    with pytest.raises(VidurError, match="mlp.csv: missing column"):
        read_vidur_profile(tmp_path, "tiny")


# --- Vidur's A100 tables --------------------------------------------------------------------------------------

needs_shared = pytest.mark.skipif(not SHARED_VIDUR.is_dir(),
                                  reason=f"Vidur A100 tables not present at {SHARED_VIDUR} (../shared/data)")


@needs_shared
def test_a100_tables_for_llama3_8b():
    df, meta = read_vidur_profile(SHARED_VIDUR, "Llama-3-8B", tp=1)
    ops = set(df["operator"])
    assert {"mlp_up_proj", "attn_pre_proj", "add", "emb", "attn_prefill", "attn_decode", "cpu_overhead",
            "send_recv"} <= ops
    raw = pd.read_csv(SHARED_VIDUR / "compute/a100/meta-llama/Meta-Llama-3-8B/mlp.csv")
    raw = raw[(raw["num_tensor_parallel_workers"] == 1) & (raw["num_tokens"] == 1)]
    up = df[(df["operator"] == "mlp_up_proj") & (df["num_tokens"] == 1)]
    assert up["time_median_s"].iloc[0] == pytest.approx(raw["time_stats.mlp_up_proj.median"].iloc[0] * 1e-3)
    # attention measured with 4 KV heads per GPU, Llama-3-8B has 8: decode reads twice the KV bytes
    att = pd.read_csv(SHARED_VIDUR / "compute/a100/legacy-e2d00e9/attention.csv")
    row = att[(~att["is_prefill"]) & (att["batch_size"] == 128) & (att["kv_cache_size"] == 4032)].iloc[0]
    measured = (row["time_stats.attn_decode.median"] + row["time_stats.attn_output_reshape.median"]
                + row["time_stats.attn_input_reshape.median"]) * 1e-3
    dec = df[(df["operator"] == "attn_decode") & (df["batch_size"] == 128) & (df["kv_len"] == 4033)]
    assert 1.8 < dec["time_median_s"].iloc[0] / measured <= 2.0
    pre = df[(df["operator"] == "attn_prefill") & (df["chunk_size"] == 2048) & (df["context_len"] == 2048)]
    raw_pre = att[att["is_prefill"] & (att["prefill_chunk_size"] == 2048) & (att["kv_cache_size"] == 2048)].iloc[0]
    assert pre["time_median_s"].iloc[0] / (raw_pre["time_stats.attn_prefill.median"] * 1e-3) == pytest.approx(
        1.0, abs=0.05)                                                   # same query heads: same FLOPs
    assert any("scaled per row by the roofline ratio" in n for n in meta["notes"])


@needs_shared
def test_fit_and_simulate_llama3_8b_on_a100_from_vidur_tables():
    from cost_models.fitted import FittedCostModel
    from cost_models.fitting import fit_profile
    from simulator.config import SimConfig
    from simulator.simulation import simulate

    df, meta = read_vidur_profile(SHARED_VIDUR, "Llama-3-8B", tp=1)
    small = pd.concat([g.sample(min(len(g), 150), random_state=0) for _, g in df.groupby("operator")])
    model = FittedCostModel(fit_profile(small, meta), "Llama-3-8B", "A100-80GB-PCIe")
    assert {"attn_kv_cache_save", "lm_head"} == set(model.fallbacks)
    result = simulate(SimConfig(model="Llama-3-8B", device="A100-80GB-PCIe", num_requests=40, qps=2.0), cost_model=model)
    assert result.summary["requests_completed"] == 40
    assert np.all(result.iterations["duration_s"] > 0)
    assert 5e-3 < result.summary["tbt_s"]["p50"] < 0.2
