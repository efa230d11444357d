"""GPU checks of the CUDA and Triton kernels (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

from weightsmith.kernels import layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MS = [1, 2, 3, 4, 8, 16, 24, 32, 48, 64, 128, 256]
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 1536), (1536, 576)]


@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "bits,group,sym",
    [(4, 128, True), (4, 32, False), (3, 64, True), (3, -1, False), (2, 32, True), (2, 128, False), (8, 128, True)],
)
def test_sweep_against_reference(impl, dtype, bits, group, sym):
    from test_kernels_cpu import kernel_weight, random_codes

    from weightsmith.kernels import cuda_ext, ops

    if impl == "cuda" and cuda_ext.unavailable():
        pytest.skip(cuda_ext.unavailable())
    op = ops.gemm_cuda if impl == "cuda" else ops.gemm_triton
    for k, n in SHAPES:
        g = group if group == -1 or k % group == 0 else 32
        qw = random_codes(bits, n, k, g, sym)
        kw = kernel_weight(qw, dtype).to("cuda")
        w = layout.dequantize(kw.to("cpu")).to("cuda")
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ w
            y = ops.call(op, x, kw).float()
            rel = ((y - ref).abs().mean() / ref.abs().mean()).item()
            assert rel < (1e-3 if dtype == torch.float16 else 8e-3), (impl, k, n, m, rel)


def test_smollm2_greedy_tokens_through_the_kernels(smollm2, cli, tmp_path, monkeypatch):
    import weightsmith

    out = tmp_path / "w4"
    assert (
        cli("quant", smollm2, out, "--method", "rtn", "--bits", "4", "--group-size", "64", "--format", "gptq").code == 0
    )
    ids = torch.tensor([[1, 504, 3458, 314, 260]], device="cuda")
    monkeypatch.setenv("WEIGHTSMITH_KERNEL", "reference")
    ref = weightsmith.load(out, dtype=torch.float16, device="cuda").generate(ids, max_new_tokens=16, do_sample=False)
    monkeypatch.delenv("WEIGHTSMITH_KERNEL")
    got = weightsmith.load(out, dtype=torch.float16, device="cuda").generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, ref)
