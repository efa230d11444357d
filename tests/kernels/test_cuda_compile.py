"""The CUDA sources compile for sm_80 and sm_90 (nvcc, no GPU needed); the binding too where
torch ships its CUDA headers."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from weightsmith.kernels import cuda_ext

nvcc = shutil.which("nvcc") or (Path("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(nvcc is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", cuda_ext.ARCHS)
def test_kernel_compiles(arch, tmp_path):
    src = next(s for s in cuda_ext.SOURCES if s.suffix == ".cu")
    r = subprocess.run([str(nvcc), "-std=c++17", "-O3", f"-arch=sm_{arch}", "-c", str(src), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 10_000
    # every bits x dtype x sym instantiation is in the object
    syms = subprocess.run(["nm", "-C", str(tmp_path / "k.o")], capture_output=True, text=True).stdout
    for bits, w0, w1 in ((2, 2, 0), (3, 2, 1), (4, 4, 0), (8, 8, 0)):
        assert f"quant_gemm_kernel<__half, {bits}, {w0}, {w1}, true>" in syms or f"quant_gemm_kernel<half, {bits}, {w0}, {w1}, true>" in syms


def test_binding_compiles_where_torch_has_cuda_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths

    try:
        paths = include_paths(device_type="cuda")
    except OSError as e:  # CUDA_HOME unset and no default toolkit location
        pytest.skip(str(e))
    if not any((Path(p) / "ATen" / "cuda" / "CUDAContext.h").exists() for p in paths):
        pytest.skip("this torch build ships no CUDA headers (CPU wheel): the binding is compiled by the JIT build on GPU machines")
    cxx = shutil.which("g++") or pytest.skip("no C++ compiler")
    src = next(s for s in cuda_ext.SOURCES if s.suffix == ".cpp")
    args = [cxx, "-std=c++17", "-fsyntax-only", str(src), "-DTORCH_EXTENSION_NAME=ws", f"-I{sysconfig.get_paths()['include']}", "-I/usr/local/cuda/include"]
    r = subprocess.run(args + [f"-I{p}" for p in paths], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_unavailable_says_why_on_this_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cuda_ext.unavailable() == "no CUDA device"
