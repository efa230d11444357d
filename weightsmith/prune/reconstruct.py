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
"""

from __future__ import annotations

import torch

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


def reconstruct(ctx, cfg, view, keep: Keep, damp: float = 1e-3) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    from weightsmith.engine.stats import Gram

    calib = ctx.calibrate(cfg, default="self")
    engine = ctx.engine(batch_size=getattr(cfg, "batch_size", 8))
    fitted: dict[str, torch.Tensor] = {}
    errors: dict[str, dict] = {}

    def process(layer):
        i = layer.index
        for name, expert, kind in consumers(view, i):
            w = layer.tensor(name).detach().float().cpu()
            idx = keep.index(kind, i, expert)
            if idx is None or idx.numel() == w.shape[1]:
                continue
            prefix = name.rsplit(".", 1)[0]
            g = Gram(w.shape[1])
            layer.run(observe={prefix: g}, keep_outputs=False)
            if g.rows == 0:  # an expert no calibration token reached: plain slicing
                new = w[:, idx]
            else:
                new = refit.refit_columns(w, g.sum, idx, damp)
                before = refit.output_error(w, g.sum, idx, w[:, idx])
                after = refit.output_error(w, g.sum, idx, new)
                total = max(refit.output_error(w, g.sum, torch.arange(0), w[:, :0]), 1e-30)
                errors[name] = {"sliced": before / total, "refit": after / total}
            fitted[name] = new
            layer.set_weight(name, refit.scatter_columns(new, idx, w.shape[1]))
        layer.next_inputs = layer.run()

    engine.run(calib.ids, process, layers=keep.layers)
    engine.close()
    return fitted, errors
