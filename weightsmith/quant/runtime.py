"""Quantized checkpoints as ready transformers models: `QuantLinear` and the format loaders.

`weightsmith.load(dir)` on a gptq or compressed-tensors output builds the transformers model on
the meta device (MoE experts as per-expert modules, since each expert is quantized on its own),
swaps every linear that is quantized on disk for a `QuantLinear`, and fills everything from the
checkpoint. `QuantLinear` keeps the weights packed in GPTQ orientation with true zero points and
calls `weightsmith.kernels.dispatch.quant_matmul`, which picks the fastest available kernel (the
plain-PyTorch reference on CPU, which dequantizes once and caches the result there).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from weightsmith.engine.skeleton import set_path
from weightsmith.errors import CheckpointError, UnsupportedError
from weightsmith.kernels.packing import pack_dense, unpack_dense
from weightsmith.quant.formats import FORMATS, LinearQuant, QuantizedWeight

QUANT_METHOD_TO_FORMAT = {"gptq": "gptq", "compressed-tensors": "compressed-tensors"}


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        quant: LinearQuant,
        *,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        g = quant.groups(in_features)
        b = quant.bits
        kw = {"device": device}
        self.register_buffer(
            "qweight", torch.empty(math.ceil(in_features * b / 32), out_features, dtype=torch.int32, **kw)
        )
        self.register_buffer("qzeros", torch.empty(g, math.ceil(out_features * b / 32), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.empty(g, out_features, dtype=scale_dtype, **kw))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self._kernel_cache: dict = {}  # the kernels' repacked / dequantized copies of these weights

    @property
    def bits(self) -> int:
        return self.quant.bits

    def set_quantized(self, qw: QuantizedWeight) -> None:
        with torch.no_grad():
            self.qweight.copy_(pack_dense(qw.q, self.bits).T)
            self.qzeros.copy_(pack_dense(qw.zeros, self.bits))
            self.scales.copy_(qw.scales.to(self.scales.dtype))
            self.g_idx.copy_(qw.g_idx)
        self._kernel_cache.clear()

    def codes(self) -> QuantizedWeight:
        q = unpack_dense(self.qweight.T.contiguous(), self.bits, self.in_features)
        z = unpack_dense(self.qzeros, self.bits, self.out_features)
        return QuantizedWeight(q=q, scales=self.scales.float(), zeros=z, g_idx=self.g_idx, quant=self.quant)

    def packed(self):
        """These weights as the kernels take them: tensors, bit width, grouping, and this layer's cache."""
        from weightsmith.kernels.dispatch import PackedWeight

        return PackedWeight(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            self.bits,
            self.quant.group_size,
            self.quant.sym,
            cache=self._kernel_cache,
        )

    def dequantized_weight(self, dtype: torch.dtype, device) -> torch.Tensor:
        """Dequantized weight; cached on CPU (the reference path trades memory for speed there)."""
        from weightsmith.kernels.dispatch import dequantized

        return dequantized(self.packed(), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from weightsmith.kernels.dispatch import quant_matmul

        return quant_matmul(x, self.packed(), self.bias)

    def extra_repr(self) -> str:
        g = "per-channel" if self.quant.group_size == -1 else f"group {self.quant.group_size}"
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, {g}, "
            f"{'sym' if self.quant.sym else 'asym'}"
        )


def load_quantized(ck, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from weightsmith.arch import arch_for
    from weightsmith.engine.skeleton import build_skeleton

    qc = ck.config_dict.get("quantization_config") or {}
    fmt = FORMATS[QUANT_METHOD_TO_FORMAT[qc["quant_method"]]]
    config = copy.deepcopy(ck.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    view = arch_for(config)
    model = build_skeleton(config, view, dtype)
    names = set(ck.names)
    for path, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        disk = view.module_to_disk(path)
        if disk + fmt.weight_suffix not in names:
            continue
        quant = fmt.module_quant(qc, disk)
        if quant is None:
            raise CheckpointError(f"{ck.root}: {disk} is stored quantized but quantization_config says it is not")
        scale_dtype = ck.info(disk + (".scales" if fmt.name == "gptq" else ".weight_scale")).dtype
        with torch.device("meta"):
            ql = QuantLinear(
                mod.in_features, mod.out_features, quant, bias=mod.bias is not None, scale_dtype=scale_dtype
            )
        set_path(model, path, ql)

    def get(name):
        return ck.get(name)

    for path, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        if not own or all(t.device.type != "meta" for _, t in own):
            continue
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        # constants the skeleton built for real (Gemma's embed_scale) survive to_empty
        constants = {
            n: b.detach().clone()
            for n, b in mod.named_buffers(recurse=False)
            if n in non_persistent and b.device.type != "meta"
        }
        mod.to_empty(device=device, recurse=False)
        disk = view.module_to_disk(path)
        if isinstance(mod, QuantLinear):
            mod.set_quantized(fmt.unpack(disk, get, mod.quant, mod.out_features, mod.in_features))
            if mod.bias is not None:
                mod.bias.data.copy_(ck.get(disk + ".bias"))
            continue
        own = list(mod.named_parameters(recurse=False)) + list(
            mod.named_buffers(recurse=False)
        )  # to_empty made new tensors
        for name, t in own:
            full = f"{disk}.{name}" if disk else name
            if name in non_persistent:
                if name in constants:
                    t.copy_(constants[name])
                    continue
                if name == "tokens":
                    t.zero_()
                    continue
                raise UnsupportedError(f"cannot restore non-persistent buffer {full!r}")
            if full not in names:
                if view.tied and full == view.family.lm_head:
                    continue  # tied below
                raise CheckpointError(f"{ck.root}: missing tensor {full!r}")
            with torch.no_grad():
                t.copy_(ck.get(full, dequantize=True))
    if view.tied:
        model.tie_weights()
    return model.to(device).eval()


def param_count(ck) -> int:
    """Logical parameters of a quantized checkpoint: packed weights count as their unpacked size."""
    from weightsmith.arch.spec import is_scale_name

    qc = ck.config_dict.get("quantization_config") or {}
    fmt = FORMATS[QUANT_METHOD_TO_FORMAT[qc["quant_method"]]]
    aux = (".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_zero_point", ".weight_shape")
    total = 0
    for info in ck.infos():
        if info.name.endswith(aux) or is_scale_name(info.name):
            continue
        if info.name.endswith(fmt.weight_suffix):
            prefix = info.name[: -len(fmt.weight_suffix)]
            if fmt.name == "gptq":
                total += ck.info(prefix + ".g_idx").shape[0] * info.shape[1]
            else:
                total += int(ck.get(prefix + ".weight_shape").prod())
        else:
            total += info.numel
    return total


def runtimes() -> dict:
    """{quant_method: Runtime} for every format; the app puts them into weightsmith.loading.RUNTIMES."""
    from weightsmith.loading import Runtime

    return {method: Runtime(load_quantized, param_count) for method in QUANT_METHOD_TO_FORMAT}


RUNTIMES = runtimes()
