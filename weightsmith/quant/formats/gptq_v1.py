"""GPTQ v1 checkpoint format (AutoGPTQ / GPTQModel `checkpoint_format: gptq`), read by vLLM and
transformers.

Per linear `P`: `P.qweight` int32 [K·b/32, N] (codes packed along K), `P.qzeros` int32
[G, N·b/32] (zero points minus one, packed along N), `P.scales` fp16 [G, N], `P.g_idx` int32 [K].
Dequantization: W[n, k] = scales[g_idx[k], n] · (q[n, k] − (qzeros[g_idx[k], n] + 1)).
Because of the stored zero−1, an asymmetric zero of 0 cannot be represented; the pass restricts
asymmetric grids to zeros ≥ 1 for this format. Per-module differences (groups that fell back,
skipped modules) go into GPTQModel's `dynamic` map, which vLLM honours.
"""

from __future__ import annotations

import re

import torch

from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.errors import UsageError
from weightsmith.kernels.packing import pack_dense, unpack_dense
from weightsmith.quant.formats.base import (
    SERVER_FUSED,
    LinearQuant,
    QuantizedWeight,
    compact_rules,
    register_format,
)

MARLIN_TYPES = {(4, True), (8, True)}  # (bits, sym) vLLM's gptq_marlin runs (its TYPE_MAP)


def _with_fused_name(key: str, value, per_module: dict) -> str:
    """vLLM matches `dynamic` rules against its fused modules' names (`...self_attn.qkv_proj`,
    `...mlp.gate_up_proj`), not the checkpoint's q/k/v or gate/up: a rule for a shard also names the
    fused module when every module it covers agrees with its sibling shards (otherwise no single
    rule can describe the fused module, and none is claimed)."""
    leaf = next((s for s in SERVER_FUSED if key.endswith(r"\." + re.escape(s) + "$")), None)
    if leaf is None:
        return key
    fused = SERVER_FUSED[leaf]
    shards = [s for s, f in SERVER_FUSED.items() if f == fused]
    rx = re.compile(key)
    for name in per_module:
        if rx.match(name):
            parent = name[: -len(leaf)]
            if any(per_module.get(parent + s, value) != value for s in shards):
                return key
    return key[: -len(re.escape(leaf) + "$")] + f"(?:{re.escape(leaf)}|{re.escape(fused)})$"


def _words(values: int, bits: int) -> int:
    return values * bits // 32


class GPTQv1:
    name = "gptq"
    weight_suffix = ".qweight"
    min_zero = 1  # stored zero - 1 must not underflow
    allows_ragged_groups = True

    def validate(self, prefix: str, out_features: int, in_features: int, quant: LinearQuant) -> None:
        b = quant.bits
        unit_k = 32 // __import__("math").gcd(32, b)  # values per whole number of words
        if in_features % unit_k:
            raise UsageError(
                f"{prefix}: in_features {in_features} cannot be packed at {b} bits in the gptq format (needs a "
                f"multiple of {unit_k}); "
                f"skip this module with --override '{re.escape(prefix)}$:skip'"
                + (
                    "" if in_features % 8 else " or choose bits in {2, 4, 8}"
                )  # 3-bit words need 32 values; the others 16/8/4
            )
        if out_features % unit_k:
            raise UsageError(
                f"{prefix}: out_features {out_features} cannot hold packed {b}-bit zero points in the gptq format "
                f"(needs a multiple of {unit_k}); "
                f"skip it with --override '{re.escape(prefix)}$:skip'"
            )

    def specs(self, prefix, out_features, in_features, quant, scale_dtype):
        g = quant.groups(in_features)
        return [
            TensorSpec(f"{prefix}.qweight", (_words(in_features, quant.bits), out_features), torch.int32),
            TensorSpec(f"{prefix}.qzeros", (g, _words(out_features, quant.bits)), torch.int32),
            TensorSpec(f"{prefix}.scales", (g, out_features), torch.float16),
            TensorSpec(f"{prefix}.g_idx", (in_features,), torch.int32),
        ]

    def pack(self, prefix, qw: QuantizedWeight, scale_dtype):
        b = qw.quant.bits
        if int(qw.zeros.min()) < 1:
            raise ValueError(f"{prefix}: zero point 0 is not representable in gptq v1")
        return {
            f"{prefix}.qweight": pack_dense(qw.q, b).T.contiguous(),
            f"{prefix}.qzeros": pack_dense(qw.zeros - 1, b),
            f"{prefix}.scales": qw.scales.to(torch.float16).contiguous(),
            f"{prefix}.g_idx": qw.g_idx.to(torch.int32).contiguous(),
        }

    def unpack(self, prefix, get, quant, out_features, in_features):
        b = quant.bits
        q = unpack_dense(get(f"{prefix}.qweight").T.contiguous(), b, in_features)
        zeros = unpack_dense(get(f"{prefix}.qzeros"), b, out_features) + 1
        return QuantizedWeight(
            q=q,
            scales=get(f"{prefix}.scales").float(),
            zeros=zeros,
            g_idx=get(f"{prefix}.g_idx").to(torch.int32),
            quant=quant,
        )

    def config(self, default: LinearQuant, per_module: dict[str, LinearQuant | None], extra: dict) -> dict:
        used = {q for q in per_module.values() if q is not None}
        off_marlin = sorted((q for q in used if (q.bits, q.sym) not in MARLIN_TYPES), key=lambda q: q.bits)
        if off_marlin and (default.bits, default.sym) in MARLIN_TYPES:
            # vLLM picks gptq_marlin from the top-level bits alone, then refuses a dynamic override to a
            # width Marlin lacks; a top-level width outside Marlin's selects the gptq kernels (2/3/4/8)
            counts = {q: sum(v == q for v in per_module.values()) for q in off_marlin}
            default = min(off_marlin, key=lambda q: (-counts[q], q.bits, q.group_size))
        dynamic: dict[str, dict] = {}
        for key, q in compact_rules(per_module, skip=lambda q: q == default):
            key = _with_fused_name(key, q, per_module)
            if q is None:
                dynamic["-:" + key] = {}
            elif q != default:
                dynamic["+:" + key] = {"bits": q.bits, "group_size": q.group_size, "sym": q.sym}
        cfg = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": default.bits,
            "group_size": default.group_size,
            "sym": default.sym,
            "desc_act": False,
            "lm_head": False,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"weightsmith:{extra.get('version', '')}"], **extra.get("meta", {})},
        }
        if dynamic:
            cfg["dynamic"] = dynamic
        return cfg

    def module_quant(self, qconfig: dict, prefix: str) -> LinearQuant | None:
        q = LinearQuant(int(qconfig["bits"]), int(qconfig["group_size"]), bool(qconfig.get("sym", True)))
        for key, over in (qconfig.get("dynamic") or {}).items():
            sign, _, pattern = key.partition(":")
            if not pattern:
                sign, pattern = "+", key
            if re.match(pattern, prefix):
                if sign == "-":
                    return None
                return LinearQuant(
                    int(over.get("bits", q.bits)),
                    int(over.get("group_size", q.group_size)),
                    bool(over.get("sym", q.sym)),
                )
        return q


register_format(GPTQv1())
