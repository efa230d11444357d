"""What `weightsmith inspect` reports about a checkpoint (plain data; the CLI renders it)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from weightsmith.arch import arch_for, supports
from weightsmith.arch.coverage import best_config, coverage
from weightsmith.eval.accounting import disk_bytes, kv_cache, param_count
from weightsmith.util import dtype_name


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
        sizes = {
            "layers": view.num_layers,
            "hidden": view.hidden,
            "heads": view.heads,
            "kv_heads": view.kv_heads,
            "head_dim": view.head_dim,
            "vocab": view.vocab,
            "tied_embeddings": view.tied,
        }
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
            "chain": [
                {"pass": s.get("pass", {}).get("name"), "parameters": s.get("parameters"), "metrics": s.get("metrics")}
                for s in m.get("chain", [])
            ],
        }
    return out
