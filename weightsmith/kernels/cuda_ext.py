"""Just-in-time build of the Marlin-style CUDA kernel (torch.utils.cpp_extension), cached per
torch / CUDA version and GPU architecture under $WEIGHTSMITH_CACHE (default ~/.cache/weightsmith).

`unavailable()` says in one line why the CUDA path cannot run here (no GPU, compute capability
below 8.0, no nvcc, a CPU-only torch, or the build failed) — the dispatcher shows that reason and
falls back to Triton or the reference.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

SRC_DIR = Path(__file__).parent / "marlin"
SOURCES = [SRC_DIR / "binding.cpp", SRC_DIR / "quant_gemm.cu"]
HEADERS = [SRC_DIR / "quant_gemm.cuh"]
ARCHS = ("80", "90")  # what CI compile-checks; the JIT build targets the GPU it runs on
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]


def cache_dir(arch: str) -> Path:
    import torch

    base = Path(os.environ.get("WEIGHTSMITH_CACHE", Path.home() / ".cache" / "weightsmith"))
    d = base / "kernels" / f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{arch}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def gencode(arch: str) -> list[str]:
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


@functools.lru_cache(maxsize=None)
def _build(arch: str):
    from torch.utils.cpp_extension import load

    return load(
        name=f"weightsmith_quant_gemm_sm{arch}",
        sources=[str(s) for s in SOURCES],
        extra_include_paths=[str(SRC_DIR)],
        extra_cuda_cflags=NVCC_FLAGS + gencode(arch),
        build_directory=str(cache_dir(arch)),
        verbose=False,
    )


def _arch(device_index: int) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}{minor}"


@functools.lru_cache(maxsize=None)
def unavailable(device_index: int = 0) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return f"compute capability {major}.{minor} (the kernel needs sm_80 or newer: cp.async, bf16 mma.sync)"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME to build the kernel)"
    try:
        _build(_arch(device_index))
    except Exception as e:  # the compiler's first line is the useful one
        return f"the CUDA kernel failed to build: {str(e).strip().splitlines()[0][:200]}"
    return None


def quant_gemm(x, planes, scales, zeros_scaled, bias, bits: int, group_size: int, n: int):
    ext = _build(_arch(x.device.index or 0))
    return ext.quant_gemm(
        x, planes[0], planes[1] if len(planes) > 1 else None, scales, zeros_scaled, bias, bits, group_size, n
    )
