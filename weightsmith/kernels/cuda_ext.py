"""Just-in-time build of the CUDA kernel (torch.utils.cpp_extension), cached per torch/CUDA version.

`unavailable()` says in one line why the CUDA path cannot run here (no GPU, compute capability
below 8.0, no nvcc, CUDA headers missing from a CPU-only torch, or the build failed) — the
dispatcher shows that reason and falls back to Triton or the reference.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

SOURCES = [Path(__file__).parent / "marlin" / "binding.cpp", Path(__file__).parent / "marlin" / "quant_gemm.cu"]
ARCHS = ("80", "90")


def cache_dir() -> Path:
    import torch

    base = Path(os.environ.get("WEIGHTSMITH_CACHE", Path.home() / ".cache" / "weightsmith"))
    d = base / "kernels" / f"torch{torch.__version__}-cuda{torch.version.cuda}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.lru_cache(maxsize=1)
def _build():
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-std=c++17", "--use_fast_math"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return load(name="weightsmith_quant_gemm", sources=[str(s) for s in SOURCES], extra_cuda_cflags=flags,
                build_directory=str(cache_dir()), verbose=False)


@functools.lru_cache(maxsize=None)
def unavailable(device_index: int = 0) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return f"compute capability {major}.{minor} (the kernel needs sm_80 or newer: cp.async, bf16 tensor cores)"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME to build the kernel)"
    try:
        _build()
    except Exception as e:  # the compiler's first line is the useful one
        return f"the CUDA kernel failed to build: {str(e).strip().splitlines()[0][:200]}"
    return None


def quant_gemm(x, planes, scales, zeros_scaled, bias, bits: int, group_size: int, n: int):
    ext = _build()
    return ext.quant_gemm(x, planes[0], planes[1] if len(planes) > 1 else None, scales, zeros_scaled, bias, bits, group_size, n)
