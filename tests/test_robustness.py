"""Robustness (issue 12): killed runs, torn files, foreign tables, locks, absurd numbers and unreadable paths.

Each test names the fault it covers (the numbering of issue 12). Commands run as real subprocesses where a kill
is the point, otherwise through click's CliRunner. Permission denial is real for a non-root user and simulated
(``open`` raising PermissionError for that path) for root, who may read anything.
"""
from __future__ import annotations

import builtins
import csv
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import simulator.sweep as sweep_module
from simulator.cli import main
from simulator.sweep import Sweep, SweepError, run_sweep
from traces import TraceError, arrival_times, load_trace, shrink_lengths, validate_trace
from traces.tables import LOCK_NAME

CLI = [sys.executable, "-c", "from simulator.cli import main; main()"]
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (the 'profile' extra)")
BASE = {"model": "tiny", "device": "cpu", "max_model_len": 8192, "allow_long_max_model_len": True,
        "num_requests": 24}
# capacity searches of thousands of requests: each point runs far longer than the tests wait
SLOW_SWEEP = """
mode: capacity
base: {model: tiny, device: cpu, max_model_len: 8192, allow_long_max_model_len: true, num_requests: 4000,
       tbt_slo: 0.05}
grid: {scheduler: [vllm, orca, sarathi]}
search: {rel_tol: 0.001, max_trials: 40, qps_start: 1.0}
"""
TRACE = "prompt_tokens,output_tokens,arrival_s\n40,10,0.0\n90,6,0.001\n150,12,0.002\n30,8,0.05\n"


def _fast_sweep() -> Sweep:
    return Sweep("qps", dict(BASE), {"qps": [1.0, 2.0]})


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _one_line_error(code, text, *needles):
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in text, text
    for needle in needles:
        assert needle in lines[0], text
    return lines[0]


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def deny(monkeypatch):
    """``deny(path)``: reading ``path`` fails with PermissionError (chmod 000; for root also ``open`` patched)."""
    denied = []
    real_open, real_io_open = builtins.open, io.open

    def guarded(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file).absolute() in denied:
                raise PermissionError(13, "Permission denied", str(file))
            return real(file, *args, **kwargs)
        return opener

    def deny_path(path):
        path = Path(path).absolute()
        path.chmod(0)
        denied.append(path)
        if os.geteuid() == 0:
            monkeypatch.setattr(builtins, "open", guarded(real_open))
            monkeypatch.setattr(io, "open", guarded(real_io_open))
        return path

    yield deny_path
    for path in denied:
        path.chmod(0o644)


# --- 1. a killed sweep takes its workers along -----------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_1_killing_a_sweep_leaves_no_worker_running(tmp_path, sig):
    psutil = pytest.importorskip("psutil")
    config = tmp_path / "slow.yaml"
    config.write_text(SLOW_SWEEP)
    out = tmp_path / "out"
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(CLI + ["sweep", "--config", str(config), "--out", str(out), "--jobs", "2",
                                       "--no-plot", "--no-progress"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        parent = psutil.Process(proc.pid)
        _wait_for(lambda: len(parent.children(recursive=True)) >= 2, 60, "two worker processes")
        time.sleep(1.0)                                            # the workers are running points now
        workers = parent.children(recursive=True)
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def alive():
        running = []
        for w in workers:
            try:
                if w.is_running() and w.status() != psutil.STATUS_ZOMBIE:
                    running.append(w)
            except psutil.NoSuchProcess:
                pass
        return running

    try:
        _wait_for(lambda: not alive(), 10, "the workers to end")
    finally:
        for w in alive():                                          # do not leave orphans behind a failure
            w.kill()
    assert proc.returncode == -sig
    lock = (out / LOCK_NAME).read_text()
    assert lock == ("" if sig == signal.SIGTERM else f"{proc.pid} sweep\n")   # SIGTERM: released on the way out


# --- 2. every JSON (and figure) is written to a temporary name and renamed -------------------------------------

@pytest.fixture
def opened_for_writing(monkeypatch):
    """Names of the files opened for writing (``open``/``io.open``, as ``Path.write_text`` does)."""
    names = []

    def spy(real):
        def opener(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                names.append(Path(file).name)
            return real(file, mode, *args, **kwargs)
        return opener

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    return names


def _direct_writes(names):
    return sorted({n for n in names if n.endswith((".json", ".png")) and not n.endswith(".tmp")})


def test_2_sweep_point_files_are_written_atomically(tmp_path, opened_for_writing):
    spec = Sweep("capacity", {**BASE, "tbt_slo": 0.05}, {"scheduler": ["sarathi"]},
                 {"rel_tol": 0.2, "max_trials": 4, "qps_start": 1.0})
    run_sweep(spec, tmp_path, jobs=1)
    assert len(list((tmp_path / "points").glob("*.json"))) == 1
    assert any(n.endswith(".json.tmp") for n in opened_for_writing)
    assert _direct_writes(opened_for_writing) == []


@needs_torch
def test_2_profile_meta_is_written_atomically(tmp_path, opened_for_writing):
    from profiler.run import run_profile
    from cost_models.specs import load_model

    run_profile(load_model("tiny"), device="cpu", out_dir=tmp_path, operators=["add"], max_tokens=2,
                progress=False)
    assert json.loads((tmp_path / "meta.json").read_text())["complete"]
    assert _direct_writes(opened_for_writing) == []


@needs_torch
def test_2_validate_outputs_are_written_atomically(tmp_path, opened_for_writing):
    trace = tmp_path / "small.csv"
    trace.write_text(TRACE)
    code, text = _invoke("validate", "--model", "tiny", "--device", "cpu", "--trace", trace, "--token-budget", 64,
                         "--exec-device", "cpu", "--max-iterations", 3, "--warmup", 0, "--repeats", 1,
                         "--out", tmp_path / "val")
    assert code == 0, text
    assert {"validation_meta.json", "validation_summary.json", "validation.png"} <= {
        p.name for p in (tmp_path / "val").iterdir()}
    assert _direct_writes(opened_for_writing) == []


# --- 3. resume drops a torn last row, never appends to it ------------------------------------------------------

def test_3_sweep_resume_drops_a_last_row_with_the_wrong_number_of_fields(tmp_path, capsys):
    spec = _fast_sweep()
    run_sweep(spec, tmp_path / "whole", jobs=1)
    run_sweep(spec, tmp_path / "resumed", jobs=1, limit=1)
    table = tmp_path / "resumed" / "sweep.csv"
    with table.open("a") as f:
        f.write("0123456789ab,tiny,cpu\n")                  # a row cut short, yet ended by a newline
    capsys.readouterr()
    run_sweep(spec, tmp_path / "resumed", jobs=1)
    err = capsys.readouterr().err
    assert "note: " in err and "line 3: dropped a torn last row (3 fields, expected" in err
    assert table.read_bytes() == (tmp_path / "whole" / "sweep.csv").read_bytes()


def _profile(out, **kw):
    from cost_models.specs import load_model
    from profiler.grid import GridSpec
    from profiler.run import run_profile
    from profiler.timing import TimingConfig

    run_profile(load_model("tiny"), device="cpu", out_dir=out, operators=["add", "mlp_act"], progress=False,
                grid=GridSpec(max_tokens=12, dense_tokens=4),
                timing=TimingConfig(warmup=0, min_samples=2, max_samples=3, min_run_time_s=0.0), **kw)


def _profile_keys(path):
    from profiler.grid import shape_key

    with Path(path).open(newline="") as f:
        return [shape_key(r) for r in csv.DictReader(f)]


@needs_torch
@pytest.mark.parametrize("damage", ["unparsable time", "fields missing", "no newline"])
def test_3_profile_resume_repairs_a_torn_last_row(tmp_path, damage, capsys):
    from profiler.schema import read_profile

    _profile(tmp_path)
    path = tmp_path / "profile.csv"
    whole = _profile_keys(path)
    lines = path.read_text().splitlines(keepends=True)
    last = lines[-1].rstrip("\n").split(",")
    if damage == "unparsable time":
        last[12] = "0.0001x"                                # time_median_s
        torn = ",".join(last) + "\n"
    elif damage == "fields missing":
        torn = ",".join(last[:7]) + "\n"
    else:
        torn = ",".join(last)[:30]
    path.write_text("".join(lines[:-1]) + torn)
    capsys.readouterr()
    _profile(tmp_path)
    err = capsys.readouterr().err
    assert f"note: {path}: line {len(lines)}: dropped a torn last row" in err, err
    assert sorted(_profile_keys(path)) == sorted(whole) and len(read_profile(tmp_path)) == len(whole)


@needs_torch
def test_3_validate_resume_drops_a_torn_last_row(tmp_path):
    trace = tmp_path / "small.csv"
    trace.write_text(TRACE)
    out = tmp_path / "val"
    args = ("validate", "--model", "tiny", "--device", "cpu", "--trace", trace, "--token-budget", 64,
            "--exec-device", "cpu", "--warmup", 0, "--repeats", 1, "--threads", 1, "--out", out)
    code, text = _invoke(*args)
    assert code == 0, text
    path = out / "validation.csv"
    full = pd.read_csv(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])   # killed in the middle of a row
    code, text = _invoke(*args)
    assert code == 0, text
    assert f"line {len(lines) - 2}: dropped a torn last row (no newline at the end)" in text
    again = pd.read_csv(path)
    assert again["iteration"].tolist() == full["iteration"].tolist()        # each once, in order
    assert again["measured_s"].gt(0).all() and again.notna().all().all()


# --- 4. a foreign table is detected before any point runs ------------------------------------------------------

def test_4_rows_of_another_sweep_are_refused_before_any_point_runs(tmp_path, monkeypatch):
    spec = _fast_sweep()
    out = tmp_path / "out"
    out.mkdir()
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(spec.columns())
        writer.writerow(["fedcba987654"] + [""] * (len(spec.columns()) - 1))
    calls = []
    monkeypatch.setattr(sweep_module, "run_point", lambda *a: calls.append(a))
    with pytest.raises(SweepError, match=r"sweep\.csv: foreign table: holds 1 point\(s\) not in this sweep"):
        run_sweep(spec, out, jobs=1)
    assert calls == []


# --- 5. one sweep per --out: a lock ----------------------------------------------------------------------------

def test_5_a_second_sweep_on_one_out_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    config = tmp_path / "slow.yaml"
    config.write_text(SLOW_SWEEP)
    out = tmp_path / "out"
    proc = subprocess.Popen(CLI + ["sweep", "--config", str(config), "--out", str(out), "--jobs", "1",
                                   "--no-plot", "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (out / "sweep.csv").exists(), 60, "the first sweep to start")
        with pytest.raises(SweepError, match=rf"servesim sweep \(pid {proc.pid}\) is writing to this folder"):
            run_sweep(_fast_sweep(), out, jobs=1)
    finally:
        proc.kill()
        proc.wait()
    (out / "sweep.csv").unlink()                             # keep only the dead sweep's lock file
    capsys.readouterr()
    run_sweep(_fast_sweep(), out, jobs=1, limit=1)
    err = capsys.readouterr().err
    assert f"note: {out / LOCK_NAME}: took over the lock left by servesim sweep (pid {proc.pid}" in err


# --- 6. counts below 1 are errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["sweep", "--limit", "0"], "'--limit': 0 is not in the range x>=1"),
    (["sweep", "--limit", "-1"], "'--limit': -1 is not in the range x>=1"),
    (["sweep", "--jobs", "0"], "'--jobs': 0 is not in the range x>=1"),
    (["profile", "--threads", "0"], "'--threads': 0 is not in the range x>=1"),
    (["profile", "--max-tokens", "0"], "'--max-tokens': 0 is not in the range x>=1"),
    (["profile", "--max-context", "0"], "'--max-context': 0 is not in the range x>=1"),
    (["profile", "--tp", "0"], "'--tp': 0 is not in the range x>=1"),
    (["fit", "--seed", "-1"], "'--seed': -1 is not in the range x>=0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_6_counts_below_their_minimum_are_one_line_errors(tmp_path, args, needle):
    config = tmp_path / "s.yaml"
    config.write_text("mode: qps\nbase: {model: tiny, device: cpu, num_requests: 4}\ngrid: {qps: [1.0]}\n")
    extra = {"sweep": ["--config", config, "--no-plot"],
             "profile": ["--model", "tiny", "--exec-device", "cpu", "--operators", "add", "--max-tokens", "2"],
             "fit": [tmp_path]}[args[0]]
    code, text = _invoke(args[0], *extra, *args[1:], "--out", tmp_path / "out")
    _one_line_error(code, text, needle)


# --- 7. token counts that overflow int64 -----------------------------------------------------------------------

@pytest.mark.parametrize("name, text, where", [
    ("big.csv", "prompt_tokens,output_tokens\n10,5\n99999999999999999999,5\n", "line 3: prompt_tokens"),
    ("wrap.csv", "prompt_tokens,output_tokens\n4611686018427387904,4611686018427387904\n", "line 2: prompt_tokens"),
    ("float.jsonl", '{"timestamp": 0, "input_length": 1e30, "output_length": 5}\n', "line 1: input_length"),
    ("int.jsonl", '{"timestamp": 0, "input_length": 7, "output_length": 99999999999999999999}\n',
     "line 1: output_length"),
])
def test_7_token_counts_beyond_int64_are_rejected_with_their_line(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError, match=f"{name}: {where}: .*more than 2147483647"):
        with np.errstate(all="raise"):                      # no silent wrap-around on the way
            load_trace(path, qps=1.0, retime=True, max_total_tokens=4096)


def test_7_shrinking_is_exact_for_huge_values():
    prompt = np.array([2**62, 3 * 10**18, 9000], dtype=np.int64)
    output = np.array([2**62, 10**18, 1000], dtype=np.int64)
    new_prompt, new_output, over = shrink_lengths(prompt, output, 8192)
    assert over.tolist() == [True, True, True]               # 2**62 + 2**62 does not wrap to a negative total
    assert new_prompt.tolist() == [4096, 6144, 7372] and new_output.tolist() == [4096, 2048, 819]
    assert (new_prompt + new_output <= 8192).all() and (new_prompt >= 1).all()
    df = pd.DataFrame({"request_id": [0], "arrival_s": [0.0], "prompt_tokens": [2**40], "output_tokens": [1]})
    with pytest.raises(TraceError, match="row 0: prompt_tokens: must be <= 2147483647"):
        validate_trace(df)


# --- 8. absurd times are errors, not zero latencies ------------------------------------------------------------

@pytest.mark.parametrize("name, text, where", [
    ("far.csv", "prompt_tokens,output_tokens,arrival_s\n10,5,0\n10,5,1e300\n", "line 3: arrival_s"),
    ("inf.csv", "prompt_tokens,output_tokens,arrival_s\n10,5,0\n10,5,inf\n", "line 3: arrival_s"),
    ("far.jsonl", '{"timestamp": 0, "input_length": 7, "output_length": 5}\n'
                  '{"timestamp": 1e300, "input_length": 7, "output_length": 5}\n', "line 2: timestamp"),
])
def test_8_absurd_arrival_times_in_a_trace_are_errors_naming_the_line(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError, match=f"{name}: {where}: "):
        load_trace(path)


def test_8_a_qps_spreading_arrivals_over_ages_is_an_error_with_the_reason(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(TraceError, match=r"qps: 1e-300 requests/s: 10 arrivals would span about 1e\+301 s, beyond"):
        arrival_times(10, 1e-300, rng)
    with pytest.raises(TraceError, match="would span"):
        arrival_times(1000, 1e-7, rng)                         # 1e10 s
    assert arrival_times(1000, 1e-6, rng)[-1] > 0               # 1e9 s: the limit itself is allowed
    with pytest.raises(TraceError, match="would span"):
        load_trace("sharegpt", num_requests=10, qps=1e-300)
    code, text = _invoke("simulate", "--model", "tiny", "--device", "cpu", "--num-requests", 10, "--qps", "1e-300",
                         "--out", tmp_path / "sim")
    _one_line_error(code, text, "would span about 1e+301 s")
    df = pd.DataFrame({"request_id": [0], "arrival_s": [1e300], "prompt_tokens": [1], "output_tokens": [1]})
    with pytest.raises(TraceError, match=r"row 0: arrival_s: must be <= 1e\+09 s"):
        validate_trace(df)


# --- 9. unreadable input and unwritable output: one-line errors ------------------------------------------------

def test_9_load_trace_of_an_unreadable_file_or_a_folder(tmp_path, deny):
    path = tmp_path / "t.csv"
    path.write_text(TRACE)
    deny(path)
    with pytest.raises(TraceError, match=r"t\.csv: cannot read: Permission denied"):
        load_trace(path)
    with pytest.raises(TraceError, match="not a regular file"):
        load_trace(tmp_path)


def _commands(tmp_path):
    """Each command of these modules with a valid set of arguments but the --out, as a dict."""
    config = tmp_path / "s.yaml"
    config.write_text("mode: qps\nbase: {model: tiny, device: cpu, num_requests: 4}\ngrid: {qps: [1.0]}\n")
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "profile.csv").write_text("operator\n")
    return {"sweep": ["sweep", "--config", config, "--jobs", 1, "--no-plot"],
            "profile": ["profile", "--model", "tiny", "--exec-device", "cpu", "--operators", "add", "--max-tokens", 2],
            "fit": ["fit", profile],
            "validate": ["validate", "--model", "tiny", "--device", "cpu", "--num-requests", 4, "--max-iterations",
                         2, "--exec-device", "cpu"]}


@pytest.mark.parametrize("command", ["sweep", "profile", "fit", "validate"])
def test_9_an_unwritable_out_is_a_one_line_error(tmp_path, command):
    if command in ("profile", "validate") and importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch")
    (tmp_path / "file").write_text("")
    code, text = _invoke(*_commands(tmp_path)[command], "--out", tmp_path / "file" / "sub")
    _one_line_error(code, text, "file/sub: cannot create the output folder: Not a directory")


def test_9_unreadable_inputs_are_one_line_errors(tmp_path, deny):
    cmds = _commands(tmp_path)
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "sweep.csv").mkdir()              # the table is a folder
    code, text = _invoke(*cmds["sweep"], "--out", tmp_path / "tables")
    _one_line_error(code, text, "sweep.csv: cannot read: Is a directory")
    config = deny(cmds["sweep"][2])
    code, text = _invoke(*cmds["sweep"], "--out", tmp_path / "s")
    _one_line_error(code, text, f"{config.name}: cannot read: Permission denied")
    profile_csv = deny(tmp_path / "profile" / "profile.csv")
    code, text = _invoke(*cmds["fit"], "--out", tmp_path / "m")
    _one_line_error(code, text, f"{profile_csv}: cannot read: Permission denied")
    trace = tmp_path / "t.csv"
    trace.write_text(TRACE)
    deny(trace)
    code, text = _invoke("simulate", "--model", "tiny", "--device", "cpu", "--trace", trace,
                         "--out", tmp_path / "sim")
    _one_line_error(code, text, "t.csv: cannot read: Permission denied")


@needs_torch
def test_9_validate_with_an_unreadable_trace(tmp_path, deny):
    trace = tmp_path / "t.csv"
    trace.write_text(TRACE)
    deny(trace)
    code, text = _invoke("validate", "--model", "tiny", "--device", "cpu", "--trace", trace, "--exec-device", "cpu",
                         "--out", tmp_path / "val")
    _one_line_error(code, text, "t.csv: cannot read: Permission denied")


# --- 10. internal errors carry the command and the --debug hint (simulator/cli_options.py, the lead's) ---------

@pytest.mark.skipif(not any(p.name == "debug" for p in main.params),
                    reason="servesim --debug is not there yet (proposed for simulator/cli.py and cli_options.py)")
def test_10_an_internal_error_names_the_command_and_hints_at_debug(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sweep_module, "run_sweep", boom)
    args = _commands(tmp_path)["sweep"] + ["--out", tmp_path / "s"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == (
        "error: internal error in servesim sweep: RuntimeError: boom (rerun with --debug for the traceback)")
    result = CliRunner().invoke(main, ["--debug"] + [str(a) for a in args])
    assert isinstance(result.exception, RuntimeError)


# --- 11. profile and validate killed at the wrong moment resume ------------------------------------------------

def _kill_when(cmd, condition, timeout=120):
    proc = subprocess.Popen(CLI + [str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: proc.poll() is not None or condition(), timeout, "the kill point")
    finally:
        proc.kill()
        proc.wait()


@needs_torch
def test_11_profile_killed_at_several_points_resumes_to_the_full_profile(tmp_path):
    from profiler.schema import read_profile

    cmd = ["profile", "--model", "tiny", "--exec-device", "cpu", "--operators", "add", "--max-tokens", 256]
    whole = tmp_path / "whole"
    code, text = _invoke(*cmd, "--out", whole)
    assert code == 0, text
    expected = sorted(_profile_keys(whole / "profile.csv"))
    assert len(expected) > 48                                # more than one block of rows

    def rows(out):
        path = out / "profile.csv"
        return path.read_text().count("\n") - 1 if path.exists() else -1

    out = tmp_path / "killed"
    _kill_when(cmd + ["--out", out], lambda: (out / "meta.json").exists())           # before any row
    _kill_when(cmd + ["--out", out], lambda: rows(out) >= 48)                          # after a block
    code, text = _invoke(*cmd, "--out", out)
    assert code == 0, text
    assert sorted(_profile_keys(out / "profile.csv")) == expected

    # killed after the last row but before meta.json said complete; and a meta.json torn by an older servesim
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False, "num_rows": 3}))
    assert _invoke(*cmd, "--out", out)[0] == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["num_rows"] == len(expected)
    text = (out / "meta.json").read_text()
    (out / "meta.json").write_text(text[: len(text) // 2])
    code, text = _invoke(*cmd, "--out", out)
    assert code == 0 and "meta.json: unreadable" in text, text
    assert json.loads((out / "meta.json").read_text())["complete"] and len(read_profile(out)) == len(expected)
    code, text = _invoke(*cmd, "--out", out, "--dtype", "bfloat16")
    _one_line_error(code, text, "dtype")                       # the folder is still guarded


@needs_torch
def test_11_validate_killed_or_torn_resumes(tmp_path):
    cmd = ["validate", "--model", "tiny", "--device", "cpu", "--num-requests", 30, "--qps", 8, "--max-model-len",
           2048, "--max-iterations", 24, "--warmup", 0, "--repeats", 2, "--rounds", 1, "--threads", 1,
           "--exec-device", "cpu"]      # one round: a row is written as soon as its iteration is timed
    out = tmp_path / "val"

    def rows():
        path = out / "validation.csv"
        return path.read_text().count("\n") - 1 if path.exists() else -1

    _kill_when(cmd + ["--out", out], lambda: rows() >= 3)
    assert 0 <= rows() < 24, "the kill came too late to test a resume"
    code, text = _invoke(*cmd, "--out", out)
    assert code == 0, text
    table = pd.read_csv(out / "validation.csv")
    assert len(table) == 24 and table["iteration"].is_unique and table["iteration"].is_monotonic_increasing
    assert math.isfinite(table["measured_s"].sum())

    # a meta file torn before any row was written: start afresh; torn with rows: their settings are unknown
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "validation_meta.json").write_text('{"config": {"mod')
    small = ["validate", "--model", "tiny", "--device", "cpu", "--num-requests", 4, "--max-iterations", 2,
             "--warmup", 0, "--repeats", 1, "--exec-device", "cpu"]
    code, text = _invoke(*small, "--out", fresh)
    assert code == 0 and "validation_meta.json: unreadable, left by an interrupted run before any row" in text
    meta = (fresh / "validation_meta.json").read_text()
    (fresh / "validation_meta.json").write_text(meta[:20])
    code, text = _invoke(*small, "--out", fresh)
    _one_line_error(code, text, "validation_meta.json: unreadable", "settings of the 2 rows")
