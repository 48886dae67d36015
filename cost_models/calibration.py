"""Roofline constants, engine-overhead fits and calibration status (generated; do not edit by hand).

Regenerate with ``python experiments/calibrate_roofline.py`` (its docstring has the data and the method); ``--check``
fails when this file is not what the data gives. Read by ``cost_models.roofline`` (``default_constants``,
``calibration_status``) and ``cost_models.engine_overhead`` (``PROFILES``). Numbers have 4 significant digits; the
tables in ``TABLES`` are recomputed from them (``tests/test_calibration.py``). Seconds; errors in percent.
"""
# Data (../shared/data): profiles/vidur/compute/a100 (microsoft/vidur, MIT: Meta-Llama-3-8B and Llama-2-7b-hf mlp.csv,
# legacy-e2d00e9 mlp/attention/cpu_overheads.csv), measurements/sarathi_serve_artifact_yi34b_tp2_a100pcie.csv
# (microsoft/sarathi-serve, MIT), measurements/aic (ai-dynamo/aiconfigurator silicon sample, Apache-2.0).
#   A100-80GB-PCIe: median absolute % error per operator on Vidur's raw rows, first estimates -> calibrated:
#     add                          3099    25.9%    10.5%
#     attn_decode                 10112    25.6%     9.0%
#     attn_post_proj               3099     5.6%     5.2%
#     attn_pre_proj                3099     6.6%     8.0%
#     attn_prefill                 4206    46.3%    19.4%
#     attn_rope                    3099    18.8%    11.5%
#     emb                          3099    43.6%     6.2%
#     input_layernorm              3099    23.3%    15.1%
#     mlp_act                      3099    11.4%    17.7%
#     mlp_down_proj                3099     6.1%     9.4%
#     mlp_up_proj                  3099     5.0%     8.1%
#     post_attention_layernorm     3099    33.2%    17.0%
#     all operators               45308    19.1%    10.2%
#     iterations (plan set)         234     4.1%     5.1%  (P90 19.8% -> 12.7%)
#   A100-80GB-SXM: median absolute % error per operator on Vidur's raw rows, first estimates -> calibrated:
#     add                          3099    20.1%    11.5%
#     attn_decode                 10112    20.8%     9.0%
#     attn_post_proj               3099     5.7%     5.2%
#     attn_pre_proj                3099     6.8%     8.0%
#     attn_prefill                 4206    46.3%    19.4%
#     attn_rope                    3099    20.7%    11.7%
#     emb                          3099    46.3%     6.3%
#     input_layernorm              3099    25.9%    15.2%
#     mlp_act                      3099    15.4%    17.6%
#     mlp_down_proj                3099     6.3%     9.4%
#     mlp_up_proj                  3099     5.0%     8.1%
#     post_attention_layernorm     3099    35.9%    17.0%
#     all operators               45308    18.4%    10.2%
#     iterations (plan set)         234     5.1%     5.1%  (P90 20.3% -> 12.7%)
# Sarathi-Serve artifact, Yi-34B-200K TP2 on 2xA100-80GB-PCIe (NVLink pair), ms: measured; before (first estimates
# + the previous 0.85 ms + 0.039 ms/sequence);
# GPU only (calibrated, engine none); after (calibrated + engine sarathi-serve-2024); error after:
#   prefill 128                            48.1     32.7     33.5     53.6   +11.4%
#   prefill 256                           121.4     52.3     53.3     73.5   -39.5%
#   prefill 512                           105.6     97.1    101.0    121.1   +14.7%
#   prefill 1024                          214.3    187.8    198.5    218.6    +2.0%
#   prefill 2048                          366.0    373.6    402.2    422.4   +15.4%
#   prefill 4096                          757.6    762.4    844.9    865.1   +14.2%
#   prefill 8192                         1863.0   1610.0   1871.0   1891.0    +1.5%
#   prefill 16384                        4408.0   3581.0   4485.0   4505.0    +2.2%
#   decode bs 1 ctx 1024                   46.8     29.6     30.0     50.1    +7.1%
#   decode bs 2 ctx 1024                   47.5     29.7     30.1     51.4    +8.1%
#   decode bs 4 ctx 1024                   48.8     30.1     30.3     53.8   +10.2%
#   decode bs 8 ctx 1024                   69.7     30.8     30.8     58.6   -16.0%
#   decode bs 16 ctx 1024                  77.3     32.2     31.6     68.2   -11.8%
#   decode bs 32 ctx 1024                  87.9     34.9     33.4     87.5    -0.5%
#   decode bs 64 ctx 1024                 127.8     40.5     36.9    126.0    -1.4%
#   decode bs 128 ctx 1024                189.3     51.6     44.0    203.0    +7.2%
#   decode bs 4 ctx 1024 (table-2)         68.1     30.1     30.3     53.8   -21.1%
#   hybrid 1021 + 3 decodes (table-2)     217.6    189.1    199.7    223.2    +2.6%
#   prefill 1024 (table-2)                217.2    187.8    198.5    218.6    +0.7%
CALIBRATED = {
    'A100-80GB-PCIe': {
        'matmul_compute_eff': 0.6691,
        'attn_compute_eff': 0.2469,
        'bandwidth_eff': 0.7365,
        'attn_decode_bandwidth_eff': 0.7915,
        'add_bandwidth_eff': 1.0,
        'norm_bandwidth_eff': 0.4473,
        'emb_bandwidth_eff': 0.1588,
        'launch_overhead_s': 2.728e-06,
        'attn_call_overhead_s': 1.481e-05,
        'source': 'calibrated on Vidur A100 tables (cost_models/calibration.py)',
    },
    'A100-80GB-SXM': {
        'matmul_compute_eff': 0.6691,
        'attn_compute_eff': 0.2469,
        'bandwidth_eff': 0.6992,
        'attn_decode_bandwidth_eff': 0.7511,
        'add_bandwidth_eff': 0.9803,
        'norm_bandwidth_eff': 0.4249,
        'emb_bandwidth_eff': 0.1508,
        'launch_overhead_s': 2.749e-06,
        'attn_call_overhead_s': 1.479e-05,
        'source': (
                'calibrated on Vidur A100 tables, measured on A100-80GB-PCIe (cost_models/calibration.py)'
            ),
    },
    'H100-SXM': {
        'matmul_compute_eff': 0.7949,
        'attn_compute_eff': 0.5634,
        'bandwidth_eff': 0.8536,
        'attn_decode_bandwidth_eff': 0.9173,
        'add_bandwidth_eff': 1.0,
        'norm_bandwidth_eff': 0.5184,
        'emb_bandwidth_eff': 0.184,
        'launch_overhead_s': 2.728e-06,
        'attn_call_overhead_s': 1.481e-05,
        'source': (
                'calibrated on AIConfigurator end-to-end TPOT (cost_models/calibration.py)'
            ),
    },
    'H200': {
        'matmul_compute_eff': 0.7949,
        'attn_compute_eff': 0.5634,
        'bandwidth_eff': 0.8536,
        'attn_decode_bandwidth_eff': 0.9173,
        'add_bandwidth_eff': 1.0,
        'norm_bandwidth_eff': 0.5184,
        'emb_bandwidth_eff': 0.184,
        'launch_overhead_s': 2.728e-06,
        'attn_call_overhead_s': 1.481e-05,
        'source': (
                "first estimates: H100-SXM's calibrated efficiencies (cost_models/calibration.py)"
            ),
    },
}

ENGINE_FITS = {
    'vidur-vllm-2023': {
        'fixed_s': 0.0008063,
        'per_seq_s': 3.748e-05,
        'per_token_s': 0.0,
        'measured_tp': 2,
        'median_abs_error': 2.807,
        'p90_abs_error': 5.394,
        'previous_median_abs_error': 4.39,
        'rows': 13,
    },
    'sarathi-serve-2024': {
        'fixed_s': 0.01906,
        'per_seq_s': 0.001093,
        'per_token_s': 0.0,
        'measured_tp': 2,
        'median_abs_error': 8.095,
        'p90_abs_error': 16.99,
        'rows': 19,
    },
    'trtllm-1.0': {
        'fixed_s': 2.832e-06,
        'per_seq_s': 3.488e-06,
        'per_token_s': 0.0,
        'measured_tp': 1,
        'median_abs_error': 1.16,
        'rows': 42,
    },
    'vllm-0.32': {
        'fixed_s': 0.0,
        'per_seq_s': 5.13e-05,
        'per_token_s': 0.0,
        'measured_tp': 2,
        'median_abs_error': 4.14,
        'rows': 27,
    },
}

STATUS = {
    'A100-80GB-PCIe': {
        'calibrated': True,
        'against': (
                'Vidur A100 tables (per-operator kernels) + Sarathi-Serve artifact (Yi-34B TP2 batches)'
            ),
        'median_abs_error': 10.19,
        'errors': {
            'per operator, Vidur': 10.19,
            'per iteration, Vidur plan set': 5.058,
            'artifact batches, engine sarathi-serve-2024': 8.095,
        },
        'measured_on': None,
        'note': (
                "Vidur's node a100_pairwise_nvlink = PCIe cards with NVLink bridges (../shared/data/README.md)"
            ),
    },
    'A100-80GB-SXM': {
        'calibrated': True,
        'against': 'Vidur A100 tables (per-operator kernels)',
        'median_abs_error': 10.25,
        'errors': {
            'per operator, Vidur': 10.25,
            'per iteration, Vidur plan set': 5.051,
        },
        'measured_on': 'A100-80GB-PCIe',
        'note': (
                "fitted to the SXM datasheet peaks, so SXM is priced at the speed the PCIe card was measured at (SXM's "
                '~5% more bandwidth and higher power limit are not credited)'
            ),
    },
    'A40': {
        'calibrated': False,
        'against': None,
        'median_abs_error': None,
        'errors': {},
        'measured_on': None,
        'reason': 'no public measurements in ../shared/data',
    },
    'H100-SXM': {
        'calibrated': True,
        'against': (
                'AIConfigurator end-to-end TPOT (TRT-LLM 1.0 Llama-3.1-8B, vLLM 0.12 Qwen3-32B; bf16)'
            ),
        'median_abs_error': 1.16,
        'errors': {
            'TRT-LLM TP1 (fitted)': 1.16,
            'TRT-LLM TP2': 2.465,
            'vLLM TP2 (engine fitted)': 4.14,
            'TP4-8, ring all-reduce latency': 32.23,
        },
        'measured_on': None,
        'note': (
                '3 scale factors on the A100-80GB-PCIe efficiencies, fitted through a closed-loop benchmark model '
                "(experiments/calibrate_aic.py); TP4-8 are over-predicted at small batches because the roofline's ring "
                'all-reduce pays 2(p-1) link latencies per call'
            ),
    },
    'H200': {
        'calibrated': False,
        'against': None,
        'median_abs_error': None,
        'errors': {},
        'measured_on': None,
        'reason': (
                "no bf16 measurements, AIC's H200 rows are fp8 with the KV-cache dtype not recorded; H100-SXM's "
                'calibrated efficiencies on the H200 datasheet'
            ),
    },
    'cpu': {
        'calibrated': False,
        'against': None,
        'median_abs_error': None,
        'errors': {},
        'measured_on': None,
        'reason': (
                'order-of-magnitude figures; profile and fit the CPU instead: servesim profile --exec-device cpu'
            ),
    },
}

TABLES = {
    'vidur_operators': {
        'A100-80GB-PCIe': {
            'add': [3099, 25.94, 10.51],
            'attn_decode': [10112, 25.59, 9.048],
            'attn_post_proj': [3099, 5.637, 5.21],
            'attn_pre_proj': [3099, 6.648, 8.039],
            'attn_prefill': [4206, 46.28, 19.44],
            'attn_rope': [3099, 18.83, 11.52],
            'emb': [3099, 43.63, 6.224],
            'input_layernorm': [3099, 23.26, 15.14],
            'mlp_act': [3099, 11.39, 17.69],
            'mlp_down_proj': [3099, 6.104, 9.43],
            'mlp_up_proj': [3099, 4.966, 8.133],
            'post_attention_layernorm': [3099, 33.2, 16.99],
            'all operators': [45308, 19.1, 10.19],
        },
        'A100-80GB-SXM': {
            'add': [3099, 20.05, 11.48],
            'attn_decode': [10112, 20.84, 9.048],
            'attn_post_proj': [3099, 5.747, 5.193],
            'attn_pre_proj': [3099, 6.752, 8.041],
            'attn_prefill': [4206, 46.28, 19.44],
            'attn_rope': [3099, 20.73, 11.71],
            'emb': [3099, 46.27, 6.258],
            'input_layernorm': [3099, 25.93, 15.16],
            'mlp_act': [3099, 15.42, 17.63],
            'mlp_down_proj': [3099, 6.281, 9.431],
            'mlp_up_proj': [3099, 4.961, 8.136],
            'post_attention_layernorm': [3099, 35.85, 17.03],
            'all operators': [45308, 18.37, 10.25],
        },
    },
    'vidur_iterations': {
        'A100-80GB-PCIe': [234, 4.058, 5.058, 19.76, 12.65],
        'A100-80GB-SXM': [234, 5.14, 5.051, 20.32, 12.66],
    },
    'artifact': [
        ['prefill 128', 1, 128, 48.1, 32.7, 33.45, 53.61, 11.45],
        ['prefill 256', 1, 256, 121.4, 52.26, 53.31, 73.47, -39.48],
        ['prefill 512', 1, 512, 105.6, 97.08, 101.0, 121.1, 14.7],
        ['prefill 1024', 1, 1024, 214.3, 187.8, 198.5, 218.6, 2.015],
        ['prefill 2048', 1, 2048, 366.0, 373.6, 402.2, 422.4, 15.41],
        ['prefill 4096', 1, 4096, 757.6, 762.4, 844.9, 865.1, 14.19],
        ['prefill 8192', 1, 8192, 1863.0, 1610.0, 1871.0, 1891.0, 1.501],
        ['prefill 16384', 1, 16384, 4408.0, 3581.0, 4485.0, 4505.0, 2.206],
        ['decode bs 1 ctx 1024', 1, 1, 46.8, 29.57, 29.99, 50.14, 7.141],
        ['decode bs 2 ctx 1024', 2, 2, 47.5, 29.74, 30.1, 51.35, 8.095],
        ['decode bs 4 ctx 1024', 4, 4, 48.8, 30.09, 30.32, 53.75, 10.15],
        ['decode bs 8 ctx 1024', 8, 8, 69.7, 30.78, 30.76, 58.57, -15.97],
        ['decode bs 16 ctx 1024', 16, 16, 77.3, 32.17, 31.64, 68.19, -11.78],
        ['decode bs 32 ctx 1024', 32, 32, 87.9, 34.94, 33.41, 87.45, -0.5154],
        ['decode bs 64 ctx 1024', 64, 64, 127.8, 40.5, 36.94, 126.0, -1.443],
        ['decode bs 128 ctx 1024', 128, 128, 189.3, 51.6, 44.01, 203.0, 7.223],
        ['decode bs 4 ctx 1024 (table-2)', 4, 4, 68.1, 30.09, 30.32, 53.75, -21.07],
        ['hybrid 1021 + 3 decodes (table-2)', 4, 1024, 217.6, 189.1, 199.7, 223.2, 2.557],
        ['prefill 1024 (table-2)', 1, 1024, 217.2, 187.8, 198.5, 218.6, 0.6528],
    ],
    'aic': {
        'scales': {
            's_mm': 1.188,
            's_attn': 2.282,
            's_b': 1.159,
        },
        'trtllm': {
            'framework': 'trtllm 1.0.0rc3 meta-llama/Llama-3.1-8B-Instruct',
            'fitted_tp': 1,
            'rows_fitted': 42,
            'excluded_kv_limited': 0,
            'by_tp_after': {
                1: 1.16,
                2: 2.465,
                4: 20.35,
                8: 61.84,
            },
            'by_tp_first_estimates': {
                1: 16.73,
                2: 16.75,
                4: 33.87,
                8: 71.93,
            },
            'tp4_8_after': 35.11,
        },
        'vllm': {
            'framework': 'vllm 0.12.0 Qwen/Qwen3-32B',
            'fitted_tp': 2,
            'rows_fitted': 27,
            'excluded_kv_limited': 3,
            'by_tp_after': {
                2: 4.14,
                4: 18.36,
                8: 67.86,
            },
            'by_tp_first_estimates': {
                2: 15.51,
                4: 31.42,
                8: 77.97,
            },
            'tp4_8_after': 29.36,
        },
    },
}
