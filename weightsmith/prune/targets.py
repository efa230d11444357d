"""Budgets, target sizes and kept index sets, shared by `prune` and `minitron`.

`Targets` are the sizes to keep (hidden, heads per KV group, KV heads, MLP / expert widths,
layers); `source_widths` reads them from a model; `fit_budget` / `ffn_for_budget` solve sizes for a
parameter budget (counted on the meta device); `prefix_keep` gives a shape-only `Keep` (plans and
dry runs) and `decide_keep` turns importance scores into the kept index sets.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from weightsmith.errors import UsageError
from weightsmith.prune import importance as imp
from weightsmith.prune.structure import Keep, LayerKeep, pruned_config


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


def source_widths(view) -> dict:
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


def fit_budget(view, t: Targets, budget: int, axis: str, src: dict) -> Targets:
    heads = t.heads_per_group * t.kv_heads
    if axis == "depth":
        for n in range(src["layers"] - 1, 0, -1):
            cand = Targets(**{**t.__dict__, "layers": n})
            if count_params(shape_config(view, cand)) <= budget:
                return cand
        raise UsageError(f"--params {budget:,}: not reachable by dropping layers alone; use --axis width")
    if axis == "mlp":
        if not src.get("ffn") or src.get("expert_ffn"):
            raise UsageError("--axis mlp prunes dense MLP neurons only; MoE models: use --axis width or --expert-ffn")
        ffn = ffn_for_budget(view, t, budget, src["ffn"])
        if ffn is None:
            raise UsageError(f"--params {budget:,}: not reachable by pruning MLP neurons alone; use --axis width")
        return Targets(**{**t.__dict__, "ffn": ffn})
    step_h = math.lcm(heads, 8)
    if src.get("ffn") and not src.get("expert_ffn"):
        # dense: for every valid hidden size, the widest MLP within the budget; keep the pair whose
        # two ratios are closest (hidden and MLP pruned together), the larger hidden on ties
        best = None
        hiddens = (
            [src["hidden"]]  # embeddings scaled by sqrt(hidden_size): the hidden size stays
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
        if count_params(shape_config(view, cand)) <= budget:
            return cand
    raise UsageError(f"--params {budget:,}: not reachable by width pruning")


def ffn_for_budget(view, t: Targets, budget: int, src_ffn: int, multiple: int = 32) -> int | None:
    """The widest dense MLP (a multiple of `multiple`, at most the source's) that keeps the other
    sizes of `t` within `budget` parameters; None if even the narrowest does not fit. Parameters
    are affine in the MLP width, so two counts on the meta device solve it."""
    lo = min(multiple, src_ffn)
    p_lo = count_params(shape_config(view, Targets(**{**t.__dict__, "ffn": lo})))
    if p_lo > budget:
        return None
    p_hi = count_params(shape_config(view, Targets(**{**t.__dict__, "ffn": src_ffn})))
    if p_hi <= budget or src_ffn == lo:
        return src_ffn
    slope = (p_hi - p_lo) / (src_ffn - lo)
    ffn = lo + int((budget - p_lo) / slope)
    ffn = max(lo, ffn // multiple * multiple)
    while ffn > lo and count_params(shape_config(view, Targets(**{**t.__dict__, "ffn": ffn}))) > budget:
        ffn -= multiple
    return ffn


def prefix_keep(view, t: Targets) -> Keep:
    """A Keep with the target sizes and first indices: shapes only (plan / dry-run)."""
    q_per_kv = view.heads // view.kv_heads
    per = {}
    layers = [i for i in range(view.num_layers) if i not in t.drop][: t.layers] if t.drop else list(range(t.layers))
    for i in layers:
        groups = torch.arange(t.kv_heads)
        q = torch.cat([torch.arange(t.heads_per_group) + g * q_per_kv for g in groups.tolist()])
        lk = LayerKeep(q, groups, torch.arange(t.ffn) if t.ffn else None)
        if view.is_moe(i):
            lk.expert_ffn = {e: torch.arange(t.expert_ffn) for e in range(n_experts(view))}
            lk.shared_ffn = torch.arange(t.shared_ffn) if t.shared_ffn else None
        per[i] = lk
    return Keep(torch.arange(t.hidden), layers, per, view.head_dim)


def n_experts(view) -> int:
    c = view.config
    return int(
        getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or getattr(c, "n_routed_experts", 0)
    )


def shape_config(view, t: Targets):
    return pruned_config(view.config, prefix_keep(view, t), widths(t))


def widths(t: Targets) -> dict:
    return {
        k: v for k, v in (("ffn", t.ffn), ("expert_ffn", t.expert_ffn), ("shared_ffn", t.shared_ffn)) if v is not None
    }


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
