"""Benchmark: the speed and memory targets of servesim, each as a whole ``servesim`` process (start-up, trace,
simulation and outputs), wall seconds and peak resident memory (``/usr/bin/time``), best of ``--repeat``.

Targets (issue 11):

- ``vidur``: the run Vidur was measured on — CodeLlama-34B (hidden 8192, 48 layers, 64 heads, 8 KV heads, FFN 22016,
  vocab 32000) on 2 x A100 with TP2, Vidur's own A100 tables imported by ``servesim fit --from-vidur`` (done once,
  not timed), arxiv-4k lengths (``../shared/data/traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv``)
  re-timed to Poisson 1 QPS, 2000 requests, Sarathi-Serve budget 512, seed 42. Vidur on this machine: 13.7 s,
  1.5 GB (warm). Target <= 1.4 s, <= 200 MB.
- ``default``: ``servesim simulate`` on the defaults. Target <= 1.0 s.
- ``million``: 1,000,000 requests of the default workload at 2 QPS. Target <= 60 s, <= 1 GB.
- ``overload-<scheduler>``: 100,000 requests at 50 QPS (far past capacity) for vllm, sarathi, orca. Target
  <= 10 s each, memory independent of the request count beyond the outputs: the same run at 20,000 requests is
  timed too, and the growth of the peak printed in bytes per request.
- ``capacity``: one capacity search (Mistral-7B, A100, sharegpt, strict SLO, Sarathi-Serve 512, 2048 requests).
  Target <= 3 s.

    python experiments/bench/speed_targets.py [--only default,capacity] [--repeat 3] [--baseline REV]

This VM's speed drifts by tens of percent between spells, so a figure is only comparable with one measured beside
it: ``--baseline REV`` (a git revision) also times each target with that revision's code (a temporary git worktree
on ``PYTHONPATH``), right after the current code's runs, and prints both and the change.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
ARXIV = SHARED / "traces" / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
VIDUR = SHARED / "profiles" / "vidur"
CODELLAMA_34B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
                 "num_hidden_layers": 48, "num_attention_heads": 64, "num_key_value_heads": 8,
                 "intermediate_size": 22016, "vocab_size": 32000, "max_position_embeddings": 16384,
                 "hidden_act": "silu", "rms_norm_eps": 1e-5, "torch_dtype": "float16"}
TARGETS = {"vidur": (1.4, 200), "default": (1.0, None), "million": (60.0, 1024), "overload-vllm": (10.0, None),
           "overload-sarathi": (10.0, None), "overload-orca": (10.0, None), "capacity": (3.0, None)}


def servesim() -> list[str]:
    exe = shutil.which("servesim")
    return [exe] if exe else [sys.executable, "-m", "simulator"]


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one run of ``cmd`` under /usr/bin/time (``env``: its environment)."""
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    wall, rss_kb = re.findall(r"([\d.]+) (\d+)\s*$", done.stderr.strip())[-1]
    return float(wall), int(rss_kb) / 1024


def commands(tmp: Path, fitted: str = "vidur-model") -> dict:
    """The targets' command lines, the vidur one with the cost model ``servesim fit`` wrote to ``tmp / fitted``."""
    out = lambda name: ["--out", str(tmp / name)]  # noqa: E731
    cmds = {
        "default": [*servesim(), "simulate", *out("default")],
        "million": [*servesim(), "simulate", "--num-requests", "1000000", "--qps", "2", *out("million")],
        "capacity": [*servesim(), "capacity", "--scheduler", "sarathi", "--token-budget", "512", "--slo-level",
                     "strict", "--num-requests", "2048", *out("capacity")],
    }
    for sched in ("vllm", "sarathi", "orca"):
        for n, suffix in ((100000, ""), (20000, "-20k")):
            cmds[f"overload-{sched}{suffix}"] = [*servesim(), "simulate", "--scheduler", sched, "--num-requests",
                                                 str(n), "--qps", "50", *out(f"overload-{sched}{suffix}")]
    if ARXIV.exists() and VIDUR.exists():
        model = tmp / "codellama-34b"
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text(json.dumps(CODELLAMA_34B))
        # Vidur's A100 tables were measured on the PCIe card: simulate that device (no "fitted on" warning)
        cmds["vidur"] = [*servesim(), "simulate", "--model", str(model), "--device", "A100-80GB-PCIe", "--tp", "2",
                         "--cost-model",
                         str(tmp / fitted), "--trace", str(ARXIV), "--retime", "--qps", "1",
                         "--num-requests", "2000", "--scheduler", "sarathi", "--token-budget", "512",
                         "--seed", "42", *out("vidur")]
    return cmds


def baseline_tree(rev: str, tmp: Path) -> dict:
    """A worktree of ``rev`` in ``tmp``: the environment that runs its code (its folder first on ``PYTHONPATH``)."""
    tree = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    path = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, PYTHONPATH=path)


def best(runs: list) -> tuple[float, float]:
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated targets (default: all)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", metavar="REV", help="also time each target with this git revision's code")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base_env = baseline_tree(args.baseline, tmp) if args.baseline else None
        try:
            run_targets(args, tmp, base_env)
        finally:
            if base_env is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "baseline")],
                               capture_output=True)
    print(f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")


def run_targets(args, tmp: Path, base_env: dict | None) -> None:
    cmds = commands(tmp)
    base_cmds = commands(tmp, "vidur-model-baseline") if base_env is not None else {}
    wanted = args.only.split(",") if args.only else list(TARGETS)
    if "vidur" in wanted and "vidur" in cmds:
        for model, env in (("vidur-model", None), ("vidur-model-baseline", base_env)):
            if model == "vidur-model" or env is not None:
                subprocess.run([*servesim(), "fit", "--from-vidur", str(VIDUR), "--model",
                                str(tmp / "codellama-34b"), "--tp", "2", "--out", str(tmp / model)], check=True,
                               capture_output=True, env=env)
    elif "vidur" in wanted:
        print("vidur: skipped (../shared/data absent)")
    header = f"{'target':<18} {'wall s':>8} {'peak MiB':>9}  {'target':<18} runs"
    if base_env is not None:
        header += f"    baseline {args.baseline}: wall s, peak MiB, change"
    print(header)
    for name in wanted:
        if name not in cmds:
            continue
        repeat = args.repeat if name != "million" else 1
        runs = [timed(cmds[name]) for _ in range(repeat)]
        wall, rss = best(runs)
        t_wall, t_rss = TARGETS[name]
        target = f"<= {t_wall:g} s" + (f", <= {t_rss} MiB" if t_rss else "")
        line = f"{name:<18} {wall:>8.2f} {rss:>9.0f}  {target:<18} " + " ".join(f"{w:.2f}s/{m:.0f}M" for w, m in runs)
        if base_env is not None:
            b_wall, b_rss = best([timed(base_cmds[name], base_env) for _ in range(repeat)])
            line += f"    {b_wall:.2f} {b_rss:.0f} {100 * (wall / b_wall - 1):+.1f}%"
        print(line, flush=True)
        if name.startswith("overload-"):
            # memory independent of the request count: the same run at 20k requests, and the growth
            small = [timed(cmds[f"{name}-20k"]) for _ in range(args.repeat)]
            rss_small = min(r[1] for r in small)
            print(f"{'  at 20k requests':<18} {min(r[0] for r in small):>8.2f} {rss_small:>9.0f}  "
                  f"growth {(rss - rss_small) * 1024 * 1024 / 80000:.0f} bytes/request", flush=True)


if __name__ == "__main__":
    main()
