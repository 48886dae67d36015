"""``servesim simulate`` end to end (issue 2): output files and their schema, determinism, and bad input — each
bad input ends with ONE line ``error: ...`` naming the file and row/field, exit status 2, never a traceback; a request
that cannot fit the KV cache or the max model length is rejected and counted in summary.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cost_models.specs import known_devices, known_models, load_model
from simulator.cli import main
from simulator.config import SimConfig
from simulator.kv_cache import activation_reserve_bytes, kv_bytes_per_block
from simulator.metrics import ITERATION_COLUMNS, REQUEST_COLUMNS
from simulator.slo import FLUIDITY_COLUMNS
from traces import load_trace

DIST_KEYS = {"mean", "p50", "p90", "p99", "max"}
SUMMARY_KEYS = {"ttft_s", "tbt_s", "tpot_s", "e2e_s", "scheduling_delay_s", "requests_completed",
                "requests_rejected", "num_preemptions", "throughput_tokens_per_s", "makespan_s", "config"}


def servesim(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def simulate_ok(out, *args):
    result = servesim("simulate", "--out", out, *args)
    assert result.exit_code == 0, result.output
    return (json.loads((Path(out) / "summary.json").read_text()), pd.read_csv(Path(out) / "requests.csv"),
            pd.read_csv(Path(out) / "iterations.csv"), result.output)


def assert_user_error(result, *fragments):
    """One line 'error: ...' containing every fragment, exit status 2, no traceback."""
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- a normal run -----------------------------------------------------------------------------------------

def test_simulate_writes_summary_requests_and_iterations(tmp_path):
    summary, requests, iterations, output = simulate_ok(tmp_path / "run", "--num-requests", 40)
    assert SUMMARY_KEYS <= set(summary)
    for key in ("ttft_s", "tbt_s", "tpot_s", "e2e_s", "scheduling_delay_s"):
        assert set(summary[key]) == DIST_KEYS
        assert summary[key]["p50"] <= summary[key]["p90"] <= summary[key]["p99"] <= summary[key]["max"]
    assert summary["requests_completed"] == 40 and summary["requests_rejected"] == 0
    assert summary["throughput_tokens_per_s"] > 0 and summary["makespan_s"] > 0
    # the config is everything needed to rerun, with the defaults
    config = SimConfig(**summary["config"])
    assert (config.model, config.device, config.scheduler, config.token_budget, config.trace, config.qps,
            config.seed, config.num_requests) == ("Mistral-7B", None, "sarathi", 512, "sharegpt", None, 42, 40)
    # ... and what the defaults resolved to
    assert (summary["deployment"]["device"], summary["deployment"]["gpus"]) == ("A100-80GB-SXM", 1)

    # the columns, then the per-request fluidity index (issue 5)
    assert list(requests.columns) == REQUEST_COLUMNS + FLUIDITY_COLUMNS[1:]
    assert requests["fluidity_index"].between(0, 1).all()
    assert len(requests) == 40 and requests["request_id"].tolist() == list(range(40))
    assert (requests["ttft_s"] - (requests["first_token_s"] - requests["arrival_s"])).abs().max() < 1e-9
    assert (requests["e2e_s"] - (requests["completion_s"] - requests["arrival_s"])).abs().max() < 1e-9
    assert (requests["scheduling_delay_s"] >= 0).all() and (requests["ttft_s"] > requests["scheduling_delay_s"]).all()
    assert summary["ttft_s"]["max"] == pytest.approx(requests["ttft_s"].max())

    assert list(iterations.columns) == ITERATION_COLUMNS
    assert len(iterations) == summary.get("num_iterations", len(iterations))
    assert (iterations["duration_s"] > 0).all()
    assert (iterations["start_s"].diff().iloc[1:] >= iterations["duration_s"].iloc[:-1].to_numpy() - 1e-12).all()
    assert (iterations["kv_blocks_used"] <= iterations["kv_blocks_total"]).all()
    assert (iterations["num_prefill_tokens"] + iterations["num_decode_tokens"] <= 512).all()      # sarathi budget
    # every prompt and output token was computed once (no preemption here)
    assert iterations["num_prefill_tokens"].sum() == requests["prompt_tokens"].sum()
    assert iterations["num_decode_tokens"].sum() == (requests["output_tokens"] - 1).sum()

    assert "TTFT" in output and "TBT" in output and "scheduling delay" in output


def test_config_file_and_flags_share_keys_and_flags_win(tmp_path):
    cfg = write(tmp_path, "run.yaml", "scheduler: vllm\nnum_requests: 12\nqps: 4.0\nseed: 7\n")
    summary, requests, _, _ = simulate_ok(tmp_path / "a", "--config", cfg)
    assert (summary["config"]["scheduler"], summary["config"]["qps"], summary["config"]["seed"]) == ("vllm", 4.0, 7)
    assert len(requests) == 12
    summary, _, iterations, _ = simulate_ok(tmp_path / "b", "--config", cfg, "--scheduler", "orca")
    assert summary["config"]["scheduler"] == "orca" and summary["config"]["num_requests"] == 12


@pytest.mark.parametrize("scheduler", ["vllm", "vllm-v0", "simple-chunking", "orca", "fastertransformer"])
def test_every_scheduler_runs_from_the_cli(tmp_path, scheduler):
    summary, _, iterations, _ = simulate_ok(tmp_path / scheduler, "--scheduler", scheduler, "--num-requests", 20)
    assert summary["requests_completed"] == 20
    if scheduler in ("vllm-v0", "simple-chunking", "fastertransformer"):       # never mixes prefill and decode
        assert ((iterations["num_prefill_tokens"] == 0) | (iterations["num_decode_tokens"] == 0)).all()


def test_hugging_face_config_json_as_model(tmp_path):
    cfg = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_hidden_layers": 22,
           "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "hidden_act": "silu"}
    path = write(tmp_path, "config.json", json.dumps(cfg))
    summary, _, _, _ = simulate_ok(tmp_path / "hf", "--model", path, "--num-requests", 10)
    assert summary["requests_completed"] + summary["requests_rejected"] == 10


def test_file_trace_keeps_its_arrival_times(tmp_path):
    trace = write(tmp_path, "t.csv", "prompt_tokens,output_tokens,arrival_s\n100,5,0.5\n200,3,1.25\n50,2,7\n")
    _, requests, _, _ = simulate_ok(tmp_path / "f", "--trace", trace)
    assert requests["arrival_s"].tolist() == [0.5, 1.25, 7.0]
    assert requests["prompt_tokens"].tolist() == [100, 200, 50] and requests["output_tokens"].tolist() == [5, 3, 2]


# --- determinism ------------------------------------------------------------------------------------------

def test_same_config_and_seed_give_byte_identical_outputs(tmp_path):
    args = ("--num-requests", 60, "--qps", 3)
    simulate_ok(tmp_path / "a", *args, "--seed", 42)
    # the second run in a fresh interpreter with another hash seed: nothing may depend on process state
    cmd = [sys.executable, "-c", "from simulator.cli import main; main()", "simulate", "--out", str(tmp_path / "b"),
           *map(str, args), "--seed", "42"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "12345"},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    simulate_ok(tmp_path / "c", *args, "--seed", 43)
    for f in ("summary.json", "requests.csv", "iterations.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for f in ("requests.csv", "iterations.csv"):
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes(), f


# --- rejected requests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["sarathi", "vllm", "vllm-v0", "orca", "fastertransformer"])
def test_requests_longer_than_max_model_len_are_shrunk_or_dropped_and_counted(tmp_path, scheduler):
    trace = load_trace("sharegpt", num_requests=40, qps=2.0, seed=42)
    too_long = int(((trace["prompt_tokens"] + trace["output_tokens"]) > 1024).sum())
    assert 0 < too_long < 40
    # shrunk like the Sarathi-Serve artifact: every request runs, and the change is said and recorded
    summary, requests, _, output = simulate_ok(tmp_path / scheduler, "--scheduler", scheduler, "--max-model-len", 1024,
                                               "--num-requests", 40)
    assert summary["workload"]["num_shrunk"] == too_long and summary["workload"]["num_dropped"] == 0
    assert summary["requests_completed"] == 40 and summary["requests_rejected"] == 0
    assert ((requests["prompt_tokens"] + requests["output_tokens"]) <= 1024).all()
    assert f"{too_long} requests shrunk" in output
    # or dropped (and replaced by further draws, so the run still has 40 requests)
    summary, requests, _, output = simulate_ok(tmp_path / f"{scheduler}-drop", "--scheduler", scheduler,
                                               "--max-model-len", 1024, "--num-requests", 40, "--drop-long")
    assert summary["workload"]["num_dropped"] >= too_long and summary["workload"]["num_shrunk"] == 0
    assert summary["requests_completed"] == 40 and len(requests) == 40
    assert "dropped" in output


def test_request_that_cannot_fit_the_kv_cache_is_rejected_and_counted(tmp_path):
    # A device whose memory leaves the tiny model ~100 KV blocks (1600 tokens) after weights and activations.
    tiny = load_model("tiny")
    blocks = 100
    need = tiny.weight_bytes() + activation_reserve_bytes(tiny, 512, 128) + blocks * kv_bytes_per_block(tiny)
    device = write(tmp_path, "small.yaml", f"name: small\nmemory_bytes: {int(need / 0.9) + 1}\n"
                                           "peak_flops: {float32: 1.0e13, float16: 1.0e13}\n"
                                           "memory_bandwidth_bytes_per_s: 1.0e11\n")
    trace = write(tmp_path, "t.csv", "prompt_tokens,output_tokens,arrival_s\n"
                                     "100,10,0\n3000,10,1\n120,8,2\n90,12,3\n")
    summary, requests, iterations, _ = simulate_ok(tmp_path / "kv", "--model", "tiny", "--device", device,
                                                   "--trace", trace)
    # the 3010-token request needs 189 blocks at its peak, the others at most 8
    assert 10 < iterations["kv_blocks_total"].iloc[0] < 189
    assert summary["requests_rejected"] == 1 and summary["requests_completed"] == 3
    assert requests.loc[requests["prompt_tokens"] == 3000, "first_token_s"].isna().all()


# --- bad input --------------------------------------------------------------------------------------------

def test_unknown_model_lists_the_known_ones(tmp_path):
    line = assert_user_error(servesim("simulate", "--model", "GPT-5", "--out", tmp_path), "GPT-5")
    assert all(name in line for name in known_models())


def test_unknown_device_lists_the_known_ones(tmp_path):
    line = assert_user_error(servesim("simulate", "--device", "TPU-v5", "--out", tmp_path), "TPU-v5")
    assert all(name in line for name in known_devices())


@pytest.mark.parametrize("name, text, fragments", [
    ("no_output.csv", "prompt_tokens,arrival_s\n10,0\n", ["output_tokens"]),
    ("azure_no_time.csv", "ContextTokens,GeneratedTokens\n10,5\n", ["TIMESTAMP"]),
    ("zero.csv", "prompt_tokens,output_tokens,arrival_s\n10,5,0\n10,0,1\n", ["line 3", "output_tokens"]),
    ("negative.csv", "prompt_tokens,output_tokens\n-4,5\n", ["line 2", "prompt_tokens"]),
    ("fraction.csv", "prompt_tokens,output_tokens,arrival_s\n10,5,0\n10,5,1\n10.5,3,2\n", ["line 4", "prompt_tokens"]),
    ("word.csv", "prompt_tokens,output_tokens,arrival_s\n10,five,0\n", ["line 2", "output_tokens"]),
    ("unsorted.csv", "prompt_tokens,output_tokens,arrival_s\n10,5,0\n10,3,2\n10,3,1\n", ["line 4", "arrival_s"]),
    ("bad_time.csv", "prompt_tokens,output_tokens,arrival_s\n10,5,0\n10,3,soon\n", ["line 3", "arrival_s"]),
    ("azure_bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,5\n"
                      "yesterday,10,5\n", ["line 3", "TIMESTAMP"]),
    ("azure_unsorted.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,5\n"
                           "2023-11-16 18:15:45.0000000,10,5\n", ["line 3", "TIMESTAMP"]),
    ("mooncake.jsonl", '{"timestamp": 0, "input_length": 10, "output_length": 5}\n{"timestamp": 5, "input_length": 0,'
                       ' "output_length": 5}\n', ["line 2", "input_length"]),
])
def test_bad_trace_files_give_one_line_naming_file_row_and_field(tmp_path, name, text, fragments):
    path = write(tmp_path, name, text)
    assert_user_error(servesim("simulate", "--trace", path, "--qps", 1, "--out", tmp_path / "o"), name, *fragments)


def test_missing_trace_file(tmp_path):
    assert_user_error(servesim("simulate", "--trace", tmp_path / "nope.csv", "--out", tmp_path / "o"), "nope.csv")


def test_unknown_config_key_names_file_and_key(tmp_path):
    cfg = write(tmp_path, "bad.yaml", "scheduler: vllm\ntoken_budgett: 256\n")
    assert_user_error(servesim("simulate", "--config", cfg, "--out", tmp_path / "o"), "bad.yaml", "token_budgett")


@pytest.mark.parametrize("text, key", [
    ("tp: 0\n", "tp"),
    ("scheduler: fcfs\n", "scheduler"),
    ("token_budget: -5\n", "token_budget"),
    ("qps: fast\n", "qps"),
    ("gpu_memory_utilization: high\n", "gpu_memory_utilization"),
    ("watermark: 2\n", "watermark"),
    ("trace: 123\n", "trace"),
    ("seed: abc\n", "seed"),
    ("arrival: weibull\n", "arrival"),
])
def test_bad_config_value_names_file_and_key(tmp_path, text, key):
    cfg = write(tmp_path, "bad.yaml", text)
    assert_user_error(servesim("simulate", "--config", cfg, "--num-requests", 5, "--out", tmp_path / "o"),
                      "bad.yaml", key)


def test_missing_config_file(tmp_path):
    assert_user_error(servesim("simulate", "--config", tmp_path / "none.yaml", "--out", tmp_path / "o"), "none.yaml")


def test_bad_flag_values_are_one_line_errors(tmp_path):
    assert_user_error(servesim("simulate", "--qps", -1, "--out", tmp_path), "qps")
    assert_user_error(servesim("simulate", "--num-requests", 0, "--out", tmp_path), "num_requests")
    assert_user_error(servesim("simulate", "--tp", 3, "--num-requests", 5, "--out", tmp_path), "tp=3")


def test_model_too_big_for_the_device(tmp_path):
    assert_user_error(servesim("simulate", "--model", "Llama-2-70B", "--num-requests", 5, "--out", tmp_path),
                      "Llama-2-70B", "A100-80GB-SXM")


def test_device_spec_without_the_models_dtype_is_a_one_line_error(tmp_path):
    device = write(tmp_path, "fp32only.yaml", "name: fp32only\nmemory_bytes: 85899345920\n"
                                              "peak_flops: {float32: 1.0e13}\nmemory_bandwidth_bytes_per_s: 1.0e12\n")
    assert_user_error(servesim("simulate", "--device", device, "--num-requests", 5, "--out", tmp_path / "o"),
                      "fp32only.yaml", "float16")


# --- more runs --------------------------------------------------------------------------------------------

def test_preemptions_are_counted_consistently(tmp_path):
    # ~100 KV blocks for the tiny model; six 200-token prompts growing to 299 tokens (19 blocks each) at once
    # under vLLM v0: all are admitted (13 blocks each) and decodes must preempt.
    tiny = load_model("tiny")
    need = tiny.weight_bytes() + activation_reserve_bytes(tiny, 4096, 128) + 100 * kv_bytes_per_block(tiny)
    device = write(tmp_path, "small.yaml", f"name: small\nmemory_bytes: {int(need / 0.9) + 1}\n"
                                           "peak_flops: {float32: 1.0e13, float16: 1.0e13}\n"
                                           "memory_bandwidth_bytes_per_s: 1.0e11\n")
    trace = write(tmp_path, "t.csv", "prompt_tokens,output_tokens,arrival_s\n" + "200,100,0\n" * 6)
    summary, requests, iterations, _ = simulate_ok(tmp_path / "p", "--model", "tiny", "--device", device,
                                                   "--trace", trace, "--scheduler", "vllm-v0")
    assert 13 < iterations["kv_blocks_total"].iloc[0] < 6 * 19       # each fits alone, not all six together
    assert summary["requests_completed"] == 6
    assert summary["num_preemptions"] > 0
    assert summary["num_preemptions"] == requests["num_preemptions"].sum()
    assert (iterations["kv_blocks_used"] <= iterations["kv_blocks_total"]).all()
    # recomputation re-prefills tokens, so more prefill tokens than prompt tokens were computed
    assert iterations["num_prefill_tokens"].sum() > requests["prompt_tokens"].sum()


def test_idle_replica_wakes_up_for_a_late_arrival(tmp_path):
    trace = write(tmp_path, "t.csv", "prompt_tokens,output_tokens,arrival_s\n100,3,0\n100,3,50\n")
    _, requests, iterations, _ = simulate_ok(tmp_path / "i", "--trace", trace)
    assert requests["scheduling_delay_s"].tolist() == [0.0, 0.0]
    assert requests.loc[1, "scheduled_s"] == 50.0
    assert iterations["start_s"].iloc[-3] == 50.0


def test_progress_bar_and_specs_command(tmp_path):
    result = servesim("simulate", "--num-requests", 10, "--progress", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    result = servesim("specs")
    assert result.exit_code == 0
    assert all(name in result.output for name in known_models() + known_devices())


SHARED_AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "azure_llm_inference_2023_conv.csv"


def test_real_azure_trace_with_its_own_arrival_times(tmp_path):
    if not SHARED_AZURE.is_file():
        pytest.skip(f"{SHARED_AZURE} is absent (shared data not mounted)")
    summary, requests, _, _ = simulate_ok(tmp_path / "az", "--trace", SHARED_AZURE, "--num-requests", 2000)
    raw = pd.read_csv(SHARED_AZURE, nrows=2000)
    stamps = pd.to_datetime(raw["TIMESTAMP"])
    arrivals = (stamps - stamps.iloc[0]).dt.total_seconds()
    assert requests["arrival_s"].to_numpy() == pytest.approx(arrivals.to_numpy(), abs=1e-6)
    assert requests["prompt_tokens"].tolist() == raw["ContextTokens"].tolist()
    assert summary["requests_completed"] + summary["requests_rejected"] == 2000
    assert summary["requests_completed"] > 1900


# --- the command line itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, option", [
    (["sweep", "--config", "sweep.yaml", "--jobs", 0], "--jobs"),
    (["sweep", "--config", "sweep.yaml", "--limit", 0], "--limit"),
    (["regress", "--jobs", 0], "--jobs"),
    (["reproduce", "--jobs", 0], "--jobs"),
    (["replicas", "--target-qps", 1, "--max-replicas", 0], "--max-replicas"),
    (["capacity", "--max-trials", 0], "--max-trials"),
    (["capacity", "--max-trials", 1], "--max-trials"),          # a search needs a bracket: two trials at least
])
def test_count_options_below_their_minimum_are_one_line_usage_errors(args, option):
    assert_user_error(servesim(*args), option, "not in the range")


SIMULATION_COMMANDS = ("simulate", "capacity", "replicas", "validate")     # the commands with ``simulate_options``
CLI_MODULES = {"simulator.cli", "simulator.cli_experiments", "simulator.cli_profile", "simulator.cli_validate",
               "simulator.observe.cli"}


def _command(name):
    command = main.get_command(None, name)          # imports a lazily loaded command
    assert command is not None, name
    return command


@pytest.mark.parametrize("name", SIMULATION_COMMANDS)
def test_every_config_key_is_a_flag_of_the_same_name(name):
    by_flag = {opt: p for p in _command(name).params for opt in p.opts}
    for key in SimConfig.keys():
        flag = "--" + key.replace("_", "-")
        assert flag in by_flag, (name, flag)
        assert by_flag[flag].name == key, (name, flag, by_flag[flag].name)


def test_every_option_shows_its_default_in_help():
    """Each option of the commands in the CLI modules shows ``[default: ...]`` in ``--help`` (set on the option
    itself, not inherited from the group's context) unless it is a flag, required, or ``--config``."""
    import click

    names = [n for n in main.list_commands(None) if _command(n).callback.__module__ in CLI_MODULES]
    assert set(SIMULATION_COMMANDS) <= set(names) and {"sweep", "regress", "profile", "fit", "plot"} <= set(names)
    missing = []
    for name in names:
        command = _command(name)
        ctx = click.Context(command, info_name=name)
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag or param.required or "--config" in param.opts:
                continue
            record = param.get_help_record(ctx)
            if not param.show_default or record is None or "[default: " not in record[1]:
                missing.append(f"{name} {param.opts[0]}")
    assert not missing, missing


def test_simulate_parquet_with_block_size_memory_utilization_and_watermark(tmp_path):
    out = tmp_path / "h2check"
    result = servesim("simulate", "--block-size", 32, "--gpu-memory-utilization", 0.85, "--watermark", 0,
                      "--format", "parquet", "--num-requests", 100, "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    requests = pd.read_parquet(out / "requests.parquet")
    iterations = pd.read_parquet(out / "iterations.parquet")
    assert not (out / "requests.csv").exists() and not (out / "iterations.csv").exists()
    assert len(requests) == 100 and requests["request_id"].tolist() == list(range(100))
    assert len(iterations) == summary["num_iterations"] > 0
    assert summary["requests_completed"] + summary["requests_rejected"] == 100
    config = summary["config"]
    assert (config["block_size"], config["gpu_memory_utilization"], config["watermark"]) == (32, 0.85, 0)
