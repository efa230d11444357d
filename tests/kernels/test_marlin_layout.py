"""The CUDA kernel's fragment layout, checked on the CPU: repack round trips through the kernel's
own index arithmetic, the magic-number dequantization, the split-K plan, and the repack from an
on-disk GPTQ v1 checkpoint."""

from __future__ import annotations

import pytest
import torch
from test_kernels_cpu import random_codes

from weightsmith.kernels import marlin_layout as ml
from weightsmith.kernels.packing import pack_dense

GRID = [(b, g, sym) for b in (2, 3, 4) for g, sym in ((32, True), (64, False), (128, True), (-1, False))]


def marlin_weight(qw, dtype=torch.float16):
    return ml.repack(
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
def test_repack_round_trip_through_the_kernels_index_maths(bits, group, sym):
    qw = random_codes(bits, 80, 256, group, sym, seed=bits)
    mw = marlin_weight(qw)
    assert torch.equal(ml.unpack(mw), qw.q)
    w = {4: [4], 3: [2, 1], 2: [2]}[bits]
    assert [tuple(p.shape) for p in mw.planes] == [(256 // 64, 80 // 16 * 32 * x) for x in w]
    assert mw.nbytes() * 8 / (80 * 256) == pytest.approx(
        bits + 16 / (256 if group == -1 else group) * (1 if sym else 2)
    )
    assert (mw.zeros_scaled is None) == sym


def test_lane_words_hold_exactly_their_fragment_codes():
    """Lane 5 (r=1, t=1) of tile 0: 4-bit word 0 = k16 tile 0, pairs (k=2,3 | 10,11) x columns (1 | 9)."""
    q = torch.zeros(16, 64, dtype=torch.int32)
    for k, n, c in ((2, 1, 1), (3, 1, 2), (10, 1, 3), (11, 1, 4), (2, 9, 5), (3, 9, 6), (10, 9, 7), (11, 9, 8)):
        q[n, k] = c
    word = int(ml.repack_codes(q, 4)[0].reshape(1, 1, 32, 4)[0, 0, 5, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * f)) & 0xF for f in range(8)]
    assert nibbles == [1, 3, 5, 7, 2, 4, 6, 8]  # pair j = fields (j, j + 4): (k, k + 1) of register (s, kh)
    assert ml.repack_codes(q, 4)[0].reshape(1, 1, 32, 4)[0, 0, [0, 4, 6], :].abs().sum() == 0  # other lanes untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "bits,group,sym", [(4, 32, True), (4, 128, False), (3, 64, True), (3, -1, False), (2, 32, False), (2, 128, True)]
)
def test_register_dequantization_matches_the_grid(dtype, bits, group, sym):
    """The magic-number trick gives the codes exactly; the scale step rounds once, in `dtype`."""
    qw = random_codes(bits, 48, 256, group, sym, seed=3)
    mw = marlin_weight(qw, dtype)
    ref = qw.dequantize().T  # fp32 [K, N]
    got = ml.dequant_fragments(mw, dtype).float()
    eps = torch.finfo(dtype).eps
    assert ((got - ref).abs() <= ref.abs() * eps + 2 * mw.scales.float().abs().max() * eps * 2**bits).all()
    if sym:  # symmetric: (c - z) exact, then one rounding of (c - z) * s -> the correctly rounded value
        exact = ((qw.q.T.double() - 2 ** (bits - 1)) * mw.scales.double()[torch.arange(256) // mw.group_size]).to(dtype)
        assert torch.equal(got.to(dtype), exact)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
def test_emulated_kernel_matches_reference_on_exactly_representable_weights(m):
    """The test Marlin uses: integer codes times power-of-two scales are exact in fp16; the CPU
    emulation of the kernel (fragments, fp32 split-K partials in fixed order) stays within 1e-3."""
    gen = torch.Generator().manual_seed(m)
    for bits, group, sym in ((4, 128, True), (3, 64, False), (2, 32, True)):
        qw = random_codes(bits, 256, 1024, group, sym, seed=m)
        qw.scales = 2.0 ** torch.randint(-10, -6, qw.scales.shape, generator=gen).float()
        mw = marlin_weight(qw)
        x = torch.randn(m, 1024, generator=gen).half()
        ref = x.double() @ qw.dequantize().T.double()
        for sms in (1, 132):  # no split, and split-K
            y = ml.emulate_gemm(x, mw, sms=sms).double()
            assert ((y - ref).abs().mean() / ref.abs().mean()).item() < 1e-3
        assert ml.split_plan(1024, 256, 132, 2)[0] > 1


def test_split_plan_fills_the_gpu_and_covers_k():
    for k, n in ((4096, 4096), (8192, 8192), (14336, 4096), (576, 576), (8192, 28672)):
        splits, per = ml.split_plan(k, n, 132, 2)
        blocks = -(-n // ml.NB) * splits
        assert (splits - 1) * per < k // ml.KB <= splits * per  # every k-block once, no empty split
        assert blocks >= 132 or splits == min(
            32, max(1, k // ml.KB // 4)
        )  # fills the SMs, or splits as far as allowed (>= 4 k-blocks each)


def test_check_explains_what_the_cuda_kernel_cannot_serve():
    gi = torch.arange(256) // 32
    assert ml.check(4, 256, 64, 32, gi) is None
    assert "8-bit" in ml.check(8, 256, 64, 32)
    assert "out_features % 16" in ml.check(4, 256, 72, 32)
    assert "in_features % 64" in ml.check(4, 224, 64, 32)
    assert "group size 16" in ml.check(4, 256, 64, 16)
    assert "g_idx" in ml.check(4, 256, 64, 32, gi.flip(0))
    qw = random_codes(4, 72, 256, 32, True)
    with pytest.raises(ValueError, match="out_features % 16"):
        marlin_weight(qw)


def test_repack_is_pure_and_deterministic():
    qw = random_codes(3, 64, 256, 64, False, seed=7)
    a, b = marlin_weight(qw), marlin_weight(qw)
    assert all(torch.equal(x, y) for x, y in zip(a.planes, b.planes)) and torch.equal(a.zeros_scaled, b.zeros_scaled)


@pytest.mark.parametrize("bits", [4, 2])
def test_repack_from_an_on_disk_gptq_v1_checkpoint(bits, tiny_model, cli, tmp_path):
    """weightsmith quant writes GPTQ v1 (zero - 1 on disk); loading it and repacking for the CUDA
    kernel gives back the codes a by-the-book v1 reader finds in the file."""
    from safetensors import safe_open

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
            str(bits),
            "--group-size",
            "32",
            "--no-sym",
            "--format",
            "gptq",
        ).code
        == 0
    )
    model = weightsmith.load(out, dtype=torch.float16)
    name, mod = next(
        (n, m) for n, m in model.named_modules() if type(m).__name__ == "QuantLinear" and m.out_features % 16 == 0
    )
    mw = ml.repack(
        mod.qweight, mod.qzeros, mod.scales, mod.g_idx, mod.bits, mod.quant.group_size, mod.quant.sym, torch.float16
    )
    prefix = next(p for p in _disk_prefixes(out) if p.endswith(name.split("model.", 1)[-1]) or p.endswith(name))
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        qweight, qzeros = f.get_tensor(prefix + ".qweight"), f.get_tensor(prefix + ".qzeros")
    pf, mask = 32 // bits, (1 << bits) - 1
    words = qweight.to(torch.int64) & 0xFFFFFFFF  # [K / pf, N]
    codes = torch.stack([(words >> (bits * j)) & mask for j in range(pf)], 1).reshape(-1, words.shape[1]).T  # [N, K]
    assert torch.equal(ml.unpack(mw), codes.to(torch.int32))
    zw = qzeros.to(torch.int64) & 0xFFFFFFFF  # [G, N / pf], stored zero = true zero - 1
    zeros = torch.stack([(zw >> (bits * j)) & mask for j in range(pf)], 2).reshape(zw.shape[0], -1) + 1
    torch.testing.assert_close(mw.zeros_scaled.float(), (zeros.float() * mod.scales.float()).half().float())


def _disk_prefixes(path):
    from safetensors import safe_open

    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as f:
        return [k[: -len(".qweight")] for k in f.keys() if k.endswith(".qweight")]
