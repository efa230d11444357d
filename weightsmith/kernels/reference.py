"""Reference low-bit GEMM in plain PyTorch: dequantize, then matmul. The CPU path and the oracle.

Weights are in GPTQ orientation with true ("v2") zero points: `qweight` int32 [⌈K·b/32⌉, N]
(codes packed along K), `qzeros` int32 [G, ⌈N·b/32⌉] (zero points packed along N), `scales`
[G, N], `g_idx` int32 [K]. W[n, k] = scales[g, n] · (q[n, k] − z[g, n]) with g = g_idx[k].
"""

from __future__ import annotations

import torch

from weightsmith.kernels.packing import unpack_dense


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    k = g_idx.shape[0]
    n = scales.shape[1]
    q = unpack_dense(qweight.T.contiguous(), bits, k).to(scales.device)  # [N, K]
    z = unpack_dense(qzeros, bits, n).to(scales.device)  # [G, N]
    gi = g_idx.long()
    w = scales.float()[gi].T * (q.float() - z.float()[gi].T)
    return w.to(dtype or scales.dtype)
