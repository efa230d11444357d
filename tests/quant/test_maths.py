"""Pure quantization maths: grids, GPTQ, packing."""

from __future__ import annotations

import pytest
import torch

from weightsmith.kernels.packing import pack_dense, unpack_dense
from weightsmith.quant.gptq import GPTQSpec, gptq_quantize, output_error
from weightsmith.quant.grid import GridSpec, dequantize_codes, find_params, rtn


def _correlated(k=256, rows=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(rows, k, generator=g) @ a + 0.05 * torch.randn(rows, k, generator=g)
    return x.T @ x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip(bits):
    v = torch.randint(0, 2**bits, (7, 96), generator=torch.Generator().manual_seed(bits))
    p = pack_dense(v, bits)
    assert p.dtype == torch.int32 and p.shape == (7, 96 * bits // 32)
    assert torch.equal(unpack_dense(p, bits, 96), v.int())
    with pytest.raises(ValueError):
        pack_dense(torch.full((1, 32), 2**bits), bits)


@pytest.mark.parametrize(
    "bits,group,sym", [(4, 64, True), (4, -1, True), (3, 64, False), (2, 32, True), (8, 128, False)]
)
@pytest.mark.parametrize("act_order", ["none", "static", "group"])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group, sym, act_order):
    h = _correlated()
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    q, s, z, gi = rtn(w, GridSpec(bits, sym), group)
    e_rtn = output_error(w, dequantize_codes(q, s, z, gi), h)
    r = gptq_quantize(w, h, GPTQSpec(GridSpec(bits, sym), group, act_order))
    e_gptq = output_error(w, dequantize_codes(r.q, r.scales, r.zeros, r.g_idx), h)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # g_idx never needs reordering at inference, whatever the act order
    assert torch.equal(r.g_idx, torch.arange(256, dtype=torch.int32) // (256 if group == -1 else group))
    assert int(r.q.min()) >= 0 and int(r.q.max()) < 2**bits


def test_weights_on_the_grid_are_exact():
    g = torch.Generator().manual_seed(2)
    scales = torch.rand(64, 1, generator=g) + 0.1
    codes = torch.randint(0, 16, (64, 128), generator=g)
    codes[:, 0], codes[:, 1] = 0, 15  # min and max present: the min/max fit recovers the grid
    w = scales * (codes - 7).float()
    q, s, z, gi = rtn(w, GridSpec(4, sym=False), -1)
    assert torch.allclose(dequantize_codes(q, s, z, gi), w, atol=1e-5)
    r = gptq_quantize(w, _correlated(128), GPTQSpec(GridSpec(4, sym=False), -1, "none"))
    assert torch.allclose(dequantize_codes(r.q, r.scales, r.zeros, r.g_idx), w, atol=1e-4)


def test_damp_raised_when_cholesky_fails_and_dead_columns():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))  # rank 8 < 64: singular Hessian
    h = x.T @ x
    h[5, :] = 0
    h[:, 5] = 0
    w = torch.randn(16, 64)
    r = gptq_quantize(w, h, GPTQSpec(GridSpec(4), 32, "static", damp=0.0))
    assert r.damp > 0 and r.dead_columns == 1
    assert torch.all(dequantize_codes(r.q, r.scales, r.zeros, r.g_idx)[:, 5] == 0)


def test_mse_clipping_not_worse():
    w = torch.randn(32, 128) ** 3  # heavy tails: clipping helps
    for sym in (True, False):
        plain = find_params(w, GridSpec(4, sym))
        mse = find_params(w, GridSpec(4, sym, mse=True))

        def err(p):
            from weightsmith.quant.grid import dequantize, quantize

            s, z = p[0][:, None], p[1][:, None]
            return float((dequantize(quantize(w, s, z, 15), s, z) - w).pow(2).sum())

        assert err(mse) <= err(plain)


def test_fp_target_solves_the_asymmetric_least_squares():
    """GPTAQ's target W' minimises ‖X·W'ᵀ − X̃·Wᵀ‖ (undampened), and is W itself when X̃ = X."""
    from weightsmith.quant.gptq import gptq_fp_target

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=g, dtype=torch.float64)
    xt = x + 0.1 * torch.randn(400, 24, generator=g, dtype=torch.float64)  # the full-precision model's inputs
    w = torch.randn(8, 24, generator=g, dtype=torch.float64)
    h = x.T @ x
    assert torch.allclose(gptq_fp_target(w, h, h, 0.05).double(), w, atol=1e-6)
    wp = gptq_fp_target(w, h, xt.T @ x, 0.0).double()
    best = torch.linalg.lstsq(x, xt @ w.T).solution.T
    assert torch.allclose(wp, best, atol=1e-4)
    assert (x @ wp.T - xt @ w.T).norm() < (x @ w.T - xt @ w.T).norm()


def test_importance_weighted_mse_search():
    """With column importances (GPTQ passes sqrt(diag H)) the clipping search minimises the
    importance-weighted squared error: never worse by that measure than min/max or the unweighted
    search, and strictly better when one column dominates the layer's inputs."""
    from weightsmith.quant.grid import dequantize, quantize

    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 64, generator=g) ** 3
    imp = torch.rand(64, generator=g) * 0.1
    imp[3] = 100.0  # one input channel carries most of the signal

    def werr(p):
        s, z = p[0][:, None], p[1][:, None]
        return float(((dequantize(quantize(w, s, z, 7), s, z) - w).square() * imp).sum())

    spec = GridSpec(3, True, mse=True)
    weighted = werr(find_params(w, spec, importance=imp))
    assert weighted <= werr(find_params(w, GridSpec(3, True))) and weighted < 0.9 * werr(find_params(w, spec))
    with pytest.raises(ValueError, match="importance has shape"):
        find_params(w, spec, importance=imp[:10])


def test_gptq_mse_lowers_output_error_on_outlier_inputs():
    """GPTQ with the importance-weighted `mse` search beats GPTQ on min/max grids at 3 and 2 bits
    when a few input channels are large (as in real residual streams)."""
    h = _correlated()
    scale = torch.ones(256)
    scale[::37] = 20.0  # a few outlier channels
    h = h * scale[:, None] * scale[None, :]
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) ** 3 * 0.05
    for bits, group in ((3, 64), (2, 32)):
        err = {}
        for mse in (False, True):
            r = gptq_quantize(w, h, GPTQSpec(GridSpec(bits, True, mse), group, "static"))
            err[mse] = output_error(w, dequantize_codes(r.q, r.scales, r.zeros, r.g_idx), h)
        assert err[True] < 0.9 * err[False], (bits, err)
