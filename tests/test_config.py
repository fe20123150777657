import json
import logging

import pytest
import torch

from angelmed.config import ConfigError, ModelConfig, get_preset
from angelmed.model import Transformer


def test_flash_100b_exact_parameter_count_on_meta():
    cfg = get_preset("flash-100b")
    with torch.device("meta"):
        model = Transformer(cfg)
    bf16 = sum(p.numel() for p in model.parameters())
    fp32 = sum(b.numel() for n, b in model.named_buffers() if n.endswith("expert_bias"))
    assert bf16 == 102_889_697_280  # safetensors count of inclusionAI/Ling-flash-2.0 (spec §1.2)
    assert fp32 == 7_936
    assert all(p.is_meta for p in model.parameters())
    counts = cfg.param_counts()
    assert counts["total"] == bf16 and counts["expert_bias_fp32"] == fp32
    assert round(counts["active"] / 1e9, 2) == 6.15


@pytest.mark.parametrize("preset", ["tiny", "small", "base-100m"])
def test_preset_formula_matches_module_count(preset):
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.param_counts()["total"]


def test_base_100m_is_about_100m_total_30m_active():
    c = get_preset("base-100m").param_counts()
    assert 80e6 < c["total"] < 120e6 and 20e6 < c["active"] < 40e6
    assert get_preset("base-100m").head_dim >= 32


def test_roundtrip_keeps_every_key(fixtures_dir):
    raw = json.loads((fixtures_dir / "tiny_groups_sharded" / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw)
    out = cfg.to_dict()
    for k, v in raw.items():
        if k == "moe_shared_expert_intermediate_size":
            continue  # export rule: per-expert width (spec §8.1)
        assert out[k] == v, k
    assert out["moe_shared_expert_intermediate_size"] == raw["moe_intermediate_size"]
    assert cfg.shared_expert_intermediate_size == 2 * raw["moe_intermediate_size"]  # load rule


def test_missing_routed_scaling_factor_uses_reference_default_and_warns(fixtures_dir, caplog):
    raw = json.loads((fixtures_dir / "tiny_mtp" / "config.json").read_text())
    del raw["routed_scaling_factor"], raw["partial_rotary_factor"]
    with caplog.at_level(logging.WARNING):
        cfg = ModelConfig.from_dict(raw)
    assert cfg.routed_scaling_factor == 1.0 and cfg.partial_rotary_factor == 1.0
    assert "routed_scaling_factor" in caplog.text and "partial_rotary_factor" in caplog.text


def test_exported_keys_engines_read(fixtures_dir):
    d = get_preset("small").to_dict()
    for key in ["use_qk_norm", "use_rmsnorm", "partial_rotary_factor", "score_function", "router_dtype",
                "moe_router_enable_expert_bias", "n_group", "topk_group", "routed_scaling_factor",
                "norm_topk_prob", "moe_shared_expert_intermediate_size", "num_nextn_predict_layers",
                "embedding_dropout", "head_dim", "first_k_dense_replace", "tie_word_embeddings", "auto_map"]:
        assert key in d, key
    assert d["model_type"] == "bailing_moe" and d["architectures"] == ["BailingMoeV2ForCausalLM"]
    assert "rotary_dim" not in d and "norm_head" not in d


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
])
def test_bad_config_errors_name_the_problem(fixtures_dir, change, needle):
    raw = json.loads((fixtures_dir / "tiny_mtp" / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(raw)


def test_config_without_required_key(fixtures_dir):
    raw = json.loads((fixtures_dir / "tiny_mtp" / "config.json").read_text())
    del raw["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig.from_dict(raw)


def test_yarn_parameters_match_spec_for_ling_flash():
    from angelmed.model import rope_parameters

    cfg = get_preset("flash-100b").replace(rope_scaling={"type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 32768},
                                           max_position_embeddings=131072)
    inv_freq, scaling = rope_parameters(cfg)
    base = 1.0 / (600000.0 ** (torch.arange(0, 64, 2).float() / 64))
    assert scaling == pytest.approx(1.138629, abs=1e-6)  # spec §3.1
    torch.testing.assert_close(inv_freq[:13], base[:13])  # j <= 12 unchanged
    torch.testing.assert_close(inv_freq[21:], base[21:] / 4)  # j >= 21 divided by the factor
    ramp = (16 - 12) / 9
    torch.testing.assert_close(inv_freq[16], base[16] / 4 * ramp + base[16] * (1 - ramp))
