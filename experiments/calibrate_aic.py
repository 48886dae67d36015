"""Calibrate the H100-SXM roofline and the TRT-LLM / vLLM engine profiles on AIConfigurator's measured end-to-end
TPOT (``../shared/data/measurements/aic/``; ai-dynamo/aiconfigurator ``silicon_sample.csv``, Apache-2.0).

Used by ``experiments/calibrate_roofline.py`` (which writes ``cost_models/calibration.py``); run alone it prints the
per-row table: ``python experiments/calibrate_aic.py [--aic DIR]``.

**The benchmark** (AIConfigurator's README beside the data): a closed loop of ``c`` clients, fixed input ``I`` and
output ``O`` tokens, aggregated (colocated prefill + decode) serving; TTFT and TPOT in ms. **The model of it**
(``closed_loop``), in steady state with the clients' requests staggered:

- every iteration decodes the ``c`` running requests at the mean context ``I + O/2`` (``d`` seconds: the roofline
  with the engine's overhead), the static-concurrency approximation;
- each request's prefill (``I`` tokens in chunks of the engine's token budget, 8192 for both engines on an H100: vLLM
  v1 ``max_num_batched_tokens`` for the API server on a >= 70 GiB GPU, TRT-LLM ``max_num_tokens``) rides in those
  iterations and adds ``p`` seconds (the priced iteration with the chunk minus without it);
- during one request's decode phase ``D = (O - 1) x TPOT`` the other ``c - 1`` clients each start one request per
  cycle ``E2E = TTFT + D``, so ``D = (O - 1) d + (c - 1) p D / E2E`` — solved for ``D`` (a quadratic) with
  ``TTFT = p + d + TPOT / 2`` (the chunk's iteration plus the mean wait for the iteration in progress).

This reproduces how the measured TPOT falls with the output length at fixed ``c`` and ``I`` (the prefills of the
other clients are spread over more tokens), which the plain static approximation (TPOT = one decode iteration)
misses by up to 2.5x. **TTFT is not used**: at fixed ``c`` it grows with the *output* length (TRT-LLM Llama-3.1-8B TP1
1024 tokens in, c = 8: 191 / 318 / 550 ms for 128 / 256 / 512 out), which no prefill explains — the benchmark's
TTFT holds client-side queueing that is not documented. Rows whose ``c x (I + O)`` tokens exceed the KV cache
(memory x 0.9 - weights, over the KV bytes per token) are excluded: their engine ran fewer sequences than ``c``.

**Fits** (``scipy.optimize.least_squares`` of log(predicted / measured TPOT)):

1. H100-SXM with TRT-LLM 1.0.0rc3, Llama-3.1-8B (the layer shapes and vocabulary of Llama-3-8B) at TP1: the
   A100-80GB-PCIe's calibrated constants with the GEMM compute efficiency scaled by ``s_mm``, the attention compute
   efficiency by ``s_attn`` and every bandwidth efficiency by ``s_b`` (each capped at 1; launch and attention-call
   overheads kept), and the ``trtllm-1.0`` engine profile (fixed + per sequence), five numbers. GEMM and attention
   separate because the attention share of a prefill grows with its length (FLOPs ~ I^2 against ~ I), which the
   rows at I = 1024-4096 resolve (one shared compute scale fits worse, 1.4% against 1.2% median, and puts the GEMMs
   at 84% of peak, above what cuBLAS reaches on an H100). TP1 only:
   above TP1 the roofline's ring all-reduce (``2(p-1)`` link latencies per call) dominates small decode batches and
   is not what TRT-LLM's one-shot NVSwitch all-reduce costs; those rows are reported, not fitted.
2. The ``vllm-0.32`` engine profile (fixed + per sequence) with vLLM 0.12.0 Qwen3-32B TP2 rows (bf16), given the
   calibrated H100; TP4/TP8 reported.

fp8 rows (all of the H200's) are not used: the served checkpoint and the KV-cache dtype are not recorded.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from cost_models.engine_overhead import EngineProfile
from cost_models.plan import BatchPlan
from cost_models.roofline import RooflineConstants, RooflineCostModel
from cost_models.specs import load_device, load_model

DEVICE = "H100-SXM"
BF16_FILE = "aic_h100_dense_aggregated_bf16.csv"
TOKEN_BUDGET = 8192
KV_MEMORY_FRACTION = 0.9
BANDWIDTH_EFFS = ("bandwidth_eff", "attn_decode_bandwidth_eff", "add_bandwidth_eff", "norm_bandwidth_eff",
                  "emb_bandwidth_eff")
TRT = ("trtllm", "1.0.0rc3", "meta-llama/Llama-3.1-8B-Instruct")
VLLM = ("vllm", "0.12.0", "Qwen/Qwen3-32B")
FIT_TP = {"trtllm": 1, "vllm": 2}


def default_aic_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared/data/measurements/aic"


def model_for(model_id: str, aic: Path):
    """The ModelSpec of an AIC model id: Llama-3.1-8B has Llama-3-8B's shapes and vocabulary (128256); Qwen3-32B
    is read from its config.json beside the data (its QK-norm, two tiny RMSNorms per layer, is not priced)."""
    if model_id == TRT[2]:
        return load_model("Llama-3-8B")
    return load_model(aic / "hf_configs" / (model_id.replace("/", "--") + ".json"))


def aic_rows(aic: Path, framework: tuple) -> pd.DataFrame:
    """The bf16 H100 rows of (framework, version, model) with a fixed concurrency, sorted."""
    d = pd.read_csv(aic / BF16_FILE)
    name, version, model = framework
    d = d[(d["framework"] == name) & (d["framework_version"].astype(str) == version) & (d["model"] == model)
          & d["concurrency"].notna() & (d["gpu"] == DEVICE)]
    return d.sort_values(["tp", "isl", "osl", "concurrency"]).reset_index(drop=True)


def kv_limited(model, device, tp: int, c: int, isl: int, osl: int) -> bool:
    """True when ``c`` requests of ``isl + osl`` tokens do not fit the KV cache (memory x 0.9 - weights)."""
    free = device.memory_bytes * KV_MEMORY_FRACTION - model.weight_bytes(tp)
    return c * (isl + osl) * model.kv_bytes_per_token(tp) > free


def closed_loop(cm, c: int, isl: int, osl: int, budget: int = TOKEN_BUDGET) -> tuple[float, float]:
    """(TTFT s, TPOT s) of the steady-state closed-loop model (module docstring) with cost model ``cm``."""
    ctx = isl + osl // 2
    dec = cm.iteration_time(BatchPlan.decodes([ctx] * c))
    base = cm.iteration_time(BatchPlan.decodes([ctx] * (c - 1))) if c > 1 else 0.0
    extra, done = 0.0, 0
    while done < isl:
        chunk = min(budget, isl - done)
        plan = BatchPlan(tuple(range(c)), (1,) * (c - 1) + (chunk,), (ctx,) * (c - 1) + (done,), c - 1)
        extra += cm.iteration_time(plan) - base
        done += chunk
    ttft, tpot = extra + dec, dec
    for _ in range(30):
        b = ttft - (c - 1) * extra - (osl - 1) * dec
        decode_phase = (-b + math.sqrt(b * b + 4 * (osl - 1) * dec * ttft)) / 2
        tpot = decode_phase / (osl - 1)
        ttft = extra + dec + 0.5 * tpot
    return ttft, tpot


def scaled(base: RooflineConstants, s_mm: float, s_attn: float, s_b: float, source: str) -> RooflineConstants:
    """``base`` with the GEMM compute efficiency x ``s_mm``, the attention one x ``s_attn`` and the bandwidth
    efficiencies x ``s_b``, each capped at 1; no iteration overhead (the engine profile charges it)."""
    new = {"matmul_compute_eff": min(1.0, base.matmul_compute_eff * s_mm),
           "attn_compute_eff": min(1.0, base.attn_compute_eff * s_attn)}
    new.update({k: min(1.0, getattr(base, k) * s_b) for k in BANDWIDTH_EFFS})
    return replace(base, source=source, iteration_overhead_s=None, iteration_overhead_per_seq_s=None, **new)


def predict(rows: pd.DataFrame, aic: Path, constants: RooflineConstants, engine: EngineProfile) -> np.ndarray:
    """Predicted TPOT (s) of every row."""
    device = load_device(DEVICE)
    models, out = {}, np.empty(len(rows))
    for i, r in enumerate(rows.itertuples(index=False)):
        key = (r.model, int(r.tp))
        if key not in models:
            models[key] = RooflineCostModel(model_for(r.model, aic), device, tp=int(r.tp), constants=constants,
                                            engine=engine)
        out[i] = closed_loop(models[key], int(r.concurrency), int(r.isl), int(r.osl))[1]
    return out


def usable(rows: pd.DataFrame, aic: Path) -> np.ndarray:
    """Mask of the rows whose requests fit the KV cache."""
    device = load_device(DEVICE)
    return np.array([not kv_limited(model_for(r.model, aic), device, int(r.tp), int(r.concurrency), int(r.isl),
                                    int(r.osl)) for r in rows.itertuples(index=False)])


def sig4(v: float) -> float:
    """4 significant digits; below a nanosecond (a bound the least squares only approaches) is 0."""
    return 0.0 if abs(v) < 1e-9 else float(f"{float(v):.4g}")


def _engine(name: str, fixed_s: float, per_seq_s: float, tp: int) -> EngineProfile:
    return EngineProfile(name, max(fixed_s, 0.0), max(per_seq_s, 0.0), measured_tp=tp, measured=True)


def fit_h100(aic: Path, base: RooflineConstants) -> dict:
    """Fit 1 (module docstring). Returns {"s_mm", "s_attn", "s_b", "fixed_s", "per_seq_s", "rows"}, 4 digits."""
    rows = aic_rows(aic, TRT)
    rows = rows[(rows["tp"] == FIT_TP["trtllm"]) & usable(rows, aic)].reset_index(drop=True)
    y = rows["tpot_ms"].to_numpy() / 1e3
    scale = np.array([1.0, 1.0, 1.0, 1e-3, 1e-5])          # overheads optimised in ms and 10 us

    def residual(z):
        s_mm, s_attn, s_b, fixed, per_seq = z * scale
        pred = predict(rows, aic, scaled(base, s_mm, s_attn, s_b, "fit"), _engine("trtllm-1.0", fixed, per_seq, 1))
        return np.log(pred / y)

    res = least_squares(residual, np.array([1.0, 1.0, 1.0, 0.5, 1.0]),
                        bounds=([0.2, 0.2, 0.2, 0.0, 0.0], [3.0, 4.0, 3.0, 20, 100]))
    s_mm, s_attn, s_b, fixed, per_seq = (sig4(v) for v in res.x * scale)
    return {"s_mm": s_mm, "s_attn": s_attn, "s_b": s_b, "fixed_s": fixed, "per_seq_s": per_seq, "rows": len(rows)}


def fit_vllm(aic: Path, constants: RooflineConstants) -> dict:
    """Fit 2 (module docstring). Returns {"fixed_s", "per_seq_s", "rows"}."""
    rows = aic_rows(aic, VLLM)
    rows = rows[(rows["tp"] == FIT_TP["vllm"]) & usable(rows, aic)].reset_index(drop=True)
    y = rows["tpot_ms"].to_numpy() / 1e3
    scale = np.array([1e-3, 1e-5])

    def residual(z):
        fixed, per_seq = z * scale
        return np.log(predict(rows, aic, constants, _engine("vllm-0.32", fixed, per_seq, 2)) / y)

    res = least_squares(residual, np.array([1.0, 1.0]), bounds=([0.0, 0.0], [50, 500]))
    fixed, per_seq = (sig4(v) for v in res.x * scale)
    return {"fixed_s": fixed, "per_seq_s": per_seq, "rows": len(rows)}


def error_table(aic: Path, framework: tuple, constants: RooflineConstants, engine: EngineProfile) -> pd.DataFrame:
    """Every row of ``framework``: tp, isl, osl, c, measured and predicted TPOT (ms), error %, used (fits the KV
    cache) and fitted (in the fit's TP)."""
    rows = aic_rows(aic, framework)
    ok = usable(rows, aic)
    pred = predict(rows, aic, constants, engine) * 1e3
    out = rows[["tp", "isl", "osl", "concurrency"]].rename(columns={"concurrency": "c"}).astype(int)
    out["measured_ms"], out["predicted_ms"] = rows["tpot_ms"].to_numpy(), pred
    out["error_pct"] = (pred / out["measured_ms"] - 1) * 100
    out["kv_fits"] = ok
    out["fitted"] = ok & (out["tp"] == FIT_TP[framework[0]])
    return out


def summary(table: pd.DataFrame) -> dict:
    """Median absolute % error by TP over the rows that fit the KV cache (and over the fitted rows)."""
    ok = table[table["kv_fits"]]
    by_tp = ok.groupby("tp")["error_pct"].apply(lambda s: float(np.median(np.abs(s))))
    return {"fitted": float(np.median(np.abs(table.loc[table["fitted"], "error_pct"]))),
            "rows_fitted": int(table["fitted"].sum()), "excluded_kv": int((~table["kv_fits"]).sum()),
            "by_tp": {int(k): float(v) for k, v in by_tp.items()}}


def calibrate(aic: Path, base: RooflineConstants) -> dict:
    """Both fits and their tables: {"constants": {...}, "trtllm": {...}, "vllm": {...}, "tables": {...}}."""
    h100 = fit_h100(aic, base)
    constants = scaled(base, h100["s_mm"], h100["s_attn"], h100["s_b"], "H100 fit")
    trt = _engine("trtllm-1.0", h100["fixed_s"], h100["per_seq_s"], FIT_TP["trtllm"])
    vllm_fit = fit_vllm(aic, constants)
    vllm = _engine("vllm-0.32", vllm_fit["fixed_s"], vllm_fit["per_seq_s"], FIT_TP["vllm"])
    tables = {"trtllm": error_table(aic, TRT, constants, trt), "vllm": error_table(aic, VLLM, constants, vllm)}
    first = {"trtllm": error_table(aic, TRT, RooflineConstants(), trt),
             "vllm": error_table(aic, VLLM, RooflineConstants(), vllm)}
    effs = ("matmul_compute_eff", "attn_compute_eff") + BANDWIDTH_EFFS
    return {"scales": h100, "constants": {k: sig4(getattr(constants, k)) for k in effs},
            "trtllm": trt, "vllm": vllm, "tables": tables, "first_estimate_tables": first}


def main():
    from cost_models.roofline import default_constants

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aic", default=str(default_aic_dir()))
    ap.add_argument("--base", default="A100-80GB-PCIe", help="device whose calibrated constants are scaled")
    args = ap.parse_args()
    aic = Path(args.aic)
    if not (aic / BF16_FILE).is_file():
        raise SystemExit(f"{aic / BF16_FILE}: AIC measurements not found (pass --aic)")
    out = calibrate(aic, default_constants(args.base))
    print("scales", out["scales"], "\nconstants", out["constants"])
    print(out["trtllm"].describe(), "\n", out["vllm"].describe())
    for k, t in out["tables"].items():
        print(k, summary(t), "first estimates:", summary(out["first_estimate_tables"][k]))
        print(t.round(1).to_string())


if __name__ == "__main__":
    main()
