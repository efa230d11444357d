"""The shared latent: BKV-PCA (TransMLA) and joint / split SVD (MHA2MLA).

Input: the RoPE-free key rows and the value rows of one layer, augmented with their bias column
([W | b], so rows act on [x; 1]), and the second moment C = E[[x;1][x;1]ᵀ] of the attention input.
Output: an orthonormal basis B (rows of y = [k_nope/ratio; v] → r latent channels) and the mean μ
of y, so y ≈ B·c + μ with c = Bᵀ(y − μ) (centered; μ is carried by a constant latent channel) or
y ≈ B·c with c = Bᵀy (uncentered, when no bias is available).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Latent:
    basis: torch.Tensor  # [rows of y, r]
    mean: torch.Tensor  # [rows of y] (zeros when uncentered)
    ratio: float  # key rows were divided by this before the PCA (BKV balance)
    error: float  # relative second-moment error of the reconstruction ‖y − ŷ‖² / ‖y‖² (on C)
    key_error: float
    value_error: float
    encoder: torch.Tensor | None = None  # [r, rows of y]: c = encoder·(y − μ); None = basisᵀ (orthonormal PCA)

    @property
    def encode(self) -> torch.Tensor:
        return self.basis.T if self.encoder is None else self.encoder


def second_moment(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return W @ C @ W.T


def kv_balance(nope_k: torch.Tensor, v: torch.Tensor, C: torch.Tensor, multiplier: float = 1.0) -> float:
    """TransMLA's K/V norm balance: RMS norm of key outputs over that of value outputs (× multiplier)."""
    if nope_k.shape[0] == 0:
        return 1.0
    ke = second_moment(nope_k, C).trace() / nope_k.shape[0]
    ve = second_moment(v, C).trace() / v.shape[0]
    if ve <= 0 or ke <= 0:
        return 1.0
    return float((ke / ve).sqrt()) / multiplier


def _top(S: torch.Tensor, r: int) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(S)
    order = torch.argsort(evals, descending=True)[:r]
    B = evecs[:, order]
    # deterministic sign: largest-magnitude entry of each column positive
    idx = B.abs().argmax(0)
    sign = torch.sign(B[idx, torch.arange(B.shape[1])])
    sign[sign == 0] = 1
    return B * sign


def _errors(
    Y: torch.Tensor, C: torch.Tensor, B: torch.Tensor, mean: torch.Tensor, nk: int
) -> tuple[float, float, float]:
    # residual y − (B Bᵀ (y − μ) + μ) = (I − B Bᵀ)(y − μ); its second moment uses the centered C
    P = torch.eye(Y.shape[0], dtype=Y.dtype) - B @ B.T
    S = second_moment(Y, C) - torch.outer(mean, mean)
    R = P @ S @ P.T
    tot = second_moment(Y, C).diagonal()
    res = R.diagonal()

    def rel(sl):
        t = float(tot[sl].sum())
        return float(res[sl].sum()) / t if t > 0 else 0.0

    return rel(slice(None)), rel(slice(0, nk)), rel(slice(nk, None))


def pca_latent(
    nope_k: torch.Tensor,
    v: torch.Tensor,
    C: torch.Tensor,
    rank: int,
    *,
    centered: bool,
    balance: float = 1.0,
    split: bool = False,
) -> Latent:
    """BKV-PCA: PCA of [k_nope/ratio; v] under the data's second moment, top `rank` components.

    split=True: separate PCAs of keys and values (rank split in proportion to their row counts).
    """
    ratio = kv_balance(nope_k, v, C, balance)
    Y = torch.cat([nope_k / ratio, v])
    mean = Y @ C[-1] if centered else torch.zeros(Y.shape[0], dtype=Y.dtype)
    S = second_moment(Y, C) - (torch.outer(mean, mean) if centered else 0)
    nk = nope_k.shape[0]
    if rank > Y.shape[0]:
        raise ValueError(f"rank {rank} exceeds the {Y.shape[0]} rows the latent can hold")
    if split and nk:
        rk = min(nk, max(1, round(rank * nk / Y.shape[0])))
        rv = rank - rk
        B = torch.zeros(Y.shape[0], rank, dtype=Y.dtype)
        B[:nk, :rk] = _top(S[:nk, :nk], rk)
        B[nk:, rk:] = _top(S[nk:, nk:], rv)
    else:
        B = _top(S, rank)
    e, ek, ev = _errors(Y, C, B, mean, nk)
    return Latent(B, mean, ratio, e, ek, ev)


def _sqrtm(M: torch.Tensor, damp: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    M = (M + M.T) / 2
    M = M + damp * M.diagonal().mean().clamp_min(1e-30) * torch.eye(M.shape[0], dtype=M.dtype)
    ev, U = torch.linalg.eigh(M)
    ev = ev.clamp_min(ev.max() * 1e-12)
    return (U * ev.sqrt()) @ U.T, (U * ev.rsqrt()) @ U.T


def weighted_pca_latent(
    nope_k: torch.Tensor, v: torch.Tensor, C: torch.Tensor, rank: int, metric: torch.Tensor, *, centered: bool
) -> Latent:
    """PCA under a metric: minimise E[(y − ŷ)ᵀ M (y − ŷ)] instead of ‖y − ŷ‖² (M: what an error in
    each key/value direction costs downstream — query-weighted for keys, o_proj-weighted for values).

    Whitened problem: y' = M^½ y, top-r PCA basis B' of y'; encoder B'ᵀM^½, decoder M^-½B'."""
    Y = torch.cat([nope_k, v])
    if rank > Y.shape[0]:
        raise ValueError(f"rank {rank} exceeds the {Y.shape[0]} rows the latent can hold")
    mean = Y @ C[-1] if centered else torch.zeros(Y.shape[0], dtype=Y.dtype)
    S = second_moment(Y, C) - (torch.outer(mean, mean) if centered else 0)
    Mh, Mih = _sqrtm(metric)
    Bp = _top(Mh @ S @ Mh, rank)
    dec, enc = Mih @ Bp, Bp.T @ Mh
    nk = nope_k.shape[0]
    # reported errors in plain (unweighted) terms, like the other latents
    P = torch.eye(Y.shape[0], dtype=Y.dtype) - dec @ enc
    R = P @ S @ P.T
    tot = second_moment(Y, C).diagonal()

    def rel(sl):
        t = float(tot[sl].sum())
        return float(R.diagonal()[sl].sum()) / t if t > 0 else 0.0

    return Latent(dec, mean, 1.0, rel(slice(None)), rel(slice(0, nk)), rel(slice(nk, None)), encoder=enc)


def svd_latent(nope_k: torch.Tensor, v: torch.Tensor, rank: int, *, split: bool = False) -> Latent:
    """MHA2MLA's weight-only SVD of [W_k_nope; W_v] (biases excluded: they ride on the constant
    channel), joint or split. Same result shape as `pca_latent` with C = identity on the weights."""
    H = nope_k.shape[1] - 1
    C = torch.zeros(H + 1, H + 1, dtype=nope_k.dtype)
    C[:H, :H] = torch.eye(H, dtype=nope_k.dtype)
    lat = pca_latent(nope_k, v, C, rank, centered=False, balance=1.0, split=split)
    # the weight-only PCA above sees no bias; carry the biases as the mean (constant channel)
    Y = torch.cat([nope_k / lat.ratio, v])
    lat.mean = Y[:, -1].clone()
    return lat
