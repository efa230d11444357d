"""compressed-tensors `pack-quantized` format (llm-compressor's W{2,3,4,8}A16 output).

Per linear `P`: `P.weight_packed` int32 [N, ⌈K·b/32⌉] (signed codes + 2^(b−1), densely packed
along K), `P.weight_scale` [N, G] in the model dtype, `P.weight_shape` int64 [2], and for
asymmetric grids `P.weight_zero_point` int32 [⌈N·b/32⌉, G] (signed zero points + 2^(b−1), packed
along N). Matches compressed-tensors ≥ 0.19's dense packing. Groups must divide K (the library
reshapes by group), so ragged groups are not offered for this format.
"""

from __future__ import annotations

import math

import torch

from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.errors import UsageError
from weightsmith.kernels.packing import pack_dense, unpack_dense
from weightsmith.quant.formats.base import LinearQuant, QuantizedWeight, compact_rules, register_format


class CompressedTensors:
    name = "compressed-tensors"
    weight_suffix = ".weight_packed"
    min_zero = 0
    allows_ragged_groups = False

    def validate(self, prefix, out_features, in_features, quant):
        if quant.group_size != -1 and in_features % quant.group_size:
            raise UsageError(
                f"{prefix}: group size {quant.group_size} does not divide in_features {in_features}, which "
                "compressed-tensors requires"
            )

    def specs(self, prefix, out_features, in_features, quant, scale_dtype):
        g = quant.groups(in_features)
        out = [
            TensorSpec(
                f"{prefix}.weight_packed", (out_features, math.ceil(in_features * quant.bits / 32)), torch.int32
            ),
            TensorSpec(f"{prefix}.weight_scale", (out_features, g), scale_dtype),
            TensorSpec(f"{prefix}.weight_shape", (2,), torch.int64),
        ]
        if not quant.sym:
            out.append(
                TensorSpec(f"{prefix}.weight_zero_point", (math.ceil(out_features * quant.bits / 32), g), torch.int32)
            )
        return out

    def pack(self, prefix, qw: QuantizedWeight, scale_dtype):
        n, k = qw.q.shape
        out = {
            f"{prefix}.weight_packed": pack_dense(qw.q, qw.quant.bits),
            f"{prefix}.weight_scale": qw.scales.T.to(scale_dtype).contiguous(),
            f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if not qw.quant.sym:
            out[f"{prefix}.weight_zero_point"] = pack_dense(qw.zeros, qw.quant.bits).T.contiguous()
        return out

    def unpack(self, prefix, get, quant, out_features, in_features):
        b = quant.bits
        q = unpack_dense(get(f"{prefix}.weight_packed"), b, in_features)
        scales = get(f"{prefix}.weight_scale").float().T.contiguous()
        g = scales.shape[0]
        if quant.sym:
            zeros = torch.full((g, out_features), 1 << (b - 1), dtype=torch.int32)
        else:
            zeros = unpack_dense(get(f"{prefix}.weight_zero_point").T.contiguous(), b, out_features)
        gs = in_features if quant.group_size == -1 else quant.group_size
        g_idx = torch.arange(in_features, dtype=torch.int32) // gs
        return QuantizedWeight(q=q, scales=scales, zeros=zeros, g_idx=g_idx, quant=quant)

    def config(self, default: LinearQuant, per_module: dict[str, LinearQuant | None], extra: dict) -> dict:
        # targets and ignores as "re:" family patterns (one per projection kind when every layer
        # agrees), so config.json stays small whatever the depth
        groups: dict[LinearQuant, list[str]] = {}
        ignore = ["lm_head"]
        for pattern, q in compact_rules(per_module):
            if q is None:
                ignore.append("re:" + pattern)
            else:
                groups.setdefault(q, []).append("re:" + pattern)
        config_groups = {}
        for i, (q, targets) in enumerate(
            sorted(groups.items(), key=lambda kv: (kv[0] != default, kv[0].bits, kv[0].group_size))
        ):
            config_groups[f"group_{i}"] = {
                "targets": targets,
                "weights": {
                    "num_bits": q.bits,
                    "type": "int",
                    "symmetric": q.sym,
                    "group_size": None if q.group_size == -1 else q.group_size,
                    "strategy": "channel" if q.group_size == -1 else "group",
                    "dynamic": False,
                    "actorder": None,
                    "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
            }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "producer": {"name": "weightsmith", "version": extra.get("version", "")},
        }

    def module_quant(self, qconfig: dict, prefix: str) -> LinearQuant | None:
        import re

        for t in qconfig.get("ignore") or []:
            if t == prefix or (t.startswith("re:") and re.match(t[3:], prefix)):
                return None
        for grp in (qconfig.get("config_groups") or {}).values():
            for t in grp.get("targets", []):
                # exact names (what we write), "re:" patterns, or the module class name that
                # llm-compressor writes ("Linear": only ever asked about linear layers here)
                if t in (prefix, "Linear") or (t.startswith("re:") and re.match(t[3:], prefix)):
                    w = grp["weights"]
                    gs = w.get("group_size")
                    return LinearQuant(
                        int(w["num_bits"]),
                        -1 if w.get("strategy") == "channel" or gs is None else int(gs),
                        bool(w.get("symmetric", True)),
                    )
        return None


register_format(CompressedTensors())
