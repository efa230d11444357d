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

from dataclasses import dataclass, field

import torch

from weightsmith import dist
from weightsmith.prune import importance as imp


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


def loss_depth_scores(ctx, cfg, view) -> torch.Tensor:
    """Calibration loss increase when each single layer is removed (the model is held in memory:
    meant for models that fit; Block Influence is the bounded-memory default). Under a launcher the
    layers are spread over the ranks, each evaluated on every window as in one process."""
    from weightsmith import loading

    calib = ctx.calibrate(cfg, default="self")
    model = loading.load(ctx.source.root)
    layers = model.model.layers

    def loss():
        with torch.no_grad():
            total = 0.0
            for k in range(0, calib.ids.shape[0], 8):
                ids = calib.ids[k : k + 8]
                total += float(model(ids, labels=ids, use_cache=False).loss) * ids.shape[0]
        return total / calib.ids.shape[0]

    base = loss()
    mine = {}
    for i in ctx.mine([1.0] * view.num_layers):
        model.model.layers = torch.nn.ModuleList([m for j, m in enumerate(layers) if j != i])
        mine[i] = loss() - base
        model.model.layers = layers
    out = torch.zeros(view.num_layers)
    for part in dist.gather_objects(mine):
        for i, v in part.items():
            out[i] = v
    return out
