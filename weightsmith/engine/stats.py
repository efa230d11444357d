"""Statistics accumulated by engine hooks, always in fp32 (or fp64) whatever the compute dtype.

Each accumulator is an observer: `acc(module_input, module_output)`. Inputs of routed experts
arrive as [tokens, features]; everything else as [batch, seq, features].

Under a launcher each rank observes only its own calibration windows; `acc.reduce()` (called by
the pass after `layer.run(...)`, on every rank, in the same order) sums the tensors and the row
counts over ranks in rank order (`dist.sum_ordered`), so every rank then holds the statistics of
all windows, bit-identical for a given world size. Without a launcher it is a no-op, and a second
call is a no-op too.
"""

from __future__ import annotations

import torch

from weightsmith import dist


class Reducible:
    """Accumulators whose state is a few tensors and integer counts summed over ranks."""

    _tensors: tuple[str, ...] = ()
    _counts: tuple[str, ...] = ()
    _reduced = False

    def reduce(self):
        if self._reduced or not dist.world().distributed:
            self._reduced = True
            return self
        names = self._tensors + self._counts
        for name, v in zip(names, dist.sum_tree([getattr(self, n) for n in names])):
            setattr(self, name, v)
        self._reduced = True
        return self


class Gram(Reducible):
    """Σ xᵀx over all rows of the module input (or output): GPTQ Hessians, PCA covariances."""

    _tensors, _counts = ("sum",), ("rows",)

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


class ChannelImportance(Reducible):
    """Minitron aggregation per channel: mean |x| over the sequence, then L2 over samples."""

    _tensors, _counts = ("sq",), ("samples",)

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


class ChannelSquares(Reducible):
    """Σ x² per channel (for Wanda-style ‖X_j‖₂ scores)."""

    _tensors, _counts = ("sq",), ("rows",)

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
