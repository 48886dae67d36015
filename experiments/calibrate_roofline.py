"""Calibrate the roofline's constants and the engine-overhead profiles on public measurements, and write
cost_models/calibration.py (constants per device, engine fits, every device's calibration status, error tables).

    python experiments/calibrate_roofline.py [--data ../shared/data] [--write cost_models/calibration.py]
        [--check]                   # regenerate in memory and fail (exit 1) if the file differs
        [--vidur-model MODEL_DIR]   # a `servesim fit --from-vidur` folder for the final comparison

Deterministic: the fits are seeded or closed-form, every number is written with 4 significant digits, and every error
table is computed from the *written* (rounded) numbers, so a rerun writes the same file and the file's tables can be
recomputed from its constants (``tests/test_calibration.py``).

**1. GPU constants from Vidur's A100 tables** (``DATA/profiles/vidur``, microsoft/vidur, MIT; read through
``profiler.vidur``): per-token operators of Meta-Llama-3-8B (TP 1/2/4/8), Llama-2-7B and the legacy CodeLlama-34B
table (TP 2), FlashAttention prefill/decode of the legacy table (CodeLlama-34B's shape, so the measured shapes are
priced exactly, no derived rows). Which A100: Vidur's node is ``a100_pairwise_nvlink`` (NVLink bridges between pairs:
PCIe cards, the Azure NC A100 v4 VMs the Sarathi-Serve artifact calls "A100 80GB PCIe"), so the tables most likely
describe **A100-80GB-PCIe**. They are fitted twice, with the same method and data:

- ``A100-80GB-PCIe``: against the PCIe datasheet (1,935 GB/s, 312 TFLOP/s) — the calibration of the card measured;
- ``A100-80GB-SXM``: against the SXM datasheet (2,039 GB/s, 312 TFLOP/s), exactly the fit it had before (its
  constants and so the capacity baseline are unchanged). Its status says the data was measured on A100-80GB-PCIe:
  SXM is priced at the speed the PCIe card was measured at (its ~5% more bandwidth and higher power limit are not
  credited; rescaling would make SXM's fit to these tables worse by construction).

Method: the roofline prices an operator as max(F / (peak x e_c), B / (bandwidth x e_b)) + launch, and an iteration
as the sum of its operators. The constants are fitted to what the simulator needs, iteration times: for 234 batch
plans inside the measured range (decode batches 1-128 at contexts 32-4000, prefill chunks 64-4096 after 0-3968
cached tokens, and Sarathi-style mixes of both) the reference is the Vidur-fitted model (``cost_models.fitted`` on
the same tables, within ~2% of them per operator) of (a) the CodeLlama-34B shape at TP 2, whose attention was measured
exactly, and (b) Llama-3-8B at TP 1, restricted to the operators Vidur measured (not the KV-cache save, LM head or
CPU overhead). The FLOP and byte terms of every plan and operator are read from ``RooflineCostModel`` itself (priced
once with the bandwidth efficiencies set huge, once with the compute efficiencies set huge), so no formula is
repeated here. The nine constants (matmul/attention compute efficiency; GEMM, decode-attention, residual-add,
norm/RoPE/activation and embedding bandwidth efficiencies, each <= 1; kernel launch overhead; fixed cost per
attention call) minimise the squared log error of the plans' times plus, with the same total weight, that of every
raw table row (each operator weighted equally) — the plans make the sums right, the rows keep each constant
physical (``scipy.optimize.least_squares``). The elementwise operators get three bandwidth efficiencies, not one,
because the measurements need them: at 4096+ tokens Vidur's residual add moves its bytes at ~84% of SXM's HBM peak,
RMSNorm at ~33%, SiLU-and-mul at ~48%, RoPE lower, and the embedding gather at ~14%. Errors are recomputed through
``RooflineCostModel``: per plan, and per operator on the raw rows (Vidur's ``add`` is one residual add, the
roofline's both, so it is compared with twice the measurement).

**2. Engine overhead profiles** (``cost_models/engine_overhead.py``; the numbers go to ``ENGINE_FITS``):

- ``vidur-vllm-2023``: the least-squares line a + b x B through Vidur's per-iteration CPU overhead (legacy
  ``cpu_overheads.csv``: schedule + sampler + prepare inputs + process outputs medians, batch 8-128, TP 2).
- ``sarathi-serve-2024``: the Sarathi-Serve artifact's Yi-34B TP2 batch times on 2xA100-80GB-PCIe
  (``DATA/measurements/sarathi_serve_artifact_yi34b_tp2_a100pcie.csv``: prefill-only 128-16384 tokens, decode-only
  batch 1-128 at 1024 context, one hybrid batch of 3 decodes + a 1021-token chunk; 19 rows): overhead = measured −
  the A100-80GB-PCIe roofline's GPU time (``engine="none"``, Yi-34B-200K, TP2 over the pair's NVLink,
  ``a100-pcie-pairwise-nvlink``), fitted as fixed + per_seq x B + per_token x T by least squares in relative error
  of the batch time with coefficients >= 0 (``scipy.optimize.lsq_linear``). The data holds TP 2 only, so no TP
  scaling is fitted.
- ``trtllm-1.0`` and ``vllm-0.32``: with the H100 calibration (3.).

**3. H100-SXM from AIConfigurator's end-to-end measurements** (``DATA/measurements/aic``;
``experiments/calibrate_aic.py`` has the closed-loop benchmark model and the fits): the A100-80GB-PCIe constants with the GEMM compute, attention
compute and bandwidth efficiencies scaled by three fitted factors, jointly with the ``trtllm-1.0`` profile, on TRT-LLM
Llama-3.1-8B TP1 bf16 TPOT; then ``vllm-0.32`` on vLLM 0.12.0 Qwen3-32B TP2 bf16 TPOT.

**4. The others are first estimates**, each with its reason in ``STATUS``: H200 (AIC's H200 rows are fp8 only, with
the KV-cache dtype not recorded) gets H100-SXM's calibrated efficiencies on its own datasheet (the same GH100 chip,
faster HBM3e); A40 and cpu keep ``RooflineConstants``' stated first estimates.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from scipy.optimize import least_squares, lsq_linear

sys.path.insert(0, str(Path(__file__).resolve().parent))        # calibrate_aic beside this file

from cost_models.engine_overhead import EngineProfile  # noqa: E402
from cost_models.plan import BatchPlan  # noqa: E402
from cost_models.roofline import RooflineConstants, RooflineCostModel  # noqa: E402
from cost_models.specs import ModelSpec, known_devices, load_device, load_model  # noqa: E402
from profiler.vidur import read_vidur_profile  # noqa: E402

VIDUR_DEVICES = ("A100-80GB-PCIe", "A100-80GB-SXM")
MEASURED_ON = "A100-80GB-PCIe"          # what Vidur's a100_pairwise_nvlink tables most likely measured
ARTIFACT_FILE = "measurements/sarathi_serve_artifact_yi34b_tp2_a100pcie.csv"
ARTIFACT_MODEL = "Yi-34B-200K"
ARTIFACT_NODE = "a100-pcie-pairwise-nvlink"
#: the engine overhead the roofline charged every uncalibrated device before engine profiles existed (the first
#: estimates of RooflineConstants then: the line through Vidur's cpu_overheads at 8 and 128 sequences) — the
#: "before" of the artifact table.
PREVIOUS_OVERHEAD_S = (0.85e-3, 0.039e-3)
FIELDS = ("matmul_compute_eff", "attn_compute_eff", "bandwidth_eff", "attn_decode_bandwidth_eff",
          "add_bandwidth_eff", "norm_bandwidth_eff", "emb_bandwidth_eff", "launch_overhead_s", "attn_call_overhead_s")
# Which constants price which operator in cost_models/roofline.py (compute efficiency, bandwidth efficiency);
# None = fixed at 1.0 there. Checked below by recomputing every prediction through RooflineCostModel.
OPERATOR_CONSTANTS = {
    **{op: ("matmul_compute_eff", "bandwidth_eff")
       for op in ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")},
    **{op: (None, "norm_bandwidth_eff")
       for op in ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act")},
    "add": (None, "add_bandwidth_eff"),
    "emb": (None, "emb_bandwidth_eff"),
    "attn_prefill": ("attn_compute_eff", "bandwidth_eff"),
    "attn_decode": ("attn_compute_eff", "attn_decode_bandwidth_eff"),
}
ONCE_PER_ITERATION = ("emb",)
ATTENTION_CALLS = ("attn_prefill", "attn_decode")   # pay attn_call_overhead_s once per layer
TOKEN_OPERATORS = [op for op in OPERATOR_CONSTANTS if op not in ("attn_prefill", "attn_decode")]
# CodeLlama-34B (codellama/CodeLlama-34b-hf config.json) with the legacy tables' vocabulary (32768).
CODELLAMA_34B_TABLE = ModelSpec(name="CodeLlama-34B (Vidur legacy table)", num_layers=48, hidden_size=8192,
                                num_attention_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=22016,
                                vocab_size=32768, max_model_len=4096)
FIRST_ESTIMATE_REASONS = {
    "H200": ("no bf16 measurements, AIC's H200 rows are fp8 with the KV-cache dtype not recorded; H100-SXM's "
             "calibrated efficiencies on the H200 datasheet"),
    "A40": "no public measurements in ../shared/data",
    "cpu": "order-of-magnitude figures; profile and fit the CPU instead: servesim profile --exec-device cpu",
}


def sig4(v: float) -> float:
    """``v`` rounded to 4 significant digits (what the file holds); below 1e-9 (a least-squares bound approached,
    sub-nanosecond) is 0."""
    return 0.0 if abs(v) < 1e-9 else float(f"{float(v):.4g}")


# --- 1. GPU constants from Vidur's tables ----------------------------------------------------------------------

def measured_rows(vidur: Path) -> pd.DataFrame:
    """Raw rows (operator, shape, measured seconds, spec, tp) for the per-operator error report."""
    parts = []
    for name, tps in (("Llama-3-8B", (1, 2, 4, 8)), ("Llama-2-7B", (1, 2, 4, 8))):
        for tp in tps:
            try:
                df, _ = read_vidur_profile(vidur, name, tp=tp, device=MEASURED_ON)
            except ValueError:
                continue
            parts.append(df[df["operator"].isin(TOKEN_OPERATORS)].assign(spec=name))  # their attention is derived
    df, meta = read_vidur_profile(vidur, CODELLAMA_34B_TABLE, tp=2, device=MEASURED_ON)
    if any("scaled per row" in n for n in meta["notes"]):
        raise SystemExit("legacy attention table does not match the CodeLlama-34B shape; refusing derived rows")
    parts.append(df[df["operator"].isin(list(OPERATOR_CONSTANTS))].assign(spec=CODELLAMA_34B_TABLE.name))
    rows = pd.concat(parts, ignore_index=True)
    rows = rows.groupby(["spec", "tp", "operator", "num_tokens", "chunk_size", "context_len", "batch_size",
                         "kv_len"], as_index=False)["time_median_s"].median()
    rows.loc[rows["operator"] == "add", "time_median_s"] *= 2    # roofline's add = both residual adds
    return rows


def _spec(name):
    return CODELLAMA_34B_TABLE if name == CODELLAMA_34B_TABLE.name else load_model(name)


def _plan(op, r):
    if op == "attn_prefill":
        return SimpleNamespace(num_new_tokens=(int(r.chunk_size),), context_lens=(int(r.context_len),),
                               num_decodes=0)
    if op == "attn_decode":
        b = int(r.batch_size)
        return SimpleNamespace(num_new_tokens=(1,) * b, context_lens=(int(r.kv_len) - 1,) * b, num_decodes=b)
    return SimpleNamespace(num_new_tokens=(int(r.num_tokens),), context_lens=(0,), num_decodes=0)


def row_times(rows: pd.DataFrame, constants: RooflineConstants, device: str) -> np.ndarray:
    """Per-layer (per-iteration for ``emb``) roofline seconds of every raw row with ``constants`` on ``device``."""
    spec = load_device(device)
    models, out = {}, np.empty(len(rows))
    for i, r in enumerate(rows.itertuples(index=False)):
        key = (r.spec, r.tp)
        if key not in models:
            models[key] = RooflineCostModel(_spec(r.spec), spec, tp=int(r.tp), constants=constants, engine="none")
        m = models[key]
        t = m.breakdown(_plan(r.operator, r))[r.operator]
        out[i] = t if r.operator in ONCE_PER_ITERATION else t / m.layers
    return out


def plan_set() -> list:
    """Batch plans inside the measured range: decodes, prefill chunks and Sarathi-style mixes."""
    plans = []
    for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128):
        for ctx in (32, 128, 512, 1024, 2048, 4000):
            plans.append(SimpleNamespace(num_new_tokens=(1,) * b, context_lens=(ctx,) * b, num_decodes=b))
    for c in (64, 128, 256, 512, 1024, 2048, 4096):
        for k in (0, 256, 1024, 2048, 3072):
            if c + k <= 4096:
                plans.append(SimpleNamespace(num_new_tokens=(c,), context_lens=(k,), num_decodes=0))
    for b in (8, 32, 64):
        for ctx in (256, 1024, 3000):
            for c, k in ((512 - b, 0), (512 - b, 1024), (256, 2048)):
                plans.append(SimpleNamespace(num_new_tokens=(1,) * b + (c,), context_lens=(ctx,) * b + (k,),
                                             num_decodes=b))
    return plans


#: Llama-3-8B's attention in the reference is derived from the legacy table's shape by the ratio of roofline times
#: (``profiler.vidur``), which read the default constants of the device passed. Pinned here — the A100-80GB-SXM
#: calibration of commit 046f835, with which the reference was first built — so that the reference, and hence every
#: fit, does not depend on the calibration.py being regenerated.
REFERENCE_RATIO_DEVICE = "A100-80GB-SXM"
REFERENCE_RATIO_CONSTANTS = RooflineConstants(
    matmul_compute_eff=0.6691, attn_compute_eff=0.2469, bandwidth_eff=0.6992, attn_decode_bandwidth_eff=0.7511,
    add_bandwidth_eff=0.9803, norm_bandwidth_eff=0.4249, emb_bandwidth_eff=0.1508, launch_overhead_s=2.749e-06,
    attn_call_overhead_s=1.479e-05, source="pinned reference-ratio constants (experiments/calibrate_roofline.py)")


def reference_configs(vidur: Path):
    """(spec, tp, Vidur-fitted FittedCostModel) of the calibration references (see the module docstring)."""
    from unittest import mock

    import cost_models.roofline
    from cost_models.fitted import FittedCostModel
    from cost_models.fitting import fit_profile

    device = load_device(REFERENCE_RATIO_DEVICE)
    out = []
    with mock.patch.object(cost_models.roofline, "default_constants", lambda name=None: REFERENCE_RATIO_CONSTANTS):
        for spec, tp in ((CODELLAMA_34B_TABLE, 2), (load_model("Llama-3-8B"), 1)):
            df, meta = read_vidur_profile(vidur, spec, tp=tp, device=device)
            out.append((spec, tp, FittedCostModel(fit_profile(df, meta), spec, device, tp=tp)))
    return out


_NO_OVERHEAD = dict(launch_overhead_s=0, attn_call_overhead_s=0)
EXTREME = {"compute": RooflineConstants(matmul_compute_eff=1, attn_compute_eff=1, bandwidth_eff=1e30,
                                      attn_decode_bandwidth_eff=1e30, add_bandwidth_eff=1e30,
                                      norm_bandwidth_eff=1e30, emb_bandwidth_eff=1e30, **_NO_OVERHEAD),
           "memory": RooflineConstants(matmul_compute_eff=1e30, attn_compute_eff=1e30, bandwidth_eff=1,
                                       attn_decode_bandwidth_eff=1, add_bandwidth_eff=1, norm_bandwidth_eff=1,
                                       emb_bandwidth_eff=1, **_NO_OVERHEAD)}


def row_terms(rows: pd.DataFrame, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(FLOP seconds at peak, byte seconds at full bandwidth) of every raw row, read from the roofline."""
    return row_times(rows, EXTREME["compute"], device), row_times(rows, EXTREME["memory"], device)


def row_predict(theta, rows, flops_s, bytes_s) -> np.ndarray:
    c = dict(zip(FIELDS, theta))
    ec = np.array([1.0 if OPERATOR_CONSTANTS[op][0] is None else c[OPERATOR_CONSTANTS[op][0]]
                   for op in rows["operator"]])
    eb = np.array([c[OPERATOR_CONSTANTS[op][1]] for op in rows["operator"]])
    call = np.where(rows["operator"].isin(ATTENTION_CALLS), c["attn_call_overhead_s"], 0.0)
    return np.maximum(flops_s / ec, bytes_s / eb) + c["launch_overhead_s"] + call


def plan_terms(configs, plans, device: str):
    """Per (config, plan): reference seconds, and per operator (FLOP seconds, byte seconds, launches)."""
    spec = load_device(device)
    ref, terms = [], []
    for model, tp, fitted in configs:
        flops_model = RooflineCostModel(model, spec, tp=tp, constants=EXTREME["compute"], engine="none")
        bytes_model = RooflineCostModel(model, spec, tp=tp, constants=EXTREME["memory"], engine="none")
        measured = [op for op in OPERATOR_CONSTANTS if op not in fitted.fallbacks]
        for plan in plans:
            bd = fitted.breakdown(plan)
            f, b = flops_model.breakdown(plan), bytes_model.breakdown(plan)
            ops = [op for op in measured if op in bd]
            ref.append(sum(bd[op] for op in ops))
            terms.append([(op, f[op], b[op], 1 if op in ONCE_PER_ITERATION else flops_model.layers) for op in ops])
    return np.array(ref), terms


def plan_predict(theta, terms) -> np.ndarray:
    c = dict(zip(FIELDS, theta))
    out = np.empty(len(terms))
    for i, ops in enumerate(terms):
        total = 0.0
        for op, f, b, launches in ops:
            ec_name, eb_name = OPERATOR_CONSTANTS[op]
            ec = 1.0 if ec_name is None else c[ec_name]
            fixed = c["launch_overhead_s"] + (c["attn_call_overhead_s"] if op in ATTENTION_CALLS else 0.0)
            total += max(f / ec, b / c[eb_name]) + launches * fixed
        out[i] = total
    return out


def fit_constants(ref, terms, rows, flops_s, bytes_s, start: RooflineConstants) -> dict:
    """Least squares of log errors: the plans' times (weight 1 in all) and the raw rows (weight 1 in all, each
    operator equally), so the sums match and every constant keeps a physical meaning. Returns 4-digit values."""
    y = rows["time_median_s"].to_numpy()
    ops = rows["operator"]
    row_weight = 1.0 / np.sqrt(ops.map(ops.value_counts()).to_numpy() * ops.nunique())
    x0 = np.array([getattr(start, f) for f in FIELDS])
    scale = np.array([1, 1, 1, 1, 1, 1, 1, 1e-6, 1e-6])      # overheads optimised in microseconds
    lo = np.array([0.02, 0.02, 0.05, 0.05, 0.02, 0.02, 0.02, 0.0, 0.0])
    hi = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 50.0, 100.0])

    def residual(z):
        theta = z * scale
        plans = np.log(plan_predict(theta, terms) / ref) / np.sqrt(len(ref))
        per_row = row_weight * np.log(row_predict(theta, rows, flops_s, bytes_s) / y)
        return np.concatenate([plans, per_row])

    res = least_squares(residual, x0 / scale, bounds=(lo, hi))
    return {k: sig4(v) for k, v in zip(FIELDS, res.x * scale)}


def plan_times(configs, plans, constants, device: str) -> np.ndarray:
    """Roofline seconds of the measured operators of every (config, plan), via RooflineCostModel."""
    spec = load_device(device)
    out = []
    for model, tp, fitted in configs:
        cm = RooflineCostModel(model, spec, tp=tp, constants=constants, engine="none")
        measured = [op for op in OPERATOR_CONSTANTS if op not in fitted.fallbacks]
        for plan in plans:
            bd = cm.breakdown(plan)
            out.append(sum(bd[op] for op in measured if op in bd))
    return np.array(out)


def operator_errors(rows: pd.DataFrame, before: np.ndarray, after: np.ndarray) -> dict:
    """{operator: [rows, median APE % before, after]} and ``all operators``, 4 significant digits."""
    y = rows["time_median_s"].to_numpy()
    ape = pd.DataFrame({"operator": rows["operator"], "before": np.abs(before / y - 1) * 100,
                        "after": np.abs(after / y - 1) * 100})
    out = {op: [int(len(g)), sig4(g["before"].median()), sig4(g["after"].median())]
           for op, g in ape.groupby("operator")}
    out["all operators"] = [int(len(ape)), sig4(ape["before"].median()), sig4(ape["after"].median())]
    return out


def calibrate_vidur(device: str, configs, plans, rows) -> dict:
    """Fit ``device``'s constants to the Vidur tables; the error tables are recomputed with the 4-digit values."""
    first = RooflineConstants()
    ref, terms = plan_terms(configs, plans, device)
    flops_s, bytes_s = row_terms(rows, device)
    constants = fit_constants(ref, terms, rows, flops_s, bytes_s, first)
    calibrated = replace(first, **constants)
    theta = [constants[f] for f in FIELDS]
    plan_before, plan_after = plan_times(configs, plans, first, device), plan_times(configs, plans, calibrated, device)
    rows_before, rows_after = row_times(rows, first, device), row_times(rows, calibrated, device)
    if not (np.allclose(plan_predict(theta, terms), plan_after, rtol=1e-6)
            and np.allclose(row_predict(theta, rows, flops_s, bytes_s), rows_after, rtol=1e-6)):
        raise SystemExit("OPERATOR_CONSTANTS no longer matches cost_models/roofline.py; update it")
    pb, pa = np.abs(plan_before / ref - 1) * 100, np.abs(plan_after / ref - 1) * 100
    return {"constants": constants, "operators": operator_errors(rows, rows_before, rows_after),
            "iterations": [len(ref), sig4(np.median(pb)), sig4(np.median(pa)), sig4(np.percentile(pb, 90)),
                           sig4(np.percentile(pa, 90))]}


# --- 2. engine overheads ----------------------------------------------------------------------------------------

def cpu_overhead(vidur: Path) -> dict:
    """Vidur's CPU overhead per iteration = a + b x batch size, by least squares on its cpu_overheads rows."""
    df, _ = read_vidur_profile(vidur, "Llama-3-8B", tp=1, device=MEASURED_ON)
    rows = df[df["operator"] == "cpu_overhead"]
    b, t = rows["batch_size"].to_numpy(dtype=float), rows["time_median_s"].to_numpy()
    (a, per_seq), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(b), b]), t, rcond=None)
    a, per_seq = sig4(a), sig4(per_seq)
    ape = np.abs((a + per_seq * b) / t - 1) * 100
    ape_first = np.abs((PREVIOUS_OVERHEAD_S[0] + PREVIOUS_OVERHEAD_S[1] * b) / t - 1) * 100
    return {"fixed_s": a, "per_seq_s": per_seq, "per_token_s": 0.0, "measured_tp": 2,
            "median_abs_error": sig4(np.median(ape)), "p90_abs_error": sig4(np.percentile(ape, 90)),
            "previous_median_abs_error": sig4(np.median(ape_first)), "rows": int(len(t))}


def artifact_rows(data: Path) -> pd.DataFrame:
    path = data / ARTIFACT_FILE
    if not path.is_file():
        raise SystemExit(f"{path}: Sarathi-Serve artifact measurements not found (pass --data)")
    return pd.read_csv(path)


def artifact_plan(r) -> BatchPlan:
    """The batch of one artifact row: a prefill of the prompt, decodes at 1024 context, or the hybrid batch (3
    decodes at 1024 context + a 1021-token chunk)."""
    if r.kind == "prefill":
        return BatchPlan.prefill(int(r.prompt_tokens))
    if r.kind == "decode":
        return BatchPlan.decodes([int(r.context_tokens)] * int(r.batch_size))
    if r.kind == "hybrid":
        d = int(r.num_decode_tokens)
        return BatchPlan(tuple(range(d + 1)), (1,) * d + (int(r.num_prefill_tokens),),
                         (int(r.context_tokens),) * d + (0,), d)
    raise SystemExit(f"{ARTIFACT_FILE}: unknown kind {r.kind!r}")


def artifact_model(constants: RooflineConstants, engine) -> RooflineCostModel:
    from cost_models.topology import load_node, place

    return RooflineCostModel(ARTIFACT_MODEL, "A100-80GB-PCIe", tp=2, constants=constants, engine=engine,
                             placement=place(load_node(ARTIFACT_NODE), 2, 1))


def artifact_table(rows: pd.DataFrame, before: RooflineCostModel, gpu: RooflineCostModel,
                   after: RooflineCostModel) -> list:
    """[shape, B, T, measured ms, before ms, GPU-only ms, after ms, after error %] per row (4 digits)."""
    out = []
    for r in rows.itertuples(index=False):
        p = artifact_plan(r)
        if r.kind == "prefill":
            shape = f"prefill {int(r.prompt_tokens)}"
        elif r.kind == "decode":
            shape = f"decode bs {int(r.batch_size)} ctx {int(r.context_tokens)}"
        else:
            shape = f"hybrid {int(r.num_prefill_tokens)} + {int(r.num_decode_tokens)} decodes"
        shape += " (table-2)" if "table-2" in str(r.source) else ""
        y = float(r.batch_time_s)
        t_after = after.iteration_time(p)
        out.append([shape, len(p), sum(p.num_new_tokens), sig4(y * 1e3), sig4(before.iteration_time(p) * 1e3),
                    sig4(gpu.iteration_time(p) * 1e3), sig4(t_after * 1e3), sig4((t_after / y - 1) * 100)])
    return out


def fit_sarathi(rows: pd.DataFrame, constants: RooflineConstants) -> dict:
    """fixed + per_seq x B + per_token x T >= 0 minimising sum ((GPU + overhead) / measured - 1)^2."""
    gpu_model = artifact_model(constants, "none")
    plans = [artifact_plan(r) for r in rows.itertuples(index=False)]
    y = rows["batch_time_s"].to_numpy(dtype=float)
    g = np.array([gpu_model.iteration_time(p) for p in plans])
    design = np.array([[1.0, len(p), sum(p.num_new_tokens)] for p in plans])
    res = lsq_linear(design / y[:, None], (y - g) / y, bounds=(0.0, np.inf), method="bvls")
    fixed, per_seq, per_token = (sig4(v) for v in res.x)
    pred = g + design @ np.array([fixed, per_seq, per_token])
    ape = np.abs(pred / y - 1) * 100
    return {"fixed_s": fixed, "per_seq_s": per_seq, "per_token_s": per_token, "measured_tp": 2,
            "median_abs_error": sig4(np.median(ape)), "p90_abs_error": sig4(np.percentile(ape, 90)),
            "rows": int(len(y))}


def _profile(name: str, fit: dict) -> EngineProfile:
    return EngineProfile(name, fit["fixed_s"], fit["per_seq_s"], fit.get("per_token_s", 0.0),
                         measured_tp=fit["measured_tp"], measured=True)


# --- 3. H100 from AIC -------------------------------------------------------------------------------------------

def calibrate_h100(aic: Path, base: RooflineConstants) -> dict:
    """The AIC fits (experiments/calibrate_aic.py) with 4-digit numbers and their error summaries."""
    import calibrate_aic as A

    out = A.calibrate(aic, base)
    constants = {k: sig4(v) for k, v in out["constants"].items()}
    h100 = replace(base, source="H100", **constants)
    trt = {"fixed_s": sig4(out["trtllm"].fixed_s), "per_seq_s": sig4(out["trtllm"].per_seq_s), "per_token_s": 0.0,
           "measured_tp": A.FIT_TP["trtllm"]}
    vllm = {"fixed_s": sig4(out["vllm"].fixed_s), "per_seq_s": sig4(out["vllm"].per_seq_s), "per_token_s": 0.0,
            "measured_tp": A.FIT_TP["vllm"]}
    tables, summaries = {}, {}
    for key, framework, fit in (("trtllm", A.TRT, trt), ("vllm", A.VLLM, vllm)):
        name = "trtllm-1.0" if key == "trtllm" else "vllm-0.32"
        t = A.error_table(aic, framework, h100, _profile(name, fit))
        first = A.error_table(aic, framework, RooflineConstants(), _profile(name, fit))
        s, s0 = A.summary(t), A.summary(first)
        fit.update(median_abs_error=sig4(s["fitted"]), rows=s["rows_fitted"])
        summaries[key] = {"framework": " ".join(framework), "fitted_tp": A.FIT_TP[key], "rows_fitted": s["rows_fitted"],
                          "excluded_kv_limited": s["excluded_kv"],
                          "by_tp_after": {tp: sig4(v) for tp, v in s["by_tp"].items()},
                          "by_tp_first_estimates": {tp: sig4(v) for tp, v in s0["by_tp"].items()}}
        tables[key] = t
        fits_tp4_8 = t[t["kv_fits"] & (t["tp"] >= 4)]["error_pct"]
        summaries[key]["tp4_8_after"] = sig4(np.median(np.abs(fits_tp4_8)))
    both = pd.concat([tables["trtllm"], tables["vllm"]])
    wide = both[both["kv_fits"] & (both["tp"] >= 4)]["error_pct"]
    return {"constants": constants, "scales": {k: out["scales"][k] for k in ("s_mm", "s_attn", "s_b")},
            "trtllm-1.0": trt, "vllm-0.32": vllm, "summaries": summaries,
            "tp4_8_after": sig4(np.median(np.abs(wide))), "tables": tables}


# --- status and the file ------------------------------------------------------------------------------------------

def statuses(vidur_fits: dict, sarathi: dict, h100: dict | None) -> dict:
    """STATUS of every built-in device (see cost_models.roofline.calibration_status)."""
    pcie, sxm = vidur_fits["A100-80GB-PCIe"], vidur_fits["A100-80GB-SXM"]
    out = {
        "A100-80GB-PCIe": {
            "calibrated": True,
            "against": "Vidur A100 tables (per-operator kernels) + Sarathi-Serve artifact (Yi-34B TP2 batches)",
            "median_abs_error": pcie["operators"]["all operators"][2],
            "errors": {"per operator, Vidur": pcie["operators"]["all operators"][2],
                       "per iteration, Vidur plan set": pcie["iterations"][2],
                       "artifact batches, engine sarathi-serve-2024": sarathi["median_abs_error"]},
            "measured_on": None,
            "note": "Vidur's node a100_pairwise_nvlink = PCIe cards with NVLink bridges (../shared/data/README.md)"},
        "A100-80GB-SXM": {
            "calibrated": True, "against": "Vidur A100 tables (per-operator kernels)",
            "median_abs_error": sxm["operators"]["all operators"][2],
            "errors": {"per operator, Vidur": sxm["operators"]["all operators"][2],
                       "per iteration, Vidur plan set": sxm["iterations"][2]},
            "measured_on": MEASURED_ON,
            "note": ("fitted to the SXM datasheet peaks, so SXM is priced at the speed the PCIe card was measured at "
                     "(SXM's ~5% more bandwidth and higher power limit are not credited)")},
    }
    if h100:
        s = h100["summaries"]
        out["H100-SXM"] = {
            "calibrated": True,
            "against": "AIConfigurator end-to-end TPOT (TRT-LLM 1.0 Llama-3.1-8B, vLLM 0.12 Qwen3-32B; bf16)",
            "median_abs_error": s["trtllm"]["by_tp_after"][1],
            "errors": {"TRT-LLM TP1 (fitted)": s["trtllm"]["by_tp_after"][1],
                       "TRT-LLM TP2": s["trtllm"]["by_tp_after"][2],
                       "vLLM TP2 (engine fitted)": s["vllm"]["by_tp_after"][2],
                       "TP4-8, ring all-reduce latency": h100["tp4_8_after"]},
            "measured_on": None,
            "note": ("3 scale factors on the A100-80GB-PCIe efficiencies, fitted through a closed-loop benchmark "
                     "model (experiments/calibrate_aic.py); TP4-8 are over-predicted at small batches because the "
                     "roofline's ring all-reduce pays 2(p-1) link latencies per call")}
    for name in known_devices():
        if name not in out:
            out[name] = {"calibrated": False, "against": None, "median_abs_error": None, "errors": {},
                         "measured_on": None, "reason": FIRST_ESTIMATE_REASONS.get(name, "no public measurements")}
    return dict(sorted(out.items()))


def _string(text: str, indent: int, width: int = 120) -> str:
    """``repr(text)``, or a parenthesised concatenation of pieces cut at spaces when the line would be too long."""
    if indent + 40 + len(repr(text)) <= width:
        return repr(text)
    pieces, cur = [], ""
    for word in text.split(" "):
        nxt = f"{cur} {word}" if cur else word
        if cur and indent + 8 + len(repr(nxt + " ")) > width:
            pieces.append(cur + " ")
            cur = word
        else:
            cur = nxt
    pieces.append(cur)
    pad = " " * (indent + 8)
    return "(\n" + "\n".join(pad + repr(p) for p in pieces) + "\n" + " " * (indent + 4) + ")"


def literal(obj, indent: int = 0) -> str:
    """A deterministic Python literal: dicts one key per line, lists of scalars on one line, lines <= 120."""
    pad = " " * indent
    if isinstance(obj, str):
        return _string(obj, indent)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}    {k!r}: {literal(v, indent + 4)}," for k, v in obj.items()]
        return "{\n" + "\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ", ".join(literal(v) for v in obj) + "]"
        return "[\n" + "\n".join(f"{pad}    {literal(v, indent + 4)}," for v in obj) + f"\n{pad}]"
    if isinstance(obj, float):
        return repr(sig4(obj))
    if isinstance(obj, (np.integer,)):
        return repr(int(obj))
    if isinstance(obj, (np.floating,)):
        return repr(sig4(float(obj)))
    return repr(obj)


def render(data: dict) -> str:
    """The text of cost_models/calibration.py."""
    lines = []
    for dev, fit in data["vidur"].items():
        lines.append(f"#   {dev}: median absolute % error per operator on Vidur's raw rows, first estimates -> "
                     f"calibrated:")
        lines += [f"#     {op:<26} {n:>6} {b:>7.1f}% {a:>7.1f}%" for op, (n, b, a) in fit["operators"].items()]
        n, b, a, b90, a90 = fit["iterations"]
        lines.append(f"#     {'iterations (plan set)':<26} {n:>6} {b:>7.1f}% {a:>7.1f}%  "
                     f"(P90 {b90:.1f}% -> {a90:.1f}%)")
    table = "\n".join(lines)
    art = "\n".join(f"#   {row[0]:<34} {row[3]:>8.1f} {row[4]:>8.1f} {row[5]:>8.1f} {row[6]:>8.1f} {row[7]:>+7.1f}%"
                    for row in data["artifact"])
    return f'''"""Roofline constants, engine-overhead fits and calibration status (generated; do not edit by hand).

Regenerate with ``python experiments/calibrate_roofline.py`` (its docstring has the data and the method); ``--check``
fails when this file is not what the data gives. Read by ``cost_models.roofline`` (``default_constants``,
``calibration_status``) and ``cost_models.engine_overhead`` (``PROFILES``). Numbers have 4 significant digits; the
tables in ``TABLES`` are recomputed from them (``tests/test_calibration.py``). Seconds; errors in percent.
"""
# Data (../shared/data): profiles/vidur/compute/a100 (microsoft/vidur, MIT: Meta-Llama-3-8B and Llama-2-7b-hf mlp.csv,
# legacy-e2d00e9 mlp/attention/cpu_overheads.csv), measurements/sarathi_serve_artifact_yi34b_tp2_a100pcie.csv
# (microsoft/sarathi-serve, MIT), measurements/aic (ai-dynamo/aiconfigurator silicon sample, Apache-2.0).
{table}
# Sarathi-Serve artifact, Yi-34B-200K TP2 on 2xA100-80GB-PCIe (NVLink pair), ms: measured; before (first estimates
# + the previous {PREVIOUS_OVERHEAD_S[0] * 1e3:.2f} ms + {PREVIOUS_OVERHEAD_S[1] * 1e3:.3f} ms/sequence);
# GPU only (calibrated, engine none); after (calibrated + engine sarathi-serve-2024); error after:
{art}
CALIBRATED = {literal(data["calibrated"])}

ENGINE_FITS = {literal(data["engine_fits"])}

STATUS = {literal(data["status"])}

TABLES = {literal(data["tables"])}
'''


def comparison(calibrated: dict, vidur: Path, vidur_model: str | None):
    """Iteration times of Llama-3-8B on an A100-80GB-PCIe: roofline first estimates / calibrated, Vidur-fitted; and
    a Mistral-7B prefill on each GPU with the file just written."""
    import importlib

    import cost_models.calibration
    import cost_models.engine_overhead
    from cost_models.fitted import FittedCostModel, load_cost_model
    from cost_models.fitting import fit_profile

    importlib.reload(cost_models.calibration)
    importlib.reload(cost_models.engine_overhead)

    model, device = load_model("Llama-3-8B"), load_device(MEASURED_ON)
    before = RooflineCostModel(model, device, constants=RooflineConstants())
    after = RooflineCostModel(model, device, constants=replace(RooflineConstants(), **calibrated[MEASURED_ON]))
    if vidur_model:
        fitted = load_cost_model(vidur_model, model=model, device=device)
    else:
        df, meta = read_vidur_profile(vidur, model, tp=1, device=device)
        fitted = FittedCostModel(fit_profile(df, meta), model, device)
    shapes = [(f"decode b={b}, ctx 1024", BatchPlan.decodes([1024] * b)) for b in (1, 32, 128)] + \
        [(f"prefill chunk {n}", BatchPlan.prefill(n)) for n in (512, 2048)]
    print(f"\nLlama-3-8B on {MEASURED_ON}, TP1: iteration time in ms (attention; CPU overhead)")
    print(f"{'shape':<24} {'roofline before':>23} {'roofline after':>23} {'Vidur-fitted':>23}")
    for label, plan in shapes:
        cells = []
        for cm in (before, after, fitted):
            bd = cm.breakdown(plan)
            attn = bd.get("attn_decode", 0.0) + bd.get("attn_prefill", 0.0)
            cells.append(f"{cm.iteration_time(plan) * 1e3:7.2f} ({attn * 1e3:5.2f}; {bd['cpu_overhead'] * 1e3:4.2f})")
        print(f"{label:<24} {cells[0]:>23} {cells[1]:>23} {cells[2]:>23}")
    p = BatchPlan.prefill(512)
    times = {d: RooflineCostModel("Mistral-7B", d).iteration_time(p) for d in ("A100-80GB-PCIe", "A100-80GB-SXM",
                                                                                "H100-SXM", "H200")}
    print("Mistral-7B 512-token prefill, ms (calibrated defaults): " +
          ", ".join(f"{d} {t * 1e3:.1f}" for d, t in times.items()) +
          f"; H100 / A100-PCIe speed-up {times['A100-80GB-PCIe'] / times['H100-SXM']:.2f}x")


def build(data_dir: Path) -> tuple[dict, dict]:
    """Everything calibration.py holds, and extra tables for printing."""
    vidur = data_dir / "profiles/vidur"
    if not vidur.is_dir():
        raise SystemExit(f"{vidur}: Vidur tables not found (pass --data)")
    start = time.perf_counter()
    configs, plans, rows = reference_configs(vidur), plan_set(), measured_rows(vidur)
    vidur_fits = {dev: calibrate_vidur(dev, configs, plans, rows) for dev in VIDUR_DEVICES}
    print(f"Vidur fits of {', '.join(VIDUR_DEVICES)} on {len(plans)} plans x 2 references and {len(rows)} rows "
          f"in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    pcie = replace(RooflineConstants(), **vidur_fits["A100-80GB-PCIe"]["constants"])
    cpu = cpu_overhead(vidur)
    art = artifact_rows(data_dir)
    sarathi = fit_sarathi(art, pcie)
    previous = replace(RooflineConstants(), iteration_overhead_s=PREVIOUS_OVERHEAD_S[0],
                       iteration_overhead_per_seq_s=PREVIOUS_OVERHEAD_S[1])
    art_table = artifact_table(art, artifact_model(previous, None), artifact_model(pcie, "none"),
                               artifact_model(pcie, _profile("sarathi-serve-2024", sarathi)))
    aic = data_dir / "measurements/aic"
    h100 = calibrate_h100(aic, pcie) if aic.is_dir() else None
    if h100 is None:
        print(f"{aic}: AIC measurements not found; H100-SXM stays on first estimates", file=sys.stderr)
    src = "(cost_models/calibration.py)"
    calibrated = {
        "A100-80GB-PCIe": {**vidur_fits["A100-80GB-PCIe"]["constants"],
                           "source": f"calibrated on Vidur A100 tables {src}"},
        "A100-80GB-SXM": {**vidur_fits["A100-80GB-SXM"]["constants"],
                          "source": f"calibrated on Vidur A100 tables, measured on A100-80GB-PCIe {src}"},
    }
    engine_fits = {"vidur-vllm-2023": cpu, "sarathi-serve-2024": sarathi}
    tables = {"vidur_operators": {d: f["operators"] for d, f in vidur_fits.items()},
              "vidur_iterations": {d: f["iterations"] for d, f in vidur_fits.items()},
              "artifact": art_table}
    if h100:
        h = {**vidur_fits["A100-80GB-PCIe"]["constants"], **h100["constants"]}
        calibrated["H100-SXM"] = {**h, "source": f"calibrated on AIConfigurator end-to-end TPOT {src}"}
        calibrated["H200"] = {**h, "source": f"first estimates: H100-SXM's calibrated efficiencies {src}"}
        engine_fits["trtllm-1.0"], engine_fits["vllm-0.32"] = h100["trtllm-1.0"], h100["vllm-0.32"]
        tables["aic"] = {"scales": h100["scales"], **h100["summaries"]}
    data = {"calibrated": calibrated, "engine_fits": engine_fits, "status": statuses(vidur_fits, sarathi, h100),
            "tables": tables, "vidur": vidur_fits, "artifact": art_table}
    return data, {"h100": h100, "cpu": cpu}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    ap.add_argument("--write", default=str(Path(__file__).resolve().parents[1] / "cost_models/calibration.py"))
    ap.add_argument("--check", action="store_true", help="fail if --write's file differs from what the data gives")
    ap.add_argument("--vidur-model", help="a `servesim fit --from-vidur` folder for the comparison")
    args = ap.parse_args()
    data, extra = build(Path(args.data))
    text = render(data)
    path = Path(args.write)
    if args.check:
        same = path.is_file() and path.read_text() == text
        print(f"{path}: {'up to date' if same else 'DIFFERS from what the data gives; rerun without --check'}")
        raise SystemExit(0 if same else 1)
    for dev, fit in data["vidur"].items():
        print(f"\n{dev}: median absolute % error (rows, first estimates, calibrated)")
        print(textwrap.indent(pd.DataFrame(fit["operators"], index=["rows", "before", "after"]).T.to_string(), "  "))
        print("  iterations (plan set): n, before, after, P90 before, P90 after:", fit["iterations"])
        print("  constants: " + ", ".join(f"{k}={v:.4g}" for k, v in fit["constants"].items()))
    for name, fit in data["engine_fits"].items():
        print(f"engine {name}: {fit}")
    print("\nSarathi-Serve artifact (ms): shape, B, T, measured, before, GPU only, after, error after %")
    for row in data["artifact"]:
        print("  ", row)
    if extra["h100"]:
        for key, t in extra["h100"]["tables"].items():
            print(f"\nAIC {key}: {data['tables']['aic'][key]}")
    path.write_text(text)
    print(f"wrote {path}")
    comparison(data["calibrated"], Path(args.data) / "profiles/vidur", args.vidur_model)


if __name__ == "__main__":
    main()
