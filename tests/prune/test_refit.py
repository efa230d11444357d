"""Closed-form repair after channel removal (weightsmith.prune.refit)."""

import torch

from weightsmith.prune import refit


def _data(n=48, rows=400, out=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5
    x = torch.randn(rows, n, generator=g) @ mix + 0.5  # correlated channels with a non-zero mean
    w = torch.randn(out, n, generator=g)
    return w, x, x.T @ x


def test_refit_beats_plain_slicing_on_calibration():
    w, x, gram = _data()
    keep = torch.arange(0, 48, 2)  # half the channels
    sliced = refit.output_error(w, gram, keep, w[:, keep])
    fitted = refit.output_error(w, gram, keep, refit.refit_columns(w, gram, keep))
    direct = float(((x @ w.T - x[:, keep] @ refit.refit_columns(w, gram, keep).T) ** 2).sum())
    assert fitted < 0.5 * sliced
    assert abs(direct - fitted) / fitted < 1e-3  # the Gram form is the error on the rows themselves


def test_nothing_removed_is_exact():
    w, _, gram = _data()
    keep = torch.arange(48)
    assert torch.equal(refit.refit_columns(w, gram, keep), w)
    assert torch.equal(refit.obs_update(w, gram, keep), w)
    assert refit.output_error(w, gram, keep, w) == 0.0


def test_obs_update_is_the_same_minimiser():
    w, _, gram = _data()
    keep = torch.tensor([1, 3, 4, 10, 20, 30, 31, 40, 47])
    a = refit.refit_columns(w.double(), gram.double(), keep, damp=0.0)
    b = refit.obs_update(w.double(), gram.double(), keep, damp=0.0)
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_least_squares_beats_mean_compensation_without_bias():
    # FLAP moves W_R E[x_R] into a bias; with no bias available the refit must still do better
    # than slicing, and (on correlated channels) better than FLAP even with its bias
    w, x, gram = _data(seed=3)
    keep = torch.arange(0, 48, 3)
    b = refit.mean_bias(w, x.mean(0), keep)
    flap = float(((x @ w.T - (x[:, keep] @ w[:, keep].T + b.float())) ** 2).sum())
    ls = refit.output_error(w, gram, keep, refit.refit_columns(w, gram, keep))
    assert ls < flap


def test_degenerate_gram_falls_back():
    w = torch.randn(4, 6)
    gram = torch.zeros(6, 6)
    out = refit.refit_columns(w, gram, torch.tensor([0, 2, 4]))
    assert torch.isfinite(out).all() and out.shape == (4, 3)
