"""The CUDA sources compile for sm_80 and sm_90 (nvcc, no GPU needed); the binding too where
torch ships its CUDA headers."""

from __future__ import annotations

import re
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
    r = subprocess.run(
        [
            str(nvcc),
            *cuda_ext.NVCC_FLAGS,
            *cuda_ext.gencode(arch),
            f"-I{cuda_ext.SRC_DIR}",
            "--resource-usage",
            "-c",
            str(src),
            "-o",
            str(tmp_path / "k.o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 10_000
    # every dtype x bits x m-tiles x sym instantiation is in the object ...
    syms = subprocess.run(["nm", "-C", str(tmp_path / "k.o")], capture_output=True, text=True).stdout
    for dtype in ("__half", "__nv_bfloat16"):
        for bits in (2, 3, 4):
            for mt in (1, 2, 3, 4):
                for sym in ("true", "false"):
                    assert f"marlin_gemm_kernel<{dtype}, {bits}, {mt}, {sym}>" in syms, (dtype, bits, mt, sym)
    # ... and none spills registers to local memory (ptxas' report, one line per kernel)
    report = r.stdout + r.stderr
    assert report.count("0 bytes spill stores, 0 bytes spill loads") >= 48, report[-2000:]
    assert "bytes stack frame" in report and not re.search(r"[1-9]\d* bytes spill", report)


@pytest.mark.skipif(nvcc is None, reason="nvcc is not installed")
def test_kernel_uses_the_marlin_instructions(tmp_path):
    """The PTX has the pieces the design relies on: tensor-core mma.sync for fp16 and bf16, cp.async
    with an L2 evict-first policy for the weights, lop3 dequantization, and no int->float conversion
    of codes in the inner loop."""
    src = next(s for s in cuda_ext.SOURCES if s.suffix == ".cu")
    r = subprocess.run(
        [
            str(nvcc),
            "-std=c++17",
            "-O3",
            "-arch=sm_80",
            f"-I{cuda_ext.SRC_DIR}",
            "-ptx",
            str(src),
            "-o",
            str(tmp_path / "k.ptx"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert (
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
        and "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    )
    assert "cp.async.cg.shared.global.L2::cache_hint" in ptx and "createpolicy.fractional.L2::evict_first" in ptx
    assert "lop3.b32" in ptx and "cp.async.wait_group 2" in ptx
    assert "cvt.rn.f16.s32" not in ptx and "cvt.rn.f16.u32" not in ptx


@pytest.mark.skipif(nvcc is None, reason="nvcc is not installed (no CUDA runtime headers)")
def test_binding_compiles(tmp_path):
    """The torch binding type-checks against torch's headers and the CUDA runtime's. The CPU wheel
    ships c10/cuda's headers but not the one CMake generates; a one-line shim stands in for it."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or pytest.skip("no C++ compiler")
    cuda_include = Path(nvcc).resolve().parent.parent / "include"
    if not (cuda_include / "cuda_runtime.h").exists():
        cuda_include = Path("/usr/local/cuda/include")
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    src = next(s for s in cuda_ext.SOURCES if s.suffix == ".cpp")
    args = [
        cxx,
        "-std=c++17",
        "-fsyntax-only",
        str(src),
        "-DTORCH_EXTENSION_NAME=ws",
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{cuda_include}",
        f"-I{tmp_path / 'shim'}",
        f"-I{cuda_ext.SRC_DIR}",
    ]
    r = subprocess.run(args + [f"-I{p}" for p in include_paths()], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_unavailable_says_why_on_this_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cuda_ext.unavailable() == "no CUDA device"
