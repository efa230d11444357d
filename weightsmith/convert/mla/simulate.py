"""Reference attentions: the source GQA layer and the converted MLA layer, as DeepSeek computes it.

Used to score candidate conversions on calibration activations (the per-layer "calibration loss")
and by the tests. Causal, positions 0..T-1, no cache.
"""

from __future__ import annotations

import torch

from weightsmith.convert.mla.latent import rms_norm
from weightsmith.convert.mla.layer import MlaLayer, SourceAttention


def _causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    T = scores.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def _aug(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


def gqa_head_outputs(x: torch.Tensor, s: SourceAttention) -> torch.Tensor:
    """[B, n_h, T, d] per-head attention outputs of the source layer (before o_proj)."""
    B, T, _ = x.shape
    xa = _aug(x)
    q = (xa @ s.wq.T).view(B, T, s.n_h, s.d).transpose(1, 2)
    k = (xa @ s.wk.T).view(B, T, s.n_kv, s.d).transpose(1, 2)
    v = (xa @ s.wv.T).view(B, T, s.n_kv, s.d).transpose(1, 2)
    ang = torch.arange(T, dtype=x.dtype)[:, None] * s.inv_freq.to(x.dtype)[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rot(t):
        t1, t2 = t[..., : s.d // 2], t[..., s.d // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q, k = rot(q), rot(k)
    g = s.n_h // s.n_kv
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    a = _causal_softmax(q @ k.transpose(-1, -2) / s.d**0.5)
    return a @ v


def gqa_attention(x: torch.Tensor, s: SourceAttention) -> torch.Tensor:
    B, T, _ = x.shape
    o = gqa_head_outputs(x, s).transpose(1, 2).reshape(B, T, -1)
    out = o @ s.wo.T
    return out + s.bo if s.bo is not None else out


def mla_attention(x: torch.Tensor, L: MlaLayer, n_h: int, *, eps: float = 1e-6) -> torch.Tensor:
    B, T, H = x.shape
    t = L.tensors
    if "q" in t:
        q = x @ t["q"].T
    else:
        qa = x @ t["q_a"].T + t["q_a_bias"]
        q = rms_norm(qa, t["q_a_norm"], eps) @ t["q_b"].T  # q_b acts on the normalised [x; 1]
    q = q.view(B, T, n_h, L.d_n + L.d_r).transpose(1, 2)
    q_nope, q_rot = q[..., : L.d_n], q[..., L.d_n :]
    kv = x @ t["kv_a"].T + (t["kv_a_bias"] if "kv_a_bias" in t else 0)
    c, k_rot = kv[..., : L.rank], kv[..., L.rank :]
    c = rms_norm(c, t["kv_a_norm"], eps)
    d_v = t["kv_b"].shape[0] // n_h - L.d_n
    kvb = (c @ t["kv_b"].T).view(B, T, n_h, L.d_n + d_v).transpose(1, 2)
    k_nope, v = kvb[..., : L.d_n], kvb[..., L.d_n :]
    ang = torch.arange(T, dtype=x.dtype)[:, None] * L.rope_freq.to(x.dtype)[None]
    cos, sin = ang.cos(), ang.sin()

    def rot(z):  # interleaved pairs (2p, 2p+1)
        z1, z2 = z[..., 0::2], z[..., 1::2]
        return torch.stack([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1).flatten(-2)

    q_rot = rot(q_rot)
    k_rot = rot(k_rot[:, None])
    scores = (q_nope @ k_nope.transpose(-1, -2) + q_rot @ k_rot.transpose(-1, -2)) / (L.d_n + L.d_r) ** 0.5
    a = _causal_softmax(scores)
    o = (a @ v).transpose(1, 2).reshape(B, T, -1)
    out = o @ t["o"].T
    return out + t["o_bias"] if "o_bias" in t else out


def cast_layer(L: MlaLayer, dtype: torch.dtype) -> MlaLayer:
    return MlaLayer({k: v.to(dtype) for k, v in L.tensors.items()}, L.d_n, L.d_r, L.rank, L.rope_freq)


def cast_source(s: SourceAttention, dtype: torch.dtype) -> SourceAttention:
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return SourceAttention(c(s.wq), c(s.wk), c(s.wv), c(s.wo), c(s.bo), s.n_h, s.n_kv, s.d, s.inv_freq)


def relative_error(
    x: torch.Tensor,
    src: SourceAttention,
    L: MlaLayer,
    *,
    eps: float = 1e-6,
    ref: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """‖o_mla − o_src‖² / ‖o_src‖² of the attention output on calibration inputs x [B, T, H],
    computed in `dtype` (float32: what the written model computes); `ref` = a cached source output."""
    x = x.to(dtype)
    if ref is None:
        ref = gqa_attention(x, cast_source(src, dtype))
    got = mla_attention(x, cast_layer(L, dtype), src.n_h, eps=eps)
    return float((got.double() - ref.double()).pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30))
