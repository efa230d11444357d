"""RoPE layouts and frequencies.

Source models (Llama, Qwen, Mistral) rotate-half: within a head, dim i pairs with dim i + d/2 and
turns at frequency i. DeepSeek (`rope_interleave=True`) pairs dims (2p, 2p+1). A "pair" here is
(real row, imag row) of a projection; both layouts rotate real' = real·cos − imag·sin.
"""

from __future__ import annotations

import math

import torch


def half_pairs(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real rows, imag rows) of the d/2 frequency pairs of a rotate-half head of width d."""
    if d % 2:
        raise ValueError(f"head_dim {d} must be even for RoPE")
    i = torch.arange(d // 2)
    return i, i + d // 2


def interleave_rows(real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
    """Stack pairs' real and imag rows into DeepSeek's interleaved layout: [r0, i0, r1, i1, ...]."""
    return torch.stack([real, imag], dim=1).reshape(-1, *real.shape[1:])


def rotate_half_to_interleaved(d: int) -> torch.Tensor:
    """Row permutation p with interleaved = rotate_half[p] for one head of width d."""
    r, i = half_pairs(d)
    return interleave_rows(r, i)


def source_inv_freq(config, head_dim: int) -> torch.Tensor:
    """The source model's RoPE inverse frequencies (float32, as transformers computes them).

    Static rope types only (default, linear, llama3): frequencies that change with the sequence
    length (dynamic, longrope, yarn's attention factor) cannot be carried into a fixed table.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from weightsmith.errors import UnsupportedError

    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type not in ("linear", "llama3"):
        raise UnsupportedError(
            f"rope_parameters.rope_type={rope_type!r}: only default, linear and llama3 RoPE can be carried into the "
            "MLA model "
            "(their frequencies do not depend on the sequence length)"
        )
    inv, attn = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    if abs(float(attn) - 1.0) > 0 or inv.numel() != head_dim // 2:
        raise UnsupportedError(
            f"rope_type {rope_type!r} with an attention factor {attn} or partial rotary dims cannot be carried over"
        )
    return inv.float()


def longrope_factors(inv_freq: torch.Tensor, base: float) -> list[float]:
    """Per-pair factors f_p such that transformers' longrope gives exactly `inv_freq` (float32).

    transformers computes inv_freq_p = 1 / (f_p · base^(2p/d)) in float32; the ideal f_p is nudged
    by a few ulps until that expression reproduces the wanted float32 value bit for bit.
    """
    d = 2 * inv_freq.numel()
    shape = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    denom = base**shape  # float32, as transformers computes it
    target = inv_freq.float()
    ideal = (1.0 / (target.double() * denom.double())).float()
    out = ideal.clone()
    for p in range(inv_freq.numel()):
        # candidates: the ideal factor ± 32 float32 ulps; exact reproduction when one exists,
        # otherwise the closest (float32 rounding can skip a value: then it is 1 ulp off)
        cands = [ideal[p]]
        up = down = ideal[p]
        for _ in range(32):
            up = torch.nextafter(up, torch.tensor(math.inf))
            down = torch.nextafter(down, torch.tensor(0.0))
            cands += [up, down]
        c = torch.stack(cands)
        got = 1.0 / (c * denom[p])
        err = (got.double() - target[p].double()).abs()
        out[p] = c[int(torch.argmin(err))]
    return [float(x) for x in out.tolist()]
