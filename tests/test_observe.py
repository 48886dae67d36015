"""servesim observe: the real vLLM engine on CPU (skipped without vllm), the vLLM bench importer, bad input.

The real run goes through the CLI in a subprocess: vLLM's CPU backend binds threads, sets NUMA memory policy and
environment variables for its process, which must not leak into the rest of the suite.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from simulator.observe import (ITERATION_COLUMNS, REQUEST_COLUMNS, TOKEN_COLUMNS, import_vllm_bench, observe_vllm,
                               prompt_token_ids, write_tiny_llama_config)
from simulator.observe.cli import observe
from simulator.observe.vllm_engine import PLAN_KEYS, resolve_model_config

ROOT = Path(__file__).resolve().parents[1]

# Run the `observe` command in a fresh interpreter; exit 3 (with the reason) when vllm cannot be imported.
RUNNER = textwrap.dedent("""
    import sys
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        print(f"vllm not importable: {type(exc).__name__}: {exc}".splitlines()[0])
        sys.exit(3)
    from simulator.observe.cli import observe
    observe.main(args=sys.argv[1:], prog_name="servesim observe")
""")


def test_columns_match_the_simulator():
    from simulator.metrics import ITERATION_COLUMNS as SIM_ITERATIONS, REQUEST_COLUMNS as SIM_REQUESTS

    assert REQUEST_COLUMNS == list(SIM_REQUESTS)
    assert ITERATION_COLUMNS == list(SIM_ITERATIONS)


# ----------------------------------------------------------------------------------------------- real vLLM run


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """30 requests, all arriving at 0, through vLLM on CPU with 8 KV blocks of 128 tokens (7 usable): preempts."""
    tmp = tmp_path_factory.mktemp("observe")
    write_tiny_llama_config(tmp / "model")
    rng = np.random.default_rng(1)
    n = 30
    trace = pd.DataFrame({"prompt_tokens": rng.integers(32, 401, n), "output_tokens": rng.integers(4, 41, n),
                          "arrival_s": np.zeros(n)})
    trace.to_csv(tmp / "trace.csv", index=False)
    out = tmp / "out"
    # One torch/OpenMP thread: with 2 threads on 2 shared cores, every parallel region waits for a descheduled
    # thread whenever another process runs, and a step takes 20x longer.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["--model", str(tmp / "model"), "--trace", str(tmp / "trace.csv"), "--num-requests", str(n),
            "--num-kv-blocks", "8", "--max-model-len", "512", "--enforce-eager", "--seed", "0", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip() or "vllm not importable")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return trace, out, proc.stdout


def test_vllm_run_files_and_columns(vllm_run):
    trace, out, stdout = vllm_run
    for name in ("plans.jsonl", "requests.csv", "tokens.csv", "iterations.csv", "meta.json"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    req = pd.read_csv(out / "requests.csv")
    assert list(req.columns) == REQUEST_COLUMNS
    assert list(pd.read_csv(out / "tokens.csv").columns) == TOKEN_COLUMNS
    it = pd.read_csv(out / "iterations.csv")
    assert list(it.columns) == ITERATION_COLUMNS
    assert "30/30 requests" in stdout

    # every request completed with the trace's lengths and sane times
    assert len(req) == len(trace)
    assert req["prompt_tokens"].tolist() == trace["prompt_tokens"].tolist()
    assert req["output_tokens"].tolist() == trace["output_tokens"].tolist()
    assert req["completion_s"].notna().all()
    assert (req["scheduled_s"] >= req["arrival_s"]).all()
    assert (req["first_token_s"] > req["scheduled_s"]).all()
    assert (req["completion_s"] >= req["first_token_s"]).all()
    assert np.allclose(req["ttft_s"], req["first_token_s"] - req["arrival_s"])
    multi = req["output_tokens"] > 1
    assert np.allclose(req.loc[multi, "tpot_s"], (req["completion_s"] - req["first_token_s"])[multi]
                       / (req["output_tokens"] - 1)[multi])

    # one token row per output token, non-decreasing in time, the last at completion
    tok = pd.read_csv(out / "tokens.csv")
    counts = tok.groupby("request_id").size()
    assert counts.reindex(req["request_id"]).tolist() == req["output_tokens"].tolist()
    for rid, g in tok.groupby("request_id"):
        assert g["token_index"].tolist() == list(range(len(g)))
        assert (np.diff(g["time_s"]) >= 0).all()
        assert g["time_s"].iloc[-1] == pytest.approx(req.set_index("request_id").loc[rid, "completion_s"])

    # iterations: KV blocks from the block pool (8 blocks, block 0 is vLLM's null block)
    assert (it["kv_blocks_total"] == 7).all()
    assert it["kv_blocks_used"].between(0, 7).all()
    assert (it["batch_size"] >= 0).all() and it["batch_size"].sum() > 0
    assert (it["duration_s"] >= 0).all() and (np.diff(it["start_s"]) >= 0).all()


def test_vllm_run_plans_account_for_every_token(vllm_run):
    trace, out, _ = vllm_run
    lines = (out / "plans.jsonl").read_text().splitlines()
    plans = [json.loads(line) for line in lines]
    assert plans and all(tuple(p) == PLAN_KEYS for p in plans)
    assert [p["step"] for p in plans] == list(range(len(plans)))
    req = pd.read_csv(out / "requests.csv").set_index("request_id")
    it = pd.read_csv(out / "iterations.csv")
    assert len(it) == len(plans)

    computed, scheduled, discarded, preemptions = {}, {}, {}, {}
    for p, (_, row) in zip(plans, it.iterrows()):
        assert list(p["num_new_tokens"]) == list(p["context_lens"])
        assert p["start_s"] == pytest.approx(row["start_s"]) and p["duration_s"] == pytest.approx(row["duration_s"])
        for rid in p["preempted_ids"]:
            discarded[rid] = discarded.get(rid, 0) + computed.get(rid, 0)
            computed[rid] = 0
            preemptions[rid] = preemptions.get(rid, 0) + 1
        for key, n in p["num_new_tokens"].items():
            rid = int(key)
            assert n >= 1
            assert p["context_lens"][key] == computed.get(rid, 0), (p["step"], rid)
            computed[rid] = computed.get(rid, 0) + n
            scheduled[rid] = scheduled.get(rid, 0) + n
        assert row["batch_size"] == len(p["num_new_tokens"])
        assert row["num_prefill_tokens"] + row["num_decode_tokens"] == sum(p["num_new_tokens"].values())
    assert sum(preemptions.values()) >= 1, "the tiny KV cache should force at least one preemption"
    for rid, r in req.iterrows():
        assert scheduled[rid] == r.prompt_tokens + r.output_tokens - 1 + discarded.get(rid, 0), rid
        assert r.num_preemptions == preemptions.get(rid, 0)


def test_vllm_run_meta(vllm_run):
    _, out, _ = vllm_run
    meta = json.loads((out / "meta.json").read_text())
    assert meta["engine"] == "vllm" and meta["format_version"] == 1 and meta["plans"] is True
    assert meta["device"] == "cpu"
    assert meta["num_gpu_blocks"] == 8 and meta["block_size"] == 128 and meta["kv_blocks_total"] == 7
    assert meta["num_requests"] == 30 and meta["num_completed"] == 30
    assert meta["num_preemptions"] >= 1
    sc = meta["scheduler_config"]
    for key in ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "long_prefill_token_threshold",
                "scheduler_reserve_full_isl", "watermark", "policy", "async_scheduling"):
        assert key in sc, key
    assert sc["async_scheduling"] is False          # the CPU platform turns it off
    assert sc["max_model_len"] == 512
    assert meta["cache_config"]["enable_prefix_caching"] is False
    assert meta["model"]["hidden_size"] == 512 and meta["model"]["num_hidden_layers"] == 8
    assert meta["arrival_lag_s"]["max"] >= 0
    assert meta["wall_s"] > 0 and meta["vllm_version"]
    assert meta["output_token_mismatch"] == []


# ----------------------------------------------------------------------------------------------- bench import


def _bench_json(path, **overrides):
    data = {
        "date": "20260101-000000", "backend": "vllm", "model_id": "tiny", "num_prompts": 3, "request_rate": 2.0,
        "duration": 3.0, "completed": 2, "failed": 1,
        "input_lens": [100, 50, 70],
        "output_lens": [3, 1, 0],
        "ttfts": [0.2, 0.1, 0.0],
        "itls": [[0.05, 0.07], [], []],
        "latencies": [0.32, 0.1, 0.0],
        "start_times": [1000.0, 1000.5, 1001.0],
        "queue_times": [0.0, 0.0, 0.0],
        "generated_texts": ["abc", "d", ""],
        "errors": ["", "", "Bad Request"],
    }
    data.update(overrides)
    for key in [k for k, v in overrides.items() if v is None]:
        del data[key]
    path.write_text(json.dumps(data))
    return path


def test_bench_import_round_trip(tmp_path):
    src = _bench_json(tmp_path / "bench.json")
    out = import_vllm_bench(src, tmp_path / "out")
    assert not (out / "plans.jsonl").exists()
    req = pd.read_csv(out / "requests.csv")
    assert list(req.columns) == REQUEST_COLUMNS
    assert req["request_id"].tolist() == [0, 1, 2]
    assert req["arrival_s"].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert req["prompt_tokens"].tolist() == [100, 50, 70]
    assert req["first_token_s"].tolist()[:2] == pytest.approx([0.2, 0.6])
    assert req["completion_s"].tolist()[:2] == pytest.approx([0.32, 0.6])
    assert req["tpot_s"].iloc[0] == pytest.approx(0.06)
    assert math.isnan(req["tpot_s"].iloc[1]) and math.isnan(req["first_token_s"].iloc[2])
    assert req["scheduled_s"].isna().all() and req["num_preemptions"].isna().all()
    tok = pd.read_csv(out / "tokens.csv")
    assert list(tok.columns) == TOKEN_COLUMNS
    assert tok[tok.request_id == 0]["time_s"].tolist() == pytest.approx([0.2, 0.25, 0.32])
    assert tok.groupby("request_id").size().to_dict() == {0: 3, 1: 1}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["plans"] is False and meta["num_failed"] == 1 and meta["num_completed"] == 2
    assert meta["bench"]["model_id"] == "tiny" and meta["format_version"] == 1


def test_bench_import_with_trace_and_queue_times(tmp_path):
    src = _bench_json(tmp_path / "bench.json", queue_times=[0.0, 0.25, 0.0])
    trace = pd.DataFrame({"request_id": [10, 11, 12], "arrival_s": [0.0, 0.25, 1.0],
                          "prompt_tokens": [100, 50, 70], "output_tokens": [3, 1, 2]})
    out = import_vllm_bench(src, tmp_path / "out", requests_df=trace)
    req = pd.read_csv(out / "requests.csv")
    assert req["request_id"].tolist() == [10, 11, 12]
    assert req["arrival_s"].tolist() == [0.0, 0.25, 1.0]
    assert req["output_tokens"].tolist() == [3, 1, 2]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompt_tokens_mismatch"] == 0
    assert meta["arrival_lag_s"]["max"] == pytest.approx(0.25)


def test_bench_import_via_cli(tmp_path):
    src = _bench_json(tmp_path / "bench.json")
    result = CliRunner().invoke(observe, ["--from-bench", str(src), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "2/3 requests" in result.output
    assert (tmp_path / "o" / "requests.csv").is_file()


@pytest.mark.parametrize("overrides, fragment", [
    ({"ttfts": None}, "ttfts: missing"),
    ({"itls": None}, "itls: missing"),
    ({"start_times": None}, "start_times: missing"),
    ({"output_lens": [3, 1]}, "output_lens: has 2 entries"),
    ({"itls": [[0.05, "x"], [], []]}, "itls[0][1]"),
    ({"input_lens": [100, -1, 70]}, "input_lens[1]"),
    ({"itls": "nope"}, "itls: must be a list"),
])
def test_bench_import_bad_input(tmp_path, overrides, fragment):
    src = _bench_json(tmp_path / "bench.json", **overrides)
    with pytest.raises(ValueError) as err:
        import_vllm_bench(src, tmp_path / "out")
    msg = str(err.value)
    assert str(src) in msg and fragment in msg and "\n" not in msg
    assert not (tmp_path / "out" / "requests.csv").exists()


def test_bench_import_not_json(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        import_vllm_bench(src, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        import_vllm_bench(tmp_path / "missing.json", tmp_path / "out")
    result = CliRunner().invoke(observe, ["--from-bench", str(src), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "not a readable JSON" in result.output


# ----------------------------------------------------------------------------------------------- bad input, ids


def _trace(n=3):
    return pd.DataFrame({"request_id": range(n), "arrival_s": [0.0] * n, "prompt_tokens": [10] * n,
                         "output_tokens": [2] * n})


def test_observe_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        observe_vllm(tmp_path / "empty", _trace(), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such file"):
        observe_vllm(tmp_path / "nowhere", _trace(), tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        observe_vllm(tmp_path / "bad", _trace(), tmp_path / "out")
    (tmp_path / "bad" / "config.json").write_text('{"vocab_size": 10}')
    with pytest.raises(ValueError, match="architectures: missing"):
        observe_vllm(tmp_path / "bad", _trace(), tmp_path / "out")
    runner = CliRunner()
    result = runner.invoke(observe, ["--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "no config.json" in result.output
    result = runner.invoke(observe, ["--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--model: required" in result.output
    result = runner.invoke(observe, ["--model", str(tmp_path / "empty"), "--num-kv-blocks", "0"])
    assert result.exit_code == 2 and "--num-kv-blocks" in result.output


def test_observe_bad_trace(tmp_path):
    model = write_tiny_llama_config(tmp_path / "m")
    with pytest.raises(ValueError, match="missing column"):
        observe_vllm(model, _trace().drop(columns="arrival_s"), tmp_path / "out")
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        observe_vllm(model, _trace(), tmp_path / "out", max_model_len=11)


def test_model_config_file_or_folder(tmp_path):
    file = write_tiny_llama_config(tmp_path / "m", hidden=256, layers=2)
    assert file.name == "config.json"
    folder, cfg = resolve_model_config(tmp_path / "m")
    assert folder == tmp_path / "m" and cfg["hidden_size"] == 256 and cfg["num_hidden_layers"] == 2
    other = tmp_path / "llama.json"
    other.write_text(file.read_text())
    folder, cfg = resolve_model_config(other)
    assert (folder / "config.json").is_file() and cfg["hidden_size"] == 256


def test_prompt_token_ids_deterministic_and_prefix_sharing():
    df = _trace(4)
    df["prompt_tokens"] = [10, 20, 30, 40]
    a = prompt_token_ids(df, 1000, seed=0)
    assert a == prompt_token_ids(df, 1000, seed=0)
    assert [len(x) for x in a] == [10, 20, 30, 40]
    assert all(0 <= t < 1000 for x in a for t in x)
    assert a != prompt_token_ids(df, 1000, seed=1)
    assert prompt_token_ids(df.iloc[[1]], 1000, seed=0)[0] == a[1]    # independent of the other rows
    df["block_hashes"] = [(7,), (7, 8), (9,), (7, 8, 5)]
    df.attrs["hash_block_tokens"] = 16
    b = prompt_token_ids(df, 1000, seed=0)
    assert b[0] == b[1][:10] == b[3][:10]
    assert b[1][:20] == b[3][:20] and b[1][16:20] != b[2][16:20]


# ------------------------------------------------------------------------------- servesim against the real engine

def test_servesim_schedules_every_step_as_the_real_vllm_did(vllm_run, tmp_path):
    """Schedule agreement (issue 9): the observed run replayed through servesim's vllm scheduler with the
    engine's KV size, limits and step times gives the same {request: tokens} at (at least 99% of) every step,
    preemptions included; the latency check runs too (its error depends on the cost model, here the roofline)."""
    from click.testing import CliRunner

    from simulator.cli import main

    _, out, _ = vllm_run
    res = CliRunner().invoke(main, ["validate", "--observed", str(out), "--out", str(tmp_path / "val"),
                                    "--num-requests", "5"])
    assert res.exit_code == 0, res.output
    assert "schedule agreement: " in res.output and "TBT" in res.output
    assert "--num-requests ignored with --observed" in res.output          # said, not silently dropped
    report = json.loads((tmp_path / "val" / "observed_validation.json").read_text())
    sched = report["schedule"]
    print(f"schedule agreement {sched['agreeing']}/{sched['steps']}; first divergence: {sched['first_divergence']}")
    assert sched["steps"] > 50
    assert sched["agreement"] >= 0.99, sched["first_divergence"]
    assert report["observed_preemptions"] >= 1
    for name in ("observed_validation.json", "agreement.csv", "observed_validation.png"):
        assert (tmp_path / "val" / name).is_file()
    lat = report["latency"]
    assert set(lat) == {"ttft_s", "tbt_s", "e2e_s"} and lat["ttft_s"]["p50"]["observed"] > 0


def _fake_observed(path, **meta_changes):
    path.mkdir(parents=True, exist_ok=True)
    meta = {"engine": "vllm", "vllm_version": "0.32.0", "format_version": 1, "kv_blocks_total": 9, "block_size": 128,
            "scheduler_config": {"max_model_len": 512, "max_num_seqs": 8, "max_num_batched_tokens": 64},
            "requests_added_s": {"0": 0.0}, **meta_changes}
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "requests.csv").write_text("request_id,arrival_s,prompt_tokens,output_tokens\n0,0.0,10,2\n")
    (path / "tokens.csv").write_text("request_id,token_index,time_s\n0,0,1.0\n0,1,2.0\n")
    (path / "plans.jsonl").write_text(json.dumps({"step": 0, "start_s": 0.0, "duration_s": 1.0,
                                                  "num_new_tokens": {"0": 10}, "context_lens": {"0": 0},
                                                  "preempted_ids": []}) + "\n")
    return path


def test_observed_folder_bad_input_is_a_one_line_error(tmp_path):
    from simulator.validate_observed import ObservedError, read_observed, schedule_agreement

    good = _fake_observed(tmp_path / "good")
    report, _ = schedule_agreement(read_observed(good))
    assert report["agreement"] == 1.0
    with pytest.raises(ObservedError, match="vllm_version.*0.31.1.*follows vLLM 0.32"):
        read_observed(_fake_observed(tmp_path / "old", vllm_version="0.31.1"))
    with pytest.raises(ObservedError, match="engine.*'sglang'"):
        read_observed(_fake_observed(tmp_path / "sglang", engine="sglang"))
    (_fake_observed(tmp_path / "noplans") / "plans.jsonl").unlink()
    with pytest.raises(ObservedError, match="noplans: missing plans.jsonl"):
        read_observed(tmp_path / "noplans")
    (_fake_observed(tmp_path / "torn") / "plans.jsonl").write_text('{"step": 0, "start_s": 0.0, "dura')
    with pytest.raises(ObservedError, match="plans.jsonl: line 1: malformed step"):
        read_observed(tmp_path / "torn")
    with pytest.raises(ObservedError, match="not a folder"):
        read_observed(tmp_path / "nothing")
