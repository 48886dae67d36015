"""Capacity search: exact early stop, trials equal to plain simulations, the bracket-and-bisect logic, the CLI."""
import json

import pytest
from click.testing import CliRunner

import simulator.capacity as capacity_module
from simulator.capacity import CapacityError, Trial, find_capacity, run_trial
from simulator.cli import main
from simulator.config import SimConfig
from simulator.simulation import simulate
from simulator.slo import make_slo

# The tiny model on the CPU spec simulates 96 sharegpt requests in a few milliseconds per trial.
TINY = SimConfig(model="tiny", device="cpu", max_model_len=8192, allow_long_max_model_len=True, num_requests=96, token_budget=128)


@pytest.mark.parametrize("slo_name, scheduler", [("sarathi", "vllm"), ("sarathi", "sarathi"), ("vidur", "orca"),
                                                 ("deadline", "sarathi")])
def test_early_stop_never_changes_a_trial_outcome(slo_name, scheduler):
    slo = make_slo(slo_name, tbt_slo_s=0.05)
    config = TINY.with_(scheduler=scheduler)
    stopped = 0
    for qps in (0.5, 1.0, 1.5, 2.0, 3.0, 6.0):
        full = run_trial(config, slo, qps, early_stop=False)
        fast = run_trial(config, slo, qps, early_stop=True)
        assert fast.met == full.met, qps
        if fast.stopped_early:
            stopped += 1
            assert not full.met and fast.simulated_s < full.simulated_s and "for certain" in fast.stop_reason
        else:
            assert fast.values == full.values
    assert stopped >= 1        # the test exercises the early stop


def test_a_trial_is_the_plain_simulation_at_that_qps():
    slo = make_slo("sarathi", tbt_slo_s=0.05)
    trial = run_trial(TINY, slo, 1.25, early_stop=False)
    plain = simulate(TINY, qps=1.25).summary
    assert trial.values["tbt_s_p99"] == plain["tbt_s"]["p99"]
    assert trial.values["scheduling_delay_s_p50"] == plain["scheduling_delay_s"]["p50"]
    assert trial.summary["num_iterations"] == plain["num_iterations"]
    assert trial.summary["makespan_s"] == plain["makespan_s"]


def _fake_trials(monkeypatch, threshold_qps):
    """Replace simulations by 'met iff qps <= threshold_qps'; return the list of QPS asked for."""
    asked = []

    def fake(config, slo, qps, *, cost_model=None, early_stop=True, deployment=None):
        asked.append(qps)
        return Trial(qps, qps <= threshold_qps, {}, False, None, 0.0, {})

    monkeypatch.setattr(capacity_module, "run_trial", fake)
    return asked


@pytest.mark.parametrize("threshold", [0.37, 1.0, 2.0, 3.3, 17.0])
def test_bracket_then_bisect_to_the_tolerance(monkeypatch, threshold):
    asked = _fake_trials(monkeypatch, threshold)
    result = find_capacity(SimConfig(qps=2.0), make_slo("vidur"), cost_model=object())
    assert result.converged and result.note == ""
    assert result.lo_qps <= threshold < result.hi_qps
    assert result.hi_qps / result.lo_qps - 1 <= 0.025
    assert result.capacity_qps == result.lo_qps
    assert asked[0] == 2.0 and len(asked) == len(set(asked)) <= 20
    assert [t.qps for t in result.trials] == asked


def test_search_reports_when_the_slo_never_holds_or_never_breaks(monkeypatch):
    _fake_trials(monkeypatch, 0.0)
    never = find_capacity(SimConfig(qps=2.0), make_slo("vidur"), cost_model=object(), min_qps=0.2)
    assert never.capacity_qps == 0.0 and not never.converged
    assert [t.qps for t in never.trials] == [2.0, 1.0, 0.5, 0.25]
    assert "not met at any QPS tried (lowest 0.25)" in never.note
    _fake_trials(monkeypatch, 1e9)
    always = find_capacity(SimConfig(qps=1.0), make_slo("vidur"), cost_model=object(), max_trials=5)
    assert always.capacity_qps == 16.0 and always.hi_qps is None and "still met" in always.note


def test_search_settings_are_validated():
    with pytest.raises(CapacityError, match="rel_tol: must be positive"):
        find_capacity(TINY, rel_tol=0)
    with pytest.raises(CapacityError, match="max_trials: must be an integer >= 2"):
        find_capacity(TINY, max_trials=1)


def test_real_search_on_the_tiny_model(tmp_path):
    slo = make_slo("sarathi", tbt_slo_s=0.05)
    result = find_capacity(TINY.with_(scheduler="sarathi"), slo, qps_start=1.0)
    by_qps = {t.qps: t for t in result.trials}
    assert by_qps[result.lo_qps].met and not by_qps[result.hi_qps].met
    assert result.hi_qps / result.lo_qps - 1 <= 0.025 and len(result.trials) <= 20
    data = json.loads(result.write(tmp_path).read_text())
    assert data["capacity_qps"] == result.capacity_qps
    assert data["slo"]["limits"][0] == {"metric": "tbt_s", "percentile": 99, "max_value": 0.05}
    assert [t["qps"] for t in data["trials"]] == [t.qps for t in result.trials]
    assert (tmp_path / "trials.csv").read_text().count("\n") == len(result.trials) + 1


def test_capacity_cli(tmp_path):
    args = ["capacity", "--model", "tiny", "--device", "cpu", "--max-model-len", "8192", "--allow-long-max-model-len", "--num-requests", "96",
            "--scheduler", "vllm", "--tbt-slo", "0.05", "--qps", "1", "--out", str(tmp_path)]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    data = json.loads((tmp_path / "capacity.json").read_text())
    assert f"capacity: {data['capacity_qps']:.4g} QPS" in out.output
    assert out.output.count("trial ") == len(data["trials"])
    assert data["config"]["scheduler"] == "vllm" and data["slo"]["name"] == "sarathi"


@pytest.mark.parametrize("extra, message", [
    ([], "error: tbt_slo: Sarathi-Serve gives no TBT SLO for model 'tiny'"),
    (["--tbt-slo", "-1"], "error: tbt_s: limit must be a positive number"),
    (["--tbt-slo", "0.05", "--rel-tol", "0"], "error: rel_tol: must be positive"),
])
def test_capacity_cli_bad_input(tmp_path, extra, message):
    out = CliRunner().invoke(main, ["capacity", "--model", "tiny", "--device", "cpu", "--out", str(tmp_path), *extra])
    assert out.exit_code == 2
    assert message in out.output
