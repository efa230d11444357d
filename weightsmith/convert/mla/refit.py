"""Closed-form least-squares refit of the value up-projection (kv_b_proj's v rows) after the latent
and the keys are fixed.

The MLA layer's head-h output before o_proj is Σ_n a'_hn·W_UVʰ·ĉ_n = W_UVʰ·z_h with z_h = Σ_n a'_hn ĉ_n
(a' = the converted layer's own attention weights, ĉ = the normalised latent, constant channel
included): linear in W_UVʰ. Fitting it to the source head's output Σ_n a_hn v_hn on calibration
windows compensates, besides the latent's value error, part of what the keys' approximation did to
the attention weights. Any error metric on the head output (such as o_proj's W_Oʰᵀ W_Oʰ) has the same
minimiser, so the fit is per head and unweighted. Ridge towards the PCA decoder (relative strength
`ridge` of the mean diagonal of zᵀz) keeps the few calibration tokens from being overfitted.
"""

from __future__ import annotations

import torch

from weightsmith.convert.mla.latent import rms_norm
from weightsmith.convert.mla.layer import MlaLayer, SourceAttention
from weightsmith.convert.mla.simulate import _causal_softmax, gqa_head_outputs


def _mla_features(x: torch.Tensor, L: MlaLayer, n_h: int, eps: float) -> torch.Tensor:
    """[B, n_h, T, r] z_h = Σ_n a'_hn ĉ_n: the converted layer's attention weights applied to its latents."""
    B, T, _ = x.shape
    t = L.tensors
    if "q" in t:
        q = x @ t["q"].T
    else:
        q = rms_norm(x @ t["q_a"].T + t["q_a_bias"], t["q_a_norm"], eps) @ t["q_b"].T
    q = q.view(B, T, n_h, L.d_n + L.d_r).transpose(1, 2)
    q_nope, q_rot = q[..., : L.d_n], q[..., L.d_n :]
    kv = x @ t["kv_a"].T + t.get("kv_a_bias", 0)
    c, k_rot = kv[..., : L.rank], kv[..., L.rank :]
    c = rms_norm(c, t["kv_a_norm"], eps)
    kvb = (c @ t["kv_b"].T).view(B, T, n_h, -1).transpose(1, 2)
    k_nope = kvb[..., : L.d_n]
    ang = torch.arange(T, dtype=x.dtype)[:, None] * L.rope_freq.to(x.dtype)[None]
    cos, sin = ang.cos(), ang.sin()

    def rot(z):
        z1, z2 = z[..., 0::2], z[..., 1::2]
        return torch.stack([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1).flatten(-2)

    scores = (q_nope @ k_nope.transpose(-1, -2) + rot(q_rot) @ rot(k_rot[:, None]).transpose(-1, -2)) / (
        L.d_n + L.d_r
    ) ** 0.5
    return _causal_softmax(scores) @ c[:, None]


def refit_values(
    src: SourceAttention, L: MlaLayer, x: torch.Tensor, *, ridge: float = 1e-2, eps: float = 1e-6
) -> MlaLayer:
    """A copy of L whose kv_b value rows are refitted by ridge least squares (see the module doc).

    x: [B, T, H] calibration inputs of this layer (float64 recommended)."""
    x = x.to(torch.float64)
    Lf = MlaLayer({k: v.to(torch.float64) for k, v in L.tensors.items()}, L.d_n, L.d_r, L.rank, L.rope_freq)
    n_h, d = src.n_h, src.d
    z = _mla_features(x, Lf, n_h, eps)  # [B, n_h, T, r]
    o = gqa_head_outputs(x, src)  # [B, n_h, T, d]
    kv_b = Lf.tensors["kv_b"].clone().view(n_h, L.d_n + d, -1)
    r = kv_b.shape[-1]
    for h in range(n_h):
        Z = z[:, h].reshape(-1, r)
        O = o[:, h].reshape(-1, d)
        G = Z.T @ Z
        lam = ridge * float(G.diagonal().mean().clamp_min(1e-30))
        V0 = kv_b[h, L.d_n :]  # [d, r]
        kv_b[h, L.d_n :] = torch.linalg.solve(G + lam * torch.eye(r, dtype=G.dtype), Z.T @ O + lam * V0.T).T
    t = dict(L.tensors)
    t["kv_b"] = kv_b.reshape(-1, r).to(L.tensors["kv_b"].dtype)
    return MlaLayer(t, L.d_n, L.d_r, L.rank, L.rope_freq)


def refit_output(
    src: SourceAttention, L: MlaLayer, x: torch.Tensor, *, ridge: float = 1e-2, eps: float = 1e-6
) -> MlaLayer:
    """A copy of L whose o_proj is refitted by ridge least squares (towards the current o_proj) so that
    o_proj applied to the converted heads' outputs matches the source layer's attention output: unlike
    the per-head value refit, one head's error can be compensated through the others.

    x: [B, T, H] calibration inputs of this layer (float64 recommended)."""
    x = x.to(torch.float64)
    Lf = MlaLayer({k: v.to(torch.float64) for k, v in L.tensors.items()}, L.d_n, L.d_r, L.rank, L.rope_freq)
    n_h, d = src.n_h, src.d
    z = _mla_features(x, Lf, n_h, eps)  # [B, n_h, T, r]
    r = z.shape[-1]
    wuv = Lf.tensors["kv_b"].view(n_h, L.d_n + d, r)[:, L.d_n :]  # [n_h, d, r]
    heads = torch.einsum("bhtr,hdr->bthd", z, wuv).reshape(-1, n_h * d)  # [N, n_h·d]
    target = gqa_head_outputs(x, src).transpose(1, 2).reshape(-1, n_h * d) @ src.wo.T  # [N, H] (no bias)
    G = heads.T @ heads
    lam = ridge * float(G.diagonal().mean().clamp_min(1e-30))
    W0 = Lf.tensors["o"]  # [H, n_h·d]
    W = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), heads.T @ target + lam * W0.T).T
    t = dict(L.tensors)
    t["o"] = W.to(L.tensors["o"].dtype)
    return MlaLayer(t, L.d_n, L.d_r, L.rank, L.rope_freq)
