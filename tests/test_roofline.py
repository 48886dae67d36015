"""The analytical roofline cost model (issue 2): per operator max(FLOPs / (peak x eff), bytes / (bandwidth x eff))
+ launch overhead, attention by chunk context plus a fixed cost per attention call, gated MLP, separate bandwidth
efficiencies for the residual add, norms and the embedding, a CPU overhead growing with the batch, tensor parallelism
with a ring all-reduce; the breakdown sums to the iteration time. Operator formulas are those of the table in ``cost_models/roofline.py``."""
from __future__ import annotations

import pytest

from cost_models.base import ConstantCostModel, CostModel
from cost_models.roofline import RooflineConstants, RooflineCostModel
from cost_models.specs import SpecError
from cost_models.plan import BatchPlan

# First-estimate constants stated in RooflineConstants, fixed here so calibrated defaults cannot move the
# hand-computed values.
C = RooflineConstants(matmul_compute_eff=0.70, attn_compute_eff=0.50, bandwidth_eff=0.80,
                      attn_decode_bandwidth_eff=0.60, add_bandwidth_eff=0.80, norm_bandwidth_eff=0.60,
                      emb_bandwidth_eff=0.30, launch_overhead_s=4e-6, attn_call_overhead_s=10e-6,
                      iteration_overhead_s=0.85e-3, iteration_overhead_per_seq_s=0.039e-3)
A100_FP16 = 312e12          # dense FLOP/s, NVIDIA A100 datasheet
A100_BW = 2.039e12          # bytes/s, A100 80GB SXM
NVLINK = 300e9              # bytes/s per direction, from the device spec
NVLINK_LATENCY = 8e-6


def mistral(tp=1, pp=1):
    return RooflineCostModel("Mistral-7B", "A100-80GB-SXM", tp=tp, pp=pp, constants=C)


def prefill(*chunks):
    """chunks: (new_tokens, context_len) of prefill entries."""
    return BatchPlan.from_entries([(i, n, k) for i, (n, k) in enumerate(chunks)], num_decodes=0)


def decodes(*contexts):
    return BatchPlan.from_entries([(i, 1, k) for i, k in enumerate(contexts)], num_decodes=len(contexts))


def mixed(contexts, chunks):
    entries = [(i, 1, k) for i, k in enumerate(contexts)]
    entries += [(100 + i, n, k) for i, (n, k) in enumerate(chunks)]
    return BatchPlan.from_entries(entries, num_decodes=len(contexts))


PLANS = {
    "decode": decodes(*[500 + 37 * i for i in range(24)]),
    "prefill": prefill((512, 0), (300, 1024)),
    "mixed": mixed([100, 2000, 4000], [(256, 512), (97, 0)]),
    "single": decodes(0),
}
MODELS = [("Mistral-7B", "A100", 1, 1), ("Mistral-7B", "A100", 2, 1), ("Llama-2-70B", "H100", 4, 1),
          ("Falcon-180B", "H200", 8, 1), ("Llama-3-8B", "A40", 1, 2), ("tiny", "cpu", 1, 1)]


def test_both_cost_models_follow_the_protocol():
    assert isinstance(mistral(), CostModel)
    assert isinstance(ConstantCostModel(), CostModel)


def test_constant_cost_model():
    m = ConstantCostModel(fixed_s=0.01, per_token_s=0.001, per_context_token_s=1e-5)
    plan = mixed([100], [(50, 10)])          # 51 tokens, 110 context tokens
    assert m.iteration_time(plan) == pytest.approx(0.01 + 0.051 + 0.0011)
    assert sum(m.breakdown(plan).values()) == pytest.approx(m.iteration_time(plan))


@pytest.mark.parametrize("model, device, tp, pp", MODELS)
@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_breakdown_sums_to_iteration_time(model, device, tp, pp, plan):
    cm = RooflineCostModel(model, device, tp=tp, pp=pp)
    parts = cm.breakdown(plan)
    assert all(v >= 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(cm.iteration_time(plan), rel=1e-12)
    assert cm.iteration_time(plan) > 0


def test_breakdown_names_the_operators_of_a_layer():
    ops = mistral().breakdown(PLANS["mixed"])
    for name in ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_kv_cache_save", "attn_prefill",
                 "attn_decode", "attn_post_proj", "post_attention_layernorm", "mlp_up_proj", "mlp_act",
                 "mlp_down_proj", "add", "lm_head"):
        assert ops[name] > 0, name
    assert "attn_decode" not in mistral().breakdown(PLANS["prefill"])
    assert "attn_prefill" not in mistral().breakdown(PLANS["decode"])


# --- hand-computed operators ----------------------------------------------------------------------------------

def roofline(flops, nbytes, compute_eff, bw_eff, peak=A100_FP16, bw=A100_BW):
    return max(flops / (peak * compute_eff), nbytes / (bw * bw_eff)) + 4e-6


def test_mlp_down_proj_by_hand_memory_bound_decode_and_compute_bound_prefill():
    f, h = 14336, 4096
    # one decode token: FLOPs 2*1*f*h, bytes (f*h weights + 1*(f + h) activations) x 2 bytes -> memory-bound
    one = 32 * roofline(2 * f * h, (f * h + (f + h)) * 2, 0.70, 0.80)
    assert one == pytest.approx(32 * ((f * h + f + h) * 2 / (A100_BW * 0.8) + 4e-6))
    assert mistral().breakdown(decodes(100))["mlp_down_proj"] == pytest.approx(one, rel=1e-12)
    # a 4096-token prefill: FLOPs 2*4096*f*h = 481 GFLOP -> compute-bound
    big = 32 * roofline(2 * 4096 * f * h, (f * h + 4096 * (f + h)) * 2, 0.70, 0.80)
    assert big == pytest.approx(32 * (2 * 4096 * f * h / (A100_FP16 * 0.7) + 4e-6))
    assert mistral().breakdown(prefill((4096, 0)))["mlp_down_proj"] == pytest.approx(big, rel=1e-12)


def test_attention_by_hand():
    q, kv = 32 * 128, 8 * 128
    # a 1024-token chunk after 2048 cached tokens attends to its context plus (causally) itself:
    # FLOPs 4*q*c*(k + (c+1)/2), elements 2*c*q (Q in, O out) + (k+c)*2*kv (K and V read)
    # plus 10 µs per attention call, one call per layer
    c, k = 1024, 2048
    expect = 32 * (roofline(4 * q * c * (k + (c + 1) / 2), (2 * c * q + (k + c) * 2 * kv) * 2, 0.50, 0.80) + 10e-6)
    # 4*4096*1024*2560.5 = 42.95 GFLOP at 156 TFLOP/s = 275.3 µs (compute-bound) + 4 µs + 10 µs, per layer
    assert expect == pytest.approx(32 * (4 * q * c * (k + (c + 1) / 2) / (A100_FP16 * 0.5) + 14e-6))
    assert mistral().breakdown(prefill((c, k)))["attn_prefill"] == pytest.approx(expect, rel=1e-12)
    # two chunks share one varlen attention call per layer
    two = prefill((c, k), (64, 0))
    expect2 = 32 * (roofline(4 * q * (c * (k + (c + 1) / 2) + 64 * 32.5),
                             (2 * c * q + (k + c) * 2 * kv + 2 * 64 * q + 64 * 2 * kv) * 2, 0.50, 0.80) + 10e-6)
    assert mistral().breakdown(two)["attn_prefill"] == pytest.approx(expect2, rel=1e-12)
    # 8 decodes with 1023 cached tokens each read their whole KV (1024 tokens with the new one)
    ctx = 8 * 1024
    expect = 32 * (roofline(4 * q * ctx, (ctx * 2 * kv + 8 * 2 * q) * 2, 0.50, 0.60) + 10e-6)
    # 8192 x 2048 x 2 bytes = 33.6 MB at 1.223 TB/s = 27.4 µs (memory-bound) + 14 µs, per layer
    assert expect == pytest.approx(32 * ((ctx * 2 * kv + 8 * 2 * q) * 2 / (A100_BW * 0.6) + 14e-6))
    assert mistral().breakdown(decodes(*[1023] * 8))["attn_decode"] == pytest.approx(expect, rel=1e-12)


def test_elementwise_operators_have_their_own_bandwidth_efficiencies_by_hand():
    h, T = 4096, 2048
    bd = mistral().breakdown(prefill((T, 0)))
    # residual adds: 6*T*h elements (two adds, each two reads and a write) at add_bandwidth_eff 0.80
    assert bd["add"] == pytest.approx(32 * (6 * T * h * 2 / (A100_BW * 0.80) + 4e-6), rel=1e-12)
    # RMSNorm: 2*T*h + h elements at norm_bandwidth_eff 0.60
    assert bd["input_layernorm"] == pytest.approx(32 * ((2 * T * h + h) * 2 / (A100_BW * 0.60) + 4e-6), rel=1e-12)
    # embedding gather, once per iteration: 2*T*h elements at emb_bandwidth_eff 0.30
    assert bd["emb"] == pytest.approx(2 * T * h * 2 / (A100_BW * 0.30) + 4e-6, rel=1e-12)


def test_cpu_overhead_grows_with_the_batch_by_hand():
    # 0.85 ms + 0.039 ms per scheduled sequence (Vidur's cpu_overheads: ~1.15 ms at 8 sequences, ~5.8 ms at 128)
    assert mistral().breakdown(decodes(*[100] * 24))["cpu_overhead"] == pytest.approx(0.85e-3 + 24 * 0.039e-3)
    assert mistral().breakdown(mixed([100] * 7, [(256, 0)]))["cpu_overhead"] == pytest.approx(0.85e-3 + 8 * 0.039e-3)
    assert mistral().breakdown(decodes(*[100] * 128))["cpu_overhead"] == pytest.approx(5.842e-3)


@pytest.mark.parametrize("model, device, tp, pp", MODELS)
def test_calibrated_cpu_overhead_grows_with_the_batch(model, device, tp, pp):
    cm = RooflineCostModel(model, device, tp=tp, pp=pp)
    overheads = [cm.breakdown(decodes(*[100] * b))["cpu_overhead"] for b in (1, 8, 64, 128)]
    assert all(a < b for a, b in zip(overheads, overheads[1:]))
    assert overheads[0] > 0


@pytest.mark.parametrize("model, device, tp, pp", MODELS)
def test_decode_attention_of_one_request_costs_at_least_one_call_per_layer(model, device, tp, pp):
    cm = RooflineCostModel(model, device, tp=tp, pp=pp)
    assert cm.c.attn_call_overhead_s > 0
    assert cm.breakdown(decodes(0))["attn_decode"] >= cm.c.attn_call_overhead_s * cm.layers
    assert cm.breakdown(prefill((1, 0)))["attn_prefill"] >= cm.c.attn_call_overhead_s * cm.layers


def test_ring_all_reduce_by_hand_two_per_layer():
    # Megatron-style tensor parallelism all-reduces the T x h activations twice per layer (after the attention
    # output projection and after the MLP down projection); a ring all-reduce of B bytes over p GPUs takes
    # 2(p-1)/p * B / link bandwidth + 2(p-1) * link latency (Patarasuk & Yuan, JPDC 2009).
    T, h, p = 4096, 4096, 2
    one = 2 * (p - 1) / p * T * h * 2 / NVLINK + 2 * (p - 1) * NVLINK_LATENCY
    assert mistral(tp=2).breakdown(prefill((T, 0)))["all_reduce"] == pytest.approx(32 * 2 * one, rel=1e-9)


def test_tensor_parallelism_is_cheaper_per_gpu_for_a_large_prefill_but_adds_all_reduce():
    plan = prefill((4096, 0))
    one, two = mistral(tp=1), mistral(tp=2)
    assert one.breakdown(plan).get("all_reduce", 0.0) == 0.0
    assert two.breakdown(plan)["all_reduce"] > 0
    assert two.iteration_time(plan) < one.iteration_time(plan)
    assert two.breakdown(plan)["mlp_up_proj"] == pytest.approx(one.breakdown(plan)["mlp_up_proj"] / 2, rel=0.01)


def test_pipeline_stages_split_the_layers_and_the_micro_batch_pays_them_all():
    plan = prefill((2048, 0))
    one, two = mistral(), mistral(pp=2)
    # the whole micro-batch computes every layer, whatever the stages
    assert two.breakdown(plan)["mlp_down_proj"] == pytest.approx(one.breakdown(plan)["mlp_down_proj"])
    assert two.breakdown(plan)["send_recv"] > 0
    # each stage holds 16 of the 32 layers; the embedding sits on the first, the LM head on the last, and the CPU
    # overhead is split: input preparation (15%) before the first, sampling and outputs (85%) after the last
    b1 = one.breakdown(plan)
    layer_part = one.iteration_time(plan) - b1["emb"] - b1["lm_head"] - b1["cpu_overhead"]
    assert two.stage_time(plan, 0) == pytest.approx(layer_part / 2 + b1["emb"] + 0.15 * b1["cpu_overhead"])
    assert two.stage_time(plan, 1) == pytest.approx(layer_part / 2 + b1["lm_head"] + 0.85 * b1["cpu_overhead"])
    # latency through the pipeline = both stages + the activation transfer: never below one GPU's iteration
    send = two.transfer_time(plan, 0)
    assert send == pytest.approx(8e-6 + 2048 * 4096 * 2 / 300e9)            # A100 interconnect, T x h x fp16
    assert two.iteration_time(plan) == pytest.approx(two.stage_time(plan, 0) + two.stage_time(plan, 1) + send)
    assert two.iteration_time(plan) > one.iteration_time(plan)
    assert sum(two.breakdown(plan).values()) == pytest.approx(two.iteration_time(plan))


def test_layers_split_as_evenly_as_possible_as_vllm_does():
    from cost_models.roofline import layers_per_stage

    assert layers_per_stage(32, 2) == (16, 16)
    assert layers_per_stage(80, 3) == (27, 27, 26)
    assert layers_per_stage(10, 4) == (2, 3, 3, 2)     # vLLM's get_pp_indices: extra layers before the last stage


# --- more work is never cheaper ----------------------------------------------------------------------------

def non_decreasing(values):
    return all(a <= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("model, device, tp, pp", MODELS)
def test_more_tokens_are_never_cheaper(model, device, tp, pp):
    cm = RooflineCostModel(model, device, tp=tp, pp=pp)
    cost = cm.iteration_time
    assert non_decreasing([cost(decodes(*[700] * b)) for b in range(1, 257)])                  # decode batch
    assert non_decreasing([cost(decodes(k)) for k in range(0, 32768, 97)])                      # decode context
    assert non_decreasing([cost(decodes(*[k] * 32)) for k in range(0, 8192, 61)])
    assert non_decreasing([cost(prefill((n, 0))) for n in range(1, 4097, 3)])                   # chunk size
    assert non_decreasing([cost(prefill((n, 3000))) for n in range(1, 2049, 7)])
    assert non_decreasing([cost(prefill((512, k))) for k in range(0, 16384, 113)])              # chunk context
    assert non_decreasing([cost(mixed([1000] * b, [(256, 512)])) for b in range(0, 129)])       # decodes piggyback


def test_unknown_model_and_indivisible_heads_are_errors():
    with pytest.raises(SpecError, match="known models"):
        RooflineCostModel("GPT-5", "A100")
    with pytest.raises(ValueError, match="tp=3"):
        RooflineCostModel("Mistral-7B", "A100", tp=3)


@pytest.mark.parametrize("model,device,tp", [("Mistral-7B", "A100-80GB-SXM", 1), ("Yi-34B", "A100-80GB-PCIe", 2),
                                            ("Llama-3-8B", "H100-SXM", 1)])
def test_step_pricing_equals_iteration_time_bit_for_bit(model, device, tp):
    # fast-forward prices stretch steps without plans (simulator.fast_forward): each step must cost exactly what
    # the step-by-step engine's iteration_time of its plan costs
    import numpy as np

    cm = RooflineCostModel(model, device, tp=tp)
    rng = np.random.default_rng(7)
    batches, sums, plans = [], [], []
    for _ in range(60):
        ctx = rng.integers(0, 8000, rng.integers(1, 300)).tolist()
        batches.append(len(ctx))
        sums.append(sum(ctx))
        plans.append(BatchPlan.decodes(ctx))
    assert [cm.step_time(b, c, 0) for b, c in zip(batches, sums)] == [cm.iteration_time(p) for p in plans]
    for _ in range(60):
        ctx = rng.integers(0, 8000, rng.integers(0, 100)).tolist()
        n, k = int(rng.integers(1, 2048)), int(rng.integers(0, 16000))
        plan = BatchPlan.from_entries([(i, 1, c) for i, c in enumerate(ctx)] + [(999, n, k)], num_decodes=len(ctx))
        assert cm.step_time(len(ctx), sum(ctx), 0, n, k) == cm.iteration_time(plan)
