"""`weightsmith import SRC DST`: bring any checkpoint into a verified, manifest-carrying directory.

SRC may be a directory (sharded or not, pickled with --allow-pickle), a `.gguf` file or a cached Hub
id. Tensors are copied byte-for-byte unless a dtype change or fp8 dequantization is asked for, so
this is also the writer's round-trip test on real models and the first step of every pipeline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch

from weightsmith.arch import arch_for
from weightsmith.arch.coverage import require_complete
from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.passes import PassSpec, Plan, register
from weightsmith.util import FLOAT_DTYPES, FP8_DTYPES, dtype_from_name, dtype_name


@dataclass(frozen=True)
class ImportConfig:
    dtype: Literal["keep", "float32", "bfloat16", "float16"] = field(
        default="keep",
        metadata={"help": "cast floating-point tensors to this dtype (fp8 weights stay fp8 unless --dequantize-fp8)"},
    )
    dequantize_fp8: bool = field(
        default=False,
        metadata={"help": "apply fp8 block scales and write plain floating-point weights (bf16 unless --dtype)"},
    )


def _target(cfg: ImportConfig, ck, name: str) -> tuple[torch.dtype, str]:
    """(output dtype, how) for one tensor; how = copy | cast | dequant | drop."""
    info = ck.info(name)
    if info.dtype in FP8_DTYPES and cfg.dequantize_fp8 and ck.scale_of(name):
        want = torch.bfloat16 if cfg.dtype == "keep" else dtype_from_name(cfg.dtype)
        return want, "dequant"
    if (
        cfg.dequantize_fp8
        and name.endswith("_scale_inv")
        and name[: -len("_scale_inv")] in ck
        and ck.is_fp8(name[: -len("_scale_inv")])
    ):
        return info.dtype, "drop"
    if cfg.dtype != "keep" and info.dtype in FLOAT_DTYPES and info.dtype != dtype_from_name(cfg.dtype):
        return dtype_from_name(cfg.dtype), "cast"
    return info.dtype, "copy"


def plan(cfg: ImportConfig, ctx) -> Plan:
    ck = ctx.source
    arch_for(ck.config)  # unsupported architectures fail here, naming the key and what is supported
    require_complete(ck)
    tensors, counts = [], {"copy": 0, "cast": 0, "dequant": 0, "drop": 0}
    for info in ck.infos():
        dt, how = _target(cfg, ck, info.name)
        counts[how] += 1
        if how != "drop":
            tensors.append(TensorSpec(info.name, info.shape, dt))
    out_cfg = copy.deepcopy(ck.config)
    if cfg.dtype != "keep":
        out_cfg.dtype = dtype_from_name(cfg.dtype)
    if counts["dequant"]:
        if hasattr(out_cfg, "quantization_config"):
            del out_cfg.quantization_config
        if cfg.dtype == "keep":
            out_cfg.dtype = torch.bfloat16
    summary = {
        "copied": counts["copy"],
        "cast": counts["cast"],
        "fp8_dequantized": counts["dequant"],
        "scales_dropped": counts["drop"],
    }
    if cfg.dtype != "keep":
        summary["dtype"] = dtype_name(dtype_from_name(cfg.dtype))
    return Plan(tensors=tensors, config=out_cfg, summary=summary)


def run(cfg: ImportConfig, ctx, plan: Plan) -> None:
    ck, w = ctx.source, ctx.writer
    for name in ctx.report.track(ck.file_order(), desc="copying"):
        dt, how = _target(cfg, ck, name)
        if how == "copy":
            w.copy_from(name, ck)
        elif how == "cast":
            w.write(name, ck.get(name, dtype=dt))
        elif how == "dequant":
            w.write(name, ck.get(name, dequantize=True, dtype=dt))
    ctx.metrics.update(plan.summary)


register(
    PassSpec(
        name="import",
        config_cls=ImportConfig,
        plan=plan,
        run=run,
        help=(
            "copy a checkpoint (directory, .gguf, cached Hub id) into a verified safetensors directory with a manifest"
        ),
        relation=None,  # the output is the same model: no base_model relation
    )
)
