"""``servesim observe``: run the real vLLM engine (dummy weights) on a trace, or import a vLLM benchmark JSON.

Registered in ``simulator.cli`` as ``main.add_command(observe)``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from simulator.cli_options import user_errors

DEFAULT_QPS = 2.0


def _summary(out: Path) -> str:
    import pandas as pd

    meta = json.loads((out / "meta.json").read_text())
    req = pd.read_csv(out / "requests.csv")
    parts = [f"{meta.get('num_completed', len(req))}/{meta.get('num_requests', len(req))} requests"]
    if meta.get("plans"):
        parts.append(f"{meta['num_steps']} steps, {meta['num_preemptions']} preemptions, "
                     f"{meta['wall_s']:.1f} s wall ({meta['engine_init_s']:.1f} s engine start)")
    for col, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        s = req[col].dropna()
        if len(s):
            parts.append(f"{name} p50 {s.median() * 1000:.1f} ms p99 {s.quantile(0.99) * 1000:.1f} ms")
    return "; ".join(parts)


@click.command("observe")
@click.option("--engine", type=click.Choice(["vllm"]), default="vllm", show_default=True,
              help="The serving engine to run.")
@click.option("--model", "model_path", type=click.Path(), show_default="required unless --from-bench",
              help="A Hugging Face config.json, or a folder holding one (weights are dummy).")
@click.option("--trace", default="sharegpt", show_default=True,
              help="sharegpt, arxiv, or a trace file (CSV, Azure CSV, Mooncake JSONL).")
@click.option("--num-requests", type=int, show_default="64 of a built-in workload, all of a file",
              help="Number of requests.")
@click.option("--qps", type=float, show_default="2",
              help="Arrival rate (requests/s) of generated or re-timed traces; inf: all at 0.")
@click.option("--retime/--no-retime", default=None, show_default="off", help="Re-time a file trace's arrivals to --qps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the trace, prompt ids and engine.")
@click.option("--num-kv-blocks", type=int, show_default="vLLM's, from memory", help="KV cache blocks (vLLM's num_gpu_blocks_override).")
@click.option("--max-num-batched-tokens", type=int, show_default="vLLM's", help="vLLM's token budget per step.")
@click.option("--max-num-seqs", type=int, show_default="vLLM's", help="vLLM's most running requests.")
@click.option("--max-model-len", type=int, show_default="the config's",
              help="vLLM's max_model_len; also caps the trace's prompt + output.")
@click.option("--block-size", type=int, show_default="the backend's (CPU: 128)", help="KV block size in tokens.")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=False, show_default=True,
              help="vLLM prefix caching (vLLM's own default is on; off keeps full recompute after preemption).")
@click.option("--enable-chunked-prefill/--no-enable-chunked-prefill", default=None, show_default="vLLM's (on)",
              help="vLLM chunked prefill.")
@click.option("--async-scheduling/--no-async-scheduling", default=None, show_default="vLLM's",
              help="vLLM async scheduling (on for CUDA; the CPU backend always turns it off).")
@click.option("--enforce-eager/--no-enforce-eager", default=None, show_default="vLLM's (compile)",
              help="Skip torch.compile (faster start).")
@click.option("--threads", type=int, show_default="torch's",
              help="Torch threads of the in-process engine (CPU); 1 keeps step times stable on a shared machine.")
@click.option("--from-bench", "from_bench", type=click.Path(), show_default="run the engine",
              help="Import a 'vllm bench serve --save-result --save-detailed' JSON instead of running.")
@click.option("--out", "out_dir", default="runs/observe", show_default=True, type=click.Path(file_okay=False),
              help="Output folder.")
@user_errors
def observe(engine, model_path, trace, num_requests, qps, retime, seed, num_kv_blocks, max_num_batched_tokens,
            max_num_seqs, max_model_len, block_size, enable_prefix_caching, enable_chunked_prefill, async_scheduling,
            enforce_eager, threads, from_bench, out_dir):
    """Run the real vLLM engine on a trace and record what its scheduler did each step.

    Writes OUT/{plans.jsonl,requests.csv,tokens.csv,iterations.csv,meta.json}, in the formats simulate writes
    (plans.jsonl as simulate --plans); `servesim validate --observed OUT` compares a simulation with them step by
    step. With --from-bench, imports a vLLM benchmark result instead (no plans: a remote server's
    schedule is not observable).
    """
    from simulator.observe.bench_import import import_vllm_bench

    out = Path(out_dir)
    if from_bench:
        import_vllm_bench(from_bench, out)
        click.echo(f"imported {from_bench}: {_summary(out)}")
        click.echo(f"wrote {out}/{{requests.csv,tokens.csv,meta.json}}")
        return
    if not model_path:
        raise ValueError("--model: required (a config.json or its folder), unless --from-bench is given")
    for name, value in (("--num-requests", num_requests), ("--num-kv-blocks", num_kv_blocks),
                        ("--max-num-batched-tokens", max_num_batched_tokens), ("--max-num-seqs", max_num_seqs),
                        ("--max-model-len", max_model_len), ("--block-size", block_size), ("--threads", threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if qps is not None and not qps > 0:
        raise ValueError(f"--qps: must be > 0, got {qps}")

    from simulator.observe.vllm_engine import observe_vllm, resolve_model_config
    from traces import load_trace

    _, hf_config = resolve_model_config(model_path)
    limit = max_model_len or hf_config.get("max_position_embeddings")
    from traces import WORKLOADS

    if num_requests is None and trace in WORKLOADS:
        num_requests = 64
    load_kwargs = dict(num_requests=num_requests, qps=DEFAULT_QPS if qps is None else qps, seed=seed)
    if retime is not None:
        load_kwargs["retime"] = retime
    if qps is not None:
        load_kwargs["qps_explicit"] = True               # an explicit --qps on a timed file is an error there
    if limit:
        load_kwargs["max_total_tokens"] = int(limit)
    requests_df = load_trace(trace, **load_kwargs)

    last = [-1]

    def progress(done, total):
        if done != last[0] and (done == total or done % max(1, total // 10) == 0):
            last[0] = done
            click.echo(f"  {done}/{total} requests finished", err=True)

    observe_vllm(model_path, requests_df, out, num_gpu_blocks_override=num_kv_blocks,
                 max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, block_size=block_size,
                 enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
                 async_scheduling=async_scheduling, seed=seed, max_model_len=max_model_len,
                 enforce_eager=enforce_eager, threads=threads, progress=progress)
    click.echo(f"vllm: {_summary(out)}")
    click.echo(f"wrote {out}/{{plans.jsonl,requests.csv,tokens.csv,iterations.csv,meta.json}}")
