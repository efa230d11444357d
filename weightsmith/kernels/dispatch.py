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
order) for CUDA, `planes` (kernels/layout.py: bit planes) for Triton — and the weights are repacked
into it once, on first use, kept in the PackedWeight's cache per (layout, dtype, device).

The kernels see tensors, never a module: a `PackedWeight` is the GPTQ-orientation codes, zero
points, scales and g_idx with their bit width and grouping, plus a cache dict that the owner of the
tensors keeps (quant/runtime's QuantLinear holds one per layer and clears it when its codes change).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

CUDA_MAX_M = 64  # beyond this the GEMM is compute-bound: dequantize + cuBLAS


@dataclass
class PackedWeight:
    """A low-bit linear weight in GPTQ orientation with true zero points (see kernels/reference.py)."""

    qweight: torch.Tensor  # int32 [ceil(K*b/32), N]
    qzeros: torch.Tensor  # int32 [G, ceil(N*b/32)]
    scales: torch.Tensor  # [G, N]
    g_idx: torch.Tensor  # int32 [K]
    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    cache: dict = field(default_factory=dict)  # repacked / dequantized copies, kept by the tensors' owner

    @property
    def in_features(self) -> int:
        return self.g_idx.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]


@dataclass(frozen=True)
class Kernel:
    name: str
    unavailable: Callable[[torch.Tensor, PackedWeight], str | None]  # (x, w) -> reason or None
    run: Callable[[torch.Tensor, PackedWeight, torch.Tensor | None], torch.Tensor]  # (x, w, bias) -> y
    layout: str | None = None  # the repacked weight layout it reads (LAYOUTS), if any
    emulated_on_cpu: bool = False  # serves CPU inputs only in an emulator: never picked automatically there

    def reason(self, x: torch.Tensor, w: PackedWeight, forced: bool = False) -> str | None:
        why = self.unavailable(x, w)
        if why is None and self.emulated_on_cpu and x.device.type != "cuda" and not forced:
            why = (
                f"input is on the CPU: the {self.name} kernel's emulator is only used when forced "
                f"(WEIGHTSMITH_KERNEL={self.name})"
            )
        return why


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _layout_reason(w: PackedWeight) -> str | None:
    from weightsmith.kernels.layout import check_repackable

    return check_repackable(w.bits, w.in_features, w.out_features, w.g_idx, w.group_size)


def _repack_planes(w: PackedWeight, dtype):
    from weightsmith.kernels.layout import repack

    return repack(w.qweight, w.qzeros, w.scales, w.g_idx, w.bits, w.group_size, w.sym, dtype)


def _repack_marlin(w: PackedWeight, dtype):
    from weightsmith.kernels.marlin_layout import repack

    return repack(w.qweight, w.qzeros, w.scales, w.g_idx, w.bits, w.group_size, w.sym, dtype)


LAYOUTS = {"planes": _repack_planes, "marlin": _repack_marlin}


def kernel_weight(w: PackedWeight, dtype: torch.dtype, device: torch.device, layout: str = "planes"):
    """The weights in a kernel layout, repacked once per (layout, dtype, device). One entry is kept:
    a layer served by one kernel holds one extra copy of its packed weights."""
    key = (layout, dtype, str(device))
    cached = w.cache.get("kernel")
    if cached is None or cached[0] != key:
        w.cache["kernel"] = None  # free the old copy before making the new one
        w.cache["kernel"] = cached = (key, LAYOUTS[layout](w, dtype).to(device))
    return cached[1]


def dequantized(w: PackedWeight, dtype: torch.dtype, device) -> torch.Tensor:
    """The dense weight [N, K]; cached on CPU (the reference path trades memory for speed there)."""
    key = (dtype, str(device))
    cached = w.cache.get("dense")
    if cached is not None and cached[0] == key:
        return cached[1]
    from weightsmith.kernels.reference import dequantize

    dense = dequantize(w.qweight, w.qzeros, w.scales, w.g_idx, w.bits, dtype).to(device)
    if torch.device(device).type == "cpu":
        w.cache["dense"] = (key, dense)
    return dense


def _via_op(opname: str, layout: str):
    def run(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        from weightsmith.kernels import ops

        kw = kernel_weight(w, x.dtype, x.device, layout)
        bias = None if bias is None else bias.to(device=x.device, dtype=x.dtype)
        y = ops.call(getattr(ops, opname), x.reshape(-1, w.in_features), kw, bias)
        return y.reshape(*x.shape[:-1], w.out_features)

    return run


def _cuda_unavailable(x: torch.Tensor, m: PackedWeight) -> str | None:
    if x.device.type != "cuda":
        return "input is not on a CUDA device"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} activations (the CUDA kernel takes fp16/bf16)"
    if _rows(x) > CUDA_MAX_M:
        return f"M = {_rows(x)} > {CUDA_MAX_M}: compute-bound, dequantize + cuBLAS is faster"
    from weightsmith.kernels import cuda_ext, marlin_layout

    return marlin_layout.check(m.bits, m.in_features, m.out_features, m.group_size, m.g_idx) or cuda_ext.unavailable(
        x.device.index or 0
    )


def _triton_unavailable(x: torch.Tensor, m: PackedWeight) -> str | None:
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


def _dequant_unavailable(x: torch.Tensor, w: PackedWeight) -> str | None:
    return None if x.device.type == "cuda" else "CPU inputs use the reference (with its cached dequantized weight)"


def _dequant_run(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    from weightsmith.kernels.reference import dequantize

    dense = dequantize(w.qweight, w.qzeros, w.scales, w.g_idx, w.bits, x.dtype)
    return torch.nn.functional.linear(x, dense, bias)


def _reference_run(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, dequantized(w, x.dtype, x.device), bias)


KERNELS: list[Kernel] = [
    Kernel("cuda", _cuda_unavailable, _via_op("gemm_cuda", "marlin"), "marlin"),
    Kernel("triton", _triton_unavailable, _via_op("gemm_triton", "planes"), "planes", emulated_on_cpu=True),
    Kernel("dequant", _dequant_unavailable, _dequant_run),
    Kernel("reference", lambda x, w: None, _reference_run),
]


def choose(x: torch.Tensor, w: PackedWeight) -> Kernel:
    forced = os.environ.get("WEIGHTSMITH_KERNEL")
    if forced:
        k = next((k for k in KERNELS if k.name == forced), None)
        if k is None:
            raise ValueError(
                f"WEIGHTSMITH_KERNEL={forced}: no such kernel; kernels: {', '.join(k.name for k in KERNELS)}"
            )
        why = k.reason(x, w, forced=True)
        if why:
            raise RuntimeError(f"WEIGHTSMITH_KERNEL={forced} cannot serve this call: {why}")
        return k
    for k in KERNELS:
        if k.reason(x, w) is None:
            return k
    raise RuntimeError("no kernel available (the reference should always be)")


def explain(x: torch.Tensor, w: PackedWeight) -> dict[str, str | None]:
    """For each kernel, None if it would serve this call, else why not."""
    return {k.name: k.reason(x, w) for k in KERNELS}


def quant_matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return choose(x, w).run(x, w, bias)
