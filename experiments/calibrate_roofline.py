"""Calibrate the roofline's efficiency constants against Vidur's A100 tables and write cost_models/calibration.py.

Data (``--vidur``, default ../shared/data/profiles/vidur, read through ``cost_models.vidur``):
  - per-token operators: Meta-Llama-3-8B (TP 1/2/4/8), Llama-2-7B and the legacy CodeLlama-34B-shaped table (TP 2);
  - attention: the legacy table, whose shape (hidden 8192, 64 query / 8 KV heads, TP 2) is CodeLlama-34B's, so the
    roofline prices exactly the measured shapes (no derived rows);
  - CPU overheads per iteration (legacy ``cpu_overheads.csv``).

Method: the roofline prices an operator as max(F / (peak x e_c), B / (bandwidth x e_b)) + launch, and an
iteration as the sum of its operators. The constants are fitted to what the simulator needs, iteration times:
for 234 batch plans inside the measured range (decode batches 1-128 at contexts 32-4000, prefill chunks 64-4096
after 0-3968 cached tokens, and Sarathi-style mixes of both) the reference is the Vidur-fitted model
(``cost_models.fitted`` on the same tables, within ~2% of them per operator) of (a) the CodeLlama-34B shape at
TP 2, whose attention was measured exactly, and (b) Llama-3-8B at TP 1, restricted to the operators Vidur measured
(not the KV-cache save, LM head or CPU overhead). The FLOP and byte terms of every plan and operator are read from
``RooflineCostModel`` itself (priced once with the bandwidth efficiencies set huge, once with the compute
efficiencies set huge), so no formula is repeated here. The nine constants (matmul/attention compute efficiency;
GEMM, decode-attention, residual-add, norm/RoPE/activation and embedding bandwidth efficiencies; kernel launch
overhead; fixed cost per attention call) minimise the squared log error of the plans' times plus, with the same
total weight, that of every raw table row (each operator weighted equally) — the plans make the sums right, the rows
keep each constant physical (``scipy.optimize.least_squares``). The elementwise operators get three bandwidth
efficiencies, not one, because the measurements need them: at 4096+ tokens Vidur's residual add moves its bytes at
~84% of HBM peak, RMSNorm at ~33%, SiLU-and-mul at ~48%, RoPE lower, and the embedding gather at ~14% (its byte
count, T rows read and written, is already the least it can move), so one efficiency left add at 111% and emb at 62%
median error. ``iteration_overhead_s`` and ``iteration_overhead_per_seq_s`` are the least-squares line through the
per-iteration CPU overhead Vidur measured at batch sizes 8-128 (schedule + sampler + prepare inputs + process
outputs; 1.2 ms at 8 sequences, 5.8 ms at 128). Errors are then recomputed through ``RooflineCostModel`` with the fitted constants: per plan, and per operator on the raw table
rows (Vidur's ``add`` is one residual add, the roofline's both, so it is compared with twice the measurement).

    python experiments/calibrate_roofline.py [--vidur DIR] [--write cost_models/calibration.py]
        [--vidur-model MODEL_DIR]   # a `servesim fit --from-vidur` folder for the comparison (else fitted here)

Prints the per-operator median absolute percentage error before and after, writes the constants with their
source, and compares roofline (before/after) and the Vidur-fitted model for Llama-3-8B on an A100.
"""
from __future__ import annotations

import argparse
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from cost_models.roofline import RooflineConstants, RooflineCostModel
from cost_models.specs import ModelSpec, load_device, load_model
from cost_models.vidur import read_vidur_profile

DEVICE = "A100-80GB-SXM"
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


def measured_rows(vidur: Path) -> pd.DataFrame:
    """Raw rows (operator, shape, measured seconds, spec, tp) for the per-operator error report."""
    parts = []
    for name, tps in (("Llama-3-8B", (1, 2, 4, 8)), ("Llama-2-7B", (1, 2, 4, 8))):
        for tp in tps:
            try:
                df, _ = read_vidur_profile(vidur, name, tp=tp, device=DEVICE)
            except ValueError:
                continue
            parts.append(df[df["operator"].isin(TOKEN_OPERATORS)].assign(spec=name))  # their attention is derived
    df, meta = read_vidur_profile(vidur, CODELLAMA_34B_TABLE, tp=2, device=DEVICE)
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


def row_times(rows: pd.DataFrame, constants: RooflineConstants) -> np.ndarray:
    """Per-layer (per-iteration for ``emb``) roofline seconds of every raw row with ``constants``."""
    device = load_device(DEVICE)
    models, out = {}, np.empty(len(rows))
    for i, r in enumerate(rows.itertuples(index=False)):
        key = (r.spec, r.tp)
        if key not in models:
            models[key] = RooflineCostModel(_spec(r.spec), device, tp=int(r.tp), constants=constants)
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


def reference_configs(vidur: Path):
    """(spec, tp, Vidur-fitted FittedCostModel) of the calibration references (see the module docstring)."""
    from cost_models.fitted import FittedCostModel, fit_profile

    device = load_device(DEVICE)
    out = []
    for spec, tp in ((CODELLAMA_34B_TABLE, 2), (load_model("Llama-3-8B"), 1)):
        df, meta = read_vidur_profile(vidur, spec, tp=tp, device=device)
        out.append((spec, tp, FittedCostModel(fit_profile(df, meta), spec, device, tp=tp)))
    return out


_NO_OVERHEAD = dict(launch_overhead_s=0, attn_call_overhead_s=0, iteration_overhead_s=0,
                    iteration_overhead_per_seq_s=0)
EXTREME = {"compute": RooflineConstants(matmul_compute_eff=1, attn_compute_eff=1, bandwidth_eff=1e30,
                                      attn_decode_bandwidth_eff=1e30, add_bandwidth_eff=1e30,
                                      norm_bandwidth_eff=1e30, emb_bandwidth_eff=1e30, **_NO_OVERHEAD),
           "memory": RooflineConstants(matmul_compute_eff=1e30, attn_compute_eff=1e30, bandwidth_eff=1,
                                       attn_decode_bandwidth_eff=1, add_bandwidth_eff=1, norm_bandwidth_eff=1,
                                       emb_bandwidth_eff=1, **_NO_OVERHEAD)}


def row_terms(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(FLOP seconds at peak, byte seconds at full bandwidth) of every raw row, read from the roofline."""
    return row_times(rows, EXTREME["compute"]), row_times(rows, EXTREME["memory"])


def row_predict(theta, rows, flops_s, bytes_s) -> np.ndarray:
    c = dict(zip(FIELDS, theta))
    ec = np.array([1.0 if OPERATOR_CONSTANTS[op][0] is None else c[OPERATOR_CONSTANTS[op][0]]
                   for op in rows["operator"]])
    eb = np.array([c[OPERATOR_CONSTANTS[op][1]] for op in rows["operator"]])
    call = np.where(rows["operator"].isin(ATTENTION_CALLS), c["attn_call_overhead_s"], 0.0)
    return np.maximum(flops_s / ec, bytes_s / eb) + c["launch_overhead_s"] + call


def plan_terms(configs, plans):
    """Per (config, plan): reference seconds, and per operator (FLOP seconds, byte seconds, launches)."""
    device = load_device(DEVICE)
    ref, terms = [], []
    for spec, tp, fitted in configs:
        flops_model = RooflineCostModel(spec, device, tp=tp, constants=EXTREME["compute"])
        bytes_model = RooflineCostModel(spec, device, tp=tp, constants=EXTREME["memory"])
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
    operator equally), so the sums match and every constant keeps a physical meaning."""
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
    return dict(zip(FIELDS, (res.x * scale).tolist()))


def plan_times(configs, plans, constants) -> np.ndarray:
    """Roofline seconds of the measured operators of every (config, plan), via RooflineCostModel."""
    device = load_device(DEVICE)
    out = []
    for spec, tp, fitted in configs:
        model = RooflineCostModel(spec, device, tp=tp, constants=constants)
        measured = [op for op in OPERATOR_CONSTANTS if op not in fitted.fallbacks]
        for plan in plans:
            bd = model.breakdown(plan)
            out.append(sum(bd[op] for op in measured if op in bd))
    return np.array(out)


def error_table(rows, before, after) -> pd.DataFrame:
    y = rows["time_median_s"].to_numpy()
    ape = pd.DataFrame({"operator": rows["operator"], "before": np.abs(before / y - 1) * 100,
                        "after": np.abs(after / y - 1) * 100})
    table = ape.groupby("operator").agg(rows=("before", "size"), before=("before", "median"),
                                        after=("after", "median"))
    table.loc["all operators"] = [len(ape), ape["before"].median(), ape["after"].median()]
    return table


def cpu_overhead(vidur: Path) -> tuple[float, float, float, float, float, int]:
    """CPU overhead per iteration = a + b x batch size, by least squares on Vidur's cpu_overheads rows.

    Returns (a s, b s per sequence, median APE % of the fit, P90 APE % of the fit, the first estimates' median
    APE %, rows)."""
    df, _ = read_vidur_profile(vidur, "Llama-3-8B", tp=1, device=DEVICE)
    rows = df[df["operator"] == "cpu_overhead"]
    b, t = rows["batch_size"].to_numpy(dtype=float), rows["time_median_s"].to_numpy()
    (a, per_seq), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(b), b]), t, rcond=None)
    first = RooflineConstants()
    ape = np.abs((a + per_seq * b) / t - 1) * 100
    ape_first = np.abs((first.iteration_overhead_s + first.iteration_overhead_per_seq_s * b) / t - 1) * 100
    return float(a), float(per_seq), float(np.median(ape)), float(np.percentile(ape, 90)), \
        float(np.median(ape_first)), len(t)


def write_calibration(path: Path, constants: dict, table: pd.DataFrame, overhead: tuple, vidur: Path):
    lines = [f"#   {op:<26} {int(r.rows):>6} {r.before:>7.1f}% {r.after:>7.1f}%" for op, r in table.iterrows()]
    # 4 significant digits: efficiencies are not known better, and reruns then write the same file
    body = "\n".join(f"        {k!r}: {float(f'{v:.4g}')!r}," for k, v in constants.items())
    text = f'''"""Roofline efficiency constants calibrated against measured profiles (generated; do not edit by hand).

Regenerate with ``python experiments/calibrate_roofline.py`` (see its docstring for the method).
``cost_models.roofline.default_constants(device_name)`` reads ``CALIBRATED[device_name]``.
"""
# Source: Vidur's A100-80GB profiling tables (microsoft/vidur, MIT licence), under
#   {vidur}/compute/a100/:
#   meta-llama/Meta-Llama-3-8B/mlp.csv                (per-token operators, TP 1/2/4/8)
#   meta-llama/Llama-2-7b-hf/mlp.csv                  (per-token operators)
#   legacy-e2d00e9/mlp.csv, attention.csv             (CodeLlama-34B shape at TP 2; FlashAttention)
#   legacy-e2d00e9/cpu_overheads.csv                  (per-iteration CPU overhead)
# Method: least squares of log(roofline / reference) over 234 batch plans (reference: the Vidur-fitted model of
# the CodeLlama-34B shape at TP 2 and of Llama-3-8B at TP 1, measured operators only) plus every raw table row
# (operators weighted equally), FLOP and byte terms taken from RooflineCostModel itself; residual add,
# norm/RoPE/activation and embedding have their own bandwidth efficiencies; attention pays a fixed cost per call;
# CPU overhead = iteration_overhead_s + iteration_overhead_per_seq_s x sequences, the least-squares line through
# the measured CPU overhead (schedule + sampler + prepare inputs + process outputs) at batch sizes 8-128.
# Median absolute percentage error of the roofline, first estimates -> calibrated (per operator on the raw rows;
# per iteration on the plan set):
#   operator                     rows   before    after
{chr(10).join(lines)}
#   CPU overhead per iteration   {overhead[5]:>4} {overhead[4]:>7.1f}% {overhead[2]:>7.1f}%  (P90 after {overhead[3]:.1f}%)
CALIBRATED = {{
    "{DEVICE}": {{
{body}
        "iteration_overhead_s": {float(f'{overhead[0]:.4g}')!r},
        "iteration_overhead_per_seq_s": {float(f'{overhead[1]:.4g}')!r},
        "source": "calibrated on Vidur A100 tables (cost_models/calibration.py)",
    }},
}}
'''
    path.write_text(text)


def comparison(constants: dict, overhead: tuple, vidur: Path, vidur_model: str | None):
    """Iteration times of Llama-3-8B on an A100: roofline before/after calibration and the Vidur-fitted model."""
    from cost_models.fitted import fit_profile, load_cost_model, read_fitted, FittedCostModel

    model, device = load_model("Llama-3-8B"), load_device(DEVICE)
    before = RooflineCostModel(model, device, constants=RooflineConstants())
    after = RooflineCostModel(model, device, constants=replace(
        RooflineConstants(), iteration_overhead_s=overhead[0], iteration_overhead_per_seq_s=overhead[1], **constants))
    if vidur_model:
        fitted = load_cost_model(vidur_model, model=model, device=device)
    else:
        df, meta = read_vidur_profile(vidur, model, tp=1, device=device)
        fitted = FittedCostModel(fit_profile(df, meta), model, device)
    shapes = [("decode b=1, ctx 1024", [(i, 1, 1024) for i in range(1)], 1),
              ("decode b=32, ctx 1024", [(i, 1, 1024) for i in range(32)], 32),
              ("decode b=128, ctx 1024", [(i, 1, 1024) for i in range(128)], 128),
              ("prefill chunk 512", [(0, 512, 0)], 0),
              ("prefill chunk 2048", [(0, 2048, 0)], 0)]
    print(f"\nLlama-3-8B on {DEVICE}, TP1: iteration time in ms (attention; CPU overhead)")
    print(f"{'shape':<24} {'roofline before':>23} {'roofline after':>23} {'Vidur-fitted':>23}")
    for label, entries, d in shapes:
        plan = SimpleNamespace(num_new_tokens=tuple(e[1] for e in entries), context_lens=tuple(e[2] for e in entries),
                               num_decodes=d)
        cells = []
        for cm in (before, after, fitted):
            bd = cm.breakdown(plan)
            attn = bd.get("attn_decode", 0.0) + bd.get("attn_prefill", 0.0)
            cells.append(f"{cm.iteration_time(plan) * 1e3:7.2f} ({attn * 1e3:5.2f}; {bd['cpu_overhead'] * 1e3:4.2f})")
        print(f"{label:<24} {cells[0]:>23} {cells[1]:>23} {cells[2]:>23}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vidur", default=str(Path(__file__).resolve().parents[2] / "shared/data/profiles/vidur"))
    ap.add_argument("--write", default=str(Path(__file__).resolve().parents[1] / "cost_models/calibration.py"))
    ap.add_argument("--vidur-model", help="a `servesim fit --from-vidur` folder for the comparison")
    args = ap.parse_args()
    vidur = Path(args.vidur)
    if not vidur.is_dir():
        raise SystemExit(f"{vidur}: Vidur tables not found (pass --vidur)")
    start = time.perf_counter()
    first = RooflineConstants()
    configs, plans = reference_configs(vidur), plan_set()
    ref, terms = plan_terms(configs, plans)
    rows = measured_rows(vidur)
    flops_s, bytes_s = row_terms(rows)
    constants = fit_constants(ref, terms, rows, flops_s, bytes_s, first)
    calibrated = replace(first, **constants)
    theta = [constants[f] for f in FIELDS]
    plan_before, plan_after = plan_times(configs, plans, first), plan_times(configs, plans, calibrated)
    rows_before, rows_after = row_times(rows, first), row_times(rows, calibrated)
    if not (np.allclose(plan_predict(theta, terms), plan_after, rtol=1e-6)
            and np.allclose(row_predict(theta, rows, flops_s, bytes_s), rows_after, rtol=1e-6)):
        raise SystemExit("OPERATOR_CONSTANTS no longer matches cost_models/roofline.py; update it")
    table = error_table(rows, rows_before, rows_after)
    plan_err = (np.abs(plan_before / ref - 1) * 100, np.abs(plan_after / ref - 1) * 100)
    table.loc["iterations (plan set)"] = [len(ref), np.median(plan_err[0]), np.median(plan_err[1])]
    table.loc["iterations, P90"] = [len(ref), np.percentile(plan_err[0], 90), np.percentile(plan_err[1], 90)]
    overhead = cpu_overhead(vidur)
    print(f"calibrated on {len(ref)} plans in {time.perf_counter() - start:.1f} s; median absolute % error:")
    print(textwrap.indent(table.to_string(float_format=lambda v: f"{v:.1f}"), "  "))
    print(f"  CPU overhead {overhead[0] * 1e3:.3f} ms + {overhead[1] * 1e3:.4f} ms/sequence: median APE "
          f"{overhead[4]:.1f}% -> {overhead[2]:.1f}% (P90 {overhead[3]:.1f}%) over {overhead[5]} batch sizes")
    print("constants: " + ", ".join(f"{k}={v:.4g}" for k, v in constants.items()))
    write_calibration(Path(args.write), constants, table, overhead, Path("../shared/data/profiles/vidur"))
    print(f"wrote {args.write}")
    comparison(constants, overhead, vidur, args.vidur_model)


if __name__ == "__main__":
    main()
