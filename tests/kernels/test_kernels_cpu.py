"""Kernel layout, Triton (interpreter on CPU), torch.library ops and the dispatcher."""

from __future__ import annotations

import os

import pytest
import torch

from weightsmith.kernels import layout
from weightsmith.kernels.packing import pack_dense
from weightsmith.quant.formats.base import LinearQuant, QuantizedWeight

GRID = [(b, g, sym) for b in (2, 3, 4, 8) for g, sym in ((32, True), (64, False), (128, True), (-1, False))]


def random_codes(bits, n, k, group, sym, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.int32, generator=gen)
    groups = 1 if group == -1 else k // group
    s = torch.rand(groups, n, generator=gen) * 0.05 + 0.01
    z = (
        torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32)
        if sym
        else torch.randint(0, 2**bits, (groups, n), dtype=torch.int32, generator=gen)
    )
    gi = (torch.arange(k) // (k if group == -1 else group)).int()
    return QuantizedWeight(q, s, z, gi, LinearQuant(bits, group, sym))


def kernel_weight(qw, dtype=torch.float16):
    return layout.repack(
        pack_dense(qw.q, qw.quant.bits).T.contiguous(),
        pack_dense(qw.zeros, qw.quant.bits),
        qw.scales.to(dtype),
        qw.g_idx,
        qw.quant.bits,
        qw.quant.group_size,
        qw.quant.sym,
        dtype,
    )


@pytest.mark.parametrize("bits,group,sym", GRID)
def test_repack_round_trip(bits, group, sym):
    qw = random_codes(bits, 72, 256, group, sym)
    kw = kernel_weight(qw, torch.float32)
    assert torch.equal(layout.unpack(kw), qw.q)  # the kernels' index arithmetic gives the codes back
    assert [p.shape for p in kw.planes] == [(256 // (32 // w), 72) for w in layout.PLANES[bits]]
    torch.testing.assert_close(layout.dequantize(kw), qw.dequantize().T, rtol=1e-6, atol=1e-6)
    assert (kw.zeros_scaled is None) == sym


def test_layout_interleaves_halves_of_a_word():
    assert layout.perm(4) == [0, 2, 4, 6, 1, 3, 5, 7]
    q = torch.arange(8, dtype=torch.int32)[None, :].repeat(1, 4)  # one column, k = 0..31 -> codes k % 8
    w = layout.repack_codes(q, 4)[0]
    assert int(w[0, 0]) & 0xF == 0 and (int(w[0, 0]) >> 4) & 0xF == 4  # k=0 then k=4 in the next nibble


def test_repack_refuses_what_kernels_cannot_serve():
    qw = random_codes(4, 16, 64, 32, True)
    bad = qw.g_idx.flip(0)
    assert "g_idx" in layout.check_repackable(4, 64, 16, bad, 32)
    assert "multiple of 32" in layout.check_repackable(4, 48, 16, torch.zeros(48, dtype=torch.int32), -1)
    assert "5-bit" in layout.check_repackable(5, 64, 16, qw.g_idx, 32)


needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="no GPU and no TRITON_INTERPRET"
)


@needs_interpreter
@pytest.mark.parametrize(
    "bits,group,sym", [(2, 32, True), (3, 64, False), (4, 128, True), (4, -1, False), (8, 32, True)]
)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_triton_matches_reference(bits, group, sym, m):
    pytest.importorskip("triton")
    from weightsmith.kernels.triton_kernel import quant_matmul

    qw = random_codes(bits, 96, 256, group, sym, seed=m)
    kw = kernel_weight(qw)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(1)).half()
    ref = x.float() @ layout.dequantize(kw)
    y = quant_matmul(x, kw).float()
    assert (y - ref).abs().mean() / ref.abs().mean() < 1e-3


def test_ops_have_fake_implementations():
    from test_marlin_layout import marlin_weight

    from weightsmith.kernels import ops

    qw = random_codes(3, 64, 128, 32, False)
    kw = kernel_weight(qw, torch.float32)
    x = torch.randn(5, 128)
    args = (x, kw.planes[0], kw.planes[1], kw.scales, kw.zeros_scaled, 3, 32, 64)
    torch.library.opcheck(torch.ops.weightsmith.gemm_ref.default, args)
    mw = marlin_weight(qw)
    bias = torch.randn(64).half()
    cuda_args = (x.half(), mw.planes[0], mw.planes[1], mw.scales, mw.zeros_scaled, bias, 3, 32, 64)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in cuda_args]
        out = torch.ops.weightsmith.gemm_cuda(*fake)
        assert out.shape == (5, 64) and out.dtype == torch.float16
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert torch.ops.weightsmith.gemm_triton(*fake).shape == (5, 64)
    torch.testing.assert_close(ops.call(ops.gemm_ref, x, kw), x @ layout.dequantize(kw), rtol=1e-5, atol=1e-5)


def test_ops_trace_under_torch_compile():
    """The fake implementations let torch.compile trace a graph through the op (no graph break)."""
    from weightsmith.kernels import ops

    qw = random_codes(4, 64, 128, 32, True)
    kw = kernel_weight(qw, torch.float32)
    x = torch.randn(3, 128)
    fn = torch.compile(lambda a: ops.call(ops.gemm_ref, a, kw) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x), 2 * (x @ layout.dequantize(kw)), rtol=1e-5, atol=1e-5)


def _quant_linear(bits=4, group=32, sym=True, k=128, n=64):
    from weightsmith.quant.runtime import QuantLinear

    qw = random_codes(bits, n, k, group, sym)
    m = QuantLinear(k, n, qw.quant, scale_dtype=torch.float16)
    m.set_quantized(qw)
    return m, qw


def test_dispatcher_explains_and_falls_back(monkeypatch):
    from weightsmith.kernels import dispatch

    m, qw = _quant_linear()
    x = torch.randn(2, 128)
    m = m.packed()  # the kernels take tensors, not the module
    why = dispatch.explain(x, m)
    assert why["cuda"] == "input is not on a CUDA device" and why["reference"] is None
    assert why["dequant"].startswith("CPU inputs")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter on, CPU calls never pick it unforced
    assert "only used when forced" in dispatch.explain(x, m)["triton"]
    assert dispatch.choose(x, m).name == "reference"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in dispatch.explain(x, m)["triton"]
    assert dispatch.choose(x, m).name == "reference"
    monkeypatch.setenv("WEIGHTSMITH_KERNEL", "cuda")
    with pytest.raises(RuntimeError, match="cannot serve this call: input is not on a CUDA device"):
        dispatch.choose(x, m)


@needs_interpreter
def test_quantized_model_generates_the_same_tokens_through_triton(tiny_model, cli, tmp_path, monkeypatch):
    pytest.importorskip("triton")
    import weightsmith

    out = tmp_path / "q"
    assert (
        cli(
            "quant",
            tiny_model("llama"),
            out,
            "--method",
            "rtn",
            "--bits",
            "4",
            "--group-size",
            "32",
            "--format",
            "gptq",
        ).code
        == 0
    )
    ids = torch.tensor([[5, 17, 42, 9]])
    monkeypatch.setenv("WEIGHTSMITH_KERNEL", "reference")
    ref = weightsmith.load(out, dtype=torch.float16).generate(ids, max_new_tokens=6, do_sample=False)
    monkeypatch.setenv("WEIGHTSMITH_KERNEL", "triton")
    model = weightsmith.load(out, dtype=torch.float16)
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, ref)
    assert any(
        getattr(mod, "_kernel_cache", {}).get("kernel") is not None for mod in model.modules()
    )  # really went through the kernel
