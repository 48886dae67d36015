"""Roofline efficiency constants calibrated against measured profiles (generated; do not edit by hand).

Regenerate with ``python experiments/calibrate_roofline.py`` (see its docstring for the method).
``cost_models.roofline.default_constants(device_name)`` reads ``CALIBRATED[device_name]``.
"""
# Source: Vidur's A100-80GB profiling tables (microsoft/vidur, MIT licence), under
#   ../shared/data/profiles/vidur/compute/a100/:
#   meta-llama/Meta-Llama-3-8B/mlp.csv                (per-token operators, TP 1/2/4/8)
#   meta-llama/Llama-2-7b-hf/mlp.csv                  (per-token operators)
#   legacy-e2d00e9/mlp.csv, attention.csv             (CodeLlama-34B shape at TP 2; FlashAttention)
#   legacy-e2d00e9/cpu_overheads.csv                  (per-iteration CPU overhead)
# Method: least squares of log(roofline / reference) over 234 batch plans (reference: the Vidur-fitted model of
# the CodeLlama-34B shape at TP 2 and of Llama-3-8B at TP 1, measured operators only) plus every raw table row
# (operators weighted equally), FLOP and byte terms taken from RooflineCostModel itself; iteration_overhead_s =
# the measured CPU overhead (schedule + sampler + prepare inputs + process outputs) with the least median error
# over batch sizes 8-128.
# Median absolute percentage error of the roofline, first estimates -> calibrated (per operator on the raw rows;
# per iteration on the plan set). The single elementwise efficiency cannot fit both the residual add (~85% of
# peak bandwidth) and RMSNorm/RoPE/SiLU/embedding (~15-50%), hence add's error:
#   operator                     rows   before    after
#   add                          3099    56.1%   111.1%
#   attn_decode                 10112    19.0%    15.7%
#   attn_post_proj               3099     5.7%     4.8%
#   attn_pre_proj                3099     6.8%     7.3%
#   attn_prefill                 4206    53.3%    21.1%
#   attn_rope                    3099    20.7%    18.9%
#   emb                          3099    71.1%    61.6%
#   input_layernorm              3099    25.9%    18.4%
#   mlp_act                      3099    15.4%    16.7%
#   mlp_down_proj                3099     6.3%     8.3%
#   mlp_up_proj                  3099     5.0%     7.0%
#   post_attention_layernorm     3099    35.8%    19.1%
#   all operators               45308    19.8%    16.1%
#   iterations (plan set)         234     7.3%     4.7%
#   iterations, P90               234    21.2%    13.2%
#   iteration_overhead_s (CPU)     13    31.8%    29.5%
CALIBRATED = {
    "A100-80GB-SXM": {
        'matmul_compute_eff': 0.6795,
        'attn_compute_eff': 0.2243,
        'bandwidth_eff': 0.7049,
        'attn_decode_bandwidth_eff': 0.6388,
        'elementwise_bandwidth_eff': 0.4339,
        'launch_overhead_s': 3.973e-06,
        "iteration_overhead_s": 0.002312,
        "source": "calibrated on Vidur A100 tables (cost_models/calibration.py)",
    },
}
