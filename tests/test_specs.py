"""Model and device specs (issue 2): built-in YAML models and devices load, any Hugging Face config.json loads,
unknown names list the known ones."""
from __future__ import annotations

import json

import pytest

from cost_models.roofline import RooflineCostModel
from cost_models.specs import (DeviceSpec, ModelSpec, SpecError, known_devices, known_models, load_device,
                               load_model)
from cost_models.plan import BatchPlan

# Published parameter counts (billions): model cards / papers.
PUBLISHED_PARAMS_B = {"Mistral-7B": 7.24, "Llama-2-7B": 6.74, "Llama-3-8B": 8.03, "Yi-34B": 34.4,
                      "Llama-2-70B": 69.0, "Falcon-180B": 180.0}
DEVICES = ["A100-80GB-SXM", "A100-80GB-PCIe", "H100-SXM", "H200", "A40"]


def test_every_issue_model_and_device_is_built_in():
    assert set(PUBLISHED_PARAMS_B) <= set(known_models())
    assert set(DEVICES) <= set(known_devices())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_builtin_models_load_with_their_published_size(name):
    m = load_model(name)
    assert isinstance(m, ModelSpec) and m.name == name
    assert m.num_attention_heads * m.head_dim == m.q_size
    assert m.num_attention_heads % m.num_kv_heads == 0
    assert m.max_model_len >= 2048 and m.dtype_bytes == 2
    assert m.num_params() / 1e9 == pytest.approx(PUBLISHED_PARAMS_B[name], rel=0.02)


def test_every_listed_model_and_device_loads():
    for name in known_models():
        assert load_model(name).num_layers > 0
    for name in known_devices():
        d = load_device(name)
        assert isinstance(d, DeviceSpec) and d.memory_bytes > 0 and d.memory_bandwidth_bytes_per_s > 0
        assert d.flops("float16") > 0


def test_names_are_case_insensitive_and_aliases_resolve():
    assert load_model("mistral-7b").name == "Mistral-7B"
    assert load_model("LLAMA-2-70B").name == "Llama-2-70B"
    assert load_device("A100").name == "A100-80GB-SXM"
    assert load_device("h100").name == "H100-SXM"


@pytest.mark.parametrize("name, memory_gib, fp16_tflops, bandwidth_tb_s", [
    ("A100-80GB-SXM", 80, 312, 2.039), ("A100-80GB-PCIe", 80, 312, 1.935), ("H100-SXM", 80, 989.4, 3.35),
    ("H200", 141e9 / 2**30, 989, 4.8), ("A40", 48, 149.7, 0.696)])
def test_device_datasheet_figures(name, memory_gib, fp16_tflops, bandwidth_tb_s):
    d = load_device(name)
    assert d.memory_bytes / 2**30 == pytest.approx(memory_gib, rel=0.01)
    assert d.flops("float16") == pytest.approx(fp16_tflops * 1e12, rel=0.01)
    assert d.memory_bandwidth_bytes_per_s == pytest.approx(bandwidth_tb_s * 1e12, rel=0.01)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(SpecError) as err:
        load_model("GPT-5")
    msg = str(err.value)
    assert "'GPT-5'" in msg and "\n" not in msg
    assert all(name in msg for name in known_models())
    with pytest.raises(SpecError) as err:
        load_device("TPU-v5")
    msg = str(err.value)
    assert "'TPU-v5'" in msg and "\n" not in msg
    assert all(name in msg for name in known_devices())


LLAMA_LIKE = {"architectures": ["LlamaForCausalLM"], "_name_or_path": "TinyLlama-1.1B", "hidden_size": 2048,
              "intermediate_size": 5632, "num_attention_heads": 32, "num_hidden_layers": 22,
              "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}


def test_hugging_face_config_json_loads(tmp_path):
    folder = tmp_path / "tinyllama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_LIKE))
    for where in (folder / "config.json", folder):
        m = load_model(str(where))
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads) == (22, 2048, 32, 4)
        assert m.head_dim == 64
        assert (m.intermediate_size, m.vocab_size, m.max_model_len) == (5632, 32000, 2048)
        assert (m.mlp, m.norm, m.dtype) == ("gated", "rmsnorm", "bfloat16")
    # ... and prices plans like a built-in model
    cm = RooflineCostModel(load_model(str(folder)), "A100")
    assert cm.iteration_time(BatchPlan.from_entries([(0, 128, 0)])) > 0


def test_gpt2_style_config_json_loads(tmp_path):
    cfg = {"n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257,
           "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    m = load_model(str(path))
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads) == (12, 768, 12, 12)
    assert (m.intermediate_size, m.max_model_len, m.norm) == (4 * 768, 1024, "layernorm")
    assert m.mlp == "plain"


def test_config_json_missing_a_field_names_file_and_field(tmp_path):
    cfg = dict(LLAMA_LIKE)
    del cfg["vocab_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SpecError) as err:
        load_model(str(path))
    assert str(path) in str(err.value) and "vocab_size" in str(err.value)


def test_yaml_spec_missing_a_field_names_file_and_field(tmp_path):
    path = tmp_path / "half.yaml"
    path.write_text("name: half\nnum_layers: 2\nhidden_size: 64\n")
    with pytest.raises(SpecError) as err:
        load_model(str(path))
    assert str(path) in str(err.value) and "vocab_size" in str(err.value)


def test_yaml_device_spec_loads(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text("name: my-gpu\nmemory_bytes: 25769803776\npeak_flops: {float16: 1.0e14}\n"
                    "memory_bandwidth_bytes_per_s: 1.0e12\n")
    d = load_device(str(path))
    assert (d.name, d.memory_bytes, d.flops("float16")) == ("my-gpu", 24 * 2**30, 1e14)


def test_fast_yaml_reads_the_spec_files_as_safe_load_and_fails_alike():
    import yaml

    from cost_models.specs import SPEC_DIR, safe_load_yaml

    paths = sorted(SPEC_DIR.glob("*/*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        text = path.read_text()
        assert safe_load_yaml(text) == yaml.safe_load(text), path
    bad = "name: x\n  layers: [1, 2\n"
    with pytest.raises(yaml.YAMLError) as fast:
        safe_load_yaml(bad)
    with pytest.raises(yaml.YAMLError) as slow:
        yaml.safe_load(bad)
    assert str(fast.value) == str(slow.value)
