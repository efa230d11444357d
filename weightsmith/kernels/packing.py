"""Dense little-endian bit packing into int32 words (pure).

Value i of a row occupies bits [b·i, b·i + b) of the row's bit stream; word w holds stream bits
[32w, 32w + 32). For b ∈ {2, 4, 8} this is GPTQ's `q |= v << (b·j)` packing; for b = 3 it is
exactly GPTQ's cross-word 3-bit layout (10 values, a split value, 10 values, a split value, 10
values per 3 words) and compressed-tensors' dense `pack_to_int32`.
"""

from __future__ import annotations

import math

import torch


def pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dim of an integer tensor of codes in [0, 2^bits) into int32 words."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    *lead, length = v.shape
    words = math.ceil(length * bits / 32)
    flat = v.reshape(-1, length)
    out = torch.zeros(flat.shape[0], words + 1, dtype=torch.int64)
    start = torch.arange(length, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    out.scatter_add_(1, word.expand_as(flat), flat << shift)
    spill = shift + bits > 32
    if spill.any():
        out.scatter_add_(1, (word[spill] + 1).expand(flat.shape[0], -1), flat[:, spill] >> (32 - shift[spill]))
    out = out[:, :words] & 0xFFFFFFFF
    out = torch.where(out >= (1 << 31), out - (1 << 32), out).to(torch.int32)
    return out.reshape(*lead, words)


def unpack_dense(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of pack_dense: int32 words -> int32 codes, `length` values per row."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    *lead, words = p.shape
    flat = torch.cat([p.reshape(-1, words), torch.zeros(p.reshape(-1, words).shape[0], 1, dtype=torch.int64)], dim=1)
    start = torch.arange(length, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    lo = flat[:, word] >> shift
    hi = flat[:, word + 1] << (32 - shift)
    vals = (lo | torch.where(shift + bits > 32, hi, torch.zeros_like(hi))) & ((1 << bits) - 1)
    return vals.to(torch.int32).reshape(*lead, length)
