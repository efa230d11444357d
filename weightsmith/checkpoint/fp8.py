"""DeepSeek-style fp8 e4m3 weights with per-block `weight_scale_inv` (pure tensor maths).

`W[i, j] = W_fp8[i, j] * scale_inv[i // bm, j // bn]`; requantization per block uses
`s = max(amax, 1e-4) / 448` and stores `round_e4m3(block / s)` with `scale_inv = s`
(deepseek-ai/DeepSeek-V3 README_WEIGHTS.md). Edge blocks that do not fill 128x128 are handled as if
zero-padded.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"  # `<prefix>.weight` -> `<prefix>.weight_scale_inv`


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def is_scale_name(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    bm, bn = block
    rows, cols = shape
    want = (-(-rows // bm), -(-cols // bn))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale shape {list(scale.shape)} does not match weight {list(shape)} with blocks {bm}x{bn} (expected {list(want)})")
    return scale.float().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]


def dequantize_blockwise(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 weight + block scales -> floating weight (computed in fp32)."""
    if w.dim() != 2:
        raise ValueError(f"block-scaled fp8 weights must be 2-D, got shape {list(w.shape)}")
    out = w.float() * _expand(scale_inv, tuple(w.shape), block)
    return out.to(dtype)


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Floating weight -> (fp8 e4m3 weight, fp32 scale_inv) with one scale per block."""
    if w.dim() != 2:
        raise ValueError(f"block-scaled fp8 weights must be 2-D, got shape {list(w.shape)}")
    bm, bn = block
    rows, cols = w.shape
    rb, cb = -(-rows // bm), -(-cols // bn)
    x = w.float()
    padded = torch.zeros(rb * bm, cb * bn, dtype=torch.float32)
    padded[:rows, :cols] = x
    blocks = padded.view(rb, bm, cb, bn)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4)
    s = amax / E4M3_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (blocks / s[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(rb * bm, cb * bn)[:rows, :cols].contiguous()
    return q, s.contiguous()
