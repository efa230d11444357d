"""Closed-form repair of a consuming projection after some of its input channels are removed.

A projection y = W x (W [out, n], no bias) loses the input channels R and keeps K (MLP neurons
feeding down_proj, attention heads feeding o_proj). With the calibration Gram G = Σ x xᵀ of its
input (measured in the pruned model, so earlier repairs are seen), the kept columns that best
reproduce the full output in least squares are

    W'_K = W_K + W_R G_RK (G_KK + λ I)⁻¹                         (per-block least squares)

The removed channels' contribution W_R x_R is replaced by its best linear prediction from the kept
channels. The uncentred Gram carries the channel means, so the mean contribution that FLAP moves
into a bias (b = W_R E[x_R]) is absorbed as far as any bias-free correction can absorb it: the
architectures here have no bias on down_proj / o_proj. An OBS-style update removing the set R at
once (SlimGPT, per output row: δW = -W_R [H⁻¹_RR]⁻¹ H⁻¹_R· with H = G) is the same minimiser, so
it gives the same weights (pinned in the tests); they differ only in how channels are chosen.
λ is a small ridge (a fraction of the mean diagonal) for the rank-deficient Grams of short
calibration sets. Nothing removed: W'_K = W exactly.
"""

from __future__ import annotations

import torch


def refit_columns(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 1e-3) -> torch.Tensor:
    """Least-squares kept columns [out, |K|] of `w` [out, n] given the input Gram [n, n]."""
    n = w.shape[1]
    if gram.shape != (n, n):
        raise ValueError(f"Gram {tuple(gram.shape)} does not match the {n} input channels of the weight")
    keep = keep.to(torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    removed = mask.nonzero().flatten()
    w64 = w.double()
    out = w64[:, keep].clone()
    if removed.numel() == 0:
        return out.to(w.dtype)
    g = gram.double()
    g_kk = g[keep][:, keep]
    lam = damp * float(torch.diagonal(g_kk).mean().clamp_min(1e-12))
    g_kk = g_kk + lam * torch.eye(keep.numel(), dtype=g.dtype)
    g_rk = g[removed][:, keep]
    rhs = w64[:, removed] @ g_rk  # [out, |K|]
    chol, info = torch.linalg.cholesky_ex(g_kk)
    if int(info) == 0:
        corr = torch.cholesky_solve(rhs.T, chol).T
    else:  # indefinite after damping (tiny or degenerate calibration): least-norm solution
        corr = torch.linalg.lstsq(g_kk, rhs.T).solution.T
    return (out + corr).to(w.dtype)


def obs_update(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 1e-3) -> torch.Tensor:
    """The OBS form of the same repair: remove the columns R jointly with δW = -W_R [H⁻¹_RR]⁻¹ H⁻¹_R·
    (H = G + λI over all channels); returns the kept columns. Equal to `refit_columns` up to where
    the ridge is applied; kept for the comparison and as a check of the algebra."""
    n = w.shape[1]
    keep = keep.to(torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    removed = mask.nonzero().flatten()
    w64 = w.double()
    if removed.numel() == 0:
        return w64[:, keep].to(w.dtype)
    g = gram.double()
    lam = damp * float(torch.diagonal(g).mean().clamp_min(1e-12))
    hinv = torch.linalg.inv(g + lam * torch.eye(n, dtype=g.dtype))
    delta = -w64[:, removed] @ torch.linalg.solve(hinv[removed][:, removed], hinv[removed])
    return (w64 + delta)[:, keep].to(w.dtype)


def output_error(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, w_kept: torch.Tensor) -> float:
    """Σ over calibration rows of ‖W x - W'_K x_K‖²  =  tr(D G Dᵀ), D = W - scatter(W'_K)."""
    d = w.double().clone()
    d[:, keep.to(torch.long)] -= w_kept.double()
    return float(((d @ gram.double()) * d).sum())


def scatter_columns(w_kept: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """[out, |K|] -> [out, n] with zeros in the removed columns (simulates the pruned layer in place)."""
    out = torch.zeros(w_kept.shape[0], n, dtype=w_kept.dtype)
    out[:, keep.to(torch.long)] = w_kept
    return out


def mean_bias(w: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation for comparison: b = W_R E[x_R] (needs a bias the families here lack)."""
    n = w.shape[1]
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep.to(torch.long)] = False
    return w.double()[:, mask] @ mean.double()[mask]


def refit_to_target(gram_kk: torch.Tensor, cross: torch.Tensor, damp: float = 1e-3) -> torch.Tensor:
    """Kept columns [out, |K|] that best map the pruned model's kept inputs to a target output:
    min Σ ‖y - W'_K x_K‖²  ⇒  W'_K = B (G_KK + λI)⁻¹ with B = Σ y x_Kᵀ [out, |K|], G_KK = Σ x_K x_Kᵀ.
    With y the *source* model's output of the projection (and x from the pruned model), this also
    corrects the drift that earlier pruned layers put into x."""
    g = gram_kk.double()
    lam = damp * float(torch.diagonal(g).mean().clamp_min(1e-12))
    g = g + lam * torch.eye(g.shape[0], dtype=g.dtype)
    chol, info = torch.linalg.cholesky_ex(g)
    b = cross.double()
    sol = torch.cholesky_solve(b.T, chol).T if int(info) == 0 else torch.linalg.lstsq(g, b.T).solution.T
    return sol.to(cross.dtype)


def target_error(y_sq: float, cross: torch.Tensor, gram_kk: torch.Tensor, w_kept: torch.Tensor) -> float:
    """Σ ‖y - W'_K x_K‖² = Σ‖y‖² - 2 tr(W'_K Bᵀ) + tr(W'_K G_KK W'_Kᵀ)."""
    w = w_kept.double()
    return float(y_sq - 2 * (w * cross.double()).sum() + ((w @ gram_kk.double()) * w).sum())
