"""Repair the projections that consume removed channels, one decoder layer at a time.

Through the layer-wise engine, over the calibration windows, in the pruned model (dropped layers are
skipped, so every layer sees the activations of the pruned layers before it): for each consuming
projection of a kept layer (o_proj after query heads go, down_proj / expert down projections after
neurons go; found from the architecture tables, not by name), in forward order, the Gram of its
input is collected with the earlier repairs of the layer in place, the kept columns are refitted in
closed form (`refit.refit_columns`) and the layer runs on with the removed columns zeroed, which is
exactly the pruned layer. Returns the repaired kept columns by tensor name (full output rows; the
writer slices the other axes as usual) and the per-projection relative output errors before and
after the repair.

Under a launcher each rank pushes its own block of the windows (both streams, so the source
targets pair with the pruned inputs row by row on the rank that holds them); the Grams and cross
products are summed in rank order, one owner rank (layers dealt round-robin) solves each repair and
broadcasts it, so every rank continues with the same repaired layer.
"""

from __future__ import annotations

import torch

from weightsmith import dist
from weightsmith.prune import importance as imp
from weightsmith.prune import refit
from weightsmith.prune.structure import LINEAR_AXES, Keep

CONSUMED = ("q_rows", "ffn", "expert_ffn", "shared_ffn")  # input-axis kinds whose removal a refit repairs


def consumers(view, layer: int) -> list[tuple[str, int | None, str]]:
    """(weight name, expert, index kind) of every projection of the layer whose input channels
    are pruned, in forward order (attention before MLP)."""
    out = []
    for lin in view.linears(layer):
        axes = LINEAR_AXES.get((lin.role, view.classify(lin.prefix + ".weight")))
        if axes and axes[1] in CONSUMED:
            out.append((lin.prefix + ".weight", lin.expert, axes[1]))
    return sorted(out, key=lambda c: c[2] != "q_rows")


class _Rows:
    """Observer that keeps a projection's outputs (the source model's, per calibration row)."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def __call__(self, inp, out):
        self.parts.append(out.detach().float().reshape(-1, out.shape[-1]).cpu())


class FoldGram:
    """Grams of a projection's input over `k` disjoint folds of calibration windows (window j goes
    to fold j mod k; rows of 2-D inputs such as routed experts' go by call), for cross-validation.
    `offset`: the global index of this rank's first window, so the folds are those of one process;
    `reduce()` sums each fold over ranks in rank order."""

    def __init__(self, dim: int, k: int = 2, offset: int = 0):
        self.folds = [torch.zeros(dim, dim) for _ in range(k)]
        self.windows = offset

    def reduce(self) -> None:
        self.folds = dist.sum_tree(self.folds)

    def __call__(self, inp, out):
        x = inp.detach().float().cpu()
        if x.dim() < 3:
            x = x.reshape(1, -1, x.shape[-1])
        for b in range(x.shape[0]):
            xb = x[b].reshape(-1, x.shape[-1])
            self.folds[self.windows % len(self.folds)].addmm_(xb.T, xb)
            self.windows += 1

    @property
    def sum(self) -> torch.Tensor:
        return sum(self.folds)


class _BlockCross:
    """Observer pair in the pruned model for the block target: `mid` sees the residual stream in
    front of the MLP (the input of its norm), `__call__` the consuming projection's input; the
    target of the projection's output is the *source* layer's output minus that residual, i.e. the
    projection is fitted so that the block's output matches the source's. Statistics per fold of
    windows (window j to fold (offset + j) mod k) for cross-validation."""

    def __init__(self, keep: torch.Tensor, source_out, k: int = 2, offset: int = 0):
        self.keep, self.src = keep, source_out
        n, h = keep.numel(), source_out.shape[-1]
        self.folds = [[torch.zeros(n, n), torch.zeros(h, n), 0.0] for _ in range(k)]
        self.row = 0
        self.offset = offset
        self.h_mid = None

    def mid(self, inp, out):
        self.h_mid = inp.detach().float().cpu()

    def __call__(self, inp, out):
        x = inp.detach().float().cpu()
        b = x.shape[0]
        y = self.src.data[self.row : self.row + b].float() - self.h_mid
        for j in range(b):
            xb = x[j].reshape(-1, x.shape[-1])[:, self.keep]
            yb = y[j].reshape(-1, y.shape[-1])
            f = self.folds[(self.offset + self.row + j) % len(self.folds)]
            f[0].addmm_(xb.T, xb)
            f[1].addmm_(yb.T, xb)
            f[2] += float(yb.double().pow(2).sum())
        self.row += b

    def reduce(self) -> None:
        self.folds = dist.sum_tree(self.folds)

    def total(self):
        return sum(f[0] for f in self.folds), sum(f[1] for f in self.folds), sum(f[2] for f in self.folds)


class _Cross:
    """Observer in the pruned model: Gram of the kept inputs and Σ y xᵀ against stored targets."""

    def __init__(self, keep: torch.Tensor, targets: list[torch.Tensor]):
        self.keep, self.targets, self.k = keep, targets, 0
        n = keep.numel()
        self.gram = torch.zeros(n, n)
        self.cross = torch.zeros(targets[0].shape[1], n)
        self.y_sq = 0.0
        self.rows = 0

    def __call__(self, inp, out):
        x = inp.detach().float().reshape(-1, inp.shape[-1]).cpu()[:, self.keep]
        y = self.targets[self.k]
        self.k += 1
        self.gram.addmm_(x.T, x)
        self.cross.addmm_(y.T, x)
        self.y_sq += float(y.double().pow(2).sum())
        self.rows += x.shape[0]

    def reduce(self) -> None:
        """Sum the partial statistics of every rank, in rank order."""
        self.gram, self.cross, self.y_sq, self.rows = dist.sum_tree((self.gram, self.cross, self.y_sq, self.rows))


def _obs_keep(view, keep: Keep, kind: str, i: int, w, gram, idx, damp) -> torch.Tensor:
    """Re-choose the kept MLP neurons (or query heads, the same count per KV group) of layer i by
    greedy structured OBS on the projection's Gram; updates `keep` and returns the kept input
    channels of the projection."""
    lk = keep.per_layer[i]
    if kind == "ffn":
        lk.ffn = refit.obs_select(w, gram, idx.numel(), damp)
        return lk.ffn
    hd = keep.head_dim
    q_per_kv = view.heads // view.kv_heads
    per_group = lk.q_heads.numel() // lk.kv_groups.numel()
    heads = []
    for gi in lk.kv_groups.tolist():
        rows = torch.arange(gi * q_per_kv * hd, (gi + 1) * q_per_kv * hd)
        sub = refit.obs_select(w[:, rows], gram[rows][:, rows], per_group, damp, group=hd)
        heads += (sub + gi * q_per_kv).tolist()
    lk.q_heads = torch.tensor(sorted(heads), dtype=torch.long)
    return keep.index("q_rows", i, None)


def reconstruct(
    ctx,
    cfg,
    view,
    keep: Keep,
    damp: float = 1e-3,
    target: str = "layer",
    select: str = "importance",
    guard: bool = True,
    ids: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """target "source": each repaired projection reproduces the *source* model's output of that
    projection from the pruned model's inputs (corrects drift from earlier layers; the source
    activations run alongside, one more stream); "layer": it reproduces its own full output on the
    pruned model's inputs; "block": a dense MLP's down_proj reproduces the *source* layer's output
    (the residual stream after the MLP) from the pruned model's inputs, cross-validated like "layer"
    (o_proj, experts and post-normed MLPs fall back to "layer"). `select` "obs" re-chooses MLP
    neurons / query heads per layer (greedy structured OBS, `keep` is updated), "saliency" MLP
    neurons by one-shot OBS saliency; `guard` picks the ridge on held-out windows and skips a
    repair that does not generalise; `ids`: calibration windows (default: the config's, this rank's
    share of them under a launcher)."""
    offset = 0
    if ids is None:
        calib = ctx.calibrate(cfg, default="self", shard=True)  # this rank's windows
        ids = calib.ids
        offset = dist.shard(calib.total).start
    engine = ctx.engine(batch_size=getattr(cfg, "batch_size", 8))
    size = dist.world().size
    fitted: dict[str, torch.Tensor] = {}
    errors: dict[str, dict] = {}
    damps: dict[str, float | None] = {}
    kept = set(keep.layers)
    src = {"h": None}

    def process(layer):
        i = layer.index
        norms = view.layer_norms(i)
        todo = []
        for name, expert, kind in consumers(view, i) if i in kept else []:
            idx = keep.index(kind, i, expert)
            if idx is not None and idx.numel() < layer.in_features(name.rsplit(".", 1)[0]):
                # routed experts see other tokens in the two streams: their rows do not pair up,
                # so they are always fitted to their own output
                mode = "layer" if kind == "expert_ffn" else target
                if mode == "block" and not (kind == "ffn" and "mlp_out" not in norms):
                    # the block target is linear in down_proj only for a dense MLP whose output is
                    # added to the residual as is (no post-MLP norm, no routed experts beside it)
                    mode = "layer"
                todo.append((name, idx, mode))
        if target in ("source", "block"):
            if src["h"] is None:
                src["h"] = engine.new_store()
                src["h"].data.copy_(layer.inputs.data)
            rows = {name: _Rows() for name, _, mode in todo if mode == "source"}
            nxt = layer.run(observe={n.rsplit(".", 1)[0]: r for n, r in rows.items()}, inputs=src["h"])
            src["h"].close()
            src["h"] = nxt
        if i not in kept:
            layer.next_inputs = layer.inputs  # dropped: the pruned stream passes through
            return
        for name, idx, mode in todo:
            w = layer.tensor(name).detach().float().cpu()
            prefix = name.rsplit(".", 1)[0]
            if mode == "block":
                obs = _BlockCross(idx, src["h"], offset=offset)
                layer.run(observe={norms["post_attention"]: obs.mid, prefix: obs}, keep_outputs=False)
                obs.reduce()
                gram, cross, y_sq = obs.total()
                lam = refit.choose_target_damp(w[:, idx], obs.folds) if guard else damp
                new = _solved(
                    i % size,
                    lambda: refit.refit_to_target(gram, cross, lam) if lam is not None else w[:, idx].clone(),
                    (w.shape[0], idx.numel()),
                )
                before = refit.target_error(y_sq, cross, gram, w[:, idx])
                after = refit.target_error(y_sq, cross, gram, new)
                total = max(y_sq, 1e-30)
                damps[name] = lam
            elif mode == "source":
                obs = _Cross(idx, rows[name].parts)
                layer.run(observe={prefix: obs}, keep_outputs=False)
                obs.reduce()
                new = _solved(
                    i % size, lambda: refit.refit_to_target(obs.gram, obs.cross, damp), (w.shape[0], idx.numel())
                )
                before = refit.target_error(obs.y_sq, obs.cross, obs.gram, w[:, idx])
                after = refit.target_error(obs.y_sq, obs.cross, obs.gram, new)
                total = max(obs.y_sq, 1e-30)
                rows[name].parts.clear()
            else:
                g = FoldGram(w.shape[1], offset=offset)
                layer.run(observe={prefix: g}, keep_outputs=False)
                g.reduce()
                gsum = g.sum
                if select == "obs" and kind in ("ffn", "q_rows"):
                    idx = _obs_keep(view, keep, kind, i, w, gsum, idx, damp)
                elif select == "saliency" and kind == "ffn":
                    idx = keep.per_layer[i].ffn = imp.keep_top(refit.obs_saliency(w, gsum), idx.numel())
                # the guard: the ridge is chosen on held-out windows, and no repair when slicing
                # is better there (short calibration sets overfit the least squares)
                lam = refit.choose_damp(w, g.folds, idx) if guard else damp
                new = _solved(
                    i % size,
                    lambda: refit.refit_columns(w, gsum, idx, lam) if lam is not None else w[:, idx].clone(),
                    (w.shape[0], idx.numel()),
                )
                before = refit.output_error(w, gsum, idx, w[:, idx])
                after = refit.output_error(w, gsum, idx, new)
                total = max(refit.output_error(w, gsum, torch.arange(0), w[:, :0]), 1e-30)
                damps[name] = lam
            errors[name] = {"sliced": before / total, "refit": after / total, "damp": damps.get(name, damp)}
            fitted[name] = new
            layer.set_weight(name, refit.scatter_columns(new, idx, w.shape[1]))
        layer.next_inputs = layer.run()

    engine.run(ids, process, layers=None if target in ("source", "block") else keep.layers)
    if src["h"] is not None:
        src["h"].close()
    engine.close()
    return fitted, errors


def _solved(owner: int, solve, shape: tuple[int, int]) -> torch.Tensor:
    """A repair (fp32 kept columns) solved on its owner rank and broadcast: every rank continues
    with the owner's bits, whatever its own LAPACK would have returned."""
    w = dist.world()
    if not w.distributed:
        return solve()
    new = solve() if w.rank == owner else torch.empty(shape, dtype=torch.float32)
    return dist.broadcast_(new.contiguous(), owner)
