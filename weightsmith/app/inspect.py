"""What `weightsmith inspect` reports about a checkpoint (plain data; the CLI renders it)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from weightsmith.arch import arch_for, supports
from weightsmith.checkpoint.fp8 import is_scale_name
from weightsmith.errors import CheckpointError, WeightsmithError
from weightsmith.eval.accounting import disk_bytes, kv_cache, param_count
from weightsmith.util import dtype_name, natural_key


def best_config(ck) -> Any:
    """The transformers config when transformers knows the model type, else the raw dict."""
    try:
        return ck.config
    except WeightsmithError:
        return ck.config_dict


def coverage(ck, config=None) -> dict[str, list[str]]:
    """Tensors the config implies but the checkpoint lacks, and tensors no rule explains."""
    config = config if config is not None else best_config(ck)
    if supports(config):
        return {"missing": [], "unexpected": []}
    view = arch_for(config)
    expected = set(view.expected_tensors())
    have = {n for n in ck.names if not is_scale_name(n)}
    missing = sorted(expected - have, key=natural_key)
    unexpected = sorted((n for n in have - expected if view.classify(n) != "mtp" and not n.endswith("rotary_emb.inv_freq")), key=natural_key)
    return {"missing": missing, "unexpected": unexpected}


def require_complete(ck, config=None) -> None:
    """Raise a one-line error when the checkpoint lacks a tensor its config implies."""
    cov = coverage(ck, config)
    if cov["missing"]:
        more = f" (+{len(cov['missing']) - 1} more)" if len(cov["missing"]) > 1 else ""
        raise CheckpointError(f"{ck.root}: missing tensor {cov['missing'][0]!r}{more} that config.json implies; the checkpoint is incomplete")


def inspect(ck) -> dict[str, Any]:
    cfg = best_config(ck)
    raw = ck.config_dict
    reason = supports(cfg)
    out: dict[str, Any] = {
        "path": str(ck.root),
        "origin": ck.origin.__dict__,
        "model_type": raw.get("model_type"),
        "architectures": raw.get("architectures"),
        "supported": reason is None,
        "unsupported_reason": reason,
        "files": len(ck.files),
        "tensors": len(ck),
        "dtypes": dict(sorted(Counter(dtype_name(i.dtype) for i in ck.infos()).items())),
        "parameters": param_count(ck),
        "disk_bytes": disk_bytes(ck),
        "quantization": (raw.get("quantization_config") or {}).get("quant_method"),
        "kv_cache": kv_cache(cfg),
    }
    if reason is None:
        view = arch_for(cfg)
        sizes = {"layers": view.num_layers, "hidden": view.hidden, "heads": view.heads, "kv_heads": view.kv_heads, "head_dim": view.head_dim, "vocab": view.vocab, "tied_embeddings": view.tied}
        if view.family.mlp is not None:
            sizes["ffn"] = view.ffn
        if view.family.moe:
            sizes["experts"] = view.num_experts
            sizes["experts_per_token"] = view.experts_per_token
            sizes["moe_layers"] = sum(view.is_moe(i) for i in range(view.num_layers))
        if view.is_mla:
            for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                sizes[k] = view.size(k)
        out["family"] = view.family.name
        out["sizes"] = sizes
        out["coverage"] = coverage(ck, cfg)
        out["groups"] = dict(sorted(Counter(view.classify(n) for n in ck.names).items()))
    m = ck.manifest
    if m:
        out["manifest"] = {
            "pass": m.get("pass", {}).get("name"),
            "tool": m.get("tool"),
            "parameters": m.get("parameters"),
            "metrics": m.get("metrics"),
            "calibration": m.get("calibration"),
            "chain": [{"pass": s.get("pass", {}).get("name"), "parameters": s.get("parameters"), "metrics": s.get("metrics")} for s in m.get("chain", [])],
        }
    return out
