"""A fitted model says when it prices shapes beyond its profile (issue 10): ``FittedCostModel.outside``, the
simulation's ``extrapolation`` summary and the run header."""
import numpy as np
import pytest

from cost_models.fitted import FittedCostModel, FittedProfile, RangeTracker
from cost_models.lookup import IntTable
from cost_models.plan import BatchPlan
from cost_models.specs import load_model
from simulator.simulation import simulate


def _fitted(ranges: dict) -> FittedProfile:
    m = load_model("Mistral-7B")
    shape = {"model": m.name, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
             "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim, "intermediate_size": m.intermediate_size,
             "vocab_size": m.vocab_size, "mlp": m.mlp, "tp": 1}
    tables = {"add": IntTable([1e-6] * 4096), "lm_head": IntTable([1e-5] * 512)}
    return FittedProfile("0" * 64, {"device": "cuda", "model_shape": shape}, tables, {}, [], None, [], ranges)


RANGES = {"add": {"tokens": 1024.0}, "lm_head": {"sequences": 64.0},
          "attn_decode": {"decode_batch": 32.0, "decode_kv_len": 2048.0},      # not a table here: not a limit
          "all_reduce": {"message_bytes": 1e6}}


def test_outside_names_each_dimension_and_how_far():
    cm = FittedCostModel(_fitted(RANGES), "Mistral-7B", "A100-80GB-PCIe")
    assert cm.limits == {"tokens": 1024.0, "sequences": 64.0}
    assert cm.outside(BatchPlan.decodes([100] * 8)) == {}
    assert cm.outside(BatchPlan.decodes([100] * 128)) == {"sequences": 2.0}
    assert cm.outside(BatchPlan((0,), (2048,), (0,), 0)) == {"tokens": 2.0}


def test_outside_checks_attention_against_its_own_profile():
    ranges = {**RANGES, "attn_prefill": {"prefill_chunk": 512.0, "prefill_context": 1536.0}}
    fitted = _fitted(ranges)
    fitted.tables["attn_prefill"] = fitted.tables["attn_decode"] = IntTable([1e-6] * 8)    # present: now limits
    cm = FittedCostModel(fitted, "Mistral-7B", "A100-80GB-PCIe")
    # 4 decodes of context 4095: mean KV length 4096 = 2x the profiled 2048; a chunk of 256 at context 3072
    plan = BatchPlan((1, 2, 3, 4, 5), (1,) * 4 + (256,), (4095,) * 4 + (3072,), 4)
    assert cm.outside(plan) == {"decode_kv_len": 2.0, "prefill_context": 2.0}


def test_the_lm_head_bounds_sequences_only():
    # its price levels off past the profiled T, and a profile made before it had a T axis holds T = B only: its
    # largest T (64 here) must not bound the iteration's tokens, which the token operators' 1024 do
    from cost_models.fitted import profiled_ranges

    assert profiled_ranges("head", [np.array([1.0, 64.0]), np.array([1.0, 64.0])]) == {"sequences": 64.0}
    assert profiled_ranges("token", [np.array([1.0, 1024.0])]) == {"tokens": 1024.0}


def test_a_folder_without_ranges_reports_nothing():
    cm = FittedCostModel(_fitted({}), "Mistral-7B", "A100-80GB-PCIe")
    assert cm.limits == {} and cm.outside(BatchPlan.decodes([100] * 1000)) == {}


def test_tracker_counts_and_keeps_the_farthest():
    t = RangeTracker()
    t.add({}, 3)
    t.add({"tokens": 1.5})
    t.add({"tokens": 1.2, "sequences": 3.0})
    r = t.report({"tokens": 1024.0, "sequences": 64.0})
    assert r["iterations"] == 5 and r["extrapolated"] == 2 and r["share"] == pytest.approx(0.4)
    assert r["by_dimension"]["tokens"] == {"iterations": 2, "max_ratio": 1.5, "profiled_max": 1024.0}
    assert r["by_dimension"]["sequences"]["iterations"] == 1


def test_decode_windows_are_tracked_as_single_steps_would_be():
    cm = FittedCostModel(_fitted(RANGES), "Mistral-7B", "A100-80GB-PCIe")
    cm.tracker = RangeTracker()
    cm.track_decodes(np.array([8, 100, 64]), np.array([800, 10000, 6400]))
    r = cm.tracker.report(cm.limits)
    assert r["iterations"] == 3 and r["extrapolated"] == 1
    assert r["by_dimension"] == {"sequences": {"iterations": 1, "max_ratio": pytest.approx(100 / 64),
                                               "profiled_max": 64.0}}


def test_simulation_records_the_share_extrapolated():
    cm = FittedCostModel(_fitted(RANGES), "Mistral-7B", "A100-80GB-PCIe")
    s = simulate(cost_model=cm, num_requests=60, qps=4, scheduler="sarathi", token_budget=2048).summary
    ext = s["extrapolation"]
    assert ext["iterations"] == s["num_iterations"]
    assert 0 < ext["extrapolated"] < ext["iterations"]          # the 2048-token budget exceeds the 1024 tokens
    assert ext["by_dimension"]["tokens"]["profiled_max"] == 1024.0
    assert ext["by_dimension"]["tokens"]["max_ratio"] <= 2.0
    assert cm.tracker is None                                   # detached: the next run starts afresh
    again = simulate(cost_model=cm, num_requests=60, qps=4, scheduler="sarathi", token_budget=2048).summary
    assert again["extrapolation"] == ext


def test_roofline_runs_have_no_extrapolation_section():
    assert "extrapolation" not in simulate(num_requests=20).summary


def test_simulate_takes_a_fitted_model_folder_as_cost_model(tmp_path):
    from cost_models.fitted import save_fitted

    pytest.importorskip("joblib")
    pytest.importorskip("sklearn")
    save_fitted(_fitted(RANGES), tmp_path / "m")
    r = simulate(cost_model=str(tmp_path / "m"), num_requests=10)
    assert r.config.cost_model == str(tmp_path / "m") and r.summary["extrapolation"]["iterations"] > 0


def test_capacity_trials_record_the_share_extrapolated():
    from simulator.capacity import run_trial
    from simulator.config import SimConfig
    from simulator.slo import make_slo

    cm = FittedCostModel(_fitted(RANGES), "Mistral-7B", "A100-80GB-PCIe")
    config = SimConfig(num_requests=60, scheduler="sarathi", token_budget=2048)
    trial = run_trial(config, make_slo("vidur"), 4.0, cost_model=cm, early_stop=False)
    assert 0 < trial.summary["extrapolated_share"] < 1 and cm.tracker is None
    roofline = run_trial(config, make_slo("vidur"), 4.0, early_stop=False)
    assert roofline.summary["extrapolated_share"] is None
