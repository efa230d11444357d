"""The shape of an architecture description. Families are *data* (see `families.py`).

Names are templates relative to a decoder layer (`{i}` = layer index in `layer`, `{e}` = expert
index). On-disk names are what checkpoints hold (transformers 5 saves MoE experts under their
legacy per-expert names even though it fuses them in memory); `module_root` says where the same
block lives in the transformers module tree when that differs (Mixtral's `block_sparse_moe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# Block-quantized fp8 checkpoints (DeepSeek) store each weight's scales next to it under this suffix:
# `<prefix>.weight` -> `<prefix>.weight_scale_inv`. A scale belongs to its weight's tensor group.
SCALE_SUFFIX = "_scale_inv"


def is_scale_name(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def _ro(d: dict) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class SizeKeys:
    """Config keys holding the model's sizes."""

    hidden: str = "hidden_size"
    ffn: str = "intermediate_size"
    heads: str = "num_attention_heads"
    kv_heads: str = "num_key_value_heads"
    head_dim: str = "head_dim"  # falls back to hidden // heads when absent or null
    layers: str = "num_hidden_layers"
    vocab: str = "vocab_size"


@dataclass(frozen=True)
class AttentionSpec:
    """Attention projections of one layer: role -> module path relative to the layer."""

    kind: str  # "gqa" or "mla"
    modules: Mapping[str, str]
    bias_roles: tuple[str, ...] = ()  # roles whose Linear may carry a bias
    bias_key: str | None = None  # config key switching those biases on; None = always on
    norms: Mapping[str, str] = field(default_factory=lambda: _ro({}))  # q/k norms (Qwen3), latent norms (MLA)
    # MLA only: roles that exist only when `q_lora_rank` is set, or only when it is null
    q_lora_roles: tuple[str, ...] = ()
    no_q_lora_roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class MlpSpec:
    """A gated (SwiGLU) MLP: role (gate/up/down) -> module path relative to its parent."""

    modules: Mapping[str, str] = field(
        default_factory=lambda: _ro({"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    )
    bias_key: str | None = None


@dataclass(frozen=True)
class MoESpec:
    disk_root: str  # block path relative to the layer on disk, e.g. "mlp" / "block_sparse_moe"
    experts_key: str  # config key: number of routed experts
    ffn_key: str  # config key: routed expert intermediate size
    topk_key: str = "num_experts_per_tok"
    module_root: str = "mlp"  # the same block in the transformers module tree
    router: str = "gate"  # relative to the root; its tensor is `<router>.weight`
    router_extra: tuple[str, ...] = ()  # further router tensors, e.g. "gate.e_score_correction_bias"
    expert: str = "experts.{e}"
    expert_mlp: MlpSpec = field(default_factory=MlpSpec)
    shared: str | None = None  # shared expert MLP path relative to the root
    shared_ffn_keys: tuple[str, ...] = ()  # product of these config values = shared expert width
    shared_gate: str | None = None  # Qwen2-MoE's sigmoid gate on the shared expert
    # which layers are MoE: i >= first_dense and (i + 1) % step == 0 and i not in dense_list
    first_dense_key: str | None = None
    step_key: str | None = None
    dense_list_key: str | None = None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    attention: AttentionSpec
    mlp: MlpSpec | None = field(default_factory=MlpSpec)  # dense MLP at "mlp" (None when every layer is MoE)
    mlp_root: str = "mlp"
    moe: MoESpec | None = None
    sizes: SizeKeys = field(default_factory=SizeKeys)
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer: str = "model.layers.{i}"
    layer_norms: Mapping[str, str] = field(
        default_factory=lambda: _ro({"input": "input_layernorm", "post_attention": "post_attention_layernorm"})
    )
    required_keys: tuple[str, ...] = ()  # extra config keys the family needs
    mtp_key: str | None = None  # config key: number of multi-token-prediction layers stored after the decoder
    # the model multiplies token embeddings by sqrt(hidden_size), a constant transformers derives from
    # the config (Gemma): a different hidden size would rescale the residual stream
    embedding_scaled_by_hidden: bool = False
    paper: str | None = None
