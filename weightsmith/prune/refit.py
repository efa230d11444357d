"""Closed-form repair of a consuming projection after some of its input channels are removed.

A projection y = W x (W [out, n], no bias) loses the input channels R and keeps K (MLP neurons
feeding down_proj, attention heads feeding o_proj). With the calibration Gram G = Σ x xᵀ of its
input (measured in the pruned model, so earlier repairs are seen), the kept columns that best
reproduce the full output in least squares are

    W'_K = W_K + W_R G_RK (G_KK + λ I)⁻¹                         (per-block least squares)

The removed channels' contribution W_R x_R is replaced by its best linear prediction from the kept
channels. The uncentred Gram carries the channel means, so the mean contribution that FLAP moves
into a bias (b = W_R E[x_R]) is absorbed as far as any bias-free correction can absorb it: the
architectures here have no bias on down_proj / o_proj. An OBS-style update removing the set R at
once (SlimGPT, per output row: δW = -W_R [H⁻¹_RR]⁻¹ H⁻¹_R· with H = G) is the same minimiser, so
it gives the same weights (pinned in the tests); they differ only in how channels are chosen.
λ is a small ridge (a fraction of the mean diagonal) for the rank-deficient Grams of short
calibration sets. Nothing removed: W'_K = W exactly.
"""

from __future__ import annotations

import torch


def refit_columns(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 1e-3) -> torch.Tensor:
    """Least-squares kept columns [out, |K|] of `w` [out, n] given the input Gram [n, n]."""
    n = w.shape[1]
    if gram.shape != (n, n):
        raise ValueError(f"Gram {tuple(gram.shape)} does not match the {n} input channels of the weight")
    keep = keep.to(torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    removed = mask.nonzero().flatten()
    w64 = w.double()
    out = w64[:, keep].clone()
    if removed.numel() == 0:
        return out.to(w.dtype)
    g = gram.double()
    g_kk = g[keep][:, keep]
    lam = damp * float(torch.diagonal(g_kk).mean().clamp_min(1e-12))
    g_kk = g_kk + lam * torch.eye(keep.numel(), dtype=g.dtype)
    g_rk = g[removed][:, keep]
    rhs = w64[:, removed] @ g_rk  # [out, |K|]
    chol, info = torch.linalg.cholesky_ex(g_kk)
    if int(info) == 0:
        corr = torch.cholesky_solve(rhs.T, chol).T
    else:  # indefinite after damping (tiny or degenerate calibration): least-norm solution
        corr = torch.linalg.lstsq(g_kk, rhs.T).solution.T
    return (out + corr).to(w.dtype)


def obs_update(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 1e-3) -> torch.Tensor:
    """The OBS form of the same repair: remove the columns R jointly with δW = -W_R [H⁻¹_RR]⁻¹ H⁻¹_R·
    (H = G + λI over all channels); returns the kept columns. Equal to `refit_columns` up to where
    the ridge is applied; kept for the comparison and as a check of the algebra."""
    n = w.shape[1]
    keep = keep.to(torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    removed = mask.nonzero().flatten()
    w64 = w.double()
    if removed.numel() == 0:
        return w64[:, keep].to(w.dtype)
    g = gram.double()
    lam = damp * float(torch.diagonal(g).mean().clamp_min(1e-12))
    hinv = torch.linalg.inv(g + lam * torch.eye(n, dtype=g.dtype))
    delta = -w64[:, removed] @ torch.linalg.solve(hinv[removed][:, removed], hinv[removed])
    return (w64 + delta)[:, keep].to(w.dtype)


def output_error(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, w_kept: torch.Tensor) -> float:
    """Σ over calibration rows of ‖W x - W'_K x_K‖²  =  tr(D G Dᵀ), D = W - scatter(W'_K)."""
    d = w.double().clone()
    d[:, keep.to(torch.long)] -= w_kept.double()
    return float(((d @ gram.double()) * d).sum())


def scatter_columns(w_kept: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """[out, |K|] -> [out, n] with zeros in the removed columns (simulates the pruned layer in place)."""
    out = torch.zeros(w_kept.shape[0], n, dtype=w_kept.dtype)
    out[:, keep.to(torch.long)] = w_kept
    return out


def mean_bias(w: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation for comparison: b = W_R E[x_R] (needs a bias the families here lack)."""
    n = w.shape[1]
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep.to(torch.long)] = False
    return w.double()[:, mask] @ mean.double()[mask]


def refit_to_target(gram_kk: torch.Tensor, cross: torch.Tensor, damp: float = 1e-3) -> torch.Tensor:
    """Kept columns [out, |K|] that best map the pruned model's kept inputs to a target output:
    min Σ ‖y - W'_K x_K‖²  ⇒  W'_K = B (G_KK + λI)⁻¹ with B = Σ y x_Kᵀ [out, |K|], G_KK = Σ x_K x_Kᵀ.
    With y the *source* model's output of the projection (and x from the pruned model), this also
    corrects the drift that earlier pruned layers put into x."""
    g = gram_kk.double()
    lam = damp * float(torch.diagonal(g).mean().clamp_min(1e-12))
    g = g + lam * torch.eye(g.shape[0], dtype=g.dtype)
    chol, info = torch.linalg.cholesky_ex(g)
    b = cross.double()
    sol = torch.cholesky_solve(b.T, chol).T if int(info) == 0 else torch.linalg.lstsq(g, b.T).solution.T
    return sol.to(cross.dtype)


def target_error(y_sq: float, cross: torch.Tensor, gram_kk: torch.Tensor, w_kept: torch.Tensor) -> float:
    """Σ ‖y - W'_K x_K‖² = Σ‖y‖² - 2 tr(W'_K Bᵀ) + tr(W'_K G_KK W'_Kᵀ)."""
    w = w_kept.double()
    return float(y_sq - 2 * (w * cross.double()).sum() + ((w @ gram_kk.double()) * w).sum())


def obs_select(
    w: torch.Tensor, gram: torch.Tensor, n_keep: int, damp: float = 1e-3, group: int = 1, steps: int = 64
) -> torch.Tensor:
    """Which input channels (or groups of `group` consecutive channels) to keep so that the
    least-squares repair loses least: greedy structured OBS (ZipLM / SlimGPT style). With
    H⁻¹ = (G + λI)⁻¹ over the channels still present, removing the set r and re-solving the rest
    optimally costs  tr(W_r [H⁻¹_rr]⁻¹ W_rᵀ); the cheapest groups go, W takes the OBS update
    W -= W_r [H⁻¹_rr]⁻¹ H⁻¹_r·  and H⁻¹ its Schur downdate. Removal runs in at most `steps` rounds
    (each removes the cheapest share of what is left to remove, costs re-scored after every
    round: one at a time for few groups). Returns the kept group indices, ascending."""
    n = w.shape[1]
    if n % group or gram.shape != (n, n):
        raise ValueError(f"Gram {tuple(gram.shape)} / group {group} do not match the {n} input channels")
    groups = n // group
    if not 0 < n_keep <= groups:
        raise ValueError(f"cannot keep {n_keep} of {groups} groups")
    g = gram.double()
    lam = damp * float(torch.diagonal(g).mean().clamp_min(1e-12))
    hinv = torch.linalg.inv(g + lam * torch.eye(n, dtype=g.dtype))
    wk = w.double().clone()
    alive = torch.ones(groups, dtype=torch.bool)
    left = groups - n_keep
    rounds = min(steps, left)
    for k in range(rounds):
        m = -(-left // (rounds - k))  # ceil: spread what is left over the remaining rounds
        if group == 1:
            cost = wk.pow(2).sum(0) / torch.diagonal(hinv).clamp_min(1e-30)
        else:
            cost = torch.empty(groups, dtype=g.dtype)
            for j in range(groups):
                r = slice(j * group, (j + 1) * group)
                cost[j] = (torch.linalg.solve(hinv[r, r], wk[:, r].T) * wk[:, r].T).sum() if alive[j] else 0
        cost[~alive] = float("inf")
        drop = torch.topk(cost, m, largest=False).indices
        alive[drop] = False
        cols = (drop[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        upd = torch.linalg.solve(hinv[cols][:, cols], hinv[cols])  # [|r|, n]
        wk -= wk[:, cols] @ upd
        hinv -= hinv[:, cols] @ upd
        left -= m
    return alive.nonzero().flatten()


def obs_saliency(w: torch.Tensor, gram: torch.Tensor, damp: float = 0.3) -> torch.Tensor:
    """One-shot OBS saliency of each input channel: the output error left when the channel alone is
    removed and the least-squares repair re-solves the rest, ‖W_:,j‖² / [(G + λI)⁻¹]_jj (λ relative
    to the mean diagonal; the repair's typical cross-validated ridge keeps it from trusting
    correlations the calibration windows cannot support) -> [n]."""
    g = gram.double()
    lam = damp * float(torch.diagonal(g).mean().clamp_min(1e-12))
    hinv = torch.linalg.inv(g + lam * torch.eye(g.shape[0], dtype=g.dtype))
    return (w.double().pow(2).sum(0) / torch.diagonal(hinv).clamp_min(1e-30)).float()


DAMP_GRID = (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0)


def choose_damp(w: torch.Tensor, folds: list[torch.Tensor], keep: torch.Tensor, grid=DAMP_GRID) -> float | None:
    """The ridge of the repair chosen by cross-validation over calibration folds (Grams of disjoint
    windows): for every λ in `grid`, fit on all folds but one and measure the output error on the
    one left out; None when plain slicing is better on held-out windows than every λ (the guard:
    a repair is only kept when it lowers the error on windows it was not fitted to)."""
    # cv_gain is the held-out error minus slicing's, so the baseline is 0
    total = sum(folds)
    return _cross_validate(folds, lambda rest, f: (cv_gain(w, total - f, f, keep, grid), 0.0), grid)


def cv_gain(w: torch.Tensor, train: torch.Tensor, held: torch.Tensor, keep: torch.Tensor, grid) -> torch.Tensor:
    """For each relative ridge in `grid`: the output error on the `held` Gram of the repair fitted
    on the `train` Gram, minus plain slicing's error there. One eigendecomposition of the kept
    training block serves every λ: with T_KK = Q Λ Qᵀ, s = 1/(Λ + λ), C = W_R T_RK Q, the
    repair's weight change is C diag(s) Qᵀ and the difference is  sᵀ P s - 2 sᵀ u  with
    P = (Qᵀ F_KK Q) ∘ (CᵀC) and u = diag(Qᵀ F_KR W_Rᵀ C) (F the held-out Gram)."""
    n = w.shape[1]
    keep = keep.to(torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    removed = mask.nonzero().flatten()
    if removed.numel() == 0:
        return torch.zeros(len(grid), dtype=torch.float64)
    t, f, w64 = train.double(), held.double(), w.double()
    t_kk = t[keep][:, keep]
    evals, q = torch.linalg.eigh(t_kk)
    c = (w64[:, removed] @ t[removed][:, keep]) @ q  # [out, |K|]
    p = (q.T @ f[keep][:, keep] @ q) * (c.T @ c)
    u = ((q.T @ (f[keep][:, removed] @ w64[:, removed].T)) * c.T).sum(1)
    return _ridge_curve(evals, p, u, float(torch.diagonal(t_kk).mean().clamp_min(1e-12)), grid)


def cv_target(
    train: tuple[torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor, float], grid
) -> torch.Tensor:
    """For each relative ridge in `grid`: the error Σ ‖y - W'_K x_K‖² on the `held` statistics
    (G_KK, B = Σ y x_Kᵀ, Σ‖y‖²) of the target fit W'_K = B_t (G_t + λI)⁻¹ on the `train` ones
    (G_t, B_t). One eigendecomposition G_t = Q Λ Qᵀ serves every λ: with C = B_t Q and
    s = 1/(Λ + λ), W'_K = C diag(s) Qᵀ and the error is  sᵀ P s - 2 sᵀ u + Σ‖y‖²  with
    P = (Qᵀ G_h Q) ∘ (CᵀC), u = diag(Cᵀ B_h Q)."""
    g_t, b_t = train[0].double(), train[1].double()
    g_h, b_h, y_sq = held[0].double(), held[1].double(), float(held[2])
    evals, q = torch.linalg.eigh(g_t)
    c = b_t @ q
    p = (q.T @ g_h @ q) * (c.T @ c)
    u = (c * (b_h @ q)).sum(0)
    return _ridge_curve(evals, p, u, float(torch.diagonal(g_t).mean().clamp_min(1e-12)), grid) + y_sq


def _ridge_curve(evals: torch.Tensor, p: torch.Tensor, u: torch.Tensor, scale: float, grid) -> torch.Tensor:
    """sᵀ P s − 2 sᵀ u with s = 1/(Λ + λ·scale), for each relative ridge λ in `grid`: the held-out error
    of a ridge fit written in the eigenbasis of its training Gram (cv_gain, cv_target)."""
    out = torch.empty(len(grid), dtype=torch.float64)
    for k, damp in enumerate(grid):
        s = 1.0 / (evals + damp * scale).clamp_min(1e-30)
        out[k] = s @ p @ s - 2 * (s @ u)
    return out


def _cross_validate(folds: list, held_out_errors, grid) -> float | None:
    """Leave-one-fold-out: Σ over folds of held_out_errors(rest, fold) -> (errors per λ in `grid` [len(grid)],
    the baseline's error on that fold); the λ with the least total, or None when it does not beat the
    baseline (then the caller keeps what it had without a fit)."""
    if len(folds) < 2:
        return grid[len(grid) // 2] if grid else None
    err = torch.zeros(len(grid), dtype=torch.float64)
    base = 0.0
    for j, f in enumerate(folds):
        e, b = held_out_errors([o for k, o in enumerate(folds) if k != j], f)
        err += e
        base += b
    k = int(torch.argmin(err))
    return grid[k] if float(err[k]) < base else None


def choose_target_damp(
    w_kept: torch.Tensor, folds: list[tuple[torch.Tensor, torch.Tensor, float]], grid=DAMP_GRID
) -> float | None:
    """The ridge of a target fit (`refit_to_target`) chosen by cross-validation over calibration
    folds of (G_KK, B, Σ‖y‖²); None when the sliced kept columns `w_kept` are better on held-out
    windows than every λ."""

    def held_out(rest, f):
        fit = cv_target((sum(o[0] for o in rest), sum(o[1] for o in rest)), f, grid)
        return fit, target_error(f[2], f[1], f[0], w_kept)

    return _cross_validate(folds, held_out, grid)
