"""The CUDA kernel's *fragment layout*, repacked once at load time; and a CPU emulation of the kernel.

The CUDA kernel (kernels/marlin/quant_gemm.cu) multiplies with `mma.sync.m16n8k16`, whose B operand
(16 k x 8 n) is spread over the 32 lanes of a warp: lane l = 4·r + t holds the four values at
k ∈ {2t, 2t+1, 2t+8, 2t+9} of column n = r, as two registers of two fp16/bf16 values each
(PTX ISA, "Matrix Fragments for mma.m16n8k16"). This layout stores the codes so that each lane
loads, with one vector load per stage, exactly the codes of its fragments and turns each pair into a
register with one shift and one `lop3` (Marlin's trick, generalised to 2/3/4 bits):

- Codes are split into planes of width w (4-bit: [4]; 3-bit: [2, 1] low bits first; 2-bit: [2]),
  so no code straddles a word.
- A plane is int32 [K/64, N/16, 32 lanes, w words]: for each 64-k pipeline stage and each 16-column
  tile (one warp's), lane l owns w consecutive words; word i covers the k range [i·64/w, (i+1)·64/w).
- A word holds F = 32/w fields as H = F/2 *pairs*: pair j is field j (bits w·j) and field j+H
  (bits w·j + 16), so `(word >> w·j) & mask·0x00010001` puts the pair in the two halves of a
  32-bit register; OR-ing 0x6400 (fp16 1024.0; 0x4300 = 128.0 for bf16) into each half makes the
  two codes exact floats (1024 + c) with no int→float conversion.
- Pair j of word i: k16 tile kt = i·(4/w) + j // 4 of the stage, n8 subtile s = (j % 4) // 2,
  k half kh = j % 2; its low field is the code at k = 16·kt + 2t + 8·kh, the high field at k + 1,
  both in column 8·s + r of the tile.

Group scales stay [G, N] in the activation dtype; asymmetric grids add `zeros_scaled` = z·s
(w = c·s − z·s: one fused multiply-add per pair); symmetric grids use the constant zero 2^(b−1).
Requirements: K % 64 == 0, N % 16 == 0, groups contiguous along K of size >= 32 and % 16 == 0
(or per-channel), bits in {2, 3, 4}.

`repack` writes the layout from the field formula above; `unpack` and `emulate_gemm` read it back
following the kernel's own loop (stage, kt, s, kh → word, shift), including the fp16 magic-number
arithmetic, so the CPU tests check the index maths the CUDA code runs.
"""

from __future__ import annotations

import torch

from weightsmith.kernels import layout
from weightsmith.kernels.layout import KernelWeight, decode_gptq, g_idx_reason, to_int32

PLANES = {b: w for b, w in layout.PLANES.items() if b <= 4}  # bits -> plane widths (low bits first): 2/3/4
KB = 64  # k per pipeline stage
NT = 16  # columns per warp tile
NB = 128  # columns per thread block (8 warps)
MAGIC = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0)}


class MarlinWeight(KernelWeight):
    """KernelWeight whose planes are in the fragment layout: int32 [K/64, N/16 * 32 * w] per plane width."""


def check(bits: int, k: int, n: int, group_size: int, g_idx: torch.Tensor | None = None) -> str | None:
    """None if the CUDA kernel can serve this weight, else why not (one line)."""
    if bits not in PLANES:
        return f"{bits}-bit weights (the CUDA kernel does 2/3/4 bits; Triton serves 8)"
    if k % KB or n % NT:
        return f"shape {k}x{n} (the CUDA kernel needs in_features % 64 == 0 and out_features % 16 == 0)"
    gs = k if group_size == -1 else group_size
    if gs < 32 or gs % 16 or k % gs:
        return (
            f"group size {group_size} (the CUDA kernel needs groups of >= 32, a multiple of 16, dividing "
            f"in_features {k})"
        )
    return g_idx_reason(g_idx, k, gs)


def field_coords(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, n) inside a 64 x 16 tile of every field: LongTensors [32 lanes, w words, F fields]."""
    f_per_word = 32 // width
    half = f_per_word // 2
    lane = torch.arange(32)[:, None, None]
    word = torch.arange(width)[None, :, None]
    field = torch.arange(f_per_word)[None, None, :]
    j, high = field % half, field // half
    kt = word * (4 // width) + j // 4
    s, kh = (j % 4) // 2, j % 2
    t, r = lane % 4, lane // 4
    k = 16 * kt + 2 * t + 8 * kh + high
    n = 8 * s + r
    return k.expand(32, width, f_per_word), n.expand(32, width, f_per_word)


def repack_codes(q: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Codes int [N, K] -> planes int32 [K/64, N/16 * 32 * w] in the fragment layout."""
    n, k = q.shape
    q = q.to(torch.int64)
    planes, shift = [], 0
    for width in PLANES[bits]:
        vals = ((q >> shift) & ((1 << width) - 1)).T  # [K, N]
        tiles = vals.reshape(k // KB, KB, n // NT, NT).permute(0, 2, 1, 3)  # [kb, nt, 64, 16]
        kk, nn = field_coords(width)
        fields = tiles[:, :, kk, nn]  # [kb, nt, 32, w, F]
        words = (fields << (width * torch.arange(32 // width))).sum(-1)  # disjoint bit fields
        planes.append(to_int32(words).reshape(k // KB, -1).contiguous())
        shift += width
    return planes


def repack(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    dtype: torch.dtype,
) -> MarlinWeight:
    """From QuantLinear's buffers (GPTQ orientation: qweight [K·b/32, N], qzeros [G, N·b/32], true
    zeros) to the fragment layout. Pure: same inputs, same bytes."""
    k, n = g_idx.shape[0], scales.shape[1]
    why = check(bits, k, n, group_size, g_idx)
    if why:
        raise ValueError(f"cannot repack for the CUDA kernel: {why}")
    q, s, zs, gs = decode_gptq(qweight, qzeros, scales, bits, group_size, sym, dtype, k)
    return MarlinWeight(repack_codes(q, bits), s, zs, bits, gs, k, n)


# ---------------------------------------------------------------------------------------------
# CPU emulation of the kernel's index arithmetic and dequantization


def _pair_words(mw: MarlinWeight, kt: int, s: int, kh: int) -> torch.Tensor:
    """The 32-bit `(lo | hi << 16)` code pair every lane builds for fragment (kt, s, kh), exactly as
    quant_gemm.cu's code_pair: int64 [K/64, N/16, 32]."""
    w0 = PLANES[mw.bits][0]
    p0 = mw.planes[0].to(torch.int64).reshape(mw.k // KB, mw.n // NT, 32, w0) & 0xFFFFFFFF
    i0, j0 = kt * w0 // 4, 4 * (kt % (4 // w0)) + 2 * s + kh
    pair = (p0[..., i0] >> (w0 * j0)) & (((1 << w0) - 1) * 0x00010001)
    if len(mw.planes) > 1:  # 3-bit: the 1-bit plane's single word
        p1 = mw.planes[1].to(torch.int64).reshape(mw.k // KB, mw.n // NT, 32) & 0xFFFFFFFF
        j1 = 4 * kt + 2 * s + kh
        hi = (p1 >> (j1 - 2)) if j1 >= 2 else (p1 << (2 - j1))
        pair = pair | (hi & 0x00040004)
    return pair


def _fragment_coords(kt: int, s: int, kh: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PTX m16n8k16 B fragment: lane l = 4r + t, register kh holds (k = 2t + 8kh, 2t + 8kh + 1) at
    n = r — placed in the 64 x 16 stage tile (k16 tile kt, n8 subtile s). [32] each (low element)."""
    lane = torch.arange(32)
    return 16 * kt + 2 * (lane % 4) + 8 * kh, 8 * s + lane // 4


def unpack(mw: MarlinWeight) -> torch.Tensor:
    """Codes [N, K] read back through the kernel's loop structure."""
    out = torch.full((mw.k // KB, mw.n // NT, KB, NT), -1, dtype=torch.int64)
    for kt in range(KB // 16):
        for s in range(2):
            for kh in range(2):
                pair = _pair_words(mw, kt, s, kh)
                k, n = _fragment_coords(kt, s, kh)
                out[:, :, k, n] = pair & 0xFFFF
                out[:, :, k + 1, n] = pair >> 16
    return out.permute(0, 2, 1, 3).reshape(mw.k, mw.n).T.to(torch.int32).contiguous()


def dequant_fragments(mw: MarlinWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W [K, N] as the kernel's registers hold it: magic-number codes and half2 arithmetic in
    `dtype`, with its rounding (sym: (q − (magic + z))·s, one rounding; asym: fma(q − magic, s, −z·s)).
    """
    bits16, magic_f = MAGIC[dtype]
    g = torch.arange(mw.k) // mw.group_size
    s_full = mw.scales.cpu().to(dtype)[g].reshape(mw.k // KB, KB, mw.n // NT, NT).permute(0, 2, 1, 3)
    zs_full = (
        None
        if mw.sym
        else mw.zeros_scaled.cpu().to(dtype)[g].reshape(mw.k // KB, KB, mw.n // NT, NT).permute(0, 2, 1, 3)
    )
    out = torch.zeros(mw.k // KB, mw.n // NT, KB, NT, dtype=dtype)
    for kt in range(KB // 16):
        for s in range(2):
            for kh in range(2):
                pair = _pair_words(mw, kt, s, kh) | (bits16 * 0x00010001)  # lop3(..., MAGIC)
                k, n = _fragment_coords(kt, s, kh)
                for part, kk in ((pair & 0xFFFF, k), (pair >> 16, k + 1)):
                    q = _bits_as(part, dtype)  # magic + code, exact
                    sc = s_full[:, :, kk, n]
                    if mw.sym:
                        zero = torch.tensor(magic_f + (1 << (mw.bits - 1)), dtype=dtype)
                        w = (q - zero) * sc  # exact subtraction, one rounding
                    else:
                        c = (q - torch.tensor(magic_f, dtype=dtype)).double()
                        w = (c * sc.double() - zs_full[:, :, kk, n].double()).to(dtype)  # fused: one rounding
                    out[:, :, kk, n] = w
    return out.permute(0, 2, 1, 3).reshape(mw.k, mw.n)


def _bits_as(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    v = v.to(torch.int32)
    v = torch.where(v >= 2**15, v - 2**16, v).to(torch.int16)
    return v.view(dtype)


def split_plan(k: int, n: int, sms: int, blocks_per_sm: int, max_splits: int = 32) -> tuple[int, int]:
    """(splits, k-blocks per split) as the CUDA launcher computes them."""
    nblocks, kblocks = -(-n // NB), k // KB
    splits = -(-(sms * blocks_per_sm) // nblocks)
    splits = min(max(1, min(splits, max(1, kblocks // 4))), max_splits)
    per = -(-kblocks // splits)
    return -(-kblocks // per), per


def emulate_gemm(
    x: torch.Tensor, mw: MarlinWeight, bias: torch.Tensor | None = None, *, sms: int = 132, blocks_per_sm: int = 2
) -> torch.Tensor:
    """The kernel's result on the CPU: fragment dequantization in x's dtype, fp32 accumulation per
    split of K (as the grid partitions it), partials summed in split order, bias, rounding to x's dtype."""
    w = dequant_fragments(mw, x.dtype).float()
    splits, per = split_plan(mw.k, mw.n, sms, blocks_per_sm)
    acc = torch.zeros(x.shape[0], mw.n)
    for sp in range(splits):
        k0, k1 = sp * per * KB, min(mw.k, (sp + 1) * per * KB)
        acc += x.float()[:, k0:k1] @ w[k0:k1]
    if bias is not None:
        acc += bias.float()
    return acc.to(x.dtype)
