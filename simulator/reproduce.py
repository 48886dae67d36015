"""``servesim reproduce``: the Sarathi-Serve paper's results (Agrawal et al., OSDI'24 §5) side by side with
servesim's, in one Markdown report.

Three parts, each run from the paper's setup (``experiments/configs/reproduce/*.yaml``; facts from
``../shared/data/measurements/README.md``, which cites the paper and its artifact):

1. **Capacity matrix** — Mistral-7B on 1 A100, Yi-34B on 2 A100 (TP2), LLaMA2-70B on 8 A40 (TP4-PP2), Falcon-180B on
   2 x 4 A100 (TP4-PP2, and vLLM at TP8) x openchat_sharegpt4 / arxiv_summarization x strict / relaxed SLO x vLLM
   (the paper's prefill-first v0 engine), Orca and Sarathi-Serve at the paper's budgets and batch caps, 2048
   requests per trial. Each is a resumable sweep (``simulator.sweep``) into ``OUT/<setup>/``.
2. **Table 4's ablation** — Yi-34B on 2 A100, 128 requests at 1.0 QPS (openchat) and 0.5 QPS (arxiv): median TTFT
   and P99 TBT of hybrid batching only (Sarathi-Serve with a budget of the whole max length), chunked prefills only
   (``simple-chunking``, chunk 512) and Sarathi-Serve (512).
3. **Batch times** — the artifact's measured Yi-34B TP2 A100-PCIe prefill, decode and hybrid batch times against
   the cost model's.

The report gives the paper's value (text ratios exact, figure readings approximate) next to servesim's and marks
ratios more than 25% off. ``quick`` runs a small subset (64 requests per trial, one setup) for tests.
The engine's per-iteration overhead uses the ``engine`` set in the configs (the Sarathi-Serve 2024 implementation
the paper measured, where ``cost_models.engine_overhead`` has it).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "reproduce"
MEASUREMENTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "measurements"
SETUPS = {"mistral": "mistral7b_1xa100", "yi": "yi34b_2xa100_tp2", "llama": "llama2_70b_8xa40_tp4pp2",
          "falcon": "falcon180b_2x4xa100"}
PAPER_SOURCE = "Agrawal et al., OSDI'24 §5 (text ratios exact; figure readings approximate, measurements README)"

#: the paper's capacities (QPS, figure readings) keyed by (setup, trace, slo level, deployment)
PAPER_CAPACITY = {
    ("mistral", "sharegpt", "strict", "sarathi"): 2.05, ("mistral", "sharegpt", "relaxed", "sarathi"): 2.25,
    ("falcon", "sharegpt", "strict", "sarathi tp4-pp2"): 0.62, ("falcon", "sharegpt", "relaxed", "sarathi tp4-pp2"): 0.75,
    ("falcon", "sharegpt", "strict", "vllm-v0 tp8"): 0.14, ("falcon", "sharegpt", "relaxed", "vllm-v0 tp8"): 0.15,
    ("falcon", "sharegpt", "strict", "vllm-v0 tp4-pp2"): 0.18, ("falcon", "sharegpt", "relaxed", "vllm-v0 tp4-pp2"): 0.50,
    ("llama", "sharegpt", "relaxed", "sarathi"): 0.83, ("llama", "sharegpt", "relaxed", "orca"): 0.13,
}
#: the paper's capacity ratios (Sarathi-Serve over a baseline) keyed by (setup, trace, slo level, baseline)
PAPER_RATIO = {
    ("mistral", "sharegpt", "strict", "vllm-v0"): (2.6, "text: up to 2.6x"),
    ("mistral", "sharegpt", "relaxed", "vllm-v0"): (2.15, "figure reading"),
    ("yi", "sharegpt", "strict", "vllm-v0"): (3.7, "text: up to 3.7x"),
    ("yi", "sharegpt", "strict", "orca"): (4.0, "text: up to 4.0x"),
    ("llama", "sharegpt", "strict", "vllm-v0"): (4.3, "text: up to 4.3x"),
    ("llama", "sharegpt", "strict", "orca"): (6.3, "text: up to 6.3x"),
    ("falcon", "sharegpt", "strict", "vllm-v0 tp8"): (4.3, "text: 4.3x"),
    ("falcon", "sharegpt", "strict", "vllm-v0 tp4-pp2"): (3.6, "text: 3.6x"),
    ("falcon", "sharegpt", "relaxed", "vllm-v0 tp4-pp2"): (1.48, "text: 1.48x"),
}
#: why a ratio is known to be more than 25% off the paper's, keyed as ``PAPER_RATIO`` (the report prints the reason
#: beside the ratio; a marked ratio without one is listed as unexplained)
KNOWN_DEVIATIONS = {
    ("mistral", "sharegpt", "relaxed", "vllm-v0"):
        "servesim's vLLM-v0 relaxed capacity is well above the one the paper's ratio implies. "
        "Under the relaxed 5 s P99 TBT limit, vLLM-v0's capacity is set by how long its prefill-only iterations "
        "stall decodes when several queued prompts are batched, and each stall is priced by the calibrated "
        "roofline, and the strict-SLO ratio matches the paper's. The rest is likely vLLM 0.2's memory-driven "
        "admission and preemption under load, which the artifact does not measure, so nothing calibrates it; the "
        "paper's value is a figure reading.",
    ("falcon", "sharegpt", "strict", "vllm-v0 tp8"):
        "the deviation comes from Sarathi-Serve's TP4-PP2 strict capacity (see the capacity table); both vLLM "
        "baselines are within about 20% of the paper's. No Falcon-180B or pipeline-parallel measurement exists to "
        "calibrate the per-micro-batch engine overhead and the inter-node transfers (the roofline's A100 "
        "constants and the engine overhead were measured at TP <= 2 on one node), and under the strict 1 s TBT "
        "SLO the capacity is set by how short the 512-token hybrid micro-batches are, so costs missing per stage "
        "inflate it.",
}
#: Table 4: (P50 TTFT, P99 TBT) seconds, Yi-34B on 2 A100, 128 requests
PAPER_TABLE4 = {
    ("hybrid-batching-only", "sharegpt"): (0.53, 0.68), ("hybrid-batching-only", "arxiv"): (3.78, 1.38),
    ("chunked-prefills-only", "sharegpt"): (1.04, 0.17), ("chunked-prefills-only", "arxiv"): (5.38, 0.20),
    ("sarathi-serve", "sharegpt"): (0.76, 0.14), ("sarathi-serve", "arxiv"): (3.90, 0.17),
}


def deployment_name(row: dict) -> str:
    """'sarathi', 'vllm-v0 tp8', ...: the scheduler, with the parallelism when the setup varies it."""
    name = str(row["scheduler"])
    if "tp" in row and not (isinstance(row["tp"], float) and math.isnan(row["tp"])):
        name += f" tp{int(row['tp'])}" + (f"-pp{int(row['pp'])}" if int(row.get("pp", 1) or 1) > 1 else "")
    return name


def _quick(spec):
    """A small subset of a sweep (tests): sharegpt, strict, 64 requests, a loose tolerance."""
    from dataclasses import replace

    grid = {k: v for k, v in spec.grid.items()}
    grid["workload"] = [w for w in grid["workload"] if w.get("trace") == "sharegpt"]
    grid["setting"] = [s for s in grid["setting"] if s.get("slo_level") == "strict"]
    base = {**spec.base, "num_requests": 64}
    return replace(spec, base=base, grid=grid, search={**spec.search, "rel_tol": 0.15, "max_trials": 8})


def run_capacities(out_dir: Path, setups, *, quick: bool = False, jobs: int | None = None, progress=None):
    """Run the capacity sweeps of ``setups`` (keys of SETUPS); return ``{setup: table}`` (pandas)."""
    from simulator.sweep import load_sweep, run_sweep

    tables = {}
    for key in setups:
        spec = load_sweep(CONFIGS / f"{SETUPS[key]}.yaml")
        if quick:
            spec = _quick(spec)
        tables[key] = run_sweep(spec, out_dir / SETUPS[key], jobs=jobs, progress=False)
        if progress:
            progress(key)
    return tables


def capacity_rows(tables: dict) -> tuple[list, list]:
    """``(capacity rows, ratio rows)`` for the report from the sweep tables."""
    caps, ratios = [], []
    for setup, table in tables.items():
        rows = table.to_dict("records")
        for r in rows:
            dep = deployment_name(r) if setup == "falcon" else str(r["scheduler"])
            paper = PAPER_CAPACITY.get((setup, r["trace"], r["slo_level"], dep))
            caps.append((setup, r["trace"], r["slo_level"], dep, r["capacity_qps"], paper))
        by = {(c[1], c[2], c[3]): c[4] for c in caps if c[0] == setup}
        for (trace, level, dep), cap in by.items():
            if not dep.startswith("sarathi"):
                continue
            for (t2, l2, base), value in by.items():
                if t2 == trace and l2 == level and not base.startswith("sarathi") and value:
                    paper = PAPER_RATIO.get((setup, trace, level, base))
                    ratios.append((setup, trace, level, f"{dep} / {base}", cap / value,
                                   paper[0] if paper else None, paper[1] if paper else ""))
    return caps, ratios


def table4(quick: bool = False) -> list:
    """Table 4's ablation rows: (scheduler, trace, P50 TTFT, P99 TBT, paper TTFT, paper TBT)."""
    from simulator.config import SimConfig
    from simulator.simulation import simulate

    rows = []
    n = 32 if quick else 128
    for trace, qps, max_len in (("sharegpt", 1.0, 8192), ("arxiv", 0.5, 16384)):
        if quick and trace == "arxiv":
            continue
        base = SimConfig(model="Yi-34B-200K", node="a100-pcie-pairwise-nvlink", tp=2, trace=trace, qps=qps,
                         num_requests=n, max_model_len=max_len, seed=42)
        for name, kw in (("hybrid-batching-only", {"scheduler": "sarathi", "token_budget": max_len}),
                         ("chunked-prefills-only", {"scheduler": "simple-chunking", "token_budget": 512}),
                         ("sarathi-serve", {"scheduler": "sarathi", "token_budget": 512})):
            s = simulate(base.with_(**kw), keep_requests=False).summary
            paper = PAPER_TABLE4[(name, trace)]
            rows.append((name, trace, s["ttft_s"]["p50"], s["tbt_s"]["p99"], *paper))
    return rows


def batch_times(engine: str | None = "sarathi-serve-2024") -> list:
    """The artifact's measured Yi-34B TP2 A100-PCIe batch times against the cost model's with ``engine``'s
    per-iteration overhead: rows of (kind, shape, measured s, predicted s, error). Empty without ``../shared``."""
    import pandas as pd

    from cost_models.plan import BatchPlan
    from simulator.config import SimConfig
    from simulator.simulation import build

    path = MEASUREMENTS / "sarathi_serve_artifact_yi34b_tp2_a100pcie.csv"
    if not path.exists():
        return []
    dep = build(SimConfig(model="Yi-34B-200K", node="a100-pcie-pairwise-nvlink", tp=2, engine=engine))
    cm = dep.cost_model_for(dep.specs[0])
    rows = []
    for r in pd.read_csv(path).itertuples():
        if r.kind == "prefill":
            plan, shape = BatchPlan.prefill(int(r.prompt_tokens)), f"prompt {int(r.prompt_tokens)}"
        elif r.kind == "decode":
            plan, shape = BatchPlan.decodes([int(r.context_tokens)] * int(r.batch_size)), f"batch {int(r.batch_size)}"
        else:
            d = int(r.num_decode_tokens)
            plan = BatchPlan(tuple(range(d + 1)), (1,) * d + (int(r.num_prefill_tokens),),
                             (int(r.context_tokens),) * d + (0,), d)
            shape = f"{int(r.num_prefill_tokens)} prefill + {d} decodes"
        predicted = cm.iteration_time(plan)
        rows.append((r.kind, shape, float(r.batch_time_s), predicted, predicted / float(r.batch_time_s) - 1))
    return rows


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}"


def render(caps, ratios, t4, batches, default=(), *, quick: bool) -> str:
    """The Markdown report."""
    lines = ["# Sarathi-Serve (OSDI'24) reproduced with servesim", "",
             f"Paper values: {PAPER_SOURCE}." + (" **Quick subset** (64 requests per trial)." if quick else ""), "",
             "## Capacity (QPS)", "", "| setup | trace | SLO | deployment | servesim | paper |", "|---|---|---|---|---|---|"]
    lines += [f"| {s} | {t} | {lvl} | {d} | {_fmt(c)} | {_fmt(p)} |" for s, t, lvl, d, c, p in caps]
    lines += ["", "## Capacity ratios", "",
              "| setup | trace | SLO | ratio | servesim | paper | off by |", "|---|---|---|---|---|---|---|"]
    deviations = []
    for s, t, lvl, name, value, paper, src in ratios:
        far = paper is not None and abs(value / paper - 1) > 0.25
        off = "" if paper is None else f"{value / paper - 1:+.0%}" + (" **>25%**" if far else "")
        lines.append(f"| {s} | {t} | {lvl} | {name} | {value:.2f}x | {_fmt(paper)}{'x' if paper else ''} "
                     f"{('(' + src + ')') if src else ''} | {off} |")
        if far:
            baseline = name.split(" / ", 1)[1]
            reason = KNOWN_DEVIATIONS.get((s, t, lvl, baseline), "no stated reason: unexplained")
            deviations.append(f"- **{s} {t} {lvl}, {name}** ({value / paper - 1:+.0%}): {reason}")
    if deviations:
        lines += ["", "### Ratios more than 25% off the paper's", "", *deviations]
    if t4:
        lines += ["", "## Table 4: hybrid batching vs chunked prefills (Yi-34B, 2 A100, 128 requests)", "",
                  "| scheduler | trace | P50 TTFT s | P99 TBT s | paper P50 TTFT | paper P99 TBT |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {t} | {_fmt(a)} | {_fmt(b)} | {pa} | {pb} |" for n, t, a, b, pa, pb in t4]
    if batches:
        errs = np.abs([b[4] for b in batches])
        lines += ["", "## Batch times: Yi-34B TP2 on A100-80GB-PCIe, the artifact's measurements", "",
                  f"With the Sarathi-Serve 2024 engine profile (``--engine sarathi-serve-2024``): median absolute "
                  f"error {np.median(errs):.1%}; with the default engine (vidur-vllm-2023): "
                  f"{np.median(np.abs([b[4] for b in default])):.1%}.", "",
                  "| kind | shape | measured ms | servesim ms | error | default engine ms |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {sh} | {m * 1e3:.1f} | {p * 1e3:.1f} | {e:+.0%} | {d[3] * 1e3:.1f} |"
                  for (k, sh, m, p, e), d in zip(batches, default)]
    return "\n".join(lines) + "\n"


def reproduce(out_dir, *, quick: bool = False, setups=None, jobs: int | None = None, progress=None) -> Path:
    """Run the three parts (see the module docstring) into ``out_dir`` and write ``report.md`` and
    ``report.json``; return the report's path. Sweeps resume from what ``out_dir`` already holds."""
    from traces.tables import write_atomic, write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setups = list(setups or (["mistral"] if quick else SETUPS))
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown:
        raise ValueError(f"--only: unknown setup {unknown[0]!r}; known: {', '.join(SETUPS)}")
    tables = run_capacities(out, setups, quick=quick, jobs=jobs, progress=progress)
    caps, ratios = capacity_rows(tables)
    t4 = table4(quick)
    batches, default = batch_times(), batch_times(None)
    text = render(caps, ratios, t4, batches, default, quick=quick)
    write_atomic(out / "report.md", text)
    write_json_atomic(out / "report.json", {"capacity": caps, "ratios": ratios, "table4": t4, "batch_times": batches},
                      indent=1, default=str)
    return out / "report.md"
