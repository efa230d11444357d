"""Size accounting from headers and config alone: parameters, bytes on disk, KV cache per token."""

from __future__ import annotations

from typing import Any

import torch

from weightsmith.arch import arch_for, supports
from weightsmith.util import element_size


def _plain_params(ck) -> int:
    from weightsmith.arch.spec import is_scale_name

    return sum(i.numel for i in ck.infos() if not is_scale_name(i.name))


def param_count(ck) -> int:
    """Logical parameters (packed low-bit weights count as their unpacked size; scales excluded)."""
    method = (ck.config_dict.get("quantization_config") or {}).get("quant_method", "")
    from weightsmith.loading import RUNTIMES  # filled by the app at start-up

    runtime = RUNTIMES.get(method)
    return runtime.param_count(ck) if runtime else _plain_params(ck)


def disk_bytes(ck) -> int:
    return sum((ck.root / f).stat().st_size for f in ck.files)


def tensor_bytes(ck) -> int:
    return sum(i.nbytes for i in ck.infos())


def config_dtype(config: Any) -> torch.dtype:
    if isinstance(config, dict):
        dt = config.get("dtype") or config.get("torch_dtype")
    else:
        dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.bfloat16


def kv_cache(config: Any, cache_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """KV-cache values and bytes per token (all layers), in the model's dtype unless given."""
    if supports(config):
        return {"values_per_token": None, "bytes_per_token": None, "kind": None}
    view = arch_for(config)
    values = view.kv_cache_values_per_token()
    dt = cache_dtype or config_dtype(config)
    return {
        "values_per_token": values,
        "bytes_per_token": values * element_size(dt),
        "dtype": str(dt).removeprefix("torch."),
        "kind": "mla" if view.is_mla else ("mha" if view.kv_heads == view.heads else "gqa"),
    }
