"""DeepSeek-style fp8 e4m3 weights with per-block `weight_scale_inv` (pure tensor maths).

`W[i, j] = W_fp8[i, j] * scale_inv[i // bm, j // bn]`; requantization per block uses
`s = max(amax, 1e-4) / 448` and stores `round_e4m3(block / s)` with `scale_inv = s`
(deepseek-ai/DeepSeek-V3 README_WEIGHTS.md). Edge blocks that do not fill 128x128 are handled as if
zero-padded.
"""

from __future__ import annotations

import torch

from weightsmith.arch.spec import SCALE_SUFFIX

E4M3_MAX = 448.0


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    bm, bn = block
    rows, cols = shape
    want = (-(-rows // bm), -(-cols // bn))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale shape {list(scale.shape)} does not match weight {list(shape)} with blocks {bm}x{bn} (expected "
            f"{list(want)})"
        )
    return scale.float().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]


def _e4m3_as_half(w: torch.Tensor) -> torch.Tensor | None:
    """e4m3fn codes as float16 values equal to `w.float() / 256`, exactly, by moving bits: e4m3's
    4-bit exponent (bias 7) and 3-bit mantissa sit inside fp16's 5-bit exponent (bias 15) and
    10-bit mantissa, subnormals included. ~2.5x faster than torch's fp8 -> fp32 cast on CPU.
    None when `w` holds a NaN code (it would decode as ±480/256)."""
    b = w.view(torch.uint8).to(torch.int16)
    h = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).view(torch.float16)
    if h.numel():
        lo, hi = torch.aminmax(h.reshape(-1))
        if float(hi) == 1.875 or float(lo) == -1.875:  # 0x7F / 0xFF: NaN codes
            return None
    return h


def _to_float_scaled(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(values, m) with values * m == w.float() exactly."""
    if w.dtype == torch.float8_e4m3fn:
        h = _e4m3_as_half(w)
        if h is not None:
            return h, 256.0
    return w, 1.0


def dequantize_blockwise(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """fp8 weight + block scales -> floating weight (computed in fp32; bit-identical to
    `w.float() * scale_inv` expanded to the weight's shape)."""
    if w.dim() != 2:
        raise ValueError(f"block-scaled fp8 weights must be 2-D, got shape {list(w.shape)}")
    bm, bn = block
    rows, cols = w.shape
    want = (-(-rows // bm), -(-cols // bn))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale shape {list(scale_inv.shape)} does not match weight {list(w.shape)} with blocks {bm}x{bn} "
            f"(expected {list(want)})"
        )
    s = scale_inv.float()
    vals, m = _to_float_scaled(w)
    if m != 1.0:  # (x / 256) * (s * 256) rounds like x * s: both factors are exact rescalings
        s2 = s * m
        if bool(torch.isfinite(s2).all()):
            s = s2
        else:
            vals = w
    if rows % bm == 0 and cols % bn == 0:
        out = vals.float().view(rows // bm, bm, cols // bn, bn).mul(s[:, None, :, None]).view(rows, cols)
    else:
        out = vals.float() * _expand(s, (rows, cols), block)
    return out.to(dtype)


def quantize_blockwise(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Floating weight -> (fp8 e4m3 weight, fp32 scale_inv) with one scale per block."""
    if w.dim() != 2:
        raise ValueError(f"block-scaled fp8 weights must be 2-D, got shape {list(w.shape)}")
    bm, bn = block
    rows, cols = w.shape
    rb, cb = -(-rows // bm), -(-cols // bn)
    x = w.float()
    if rows % bm == 0 and cols % bn == 0:
        blocks = x.reshape(rb, bm, cb, bn)
    else:
        padded = torch.zeros(rb * bm, cb * bn, dtype=torch.float32)
        padded[:rows, :cols] = x
        blocks = padded.view(rb, bm, cb, bn)
    # max |x| per block without an |x| temporary: max(max, -min); NaN propagates like abs().amax()
    amax = torch.maximum(blocks.amax(dim=(1, 3)), blocks.amin(dim=(1, 3)).neg()).clamp_min(1e-4)
    s = amax / E4M3_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (blocks / s[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(rb * bm, cb * bn)[:rows, :cols].contiguous()
    return q, s.contiguous()
