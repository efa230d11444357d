"""Pick the best available kernel for a quantized linear call.

KERNELS is an ordered registry (fastest first); each entry says whether it can serve a call and,
when it cannot, why. The reference is always available. The kernels issue adds the Marlin-style
CUDA and Triton implementations ahead of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Kernel:
    name: str
    unavailable: Callable[[torch.Tensor, "object"], str | None]  # (x, module) -> reason or None
    run: Callable[[torch.Tensor, "object"], torch.Tensor]


def _reference_run(x: torch.Tensor, m) -> torch.Tensor:
    return torch.nn.functional.linear(x, m.dequantized_weight(x.dtype, x.device), m.bias)


KERNELS: list[Kernel] = [Kernel("reference", lambda x, m: None, _reference_run)]


def choose(x: torch.Tensor, module) -> Kernel:
    for k in KERNELS:
        if k.unavailable(x, module) is None:
            return k
    raise RuntimeError("no kernel available (the reference should always be)")


def explain(x: torch.Tensor, module) -> dict[str, str | None]:
    """For each kernel, None if it would serve this call, else why not."""
    return {k.name: k.unavailable(x, module) for k in KERNELS}


def quant_matmul(x: torch.Tensor, module) -> torch.Tensor:
    return choose(x, module).run(x, module)
