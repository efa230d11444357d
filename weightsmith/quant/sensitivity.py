"""How much a linear's output suffers at each bit width (pure maths: W, H in; errors out).

The error of quantizing W to Q on the calibration inputs X is ‖X(W−Q)ᵀ‖² = tr((W−Q)·H·(W−Q)ᵀ) with
H = XᵀX, the Hessian GPTQ collects anyway; the pass uses it relative to the output's energy
‖XWᵀ‖² = tr(W·H·Wᵀ) (absolute errors follow the activations' scale, which differs by orders of
magnitude between modules). Here Q is round-to-nearest on the same grid the pass
would use (group size, symmetry; with `mse`, the clipping search weighted by sqrt(diag H) that GPTQ
uses, on a coarser 20-step grid to keep the sweep cheap). RTN needs no further forward passes;
GPTQ's own error is lower by a module-dependent factor, which this estimate ignores.

The errors of different linears are in different units (a q_proj's output feeds a softmax, an
o_proj's is added to the residual stream), so the pass can instead measure each unit's effect where
they all meet: the decoder layer's output with only that unit rounded (`--sensitivity layer`, one
layer forward per unit and width).
"""

from __future__ import annotations

import torch

from weightsmith.quant.grid import GridSpec, dequantize, find_params, group_index, quantize

MSE_GRID = 20  # shrink steps of the sensitivity's clipping search (the quantizer itself uses 100)


def rtn_output_error(
    w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool, *, relative: bool = False
) -> float:
    """tr((W−Q)H(W−Q)ᵀ) for Q = RTN(W) at `bits` (W [N, K] fp32, H [K, K]); with `relative`, divided
    by the output's energy tr(WHWᵀ)."""
    w = w.float()
    d = w - rtn_weight(w, h, bits, group_size, sym, mse)
    hf = h.float()
    err = float(((d @ hf) * d).double().sum())
    if not relative:
        return err
    return err / max(float(((w @ hf) * w).double().sum()), 1e-30)


def rtn_weight(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool) -> torch.Tensor:
    """The dequantized RTN weight Q at `bits` on the pass's grid (H only weighs `mse`'s clipping search)."""
    w = w.float()
    n, k = w.shape
    spec = GridSpec(bits, sym, mse)
    imp = torch.diag(h).float().clamp_min(0).sqrt() if mse else None
    g = k if group_size in (-1, 0) else group_size
    g_idx = group_index(k, group_size)
    q = torch.empty_like(w)
    for gi in range(int(g_idx.max()) + 1):
        cols = slice(gi * g, min((gi + 1) * g, k))
        kw = {"importance": imp[cols], "grid": MSE_GRID} if mse else {}
        s, z = find_params(w[:, cols], spec, **kw)
        q[:, cols] = dequantize(quantize(w[:, cols], s[:, None], z[:, None], spec.maxq), s[:, None], z[:, None])
    return q
