"""What a quantized linear is, independent of its on-disk format, and the format registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class LinearQuant:
    """The quantization chosen for one linear module."""

    bits: int
    group_size: int  # -1 = per output channel (one group spanning all inputs)
    sym: bool

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)


@dataclass
class QuantizedWeight:
    """Codes and grid of one linear, in GPTQ's natural orientation."""

    q: torch.Tensor  # int32 [N, K] codes in [0, 2^b)
    scales: torch.Tensor  # float [G, N]
    zeros: torch.Tensor  # int32 [G, N] true zero points
    g_idx: torch.Tensor  # int32 [K]
    quant: LinearQuant

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from weightsmith.quant.grid import dequantize_codes

        return dequantize_codes(self.q, self.scales, self.zeros, self.g_idx).to(dtype)


class Format(Protocol):
    name: str
    weight_suffix: str  # tensor that marks a quantized module on disk, e.g. ".qweight"

    def validate(self, prefix: str, out_features: int, in_features: int, quant: LinearQuant) -> None: ...

    def specs(
        self, prefix: str, out_features: int, in_features: int, quant: LinearQuant, scale_dtype: torch.dtype
    ) -> list: ...

    def pack(self, prefix: str, qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def unpack(self, prefix: str, get, quant: LinearQuant, out_features: int, in_features: int) -> QuantizedWeight: ...

    def config(self, default: LinearQuant, per_module: dict[str, LinearQuant | None], extra: dict) -> dict: ...

    def module_quant(self, qconfig: dict, prefix: str) -> LinearQuant | None: ...


FORMATS: dict[str, Format] = {}

# checkpoint linears that vLLM loads into one fused module (its packed_modules_mapping for
# Llama-style families): shard name -> fused name
SERVER_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def compact_rules(
    per_module: dict[str, "LinearQuant | None"], skip=lambda v: False
) -> list[tuple[str, "LinearQuant | None"]]:
    """Per-module choices as few anchored regexes: modules that differ only in their layer/expert
    indices form a family (`model.layers.3.mlp.down_proj` -> `^model\\.layers\\.\\d+\\.mlp\\.down_proj$`);
    a family whose members all share one value is one rule, others keep a rule per module.
    `skip(value)` drops values the format states elsewhere (its default). Rules never overlap."""
    import re

    families: dict[str, dict[str, LinearQuant | None]] = {}
    for name, value in per_module.items():
        key = "^" + r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split(".")) + "$"
        families.setdefault(key, {})[name] = value
    rules: list[tuple[str, LinearQuant | None]] = []
    for key, members in sorted(families.items()):
        values = set(members.values())
        if len(values) == 1 and len(members) > 1:
            v = next(iter(values))
            if not skip(v):
                rules.append((key, v))
            continue
        # a family that differs between layers may still agree inside each layer (MoE experts
        # under --avg-bits): one rule per layer, the first index kept literal
        layers: dict[str, dict[str, LinearQuant | None]] = {}
        for name, value in members.items():
            layers.setdefault(_layer_key(name), {})[name] = value
        for lkey, lmembers in sorted(layers.items()):
            lvalues = set(lmembers.values())
            if len(lvalues) == 1 and len(lmembers) > 1:
                v = next(iter(lvalues))
                if not skip(v):
                    rules.append((lkey, v))
            else:
                rules += [("^" + re.escape(n) + "$", v) for n, v in sorted(lmembers.items()) if not skip(v)]
    return rules


def _layer_key(name: str) -> str:
    """`model.layers.3.mlp.experts.7.w1` -> `^model\\.layers\\.3\\.mlp\\.experts\\.\\d+\\.w1$`."""
    import re

    parts, seen = [], False
    for part in name.split("."):
        if part.isdigit() and seen:
            parts.append(r"\d+")
        else:
            seen = seen or part.isdigit()
            parts.append(re.escape(part))
    return "^" + r"\.".join(parts) + "$"
