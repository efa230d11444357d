"""Triton low-bit GEMM over the kernel layout (weightsmith/kernels/layout.py): the portable path.

Y[M, N] = X[M, K] · W[K, N], W dequantized in registers from 1/2/4/8-bit planes with one shift and
one mask per plane (no lookup tables), group scales (and scaled zeros) fetched per k-row of the
tile, fp32 accumulation with tl.dot. The same code runs on GPUs and, with TRITON_INTERPRET=1, on
the CPU (that is how CI tests it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from weightsmith.kernels.layout import PLANES, KernelWeight


@triton.jit
def _plane_codes(plane_ptr, offs_k, offs_n, n, mask_n, WIDTH: tl.constexpr):
    P: tl.constexpr = 32 // WIDTH
    HALF: tl.constexpr = P // 2
    j = offs_k % P
    slot = 2 * (j % HALF) + j // HALF  # layout.perm: k and k + P/2 are neighbours in a word
    words = tl.load(plane_ptr + (offs_k // P)[:, None] * n + offs_n[None, :], mask=mask_n[None, :], other=0)
    return (words >> (WIDTH * slot)[:, None]) & ((1 << WIDTH) - 1)


@triton.jit
def _quant_matmul_kernel(
    x_ptr,
    p0_ptr,
    p1_ptr,
    s_ptr,
    zs_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    group_size,
    BITS: tl.constexpr,
    W0: tl.constexpr,
    W1: tl.constexpr,
    SYM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        q = _plane_codes(p0_ptr, offs_k, offs_n, N, mask_n, W0)
        if W1 > 0:
            q = q | (_plane_codes(p1_ptr, offs_k, offs_n, N, mask_n, W1) << W0)
        g = offs_k // group_size
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
        if SYM:
            w = (q - (1 << (BITS - 1))).to(tl.float32) * s
        else:
            zs = tl.load(zs_ptr + g[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
            w = q.to(tl.float32) * s - zs
        acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def quant_matmul(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] through the Triton kernel."""
    shape = x.shape
    x2 = x.reshape(-1, kw.k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, kw.n, dtype=x.dtype, device=x.device)
    widths = PLANES[kw.bits]
    p1 = kw.planes[1] if len(kw.planes) > 1 else kw.planes[0]
    zs = kw.zeros_scaled if kw.zeros_scaled is not None else kw.scales
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64
    block_k = 64 if kw.k % 64 == 0 and kw.group_size % 64 == 0 else 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(kw.n, block_n))
    _quant_matmul_kernel[grid](
        x2,
        kw.planes[0],
        p1,
        kw.scales,
        zs,
        y,
        m,
        kw.n,
        kw.k,
        x2.stride(0),
        y.stride(0),
        kw.group_size,
        BITS=kw.bits,
        W0=widths[0],
        W1=widths[1] if len(widths) > 1 else 0,
        SYM=kw.zeros_scaled is None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    if bias is not None:
        y += bias
    return y.reshape(*shape[:-1], kw.n)
