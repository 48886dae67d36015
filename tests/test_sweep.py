"""Sweeps: grid expansion, resumable row-by-row results, interrupted == uninterrupted, local and Ray backends."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import simulator.sweep as sweep_module
from simulator.cli import main
from simulator.sweep import SweepError, Sweep, load_sweep, point_key, run_sweep

BASE = {"model": "tiny", "device": "cpu", "max_model_len": 8192, "allow_long_max_model_len": True, "num_requests": 48, "tbt_slo": 0.05}
CAPACITY_YAML = """
mode: capacity
base: {model: tiny, device: cpu, max_model_len: 8192, allow_long_max_model_len: true, num_requests: 48, tbt_slo: 0.05}
grid:
  scheduler: [vllm, orca, sarathi]
  token_budget: [64, 128, 256]
search: {rel_tol: 0.05, max_trials: 12, qps_start: 1.0}
"""


def _write(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_expansion_drops_irrelevant_keys_and_merges_mappings(tmp_path):
    spec = Sweep("qps", dict(BASE), {"scheduler": ["vllm", "sarathi"], "token_budget": [256, 512],
                                     "workload": [{"trace": "sharegpt"}, {"trace": "arxiv", "max_model_len": 16384}],
                                     "qps": [1.0]})
    points = spec.points()
    assert len(points) == 2 * 1 + 2 * 2                     # vLLM once per workload, Sarathi once per budget
    assert [p["scheduler"] for p in points[:2]] == ["vllm", "vllm"] and "token_budget" not in points[0]
    assert points[1]["trace"] == "arxiv" and points[1]["max_model_len"] == 16384
    assert spec.columns()[:10] == ["point_key", "model", "device", "max_model_len", "allow_long_max_model_len",
                                   "num_requests", "tbt_slo", "scheduler", "token_budget", "trace"]


def test_point_key_is_stable_and_covers_the_search_settings():
    p = {"scheduler": "sarathi", "token_budget": 512}
    assert point_key(p, "capacity", {}) == point_key(dict(reversed(list(p.items()))), "capacity", {})
    assert point_key(p, "capacity", {}) != point_key(p, "capacity", {"rel_tol": 0.01})
    assert point_key(p, "qps", {}) == point_key(p, "qps", {"rel_tol": 0.01})     # search settings: capacity only


@pytest.mark.parametrize("text, message", [
    ("mode: fast\n", "mode: unknown 'fast'"),
    ("base: {token_budgett: 5}\n", "base: unknown key 'token_budgett'"),
    ("grid: {scheduler: vllm}\n", "grid: scheduler: expected a non-empty list"),
    ("grid: {w: [{trace: sharegpt, colour: red}]}\n", "grid: w: unknown key 'colour'"),
    ("search: {tolerance: 1}\n", "search: unknown key 'tolerance'"),
    ("grids: {}\n", "unknown section 'grids'"),
    ("grid: {scheduler: [vllm, slowest]}\n", "point .*: scheduler: .*'slowest'"),
])
def test_bad_sweep_files_name_the_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(path).points()
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def _count_points(monkeypatch):
    calls = []
    real = sweep_module.run_point

    def counting(point, mode, search):
        calls.append(point)
        return real(point, mode, search)

    monkeypatch.setattr(sweep_module, "run_point", counting)
    return calls


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    spec = load_sweep(_write(tmp_path, CAPACITY_YAML))
    n = len(spec.points())
    assert n == 5
    whole = run_sweep(spec, tmp_path / "whole", jobs=1)
    assert len(whole) == n and whole["capacity_qps"].gt(0).all()
    calls = _count_points(monkeypatch)
    partial = run_sweep(spec, tmp_path / "resumed", jobs=1, limit=2)        # "killed" after two points ...
    assert len(partial) == 2 and len(calls) == 2
    with (tmp_path / "resumed" / "sweep.csv").open("a") as f:
        f.write("0123456789ab,tiny,cpu,81")                                  # ... in the middle of a row
    resumed = run_sweep(spec, tmp_path / "resumed", jobs=1)
    assert len(calls) == n                                                   # only the remaining points ran
    assert (tmp_path / "resumed" / "sweep.csv").read_bytes() == (tmp_path / "whole" / "sweep.csv").read_bytes()
    pd.testing.assert_frame_equal(resumed, whole)
    run_sweep(spec, tmp_path / "resumed", jobs=1)                           # complete: nothing to redo
    assert len(calls) == n
    assert len(list((tmp_path / "whole" / "points").glob("*.json"))) == n


def test_a_table_from_another_sweep_is_refused(tmp_path):
    spec = load_sweep(_write(tmp_path, CAPACITY_YAML))
    run_sweep(spec, tmp_path / "out", jobs=1, limit=1)
    other = Sweep("qps", dict(BASE), {"qps": [1.0]})
    with pytest.raises(SweepError, match="written by a different sweep"):
        run_sweep(other, tmp_path / "out", jobs=1)


def test_killing_a_sweep_process_halfway_then_rerunning(tmp_path):
    config = _write(tmp_path, CAPACITY_YAML)
    cmd = [sys.executable, "-c", "from simulator.cli import main; main()", "sweep", "--config", str(config), "--jobs", "1", "--no-plot",
           "--no-progress"]
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, capture_output=True)
    table = tmp_path / "killed" / "sweep.csv"
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if table.exists() and table.read_text().count("\n") >= 3:            # header + 2 rows
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_at_kill = table.read_text().count("\n") - 1
    if rows_at_kill >= 5:
        pytest.skip("the sweep finished before it could be killed (machine too fast)")
    out = subprocess.run(cmd + ["--out", str(tmp_path / "killed")], check=True, capture_output=True, text=True)
    assert "5 points" in out.stdout
    assert table.read_bytes() == (tmp_path / "whole" / "sweep.csv").read_bytes()


def test_process_pool_gives_the_same_table(tmp_path):
    spec = Sweep("qps", dict(BASE), {"scheduler": ["vllm", "sarathi"], "qps": [0.5, 2.0]})
    one = run_sweep(spec, tmp_path / "one", jobs=1)
    two = run_sweep(spec, tmp_path / "two", jobs=2)
    assert (tmp_path / "one" / "sweep.csv").read_bytes() == (tmp_path / "two" / "sweep.csv").read_bytes()
    assert list(one["qps"]) == [0.5, 2.0, 0.5, 2.0] and one["tbt_s_p99"].notna().all()
    pd.testing.assert_frame_equal(one, two)


def test_ray_backend_gives_the_same_table(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (optional extra 'ray')")
    spec = Sweep("qps", dict(BASE), {"scheduler": ["vllm", "sarathi"], "qps": [0.5, 2.0]})
    local = run_sweep(spec, tmp_path / "local", jobs=1)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
        remote = run_sweep(spec, tmp_path / "ray", backend="ray")
    finally:
        ray.shutdown()
    assert (tmp_path / "ray" / "sweep.csv").read_bytes() == (tmp_path / "local" / "sweep.csv").read_bytes()
    pd.testing.assert_frame_equal(remote, local)


def test_sweep_cli_with_flags_writes_table_and_plots(tmp_path):
    config = _write(tmp_path, "mode: qps\nbase: {model: tiny, device: cpu, max_model_len: 8192, "
                              "allow_long_max_model_len: true}\n"
                              "grid: {scheduler: [sarathi]}\n")
    out = CliRunner().invoke(main, ["sweep", "--config", str(config), "--out", str(tmp_path / "out"), "--jobs", "1",
                                    "--grid", "qps=0.5,1.5", "--grid", "token_budget=128,256",
                                    "--set", "num_requests=32", "--no-progress"])
    assert out.exit_code == 0, out.output
    table = pd.read_csv(tmp_path / "out" / "sweep.csv")
    assert list(zip(table["token_budget"], table["qps"])) == [(128, 0.5), (256, 0.5), (128, 1.5), (256, 1.5)]  # flag order
    assert (table["num_requests"] == 32).all() and (table["requests_completed"] == 32).all()
    assert (tmp_path / "out" / "latency_vs_qps.png").exists() and (tmp_path / "out" / "latency_vs_qps.svg").exists()


def test_sweep_cli_bad_config_is_a_one_line_error(tmp_path):
    out = CliRunner().invoke(main, ["sweep", "--config", str(_write(tmp_path, "mode: fast\n"))])
    assert out.exit_code == 2 and out.output.startswith("error: ") and "mode: unknown 'fast'" in out.output


@pytest.mark.parametrize("item", ["qps=", "qps=1,", "=1,2"])
def test_sweep_grid_flag_with_an_empty_value_is_an_error(tmp_path, item):
    config = _write(tmp_path, "mode: qps\nbase: {model: tiny, device: cpu, num_requests: 8}\ngrid: {qps: [1.0]}\n")
    out = CliRunner().invoke(main, ["sweep", "--config", str(config), "--out", str(tmp_path / "out"),
                                    "--grid", item, "--no-plot"])
    assert out.exit_code == 2 and out.output.startswith("error: ") and repr(item) in out.output, out.output
    assert not (tmp_path / "out" / "sweep.csv").exists()
