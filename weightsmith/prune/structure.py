"""What to keep, and how every tensor of a family is sliced to keep it.

`Keep` holds index sets (hidden channels, layers, and per kept layer: query heads, KV groups, MLP
neurons, expert / shared-expert neurons). `TensorRole` tells, from the architecture tables, which
axis of a tensor is indexed by which set; `slice_tensor` applies it. `pruned_config` writes the
stock config of the same family with the new widths and an explicit head_dim.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from weightsmith.errors import UnsupportedError, UsageError

# axis kinds: which index set selects along an axis (None: keep the axis whole)
HIDDEN, QROWS, KVROWS, FFN, EXPERT_FFN, SHARED_FFN = "hidden", "q_rows", "kv_rows", "ffn", "expert_ffn", "shared_ffn"

# (role, tensor group) -> axis kinds of the weight [out, in]; biases follow the out axis.
LINEAR_AXES: dict[tuple[str, str], tuple[str | None, str | None]] = {
    ("q", "attention"): (QROWS, HIDDEN),
    ("k", "attention"): (KVROWS, HIDDEN),
    ("v", "attention"): (KVROWS, HIDDEN),
    ("o", "attention"): (HIDDEN, QROWS),
    ("gate", "dense_mlp"): (FFN, HIDDEN),
    ("up", "dense_mlp"): (FFN, HIDDEN),
    ("down", "dense_mlp"): (HIDDEN, FFN),
    ("gate", "routed_experts"): (EXPERT_FFN, HIDDEN),
    ("up", "routed_experts"): (EXPERT_FFN, HIDDEN),
    ("down", "routed_experts"): (HIDDEN, EXPERT_FFN),
    ("gate", "shared_experts"): (SHARED_FFN, HIDDEN),
    ("up", "shared_experts"): (SHARED_FFN, HIDDEN),
    ("down", "shared_experts"): (HIDDEN, SHARED_FFN),
}
# config keys per width, by what they count (architecture knowledge as data)
WIDTH_KEYS = {
    "ffn": ("intermediate_size",),
    "expert_ffn": ("moe_intermediate_size",),
    "shared_ffn": ("shared_expert_intermediate_size",),
}
# families whose experts' width lives under another key (Mixtral has no dense MLP)
FAMILY_WIDTH_KEYS = {"mixtral": {"expert_ffn": ("intermediate_size",), "ffn": ()}}
PER_LAYER_LISTS = ("layer_types",)  # per-layer config lists sliced with the layers kept


@dataclass
class LayerKeep:
    q_heads: torch.Tensor  # kept query heads (ascending)
    kv_groups: torch.Tensor  # kept KV heads
    ffn: torch.Tensor | None = None  # dense MLP neurons
    expert_ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    shared_ffn: torch.Tensor | None = None


@dataclass
class Keep:
    hidden: torch.Tensor
    layers: list[int]  # original indices, in order
    per_layer: dict[int, LayerKeep]
    head_dim: int

    def index(self, kind: str, layer: int | None, expert: int | None) -> torch.Tensor | None:
        if kind == HIDDEN:
            return self.hidden
        lk = self.per_layer[layer]
        if kind == QROWS:
            return _rows(lk.q_heads, self.head_dim)
        if kind == KVROWS:
            return _rows(lk.kv_groups, self.head_dim)
        if kind == FFN:
            return lk.ffn
        if kind == EXPERT_FFN:
            return lk.expert_ffn.get(expert)
        if kind == SHARED_FFN:
            return lk.shared_ffn
        raise KeyError(kind)

    def as_json(self) -> dict:
        """The kept-index maps for the manifest (original indices)."""
        out = {
            "hidden": self.hidden.tolist() if self.hidden is not None else None,
            "layers": self.layers,
            "per_layer": {},
        }
        for i in self.layers:
            lk = self.per_layer[i]
            d = {"q_heads": lk.q_heads.tolist(), "kv_heads": lk.kv_groups.tolist()}
            if lk.ffn is not None:
                d["ffn"] = lk.ffn.tolist()
            if lk.expert_ffn:
                d["expert_ffn"] = {str(e): v.tolist() for e, v in lk.expert_ffn.items()}
            if lk.shared_ffn is not None:
                d["shared_ffn"] = lk.shared_ffn.tolist()
            out["per_layer"][str(i)] = d
        return out


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


class TensorRoles:
    """Name -> (layer, expert, axis kinds) for every tensor of a checkpoint, from the ArchView."""

    def __init__(self, view):
        self.view = view
        f = view.family
        self.table: dict[str, tuple[int | None, int | None, tuple]] = {
            f.embed: (None, None, (None, HIDDEN)),
            f.lm_head: (None, None, (None, HIDDEN)),
            f.final_norm: (None, None, (HIDDEN,)),
        }
        for i in range(view.num_layers):
            for lin in view.linears(i):
                group = view.classify(lin.prefix + ".weight")
                axes = LINEAR_AXES.get((lin.role, group))
                if axes is None:
                    raise UnsupportedError(
                        f"{lin.prefix}: pruning does not know the {lin.role!r} projection of a {group} block "
                        f"(model_type {view.config.model_type}); supported: standard attention and (MoE) MLPs"
                    )
                self.table[lin.prefix + ".weight"] = (i, lin.expert, axes)
                self.table[lin.prefix + ".bias"] = (i, lin.expert, (axes[0],))
            for norm in view.layer_norms(i).values():
                self.table[norm + ".weight"] = (i, None, (HIDDEN,))
                self.table[norm + ".bias"] = (i, None, (HIDDEN,))

    def axes(self, name: str) -> tuple[int | None, int | None, tuple]:
        hit = self.table.get(name)
        if hit is not None:
            return hit
        base = name.rsplit(".", 1)[0]
        i = self.view.layer_of(name)
        group = self.view.classify(name)
        if group == "router":  # router weight [experts, hidden], its biases per expert
            return (
                (i, None, (None, HIDDEN))
                if name.endswith(".weight") and not name.endswith("bias")
                else (i, None, (None,))
            )
        if group == "attention" and base.endswith(("q_norm", "k_norm")):
            return (i, None, (None,))  # over head_dim, which pruning never changes
        raise UnsupportedError(
            f"{name}: pruning does not know how this tensor's axes map to heads/neurons/channels (group {group})"
        )


def slice_tensor(t: torch.Tensor, axes: tuple, keep: Keep, layer: int | None, expert: int | None) -> torch.Tensor:
    """Index every axis named in `axes` (a router's 1-D tensors have a single None axis)."""
    out = t
    for dim, kind in enumerate(axes[: t.dim()]):
        if kind is None:
            continue
        idx = keep.index(kind, layer, expert)
        if idx is not None:
            out = out.index_select(dim, idx)
    return out.contiguous()


def renamed(view, name: str, new_index: dict[int, int]) -> str:
    i = view.layer_of(name)
    if i is None:
        return name
    old, new = view.layer_prefix(i), view.layer_prefix(new_index[i])
    return new + name[len(old) :]


def pruned_config(config, keep: Keep, widths: dict[str, int]):
    """Stock config of the same family with the kept sizes; transformers validates it."""
    cfg = copy.deepcopy(config)
    first = keep.per_layer[keep.layers[0]]
    n_layers = config.num_hidden_layers
    cfg.hidden_size = int(keep.hidden.numel())
    cfg.num_attention_heads = int(first.q_heads.numel())
    cfg.num_key_value_heads = int(first.kv_groups.numel())
    cfg.head_dim = keep.head_dim
    cfg.num_hidden_layers = len(keep.layers)
    for kind, keys in {**WIDTH_KEYS, **FAMILY_WIDTH_KEYS.get(config.model_type, {})}.items():
        if kind in widths:
            for k in keys:
                if getattr(cfg, k, None) is not None:
                    setattr(cfg, k, int(widths[kind]))
    for key in PER_LAYER_LISTS:
        v = getattr(cfg, key, None)
        if isinstance(v, list) and len(v) == n_layers:
            setattr(cfg, key, [v[i] for i in keep.layers])
    for key in ("mlp_only_layers",):
        v = getattr(cfg, key, None)
        if isinstance(v, list):
            setattr(cfg, key, [keep.layers.index(i) for i in v if i in keep.layers])
    try:
        cfg = type(cfg)(**cfg.to_dict())
    except (ValueError, TypeError) as e:
        raise UsageError(f"the pruned sizes do not form a valid {config.model_type} config: {e}") from None
    return cfg
