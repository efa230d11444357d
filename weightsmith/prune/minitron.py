"""`weightsmith minitron SRC DST --params N`: Minitron architecture search under a budget.

Importance is collected once (activations and Block Influence, layer by layer). Candidates are
the (hidden, query heads per KV group, layers, MLP width) combinations within --max-width-pruning
and --max-depth-pruning whose parameter count is within 5% below the budget (the MLP width is
solved for each; hidden sizes respect hidden % heads == 0). Each candidate is pruned with the
same importance ranking, written to a scratch directory and scored on held-out calibration
windows by the KL divergence of its logits from the source's (cached once) or, with
--rank-by loss, by its own next-token loss; the top-k may be distilled briefly and re-scored; the
best is written. The ranked table of candidates goes to the log and to the manifest.
"""

from __future__ import annotations

import gc
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from weightsmith.arch import arch_for
from weightsmith.calib.config import CalibConfig
from weightsmith.errors import UsageError
from weightsmith.passes import PassSpec, Plan, register
from weightsmith.prune.prune_pass import output_specs, write_pruned
from weightsmith.prune.structure import TensorRoles, pruned_config
from weightsmith.prune.targets import (
    Targets,
    count_params,
    decide_keep,
    ffn_for_budget,
    parse_params,
    prefix_keep,
    source_widths,
    widths,
)


@dataclass(frozen=True)
class MinitronConfig(CalibConfig):
    params: str = field(
        default="0.75", metadata={"help": "parameter budget: a fraction of the source (0.75) or a count (100M)"}
    )
    max_width_pruning: float = field(
        default=0.5,
        metadata={"min": 0, "below": 1, "help": "smallest hidden size considered, as 1 - fraction of the source's"},
    )
    max_depth_pruning: float = field(
        default=0.2, metadata={"min": 0, "below": 1, "help": "at most this fraction of the layers is dropped"}
    )
    candidates: int = field(
        default=8, metadata={"min": 1, "help": "candidates to prune and score (spread over the search space)"}
    )
    top_k: int = field(default=2, metadata={"min": 1, "help": "best candidates kept for the distillation round"})
    distill_tokens: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "distill each top-k candidate on this many tokens before choosing (0: choose by pruned KL)",
        },
    )
    score_windows: int = field(
        default=8, metadata={"min": 1, "help": "held-out calibration windows used to score candidates"}
    )
    rank_by: Literal["kl", "loss"] = field(
        default="kl",
        metadata={
            "help": "rank candidates by mean KL(source ‖ candidate) or by their own LM loss on the held-out windows"
        },
    )
    batch_size: int = field(default=8, metadata={"min": 1, "help": "calibration windows per forward batch"})
    calib_samples: int = field(default=64, metadata={"help": "calibration windows (importance and scoring)"})
    calib_length: int = field(default=256, metadata={"help": "tokens per calibration window"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate of the distillation round"})
    refit: Literal["layer", "source", "none"] = field(
        default="layer",
        metadata={
            "help": "least-squares repair of o_proj / down_proj, as in prune --refit: every candidate is repaired "
            "(on the windows not held out) before it is scored, and the chosen one is written as scored"
        },
    )
    select: Literal["importance", "obs"] = field(
        default="importance",
        metadata={"help": "with a repair: how MLP neurons / query heads are chosen, as in prune --select"},
    )
    depth_metric: Literal["bi", "greedy"] = field(
        default="bi",
        metadata={
            "help": "which layers a candidate with fewer layers drops: lowest Block Influence, or the prefix of one "
            "global greedy search on the calibration KL from the source (prune --depth-metric greedy; on the windows "
            "not held out)"
        },
    )
    depth_windows: int | None = field(
        default=None, metadata={"min": 1, "help": "calibration windows the greedy layer search evaluates (default 8)"}
    )
    score_batch: int = field(
        default=2,
        metadata={"help": "held-out windows per scoring forward (bounds the memory of vocabulary-sized logits)"},
    )


def enumerate_candidates(view, budget: int, cfg: MinitronConfig) -> list[Targets]:
    src = source_widths(view)
    if src.get("expert_ffn"):
        raise UsageError(
            "minitron search covers dense families; prune MoE models with `weightsmith prune --expert-ffn/--hidden`"
        )
    q_per_kv = src["q_heads"] // src["kv_heads"]
    L = src["layers"]
    layer_opts = sorted({L - d for d in range(0, int(L * cfg.max_depth_pruning) + 1)}, reverse=True)
    layer_opts = _spread(layer_opts, 4)
    out = []
    for hpg in range(q_per_kv, 0, -1):
        heads = hpg * src["kv_heads"]
        step = math.lcm(heads, 8)
        lo = int(src["hidden"] * (1 - cfg.max_width_pruning))
        hiddens = [h for h in range(src["hidden"] // step * step, lo - 1, -step) if h > 0]
        if view.family.embedding_scaled_by_hidden:  # hidden stays (see hidden_fixed_reason); search heads/MLP/layers
            hiddens = [src["hidden"]] if src["hidden"] % heads == 0 else []
        for hid in _spread(hiddens, 5):
            for layers in layer_opts:
                base = Targets(hid, hpg, src["kv_heads"], src["ffn"], None, None, layers)
                ffn = ffn_for_budget(view, base, budget, src["ffn"])
                if ffn is None or ffn < max(32, src["ffn"] // 4):
                    continue
                cand = Targets(**{**base.__dict__, "ffn": ffn})
                n = count_params(pruned_config(view.config, prefix_keep(view, cand), widths(cand)))
                if 0.95 * budget <= n <= budget:
                    out.append(cand)
    if not out:
        raise UsageError(
            f"no architecture within --max-width-pruning {cfg.max_width_pruning} / --max-depth-pruning "
            f"{cfg.max_depth_pruning} "
            f"reaches {budget:,} parameters; relax them or raise --params"
        )
    return _spread(out, cfg.candidates)


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    idx = sorted({round(k * (len(items) - 1) / (n - 1)) for k in range(n)}) if n > 1 else [0]
    return [items[i] for i in idx]


def _label(t: Targets) -> str:
    return f"hidden {t.hidden}, heads {t.heads_per_group * t.kv_heads}/{t.kv_heads}kv, ffn {t.ffn}, layers {t.layers}"


@dataclass(frozen=True)
class MinitronPlan:
    """The budget and the candidate architectures plan() enumerated, for run() to score."""

    budget: int
    candidates: list
    params_before: int


def plan(cfg: MinitronConfig, ctx) -> Plan:
    view = arch_for(ctx.source.config)
    src_params = count_params(ctx.source.config)
    budget = parse_params(cfg.params, src_params)
    cands = enumerate_candidates(view, budget, cfg)
    summary = {"budget": budget, "params_before": src_params, "candidates": [_label(c) for c in cands]}
    return Plan(tensors=None, config=None, summary=summary, state=MinitronPlan(budget, cands, src_params))


def _score(model, teacher, held: torch.Tensor, batch: int) -> dict:
    """Mean KL(source ‖ model) and the model's own next-token loss on the held-out windows, a few
    windows at a time (the teacher's logits are recomputed per chunk: caching them for every window
    cost ~0.4 GB on SmolLM2's 49k vocabulary, and each chunk's fp32 logits are what peaks)."""
    from weightsmith.prune.distill import kd_loss

    kl, nll, n = 0.0, 0.0, 0
    with torch.inference_mode():
        for k in range(0, held.shape[0], batch):
            ids = held[k : k + batch]
            t = teacher(input_ids=ids).logits if teacher is not model else None
            s = model(input_ids=ids).logits
            kl += float(kd_loss(s, t)) * ids.numel() if t is not None else 0.0
            del t
            nll += float(
                torch.nn.functional.cross_entropy(
                    s[:, :-1].reshape(-1, s.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
                )
            )
            n += ids.numel()
            del s
    return {"kl": kl / n, "loss": nll / (n - held.shape[0])}


def run(cfg: MinitronConfig, ctx, plan: Plan) -> None:
    """Under a launcher the importance statistics are collected on every rank's windows and
    reduced (as in prune); the source's score and the candidates are spread over the ranks by
    parameter count, each rank pruning and scoring its own on all held-out windows (so every
    score is the one-process number), and the scores are gathered so every rank ranks them the
    same way; a distillation round trains each top-k candidate on its owner alone."""
    from weightsmith import dist, loading
    from weightsmith.checkpoint.writer import CheckpointWriter
    from weightsmith.prune import scores as sc

    ck = ctx.source
    view = arch_for(ck.config)
    roles = TensorRoles(view)
    budget, cands, src_params = plan.state.budget, plan.state.candidates, plan.state.params_before
    scores = sc.activation_scores(ctx, cfg, view)
    calib = ctx.calibrate(cfg, default="self")
    held = calib.ids[-min(cfg.score_windows, calib.ids.shape[0]) :]
    fit = calib.ids[: -held.shape[0]] if calib.ids.shape[0] > held.shape[0] else calib.ids  # search, repair, train
    teacher = loading.load(ck.root).eval()
    depth = scores.block_influence
    n_drop = max(view.num_layers - t.layers for t in cands)
    if cfg.depth_metric == "greedy" and n_drop:
        depth = sc.greedy_depth_scores(ctx, cfg, view, n_drop, ids=fit, model=teacher)
    keeps = [decide_keep(view, scores, t, depth_scores=depth, contiguous=False) for t in cands]
    out_cfgs = [pruned_config(ck.config, keep, widths(t)) for keep, t in zip(keeps, cands)]
    # job 0 scores the source, job k+1 candidate k; a forward costs about its parameter count
    mine = ctx.mine([src_params] + [count_params(c) for c in out_cfgs])
    me = dist.world().rank
    found: dict[int, dict] = {}
    fitted_by_k: dict[int, dict] = {}
    src_score = None
    scratch = Path(tempfile.mkdtemp(prefix=".minitron-", dir=ctx.writer.tmp.parent))
    try:
        if 0 in mine:
            src_score = _score(teacher, teacher, held, cfg.score_batch)
        for k in ctx.report.track([j - 1 for j in mine if j > 0], desc="candidates"):
            t, keep, out_cfg = cands[k], keeps[k], out_cfgs[k]
            path = scratch / f"c{k}"
            fitted = {}
            if cfg.refit != "none":  # rank candidates as they will be written: repaired
                from weightsmith.prune.reconstruct import reconstruct

                with dist.solo():  # this candidate is this rank's alone: no collectives inside
                    fitted, _ = reconstruct(ctx, cfg, view, keep, target=cfg.refit, select=cfg.select, ids=fit)
            with CheckpointWriter(path) as w:
                w.plan(output_specs(ck, view, roles, keep))
                w.set_config(out_cfg)
                write_pruned(w, ck, view, roles, keep, fitted)
                w.copy_aux_files(ck.root, ck.aux_files())
                w.finalize()
            cand = loading.load(path).eval()
            sc_ = _score(cand, teacher, held, cfg.score_batch)
            del cand
            gc.collect()
            found[k] = {"candidate": _label(t), "params": count_params(out_cfg), **sc_, "owner": me, "index": k}
            fitted_by_k[k] = fitted
            # only the leaders' repaired weights are kept (~0.1 GB each on SmolLM2)
            for j in sorted(fitted_by_k, key=lambda j: found[j][cfg.rank_by])[cfg.top_k :]:
                fitted_by_k[j] = {}
            ctx.report.log(
                f"candidate {_label(t)}: {found[k]['params']:,} params, KL {sc_['kl']:.4f}, loss {sc_['loss']:.4f}"
            )
        for part_score, part in dist.gather_objects((src_score, found)):
            src_score = src_score or part_score
            found.update(part)
        rows = [
            {**found[k], "path": scratch / f"c{k}", "targets": cands[k], "keep": keeps[k]} for k in range(len(cands))
        ]
        key = cfg.rank_by
        rows.sort(key=lambda r: r[key])
        best = rows[0]
        if cfg.distill_tokens > 0:
            after: dict[str, float] = {}
            for r in rows[: cfg.top_k]:
                if r["owner"] != me:  # trained by the rank that pruned it, alone
                    continue
                model = _quick_distill(cfg, teacher, loading.load(r["path"], dtype=torch.float32), fit, ctx.device)
                after[r["candidate"]] = _score(model, teacher, held, cfg.score_batch)[key]
                r["model"] = model
                if after[r["candidate"]] >= r[key]:  # the short round did not help: keep the pruned weights
                    del r["model"]
            for part in dist.gather_objects(after):
                after.update(part)
            for r in rows[: cfg.top_k]:
                r[f"{key}_after_distill"] = after[r["candidate"]]
            best = min(rows[: cfg.top_k], key=lambda r: min(r[key], r[f"{key}_after_distill"]))
        chosen_cfg = pruned_config(ck.config, best["keep"], widths(best["targets"]))
        ctx.writer.plan(output_specs(ck, view, roles, best["keep"]))
        ctx.writer.set_config(chosen_cfg)
        distilled = dist.broadcast_object("model" in best, best["owner"])
        if distilled:
            if "model" in best:  # on its owner only: it writes the whole student
                from weightsmith.checkpoint.reader import Checkpoint
                from weightsmith.prune.distill import write_student

                write_student(ctx.writer, Checkpoint(best["path"]), best["model"])
        else:
            # the chosen candidate is written as it was scored (repaired on the windows not held out),
            # its repair sent by the rank that made it to every rank (each writes its share)
            fitted = dist.broadcast_object(fitted_by_k.get(best["index"], {}), best["owner"])
            write_pruned(ctx.writer, ck, view, roles, best["keep"], fitted, ctx.report, mine=ctx.mine)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = [
        {k: v for k, v in r.items() if k in ("candidate", "params", "kl", "loss", f"{key}_after_distill")} for r in rows
    ]
    ctx.report.log(
        f"candidates ranked by {key} (source loss {src_score['loss']:.4f} on {held.shape[0]} held-out windows):"
    )
    for i, r in enumerate(table, 1):
        extra = f", after distillation {r[key + '_after_distill']:.4f}" if key + "_after_distill" in r else ""
        ctx.report.log(
            f"  {i}. {r['candidate']}: {r['params']:,} params, KL {r['kl']:.4f}, loss {r['loss']:.4f}{extra}"
        )
    ctx.metrics.update(
        {
            "budget": budget,
            "params_before": src_params,
            "params_after": best["params"],
            "chosen": best["candidate"],
            "kept": best["keep"].as_json(),
            "rank_by": key,
            "source_loss": src_score["loss"],
            "score": f"{'mean KL(source ‖ candidate)' if key == 'kl' else 'next-token loss'} on {held.shape[0]} "
            "held-out calibration windows",
            "candidates": table,
            "layer_scores": {
                "metric": cfg.depth_metric,
                "values": [round(float(x), 6) for x in depth] if depth is not None else None,
            },
        }
    )


def _quick_distill(cfg: MinitronConfig, teacher, student, ids: torch.Tensor, device: str):
    """The distillation round: the distill pass's trainer on random batches of 4 windows (on the
    candidate's owner alone under a launcher)."""
    from weightsmith.prune.distill import KDTrainer

    torch.manual_seed(0)
    steps = max(1, cfg.distill_tokens // (4 * ids.shape[1]))
    trainer = KDTrainer(student, teacher, steps=steps, lr=cfg.lr, warmup=0, device=device, data_parallel=False)
    for step in range(steps):
        trainer.step(ids[torch.randint(0, ids.shape[0], (4,), generator=torch.Generator().manual_seed(step))])
    return trainer.model()


register(
    PassSpec(
        name="minitron",
        config_cls=MinitronConfig,
        plan=plan,
        run=run,
        help="Minitron search: prune candidate width/depth architectures under a parameter budget, keep the one "
        "closest to the source",
        reference_url="https://arxiv.org/abs/2408.11796",
        relation="finetune",
        tags=("pruned", "minitron"),
    )
)
