"""torch.library ops for the low-bit GEMM, with fake (meta) implementations so that they trace
under torch.compile / FakeTensor, and one op per implementation so the dispatcher's choice is
visible in profiles:

- weightsmith::gemm_cuda    Marlin-style CUDA kernel, fragment layout (kernels/marlin_layout.py),
                            bias fused;
- weightsmith::gemm_triton  Triton kernel, bit-plane layout (kernels/layout.py);
- weightsmith::gemm_ref     plain PyTorch over the bit-plane layout (the oracle)."""

from __future__ import annotations

from typing import Optional

import torch

from weightsmith.kernels import layout, marlin_layout


def _kw(p0, p1, scales, zs, bits, group_size, k, n) -> layout.KernelWeight:
    return layout.KernelWeight([p0] + ([p1] if p1 is not None else []), scales, zs, bits, group_size, k, n)


@torch.library.custom_op("weightsmith::gemm_ref", mutates_args=())
def gemm_ref(
    x: torch.Tensor,
    p0: torch.Tensor,
    p1: Optional[torch.Tensor],
    scales: torch.Tensor,
    zeros_scaled: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    n: int,
) -> torch.Tensor:
    kw = _kw(p0, p1, scales, zeros_scaled, bits, group_size, x.shape[-1], n)
    return (x.float() @ layout.dequantize(kw).to(x.device)).to(x.dtype)


@torch.library.custom_op("weightsmith::gemm_triton", mutates_args=())
def gemm_triton(
    x: torch.Tensor,
    p0: torch.Tensor,
    p1: Optional[torch.Tensor],
    scales: torch.Tensor,
    zeros_scaled: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    n: int,
) -> torch.Tensor:
    from weightsmith.kernels.triton_kernel import quant_matmul

    return quant_matmul(x, _kw(p0, p1, scales, zeros_scaled, bits, group_size, x.shape[-1], n))


@torch.library.custom_op("weightsmith::gemm_cuda", mutates_args=())
def gemm_cuda(
    x: torch.Tensor,
    p0: torch.Tensor,
    p1: Optional[torch.Tensor],
    scales: torch.Tensor,
    zeros_scaled: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    n: int,
) -> torch.Tensor:
    from weightsmith.kernels import cuda_ext

    planes = [p0] + ([p1] if p1 is not None else [])
    return cuda_ext.quant_gemm(x.contiguous(), planes, scales, zeros_scaled, bias, bits, group_size, n)


def _fake(x, p0, p1, scales, zeros_scaled, bits, group_size, n):
    torch._check(x.dim() == 2 and x.shape[-1] % 32 == 0)
    return x.new_empty((x.shape[0], n))


def _fake_cuda(x, p0, p1, scales, zeros_scaled, bias, bits, group_size, n):
    torch._check(x.dim() == 2 and x.shape[-1] % marlin_layout.KB == 0)
    torch._check(n % marlin_layout.NT == 0)
    return x.new_empty((x.shape[0], n))


gemm_ref.register_fake(_fake)
gemm_triton.register_fake(_fake)
gemm_cuda.register_fake(_fake_cuda)


def call(op, x2d: torch.Tensor, kw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Run an op on a repacked weight (KernelWeight for ref/triton, MarlinWeight for cuda)."""
    p1 = kw.planes[1] if len(kw.planes) > 1 else None
    if op is gemm_cuda:
        return op(x2d, kw.planes[0], p1, kw.scales, kw.zeros_scaled, bias, kw.bits, kw.group_size, kw.n)
    y = op(x2d, kw.planes[0], p1, kw.scales, kw.zeros_scaled, kw.bits, kw.group_size, kw.n)
    return y if bias is None else y + bias.to(y.dtype)
