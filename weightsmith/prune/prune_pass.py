"""`weightsmith prune SRC DST`: structured width/depth pruning with activation importance.

Targets are explicit (--hidden, --ffn, --heads, --kv-heads, --layers / --drop-layers) or a budget
(--params 0.75 or --params 100M, spent along --axis width|depth). Importance is Minitron's
activation score (default), Wanda or weight magnitude; depth uses Block Influence or the measured
loss increase, optionally as one contiguous block. Heads are pruned GQA-consistently (the same
number of query heads in every KV group; --kv-heads removes whole groups); head_dim never changes.
The output is a stock config of the same family with uniform widths; kept indices go to the
manifest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from weightsmith.arch import arch_for
from weightsmith.calib.config import CalibConfig
from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.errors import UnsupportedError, UsageError
from weightsmith.passes import PassSpec, Plan, register
from weightsmith.prune import importance as imp
from weightsmith.prune.structure import Keep, LayerKeep, TensorRoles, pruned_config, renamed, slice_tensor


@dataclass(frozen=True)
class PruneConfig(CalibConfig):
    hidden: int | None = field(
        default=None, metadata={"min": 1, "help": "hidden size to keep (embedding channels, every layer)"}
    )
    ffn: int | None = field(default=None, metadata={"min": 1, "help": "MLP intermediate size to keep (dense layers)"})
    expert_ffn: int | None = field(default=None, metadata={"min": 1, "help": "MoE expert intermediate size to keep"})
    heads: int | None = field(
        default=None,
        metadata={
            "min": 1,
            "help": "query heads to keep (a multiple of the KV heads kept: the same count per KV group)",
        },
    )
    kv_heads: int | None = field(
        default=None,
        metadata={"min": 1, "help": "KV heads (groups) to keep: removes whole groups with their query heads"},
    )
    layers: int | None = field(
        default=None, metadata={"help": "decoder layers to keep (the least important are dropped)"}
    )
    drop_layers: tuple[int, ...] = field(default=(), metadata={"help": "drop exactly these layers (0-based; repeat)"})
    params: str | None = field(
        default=None, metadata={"help": "parameter budget: a fraction of the source (0.75) or a count (100M, 1.2B)"}
    )
    axis: Literal["width", "depth"] = field(
        default="width",
        metadata={"help": "how --params is spent: width (hidden and MLP scaled together) or depth (layers)"},
    )
    importance: Literal["activation", "wanda", "magnitude"] = field(
        default="activation",
        metadata={"help": "width importance: Minitron activations, Wanda |W|·‖X‖, or weight magnitude"},
    )
    depth_metric: Literal["bi", "loss"] = field(
        default="bi",
        metadata={
            "help": "layer importance: Block Influence (bounded memory) or calibration-loss increase (loads the model)"
        },
    )
    contiguous: bool = field(default=False, metadata={"help": "drop one contiguous block of layers"})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "calibration windows per forward batch"})
    calib_samples: int = field(default=64, metadata={"help": "calibration windows"})
    calib_length: int = field(default=256, metadata={"help": "tokens per calibration window"})

    def __post_init__(self):
        if (
            all(
                getattr(self, k) is None
                for k in ("hidden", "ffn", "expert_ffn", "heads", "kv_heads", "layers", "params")
            )
            and not self.drop_layers
        ):
            raise UsageError(
                "prune needs a target: give --params, --hidden, --ffn, --expert-ffn, --heads, --kv-heads, --layers "
                "or --drop-layers"
            )


@dataclass
class Targets:
    hidden: int
    heads_per_group: int
    kv_heads: int
    ffn: int | None
    expert_ffn: int | None
    shared_ffn: int | None
    layers: int
    drop: tuple[int, ...] = ()

    def as_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def parse_params(text: str, source_params: int) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMbB]?)\s*", text)
    if not m:
        raise UsageError(f"--params {text!r}: give a fraction like 0.75 or a count like 100M / 1.2B")
    v = float(m.group(1))
    unit = m.group(2).upper()
    n = int(v * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[unit]) if unit or v > 1 else int(v * source_params)
    if not 0 < n < source_params:
        raise UsageError(f"--params {text!r} = {n:,} parameters: must be between 0 and the source's {source_params:,}")
    return n


def count_params(config) -> int:
    """Parameters of a config (tied weights once), built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def embedding_params(config) -> int:
    """Parameters in the token embedding and LM head (once when tied): budgets count them, and the
    manifest reports the rest separately (they dominate small models: ~21 % of SmolLM2-135M)."""
    h, v = int(config.hidden_size), int(config.vocab_size)
    return v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)


def _source_widths(view) -> dict:
    cfg = view.config
    out = {
        "hidden": view.hidden,
        "q_heads": view.heads,
        "kv_heads": view.kv_heads,
        "layers": view.num_layers,
        "ffn": getattr(cfg, "intermediate_size", None),
    }
    if any(view.is_moe(i) for i in range(view.num_layers)):
        out["expert_ffn"] = getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size", None)
        out["shared_ffn"] = getattr(cfg, "shared_expert_intermediate_size", None)
    return out


def _nearest(valid: list[int], want: int) -> str:
    near = sorted(valid, key=lambda v: (abs(v - want), v))[:2]
    return " or ".join(map(str, sorted(near)))


def resolve_targets(cfg: PruneConfig, view, source_params: int) -> Targets:
    src = _source_widths(view)
    q_per_kv = src["q_heads"] // src["kv_heads"]
    kv = cfg.kv_heads if cfg.kv_heads is not None else src["kv_heads"]
    if not 1 <= kv <= src["kv_heads"]:
        raise UsageError(f"--kv-heads {kv}: must be in 1..{src['kv_heads']}")
    heads = cfg.heads if cfg.heads is not None else kv * q_per_kv
    valid_heads = [kv * k for k in range(1, q_per_kv + 1)]
    if heads not in valid_heads:
        raise UsageError(
            f"--heads {heads}: with {kv} KV heads the query heads must be a multiple of {kv} up to {kv * q_per_kv} "
            f"(same count per group); nearest valid: {_nearest(valid_heads, heads)}"
        )
    drop = tuple(sorted(set(cfg.drop_layers)))
    if drop and cfg.layers is not None:
        raise UsageError("give --layers or --drop-layers, not both")
    bad = [d for d in drop if not 0 <= d < src["layers"]]
    if bad:
        raise UsageError(f"--drop-layers {bad[0]}: layers are 0..{src['layers'] - 1}")
    layers = cfg.layers if cfg.layers is not None else src["layers"] - len(drop)
    if not 1 <= layers <= src["layers"]:
        raise UsageError(f"--layers {layers}: must be in 1..{src['layers']}")
    t = Targets(
        cfg.hidden or src["hidden"],
        heads // kv,
        kv,
        cfg.ffn or src["ffn"],
        cfg.expert_ffn or src.get("expert_ffn"),
        src.get("shared_ffn"),
        layers,
        drop,
    )
    for name, val in (("hidden", t.hidden), ("ffn", t.ffn), ("expert_ffn", t.expert_ffn)):
        if val is not None and src.get(name) and not 1 <= val <= src[name]:
            raise UsageError(f"--{name.replace('_', '-')} {val}: must be in 1..{src[name]} (the source's size)")
    if t.hidden != src["hidden"] and view.family.embedding_scaled_by_hidden:
        raise UnsupportedError(hidden_fixed_reason(view))
    if t.hidden % heads:
        valid = [h for h in range(heads, src["hidden"] + 1, heads)]
        raise UsageError(
            f"--hidden {t.hidden}: transformers requires hidden_size to be a multiple of the {heads} query heads kept; "
            f"nearest valid: {_nearest(valid, t.hidden)}"
        )
    if cfg.params is not None:
        if any(x is not None for x in (cfg.hidden, cfg.ffn, cfg.expert_ffn, cfg.layers)) or drop:
            raise UsageError(
                "--params chooses the sizes itself: drop the explicit --hidden/--ffn/--layers targets (or drop "
                "--params)"
            )
        t = _fit_budget(view, t, parse_params(cfg.params, source_params), cfg.axis, src)
    return t


def hidden_fixed_reason(view) -> str:
    return (
        f"--hidden: {view.family.name} multiplies its embeddings by sqrt(hidden_size), which transformers recomputes "
        "from the "
        "config, so a narrower hidden size would rescale the residual stream; prune heads, MLP width or layers instead"
    )


def _fit_budget(view, t: Targets, budget: int, axis: str, src: dict) -> Targets:
    heads = t.heads_per_group * t.kv_heads
    if axis == "depth":
        for n in range(src["layers"] - 1, 0, -1):
            cand = Targets(**{**t.__dict__, "layers": n})
            if count_params(_shape_config(view, cand)) <= budget:
                return cand
        raise UsageError(f"--params {budget:,}: not reachable by dropping layers alone; use --axis width")
    step_h = math.lcm(heads, 8)
    if src.get("ffn") and not src.get("expert_ffn"):
        # dense: for every valid hidden size, the widest MLP within the budget; keep the pair whose
        # two ratios are closest (hidden and MLP pruned together), the larger hidden on ties
        best = None
        hiddens = (
            [src["hidden"]]
            if view.family.embedding_scaled_by_hidden
            else range(src["hidden"] // step_h * step_h, 0, -step_h)
        )
        for hid in hiddens:
            ffn = ffn_for_budget(view, Targets(**{**t.__dict__, "hidden": hid}), budget, src["ffn"])
            if ffn is None:
                continue
            gap = abs(hid / src["hidden"] - ffn / src["ffn"])
            if best is None or gap < best[0] - 1e-12:
                best = (gap, Targets(**{**t.__dict__, "hidden": hid, "ffn": ffn}))
        if best is None:
            raise UsageError(f"--params {budget:,}: not reachable by width pruning")
        return best[1]
    for k in range(1000, 0, -1):  # MoE: hidden and every expert width scaled by one ratio
        r = k / 1000
        hid = max(step_h, int(src["hidden"] * r) // step_h * step_h)
        cand = Targets(
            **{
                **t.__dict__,
                "hidden": hid,
                "ffn": max(32, int(src["ffn"] * r) // 32 * 32) if src.get("ffn") else None,
                "expert_ffn": max(16, int(src["expert_ffn"] * r) // 16 * 16) if src.get("expert_ffn") else None,
                "shared_ffn": max(32, int(src["shared_ffn"] * r) // 32 * 32) if src.get("shared_ffn") else None,
            }
        )
        if count_params(_shape_config(view, cand)) <= budget:
            return cand
    raise UsageError(f"--params {budget:,}: not reachable by width pruning")


def ffn_for_budget(view, t: Targets, budget: int, src_ffn: int, multiple: int = 32) -> int | None:
    """The widest dense MLP (a multiple of `multiple`, at most the source's) that keeps the other
    sizes of `t` within `budget` parameters; None if even the narrowest does not fit. Parameters
    are affine in the MLP width, so two counts on the meta device solve it."""
    lo = min(multiple, src_ffn)
    p_lo = count_params(_shape_config(view, Targets(**{**t.__dict__, "ffn": lo})))
    if p_lo > budget:
        return None
    p_hi = count_params(_shape_config(view, Targets(**{**t.__dict__, "ffn": src_ffn})))
    if p_hi <= budget or src_ffn == lo:
        return src_ffn
    slope = (p_hi - p_lo) / (src_ffn - lo)
    ffn = lo + int((budget - p_lo) / slope)
    ffn = max(lo, ffn // multiple * multiple)
    while ffn > lo and count_params(_shape_config(view, Targets(**{**t.__dict__, "ffn": ffn}))) > budget:
        ffn -= multiple
    return ffn


def _prefix_keep(view, t: Targets) -> Keep:
    """A Keep with the target sizes and first indices: shapes only (plan / dry-run)."""
    q_per_kv = view.heads // view.kv_heads
    per = {}
    layers = [i for i in range(view.num_layers) if i not in t.drop][: t.layers] if t.drop else list(range(t.layers))
    for i in layers:
        groups = torch.arange(t.kv_heads)
        q = torch.cat([torch.arange(t.heads_per_group) + g * q_per_kv for g in groups.tolist()])
        lk = LayerKeep(q, groups, torch.arange(t.ffn) if t.ffn else None)
        if view.is_moe(i):
            lk.expert_ffn = {e: torch.arange(t.expert_ffn) for e in range(_n_experts(view))}
            lk.shared_ffn = torch.arange(t.shared_ffn) if t.shared_ffn else None
        per[i] = lk
    return Keep(torch.arange(t.hidden), layers, per, view.head_dim)


def _n_experts(view) -> int:
    c = view.config
    return int(
        getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or getattr(c, "n_routed_experts", 0)
    )


def _shape_config(view, t: Targets):
    return pruned_config(view.config, _prefix_keep(view, t), _widths(t))


def _widths(t: Targets) -> dict:
    return {
        k: v for k, v in (("ffn", t.ffn), ("expert_ffn", t.expert_ffn), ("shared_ffn", t.shared_ffn)) if v is not None
    }


def output_specs(ck, view, roles: TensorRoles, keep: Keep) -> list[TensorSpec]:
    new_index = {old: new for new, old in enumerate(keep.layers)}
    specs = []
    for info in ck.infos():
        i, e, axes = roles.axes(info.name)
        if i is not None and i not in new_index:
            continue
        meta = torch.empty(info.shape, dtype=info.dtype, device="meta")
        shape = tuple(slice_tensor(meta, axes, keep, i, e).shape)
        specs.append(TensorSpec(renamed(view, info.name, new_index), shape, info.dtype))
    return specs


def _check_moe_pattern(view, keep: Keep, out_cfg) -> None:
    out_view = arch_for(out_cfg)
    for new, old in enumerate(keep.layers):
        if out_view.is_moe(new) != view.is_moe(old):
            raise UsageError(
                f"dropping these layers changes which layers are MoE (layer {old} -> {new}); "
                f"{view.config.model_type}'s config cannot express that: choose other layers or prune width only"
            )


def plan(cfg: PruneConfig, ctx) -> Plan:
    ck = ctx.source
    view = arch_for(ck.config)
    roles = TensorRoles(view)
    src_params = count_params(ck.config)
    t = resolve_targets(cfg, view, src_params)
    keep = _prefix_keep(view, t)
    out_cfg = pruned_config(ck.config, keep, _widths(t))
    _check_moe_pattern(view, keep, out_cfg)
    out_params = count_params(out_cfg)
    summary = {
        "targets": t.as_json(),
        "params_before": src_params,
        "params_after": out_params,
        "fraction": out_params / src_params,
        "non_embedding_params_before": src_params - embedding_params(ck.config),
        "non_embedding_params_after": out_params - embedding_params(out_cfg),
        "importance": cfg.importance,
    }
    return Plan(
        tensors=output_specs(ck, view, roles, keep), config=out_cfg, summary=summary, state=t
    )  # state: the Targets


def decide_keep(view, scores, t: Targets, *, depth_scores: torch.Tensor | None, contiguous: bool) -> Keep:
    """Turn scores and target sizes into the kept index sets (pure given the scores)."""
    hidden = imp.keep_top(scores.hidden, t.hidden)
    if t.drop:
        layers = [i for i in range(view.num_layers) if i not in t.drop]
    elif t.layers < view.num_layers:
        n_drop = view.num_layers - t.layers
        if depth_scores is None:
            raise UsageError("depth pruning needs layer scores (activation importance or --depth-metric loss)")
        if contiguous:
            dropped = set(imp.contiguous_block(depth_scores, n_drop))
        else:
            dropped = set(sorted(range(view.num_layers), key=lambda i: (float(depth_scores[i]), i))[:n_drop])
        layers = [i for i in range(view.num_layers) if i not in dropped]
    else:
        layers = list(range(view.num_layers))
    per = {}
    for i in layers:
        ls = scores.layers[i]
        groups = None
        if t.kv_heads < view.kv_heads:
            groups = imp.keep_top(imp.group_scores(ls.heads, view.kv_heads), t.kv_heads)
        g, q = imp.keep_heads_per_group(ls.heads, view.kv_heads, t.heads_per_group, groups)
        lk = LayerKeep(q, g, imp.keep_top(ls.ffn, t.ffn) if ls.ffn is not None and t.ffn else None)
        if ls.expert_ffn:
            lk.expert_ffn = {e: imp.keep_top(s, t.expert_ffn) for e, s in ls.expert_ffn.items()}
        if ls.shared_ffn is not None and t.shared_ffn:
            lk.shared_ffn = imp.keep_top(ls.shared_ffn, t.shared_ffn)
        per[i] = lk
    return Keep(hidden, layers, per, view.head_dim)


def compute_scores(cfg, ctx, view, t: Targets):
    from weightsmith.prune import scores as sc

    need_depth = t.layers < view.num_layers and not t.drop
    if cfg.importance == "magnitude":
        s = sc.magnitude_scores(ctx.source, view)
        if need_depth and cfg.depth_metric == "bi":
            s.block_influence = sc.activation_scores(ctx, cfg, view).block_influence
    else:
        s = sc.activation_scores(ctx, cfg, view, cfg.importance)
    depth = None
    if need_depth:
        depth = sc.loss_depth_scores(ctx, cfg, view) if cfg.depth_metric == "loss" else s.block_influence
    return s, depth


def run(cfg: PruneConfig, ctx, plan: Plan) -> None:
    ck = ctx.source
    view = arch_for(ck.config)
    roles = TensorRoles(view)
    t: Targets = plan.state
    scores, depth = compute_scores(cfg, ctx, view, t)
    keep = decide_keep(view, scores, t, depth_scores=depth, contiguous=cfg.contiguous)
    write_pruned(ctx, ck, view, roles, keep)
    ctx.metrics.update(
        {
            **plan.summary,
            "kept": keep.as_json(),
            "layer_scores": {"metric": cfg.depth_metric, "values": [round(float(x), 6) for x in depth]}
            if depth is not None
            else None,
        }
    )


def write_pruned(ctx, ck, view, roles: TensorRoles, keep: Keep) -> None:
    new_index = {old: new for new, old in enumerate(keep.layers)}
    for name in ctx.report.track(ck.file_order(), desc="slicing"):
        i, e, axes = roles.axes(name)
        if i is not None and i not in new_index:
            continue
        ctx.writer.write(renamed(view, name, new_index), slice_tensor(ck.get(name), axes, keep, i, e))


register(
    PassSpec(
        name="prune",
        config_cls=PruneConfig,
        plan=plan,
        run=run,
        help=(
            "structured width/depth pruning (Minitron activation importance, GQA-consistent heads) into a stock config"
        ),
        reference_url="https://arxiv.org/abs/2407.14679",
        relation="finetune",
        tags=("pruned",),
    )
)
