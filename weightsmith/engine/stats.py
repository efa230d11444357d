"""Statistics accumulated by engine hooks, always in fp32 (or fp64) whatever the compute dtype.

Each accumulator is an observer: `acc(module_input, module_output)`. Inputs of routed experts
arrive as [tokens, features]; everything else as [batch, seq, features].
"""

from __future__ import annotations

import torch


class Gram:
    """Σ xᵀx over all rows of the module input (or output): GPTQ Hessians, PCA covariances."""

    def __init__(
        self, dim: int, *, on: str = "input", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ):
        self.sum = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.rows = 0
        self.on = on

    def __call__(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp if self.on == "input" else out
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


class ChannelImportance:
    """Minitron aggregation per channel: mean |x| over the sequence, then L2 over samples."""

    def __init__(self, dim: int, *, on: str = "input", device: str | torch.device = "cpu"):
        self.sq = torch.zeros(dim, dtype=torch.float64, device=device)
        self.samples = 0
        self.on = on

    def __call__(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = (inp if self.on == "input" else out).to(self.sq.device, torch.float32)
        per_sample = x.abs().mean(dim=1) if x.dim() == 3 else x.abs()  # [B, C] (routed experts: per token)
        self.sq += per_sample.double().pow(2).sum(0)
        self.samples += per_sample.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.sq.sqrt().float()


class ChannelSquares:
    """Σ x² per channel (for Wanda-style ‖X_j‖₂ scores)."""

    def __init__(self, dim: int, *, on: str = "input", device: str | torch.device = "cpu"):
        self.sq = torch.zeros(dim, dtype=torch.float64, device=device)
        self.rows = 0
        self.on = on

    def __call__(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp if self.on == "input" else out
        x = x.reshape(-1, x.shape[-1]).to(self.sq.device, torch.float64)
        self.sq += x.pow(2).sum(0)
        self.rows += x.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        return self.sq.sqrt().float()
