"""Perplexity with bounded memory: the layer-wise engine instead of a full model load."""

from __future__ import annotations

import math

import torch

from weightsmith.engine import LayerwiseEngine
from weightsmith.progress import QUIET


def layerwise_perplexity(
    ck,
    windows: torch.Tensor,
    *,
    device: str | None = None,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    report=QUIET,
) -> dict:
    eng = LayerwiseEngine(ck, device=device, dtype=dtype, batch_size=batch_size, report=report)
    try:
        hidden = eng.run(windows)
        nll = eng.nll(hidden, windows)
    finally:
        eng.close()
    mean = float(nll.mean())
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": windows.shape[0] * (windows.shape[1] - 1),
        "windows": int(windows.shape[0]),
        "length": int(windows.shape[1]),
    }
