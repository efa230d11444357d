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


def test_target_refit_corrects_input_drift():
    # the source's output y = W x; the pruned model sees drifted inputs x' = x + noise and keeps K:
    # fitting to y from x'_K beats both slicing and fitting to the pruned model's own W x'
    w, x, _ = _data(seed=5)
    g = torch.Generator().manual_seed(9)
    xp = x + 0.3 * torch.randn(x.shape, generator=g)
    keep = torch.arange(0, 48, 2)
    y = x @ w.T
    gp = xp.T @ xp
    cross = y.T @ xp[:, keep]
    y_sq = float((y.double() ** 2).sum())
    gkk = gp[keep][:, keep]
    own = refit.refit_columns(w, gp, keep)
    fit = refit.refit_to_target(gkk, cross)
    errs = {
        name: refit.target_error(y_sq, cross, gkk, wk)
        for name, wk in (("sliced", w[:, keep]), ("own", own), ("target", fit))
    }
    direct = float(((y - xp[:, keep] @ fit.T) ** 2).sum())
    assert abs(direct - errs["target"]) / errs["target"] < 1e-3
    assert errs["target"] < errs["own"] < errs["sliced"]


def test_obs_selection_loses_less_than_activation_ranking():
    # channels with large activations but well predicted by others should go before small
    # unpredictable ones: greedy OBS picks the set whose repaired error is lower
    w, x, gram = _data(n=96, rows=2000, out=32, seed=0)
    x[:, :10] *= 5
    gram = x.T @ x
    top = torch.sort(torch.topk(x.abs().mean(0), 48).indices).values
    obs = refit.obs_select(w, gram, 48)
    err = {
        k: refit.output_error(w, gram, keep, refit.refit_columns(w, gram, keep))
        for k, keep in (("act", top), ("obs", obs))
    }
    assert obs.numel() == 48 and torch.equal(obs, torch.sort(obs).values)
    assert err["obs"] < 0.9 * err["act"], err
    # one round removes by the initial costs only: re-scoring after each round is what helps
    one = refit.obs_select(w, gram, 48, steps=1)
    assert err["obs"] < refit.output_error(w, gram, one, refit.refit_columns(w, gram, one))


def test_obs_selection_of_head_groups_and_keeping_everything():
    w, _, gram = _data(n=48, out=16, seed=2)
    kept = refit.obs_select(w, gram, 4, group=8)  # 6 heads of 8 channels -> keep 4
    assert kept.numel() == 4 and kept.max() < 6
    assert torch.equal(refit.obs_select(w, gram, 6, group=8), torch.arange(6))


def test_guard_refuses_a_repair_that_is_worse_on_held_out_windows():
    # independent channels and few rows: predicting the removed channels from the kept ones is
    # pure overfitting; the fixed-ridge repair is worse than slicing on the other fold, the
    # cross-validated choice keeps the slicing
    g = torch.Generator().manual_seed(4)
    n, rows = 64, 48
    w = torch.randn(8, n, generator=g)
    xa, xb = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g)
    fa, fb = xa.T @ xa, xb.T @ xb
    keep = torch.arange(0, n, 2)
    fit = refit.refit_columns(w, fa, keep)
    assert refit.output_error(w, fb, keep, fit) > refit.output_error(w, fb, keep, w[:, keep])
    assert refit.choose_damp(w, [fa, fb], keep) is None
    # correlated channels: the repair generalises and is kept
    w, x, _ = _data(rows=800, seed=6)
    folds = [x[::2].T @ x[::2], x[1::2].T @ x[1::2]]
    assert refit.choose_damp(w, folds, keep[:24]) is not None


def test_saliency_is_the_error_left_after_repairing_one_removal():
    w, _, gram = _data()
    s = refit.obs_saliency(w, gram, damp=0.0)
    for j in (0, 17, 47):
        keep = torch.tensor([k for k in range(48) if k != j])
        err = refit.output_error(w, gram, keep, refit.refit_columns(w, gram, keep, damp=0.0))
        assert abs(float(s[j]) - err) / err < 1e-3, (j, float(s[j]), err)


def test_target_cross_validation_is_the_held_out_error():
    """cv_target's eigen-form equals fitting on one fold and measuring on the other; the guard
    keeps the sliced columns when every fit is worse on held-out windows."""
    g = torch.Generator().manual_seed(1)
    w, x, _ = _data(n=20, rows=600)
    keep = torch.arange(0, 20, 2)
    y = x @ w.T + 0.3 * torch.randn(600, 16, generator=g)
    folds = []
    for part in (slice(0, 300), slice(300, 600)):
        xk, yk = x[part][:, keep].double(), y[part].double()
        folds.append((xk.T @ xk, yk.T @ xk, float((yk**2).sum())))
    grid = (1e-3, 1e-1, 10.0)
    cv = refit.cv_target(folds[0][:2], folds[1], grid)
    for k, d in enumerate(grid):
        fit = refit.refit_to_target(folds[0][0], folds[0][1], d).double()
        held = float(((y[300:].double() - x[300:][:, keep].double() @ fit.T) ** 2).sum())
        assert abs(float(cv[k]) - held) / held < 1e-6
    assert refit.choose_target_damp(w[:, keep], folds, grid) in grid
    flip = [folds[0], (folds[1][0], -folds[0][1], folds[1][2])]  # the folds' targets disagree
    assert refit.choose_target_damp(torch.zeros(16, 10), flip, grid) is None  # every fit loses to zero
