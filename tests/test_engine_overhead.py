"""Engine overhead as its own term of the cost model (issue 10): named profiles with sources, monotone in the batch,
the roofline's default unchanged, ``engine=`` switching only the ``cpu_overhead`` term, the fitted model's fallback."""
from __future__ import annotations

import pytest

from cost_models.engine_overhead import (DEFAULT_ENGINE, PROFILES, EngineProfile, EngineProfileError,
                                         engine_overhead_s, get_engine, known_engines)
from cost_models.fitted import FittedCostModel, FittedProfile
from cost_models.lookup import IntTable
from cost_models.plan import BatchPlan
from cost_models.roofline import RooflineConstants, RooflineCostModel

NAMED = ("vidur-vllm-2023", "sarathi-serve-2024", "vllm-0.32", "trtllm-1.0", "none")
MIXED = BatchPlan((0, 1, 2, 3), (1, 1, 1, 1021), (1024, 1024, 1024, 0), 3)


def test_every_named_profile_exists_with_its_source():
    assert set(NAMED) <= set(known_engines())
    for name in NAMED:
        p = PROFILES[name]
        assert p.name == name and len(p.source) > 40, name
        assert min(p.fixed_s, p.per_seq_s, p.per_token_s) >= 0
    assert PROFILES["none"].measured is False and engine_overhead_s("none", 128, 4096, 8) == 0.0
    for name in ("vidur-vllm-2023", "sarathi-serve-2024", "trtllm-1.0"):
        assert PROFILES[name].measured and PROFILES[name].median_abs_error is not None, name
    # no measurement of 0.32 itself: an estimate from vLLM 0.12.0's, and said so
    vllm = PROFILES["vllm-0.32"]
    assert not vllm.measured and vllm.median_abs_error is not None and "ESTIMATE" in vllm.source
    assert "(estimate, median error" in vllm.describe()


@pytest.mark.parametrize("name", NAMED)
def test_profiles_are_monotone_in_the_batch_and_the_tokens(name):
    by_batch = [engine_overhead_s(name, b, b, 2) for b in range(0, 513)]
    assert all(a <= b for a, b in zip(by_batch, by_batch[1:]))
    by_tokens = [engine_overhead_s(name, 4, t, 2) for t in range(0, 16385, 64)]
    assert all(a <= b for a, b in zip(by_tokens, by_tokens[1:]))
    if PROFILES[name].per_seq_s > 0:
        assert by_batch[128] > by_batch[1]


def test_sarathi_serve_overhead_grows_as_the_artifact_needs():
    # the artifact's decodes at batch 1 and 128 took 46.8 and 189.3 ms; the GPU part grows much less than that
    p = get_engine("sarathi-serve-2024")
    assert 10e-3 < engine_overhead_s(p, 1, 1, 2) < 30e-3
    assert engine_overhead_s(p, 128, 128, 2) - engine_overhead_s(p, 1, 1, 2) > 100e-3
    assert engine_overhead_s(p, 128, 128, 2) == pytest.approx(p.fixed_s + 128 * p.per_seq_s + 128 * p.per_token_s)


def test_today_s_engines_are_leaner_than_the_2023_2024_ones():
    # CUDA graphs and async scheduling hide the fixed part; vLLM 0.12's measured per-sequence cost (~51 us) stays,
    # so at 128 sequences it reaches Vidur's 2023 line (which counts only scheduling, sampling, inputs, outputs)
    for b in (1, 8, 32):
        lean = max(engine_overhead_s("vllm-0.32", b, b, 2), engine_overhead_s("trtllm-1.0", b, b, 1))
        assert lean < engine_overhead_s("vidur-vllm-2023", b, b, 2) < engine_overhead_s("sarathi-serve-2024", b, b, 2)
    assert engine_overhead_s("trtllm-1.0", 128, 128, 1) < engine_overhead_s("vllm-0.32", 128, 128, 2) < \
        engine_overhead_s("sarathi-serve-2024", 128, 128, 2) / 10


def test_tp_scaling_and_validation_of_a_profile():
    p = EngineProfile("x", 1e-3, 1e-5, measured_tp=2, tp_exponent=1.0)
    assert engine_overhead_s(p, 10, 10, 4) == pytest.approx(2 * (1e-3 + 1e-4))
    assert engine_overhead_s(p, 10, 10, 2) == pytest.approx(1e-3 + 1e-4)
    with pytest.raises(EngineProfileError, match="per_seq_s must be >= 0"):
        EngineProfile("bad", 1e-3, -1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        engine_overhead_s("none", -1, 0)


def test_unknown_profile_is_a_one_line_error_naming_the_known_ones():
    with pytest.raises(EngineProfileError) as err:
        RooflineCostModel("Mistral-7B", "A100", engine="vllm-9")
    msg = str(err.value)
    assert "'vllm-9'" in msg and "\n" not in msg and all(n in msg for n in NAMED)
    with pytest.raises(EngineProfileError, match="profile name or an EngineProfile"):
        get_engine(3)


def test_the_roofline_default_is_unchanged_vidur_s_line():
    # the overhead the A100-SXM roofline charged before the engine term (calibration of commit 046f835):
    # 0.8063 ms + 0.03748 ms per sequence, so the capacity baseline does not move
    assert DEFAULT_ENGINE == "vidur-vllm-2023"
    cm = RooflineCostModel("Mistral-7B", "A100-80GB-SXM")
    assert cm.engine is PROFILES["vidur-vllm-2023"]
    for b in (1, 24, 128):
        assert cm.breakdown(BatchPlan.decodes([100] * b))["cpu_overhead"] == pytest.approx(0.8063e-3 + b * 0.03748e-3,
                                                                                             rel=1e-12)


def test_constants_with_an_iteration_overhead_keep_pricing_it():
    c = RooflineConstants(iteration_overhead_s=1e-3, iteration_overhead_per_seq_s=1e-4)
    cm = RooflineCostModel("Mistral-7B", "A100", constants=c)
    assert cm.engine.name == "constants"
    assert cm.breakdown(BatchPlan.decodes([10] * 5))["cpu_overhead"] == pytest.approx(1.5e-3)
    # an explicit engine wins over the constants
    assert RooflineCostModel("Mistral-7B", "A100", constants=c, engine="none").breakdown(
        BatchPlan.decodes([10] * 5))["cpu_overhead"] == 0.0


@pytest.mark.parametrize("engine", NAMED)
def test_engine_changes_only_the_cpu_overhead_term(engine):
    base = RooflineCostModel("Yi-34B-200K", "A100-80GB-PCIe", tp=2, engine="none")
    cm = RooflineCostModel("Yi-34B-200K", "A100-80GB-PCIe", tp=2, engine=engine)
    for plan in (BatchPlan.prefill(512), BatchPlan.decodes([1024] * 64), MIXED):
        a, b = base.breakdown(plan), cm.breakdown(plan)
        assert a.keys() == b.keys() and a["cpu_overhead"] == 0.0
        assert all(a[k] == b[k] for k in a if k != "cpu_overhead")
        expected = engine_overhead_s(engine, len(plan), sum(plan.num_new_tokens), 2)
        assert b["cpu_overhead"] == pytest.approx(expected, rel=1e-12)
        assert cm.iteration_time(plan) == pytest.approx(base.iteration_time(plan) + expected, rel=1e-12)


def test_pipeline_stages_split_the_engine_overhead():
    plan = BatchPlan.decodes([512] * 16)
    cm = RooflineCostModel("Llama-2-70B", "A100-80GB-PCIe", tp=4, pp=2, engine="sarathi-serve-2024")
    none = RooflineCostModel("Llama-2-70B", "A100-80GB-PCIe", tp=4, pp=2, engine="none")
    overhead = engine_overhead_s("sarathi-serve-2024", 16, 16, 4)
    assert cm.stage_time(plan, 0) - none.stage_time(plan, 0) == pytest.approx(0.15 * overhead)
    assert cm.stage_time(plan, 1) - none.stage_time(plan, 1) == pytest.approx(0.85 * overhead)


def _fitted(tables: dict, device: str = "cuda") -> FittedProfile:
    from cost_models.specs import load_model

    m = load_model("Mistral-7B")
    shape = {"model": m.name, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
             "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim, "intermediate_size": m.intermediate_size,
             "vocab_size": m.vocab_size, "mlp": m.mlp, "tp": 1}
    return FittedProfile("0" * 64, {"device": device, "model_shape": shape}, tables, {}, [])


def test_fitted_model_charges_the_engine_only_without_a_profiled_cpu_overhead():
    plan = BatchPlan.decodes([100] * 8)
    add = IntTable([1e-6] * 64)
    sarathi = FittedCostModel(_fitted({"add": add}), "Mistral-7B", "A100-80GB-PCIe", engine="sarathi-serve-2024")
    assert sarathi.breakdown(plan)["cpu_overhead"] == pytest.approx(engine_overhead_s("sarathi-serve-2024", 8, 8, 1))
    assert sum(sarathi.breakdown(plan).values()) == pytest.approx(sarathi.iteration_time(plan))
    assert "sarathi-serve-2024" in sarathi.describe()["engine_overhead"]
    default = FittedCostModel(_fitted({"add": add}), "Mistral-7B", "A100-80GB-PCIe")
    assert default.breakdown(plan)["cpu_overhead"] == pytest.approx(engine_overhead_s(DEFAULT_ENGINE, 8, 8, 1))
    assert "cpu_overhead" in default.fallbacks
    # a profiled cpu_overhead operator is the engine's own measurement: engine= does not replace it
    profiled = FittedCostModel(_fitted({"add": add, "cpu_overhead": IntTable([2e-3] * 64)}), "Mistral-7B",
                               "A100-80GB-PCIe", engine="sarathi-serve-2024")
    assert profiled.breakdown(plan)["cpu_overhead"] == pytest.approx(2e-3)
    # a CPU profile without the operator has no engine to charge for, unless one is asked for
    cpu = FittedCostModel(_fitted({"add": add}, device="cpu"), "Mistral-7B", "A100-80GB-PCIe")
    assert cpu.breakdown(plan)["cpu_overhead"] == 0.0 and "cpu_overhead" not in cpu.fallbacks
    asked = FittedCostModel(_fitted({"add": add}, device="cpu"), "Mistral-7B", "A100-80GB-PCIe", engine="vllm-0.32")
    assert asked.breakdown(plan)["cpu_overhead"] == pytest.approx(engine_overhead_s("vllm-0.32", 8, 8, 1))
