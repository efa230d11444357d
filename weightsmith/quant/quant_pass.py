"""`weightsmith quant SRC DST`: RTN or GPTQ weight-only quantization into gptq / compressed-tensors.

Orchestration only; the maths is in grid.py / gptq.py, the byte layouts in formats/. GPTQ runs on
the layer-wise engine: one decoder layer resident, Hessians accumulated by hooks in fp32, each
layer quantized with inputs that already went through the quantized earlier layers (the engine
hands the next layer the outputs computed after our weight changes), and, with
`--true-sequential` (default), sub-modules in dependency order inside a layer (q/k/v, then o,
then gate/up, then down) so each sees inputs produced by its already-quantized predecessors.

Under a launcher (docs/distributed.md) each rank pushes its block of the calibration windows
through the layer, the Hessians are summed over ranks in rank order, each module of a stage is
solved by one owner chosen by cost (in_features³ + out_features·in_features²) which writes its
packed tensors, and the dequantized weight and the module's record are broadcast so every rank
continues with the same layer. RTN modules and the tensors copied through are split by cost too.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from weightsmith import dist
from weightsmith.arch import arch_for
from weightsmith.arch.coverage import require_complete
from weightsmith.arch.spec import SCALE_SUFFIX
from weightsmith.calib import CalibConfig
from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.passes import PassSpec, Plan, register
from weightsmith.quant.allocate import Unit, allocate_avg_bits
from weightsmith.quant.decisions import (
    BIT_CHOICES,
    GROUP_SIZES,
    Decision,
    Override,
    decide,
    fused_unit,
)
from weightsmith.quant.formats import FORMATS, LinearQuant, QuantizedWeight
from weightsmith.quant.gptq import (
    DAMP_STEP,
    DEFAULT_DAMP,
    GPTQSpec,
    gptq_fp_target,
    gptq_quantize,
    output_error,
)
from weightsmith.quant.grid import GridSpec, rtn
from weightsmith.quant.rotate_pass import RotateConfig, RotatedCheckpoint
from weightsmith.quant.sensitivity import rtn_output_error, rtn_weight
from weightsmith.util import FLOAT_DTYPES, FP8_DTYPES, dtype_from_name
from weightsmith.version import __version__

STAGE = {"q": 0, "k": 0, "v": 0, "q_a": 0, "kv_a": 0, "q_b": 1, "kv_b": 1, "o": 2, "gate": 3, "up": 3, "down": 4}
SHARED_INPUT = {"q", "k", "v", "q_a", "kv_a"}
# the sensitivities are RTN's on the full-precision model; with GPTQ no allocation measured better than
# uniform bits at the same bytes (SmolLM2, docs/quantization.md "Mixed precision measured")
GPTQ_AVG_BITS_NOTE = (
    "--avg-bits with --method gptq: the per-module widths come from RTN sensitivities, and on SmolLM2 every such "
    "allocation measured worse than uniform --bits at the same bytes (docs/quantization.md); compare with uniform "
    "bits before using it"
)
SYM_2BIT_NOTE = (
    "symmetric 2-bit grids have the levels {-2, -1, 0, 1}·scale (one side of each group's range gets a single level); "
    "--no-sym fits each group's [min, max] and measured far better on SmolLM2 at 2 bits (docs/quantization.md)"
)


@dataclass(frozen=True)
class QuantConfig(CalibConfig):
    method: Literal["rtn", "gptq"] = field(
        default="gptq",
        metadata={"help": "rtn: round to nearest (no data); gptq: error-compensating, needs calibration"},
    )
    bits: Literal[BIT_CHOICES] = field(default=4, metadata={"help": "bits per weight"})
    group_size: Literal[GROUP_SIZES] = field(
        default=128, metadata={"help": "input columns sharing a scale (-1: one per output channel)"}
    )
    sym: bool = field(
        default=True, metadata={"help": "symmetric grid (fixed zero point; what vLLM's Marlin kernels run)"}
    )
    act_order: Literal["none", "static", "group"] = field(
        default="static",
        metadata={"help": "GPTQ column order; all three keep g_idx = column // group (no reordering at inference)"},
    )
    damp: float = field(
        default=DEFAULT_DAMP,
        metadata={
            "help": "GPTQ dampening as a fraction of mean(diag H); raised automatically if Cholesky fails "
            "(default: gptq.DEFAULT_DAMP, chosen by measurement, see docs/quantization.md)"
        },
    )
    mse: bool = field(
        default=False, metadata={"help": "search the clipping range per row (MSE-optimal scales) instead of min/max"}
    )
    block_size: int = field(default=128, metadata={"help": "GPTQ lazy-update block size"})
    true_sequential: bool = field(
        default=True,
        metadata={
            "help": "quantize a layer's sub-modules in dependency order, each with inputs from its quantized "
            "predecessors"
        },
    )
    format: Literal["compressed-tensors", "gptq"] = field(
        default="compressed-tensors",
        metadata={
            "help": "on-disk format: compressed-tensors loads with plain transformers + compressed-tensors; gptq "
            "needs optimum + gptqmodel"
        },
    )
    override: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "per-module rule REGEX:skip or REGEX:bits=3,group_size=64,sym=false (first match wins; repeatable)"
        },
    )
    group_mismatch: Literal["fallback", "ragged", "error"] = field(
        default="fallback",
        metadata={
            "help": "when the group size does not divide in_features: use the largest smaller group that does, write a "
            "ragged last group (gptq format only), or stop"
        },
    )
    min_expert_tokens: int = field(
        default=128, metadata={"help": "MoE experts that saw fewer calibration tokens fall back to RTN"}
    )
    dtype: Literal["keep", "float16", "bfloat16"] = field(
        default="keep", metadata={"help": "dtype of the tensors left unquantized (embeddings, norms, ...)"}
    )
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward pass"})
    fp_target: bool = field(
        default=False,
        metadata={
            "help": "GPTQ that sees its own error (GPTAQ): each linear's target is the full-precision model's output "
            "on full-precision inputs, not its own output on the already-quantized inputs (measured: helps plain "
            "GPTQ, hurt the --rotate --mse --no-sym stack on SmolLM2; docs/quantization.md)"
        },
    )
    rotate: bool = field(
        default=False,
        metadata={
            "help": "first fold norm scales and randomised Hadamard rotations into the weights (the `rotate` pass; "
            "same function, flatter weights)"
        },
    )
    rotate_seed: int = field(default=0, metadata={"help": "seed of --rotate's random signs"})
    sensitivity: Literal["output", "layer"] = field(
        default="layer",
        metadata={
            "help": "--avg-bits' measure of a module's damage at a width: output = its own relative output error "
            "tr((W-Q)H(W-Q)^T)/tr(WHW^T) from the Hessian (no extra forwards); layer = the decoder layer's relative "
            "output error with only it rounded (one layer forward of ~1024 calibration tokens per fused unit and width)"
        },
    )
    avg_bits: float | None = field(
        default=None,
        metadata={
            "help": "mixed precision: choose each module's bits (2/3/4/8) by measured sensitivity so the quantized "
            "linears take no more bytes than at a uniform --avg-bits (docs/quantization.md); replaces --bits for "
            "the modules no --override names"
        },
    )

    def __post_init__(self):
        for o in self.override:
            Override.parse(o)
        if not 0 <= self.damp < 1:
            raise UsageError(f"--damp {self.damp}: must be in [0, 1)")
        if self.block_size < 1 or self.batch_size < 1:
            raise UsageError("--block-size and --batch-size must be positive")

    @property
    def default_quant(self) -> LinearQuant:
        return LinearQuant(int(self.bits), int(self.group_size), self.sym)


def _decisions(cfg: QuantConfig, ck, view, fmt) -> dict[str, tuple[Decision, object]]:
    overrides = [Override.parse(o) for o in cfg.override]
    out = {}
    for i in range(view.num_layers):
        for lin in view.linears(i, include_router=True):
            n, k = ck.info(lin.prefix + ".weight").shape
            d = decide(lin.prefix, lin.group, k, cfg.default_quant, overrides, cfg.group_mismatch, fmt)
            if d.quant is not None:
                fmt.validate(lin.prefix, n, k, d.quant)
            out[lin.prefix] = (d, lin)
    for text, ov in zip(cfg.override, overrides):  # a rule that matches nothing is a typo, not a no-op
        if not any(ov.pattern.search(p) for p in out):
            raise UsageError(
                f"--override {text!r}: matches no linear module (they are named like {next(iter(out), '?')!r}); fix "
                "the regular expression"
            )
    return out


def _out_dtype(cfg: QuantConfig, src: torch.dtype) -> torch.dtype:
    if src in FP8_DTYPES:
        return torch.bfloat16 if cfg.dtype == "keep" else dtype_from_name(cfg.dtype)
    if cfg.dtype == "keep" or src not in FLOAT_DTYPES:
        return src
    return dtype_from_name(cfg.dtype)


def _source(cfg: QuantConfig, ctx):
    """The checkpoint to quantize: the source, or (--rotate) a rotated view of it read lazily."""
    if cfg.rotate and not isinstance(ctx.source, RotatedCheckpoint):
        require_complete(ctx.source)
        ctx.sources[0] = RotatedCheckpoint(ctx.source, RotateConfig(seed=cfg.rotate_seed))
    return ctx.source


def plan(cfg: QuantConfig, ctx) -> Plan:
    ck = _source(cfg, ctx)
    view = arch_for(ck.config)
    require_complete(ck)
    if (ck.config_dict.get("quantization_config") or {}).get("quant_method") not in (None, "fp8"):
        raise UsageError(
            f"{ck.root}: already quantized ({ck.config_dict['quantization_config']['quant_method']}); quantize the "
            "floating-point model"
        )
    fmt = FORMATS[cfg.format]
    decisions = _decisions(cfg, ck, view, fmt)
    state = _PlanState(decisions)
    scale_dtype = torch.float16 if cfg.format == "gptq" else _out_dtype(cfg, ck.info(view.family.embed).dtype)
    dry_mixed = cfg.avg_bits is not None and ctx.dry_run
    if cfg.avg_bits is not None and cfg.method == "gptq":
        ctx.notes.append(GPTQ_AVG_BITS_NOTE)
    if cfg.avg_bits is not None:
        _mixed_precision(cfg, ctx, ck, view, fmt, state, scale_dtype, measure=not dry_mixed)
    quantized = {p: d for p, (d, _) in decisions.items() if d.quant is not None}
    if any(d.quant.bits == 2 and d.quant.sym for d in quantized.values()):
        ctx.notes.append(SYM_2BIT_NOTE)
    tensors, handled = [], set()
    for prefix, d in quantized.items():
        n, k = ck.info(prefix + ".weight").shape
        tensors += fmt.specs(prefix, n, k, d.quant, scale_dtype)
        handled |= {prefix + ".weight", prefix + ".weight" + SCALE_SUFFIX}
    for info in ck.infos():
        if info.name in handled:
            continue
        if info.name.endswith(SCALE_SUFFIX) and ck.is_fp8(info.name[: -len(SCALE_SUFFIX)]):
            continue  # fp8 weights left unquantized are dequantized below
        tensors.append(TensorSpec(info.name, info.shape, _out_dtype(cfg, info.dtype)))
    out_cfg = copy.deepcopy(ck.config)
    if cfg.dtype != "keep":
        out_cfg.dtype = dtype_from_name(cfg.dtype)
    elif any(ck.is_fp8(n) for n in ck.names):
        out_cfg.dtype = torch.bfloat16
    per_module = {p: d.quant for p, (d, _) in decisions.items()}
    meta = {
        "method": cfg.method,
        "damp_percent": cfg.damp,
        "damp_auto_increment": DAMP_STEP,
        "static_groups": cfg.act_order == "static",
        "act_group_aware": cfg.act_order == "group",
        "true_sequential": cfg.true_sequential,
        "mse": cfg.mse,
    }
    default = cfg.default_quant if state.mixed is None else _most_common(per_module)
    if state.mixed is not None:
        meta["avg_bits"] = cfg.avg_bits
    out_cfg.quantization_config = fmt.config(default, per_module, {"version": __version__, "meta": meta})
    notes = {p: d.note for p, (d, _) in decisions.items() if d.note and d.quant is not None}
    summary = {
        "method": cfg.method,
        "format": cfg.format,
        "quantized_modules": len(quantized),
        "full_precision_modules": len(decisions) - len(quantized),
        "group_adjustments": len(notes),
    }
    if state.mixed is not None:
        summary.update({k: state.mixed[k] for k in ("avg_bits", "budget_bytes", "bytes", "modules_per_bits")})
    if dry_mixed:
        summary["avg_bits"] = cfg.avg_bits
        summary["mixed_precision"] = "per-module bits are chosen from calibration statistics when the pass runs"
    return Plan(tensors=None if dry_mixed else tensors, config=out_cfg, summary=summary, state=state)


@dataclass
class _PlanState:
    """What plan() decided and run() uses: {module: (Decision, Linear)}, and with --avg-bits the
    calibration windows the sensitivity sweep read (GPTQ reuses them) and the allocation record."""

    decisions: dict[str, tuple[Decision, object]]
    calib: object | None = None
    mixed: dict | None = None


def _most_common(per_module: dict[str, LinearQuant | None]) -> LinearQuant:
    """The quantization most modules share (ties: fewer bits): the config's default for mixed outputs."""
    counts: dict[LinearQuant, int] = {}
    for q in per_module.values():
        if q is not None:
            counts[q] = counts.get(q, 0) + 1
    return min(counts, key=lambda q: (-counts[q], q.bits, q.group_size, not q.sym))


def _mixed_precision(cfg, ctx, ck, view, fmt, state: _PlanState, scale_dtype, *, measure: bool) -> None:
    """--avg-bits: one statistics-only sweep of the full-precision model (per-layer Hessians H, one
    forward per layer) gives each unit's sensitivity (--sensitivity) at every width in BIT_CHOICES,
    then one global allocation under the byte budget (quant/allocate.py). Modules an --override
    names keep the user's choice and stay out of the budget; modules that servers fuse
    (FUSED_ROLES / FUSED_GROUPS) form one unit with one width. Rewrites the decisions in place."""
    decisions = state.decisions
    overrides = [Override.parse(o) for o in cfg.override]
    free = {
        p: (d, lin)
        for p, (d, lin) in decisions.items()
        if d.quant is not None and not any(ov.pattern.search(p) for ov in overrides)
    }
    if not free:
        raise UsageError("--avg-bits: every quantized module is named by an --override; nothing is left to allocate")
    shapes = {p: tuple(ck.info(p + ".weight").shape) for p in free}

    def at(p: str, bits: int) -> LinearQuant:
        q = free[p][0].quant
        return LinearQuant(bits, q.group_size, q.sym)

    def nbytes(p: str, bits: int) -> int:
        return sum(s.nbytes for s in fmt.specs(p, *shapes[p], at(p, bits), scale_dtype))

    def valid(p: str, bits: int) -> bool:
        try:
            fmt.validate(p, *shapes[p], at(p, bits))
        except UsageError:
            return False
        return True

    uniform = {b: sum(nbytes(p, b) for p in free) for b in BIT_CHOICES}
    members: dict[str, list[str]] = {}
    for p, (_, lin) in free.items():
        members.setdefault(fused_unit(lin, view.layer_of(p)), []).append(p)
    widths = {u: [b for b in BIT_CHOICES if all(valid(p, b) for p in ps)] for u, ps in members.items()}
    for u, ws in widths.items():
        if not ws:
            raise UsageError(
                f"--avg-bits: {members[u][0]} cannot be stored at any of {', '.join(map(str, BIT_CHOICES))} bits "
                f"in the {fmt.name} format; skip it with --override '{members[u][0]}$:skip'"
            )

    def units(errors) -> list[Unit]:
        return [
            Unit(u, {b: (sum(nbytes(p, b) for p in ps), errors(u, b)) for b in widths[u]}) for u, ps in members.items()
        ]

    alloc = allocate_avg_bits(cfg.avg_bits, units(lambda u, b: 0.0), uniform)  # infeasible: fail before any work
    if not measure:
        return
    state.calib = ctx.calibrate(cfg, default="self", shard=True)
    errs = _sensitivities(cfg, ctx, view, free, members, state.calib)
    alloc = allocate_avg_bits(cfg.avg_bits, units(lambda u, b: errs[u][b]), uniform)
    for u, ps in members.items():
        for p in ps:
            d, lin = decisions[p]
            decisions[p] = (Decision(at(p, alloc.bits[u]), d.note), lin)
    by_bits: dict[int, int] = {}
    for u, ps in members.items():
        by_bits[alloc.bits[u]] = by_bits.get(alloc.bits[u], 0) + len(ps)
    floor = max((b for b in BIT_CHOICES if b <= cfg.avg_bits), default=None)
    uniform_ok = floor is not None and all(floor in w for w in widths.values())
    uniform_error = math.fsum(errs[u][floor] for u in members) if uniform_ok else None
    state.mixed = {
        "avg_bits": cfg.avg_bits,
        "budget_bytes": alloc.budget,
        "bytes": alloc.bytes,
        "uniform_bytes": {str(b): n for b, n in uniform.items()},
        "modules_per_bits": {str(b): by_bits[b] for b in sorted(by_bits)},
        "sensitivity": SENSITIVITY_NOTE[cfg.sensitivity],
        "estimated_error": alloc.error,
        f"estimated_error_uniform_{floor}_bits": uniform_error,
        "units": {
            u: {"bits": alloc.bits[u], "modules": ps, "errors": {str(b): errs[u][b] for b in BIT_CHOICES}}
            for u, ps in members.items()
        },
    }


SENSITIVITY_NOTE = {
    "output": "per unit, the sum of its modules' relative RTN output errors tr((W-Q)H(W-Q)^T) / tr(WHW^T) on the "
    "calibration inputs of the full-precision model",
    "layer": "per unit, the squared error of its decoder layer's output with only that unit RTN-rounded, relative to "
    "the output's energy token by token and summed over tokens, on the first calibration windows (LAYER_TOKENS "
    "tokens per rank) of the full-precision model",
}


def _sensitivities(cfg, ctx, view, free, members, calib) -> dict[str, dict[int, float]]:
    """Per unit and width, its error estimate (--sensitivity); the layers see the full-precision
    model's hidden states (nothing is quantized during this sweep)."""
    from weightsmith.engine.activations import ActivationStore

    engine = ctx.engine(batch_size=cfg.batch_size)
    errs: dict[str, dict[int, float]] = {}
    unit_of = {p: u for u, ps in members.items() for p in ps}

    def process(layer):
        lins = [lin for p, (_, lin) in free.items() if view.layer_of(p) == layer.index]
        grams, observe = _input_grams(layer, lins)
        fp_out = layer.run(observe=observe)  # one forward: statistics and the next layer's inputs
        layer.next_inputs = fp_out
        for g in grams.values():
            g.reduce()

        def parts(lin):  # the module's weight, Hessian and grid
            q = free[lin.prefix][0].quant
            w = layer.tensor(lin.prefix + ".weight").detach().float()
            return w, grams[_input_key(lin)].sum, q

        units = list(dict.fromkeys(unit_of[lin.prefix] for lin in lins))
        if cfg.sensitivity == "output":
            for u in units:
                errs[u] = {}
                for b in BIT_CHOICES:
                    terms = []
                    for lin in (x for x in lins if unit_of[x.prefix] == u):
                        w, h, q = parts(lin)
                        terms.append(rtn_output_error(w, h, b, q.group_size, q.sym, cfg.mse, relative=True))
                    errs[u][b] = math.fsum(terms)
            return
        # "layer": the layer's output with only this unit rounded, on the first LAYER_TOKENS tokens' windows
        # per token, relative to that token's output energy: what reads the residual stream next is an
        # RMSNorm, which divides each token by its own RMS (a few tokens carry massive activations)
        m = min(-(-LAYER_TOKENS // fp_out.shape[1]), fp_out.shape[0])
        sub = ActivationStore(m, *layer.inputs.shape[1:], dtype=layer.inputs.dtype)
        sub.data.copy_(layer.inputs.data[:m])
        energy = [fp_out.data[sl].double().square().sum(-1).clamp_min(1e-30) for sl in _slices(m, cfg.batch_size)]
        for u in units:
            mine = [x for x in lins if unit_of[x.prefix] == u]
            originals = {x.prefix: layer.tensor(x.prefix + ".weight").detach().clone() for x in mine}
            errs[u] = {}
            for b in BIT_CHOICES:
                for x in mine:
                    w, h, q = parts(x)
                    layer.set_weight(x.prefix + ".weight", rtn_weight(w, h, b, q.group_size, q.sym, cfg.mse))
                out = layer.run(inputs=sub)
                sq = math.fsum(
                    float(((out.data[sl].double() - fp_out.data[sl].double()).square().sum(-1) / e).sum())
                    for sl, e in zip(_slices(m, cfg.batch_size), energy)
                )
                if ctx.world.distributed:
                    sq = dist.sum_ordered(torch.tensor(sq, dtype=torch.float64)).item()
                errs[u][b] = sq
                out.close()
                for x in mine:
                    layer.set_weight(x.prefix + ".weight", originals[x.prefix])
        sub.close()

    last = max(view.layer_of(p) for p in free)
    with ctx.report.status("measuring sensitivities for --avg-bits"):
        engine.run(calib.ids, process, layers=range(last + 1))
    engine.close()
    return errs


# calibration tokens (whole windows, per rank) the "layer" sensitivity pushes through each layer once
# per unit and width: its cost is 4 widths x (units per layer) forwards of these windows
LAYER_TOKENS = 1024


def _slices(n: int, step: int):
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _Recorder:
    """Collects per-module results for the manifest."""

    def __init__(self):
        self.layers: dict[str, dict] = {}
        self.rtn_fallbacks: list[str] = []
        self.damp_raised: dict[str, float] = {}


def _finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise WeightsmithError(f"{name}: contains NaN or Inf; refusing to quantize it (fix the source weights)")


def _write_quantized(ctx, fmt, prefix: str, qw: QuantizedWeight, scale_dtype) -> None:
    for name, t in fmt.pack(prefix, qw, scale_dtype).items():
        ctx.writer.write(name, t)


def run(cfg: QuantConfig, ctx, plan: Plan) -> None:
    ck = _source(cfg, ctx)
    if cfg.rotate:
        ctx.metrics["rotation"] = ck.describe()
    view = arch_for(ck.config)
    fmt = FORMATS[cfg.format]
    state: _PlanState = plan.state  # made once, by plan()
    decisions = state.decisions
    quantized = {p: d for p, (d, _) in decisions.items() if d.quant is not None}
    quant_weights = {p + ".weight" for p in quantized}
    rec = _Recorder()
    scale_dtype = (
        next(s.dtype for s in ctx.writer.planned if s.name.endswith((".scales", ".weight_scale")))
        if quantized
        else torch.float16
    )
    out_dtypes = {s.name: s.dtype for s in ctx.writer.planned}
    # everything that is not a quantized weight streams straight through (split by bytes over ranks)
    through = [n for n in ck.file_order() if n in out_dtypes and n not in quant_weights]
    for j in ctx.mine([ck.info(n).nbytes for n in through]):
        name = through[j]
        if ck.info(name).dtype in FP8_DTYPES:
            ctx.writer.write(name, ck.get(name, dequantize=True, dtype=out_dtypes[name]))
        else:
            ctx.copy_tensor(name, dtype=out_dtypes[name])
    t0 = time.perf_counter()
    if cfg.method == "rtn":
        prefixes = list(quantized)
        mine = ctx.mine([ck.info(p + ".weight").numel for p in prefixes])
        for prefix in ctx.report.track([prefixes[j] for j in mine], desc="rtn"):
            q = quantized[prefix].quant
            w = ck.get(prefix + ".weight", dequantize=True, dtype=torch.float32).to(ctx.device)  # --device
            _finite(prefix + ".weight", w)
            qw = _rtn(w, q, cfg.mse, fmt)
            _write_quantized(ctx, fmt, prefix, qw, scale_dtype)
            rec.layers[prefix] = {
                "method": "rtn",
                "weight_rel_error": float((qw.dequantize() - w).norm() / w.norm().clamp_min(1e-12)),
            }
        if ctx.world.distributed:  # every rank's records, in module order
            merged = {k: v for part in dist.gather_objects(rec.layers) for k, v in part.items()}
            rec.layers = {p: merged[p] for p in prefixes}
    else:
        _run_gptq(cfg, ctx, view, fmt, quantized, decisions, rec, scale_dtype, state.calib)
    if state.mixed is not None:
        ctx.metrics["mixed_precision"] = state.mixed
        for p, d in quantized.items():
            rec.layers.setdefault(p, {})["bits"] = d.quant.bits
    _metrics(cfg, ctx, ck, quantized, rec, time.perf_counter() - t0)


def _rtn(w: torch.Tensor, q: LinearQuant, mse: bool, fmt) -> QuantizedWeight:
    codes, scales, zeros, g_idx = rtn(w, GridSpec(q.bits, q.sym, mse), q.group_size)
    qw = QuantizedWeight(codes, scales, zeros, g_idx, q)
    return _respect_min_zero(qw, fmt)


def _respect_min_zero(qw: QuantizedWeight, fmt) -> QuantizedWeight:
    """GPTQ v1 stores zero-1: an asymmetric zero of 0 is re-fitted as 1 (codes re-rounded)."""
    if fmt.min_zero <= 0 or int(qw.zeros.min()) >= fmt.min_zero:
        return qw
    w = qw.dequantize()
    zeros = qw.zeros.clamp(min=fmt.min_zero)
    gi = qw.g_idx.long()
    s = qw.scales[gi].T
    q = torch.clamp(torch.round(w / s) + zeros[gi].T, 0, (1 << qw.quant.bits) - 1).to(torch.int32)
    return QuantizedWeight(q, qw.scales, zeros, qw.g_idx, qw.quant)


# Below this many calibration tokens per input feature GPTQ measurably over-fits (SmolLM2 down_proj,
# 1536 inputs: with 4k tokens its held-out output error is 1.5x RTN's; with 16k it is 0.9x).
MIN_TOKENS_PER_INPUT = 16


def _input_grams(layer, lins) -> tuple[dict, dict]:
    """One float64 Gram per distinct module input among `lins` (q/k/v share theirs), and the
    observe map that fills each from the first module reading that input."""
    from weightsmith.engine.stats import Gram

    grams: dict = {}
    observe = {}
    for lin in lins:
        key = _input_key(lin)
        if key not in grams:
            grams[key] = Gram(layer.in_features(lin.prefix), dtype=torch.float64)
            observe[lin.prefix] = grams[key]
    return grams, observe


def _input_key(lin) -> str:
    if lin.role in SHARED_INPUT:
        return lin.prefix.rsplit(".", 1)[0] + ".<attention input>"
    if lin.role in ("gate", "up"):
        return lin.prefix.rsplit(".", 1)[0] + ".<mlp input>"
    return lin.prefix


def _run_gptq(cfg, ctx, view, fmt, quantized, decisions, rec, scale_dtype, calib=None) -> None:
    calib = calib or ctx.calibrate(cfg, default="self", shard=True)  # this rank's windows
    if cfg.calib is None:
        ctx.notes.append(
            "no --calib given: GPTQ calibrated on text the model generated itself (data-free); real text is usually "
            "better"
        )
    tokens = int(calib.total * calib.ids.shape[1])
    widest = max((ctx.source.info(p + ".weight").shape[-1] for p in quantized), default=0)
    if widest and tokens < MIN_TOKENS_PER_INPUT * widest:
        ctx.notes.append(
            f"calibration has {tokens} tokens for inputs up to {widest} wide: GPTQ fits the calibration set and can "
            "generalise worse than RTN "
            f"below ~{MIN_TOKENS_PER_INPUT}x the input width; use at least {MIN_TOKENS_PER_INPUT * widest} tokens "
            "(--calib-samples x --calib-length)"
        )
    engine = ctx.engine(batch_size=cfg.batch_size)
    fp_stream: dict = {"store": None}  # --fp-target: the full-precision model's hidden states

    def process(layer):
        lins = [lin for p, (d, lin) in decisions.items() if d.quant is not None and view.layer_of(p) == layer.index]
        stages = sorted({STAGE.get(l.role, 0) for l in lins}) if cfg.true_sequential else [None]
        fp_in = fp_stream["store"] or layer.inputs
        originals = {n: t.clone() for n, t in layer.state_dict().items()} if cfg.fp_target else None
        for st in stages:
            todo = [l for l in lins if st is None or STAGE.get(l.role, 0) == st]
            grams, observe = _input_grams(layer, todo)
            cross: dict[str, CrossGram] = {}
            if cfg.fp_target:
                cross = _cross_grams(
                    layer,
                    {p: _input_key(l) for l in todo if l.expert is None for p in [l.prefix] if p in observe},
                    originals,
                    fp_in,
                )
                observe = {p: _both(g, cross.get(p)) for p, g in observe.items()}
            layer.run(observe=observe, keep_outputs=False)
            for g in grams.values():  # Σ over ranks, in rank order (no-op in one process)
                g.reduce()
                g.sum = g.sum.float()
            for c in cross.values():
                c.reduce()
            by_key = {_input_key(l): cross[l.prefix] for l in todo if l.prefix in cross}
            # a stage's modules are independent (their Hessians are all known): each owner solves
            # its share, then every rank takes each module's weight and record from its owner
            owners = dist.assign_owners([_gptq_cost(layer, l) for l in todo]) if ctx.world.distributed else None
            results = {}
            for j, lin in enumerate(todo):
                if owners is None or owners[j] == ctx.world.rank:
                    key = _input_key(lin)
                    results[lin.prefix] = _gptq_one(
                        cfg,
                        ctx,
                        fmt,
                        layer,
                        lin,
                        quantized[lin.prefix].quant,
                        grams[key],
                        scale_dtype,
                        by_key.get(key),
                    )
            for j, lin in enumerate(todo):
                if owners is not None:
                    dist.broadcast_(layer.tensor(lin.prefix + ".weight").detach(), owners[j])
                    results[lin.prefix] = dist.broadcast_object(results.get(lin.prefix), owners[j])
                entry, fallback, damp = results[lin.prefix]
                rec.layers[lin.prefix] = entry
                if fallback:
                    rec.rtn_fallbacks.append(lin.prefix)
                if damp is not None:
                    rec.damp_raised[lin.prefix] = damp
        if cfg.fp_target:  # advance the full-precision stream with the layer's original weights
            current = {n: t.clone() for n, t in layer.state_dict().items()}
            _load(layer, originals)
            nxt = layer.run(inputs=fp_in)
            _load(layer, current)
            if fp_in is not layer.inputs:
                fp_in.close()
            fp_stream["store"] = nxt
        tokens = layer.expert_tokens()
        if tokens is not None:
            if ctx.world.distributed:
                tokens = [int(x) for x in dist.sum_ordered(torch.tensor(tokens, dtype=torch.int64)).tolist()]
            rec.layers.setdefault(f"{layer.prefix}.<experts>", {})["tokens_per_expert"] = tokens

    # layers after the last one with modules to quantize change nothing: the engine stops there
    last = max((i for i in (view.layer_of(p) for p in quantized) if i is not None), default=-1)
    engine.run(calib.ids, process, layers=range(last + 1))
    if fp_stream["store"] is not None:
        fp_stream["store"].close()
    engine.close()


def _gptq_cost(layer, lin) -> float:
    """A module's GPTQ cost: the Cholesky inverse (k³) and the column sweep (n·k²)."""
    n, k = layer.tensor(lin.prefix + ".weight").shape
    return float(k) ** 3 + float(n) * float(k) ** 2


class CrossGram:
    """Σ x̃ᵀx between the full-precision model's inputs x̃ (recorded first, batch by batch) and the
    quantized model's inputs x to the same module: GPTAQ's asymmetric target."""

    def __init__(self):
        self.fp_batches: list[torch.Tensor] = []
        self.sum: torch.Tensor | None = None
        self.valid = True

    def record(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.fp_batches.append(inp.reshape(-1, inp.shape[-1]).float().cpu())

    def __call__(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float().cpu()
        xt = self.fp_batches.pop(0) if self.fp_batches else None
        if xt is None or xt.shape != x.shape:
            self.valid = False
            return
        self.sum = xt.T @ x if self.sum is None else self.sum.addmm_(xt.T, x)

    def reduce(self) -> "CrossGram":
        """Σ over ranks in rank order; invalid when any rank's is (no-op in one process)."""
        if dist.world().distributed:
            self.valid = dist.all_true(self.valid and self.sum is not None)
            if self.valid:
                self.sum = dist.sum_ordered(self.sum)
        return self


def _both(a, b):
    if b is None:
        return a

    def fn(inp, out):
        a(inp, out)
        b(inp, out)

    return fn


def _load(layer, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        layer.set_weight(name, t)


def _cross_grams(layer, keys: dict[str, str], originals: dict, fp_in) -> dict[str, CrossGram]:
    """Record the full-precision layer's module inputs on the full-precision stream (one pass)."""
    if not keys:
        return {}
    cross = {p: CrossGram() for p in keys}
    current = {n: t.clone() for n, t in layer.state_dict().items()}
    _load(layer, originals)
    layer.run(observe={p: c.record for p, c in cross.items()}, keep_outputs=False, inputs=fp_in)
    _load(layer, current)
    return cross


def _gptq_one(cfg, ctx, fmt, layer, lin, q: LinearQuant, gram, scale_dtype, cross=None):
    """Quantize one module, set its dequantized weight in the layer and write its packed tensors.
    Returns (manifest entry, fell back to RTN, dampening raised to or None)."""
    name = lin.prefix + ".weight"
    w = layer.tensor(name).detach().float()
    _finite(name, w)
    fallback, damp = False, None
    if lin.expert is not None and gram.rows < cfg.min_expert_tokens:
        qw = _rtn(w, q, cfg.mse, fmt)
        fallback = True
        entry = {"method": "rtn (expert saw too few tokens)", "tokens": gram.rows}
    else:
        spec = GPTQSpec(GridSpec(q.bits, q.sym, cfg.mse), q.group_size, cfg.act_order, cfg.block_size, cfg.damp)
        target = w
        if cross is not None and cross.valid and cross.sum is not None:
            target = gptq_fp_target(w, gram.sum, cross.sum, cfg.damp)
        res = gptq_quantize(target, gram.sum, spec)
        qw = _respect_min_zero(QuantizedWeight(res.q, res.scales, res.zeros, res.g_idx, q), fmt)
        entry = {"method": "gptq" if target is w else "gptq (full-precision target)", "tokens": gram.rows}
        if res.damp != cfg.damp:
            damp = res.damp
            entry["damp"] = res.damp
        if res.dead_columns:
            entry["dead_columns"] = res.dead_columns
    w_hat = qw.dequantize()
    entry["rel_output_error"] = output_error(w, w_hat, gram.sum)
    layer.set_weight(name, w_hat)  # the next sub-modules and layers see the quantized weights
    _write_quantized(ctx, fmt, lin.prefix, qw, scale_dtype)
    return entry, fallback, damp


def _metrics(cfg, ctx, ck, quantized, rec: _Recorder, seconds: float) -> None:
    planned = {s.name: s for s in ctx.writer.planned}
    q_numel = sum(ck.info(p + ".weight").numel for p in quantized)
    q_bytes = sum(
        s.nbytes for s in planned.values() if s.name.rsplit(".", 1)[0] in quantized and not s.name.endswith(".bias")
    )
    src_bytes = sum(i.nbytes for i in ck.infos())
    errs = [v["rel_output_error"] for v in rec.layers.values() if "rel_output_error" in v]
    ctx.metrics.update(
        {
            "method": cfg.method,
            "quantized_modules": len(quantized),
            "bits_per_quantized_weight": 8 * q_bytes / max(q_numel, 1),
            "quantized_linear_bytes": q_bytes,
            "bits_per_parameter_overall": 8 * ctx.writer.total_size / max(sum(i.numel for i in ck.infos()), 1),
            "bytes_before": src_bytes,
            "bytes_after": ctx.writer.total_size,
            "mean_rel_output_error": (sum(errs) / len(errs)) if errs else None,
            "max_rel_output_error": max(errs) if errs else None,
            "group_adjustments": {p: d.note for p, d in quantized.items() if d.note},
            "rtn_fallback_experts": rec.rtn_fallbacks,
            "damp_raised": rec.damp_raised,
            "modules": rec.layers,
        }
    )
    # wall time is reported, not stored: outputs must be byte-identical across runs
    ctx.notes.append(f"quantized {len(quantized)} modules ({cfg.method}) in {seconds:.1f} s")
    if rec.rtn_fallbacks:
        ctx.notes.append(
            f"{len(rec.rtn_fallbacks)} MoE experts saw fewer than {cfg.min_expert_tokens} calibration tokens and were "
            "quantized with RTN (listed in the manifest)"
        )
    if rec.damp_raised:
        ctx.notes.append(f"Cholesky needed more dampening for {len(rec.damp_raised)} modules (values in the manifest)")


register(
    PassSpec(
        name="quant",
        config_cls=QuantConfig,
        plan=plan,
        run=run,
        help="weight-only RTN/GPTQ quantization to 2/3/4/8 bits, written as GPTQ or compressed-tensors checkpoints",
        reference_url="https://arxiv.org/abs/2210.17323",
        relation="quantized",
        tags=("quantized",),
    )
)
