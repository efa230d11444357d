"""Pick the best available kernel for a quantized linear call.

KERNELS is an ordered registry (fastest first); each entry says whether it can serve a call and,
when it cannot, why:

- `cuda`      weightsmith's Marlin-style CUDA kernel (sm_80+, fp16/bf16 activations, 2/3/4 bits,
              M <= CUDA_MAX_M: the memory-bound regime it is built for);
- `triton`    the Triton kernel (GPU; on the CPU only when forced with WEIGHTSMITH_KERNEL=triton
              under TRITON_INTERPRET=1 -- the interpreter is for testing, thousands of times slower);
- `dequant`   dequantize once per call + the vendor matmul (cuBLAS on GPUs): large M, where the
              GEMM is compute-bound and a dense matmul wins;
- `reference` dequantize + matmul in plain PyTorch, always available (the CPU path, and the
              oracle the others are tested against).

Each kernel names the weight layout it reads — `marlin` (kernels/marlin_layout.py: mma fragment
order) for CUDA, `planes` (kernels/layout.py: bit planes) for Triton — and the module's weights are
repacked into it once, on first use, cached on the module per (layout, dtype, device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

CUDA_MAX_M = 64  # beyond this the GEMM is compute-bound: dequantize + cuBLAS


@dataclass(frozen=True)
class Kernel:
    name: str
    unavailable: Callable[[torch.Tensor, "object"], str | None]  # (x, module) -> reason or None
    run: Callable[[torch.Tensor, "object"], torch.Tensor]
    layout: str | None = None  # the repacked weight layout it reads (LAYOUTS), if any
    emulated_on_cpu: bool = False  # serves CPU inputs only in an emulator: never picked automatically there

    def reason(self, x: torch.Tensor, module, forced: bool = False) -> str | None:
        why = self.unavailable(x, module)
        if why is None and self.emulated_on_cpu and x.device.type != "cuda" and not forced:
            why = f"input is on the CPU: the {self.name} kernel's emulator is only used when forced (WEIGHTSMITH_KERNEL={self.name})"
        return why


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _layout_reason(m) -> str | None:
    from weightsmith.kernels.layout import check_repackable

    return check_repackable(m.bits, m.in_features, m.out_features, m.g_idx, m.quant.group_size)


def _repack_planes(m, dtype):
    from weightsmith.kernels.layout import repack

    return repack(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits, m.quant.group_size, m.quant.sym, dtype)


def _repack_marlin(m, dtype):
    from weightsmith.kernels.marlin_layout import repack

    return repack(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits, m.quant.group_size, m.quant.sym, dtype)


LAYOUTS = {"planes": _repack_planes, "marlin": _repack_marlin}


def kernel_weight(m, dtype: torch.dtype, device: torch.device, layout: str = "planes"):
    """The module's weights in a kernel layout, repacked once per (layout, dtype, device). One entry
    is kept: a module served by one kernel holds one extra copy of its packed weights."""
    key = (layout, dtype, str(device))
    cache = getattr(m, "_kernel_weight", None)
    if cache is None or cache[0] != key:
        m._kernel_weight = None  # free the old copy before making the new one
        m._kernel_weight = cache = (key, LAYOUTS[layout](m, dtype).to(device))
    return cache[1]


def _via_op(opname: str, layout: str):
    def run(x: torch.Tensor, m) -> torch.Tensor:
        from weightsmith.kernels import ops

        kw = kernel_weight(m, x.dtype, x.device, layout)
        bias = None if m.bias is None else m.bias.to(device=x.device, dtype=x.dtype)
        y = ops.call(getattr(ops, opname), x.reshape(-1, m.in_features), kw, bias)
        return y.reshape(*x.shape[:-1], m.out_features)

    return run


def _cuda_unavailable(x: torch.Tensor, m) -> str | None:
    if x.device.type != "cuda":
        return "input is not on a CUDA device"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} activations (the CUDA kernel takes fp16/bf16)"
    if _rows(x) > CUDA_MAX_M:
        return f"M = {_rows(x)} > {CUDA_MAX_M}: compute-bound, dequantize + cuBLAS is faster"
    from weightsmith.kernels import cuda_ext, marlin_layout

    return marlin_layout.check(m.bits, m.in_features, m.out_features, m.quant.group_size, m.g_idx) or cuda_ext.unavailable(x.device.index or 0)


def _triton_unavailable(x: torch.Tensor, m) -> str | None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if x.device.type != "cuda" and not interpret:
        return "input is on the CPU (Triton needs a GPU; TRITON_INTERPRET=1 emulates it, slowly)"
    if x.device.type == "cuda" and _rows(x) > CUDA_MAX_M:
        return f"M = {_rows(x)} > {CUDA_MAX_M}: compute-bound, dequantize + cuBLAS is faster"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'weightsmith[triton]')"
    return _layout_reason(m)


def _dequant_unavailable(x: torch.Tensor, m) -> str | None:
    return None if x.device.type == "cuda" else "CPU inputs use the reference (with its cached dequantized weight)"


def _dequant_run(x: torch.Tensor, m) -> torch.Tensor:
    from weightsmith.kernels.reference import dequantize

    w = dequantize(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits, x.dtype)
    return torch.nn.functional.linear(x, w, m.bias)


def _reference_run(x: torch.Tensor, m) -> torch.Tensor:
    return torch.nn.functional.linear(x, m.dequantized_weight(x.dtype, x.device), m.bias)


KERNELS: list[Kernel] = [
    Kernel("cuda", _cuda_unavailable, _via_op("gemm_cuda", "marlin"), "marlin"),
    Kernel("triton", _triton_unavailable, _via_op("gemm_triton", "planes"), "planes", emulated_on_cpu=True),
    Kernel("dequant", _dequant_unavailable, _dequant_run),
    Kernel("reference", lambda x, m: None, _reference_run),
]


def choose(x: torch.Tensor, module) -> Kernel:
    forced = os.environ.get("WEIGHTSMITH_KERNEL")
    if forced:
        k = next((k for k in KERNELS if k.name == forced), None)
        if k is None:
            raise ValueError(f"WEIGHTSMITH_KERNEL={forced}: no such kernel; kernels: {', '.join(k.name for k in KERNELS)}")
        why = k.reason(x, module, forced=True)
        if why:
            raise RuntimeError(f"WEIGHTSMITH_KERNEL={forced} cannot serve this call: {why}")
        return k
    for k in KERNELS:
        if k.reason(x, module) is None:
            return k
    raise RuntimeError("no kernel available (the reference should always be)")


def explain(x: torch.Tensor, module) -> dict[str, str | None]:
    """For each kernel, None if it would serve this call, else why not."""
    return {k.name: k.reason(x, module) for k in KERNELS}


def quant_matmul(x: torch.Tensor, module) -> torch.Tensor:
    return choose(x, module).run(x, module)
