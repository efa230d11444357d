"""Pure tensor maths of merging (no I/O): interpolation, the δ gate, fp8 block merges.

All arithmetic is fp32; results are cast back to the output dtype once.
"""

from __future__ import annotations

import torch

from weightsmith.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise


def interpolate(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ λ_i W_i in fp32 (parents with λ = 0 may be passed as None and are skipped)."""
    out: torch.Tensor | None = None
    for t, lam in zip(tensors, weights):
        if lam == 0 or t is None:
            continue
        term = t.float() * lam if lam != 1 else t.float()
        out = term if out is None else out.add_(term)
    if out is None:
        raise ValueError("interpolate: every weight is zero")
    return out


def relative_difference(w: torch.Tensor, base: torch.Tensor) -> float:
    """‖W − W_base‖_F / ‖W_base‖_F in fp32 (∞ when the base is all zeros and W is not)."""
    b = base.float()
    num = float(torch.linalg.vector_norm(w.float() - b))
    den = float(torch.linalg.vector_norm(b))
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def merge_fp8(weights_fp8: list[torch.Tensor | None], scales: list[torch.Tensor | None], lambdas: list[float],
              block: tuple[int, int], *, requantize: bool, ue8m0: bool = False, out_dtype: torch.dtype = torch.bfloat16):
    """Dequantize each parent's fp8 weight with its own scales, interpolate, and either requantize
    to the same block format (returns (fp8 weight, fp32 scale_inv)) or return the merged weight in
    `out_dtype` (returns (weight, None))."""
    deq = [None if w is None else dequantize_blockwise(w, s, block) for w, s in zip(weights_fp8, scales)]
    merged = interpolate(deq, lambdas)
    if requantize:
        return quantize_blockwise(merged, block, ue8m0=ue8m0)
    return merged.to(out_dtype), None
