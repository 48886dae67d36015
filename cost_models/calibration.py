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
# (operators weighted equally), FLOP and byte terms taken from RooflineCostModel itself; residual add,
# norm/RoPE/activation and embedding have their own bandwidth efficiencies; attention pays a fixed cost per call;
# CPU overhead = iteration_overhead_s + iteration_overhead_per_seq_s x sequences, the least-squares line through
# the measured CPU overhead (schedule + sampler + prepare inputs + process outputs) at batch sizes 8-128.
# Median absolute percentage error of the roofline, first estimates -> calibrated (per operator on the raw rows;
# per iteration on the plan set):
#   operator                     rows   before    after
#   add                          3099    20.0%    11.5%
#   attn_decode                 10112    20.8%     9.0%
#   attn_post_proj               3099     5.7%     5.2%
#   attn_pre_proj                3099     6.8%     8.0%
#   attn_prefill                 4206    46.3%    19.4%
#   attn_rope                    3099    20.7%    11.7%
#   emb                          3099    46.3%     6.3%
#   input_layernorm              3099    25.9%    15.2%
#   mlp_act                      3099    15.4%    17.6%
#   mlp_down_proj                3099     6.3%     9.4%
#   mlp_up_proj                  3099     5.0%     8.1%
#   post_attention_layernorm     3099    35.8%    17.0%
#   all operators               45308    18.4%    10.3%
#   iterations (plan set)         234     5.1%     5.1%
#   iterations, P90               234    20.3%    12.7%
#   CPU overhead per iteration     13     4.4%     2.8%  (P90 after 5.4%)
CALIBRATED = {
    "A100-80GB-SXM": {
        'matmul_compute_eff': 0.6691,
        'attn_compute_eff': 0.2469,
        'bandwidth_eff': 0.6992,
        'attn_decode_bandwidth_eff': 0.7511,
        'add_bandwidth_eff': 0.9803,
        'norm_bandwidth_eff': 0.4249,
        'emb_bandwidth_eff': 0.1508,
        'launch_overhead_s': 2.749e-06,
        'attn_call_overhead_s': 1.479e-05,
        "iteration_overhead_s": 0.0008063,
        "iteration_overhead_per_seq_s": 3.748e-05,
        "source": "calibrated on Vidur A100 tables (cost_models/calibration.py)",
    },
}
