"""Which layers to drop: the global greedy search on calibration loss, and layer metrics that score
exactly the model that is written (per-layer config lists cut with the layers)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.prune.scores import LayerRemovalLoss, _log_rest, greedy_removal, layers_kept

CAL = ["--calib-samples", "4", "--calib-length", "64"]


def test_greedy_removal_follows_the_interactions_a_one_shot_ranking_misses():
    # alone, layer 1 costs less than 2; once 0 is gone, removing 1 as well costs far more than 2
    single = {0: 1.0, 1: 2.0, 2: 3.0, 3: 10.0}
    pair = {frozenset({0, 1}): 100.0, frozenset({0, 2}): 5.0, frozenset({0, 3}): 50.0}

    def loss_without(keep):
        gone = frozenset(set(range(4)) - set(keep))
        return single[next(iter(gone))] if len(gone) == 1 else pair.get(gone, 1000.0)

    removed, last = greedy_removal(loss_without, 4, 2)
    assert removed == [0, 2]  # a one-shot ranking of `single` would drop 0 and 1
    assert last == {1: 100.0, 3: 50.0}
    assert greedy_removal(lambda keep: 0.0, 3, 3)[0] == [0, 1, 2]  # ties: lower index first


def test_top_k_kl_is_the_full_kl_with_every_token_and_below_it_with_fewer():
    torch.manual_seed(0)
    p, q = torch.randn(2, 5, 50) * 3, torch.randn(2, 5, 50) * 3
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    full = float((lp.exp() * (lp - lq)).sum())

    def topk_kl(k):
        ev = LayerRemovalLoss.__new__(LayerRemovalLoss)
        top, idx = lp.topk(k, dim=-1)
        return float(ev.kl(q, (top, idx, _log_rest(top))))

    assert topk_kl(50) == pytest.approx(full, rel=1e-5)
    assert 0 < topk_kl(8) < topk_kl(24) <= full + 1e-5


@pytest.mark.parametrize("fam", ["gemma3_text", "llama"])
def test_layer_metric_scores_the_written_model(fam, tiny_model, cli, tmp_path, hamlet):
    """Gemma 3 reads `layer_types[i]` by position (sliding vs full attention, local vs global
    RoPE): a metric that only shortens the layer list scores a different model than the pruned
    config describes. With the lists cut, its logits are the written model's."""
    src = tiny_model(fam, layers=6)
    out = tmp_path / "o"
    assert cli("prune", src, out, "--drop-layers", "1", "--refit", "none", "--calib", hamlet, *CAL).code == 0
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))  # > the sliding window (16)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    types = list(getattr(model.config, "layer_types", None) or [])
    with torch.no_grad(), layers_kept(model, [0, 2, 3, 4, 5]):
        got = model(ids, use_cache=False).logits
    assert len(model.model.layers) == 6 and list(getattr(model.config, "layer_types", None) or []) == types
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the search's evaluator (replays the removed layer's recorded input) gives the full forward's loss
    calib = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
    ev = LayerRemovalLoss(model, calib, batch=2, topk=16)
    ev.begin_round([0, 2, 3, 4, 5])
    for keep in ([2, 3, 4, 5], [0, 2, 4, 5], [0, 2, 3, 4]):
        with torch.no_grad(), layers_kept(model, keep):
            full = sum(float(ev.kl(model(x, use_cache=False).logits, r)) for x, r in zip(ev.chunks, ev.reference))
        assert ev(keep) == pytest.approx(full / calib.numel(), rel=1e-6) and ev(keep) > 0
    assert len(model.model.layers) == 6 and list(getattr(model.config, "layer_types", None) or []) == types


def test_prune_greedy_drops_the_searched_layers(tiny_model, cli, tmp_path, hamlet):
    src = tiny_model("llama", layers=6)
    out = tmp_path / "o"
    r = cli(
        "prune", src, out, "--layers", "3", "--depth-metric", "greedy", "--depth-windows", "2", "--calib", hamlet, *CAL
    )
    assert r.code == 0, r
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    scores = m["layer_scores"]["values"]
    assert m["layer_scores"]["metric"] == "greedy"
    order = sorted(range(6), key=lambda i: scores[i])[:3]
    assert sorted(scores[i] for i in order) == [-3.0, -2.0, -1.0]  # removal order, then the kept layers 0, 1, 2
    assert sorted(scores[i] for i in set(range(6)) - set(order)) == [0.0, 1.0, 2.0]
    assert m["kept"]["layers"] == sorted(set(range(6)) - set(order))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_minitron_candidates_drop_a_prefix_of_the_greedy_order(tiny_model, cli, tmp_path, hamlet):
    src = tiny_model("llama", layers=5)
    out = tmp_path / "m"
    r = cli(
        "minitron",
        src,
        out,
        "--params",
        "0.7",
        "--depth-metric",
        "greedy",
        "--max-depth-pruning",
        "0.4",
        "--calib",
        hamlet,
        "--calib-samples",
        "8",
        "--calib-length",
        "64",
        "--score-windows",
        "4",
        "--refit",
        "none",
    )
    assert r.code == 0, r
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    scores = m["layer_scores"]["values"]
    assert m["layer_scores"]["metric"] == "greedy" and min(scores) == -2.0  # 40 % of 5 layers searched
    dropped = sorted(set(range(5)) - set(m["kept"]["layers"]))
    assert dropped == sorted(sorted(range(5), key=lambda i: scores[i])[: len(dropped)])
