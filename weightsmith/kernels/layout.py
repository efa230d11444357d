"""The kernels' weight layout, repacked once at load time from the GPTQ-orientation buffers.

Codes are split into bit planes of 1, 2 or 4 bits so that every plane packs a whole number of
codes per 32-bit word and unpacks with one shift and one mask, with no value straddling two
words (GPTQ's 3-bit format straddles). Per plane, words pack `32 / width` consecutive k values
of one output column, **interleaved**: word w of column n holds k = w*P + j at bit position
`width * PERM[j]`, where PERM pairs k and k+P/2 in neighbouring bit fields so that a kernel thread
extracting two adjacent fields gets the two halves of a k-slab at once (the Marlin trick for
filling both halves of an mma fragment). Layout per plane: int32 [K / P, N] (N contiguous:
coalesced loads along N). bits = 4 -> one 4-bit plane; 3 -> a 2-bit plane (low bits) plus a 1-bit
plane (high bit); 2 -> one 2-bit plane; 8 -> one 8-bit plane.

Group data: `scales` [G, N] in the activation dtype and, for asymmetric grids, `zeros_scaled`
[G, N] = z · s (so w = q·s − z·s is one fused multiply-add); symmetric grids have the constant
zero 2^(b−1). Groups must be contiguous in k (g = k // group_size), which weightsmith's
quantizer guarantees; a checkpoint with a permuted g_idx (GPTQ desc_act) is refused with a
clear message rather than silently reordered.

`unpack` re-derives the codes by following exactly the index arithmetic the kernels use; the
tests check it against the original codes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

PLANES = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}  # bits -> plane widths, low bits first


def perm(width: int) -> list[int]:
    """Bit-field slot of the j-th k value inside a word: k and k + P/2 are neighbours."""
    p = 32 // width
    half = p // 2
    out = [0] * p
    for j in range(half):
        out[j] = 2 * j
        out[j + half] = 2 * j + 1
    return out


@dataclass
class KernelWeight:
    planes: list[torch.Tensor]  # int32 [K / (32/width), N] per plane width in PLANES[bits]
    scales: torch.Tensor  # [G, N] activation dtype
    zeros_scaled: torch.Tensor | None  # [G, N] (asymmetric) or None (symmetric: zero = 2^(b-1))
    bits: int
    group_size: int  # in k; = K for per-channel
    k: int
    n: int

    @property
    def sym(self) -> bool:
        return self.zeros_scaled is None

    def to(self, device) -> "KernelWeight":  # same class: subclasses (other plane layouts) keep theirs
        return dataclasses.replace(
            self,
            planes=[p.to(device) for p in self.planes],
            scales=self.scales.to(device),
            zeros_scaled=None if self.zeros_scaled is None else self.zeros_scaled.to(device),
        )

    def nbytes(self) -> int:
        return (
            sum(p.numel() * 4 for p in self.planes)
            + self.scales.numel() * self.scales.element_size()
            + (0 if self.zeros_scaled is None else self.zeros_scaled.numel() * self.zeros_scaled.element_size())
        )


def check_repackable(bits: int, k: int, n: int, g_idx: torch.Tensor, group_size: int) -> str | None:
    """None if the kernels can serve this weight, else why not (one line)."""
    if bits not in PLANES:
        return f"{bits}-bit weights (kernels do 2/3/4/8)"
    if k % 32:
        return f"in_features {k} not a multiple of 32"
    gs = k if group_size == -1 else group_size
    if k % gs or gs % 32:
        return f"group size {group_size} (kernels need groups of a multiple of 32 dividing in_features {k})"
    return g_idx_reason(g_idx, k, gs)


def g_idx_reason(g_idx: torch.Tensor | None, k: int, gs: int) -> str | None:
    """None if the groups are contiguous along k (what every kernel layout assumes), else why not."""
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(k) // gs):
        return (
            "g_idx is not k // group_size (act-order with reordering; re-quantize with weightsmith to get "
            "contiguous groups)"
        )
    return None


def repack_codes(q: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """codes int [N, K] -> planes int32 [K / P, N] in the interleaved layout."""
    n, k = q.shape
    q = q.to(torch.int64)
    planes = []
    shift = 0
    for width in PLANES[bits]:
        p = 32 // width
        vals = (q >> shift) & ((1 << width) - 1)  # [N, K]
        vals = vals.T.reshape(k // p, p, n)  # [words, j, N]
        word = torch.zeros(k // p, n, dtype=torch.int64)
        for j, slot in enumerate(perm(width)):
            word |= vals[:, j, :] << (width * slot)
        planes.append(to_int32(word))
        shift += width
    return planes


def to_int32(x: torch.Tensor) -> torch.Tensor:
    """Low 32 bits of int64 words, as int32 (two's complement)."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def unpack(kw: KernelWeight) -> torch.Tensor:
    """Codes [N, K] following the kernels' index arithmetic: k -> (word, slot, plane shift)."""
    k = torch.arange(kw.k)
    out = torch.zeros(kw.n, kw.k, dtype=torch.int64)
    shift = 0
    for plane, width in zip(kw.planes, PLANES[kw.bits]):
        p = 32 // width
        slots = torch.tensor(perm(width))[k % p]  # what the kernel computes per k
        words = plane.to(torch.int64)[k // p] & 0xFFFFFFFF  # [K, N]
        field = (words >> (width * slots)[:, None]) & ((1 << width) - 1)
        out |= field.T << shift
        shift += width
    return out.to(torch.int32)


def repack(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    dtype: torch.dtype,
) -> KernelWeight:
    """From QuantLinear's buffers (GPTQ orientation, true zeros) to the kernel layout."""
    k, n = g_idx.shape[0], scales.shape[1]
    why = check_repackable(bits, k, n, g_idx, group_size)
    if why:
        raise ValueError(f"cannot repack for the kernels: {why}")
    q, s, zs, gs = decode_gptq(qweight, qzeros, scales, bits, group_size, sym, dtype, k)
    return KernelWeight(repack_codes(q, bits), s, zs, bits, gs, k, n)


def decode_gptq(qweight, qzeros, scales, bits: int, group_size: int, sym: bool, dtype: torch.dtype, k: int):
    """QuantLinear's buffers (GPTQ orientation, true zeros) -> (codes int [N, K], scales [G, N] in
    dtype, zeros·scales [G, N] or None when every zero is the symmetric 2^(b-1), group size in k):
    what every kernel layout is repacked from."""
    from weightsmith.kernels.packing import unpack_dense

    n = scales.shape[1]
    q = unpack_dense(qweight.T.contiguous().cpu(), bits, k)  # [N, K]
    z = unpack_dense(qzeros.cpu(), bits, n)  # [G, N]
    zs = None
    if not (sym and bool((z == (1 << (bits - 1))).all())):
        zs = (z.float() * scales.cpu().float()).to(dtype)
    return q, scales.cpu().to(dtype).contiguous(), zs, k if group_size == -1 else group_size


def dequantize(kw: KernelWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W^T [K, N] from the kernel layout (the reference for kernel tests)."""
    q = unpack(kw).T.float()  # [K, N]
    g = torch.arange(kw.k) // kw.group_size
    s = kw.scales.float().cpu()[g]
    if kw.zeros_scaled is None:
        w = (q - (1 << (kw.bits - 1))) * s
    else:
        w = q * s - kw.zeros_scaled.float().cpu()[g]
    return w.to(dtype)
