"""Options a run does not use are said and recorded, never silently dropped (``simulation.ignored_options``)."""
import json

from click.testing import CliRunner

from simulator.cli import main
from simulator.config import SimConfig
from simulator.simulation import ignored_options


def test_another_schedulers_option_is_ignored_with_the_reason():
    got = ignored_options(SimConfig(scheduler="vllm", token_budget=1024))
    assert got == {"token_budget": "scheduler vllm does not use it (only sarathi, simple-chunking)"}
    assert ignored_options(SimConfig(scheduler="sarathi", token_budget=1024)) == {}
    assert "max_num_batched_tokens" in ignored_options(SimConfig(scheduler="sarathi", max_num_batched_tokens=4096))


def test_cluster_and_closed_loop_options_that_do_not_apply():
    assert set(ignored_options(SimConfig(router="least-tokens", decode_tp=2))) == {"router", "decode_tp"}
    assert ignored_options(SimConfig(router="least-tokens", replicas=2)) == {}
    assert set(ignored_options(SimConfig(concurrency=4, qps=3.0))) == {"qps"}
    assert set(ignored_options(SimConfig(prefill_replicas=1, decode_replicas=1, replicas=3))) == {"replicas"}
    assert ignored_options(SimConfig()) == {}


def test_simulate_prints_and_records_them(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["simulate", "--scheduler", "vllm", "--token-budget", "1024",
                                       "--num-requests", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: --token-budget ignored: scheduler vllm does not use it" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["ignored_options"]) == {"token_budget"}
