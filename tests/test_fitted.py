"""Fitted per-operator cost models (issue 3): held-out error on a synthetic profile with known costs, the
save/load round trip, the CostModel protocol (breakdown sums, mixed batches priced by their parts, roofline
fallbacks), monotone predictions, lookup tables, and ``servesim fit``."""
from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cost_models.fitted import FitError, FittedCostModel, load_cost_model, read_fitted, save_fitted
from cost_models.fitting import fit_profile, format_report, profile_hash
from cost_models.lookup import IntTable, LogGrid, geometric_points, monotone
from cost_models.roofline import RooflineCostModel
from cost_models.specs import load_model
from profiler.schema import COLUMNS, model_columns
from cost_models.plan import BatchPlan

TINY = load_model("tiny")
ROOFLINE_NAMES = {"input_layernorm", "attn_pre_proj", "attn_rope", "attn_kv_cache_save", "attn_prefill",
                  "attn_decode", "attn_post_proj", "post_attention_layernorm", "mlp_up_proj", "mlp_act",
                  "mlp_down_proj", "add", "all_reduce", "emb", "lm_head", "cpu_overhead", "send_recv"}

# Known per-call costs (seconds) the synthetic profile is drawn from.
TRUTH = {
    "mlp_up_proj": lambda T: 5e-6 + 2e-8 * T,
    "add": lambda T: 1e-6 + 1e-9 * T,
    "lm_head": lambda B: 2e-5 + 1e-6 * B,
    "attn_prefill": lambda c, k: 3e-6 + 1e-10 * c * (k + c / 2) + 2e-9 * (k + c),
    "attn_decode": lambda b, S: 4e-6 + 1e-9 * S + 1e-7 * b,
}


def synthetic_profile(seed=0, noise=0.02) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []

    def add(op, t, **shape):
        row = {c: 0 for c in COLUMNS} | {"kv_pattern": ""} | shape | {"operator": op}
        t = t * (1 + noise * rng.standard_normal())
        row.update(time_min_s=t * 0.98, time_median_s=t, time_mean_s=t, time_std_s=0.01 * t, num_runs=9)
        rows.append(row)

    tokens = sorted({int(round(1.2 ** i)) for i in range(45)})
    for T in tokens:
        add("mlp_up_proj", TRUTH["mlp_up_proj"](T), num_tokens=T)
        add("add", TRUTH["add"](T), num_tokens=T)
    for B in range(1, 65, 2):
        add("lm_head", TRUTH["lm_head"](B), num_tokens=B, batch_size=B)
    for c in (1, 8, 32, 64, 128, 256, 512):
        for k in (0, 64, 256, 512, 1024):
            add("attn_prefill", TRUTH["attn_prefill"](c, k), num_tokens=c, chunk_size=c, context_len=k,
                batch_size=1, kv_len=c + k, kv_total=c + k)
    for b in (1, 2, 4, 8, 16, 32, 64):
        for kv in (16, 64, 256, 1024, 2048):
            add("attn_decode", TRUTH["attn_decode"](b, b * kv), num_tokens=b, batch_size=b, kv_len=kv,
                kv_total=b * kv, kv_pattern="uniform")
    df = pd.DataFrame(rows)
    for key, value in {"device": "cpu", "device_name": "test", "torch_version": "x", "dtype": "float32",
                       "attention_backend": "torch_sdpa", "num_threads": 1, **model_columns(TINY, 1)}.items():
        df[key] = value
    return df[list(COLUMNS)]


def meta_of(df=None) -> dict:
    return {"model": "tiny", "model_shape": model_columns(TINY, 1), "model_spec": TINY.to_dict(), "tp": 1,
            "device": "cpu", "device_name": "test", "device_spec": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    save_fitted(fit_profile(synthetic_profile(), meta_of(), cpu_overhead_s=1e-3), out)
    return out


@pytest.fixture(scope="module")
def model(fitted_dir):
    return load_cost_model(fitted_dir, model=TINY, device="cpu")


def decodes(*contexts):
    return BatchPlan.from_entries([(i, 1, k) for i, k in enumerate(contexts)], num_decodes=len(contexts))


def prefill(*chunks):
    return BatchPlan.from_entries([(100 + i, n, k) for i, (n, k) in enumerate(chunks)], num_decodes=0)


def mixed(contexts, chunks):
    entries = [(i, 1, k) for i, k in enumerate(contexts)] + [(100 + i, n, k) for i, (n, k) in enumerate(chunks)]
    return BatchPlan.from_entries(entries, num_decodes=len(contexts))


def test_heldout_error_is_small_and_reported(fitted_dir):
    fitted = read_fitted(fitted_dir)
    assert {r.operator for r in fitted.reports} == set(TRUTH)
    for r in fitted.reports:
        assert r.heldout_rows >= 5 and r.median_ape < 5.0, r
    text = format_report(fitted)
    assert "attn_decode" in text and "median APE" in text
    summary = json.loads((fitted_dir / "model.json").read_text())
    assert summary["profile_hash"] == fitted.profile_hash and summary["meta"]["num_threads"] == 1
    assert {e["operator"] for e in summary["heldout_error"]} == set(TRUTH)


def test_predictions_follow_the_profiled_costs(model):
    L = TINY.num_layers
    for T in (3, 100, 700):
        bd = model.breakdown(prefill((T, 0)))
        assert bd["mlp_up_proj"] == pytest.approx(L * TRUTH["mlp_up_proj"](T), rel=0.08)
        assert bd["add"] == pytest.approx(L * 2 * TRUTH["add"](T), rel=0.08)          # two residual adds
    bd = model.breakdown(prefill((200, 300)))
    assert bd["attn_prefill"] == pytest.approx(L * TRUTH["attn_prefill"](200, 300), rel=0.1)
    bd = model.breakdown(decodes(*[499] * 24))
    assert bd["attn_decode"] == pytest.approx(L * TRUTH["attn_decode"](24, 24 * 500), rel=0.1)
    assert bd["lm_head"] == pytest.approx(TRUTH["lm_head"](24), rel=0.08)
    assert bd["cpu_overhead"] == 1e-3


def test_beyond_the_profile_grows_with_the_work(model):
    L = TINY.num_layers
    big = model.breakdown(prefill((20000, 0)))["mlp_up_proj"]          # profiled up to 3,500 tokens
    assert big == pytest.approx(L * TRUTH["mlp_up_proj"](20000), rel=0.15)
    far = model.breakdown(decodes(*[8000] * 100))["attn_decode"]       # batch and KV past the profile
    assert far == pytest.approx(L * TRUTH["attn_decode"](100, 100 * 8001), rel=0.25)


def test_breakdown_sums_to_iteration_time_with_roofline_names(model):
    for plan in (decodes(5, 900), prefill((64, 0), (32, 100)), mixed([10, 20, 30], [(128, 256)])):
        bd = model.breakdown(plan)
        assert set(bd) <= ROOFLINE_NAMES
        assert sum(bd.values()) == pytest.approx(model.iteration_time(plan), rel=1e-12)
    assert model.iteration_time(BatchPlan()) == 0.0 and model.breakdown(BatchPlan()) == {}


def test_mixed_batch_is_priced_by_its_parts(model):
    dec, chunks = [100, 700, 2000], [(96, 0), (256, 512)]
    both = model.breakdown(mixed(dec, chunks))
    assert both["attn_decode"] == model.breakdown(decodes(*dec))["attn_decode"]
    assert both["attn_prefill"] == pytest.approx(sum(model.breakdown(prefill(c))["attn_prefill"] for c in chunks))
    same_tokens = model.breakdown(prefill((3 + 96 + 256, 0)))                      # linear ops by total tokens
    for op in ("mlp_up_proj", "add", "input_layernorm"):
        assert both[op] == same_tokens[op]
    # one row per sequence, after layers of the iteration's tokens
    assert both["lm_head"] == model.breakdown(mixed([1] * 4, [(351, 0)]))["lm_head"]
    assert both["lm_head"] != model.breakdown(decodes(*[1] * 5))["lm_head"]


def test_operators_missing_from_the_profile_are_priced_by_the_roofline(model):
    roof = RooflineCostModel(TINY, "cpu")
    plan = mixed([50, 60], [(128, 0)])
    bd, ref = model.breakdown(plan), roof.breakdown(plan)
    assert {"input_layernorm", "attn_kv_cache_save", "mlp_down_proj", "emb"} <= set(model.fallbacks)
    for op in ("input_layernorm", "attn_kv_cache_save", "mlp_down_proj", "emb"):
        assert bd[op] == pytest.approx(ref[op], rel=1e-12)
    assert "mlp_up_proj" not in model.fallbacks


def test_predictions_are_monotone(model):
    rng = random.Random(7)
    for _ in range(300):
        ctx = [rng.randint(0, 6000) for _ in range(rng.randint(1, 150))]
        chunk = (rng.randint(1, 3000), rng.randint(0, 6000))
        base = model.iteration_time(mixed(ctx, [chunk]))
        # a longer chunk, a longer context, more context for every decode, one more decode: never cheaper
        assert model.iteration_time(mixed(ctx, [(chunk[0] + rng.randint(1, 500), chunk[1])])) >= base
        assert model.iteration_time(mixed(ctx, [(chunk[0], chunk[1] + rng.randint(1, 500))])) >= base
        step = rng.randint(1, 500)
        assert model.iteration_time(mixed([k + step for k in ctx], [chunk])) >= base
        same = [ctx[0]] * len(ctx)
        assert model.iteration_time(mixed(same + [ctx[0]], [chunk])) >= model.iteration_time(mixed(same, [chunk]))
    times = [model.iteration_time(prefill((T, 0))) for T in range(1, 5000, 7)]
    assert times == sorted(times)


def test_save_load_round_trip_and_profile_hash(fitted_dir, model, tmp_path):
    again = load_cost_model(fitted_dir, model="tiny", device="cpu")
    rng = random.Random(3)
    for _ in range(50):
        plan = mixed([rng.randint(0, 3000) for _ in range(rng.randint(0, 40))], [(rng.randint(1, 600), 0)])
        assert again.iteration_time(plan) == model.iteration_time(plan)
    df = synthetic_profile()
    settings = {"seed": 0}
    assert profile_hash(df, settings) == profile_hash(df.sample(frac=1, random_state=1), settings)   # row order
    changed = df.copy()
    changed.loc[3, "time_median_s"] *= 1.01
    assert profile_hash(changed, settings) != profile_hash(df, settings)
    assert profile_hash(df, {"seed": 1}) != profile_hash(df, settings)


def test_mismatched_model_tp_or_folder_is_a_clear_error(fitted_dir, tmp_path):
    with pytest.raises(FitError, match=r"fitted for tiny \(hidden_size=256\), not Llama-3-8B"):
        load_cost_model(fitted_dir, model="Llama-3-8B", device="A100")
    with pytest.raises(FitError, match="profiled at tp=1, not tp=2"):
        load_cost_model(fitted_dir, model=TINY, device="cpu", tp=2)
    with pytest.raises(FitError, match="no model.json"):
        load_cost_model(tmp_path, model=TINY, device="cpu")
    (tmp_path / "model.json").write_text(json.dumps({"file": "gone.joblib", "profile_hash": "x"}))
    with pytest.raises(FitError, match="field file: gone.joblib not found"):
        load_cost_model(tmp_path, model=TINY, device="cpu")
    with pytest.warns(UserWarning, match="fitted on cpu, simulating A100"):
        load_cost_model(fitted_dir, model=TINY, device="A100")


def test_simulate_with_the_fitted_model(fitted_dir):
    from simulator.config import SimConfig
    from simulator.simulation import simulate

    config = SimConfig(model="tiny", device="cpu", cost_model=str(fitted_dir), num_requests=30, qps=5.0,
                       max_model_len=8192, allow_long_max_model_len=True)
    result = simulate(config)
    assert result.summary["requests_completed"] == 30
    assert isinstance(result.cost_model, FittedCostModel)
    assert (result.iterations["duration_s"] > 0).all()


# --- lookup tables -----------------------------------------------------------------------------------------------

def test_monotone_is_the_least_monotone_majorant():
    a = np.array([[1.0, 3.0, 2.0], [0.5, 4.0, 1.0]])
    assert monotone(a).tolist() == [[1.0, 3.0, 3.0], [1.0, 4.0, 4.0]]


def test_int_table_isotonic_then_extended_by_the_proxy():
    t = IntTable([1.0, 3.0, 2.0, 4.0], proxy=lambda x: 2.0 * x)
    # 3 then 2 violate monotonicity: pooled to their geometric mean (least squares in log time)
    assert [t(1), t(2), t(3), t(4)] == pytest.approx([1.0, 6 ** 0.5, 6 ** 0.5, 4.0])
    assert t(8) == pytest.approx(8.0)            # scale = 4 / proxy(4) = 0.5 -> 0.5 x 16
    assert t(5) == pytest.approx(5.0)
    spike = IntTable([1.0, 2.0, 9.0, 3.0, 4.0, 5.0, 6.0])
    assert spike(7) == 6.0                        # one slow size does not lift every later size


def test_log_grid_interpolates_power_laws_and_extends_continuously():
    axis = geometric_points(1, 1000, 1.5)
    grid = LogGrid([axis], [3.0 * (1 + x) ** 2 for x in axis], proxy=lambda x: (1 + x) ** 2)
    assert grid(1.0) == pytest.approx(12.0)
    assert grid(137.0) == pytest.approx(3.0 * 138 ** 2, rel=1e-9)     # exact for a power law of 1 + x
    assert grid(4000.0) == pytest.approx(3.0 * 4001 ** 2, rel=1e-9)   # extension: scale 3 on the upper face
    ax = [0.0, 10.0, 100.0]
    grid2 = LogGrid([ax, ax], np.array([[1.0, 2.0, 4.0], [2.0, 3.0, 5.0], [4.0, 5.0, 9.0]]))
    assert grid2(10.0, 100.0) == pytest.approx(5.0) and grid2(0.0, 0.0) == pytest.approx(1.0)
    assert 1.0 < grid2(5.0, 5.0) < 3.0 and grid2(500.0, 500.0) == pytest.approx(9.0)  # no proxy: clamped
    with pytest.raises(ValueError, match="do not match"):
        LogGrid([ax], np.ones((2,)))


# --- servesim fit --------------------------------------------------------------------------------------------------

def test_fit_command_prints_heldout_error_and_reuses_the_model(tmp_path):
    from simulator.cli import main

    prof = tmp_path / "profile"
    prof.mkdir()
    synthetic_profile().to_csv(prof / "profile.csv", index=False)
    (prof / "meta.json").write_text(json.dumps(meta_of()))
    out = tmp_path / "model"
    res = CliRunner().invoke(main, ["fit", str(prof), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "held-out error per operator" in res.output and "attn_decode" in res.output
    assert "priced by the roofline" in res.output and (out / "model.json").is_file()
    again = CliRunner().invoke(main, ["fit", str(prof), "--out", str(out)])
    assert again.exit_code == 0 and "already holds the model of this profile" in again.output
    none = CliRunner().invoke(main, ["fit", "--out", str(out)])
    assert none.exit_code == 2 and "give a profile folder" in none.output


def test_step_pricing_equals_iteration_time_bit_for_bit(model):
    # fast-forward prices stretch steps without plans (simulator.fast_forward): each step must cost exactly what
    # the step-by-step engine's iteration_time of its plan costs
    rng = np.random.default_rng(3)
    for _ in range(50):
        ctx = rng.integers(0, 3000, rng.integers(1, 40)).tolist()
        assert model.step_time(len(ctx), sum(ctx), max(ctx)) == model.iteration_time(decodes(*ctx))
        ctx = ctx[:rng.integers(0, len(ctx) + 1)]
        n, k = int(rng.integers(1, 600)), int(rng.integers(0, 4000))
        got = model.step_time(len(ctx), sum(ctx), max(ctx, default=-1), n, k)
        assert got == model.iteration_time(mixed(ctx, [(n, k)]))
        chunks = [(int(rng.integers(1, 600)), int(rng.integers(0, 4000))) for _ in range(int(rng.integers(2, 5)))]
        got = model.chunks_step_time(len(ctx), sum(ctx), max(ctx, default=-1), tuple(c for c, _ in chunks),
                                     tuple(k for _, k in chunks))
        assert got == model.iteration_time(mixed(ctx, chunks))


def test_fast_forward_identical_with_a_fitted_model(fitted_dir):
    # the fitted model's step_time pricing inside stretches (decodes, and prefill chunks beside them)
    from simulator.simulation import simulate

    kw = dict(model="tiny", device="cpu", cost_model=str(fitted_dir), num_requests=150, qps=20.0,
              trace="random", input_len=700, output_len=60, range_ratio=0.5, token_budget=128)
    on, off = simulate(fast_forward=True, **kw), simulate(fast_forward=False, **kw)
    assert on.summary["tbt_s"] == off.summary["tbt_s"] and on.summary["extrapolation"] == off.summary["extrapolation"]
    assert on.log.columns() == off.log.columns()
    assert [r.token_times_s for r in on.requests] == [r.token_times_s for r in off.requests]


def test_fit_keeps_the_steep_small_batch_end():
    # lm_head of the tiny model on a 2-core CPU (a quick profile, microseconds): about 2.6 ms per sequence up to
    # B = 4, then nearly flat. Leaves of three rows, which the cross-validation picked for this profile (its random
    # folds are mostly rows of the flat part), fitted B = 1, 2, 3 as 4.99, 5.64, 6.21 ms; low-load decodes are
    # priced there
    from cost_models.fitting import fit_operator

    B = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 25, 28, 31, 35, 39, 44, 49, 55, 62, 64]
    us = [2689.9, 5101.0, 8083.1, 9422.6, 10173.7, 12727.4, 10582.8, 12288.1, 11620.5, 12017.0, 13541.2, 12240.4,
          11070.3, 13553.7, 13080.4, 11114.3, 14811.6, 16460.2, 18175.2, 18674.4, 19801.3, 23612.2, 23134.2,
          24529.7, 26591.0, 29257.1, 24511.0, 32845.7, 31124.4]
    y = np.array(us) * 1e-6
    X = np.column_stack([B, B]).astype(float)           # decode-only rows: T = B
    _, table, report = fit_operator("lm_head", X, y, seed=0)
    for b in (1, 2, 3):
        assert table(b, b) == pytest.approx(y[b - 1], rel=0.15), (b, table(b, b), report)


def test_lm_head_is_priced_by_sequences_and_the_tokens_before_it():
    # a CPU LM head slows down as the iteration's layers read more before it (its weights leave the cache): the
    # table reproduces the profiled (B, T) shapes, grows with T at every B and stays flat past the profiled T
    from cost_models.fitting import fit_operator

    rows = [(b, t) for b in (1, 2, 4, 8, 16, 32, 64) for t in sorted({b, 64, 256, 512, 1024}) if t >= b]
    X = np.array(rows, dtype=float)
    y = np.array([1e-3 + 0.1e-3 * b + 2e-3 * min(t / 512, 1.0) for b, t in rows])
    _, table, _ = fit_operator("lm_head", X, y, seed=0)
    for (b, t), v in zip(rows, y):
        assert table(b, t) == pytest.approx(v, rel=0.05), (b, t)
    for b in (1, 3, 8, 40):
        priced = [table(b, t) for t in (b, 100, 300, 700, 1024, 4096)]
        assert all(later >= earlier * (1 - 1e-12) for earlier, later in zip(priced, priced[1:]))
        assert table(b, 4096) == pytest.approx(table(b, 1024), rel=0.05)


@pytest.mark.parametrize("trees", ["extra", "forest"])
def test_both_ensembles_price_a_profiled_shape_at_its_measured_time(trees):
    # a quick CPU profile's lm_head: 1.99 ms at B = 1, 3.50 ms at B = 2; a forest with a bootstrap left B = 1 out
    # of a third of its trees, which priced it as B = 2 (2.53 ms at B = 1)
    from cost_models.fitting import ProxyTreeRegressor

    B = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64], dtype=float)[:, None]
    y = np.array([1.99, 3.50, 3.88, 4.11, 4.81, 5.43, 6.41, 6.57, 7.6, 8.3, 8.9, 8.24]) * 1e-3
    est = ProxyTreeRegressor("sequence", trees=trees, random_state=0).fit(B, y)
    assert est.predict(B) == pytest.approx(y, rel=1e-9)
