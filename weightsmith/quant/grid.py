"""The integer grid shared by RTN and GPTQ (pure tensor maths).

Convention (GPTQ's): codes q ∈ [0, 2^b − 1], w ≈ scale · (q − zero). Symmetric grids use the
fixed zero 2^(b−1) and scale = 2·max|w| / (2^b − 1); asymmetric grids fit [min, max] with an
integer zero. Parameters are per output row, per group of input columns. `mse=True` searches
shrunken ranges (100 shrink steps down to 20%) and keeps the best per row: without column
importances, by GPTQ's `mse` criterion (Lp norm 2.4 of the weight error); with them (GPTQ passes
sqrt(diag H) of the group's columns), by the importance-weighted squared error, so the clipping
range follows what the layer's inputs make matter (docs/quantization.md has the measurement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GridSpec:
    bits: int
    sym: bool = True
    mse: bool = False

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = spec.maxq
    if spec.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / torch.where(scale == 0, torch.ones_like(scale), scale))
    dead = scale == 0
    if dead.any():  # all-zero rows: any positive scale represents them exactly
        scale = torch.where(dead, torch.ones_like(scale), scale)
        if not spec.sym:
            zero = torch.where(dead, torch.full_like(zero, float((maxq + 1) // 2)), zero)
    return scale, zero.clamp(0, maxq)


def find_params(
    w: torch.Tensor,
    spec: GridSpec,
    *,
    importance: torch.Tensor | None = None,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for w [rows, cols] (one group). Returns fp32 [rows] each.

    importance: optional non-negative weight per column [cols] for the `mse` search; the error is
    then Σ_j importance_j·(w_j − ŵ_j)² (squared, whatever `norm` says)."""
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    scale, zero = _params_from_range(xmin, xmax, spec)
    if not spec.mse:
        return scale, zero
    if importance is not None:
        if importance.shape != (w.shape[1],):
            raise ValueError(f"importance has shape {tuple(importance.shape)}; expected ({w.shape[1]},)")
        importance = importance.float().clamp_min(0)[None, :]
    best = torch.full_like(scale, float("inf"))
    for i in range(int(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = _params_from_range(p * xmin, p * xmax, spec)
        d = dequantize(quantize(w, s[:, None], z[:, None], spec.maxq), s[:, None], z[:, None]) - w
        err = d.abs().pow(norm).sum(1) if importance is None else (d.square() * importance).sum(1)
        better = err < best
        if better.any():
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (as float) for w given broadcastable scale and zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def group_index(columns: int, group_size: int) -> torch.Tensor:
    """g_idx: the group of each input column (natural order; a ragged last group when g ∤ K)."""
    g = columns if group_size in (-1, 0) else group_size
    return torch.arange(columns, dtype=torch.int32) // g


def rtn(
    w: torch.Tensor, spec: GridSpec, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes int32 [N, K], scales [G, N], zeros int32 [G, N], g_idx [K])."""
    n, k = w.shape
    g_idx = group_index(k, group_size)
    groups = int(g_idx.max()) + 1
    g = k if group_size in (-1, 0) else group_size
    q = torch.empty(n, k, dtype=torch.int32)
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.int32)
    for gi in range(groups):
        cols = slice(gi * g, min((gi + 1) * g, k))
        s, z = find_params(w[:, cols], spec)
        q[:, cols] = quantize(w[:, cols].float(), s[:, None], z[:, None], spec.maxq).to(torch.int32)
        scales[gi], zeros[gi] = s, z.to(torch.int32)
    return q, scales, zeros, g_idx


def dequantize_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Float weight [N, K] from codes [N, K], per-group scales/zeros [G, N] and g_idx [K]."""
    gi = g_idx.long()
    return scales.float()[gi].T * (q.float() - zeros.float()[gi].T)
