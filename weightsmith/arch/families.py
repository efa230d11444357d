"""The supported model families, as data. Adding a family = adding an entry + a tiny-model test."""

from __future__ import annotations

from weightsmith.arch.spec import AttentionSpec, Family, MlpSpec, MoESpec, _ro

_GQA = _ro({"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"})
_QK_NORM = _ro({"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"})
_MLA = AttentionSpec(
    kind="mla",
    modules=_ro(
        {
            "q": "self_attn.q_proj",
            "q_a": "self_attn.q_a_proj",
            "q_b": "self_attn.q_b_proj",
            "kv_a": "self_attn.kv_a_proj_with_mqa",
            "kv_b": "self_attn.kv_b_proj",
            "o": "self_attn.o_proj",
        }
    ),
    bias_roles=("q_a", "kv_a", "o"),
    bias_key="attention_bias",
    norms=_ro({"q_a_norm": "self_attn.q_a_layernorm", "kv_a_norm": "self_attn.kv_a_layernorm"}),
    q_lora_roles=("q_a", "q_b", "q_a_norm"),
    no_q_lora_roles=("q",),
)
_QWEN_MOE_LAYERS = dict(step_key="decoder_sparse_step", dense_list_key="mlp_only_layers")
_DEEPSEEK_MOE = dict(
    disk_root="mlp",
    experts_key="n_routed_experts",
    ffn_key="moe_intermediate_size",
    shared="shared_experts",
    shared_ffn_keys=("moe_intermediate_size", "n_shared_experts"),
    first_dense_key="first_k_dense_replace",
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            name="llama",
            model_types=("llama",),
            architectures=("LlamaForCausalLM",),
            attention=AttentionSpec("gqa", _GQA, bias_roles=("q", "k", "v", "o"), bias_key="attention_bias"),
            mlp=MlpSpec(bias_key="mlp_bias"),
        ),
        Family(
            name="mistral",
            model_types=("mistral",),
            architectures=("MistralForCausalLM",),
            attention=AttentionSpec("gqa", _GQA),
        ),
        Family(
            name="qwen2",
            model_types=("qwen2",),
            architectures=("Qwen2ForCausalLM",),
            attention=AttentionSpec("gqa", _GQA, bias_roles=("q", "k", "v")),
        ),
        Family(
            name="qwen3",
            model_types=("qwen3",),
            architectures=("Qwen3ForCausalLM",),
            attention=AttentionSpec(
                "gqa", _GQA, bias_roles=("q", "k", "v", "o"), bias_key="attention_bias", norms=_QK_NORM
            ),
        ),
        Family(
            name="gemma3_text",
            model_types=("gemma3_text",),
            architectures=("Gemma3ForCausalLM",),
            attention=AttentionSpec(
                "gqa", _GQA, bias_roles=("q", "k", "v", "o"), bias_key="attention_bias", norms=_QK_NORM
            ),
            # "post_attention" is the role of the norm in front of the MLP (Llama's post_attention_layernorm);
            # Gemma 3 also normalises each sublayer's output before the residual add (sandwich norms)
            layer_norms=_ro(
                {
                    "input": "input_layernorm",
                    "post_attention": "pre_feedforward_layernorm",
                    "attn_out": "post_attention_layernorm",
                    "mlp_out": "post_feedforward_layernorm",
                }
            ),
            embedding_scaled_by_hidden=True,
            paper="https://arxiv.org/abs/2503.19786",
        ),
        Family(
            name="mixtral",
            model_types=("mixtral",),
            architectures=("MixtralForCausalLM",),
            attention=AttentionSpec("gqa", _GQA),
            mlp=None,
            moe=MoESpec(
                disk_root="block_sparse_moe",
                experts_key="num_local_experts",
                ffn_key="intermediate_size",
                expert_mlp=MlpSpec(_ro({"gate": "w1", "up": "w3", "down": "w2"})),
            ),
        ),
        Family(
            name="qwen2_moe",
            model_types=("qwen2_moe",),
            architectures=("Qwen2MoeForCausalLM",),
            attention=AttentionSpec("gqa", _GQA, bias_roles=("q", "k", "v"), bias_key="qkv_bias"),
            moe=MoESpec(
                disk_root="mlp",
                experts_key="num_experts",
                ffn_key="moe_intermediate_size",
                shared="shared_expert",
                shared_ffn_keys=("shared_expert_intermediate_size",),
                shared_gate="shared_expert_gate",
                **_QWEN_MOE_LAYERS,
            ),
        ),
        Family(
            name="qwen3_moe",
            model_types=("qwen3_moe",),
            architectures=("Qwen3MoeForCausalLM",),
            attention=AttentionSpec(
                "gqa", _GQA, bias_roles=("q", "k", "v", "o"), bias_key="attention_bias", norms=_QK_NORM
            ),
            moe=MoESpec(
                disk_root="mlp", experts_key="num_experts", ffn_key="moe_intermediate_size", **_QWEN_MOE_LAYERS
            ),
        ),
        Family(
            name="deepseek_v2",
            model_types=("deepseek_v2",),
            architectures=("DeepseekV2ForCausalLM",),
            attention=_MLA,
            moe=MoESpec(**_DEEPSEEK_MOE),
            required_keys=("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
        ),
        Family(
            name="deepseek_v3",
            model_types=("deepseek_v3",),
            architectures=("DeepseekV3ForCausalLM",),
            attention=_MLA,
            moe=MoESpec(**_DEEPSEEK_MOE, router_extra=("gate.e_score_correction_bias",)),
            required_keys=("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
            mtp_key="num_nextn_predict_layers",
        ),
    ]
}
