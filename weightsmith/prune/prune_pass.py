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

from dataclasses import dataclass, field
from typing import Literal

import torch

from weightsmith.arch import arch_for
from weightsmith.calib.config import CalibConfig
from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.errors import UnsupportedError, UsageError
from weightsmith.passes import PassSpec, Plan, register
from weightsmith.prune.structure import Keep, TensorRoles, pruned_config, renamed, slice_tensor
from weightsmith.prune.targets import (
    Targets,
    count_params,
    decide_keep,
    embedding_params,
    fit_budget,
    parse_params,
    prefix_keep,
    source_widths,
    widths,
)


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
    axis: Literal["width", "depth", "mlp"] = field(
        default="width",
        metadata={
            "help": "how --params is spent: width (hidden and MLP scaled together), "
            "depth (layers) or mlp (MLP neurons only: hidden, heads and layers kept)"
        },
    )
    importance: Literal["activation", "wanda", "magnitude"] = field(
        default="activation",
        metadata={"help": "width importance: Minitron activations, Wanda |W|·‖X‖, or weight magnitude"},
    )
    depth_metric: Literal["bi", "loss", "greedy"] = field(
        default="bi",
        metadata={
            "help": "which layers to drop: lowest Block Influence (bounded memory), lowest calibration-loss increase "
            "when removed alone (loss), or a global greedy search that removes one layer at a time, each the one "
            "whose removal with those already removed moves the output least from the source's (KL on calibration "
            "windows; greedy); loss and greedy load the model"
        },
    )
    depth_windows: int | None = field(
        default=None,
        metadata={
            "min": 1,
            "help": "calibration windows the loss / greedy layer metrics evaluate (the first N; default: all for "
            "loss, 8 for greedy, whose search costs about layers x dropped forwards of them)",
        },
    )
    contiguous: bool = field(default=False, metadata={"help": "drop one contiguous block of layers"})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "calibration windows per forward batch"})
    calib_samples: int = field(default=64, metadata={"help": "calibration windows"})
    calib_length: int = field(default=256, metadata={"help": "tokens per calibration window"})
    refit: Literal["layer", "block", "source", "none"] = field(
        default="layer",
        metadata={
            "help": "repair o_proj / down_proj after heads / MLP neurons go, by least squares on calibration "
            "activations: to the source model's outputs (source), to the layer's own outputs on the pruned model's "
            "inputs (layer), so that the whole layer's output matches the source's (block: down_proj also absorbs the "
            "drift of the residual stream; cross-validated), or plain slicing (none)"
        },
    )

    select: Literal["importance", "obs", "saliency"] = field(
        default="importance",
        metadata={
            "help": "with a repair: keep the MLP neurons / query heads chosen by --importance, or re-choose them per "
            "layer by greedy structured OBS (the channels whose removal the least-squares repair absorbs best), or "
            "re-choose MLP neurons by one-shot OBS saliency on the pruned model's inputs (saliency)"
        },
    )

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


def _nearest(valid: list[int], want: int) -> str:
    near = sorted(valid, key=lambda v: (abs(v - want), v))[:2]
    return " or ".join(map(str, sorted(near)))


def resolve_targets(cfg: PruneConfig, view, source_params: int) -> Targets:
    src = source_widths(view)
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
        t = fit_budget(view, t, parse_params(cfg.params, source_params), cfg.axis, src)
    return t


def hidden_fixed_reason(view) -> str:
    return (
        f"--hidden: {view.family.name} multiplies its embeddings by sqrt(hidden_size), which transformers recomputes "
        "from the "
        "config, so a narrower hidden size would rescale the residual stream; prune heads, MLP width or layers instead"
    )


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
    keep = prefix_keep(view, t)
    out_cfg = pruned_config(ck.config, keep, widths(t))
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
        if cfg.depth_metric == "loss":
            depth = sc.loss_depth_scores(ctx, cfg, view)
        elif cfg.depth_metric == "greedy":
            depth = sc.greedy_depth_scores(ctx, cfg, view, view.num_layers - t.layers)
        else:
            depth = s.block_influence
    return s, depth


def run(cfg: PruneConfig, ctx, plan: Plan) -> None:
    ck = ctx.source
    view = arch_for(ck.config)
    roles = TensorRoles(view)
    t: Targets = plan.state
    scores, depth = compute_scores(cfg, ctx, view, t)
    keep = decide_keep(view, scores, t, depth_scores=depth, contiguous=cfg.contiguous)
    fitted, errors = {}, {}
    if cfg.refit != "none":
        from weightsmith.prune.reconstruct import reconstruct

        fitted, errors = reconstruct(ctx, cfg, view, keep, target=cfg.refit, select=cfg.select)
    write_pruned(ctx.writer, ck, view, roles, keep, fitted, ctx.report, mine=ctx.mine)
    ctx.metrics.update(
        {
            **plan.summary,
            "kept": keep.as_json(),
            "refit": cfg.refit,
            "refit_errors": _error_summary(errors),
            "layer_scores": {"metric": cfg.depth_metric, "values": [round(float(x), 6) for x in depth]}
            if depth is not None
            else None,
        }
    )


def _error_summary(errors: dict[str, dict]) -> dict | None:
    """Mean relative output error of the repaired projections (share of ‖W x‖² lost), sliced vs refitted."""
    if not errors:
        return None
    n = len(errors)
    return {
        "projections": n,
        "sliced": sum(e["sliced"] for e in errors.values()) / n,
        "refit": sum(e["refit"] for e in errors.values()) / n,
        "unrepaired": sum(e.get("damp", 0) is None for e in errors.values()),
        "ridge": {
            str(d): sum(e.get("damp", 0) == d for e in errors.values())
            for d in {e.get("damp") for e in errors.values()}
        },
    }


def write_pruned(
    writer,
    ck,
    view,
    roles: TensorRoles,
    keep: Keep,
    fitted: dict[str, torch.Tensor] | None = None,
    report=None,
    mine=None,
) -> None:
    """Slice every tensor to the kept sets; `fitted` holds repaired consumers whose input axis is
    already the kept one (the other axes are sliced here). With `mine` (ctx.mine: every rank holds
    the same kept sets and repairs) each rank reads and writes only its share of the tensors, by bytes."""
    new_index = {old: new for new, old in enumerate(keep.layers)}
    fitted = fitted or {}
    names = ck.file_order()
    if mine is not None:
        names = [names[j] for j in mine([ck.info(n).nbytes for n in names])]
    for name in report.track(names, desc="slicing") if report is not None else names:
        i, e, axes = roles.axes(name)
        if i is not None and i not in new_index:
            continue
        if name in fitted:
            t = slice_tensor(fitted[name], (axes[0], None), keep, i, e).to(ck.info(name).dtype)
        else:
            t = slice_tensor(ck.get(name), axes, keep, i, e)
        writer.write(renamed(view, name, new_index), t)


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
