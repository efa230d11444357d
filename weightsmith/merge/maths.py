"""Pure tensor maths of merging (no I/O): interpolation, the δ gate, fp8 block merges.

All arithmetic is fp32; results are cast back to the output dtype once.
"""

from __future__ import annotations

import torch

from weightsmith.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise

STRIP_ELEMENTS = 1 << 20  # fp32 elements per strip of an fp8 merge (4 MB)


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


def interpolate_into(
    tensors: list[torch.Tensor | None], weights: list[float] | tuple[float, ...], out: torch.Tensor
) -> torch.Tensor:
    """out = Σ λ_i W_i for equal-shaped parts (None where λ = 0), computed in fp32 and rounded to
    out's dtype once. Two parents of out's dtype take one fused lerp, A + λ_B (B − A), which
    rounds the same fp32 value once (weights sum to 1)."""
    active = [(t, w) for t, w in zip(tensors, weights) if t is not None and w != 0]
    if not active:
        raise ValueError("interpolate_into: every weight is zero")
    if len(active) == 1 and active[0][1] == 1:
        return out.copy_(active[0][0])
    if (
        len(active) == 2
        and all(t.dtype == out.dtype for t, _ in active)
        and abs(active[0][1] + active[1][1] - 1) < 1e-12
    ):
        (a, _), (b, wb) = active
        return torch.lerp(a, b, wb, out=out)
    return out.copy_(interpolate([t for t, _ in active], [w for _, w in active]))


def square_sums(x: torch.Tensor, row: int) -> list[float]:
    """Σ x² per row, in float64: the rows of a 2-D part, or consecutive `row`-element runs of a flat
    part (a shorter last run). Each row is reduced whole by one thread, so with parts that start
    on row boundaries the list does not depend on how a tensor was cut or on the thread count;
    `math.fsum` of all rows then gives the same total for any cut."""
    if x.dim() == 2:
        return x.double().square().sum(dim=1).tolist()
    x = x.reshape(-1)
    full = x.numel() // row * row
    out = x[:full].double().view(-1, row).square().sum(dim=1).tolist() if full else []
    if full < x.numel():
        out.append(float(x[full:].double().square().sum()))
    return out


def merge_fp8(
    weights_fp8: list[torch.Tensor | None],
    scales: list[torch.Tensor | None],
    lambdas: list[float],
    block: tuple[int, int],
    *,
    requantize: bool,
    ue8m0: bool = False,
    out_dtype: torch.dtype = torch.bfloat16,
):
    """Dequantize each parent's fp8 weight with its own scales, interpolate, and either requantize
    to the same block format (returns (fp8 weight, fp32 scale_inv)) or return the merged weight in
    `out_dtype` (returns (weight, None))."""
    ref = next(w for w in weights_fp8 if w is not None)
    rows, cols = ref.shape
    bm = block[0]
    # strips of whole block-rows: blocks are independent, so this equals the whole-tensor result
    # while the fp32 working set stays a few MB whatever the tensor size
    strip = max(bm, (STRIP_ELEMENTS // max(cols, 1)) // bm * bm)
    out = torch.empty(rows, cols, dtype=ref.dtype if requantize else out_dtype)
    out_s = torch.empty(-(-rows // bm), -(-cols // block[1]), dtype=torch.float32) if requantize else None
    for r0 in range(0, rows, strip):
        r1 = min(rows, r0 + strip)
        b0, b1 = r0 // bm, -(-r1 // bm)
        deq = [
            None if w is None else dequantize_blockwise(w[r0:r1], s[b0:b1], block) for w, s in zip(weights_fp8, scales)
        ]
        merged = interpolate(deq, lambdas)
        if requantize:
            q, sc = quantize_blockwise(merged, block, ue8m0=ue8m0)
            out[r0:r1] = q
            out_s[b0:b1] = sc
        else:
            out[r0:r1] = merged.to(out_dtype)
    return out, out_s
