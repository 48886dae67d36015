"""Spec validation (issue 10): zero, negative or non-integer sizes in model and device specs, and attention heads
that do not divide by the KV heads, are one-line SpecErrors naming the file and the key."""
from __future__ import annotations

import json

import pytest
import yaml

from cost_models.specs import DeviceSpec, ModelSpec, SpecError, known_devices, known_models, load_device, load_model

MODEL = {"name": "m", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "head_dim": 16,
         "intermediate_size": 128, "vocab_size": 1000, "max_model_len": 2048}
DEVICE = {"name": "g", "memory_bytes": 2 ** 34, "peak_flops": {"float16": 1.0e14},
          "memory_bandwidth_bytes_per_s": 1.0e12, "interconnect_bandwidth_bytes_per_s": 1.0e11,
          "interconnect_latency_s": 5.0e-6}
HF = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
      "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 2048, "hidden_act": "silu"}


def one_line_error(fn, *args) -> str:
    with pytest.raises(SpecError) as err:
        fn(*args)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def write_yaml(tmp_path, data, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("key", ["num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
                                 "intermediate_size", "vocab_size", "max_model_len", "context_length"])
@pytest.mark.parametrize("bad", [0, -4, 2.5, "8"])
def test_model_yaml_with_a_bad_size_names_file_and_key(tmp_path, key, bad):
    path = write_yaml(tmp_path, {**MODEL, key: bad})
    msg = one_line_error(load_model, str(path))
    assert msg.startswith(f"{path}: {key}:") and "positive integer" in msg and repr(bad) in msg


def test_heads_not_divisible_by_kv_heads_is_an_error(tmp_path):
    path = write_yaml(tmp_path, {**MODEL, "num_attention_heads": 6, "num_kv_heads": 4})
    msg = one_line_error(load_model, str(path))
    assert msg.startswith(str(path)) and "num_attention_heads" in msg and "num_kv_heads" in msg and "divide" in msg


@pytest.mark.parametrize("key, bad", [("mlp", "swiglu2"), ("norm", "batchnorm"), ("dtype", "int3")])
def test_model_yaml_with_an_unknown_kind_names_file_and_key(tmp_path, key, bad):
    path = write_yaml(tmp_path, {**MODEL, key: bad})
    msg = one_line_error(load_model, str(path))
    assert msg.startswith(f"{path}: {key}:") and repr(bad) in msg


@pytest.mark.parametrize("hf_key, field, bad", [("num_hidden_layers", "num_layers", 0),
                                                ("hidden_size", "hidden_size", -64),
                                                ("num_attention_heads", "num_attention_heads", 0),
                                                ("num_key_value_heads", "num_kv_heads", 0),
                                                ("vocab_size", "vocab_size", 0),
                                                ("intermediate_size", "intermediate_size", 12.5),
                                                ("max_position_embeddings", "max_model_len", -1)])
def test_hugging_face_config_with_a_bad_size_names_the_config_key(tmp_path, hf_key, field, bad):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF, hf_key: bad}))
    msg = one_line_error(load_model, str(path))
    assert msg.startswith(str(path)) and hf_key in msg and repr(bad) in msg
    if hf_key != field:
        assert f"({field})" in msg


def test_hugging_face_config_with_indivisible_kv_heads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF, "num_key_value_heads": 3}))
    msg = one_line_error(load_model, str(path))
    assert "num_key_value_heads" in msg and "divide" in msg


@pytest.mark.parametrize("key", ["memory_bytes", "memory_bandwidth_bytes_per_s"])
@pytest.mark.parametrize("bad", [0, -1.0e12])
def test_device_yaml_with_a_bad_size_names_file_and_key(tmp_path, key, bad):
    path = write_yaml(tmp_path, {**DEVICE, key: bad})
    msg = one_line_error(load_device, str(path))
    assert msg.startswith(f"{path}: {key}:") and "positive" in msg


@pytest.mark.parametrize("data, key", [({"peak_flops": {"float16": 0.0}}, "peak_flops.float16"),
                                       ({"peak_flops": {"float16": 1e14, "float32": -1.0}}, "peak_flops.float32"),
                                       ({"interconnect_bandwidth_bytes_per_s": -1.0},
                                        "interconnect_bandwidth_bytes_per_s"),
                                       ({"interconnect_latency_s": -1e-6}, "interconnect_latency_s")])
def test_device_yaml_with_bad_flops_or_links_names_file_and_key(tmp_path, data, key):
    path = write_yaml(tmp_path, {**DEVICE, **data})
    msg = one_line_error(load_device, str(path))
    assert msg.startswith(f"{path}: {key}:")


def test_unset_interconnect_and_zero_latency_are_allowed(tmp_path):
    d = load_device(str(write_yaml(tmp_path, {**DEVICE, "interconnect_bandwidth_bytes_per_s": 0.0,
                                               "interconnect_latency_s": 0.0})))
    assert d.interconnect_bandwidth_bytes_per_s == 0.0 and d.interconnect_latency_s == 0.0


def test_specs_built_in_code_are_checked_too():
    with pytest.raises(SpecError, match=r"^model m: head_dim: must be a positive integer, got 0$"):
        ModelSpec(**{**MODEL, "head_dim": 0})
    with pytest.raises(SpecError, match=r"^device g: memory_bandwidth_bytes_per_s: must be a positive number"):
        DeviceSpec(**{**DEVICE, "memory_bandwidth_bytes_per_s": 0.0})


def test_every_built_in_spec_passes_the_checks():
    assert all(load_model(n).num_layers > 0 for n in known_models())
    assert all(load_device(n).memory_bytes > 0 for n in known_devices())
