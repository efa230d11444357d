"""A family bound to one config: the questions passes ask ("layer 7's q/k/v/o?").

Passes never spell tensor names themselves; they ask an `ArchView`. Names returned are module
prefixes (append `.weight` / `.bias`) on disk, as checkpoints store them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from weightsmith.arch.spec import SCALE_SUFFIX, Family, MlpSpec

GROUPS = (
    "embed",
    "lm_head",
    "final_norm",
    "attention",
    "norm",
    "dense_mlp",
    "router",
    "routed_experts",
    "shared_experts",
    "mtp",
    "other",
)


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class Linear:
    """One linear module of a layer, as passes see it."""

    prefix: str  # on-disk module prefix, e.g. "model.layers.3.self_attn.q_proj"
    role: str  # "q", "k", "v", "o", "gate", "up", "down", "router", "q_a", ...
    group: str  # "attention", "dense_mlp", "routed_experts", "shared_experts", "router"
    expert: int | None = None
    bias: bool = False


class ArchView:
    def __init__(self, family: Family, config: Any):
        self.family = family
        self.config = config
        self._layer_re = re.compile("^" + re.escape(family.layer).replace(r"\{i\}", r"(\d+)") + r"\.(.+)$")

    # ---- sizes ---------------------------------------------------------------------------
    def size(self, key: str) -> Any:
        return _cfg(self.config, key)

    @property
    def num_layers(self) -> int:
        return int(self.size(self.family.sizes.layers))

    @property
    def hidden(self) -> int:
        return int(self.size(self.family.sizes.hidden))

    @property
    def heads(self) -> int:
        return int(self.size(self.family.sizes.heads))

    @property
    def kv_heads(self) -> int:
        kv = self.size(self.family.sizes.kv_heads)
        return int(kv) if kv is not None else self.heads

    @property
    def head_dim(self) -> int:
        hd = self.size(self.family.sizes.head_dim)
        return int(hd) if hd else self.hidden // self.heads

    @property
    def ffn(self) -> int:
        return int(self.size(self.family.sizes.ffn))

    @property
    def vocab(self) -> int:
        return int(self.size(self.family.sizes.vocab))

    @property
    def tied(self) -> bool:
        return bool(_cfg(self.config, "tie_word_embeddings", False))

    @property
    def is_mla(self) -> bool:
        return self.family.attention.kind == "mla"

    @property
    def q_lora(self) -> bool:
        return self.is_mla and _cfg(self.config, "q_lora_rank") is not None

    # ---- names ---------------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return self.family.layer.format(i=i)

    def _attn_roles(self) -> list[str]:
        a = self.family.attention
        skip = set(a.no_q_lora_roles if self.q_lora else a.q_lora_roles)
        return [r for r in a.modules if r not in skip]

    def attn_bias(self, role: str) -> bool:
        a = self.family.attention
        if role not in a.bias_roles:
            return False
        return True if a.bias_key is None else bool(_cfg(self.config, a.bias_key, False))

    def attention(self, i: int) -> dict[str, str]:
        """role -> module prefix of layer i's attention projections."""
        p = self.layer_prefix(i)
        return {r: f"{p}.{self.family.attention.modules[r]}" for r in self._attn_roles()}

    def attention_norms(self, i: int) -> dict[str, str]:
        p = self.layer_prefix(i)
        a = self.family.attention
        skip = set(a.no_q_lora_roles if self.q_lora else a.q_lora_roles)
        return {r: f"{p}.{m}" for r, m in a.norms.items() if r not in skip}

    def layer_norms(self, i: int) -> dict[str, str]:
        p = self.layer_prefix(i)
        return {r: f"{p}.{m}" for r, m in self.family.layer_norms.items()}

    def is_moe(self, i: int) -> bool:
        m = self.family.moe
        if m is None:
            return False
        if int(_cfg(self.config, m.experts_key, 0) or 0) <= 0:
            return False
        if m.first_dense_key and i < int(_cfg(self.config, m.first_dense_key, 0) or 0):
            return False
        if m.step_key and (i + 1) % int(_cfg(self.config, m.step_key, 1) or 1) != 0:
            return False
        if m.dense_list_key and i in (_cfg(self.config, m.dense_list_key, None) or []):
            return False
        return True

    @property
    def num_experts(self) -> int:
        m = self.family.moe
        return int(_cfg(self.config, m.experts_key, 0) or 0) if m else 0

    @property
    def experts_per_token(self) -> int:
        m = self.family.moe
        return int(_cfg(self.config, m.topk_key, 0) or 0) if m else 0

    def _mlp(self, root: str, spec: MlpSpec) -> dict[str, str]:
        return {r: f"{root}.{m}" for r, m in spec.modules.items()}

    def mlp(self, i: int) -> dict[str, str] | None:
        """Dense MLP of layer i (None for MoE layers)."""
        if self.is_moe(i) or self.family.mlp is None:
            return None
        return self._mlp(f"{self.layer_prefix(i)}.{self.family.mlp_root}", self.family.mlp)

    def moe_root(self, i: int) -> str:
        return f"{self.layer_prefix(i)}.{self.family.moe.disk_root}"

    def router(self, i: int) -> str:
        return f"{self.moe_root(i)}.{self.family.moe.router}"

    def expert(self, i: int, e: int) -> dict[str, str]:
        m = self.family.moe
        return self._mlp(f"{self.moe_root(i)}.{m.expert.format(e=e)}", m.expert_mlp)

    def shared_expert(self, i: int) -> dict[str, str] | None:
        m = self.family.moe
        if m is None or m.shared is None or not self.is_moe(i):
            return None
        if m.shared_ffn_keys and any(not _cfg(self.config, k) for k in m.shared_ffn_keys):
            return None
        return self._mlp(f"{self.moe_root(i)}.{m.shared}", MlpSpec())

    @property
    def shared_ffn(self) -> int:
        m = self.family.moe
        return math.prod(int(_cfg(self.config, k)) for k in m.shared_ffn_keys) if m and m.shared_ffn_keys else 0

    def linears(self, i: int, *, include_router: bool = False) -> list[Linear]:
        """Every linear module of layer i, attention first, in a fixed order."""
        out = [Linear(p, r, "attention", bias=self.attn_bias(r)) for r, p in self.attention(i).items()]
        mlp = self.mlp(i)
        if mlp is not None:
            bias = bool(_cfg(self.config, self.family.mlp.bias_key, False)) if self.family.mlp.bias_key else False
            out += [Linear(p, r, "dense_mlp", bias=bias) for r, p in mlp.items()]
        if self.is_moe(i):
            m = self.family.moe
            if include_router:
                out.append(Linear(self.router(i), "router", "router"))
                if m.shared_gate:
                    out.append(Linear(f"{self.moe_root(i)}.{m.shared_gate}", "shared_gate", "router"))
            for e in range(self.num_experts):
                out += [Linear(p, r, "routed_experts", expert=e) for r, p in self.expert(i, e).items()]
            shared = self.shared_expert(i)
            if shared:
                out += [Linear(p, r, "shared_experts") for r, p in shared.items()]
        return out

    def layer_tensors(self, i: int) -> list[str]:
        """Every tensor name layer i is expected to hold on disk."""
        names = []
        for lin in self.linears(i, include_router=True):
            names.append(lin.prefix + ".weight")
            if lin.bias:
                names.append(lin.prefix + ".bias")
        names += [p + ".weight" for p in self.attention_norms(i).values()]
        names += [p + ".weight" for p in self.layer_norms(i).values()]
        if self.is_moe(i):
            names += [f"{self.moe_root(i)}.{x}" for x in self.family.moe.router_extra]
        return names

    def global_tensors(self) -> list[str]:
        names = [self.family.embed, self.family.final_norm]
        if not self.tied:
            names.append(self.family.lm_head)
        return names

    def expected_tensors(self) -> list[str]:
        names = list(self.global_tensors())
        for i in range(self.num_layers):
            names += self.layer_tensors(i)
        return names

    # ---- classification -------------------------------------------------------------------
    def layer_of(self, name: str) -> int | None:
        m = self._layer_re.match(name)
        return int(m.group(1)) if m else None

    @cached_property
    def _rel_groups(self) -> list[tuple[re.Pattern, str]]:
        f = self.family
        rules: list[tuple[str, str]] = []
        for m in list(f.attention.modules.values()) + list(f.attention.norms.values()):
            rules.append((re.escape(m) + r"\.", "attention"))
        for m in f.layer_norms.values():
            rules.append((re.escape(m) + r"\.", "norm"))
        if f.moe:
            root = re.escape(f.moe.disk_root)
            rules.append((root + r"\." + re.escape(f.moe.expert).replace(r"\{e\}", r"\d+") + r"\.", "routed_experts"))
            rules.append((root + r"\." + re.escape(f.moe.router) + r"\.", "router"))
            for x in f.moe.router_extra:
                rules.append((root + r"\." + re.escape(x) + "$", "router"))
            if f.moe.shared_gate:
                rules.append((root + r"\." + re.escape(f.moe.shared_gate) + r"\.", "router"))
            if f.moe.shared:
                rules.append((root + r"\." + re.escape(f.moe.shared) + r"\.", "shared_experts"))
        if f.mlp is not None or f.moe is not None:
            rules.append((re.escape(f.mlp_root) + r"\.", "dense_mlp"))
        return [(re.compile("^" + pat), g) for pat, g in rules]

    def classify(self, name: str) -> str:
        """The tensor group a name belongs to (one of GROUPS); fp8 scales follow their weight."""
        base = name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else name
        f = self.family
        if base == f.embed:
            return "embed"
        if base == f.lm_head:
            return "lm_head"
        if base == f.final_norm:
            return "final_norm"
        m = self._layer_re.match(base)
        if not m:
            return "other"
        if int(m.group(1)) >= self.num_layers:
            return "mtp"
        rel = m.group(2)
        for pat, group in self._rel_groups:
            if pat.match(rel):
                return group
        return "other"

    # ---- module tree <-> disk names ------------------------------------------------------------
    @property
    def layers_path(self) -> str:
        """Module path of the decoder-layer list, e.g. "model.layers"."""
        return self.family.layer.split(".{i}")[0]

    def module_path(self, disk_tensor: str) -> str:
        """Module path (no parameter suffix) of a global tensor such as the embedding."""
        return disk_tensor.rsplit(".", 1)[0]

    def to_disk(self, i: int, rel: str) -> str:
        """Disk name of a parameter/buffer of layer i given its path relative to the layer module.

        Differs from the module path only where the family stores a block under another name on
        disk (Mixtral's `block_sparse_moe` is `mlp` in transformers 5).
        """
        m = self.family.moe
        if m is not None and m.module_root != m.disk_root and self.is_moe(i) and rel.startswith(m.module_root + "."):
            rel = m.disk_root + rel[len(m.module_root) :]
        return f"{self.layer_prefix(i)}.{rel}"

    def module_to_disk(self, path: str) -> str:
        """Disk name for any module/parameter path of the transformers model."""
        lp = self.layers_path + "."
        if path.startswith(lp):
            idx, _, rel = path[len(lp) :].partition(".")
            if idx.isdigit() and rel:
                return self.to_disk(int(idx), rel)
        return path

    # ---- accounting ----------------------------------------------------------------------
    def kv_cache_values_per_token(self) -> int:
        """Cached values per token over all layers (K and V for GQA; latent + rope key for MLA)."""
        if self.is_mla:
            return self.num_layers * (
                int(_cfg(self.config, "kv_lora_rank")) + int(_cfg(self.config, "qk_rope_head_dim"))
            )
        return self.num_layers * 2 * self.kv_heads * self.head_dim


def check_supported(family: Family, config: Any) -> str | None:
    """None when the config can be handled, else the reason (naming the key)."""
    keys = [family.sizes.hidden, family.sizes.heads, family.sizes.layers, family.sizes.vocab, *family.required_keys]
    if family.mlp is not None or (family.moe and family.moe.ffn_key == family.sizes.ffn):
        keys.append(family.sizes.ffn)
    if family.moe:
        keys += [family.moe.experts_key, family.moe.ffn_key]
    for k in keys:
        if _cfg(config, k) is None:
            return f"config key {k!r} is missing or null, but the {family.name} family needs it"
    for k in [*keys, family.sizes.kv_heads, family.sizes.head_dim]:
        v = _cfg(config, k)
        if (
            v is not None
            and k not in family.required_keys
            and (isinstance(v, bool) or not isinstance(v, int) or v <= 0)
        ):
            return f"config key {k!r} is {v!r}; it must be a positive integer"
    hd = _cfg(config, family.sizes.head_dim)
    heads, kv = (
        _cfg(config, family.sizes.heads),
        _cfg(config, family.sizes.kv_heads) or _cfg(config, family.sizes.heads),
    )
    if not hd and _cfg(config, family.sizes.hidden) % heads:
        return (
            f"hidden_size {_cfg(config, family.sizes.hidden)} is not divisible by num_attention_heads {heads} and "
            "head_dim is not set"
        )
    if family.attention.kind == "gqa" and heads % kv:
        return f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
    return None
