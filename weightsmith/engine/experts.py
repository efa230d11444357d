"""Per-expert MoE modules for the engine.

transformers 5 keeps routed experts fused in memory (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]) while checkpoints store them per expert. Calibration needs each
expert's own inputs, so the engine swaps the fused module for `UnfusedExperts`: a ModuleList of
per-expert gated MLPs, named as on disk (`experts.3.w1` for Mixtral, `experts.3.gate_proj` for the
others), with the same call signature `(hidden_states, top_k_index, top_k_weights)` and the same
accumulation order as transformers' eager loop. It also counts the tokens each expert received.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, act_fn, names: Mapping[str, str], bias: bool = False):
        super().__init__()
        self._names = dict(names)
        setattr(self, names["gate"], nn.Linear(hidden, ffn, bias=bias))
        setattr(self, names["up"], nn.Linear(hidden, ffn, bias=bias))
        setattr(self, names["down"], nn.Linear(ffn, hidden, bias=bias))
        self.act_fn = act_fn

    def role(self, r: str) -> nn.Linear:
        return getattr(self, self._names[r])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.role("down")(self.act_fn(self.role("gate")(x)) * self.role("up")(x))


class UnfusedExperts(nn.ModuleList):
    def __init__(self, num_experts: int, hidden: int, ffn: int, act_fn, names: Mapping[str, str]):
        super().__init__([ExpertMLP(hidden, ffn, act_fn, names) for _ in range(num_experts)])
        self.num_experts = num_experts
        self.register_buffer("tokens", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            self.tokens[e] += token_idx.numel()
            out = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def unfuse_experts(fused: nn.Module, names: Mapping[str, str]) -> UnfusedExperts:
    """Build (on the fused module's device, usually meta) the per-expert replacement of a fused experts module."""
    gu, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    extra = sorted(n for n, _ in fused.named_parameters() if n not in ("gate_up_proj", "down_proj"))
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.dim() != 3 or extra:
        raise NotImplementedError(
            f"{type(fused).__name__}: unexpected fused-experts layout (parameters "
            f"{sorted(n for n, _ in fused.named_parameters())}); "
            "this transformers version stores experts differently from what weightsmith's engine knows"
        )
    e, two_i, h = gu.shape
    if tuple(down.shape) != (e, h, two_i // 2):
        raise NotImplementedError(
            f"{type(fused).__name__}: gate_up_proj {list(gu.shape)} and down_proj {list(down.shape)} are not [E, 2I, "
            "H] / [E, H, I]"
        )
    with torch.device(gu.device):
        mod = UnfusedExperts(e, h, two_i // 2, fused.act_fn, names)
    return mod.to(gu.dtype)
