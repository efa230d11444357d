"""GPTQ (Frantar et al., 2022) as a pure function: W, H, spec -> codes, scales, zeros, g_idx.

Columns are quantized one at a time and the error of each is spread over the columns not yet
quantized through the inverse Hessian (Cholesky form), in blocks of `block_size` with lazy batch
updates, in fp32. Activation order never needs an inference-time permutation here:

- `none`   natural column order, group parameters fitted when a group starts;
- `static` columns by descending Hessian diagonal, all group parameters fitted up front on the
  original weights (llm-compressor's "static" / GPTQ's static_groups);
- `group`  groups by descending total Hessian diagonal, columns by descending diagonal inside each
  group, parameters fitted when a group starts (GPTQModel's group-aware act order).

In all three, g_idx = column // group_size, so servers read groups contiguously (desc_act false).
With `grid.mse`, each group's clipping search weighs its columns by sqrt(diag H) (grid.find_params).
Dampening starts at `damp · mean(diag H)` and grows until Cholesky succeeds; the value used is
returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from weightsmith.quant.grid import (
    GridSpec,
    dequantize,
    find_params,
    group_index,
    quantize,
)

ACT_ORDERS = ("none", "static", "group")
# dampening (fraction of mean diag H), the one default for the pass and this function; measured on
# SmolLM2 (docs/quantization.md): 0.05 generalises better to held-out text than the reference 0.01
DEFAULT_DAMP = 0.05
DAMP_STEP = 0.01  # added until Cholesky succeeds (GPTQModel's damp_auto_increment)


@dataclass(frozen=True)
class GPTQSpec:
    grid: GridSpec
    group_size: int = 128  # -1: one group per row (per-channel)
    act_order: str = "static"
    block_size: int = 128
    damp: float = DEFAULT_DAMP
    damp_step: float = DAMP_STEP
    damp_max: float = 1.0


@dataclass
class GPTQResult:
    q: torch.Tensor  # int32 [N, K] codes, natural column order
    scales: torch.Tensor  # fp32 [G, N]
    zeros: torch.Tensor  # int32 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    damp: float  # dampening actually used (fraction of mean diag H)
    dead_columns: int  # inputs that were always zero in calibration


def _inverse_cholesky(h: torch.Tensor, spec: GPTQSpec) -> tuple[torch.Tensor, float]:
    mean_diag = float(torch.mean(torch.diag(h)))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    damp = spec.damp
    while True:
        l, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(l), upper=True)
            if int(info) == 0 and torch.isfinite(u).all():
                return u, damp
        damp = round(damp + spec.damp_step, 6)
        if damp > spec.damp_max:
            raise ValueError(
                f"Hessian is not positive definite even with dampening {spec.damp_max}; calibration data may be "
                "degenerate"
            )


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: GPTQSpec) -> GPTQResult:
    if spec.act_order not in ACT_ORDERS:
        raise ValueError(f"act_order {spec.act_order!r}: choose one of {', '.join(ACT_ORDERS)}")
    n, k = w.shape
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    maxq = spec.grid.maxq
    g = k if spec.group_size in (-1, 0) else spec.group_size
    g_idx = group_index(k, spec.group_size)
    n_groups = math.ceil(k / g)
    scales = torch.zeros(n_groups, n)
    zeros = torch.zeros(n_groups, n)
    fitted = torch.zeros(n_groups, dtype=torch.bool)
    diag = torch.diag(h)

    importance = diag.clamp_min(0).sqrt()  # column weights of the `mse` clipping search

    if spec.act_order == "static":
        for gi in range(n_groups):
            cols = slice(gi * g, (gi + 1) * g)
            scales[gi], zeros[gi] = find_params(w[:, cols], spec.grid, importance=importance[cols])
        fitted[:] = True
    if spec.act_order == "none":
        perm = torch.arange(k)
    elif spec.act_order == "static":
        perm = torch.argsort(diag, descending=True, stable=True)
    else:  # group: contiguous groups, most important first
        group_weight = torch.zeros(n_groups).index_add_(0, g_idx.long(), diag)
        order = torch.argsort(group_weight, descending=True, stable=True)
        perm = torch.cat(
            [gi * g + torch.argsort(diag[gi * g : (gi + 1) * g], descending=True, stable=True) for gi in order.tolist()]
        )
    w = w[:, perm]
    h = h[perm][:, perm]
    gp = g_idx[perm]
    importance = importance[perm]
    hinv, damp_used = _inverse_cholesky(h, spec)

    q_out = torch.zeros(n, k, dtype=torch.int32)
    for i1 in range(0, k, spec.block_size):
        i2 = min(i1 + spec.block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(gp[col])
            if not fitted[gi]:
                # the group's columns are contiguous in this order and start here
                span = int((gp[col:] == gi).sum()) if spec.act_order == "group" else min(g, k - col)
                cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :span]
                scales[gi], zeros[gi] = find_params(cur, spec.grid, importance=importance[col : col + span])
                fitted[gi] = True
            s, z = scales[gi], zeros[gi]
            wc = w1[:, i]
            qc = quantize(wc, s, z, maxq)
            dq = dequantize(qc, s, z)
            q_out[:, col] = qc.to(torch.int32)
            e = (wc - dq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    return GPTQResult(
        q=q_out[:, inv].contiguous(),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        damp=damp_used,
        dead_columns=int(dead.sum()),
    )


def gptq_fp_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """GPTAQ's asymmetric target: the weight W' whose output on the quantized model's inputs X best
    matches the full-precision output X̃·Wᵀ, W' = W + W·(X̃ − X)ᵀX·H⁻¹ (H = XᵀX dampened like GPTQ's;
    cross = X̃ᵀX). GPTQ of W' under H then minimises ‖X·Ŵᵀ − X̃·Wᵀ‖² up to a constant; with
    X̃ = X, W' = W exactly."""
    hd = h.double() + damp * float(torch.diag(h).mean()) * torch.eye(h.shape[0], dtype=torch.float64)
    delta = cross.double() - h.double()
    return (w.double() + torch.linalg.solve(hd, delta.T @ w.double().T).T).float()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: ‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖², computed from H = XᵀX."""
    d = w.float() - w_hat.float()
    num = torch.einsum("nk,kl,nl->", d, h.float(), d)
    den = torch.einsum("nk,kl,nl->", w.float(), h.float(), w.float())
    return float(num / den) if float(den) > 0 else 0.0
