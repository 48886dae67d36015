"""Calibration (issue 10, "Trustworthy numbers"): cost_models/calibration.py reproduces the tables it states from the
data and its own 4-digit numbers; the Sarathi-Serve artifact's Yi-34B TP2 batches are predicted within 15% median
error with the sarathi-serve-2024 engine; every device states its calibration status; ``describe()`` says it all.

Tests that read ../shared/data skip (with the reason) when it is absent. The full regeneration takes ~3 minutes on
two cores; ``python experiments/calibrate_roofline.py --check`` runs it (and ``SERVESIM_SLOW_TESTS=1`` here)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cost_models import calibration
from cost_models.engine_overhead import PROFILES
from cost_models.plan import BatchPlan
from cost_models.roofline import (RooflineConstants, RooflineCostModel, calibration_status, default_constants,
                                  describe_calibration)
from cost_models.specs import SpecError, known_devices
from cost_models.topology import load_node, place

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ARTIFACT = DATA / "measurements" / "sarathi_serve_artifact_yi34b_tp2_a100pcie.csv"
needs_vidur = pytest.mark.skipif(not (DATA / "profiles/vidur").is_dir(),
                                 reason=f"{DATA / 'profiles/vidur'} absent (shared data not mounted)")
needs_artifact = pytest.mark.skipif(not ARTIFACT.is_file(), reason=f"{ARTIFACT} absent (shared data not mounted)")
needs_aic = pytest.mark.skipif(not (DATA / "measurements/aic").is_dir(),
                               reason=f"{DATA / 'measurements/aic'} absent (shared data not mounted)")


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(ROOT / "experiments"))
    import calibrate_roofline
    return calibrate_roofline


def constants(device: str) -> RooflineConstants:
    return replace(RooflineConstants(), **calibration.CALIBRATED[device])


# --- the file reproduces its own tables -------------------------------------------------------------------------

@needs_vidur
@pytest.mark.parametrize("device", ["A100-80GB-PCIe", "A100-80GB-SXM"])
def test_vidur_operator_table_is_what_the_written_constants_give(script, device):
    rows = script.measured_rows(DATA / "profiles/vidur")
    before = script.row_times(rows, RooflineConstants(), device)
    after = script.row_times(rows, constants(device), device)
    table = script.operator_errors(rows, before, after)
    assert table == calibration.TABLES["vidur_operators"][device]
    # calibration roughly halves the per-operator error against the first estimates
    n, first, calibrated = table["all operators"]
    assert n > 40000 and calibrated < 0.6 * first and calibrated < 11.0


def test_a100_sxm_keeps_the_constants_the_capacity_baseline_was_made_with():
    # commit 046f835's fit; re-labelled (the tables were measured on A100-80GB-PCIe), not refitted worse
    sxm = calibration.CALIBRATED["A100-80GB-SXM"]
    assert {k: sxm[k] for k in ("matmul_compute_eff", "bandwidth_eff", "attn_decode_bandwidth_eff",
                                "launch_overhead_s", "attn_call_overhead_s")} == {
        "matmul_compute_eff": 0.6691, "bandwidth_eff": 0.6992, "attn_decode_bandwidth_eff": 0.7511,
        "launch_overhead_s": 2.749e-06, "attn_call_overhead_s": 1.479e-05}
    assert calibration.TABLES["vidur_operators"]["A100-80GB-SXM"]["all operators"][2] <= 10.3
    assert calibration_status("A100-80GB-SXM")["measured_on"] == "A100-80GB-PCIe"


@needs_vidur
def test_vidur_engine_line_reproduces(script):
    fit = script.cpu_overhead(DATA / "profiles/vidur")
    assert fit == calibration.ENGINE_FITS["vidur-vllm-2023"]
    assert fit["median_abs_error"] < 5.0 and fit["rows"] == 13


@needs_artifact
def test_sarathi_engine_fit_and_artifact_table_reproduce(script):
    rows = script.artifact_rows(DATA)
    fit = script.fit_sarathi(rows, constants("A100-80GB-PCIe"))
    assert fit == calibration.ENGINE_FITS["sarathi-serve-2024"]
    previous = RooflineConstants(iteration_overhead_s=script.PREVIOUS_OVERHEAD_S[0],
                                 iteration_overhead_per_seq_s=script.PREVIOUS_OVERHEAD_S[1])
    pcie = constants("A100-80GB-PCIe")
    table = script.artifact_table(rows, script.artifact_model(previous, None), script.artifact_model(pcie, "none"),
                                  script.artifact_model(pcie, "sarathi-serve-2024"))
    assert table == calibration.TABLES["artifact"]


@needs_aic
def test_h100_tables_reproduce():
    sys.path.insert(0, str(ROOT / "experiments"))
    import calibrate_aic as A

    h100 = replace(RooflineConstants(), **calibration.CALIBRATED["H100-SXM"])
    stated = calibration.TABLES["aic"]
    for key, framework, engine in (("trtllm", A.TRT, "trtllm-1.0"), ("vllm", A.VLLM, "vllm-0.32")):
        s = A.summary(A.error_table(DATA / "measurements/aic", framework, h100, PROFILES[engine]))
        assert {tp: float(f"{v:.4g}") for tp, v in s["by_tp"].items()} == stated[key]["by_tp_after"]
        assert s["rows_fitted"] == stated[key]["rows_fitted"]
        fitted_tp = stated[key]["fitted_tp"]
        assert stated[key]["by_tp_after"][fitted_tp] < 10.0 < stated[key]["by_tp_first_estimates"][fitted_tp]


@pytest.mark.skipif(os.environ.get("SERVESIM_SLOW_TESTS") != "1" or not DATA.is_dir(),
                    reason="full regeneration takes ~3 minutes: set SERVESIM_SLOW_TESTS=1 (needs ../shared/data)")
def test_calibration_regenerates_identically():
    done = subprocess.run([sys.executable, str(ROOT / "experiments/calibrate_roofline.py"), "--check"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the target: the artifact within 15% --------------------------------------------------------------

def artifact_plan(r) -> BatchPlan:
    if r.kind == "prefill":
        return BatchPlan.prefill(int(r.prompt_tokens))
    if r.kind == "decode":
        return BatchPlan.decodes([1024] * int(r.batch_size))
    return BatchPlan((0, 1, 2, 3), (1, 1, 1, 1021), (1024, 1024, 1024, 0), 3)


def artifact_errors(engine) -> pd.DataFrame:
    rows = pd.read_csv(ARTIFACT)
    cm = RooflineCostModel("Yi-34B-200K", "A100-80GB-PCIe", tp=2, engine=engine,
                           placement=place(load_node("a100-pcie-pairwise-nvlink"), 2, 1))
    pred = np.array([cm.iteration_time(artifact_plan(r)) for r in rows.itertuples()])
    return rows.assign(error=np.abs(pred / rows["batch_time_s"].to_numpy() - 1) * 100)


@needs_artifact
def test_artifact_within_15_percent_with_the_sarathi_serve_engine():
    err = artifact_errors("sarathi-serve-2024")
    assert len(err) == 19 and set(err["kind"]) == {"prefill", "decode", "hybrid"}
    assert err["error"].median() <= 15.0
    assert err.loc[err["kind"] == "decode", "error"].median() <= 15.0
    assert err.loc[err["kind"] == "prefill", "error"].median() <= 15.0
    assert err.loc[err["kind"] == "hybrid", "error"].max() <= 15.0
    # what the issue reported: without the engine's overhead the decodes are 39-70% too fast
    assert artifact_errors("vidur-vllm-2023").query("kind == 'decode'")["error"].median() > 35.0


# --- status of every device -------------------------------------------------------------------------------------

def test_every_device_states_its_calibration_status():
    for name in known_devices():
        s = calibration_status(name)
        assert set(s) >= {"device", "calibrated", "against", "median_abs_error", "reason", "measured_on", "errors"}
        line = describe_calibration(name)
        assert "\n" not in line
        if s["calibrated"]:
            assert s["against"] and s["median_abs_error"] > 0 and line.startswith("calibrated on ")
            assert f"{s['median_abs_error']:.1f}%" in line
        else:
            assert s["reason"] and s["median_abs_error"] is None and line.startswith("first estimates (")
    calibrated = {n for n in known_devices() if calibration_status(n)["calibrated"]}
    assert calibrated == {"A100-80GB-PCIe", "A100-80GB-SXM", "H100-SXM"}
    assert "Sarathi-Serve artifact" in describe_calibration("A100-80GB-PCIe")
    assert "measured on A100-80GB-PCIe" in describe_calibration("A100")          # aliases resolve
    assert "fp8" in describe_calibration("H200")


def test_unknown_device_is_an_error_and_a_custom_one_says_first_estimates(tmp_path):
    with pytest.raises(SpecError, match="known devices"):
        calibration_status("TPU-v9")
    path = tmp_path / "gpu.yaml"
    path.write_text("name: my-gpu\nmemory_bytes: 25769803776\npeak_flops: {float16: 1.0e14}\n"
                    "memory_bandwidth_bytes_per_s: 1.0e12\n")
    from cost_models.specs import load_device
    cm = RooflineCostModel("tiny", load_device(str(path)))
    d = cm.describe()
    assert d["calibrated"] is False and d["calibration_line"].startswith("first estimates (no calibration")
    assert d["constants"].startswith("first estimates")


def test_describe_reports_constants_calibration_and_engine():
    cm = RooflineCostModel("Yi-34B-200K", "A100-80GB-PCIe", tp=2, engine="sarathi-serve-2024")
    d = cm.describe()
    assert {"kind", "device", "constants", "calibrated", "calibration", "calibration_line", "engine",
            "engine_source", "engine_measured", "engine_overhead"} <= set(d)
    assert d["kind"] == "roofline" and d["device"] == "A100-80GB-PCIe" and d["calibrated"] is True
    assert d["calibration"] == calibration_status("A100-80GB-PCIe")
    assert d["calibration_line"] == describe_calibration("A100-80GB-PCIe")
    assert d["engine"] == "sarathi-serve-2024" and d["engine_measured"] is True
    assert "Sarathi-Serve artifact" in d["engine_source"] and d["engine_overhead"].startswith("sarathi-serve-2024: ")
    default = RooflineCostModel("Mistral-7B", "H200").describe()
    assert default["calibrated"] is False and default["engine"] == "vidur-vllm-2023"
    assert default["calibration_line"].startswith("first estimates (")
    own = RooflineCostModel("Mistral-7B", "A100-80GB-PCIe", constants=RooflineConstants()).describe()
    assert own["calibrated"] is False and own["calibration_line"].startswith("constants passed by the caller")
    same = RooflineCostModel("Mistral-7B", "A100-80GB-PCIe",
                             constants=default_constants("A100-80GB-PCIe")).describe()
    assert same["calibrated"] is True


def test_sarathi_profile_caveat_holds_end_to_end():
    """The caveat in the sarathi-serve-2024 source: the artifact's Table 4 (Yi-34B TP2, openchat, QPS 1, 128
    requests, chunk 512) measured P99 TBT 0.14 s; on servesim's built-in sharegpt trace the default engine gives
    about that, the batch-benchmark profile much more."""
    from simulator.config import SimConfig
    from simulator.simulation import simulate

    node = place(load_node("a100-pcie-pairwise-nvlink"), 2, 1)
    config = SimConfig(model="Yi-34B-200K", device="A100-80GB-PCIe", tp=2, trace="sharegpt", num_requests=128,
                       qps=1.0, scheduler="sarathi", token_budget=512, max_model_len=8192, seed=42)
    p99 = {}
    for engine in ("vidur-vllm-2023", "sarathi-serve-2024"):
        cm = RooflineCostModel("Yi-34B-200K", "A100-80GB-PCIe", tp=2, placement=node, engine=engine)
        p99[engine] = simulate(config, cost_model=cm).summary["tbt_s"]["p99"]
    assert p99["vidur-vllm-2023"] == pytest.approx(0.14, rel=0.2)
    assert p99["sarathi-serve-2024"] > 1.4 * 0.14
