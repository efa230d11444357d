"""Collect importance statistics for every prunable structure, one decoder layer at a time.

One pass of the layer-wise engine over the calibration windows gathers, per layer: Minitron
channel scores at the o_proj input (heads), the down_proj inputs (dense, expert and shared-expert
neurons), both norm outputs (hidden channels), input L2 norms for Wanda, and Block Influence from
the layer's input and output hidden states. Magnitude scores need no calibration.

Under a launcher each rank pushes its own block of the calibration windows through the layer
(its activations never leave it) and the statistics are summed in rank order (`dist.sum_ordered`),
so every rank ends each layer with the same scores; the loss-based depth metric instead gives each
rank whole layers to evaluate on every window (bit-exact against one process).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from weightsmith import dist
from weightsmith.engine.layerwise import copy_layer_attributes
from weightsmith.prune import importance as imp
from weightsmith.prune.structure import PER_LAYER_LISTS

GREEDY_WINDOWS = 8  # calibration windows a greedy layer search evaluates unless --depth-windows says otherwise


@dataclass
class LayerScores:
    heads: torch.Tensor  # [q_heads]
    ffn: torch.Tensor | None = None
    expert_ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    shared_ffn: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # this layer's contribution to the hidden ranking


@dataclass
class Scores:
    kind: str
    layers: dict[int, LayerScores]
    hidden: torch.Tensor
    block_influence: torch.Tensor | None = None  # [layers]
    tokens: int = 0


def _ffn_modules(view, i):
    """(kind, expert, down prefix, [gate/up prefixes]) for every MLP of layer i."""
    out = {}
    for lin in view.linears(i):
        group = view.classify(lin.prefix + ".weight")
        if lin.role not in ("gate", "up", "down"):
            continue
        key = (group, lin.expert)
        out.setdefault(key, {})[lin.role] = lin.prefix
    return out


def magnitude_scores(ck, view, kind: str = "magnitude") -> Scores:
    """Weight-only scores: L2 norms of the columns each structure owns (no calibration)."""
    H = view.hidden
    hidden = torch.zeros(H)
    layers = {}
    for i in range(view.num_layers):
        att = view.attention(i)
        o = ck.get(att["o"] + ".weight", dtype=torch.float32)
        heads = imp.head_scores(imp.magnitude_columns(o), o.shape[1] // view.head_dim, view.head_dim)
        ls = LayerScores(heads=heads)
        for (group, e), mods in _ffn_modules(view, i).items():
            s = imp.magnitude_columns(ck.get(mods["down"] + ".weight", dtype=torch.float32))
            _assign(ls, group, e, s)
        for role in ("q", "k", "v"):
            hidden += imp.magnitude_columns(ck.get(att[role] + ".weight", dtype=torch.float32))
        layers[i] = ls
    return Scores(kind, layers, hidden)


def _assign(ls: LayerScores, group: str, expert, s: torch.Tensor) -> None:
    if group == "dense_mlp":
        ls.ffn = s
    elif group == "routed_experts":
        ls.expert_ffn[expert] = s
    elif group == "shared_experts":
        ls.shared_ffn = s


def activation_scores(ctx, cfg, view, kind: str = "activation") -> Scores:
    """Minitron activation scores (or Wanda with kind='wanda') and Block Influence per layer."""
    from weightsmith.engine.stats import ChannelImportance, ChannelSquares

    calib = ctx.calibrate(cfg, default="self", shard=True)  # this rank's windows
    engine = ctx.engine(batch_size=getattr(cfg, "batch_size", 8))
    H = view.hidden
    hidden = torch.zeros(H, dtype=torch.float64)
    layers: dict[int, LayerScores] = {}
    bi = torch.zeros(view.num_layers, dtype=torch.float64)
    tokens = int(calib.total * calib.ids.shape[1])

    def process(layer):
        i = layer.index
        att = view.attention(i)
        norms = view.layer_norms(i)
        Stat = ChannelSquares if kind == "wanda" else ChannelImportance
        obs = {att["o"]: Stat(layer.in_features(att["o"]))}
        for n in norms.values():
            obs[n] = Stat(H, on="output")
        ffns = _ffn_modules(view, i)
        for mods in ffns.values():
            obs[mods["down"]] = Stat(layer.in_features(mods["down"]))
        out = layer.run(observe=obs)
        for stat in obs.values():
            stat.reduce()
        # Block Influence from this layer's input and output hidden states
        total, count = 0.0, 0
        for (_, a), (_, b) in zip(layer.inputs.batches(64), out.batches(64)):
            s, c = imp.block_influence(a, b)
            total, count = total + s, count + c
        total, count = dist.sum_ordered(torch.tensor([total, count], dtype=torch.float64)).tolist()
        bi[i] = total / max(count, 1)
        layer.next_inputs = out

        def value(stat):
            return stat.norm if kind == "wanda" else stat.value

        o_stat = value(obs[att["o"]])
        if kind == "wanda":
            o_stat = imp.wanda_columns(layer.tensor(att["o"] + ".weight"), o_stat)
        ls = LayerScores(heads=imp.head_scores(o_stat, o_stat.numel() // view.head_dim, view.head_dim))
        for (group, e), mods in ffns.items():
            s = value(obs[mods["down"]])
            if kind == "wanda":
                s = imp.wanda_columns(layer.tensor(mods["down"] + ".weight"), s)
            _assign(ls, group, e, s.float())
        ls.hidden = sum(value(obs[n]).double() for n in norms.values())
        layers[i] = ls

    engine.run(calib.ids, process)
    engine.close()
    for ls in layers.values():
        hidden += ls.hidden
    return Scores(kind, layers, hidden.float(), bi.float(), tokens)


@contextmanager
def layers_kept(model, keep: list[int], stand_in: dict | None = None):
    """The loaded model with only the decoder layers `keep` (in order), and the config's per-layer
    lists (`layer_types`: sliding / full attention, read by position in the decoder loop) cut to
    match, as the pruned config will be; restored on exit. So a layer metric scores the model
    that would be written. `stand_in` maps a kept index to a module run in that layer's place."""
    inner = model.model
    layers, saved, stand_in = inner.layers, {}, stand_in or {}
    inner.layers = torch.nn.ModuleList([stand_in.get(i, layers[i]) for i in keep])
    for name in PER_LAYER_LISTS:
        vals = getattr(inner.config, name, None)
        if isinstance(vals, (list, tuple)) and len(vals) == len(layers):
            saved[name] = vals
            setattr(inner.config, name, [vals[i] for i in keep])
    try:
        yield model
    finally:
        inner.layers = layers
        for name, vals in saved.items():
            setattr(inner.config, name, vals)


def _calib_loss(model, ids: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token loss of `model` over the windows `ids` (window-weighted, fp64 sum)."""
    total = 0.0
    with torch.no_grad():
        for k in range(0, ids.shape[0], batch):
            x = ids[k : k + batch]
            total += float(model(x, labels=x, use_cache=False).loss) * x.shape[0]
    return total / ids.shape[0]


def loss_depth_scores(ctx, cfg, view) -> torch.Tensor:
    """Calibration loss increase when each single layer is removed (the model is held in memory:
    meant for models that fit; Block Influence is the bounded-memory default). Under a launcher the
    layers are spread over the ranks, each evaluated on every window as in one process."""
    from weightsmith import loading

    calib = ctx.calibrate(cfg, default="self")
    ids = calib.ids[: cfg.depth_windows] if cfg.depth_windows else calib.ids
    model = loading.load(ctx.source.root)
    base = _calib_loss(model, ids)
    mine = {}
    everything = list(range(view.num_layers))
    for i in ctx.mine([1.0] * view.num_layers):
        with layers_kept(model, [j for j in everything if j != i]):
            mine[i] = _calib_loss(model, ids) - base
    out = torch.zeros(view.num_layers)
    for part in dist.gather_objects(mine):
        for i, v in part.items():
            out[i] = v
    return out


def greedy_removal(
    loss_without, num_layers: int, n_drop: int, mine=None, begin_round=None, log=None, what: str = "loss"
) -> tuple[list[int], dict[int, float]]:
    """Global greedy layer removal (pure given `loss_without`): `n_drop` rounds, each removing the
    layer whose removal, with the layers already removed, gives the lowest loss
    (`loss_without(kept layers)`; ties to the lower index). Returns the removal order and the
    last round's losses of the layers still kept. `begin_round(kept)` is called before each
    round's evaluations; `mine(costs)` -> the candidate indices this rank evaluates (all without
    a launcher); the rounds' losses are gathered so every rank removes the same layer; `log(text)`
    hears each round's choice."""
    kept = list(range(num_layers))
    removed: list[int] = []
    last: dict[int, float] = {}
    for _ in range(n_drop):
        if begin_round is not None:
            begin_round(list(kept))
        idx = mine([1.0] * len(kept)) if mine is not None else range(len(kept))
        part = {kept[j]: loss_without([k for k in kept if k != kept[j]]) for j in idx}
        cost: dict[int, float] = {}
        for p in dist.gather_objects(part):
            cost.update(p)
        best = min(kept, key=lambda i: (cost[i], i))
        kept.remove(best)
        removed.append(best)
        last = {i: cost[i] for i in kept}
        if log is not None:
            log(f"greedy layer search: round {len(removed)}/{n_drop} removes layer {best} ({what} {cost[best]:.4f})")
    return removed, last


class _Replay(torch.nn.Module):
    """Stands in for the decoder layers in front of a removed one: returns the hidden states that
    reached the removed layer (recorded in the round's full forward) for the current batch."""

    def __init__(self, like: torch.nn.Module):
        super().__init__()
        self.value: torch.Tensor | None = None
        copy_layer_attributes(self, like)

    def forward(self, hidden_states, *args, **kwargs):
        return self.value


class LayerRemovalLoss:
    """KL(source ‖ source without given layers) on calibration windows, for the greedy search.

    The source's next-token distribution is kept as its top `topk` probabilities per position
    plus the rest as one bin (the KL over that coarser partition; exact when the source puts all
    its mass on the top tokens, and never above the full KL), so the memory is independent of the
    vocabulary. Each round one forward of the current model records every kept layer's input per
    batch; removing kept layer p then runs only the layers after it, from p's recorded input (the
    embedding, a replay module and the LM head; about half the layers on average)."""

    def __init__(self, model, ids: torch.Tensor, batch: int = 2, topk: int = 256):
        self.model, self.batch = model, batch
        self.chunks = [ids[k : k + batch] for k in range(0, ids.shape[0], batch)]
        self.kept: list[int] = []
        self.inputs: list[dict[int, torch.Tensor]] = []
        self.layers = list(model.model.layers)
        self.reference = []
        with torch.no_grad():
            for x in self.chunks:
                lp = torch.log_softmax(model(x, use_cache=False).logits.float(), dim=-1)
                top, idx = lp.topk(min(topk, lp.shape[-1]), dim=-1)
                self.reference.append((top, idx, _log_rest(top)))

    def begin_round(self, kept: list[int]) -> None:
        self.kept, self.inputs = kept, []
        handles = []

        def record(i):
            def pre(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                self.inputs[-1][i] = h.detach()

            return pre

        for i in kept:
            handles.append(self.layers[i].register_forward_pre_hook(record(i), with_kwargs=True))
        try:
            with torch.no_grad(), layers_kept(self.model, kept):
                for x in self.chunks:
                    self.inputs.append({})
                    self.model(x, use_cache=False)
        finally:
            for h in handles:
                h.remove()

    def kl(self, logits: torch.Tensor, ref) -> torch.Tensor:
        """Summed KL over the positions of one batch, on the source's top-k + rest partition."""
        top, idx, rest = ref
        lq = torch.log_softmax(logits.float(), dim=-1).gather(-1, idx)
        kl = (top.exp() * (top - lq)).sum(-1) + rest.exp() * (rest - _log_rest(lq))
        return kl.double().sum()

    def __call__(self, keep: list[int]) -> float:
        (gone,) = [i for i in self.kept if i not in keep]
        after = [i for i in keep if i > gone]
        replay = _Replay(self.layers[gone])
        total, n = 0.0, 0
        # the replay sits where `gone` was: the config's per-layer lists follow the positions
        with torch.no_grad(), layers_kept(self.model, [gone, *after], stand_in={gone: replay}):
            for x, rec, ref in zip(self.chunks, self.inputs, self.reference):
                replay.value = rec[gone]
                total += float(self.kl(self.model(x, use_cache=False).logits, ref))
                n += x.numel()
        return total / n


def _log_rest(top_log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top))) per position, floored so an empty rest stays finite."""
    return torch.log1p(-top_log_probs.exp().sum(-1).clamp(max=1 - 1e-7))


def greedy_depth_scores(ctx, cfg, view, n_drop: int, ids: torch.Tensor | None = None, model=None) -> torch.Tensor:
    """Layer scores from a global greedy search on the calibration KL from the source
    (`greedy_removal` over `LayerRemovalLoss`): the
    removed layers score -n_drop .. -1 in removal order, the kept ones 0, 1, ... by the loss their
    removal would have given in the last round, so dropping the lowest-scored k layers is the
    greedy choice for any k <= n_drop. The model is held in memory (like --depth-metric loss)
    with every kept layer's input on the search windows (layers x windows x length x hidden
    values); each round evaluates every remaining layer's removal on the first `depth_windows`
    windows (`model`: the source already loaded, e.g. minitron's teacher; left as it was)."""
    from weightsmith import loading

    if ids is None:
        ids = ctx.calibrate(cfg, default="self").ids
    ids = ids[: cfg.depth_windows or GREEDY_WINDOWS]
    if model is None:
        model = loading.load(ctx.source.root)
    loss = LayerRemovalLoss(model, ids)
    removed, last = greedy_removal(
        loss,
        view.num_layers,
        n_drop,
        mine=ctx.mine,
        begin_round=loss.begin_round,
        log=ctx.report.log,
        what="KL from the source",
    )
    out = torch.zeros(view.num_layers)
    for r, i in enumerate(removed):
        out[i] = r - len(removed)
    for r, i in enumerate(sorted(last, key=lambda i: (last[i], i))):
        out[i] = r
    return out
