"""The latent RMSNorm that stock DeepSeek code always applies: `kv_b_proj(kv_a_layernorm(c))`.

exact: one extra latent channel with a large constant M (through the kv_a_proj bias) dominates the
RMS, so rms(c) = M/√(r+1) to float32 rounding whatever the data: the norm becomes a fixed scale,
undone by its own weights; the constant channel itself normalises to 1 and its kv_b column carries
the latent's mean (biases). Costs one cached value per token and layer.

pseudo-constant (engine target, no bias available): the attention input x is the output of the
layer's input RMSNorm, so some direction w has wᵀx almost constant over tokens (w = Σ⁻¹μ, scaled to
mean 1: a coefficient of variation of 1–3 % on SmolLM2). A latent channel M·wᵀx then plays the
constant channel's part without a bias: it dominates the RMS, so the norm is a fixed scale up to
that per-token variation, and its kv_b column carries the latent's mean; the data channels'
biases ride on it too (b ≈ b·wᵀx). It costs one latent channel of the budget.

calibrated (fallback when no such direction exists): weights w minimising E‖w ⊙ c/rms(c) − c‖² per
channel over calibration latents; the per-token RMS cannot be undone, its cost is measured.
"""

from __future__ import annotations

import torch

CONSTANT = {torch.float32: 2.0**26, torch.bfloat16: 2.0**26, torch.float16: 2.0**12}


def constant_for(dtype: torch.dtype) -> float:
    return CONSTANT.get(dtype, 2.0**26)


def constant_channel_weights(rank: int, M: float) -> torch.Tensor:
    """Norm weights [rank + 1] for data channels 0..rank-1 and the constant channel last."""
    r1 = rank + 1
    w = torch.full((r1,), M / r1**0.5, dtype=torch.float64)
    w[-1] = 1.0 / r1**0.5
    return w


def pseudo_constant_direction(C: torch.Tensor, damp: float = 1e-6) -> tuple[torch.Tensor, float]:
    """w [H] with E[wᵀx] = 1 and the smallest variance, and that variance's coefficient of
    variation std/mean. C: [H+1, H+1] second moment of [x; 1]."""
    H = C.shape[0] - 1
    mu = C[:H, H]
    S = C[:H, :H] - torch.outer(mu, mu)
    S = S + damp * S.diagonal().mean().clamp_min(1e-30) * torch.eye(H, dtype=C.dtype)
    w = torch.linalg.solve(S, mu)
    snr = float(mu @ w)
    if snr <= 0:
        return torch.zeros(H, dtype=C.dtype), float("inf")
    return w / snr, snr**-0.5


def calibrated_weights(c: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel least squares w_i = E[c_i² / ρ] / E[c_i² / ρ²], ρ = rms(c) per token.

    c: [tokens, rank] latents (float64)."""
    rho = (c.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    num = (c.pow(2) / rho).sum(0)
    den = (c.pow(2) / rho.pow(2)).sum(0)
    w = num / den.clamp_min(1e-30)
    w[den <= 1e-30] = 1.0
    return w


def rms_norm(c: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """DeepSeek's RMSNorm (computed in float32 like transformers when c is float32)."""
    return w * (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps))
