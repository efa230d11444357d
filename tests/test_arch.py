"""Architecture tables: every family's names match what transformers really saves."""

from __future__ import annotations

import pytest

from tiny import FAMILIES, tiny_config
from weightsmith.app.inspect import coverage
from weightsmith.arch import FAMILIES as TABLE
from weightsmith.arch import arch_for, supports
from weightsmith.checkpoint.reader import Checkpoint
from weightsmith.errors import UnsupportedError


def test_table_covers_the_ten_families():
    assert set(TABLE) == {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "deepseek_v2",
        "deepseek_v3",
        "gemma3_text",
    }
    assert set(FAMILIES) == set(TABLE)


def test_names_match_saved_checkpoint(family, tiny_model):
    ck = Checkpoint(tiny_model(family))
    view = arch_for(ck.config)
    assert coverage(ck) == {"missing": [], "unexpected": []}
    assert sorted(view.expected_tensors()) == sorted(ck.names)
    groups = {view.classify(n) for n in ck.names}
    assert "other" not in groups
    assert {"embed", "lm_head", "final_norm", "attention", "norm"} <= groups


def test_shapes_follow_config(family, tiny_model):
    ck = Checkpoint(tiny_model(family))
    view = arch_for(ck.config)
    for i in range(view.num_layers):
        for lin in view.linears(i, include_router=True):
            shape = ck.info(lin.prefix + ".weight").shape
            assert len(shape) == 2 and shape[-1] > 0
            if lin.role in ("gate", "up"):
                assert shape[1] == view.hidden
            if lin.role == "down":
                assert shape[0] == view.hidden
        if view.is_moe(i):
            assert ck.info(view.router(i) + ".weight").shape == (view.num_experts, view.hidden)
            assert ck.info(view.expert(i, 0)["down"] + ".weight").shape == (
                view.hidden,
                int(view.size(view.family.moe.ffn_key)),
            )
        if not view.is_mla:
            att = view.attention(i)
            assert ck.info(att["q"] + ".weight").shape == (view.heads * view.head_dim, view.hidden)
            assert ck.info(att["k"] + ".weight").shape == (view.kv_heads * view.head_dim, view.hidden)


def test_moe_layer_rules():
    v = arch_for(tiny_config("qwen2_moe", layers=4, decoder_sparse_step=2))
    assert [v.is_moe(i) for i in range(4)] == [False, True, False, True]
    v = arch_for(tiny_config("qwen3_moe", layers=3, mlp_only_layers=[1]))
    assert [v.is_moe(i) for i in range(3)] == [True, False, True]
    v = arch_for(tiny_config("deepseek_v3", layers=3, first_k_dense_replace=2))
    assert [v.is_moe(i) for i in range(3)] == [False, False, True]
    v = arch_for(tiny_config("mixtral", layers=2))
    assert all(v.is_moe(i) for i in range(2)) and v.expert(0, 3)["gate"].endswith("block_sparse_moe.experts.3.w1")


def test_kv_cache_accounting():
    v = arch_for(tiny_config("llama"))
    assert v.kv_cache_values_per_token() == 2 * 2 * 2 * 16  # layers * (k,v) * kv_heads * head_dim
    v = arch_for(tiny_config("deepseek_v3"))
    assert v.kv_cache_values_per_token() == 2 * (32 + 8)  # layers * (kv_lora_rank + rope dim)


def test_classify_fp8_scales_and_mtp():
    v = arch_for(tiny_config("deepseek_v3", layers=2))
    assert v.classify("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv") == "routed_experts"
    assert v.classify("model.layers.1.mlp.shared_experts.down_proj.weight") == "shared_experts"
    assert v.classify("model.layers.1.mlp.gate.e_score_correction_bias") == "router"
    assert v.classify("model.layers.0.mlp.down_proj.weight") == "dense_mlp"
    assert v.classify("model.layers.2.eh_proj.weight") == "mtp"


def test_supports_names_the_problem():
    assert "gpt2" in supports({"model_type": "gpt2"}) and "llama" in supports({"model_type": "gpt2"})
    assert "num_hidden_layers" in supports(
        {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10, "intermediate_size": 4}
    )
    bad = {
        "model_type": "llama",
        "hidden_size": 8,
        "num_attention_heads": 3,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 10,
        "intermediate_size": 4,
        "head_dim": 4,
    }
    assert "multiple of num_key_value_heads" in supports(bad)
    with pytest.raises(UnsupportedError, match="unsupported architecture"):
        arch_for({"model_type": "gpt2"})
