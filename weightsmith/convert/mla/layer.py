"""One layer's MLA weights in the stock DeepSeek-V3 layout, from the pieces in components/lowrank.

Per query head h (KV group g): q_nope_h = the original query head (d dims, present only when some
key directions lost RoPE), q_rot_h = T_h^rope · q_h; k_nope_h = ratio · (T_h^nope)ᵀ · B_k · c,
v_h = B_v[g] · c; o_proj is the source's. Query rows are scaled by √((d_n + d_r)/d) so DeepSeek's
1/√(d_n + d_r) softmax scale equals the source's 1/√d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.convert.mla.components import Split
from weightsmith.convert.mla.latent import (
    calibrated_weights,
    constant_channel_weights,
    pseudo_constant_direction,
)
from weightsmith.convert.mla.lowrank import Latent


@dataclass
class SourceAttention:
    """One GQA layer, float64, projections augmented with their bias column ([W | b])."""

    wq: torch.Tensor  # [n_h·d, H+1]
    wk: torch.Tensor  # [n_kv·d, H+1]
    wv: torch.Tensor  # [n_kv·d, H+1]
    wo: torch.Tensor  # [H, n_h·d]
    bo: torch.Tensor | None
    n_h: int
    n_kv: int
    d: int
    inv_freq: torch.Tensor  # [d/2]

    @property
    def hidden(self) -> int:
        return self.wq.shape[1] - 1

    def has_qkv_bias(self) -> dict[str, bool]:
        return {n: bool(getattr(self, n)[:, -1].abs().max() > 0) for n in ("wq", "wk", "wv")}


@dataclass
class MlaLayer:
    tensors: dict[
        str, torch.Tensor
    ]  # role -> tensor: q(.weight) or q_a/q_a_norm/q_b, kv_a, kv_a_bias, kv_a_norm, kv_b, o, o_bias
    d_n: int
    d_r: int
    rank: int  # kv_lora_rank written (constant channel included)
    rope_freq: torch.Tensor


def build_layer(
    src: SourceAttention,
    split: Split,
    lat: Latent,
    *,
    constant: float | None,
    samples: torch.Tensor | None = None,
    eps: float = 1e-6,
    q_constant: float | None = None,
    C: torch.Tensor | None = None,
    pseudo: float | None = None,
    max_cv: float = 0.1,
) -> MlaLayer:
    """constant: M for the exact target's constant latent channel; None = engine target (no biases):
    with `pseudo` (M) and C given, a pseudo-constant latent channel M·wᵀx (see latent.py) when its
    coefficient of variation is below max_cv; otherwise norm weights calibrated on `samples`
    [tokens, H] of the attention input (the latent must then be uncentered)."""
    n_h, n_kv, d, H = src.n_h, src.n_kv, src.d, src.hidden
    d_r = split.rope_k.shape[0]
    m = split.nope_k.shape[0]
    d_n = d if m else 0
    scale = ((d_n + d_r) / d) ** 0.5
    wq_heads = src.wq.reshape(n_h, d, H + 1)
    q_rows = []
    for h in range(n_h):
        if d_n:
            q_rows.append(wq_heads[h])
        q_rows.append(split.rope_q[h] @ wq_heads[h])
    q_full = torch.cat(q_rows) * scale  # [n_h·(d_n+d_r), H+1]

    B, mu, ratio = lat.basis, lat.mean, lat.ratio
    r = B.shape[1]
    Y = torch.cat([split.nope_k / ratio, src.wv])
    Bk, Bv = B[:m] * ratio, B[m:]
    muk, muv = mu[:m] * ratio, mu[m:]
    cols = []  # per head kv_b rows: [k_nope d_n ; v d]
    mcols = []
    for h in range(n_h):
        gidx = slice((h // (n_h // n_kv)) * d, (h // (n_h // n_kv) + 1) * d)
        if d_n:
            cols.append(split.nope_q[h].T @ Bk)
            mcols.append(split.nope_q[h].T @ muk)
        cols.append(Bv[gidx])
        mcols.append(muv[gidx])
    kv_b = torch.cat(cols)  # [n_h·(d_n+d), r]
    kv_mean = torch.cat(mcols)
    E = lat.encode  # [r, rows of y]
    lat_rows = E @ Y  # [r, H+1]: c = E y (+ bias part)
    t: dict[str, torch.Tensor] = {}
    if constant is not None:
        lat_rows = lat_rows.clone()
        lat_rows[:, -1] -= E @ mu  # centered: c = E(y − μ)
        const_row = torch.zeros(1, H + 1, dtype=B.dtype)
        const_row[0, -1] = constant
        kv_a = torch.cat([lat_rows, const_row, split.rope_k])
        t["kv_a_norm"] = constant_channel_weights(r, constant)
        t["kv_b"] = torch.cat([kv_b, kv_mean[:, None]], dim=1)
        rank = r + 1
        t["kv_a"], t["kv_a_bias"] = kv_a[:, :H], kv_a[:, H]
        t["o"] = src.wo
        t["o_bias"] = src.bo if src.bo is not None else torch.zeros(H, dtype=B.dtype)
    elif pseudo is not None and C is not None and (pc := pseudo_constant_direction(C))[1] < max_cv:
        w = pc[0].to(B.dtype)
        if split.rope_k[:, H].abs().max() > 0:
            raise ValueError("the engine target has no kv_a_proj bias, but the source's RoPE keys have one")
        lat_rows = lat_rows.clone()
        lat_rows[:, :H] += torch.outer(lat_rows[:, H] - E @ mu, w)  # centered latent; its offset rides on wᵀx ≈ 1
        kv_a = torch.cat([lat_rows[:, :H], pseudo * w[None], split.rope_k[:, :H]])
        t["kv_a_norm"] = constant_channel_weights(r, pseudo)
        t["kv_b"] = torch.cat([kv_b, kv_mean[:, None]], dim=1)
        rank = r + 1
        t["kv_a"] = kv_a
        t["o"] = src.wo
        if src.bo is not None and src.bo.abs().max() > 0:
            raise ValueError("the engine target has no o_proj bias, but the source has one")
    else:
        kv_a = torch.cat([lat_rows, split.rope_k])
        if kv_a[:, H].abs().max() > 0:
            raise ValueError("the engine target has no kv_a_proj bias, but the source's keys/values have biases")
        c = samples.to(B.dtype) @ lat_rows[:, :H].T if samples is not None else None
        t["kv_a_norm"] = calibrated_weights(c, eps) if c is not None else torch.ones(r, dtype=B.dtype)
        t["kv_b"] = kv_b
        rank = r
        t["kv_a"] = kv_a[:, :H]
        t["o"] = src.wo
        if src.bo is not None and src.bo.abs().max() > 0:
            raise ValueError("the engine target has no o_proj bias, but the source has one")
    if q_full[:, -1].abs().max() > 0:
        if constant is None:
            raise ValueError("the engine target has no query bias, but the source has one")
        # q bias through q_lora: q_a = [I; 0] + bias [0; M], RMSNorm → fixed scale, q_b = [W_q | b_q]
        Mq = q_constant or constant
        qa = torch.zeros(H + 1, H, dtype=B.dtype)
        qa[:H] = torch.eye(H, dtype=B.dtype)
        qa_bias = torch.zeros(H + 1, dtype=B.dtype)
        qa_bias[-1] = Mq
        t["q_a"], t["q_a_bias"] = qa, qa_bias
        t["q_a_norm"] = constant_channel_weights(H, Mq)
        t["q_b"] = q_full
    else:
        t["q"] = q_full[:, :H]
    return MlaLayer(t, d_n, d_r, rank, split.rope_freq)


def attention_metric(src: SourceAttention, split: Split, C: torch.Tensor) -> torch.Tensor:
    """What an error in each latent row costs downstream, as a PSD matrix over y = [k_nope; v].

    Keys: an error Δk changes head h's logit by q_hᵀT_hᵀΔk/√d → Σ_h e_h·T_h E[q_h q_hᵀ] T_hᵀ / d,
    weighted by e_h = E‖W_O^h v‖² (the size of the output a logit error moves). Values: an error
    Δv of KV group g moves the output by Σ_(h in g) W_O^h Δv → blockdiag_g Σ_h W_O^hᵀ W_O^h."""
    n_h, n_kv, d = src.n_h, src.n_kv, src.d
    g = n_h // n_kv
    m = split.nope_k.shape[0]
    wq = src.wq.reshape(n_h, d, -1)
    wv = src.wv.reshape(n_kv, d, -1)
    wo = src.wo.reshape(src.wo.shape[0], n_h, d)
    M = torch.zeros(m + n_kv * d, m + n_kv * d, dtype=src.wq.dtype)
    for h in range(n_h):
        j = h // g
        Cv = wv[j] @ C @ wv[j].T
        Oh = wo[:, h, :]  # [H, d]
        e_h = float((Oh @ Cv @ Oh.T).trace())
        if m:
            T = split.nope_q[h]  # [m, d]
            M[:m, :m] += e_h * (T @ (wq[h] @ C @ wq[h].T) @ T.T) / d
        sl = slice(m + j * d, m + (j + 1) * d)
        M[sl, sl] += Oh.T @ Oh
    return M
