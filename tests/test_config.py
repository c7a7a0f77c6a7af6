import json

import pytest

from qwenjax.config import PRESETS, ModelConfig, RopeScaling, preset

OLD_LAYOUT = {
    "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "eos_token_id": 151645,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}


def test_old_layout_with_yarn(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OLD_LAYOUT))
    c = ModelConfig.from_hf(tmp_path)
    assert c.rope_theta == 1e6
    assert c.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=32768)
    assert c.max_context == 131072
    assert c.head_dim == 128 and c.eos_token_ids == (151645,)


def test_transformers5_rope_parameters_layout():
    raw = {k: v for k, v in OLD_LAYOUT.items() if k not in ("rope_theta", "rope_scaling")}
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                              "original_max_position_embeddings": 32768}
    c = ModelConfig.from_hf_dict(raw)
    assert c.rope_theta == 1e6 and c.rope_scaling.factor == 4.0
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    c = ModelConfig.from_hf_dict(raw)
    assert c.rope_theta == 5e5 and c.rope_scaling is None and c.max_context == 32768


def test_unsupported_rope_and_model_type_are_named():
    with pytest.raises(ValueError, match="'linear' is not supported"):
        ModelConfig.from_hf_dict({**OLD_LAYOUT, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        ModelConfig.from_hf_dict({**OLD_LAYOUT, "model_type": "llama"})


def test_72b_sizes():
    c = preset("Qwen2.5-72B-Instruct")
    assert 72.5e9 < c.param_count() < 72.8e9  # published: 72.7B
    assert 145e9 < c.weight_bytes("bfloat16") < 146e9
    assert c.kv_bytes_per_token("bfloat16") == 80 * 8 * 128 * 2 * 2 == 320 * 1024
    assert c.kv_bytes_per_token() * 32768 == 10 * 2**30  # 10 GiB for one 32k sequence


@pytest.mark.parametrize("name, billions", [
    ("qwen2.5-0.5b", 0.49), ("qwen2.5-1.5b", 1.54), ("qwen2.5-3b", 3.09), ("qwen2.5-7b", 7.62),
    ("qwen2.5-14b", 14.77), ("qwen2.5-32b", 32.76), ("qwen2.5-72b", 72.71),
])
def test_preset_parameter_counts_match_published(name, billions):
    assert abs(PRESETS[name].param_count() / 1e9 - billions) < 0.01


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="qwen2.5-0.5b"):
        preset("qwen3-8b")


def test_hf_overrides_replace_positions_and_rope_only():
    """vLLM's hf_overrides (SGLang's --json-model-override-args): Qwen2.5's YaRN to 131k without
    editing config.json; keys that fix the weights' shapes are refused by name."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    base = preset("qwen2.5-7b")
    assert base.max_context == 32768
    long = base.with_overrides({"rope_scaling": yarn})
    assert long.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=32768)
    assert long.max_context == 131072 and long.hidden_size == base.hidden_size
    assert long.with_overrides({"rope_scaling": None}) == base
    assert base.with_overrides({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
                               ).rope_theta == 5e5
    assert base.with_overrides({"eos_token_id": [1, 2]}).eos_token_ids == (1, 2)
    with pytest.raises(ValueError, match=r"hf_overrides \['hidden_size'\]: only"):
        base.with_overrides({"hidden_size": 1024})
    with pytest.raises(ValueError, match="'linear' is not supported"):
        base.with_overrides({"rope_scaling": {"type": "linear", "factor": 2.0}})


def test_rope_scaling_added_to_a_transformers5_config_is_not_ignored():
    raw = {k: v for k, v in OLD_LAYOUT.items() if k not in ("rope_theta", "rope_scaling")}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    raw["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    c = ModelConfig.from_hf_dict(raw)
    assert c.rope_theta == 1e6 and c.max_context == 131072
