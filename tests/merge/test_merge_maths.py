"""Pure merge maths on random tensors: interpolation paths agree with the fp32 definition, the δ
gate's sums do not depend on how a tensor is cut."""

from __future__ import annotations

import math

import torch

from weightsmith.merge.maths import interpolate, interpolate_into, square_sums


def test_interpolate_into_matches_fp32_definition():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ts = [torch.randn(4097, generator=g).to(dtype) for _ in range(3)]
        for lam in ((0.3, 0.7, 0.0), (0.2, 0.3, 0.5), (0.0, 1.0, 0.0), (0.5, 0.0, 0.5)):
            ref = sum(l * t.float() for l, t in zip(lam, ts))
            out = interpolate_into([t if l else None for t, l in zip(ts, lam)], lam, torch.empty(4097, dtype=dtype))
            # rounded once to the output dtype: within half an ulp of the fp32 value (lerp: one more fp32 rounding)
            torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=torch.finfo(dtype).eps, atol=1e-6)
        assert torch.equal(
            interpolate_into([None, ts[1], None], (0.0, 1.0, 0.0), torch.empty(4097, dtype=dtype)), ts[1]
        )
    # a cast on the way (selection with --out-dtype)
    x = torch.randn(100, generator=g)
    assert torch.equal(interpolate_into([x], (1.0,), torch.empty(100, dtype=torch.bfloat16)), x.bfloat16())
    assert torch.equal(interpolate([x, x], [0.25, 0.75]), x)


def test_square_sums_do_not_depend_on_the_cut():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10_000, generator=g)
    whole = math.fsum(square_sums(x, 64))
    for cut in (64, 640, 6400):
        parts = [square_sums(x[a : a + cut], 64) for a in range(0, x.numel(), cut)]
        assert math.fsum(v for p in parts for v in p) == whole
    assert abs(whole - float(x.double().square().sum())) < 1e-9 * whole
    m = torch.randn(300, 50, generator=g)
    assert math.fsum(square_sums(m, 64)) == math.fsum(square_sums(m[:128], 64) + square_sums(m[128:], 64))
