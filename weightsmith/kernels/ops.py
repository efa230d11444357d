"""torch.library ops for the low-bit GEMM, with fake (meta) implementations so that they trace
under torch.compile / FakeTensor, and one op per implementation so the dispatcher's choice is
visible in profiles: weightsmith::gemm_cuda, weightsmith::gemm_triton, weightsmith::gemm_ref.
All take the kernel layout's tensors (kernels/layout.py)."""

from __future__ import annotations

from typing import Optional

import torch

from weightsmith.kernels import layout


def _kw(p0, p1, scales, zs, bits, group_size, k, n) -> layout.KernelWeight:
    return layout.KernelWeight([p0] + ([p1] if p1 is not None else []), scales, zs, bits, group_size, k, n)


@torch.library.custom_op("weightsmith::gemm_ref", mutates_args=())
def gemm_ref(x: torch.Tensor, p0: torch.Tensor, p1: Optional[torch.Tensor], scales: torch.Tensor, zeros_scaled: Optional[torch.Tensor],
             bits: int, group_size: int, n: int) -> torch.Tensor:
    kw = _kw(p0, p1, scales, zeros_scaled, bits, group_size, x.shape[-1], n)
    return (x.float() @ layout.dequantize(kw).to(x.device)).to(x.dtype)


@torch.library.custom_op("weightsmith::gemm_triton", mutates_args=())
def gemm_triton(x: torch.Tensor, p0: torch.Tensor, p1: Optional[torch.Tensor], scales: torch.Tensor, zeros_scaled: Optional[torch.Tensor],
                bits: int, group_size: int, n: int) -> torch.Tensor:
    from weightsmith.kernels.triton_kernel import quant_matmul

    return quant_matmul(x, _kw(p0, p1, scales, zeros_scaled, bits, group_size, x.shape[-1], n))


@torch.library.custom_op("weightsmith::gemm_cuda", mutates_args=())
def gemm_cuda(x: torch.Tensor, p0: torch.Tensor, p1: Optional[torch.Tensor], scales: torch.Tensor, zeros_scaled: Optional[torch.Tensor],
              bits: int, group_size: int, n: int) -> torch.Tensor:
    from weightsmith.kernels import cuda_ext

    planes = [p0] + ([p1] if p1 is not None else [])
    return cuda_ext.quant_gemm(x.contiguous(), planes, scales, zeros_scaled, None, bits, group_size, n)


def _fake(x, p0, p1, scales, zeros_scaled, bits, group_size, n):
    torch._check(x.shape[-1] % 32 == 0)
    return x.new_empty((x.shape[0], n))


for _op in (gemm_ref, gemm_triton, gemm_cuda):
    _op.register_fake(_fake)


def call(op, x2d: torch.Tensor, kw: layout.KernelWeight) -> torch.Tensor:
    p1 = kw.planes[1] if len(kw.planes) > 1 else None
    return op(x2d, kw.planes[0], p1, kw.scales, kw.zeros_scaled, kw.bits, kw.group_size, kw.n)
