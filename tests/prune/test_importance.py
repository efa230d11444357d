"""Pure maths of pruning on random tensors: scores, selection, and slicing by kept indices."""

from __future__ import annotations

import pytest
import torch

from weightsmith.prune import importance as imp
from weightsmith.prune.structure import FFN, HIDDEN, KVROWS, QROWS, Keep, LayerKeep, slice_tensor

G = torch.Generator().manual_seed(0)


def test_head_scores_are_l2_over_head_dim():
    x = torch.rand(6 * 8, generator=G)
    want = torch.stack([x[h * 8 : (h + 1) * 8].norm() for h in range(6)])
    torch.testing.assert_close(imp.head_scores(x, 6, 8), want)


def test_keep_top_picks_the_largest_in_index_order_and_ties_keep_a_prefix():
    s = torch.tensor([0.1, 5.0, 3.0, 4.0, 0.2])
    assert imp.keep_top(s, 3).tolist() == [1, 2, 3]
    assert imp.keep_top(torch.ones(7), 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        imp.keep_top(s, 0)
    with pytest.raises(ValueError):
        imp.keep_top(s, 6)


def test_heads_are_kept_in_equal_numbers_per_kv_group():
    scores = torch.rand(12, generator=G)  # 3 KV groups x 4 query heads
    groups, q = imp.keep_heads_per_group(scores, 3, 2)
    assert groups.tolist() == [0, 1, 2] and len(q) == 6
    for g in range(3):
        local = [h for h in q.tolist() if h // 4 == g]
        best = sorted(range(4), key=lambda i: -float(scores[g * 4 + i]))[:2]
        assert sorted(h - 4 * g for h in local) == sorted(best)
    # whole-group removal: the group with the largest L2 of its head scores survives
    gs = imp.group_scores(scores, 3)
    top = imp.keep_top(gs, 1)
    groups, q = imp.keep_heads_per_group(scores, 3, 4, top)
    assert q.tolist() == list(range(4 * int(top), 4 * int(top) + 4))
    with pytest.raises(ValueError, match="1..4"):
        imp.keep_heads_per_group(scores, 3, 5)


def test_wanda_and_magnitude_columns():
    w = torch.randn(5, 7, generator=G)
    xn = torch.rand(7, generator=G)
    torch.testing.assert_close(imp.wanda_columns(w, xn), torch.stack([(w[:, j].abs() * xn[j]).sum() for j in range(7)]))
    torch.testing.assert_close(imp.magnitude_columns(w), torch.stack([w[:, j].norm() for j in range(7)]))


def test_block_influence():
    h = torch.randn(2, 5, 16, generator=G)
    assert imp.block_influence(h, 3 * h) == pytest.approx((0.0, 10), abs=1e-5)
    assert imp.block_influence(h, -h)[0] == pytest.approx(20.0, abs=1e-4)
    a = torch.zeros(1, 1, 4)
    a[..., 0] = 1
    b = torch.zeros(1, 1, 4)
    b[..., 1] = 1
    assert imp.block_influence(a, b) == (pytest.approx(1.0), 1)


def test_contiguous_block_has_the_lowest_sum_and_spares_the_ends():
    s = torch.tensor([0.0, 5.0, 1.0, 1.0, 3.0, 0.5, 0.0])
    assert imp.contiguous_block(s, 2) == [2, 3]
    assert imp.contiguous_block(s, 3) == min(
        ([i, i + 1, i + 2] for i in range(1, 4)), key=lambda b: (float(s[b].sum()), b[0])
    )
    assert imp.contiguous_block(s, 0) == []
    with pytest.raises(ValueError):
        imp.contiguous_block(s, 7)


def test_sliced_attention_and_mlp_compute_the_restricted_source():
    """Slicing q/k/v rows, o columns, MLP neurons and hidden channels by kept indices equals the
    source with the dropped structures zeroed (random matrices, one layer, no RoPE needed)."""
    H, heads, kv, hd, F = 24, 6, 2, 4, 20
    lk = LayerKeep(torch.tensor([0, 2, 3, 5]), torch.tensor([0, 1]), torch.tensor([1, 4, 7, 8, 15]))
    keep = Keep(torch.arange(H), [0], {0: lk}, hd)
    W = {
        n: torch.randn(s, generator=G)
        for n, s in {
            "q": (heads * hd, H),
            "k": (kv * hd, H),
            "v": (kv * hd, H),
            "o": (H, heads * hd),
            "gate": (F, H),
            "up": (F, H),
            "down": (H, F),
        }.items()
    }
    axes = {
        "q": (QROWS, HIDDEN),
        "k": (KVROWS, HIDDEN),
        "v": (KVROWS, HIDDEN),
        "o": (HIDDEN, QROWS),
        "gate": (FFN, HIDDEN),
        "up": (FFN, HIDDEN),
        "down": (HIDDEN, FFN),
    }
    S = {n: slice_tensor(w, axes[n], keep, 0, None) for n, w in W.items()}
    x = torch.randn(3, 5, H, generator=G)

    def attn(w, n_heads, n_kv):
        q = (x @ w["q"].T).view(3, 5, n_heads, hd).transpose(1, 2)
        k = (x @ w["k"].T).view(3, 5, n_kv, hd).transpose(1, 2).repeat_interleave(n_heads // n_kv, 1)
        v = (x @ w["v"].T).view(3, 5, n_kv, hd).transpose(1, 2).repeat_interleave(n_heads // n_kv, 1)
        a = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, -1) @ v
        return a.transpose(1, 2).reshape(3, 5, -1) @ w["o"].T

    def mlp(w):
        return (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T

    mask = torch.zeros(heads * hd)
    for h in lk.q_heads.tolist():
        mask[h * hd : (h + 1) * hd] = 1
    nmask = torch.zeros(F)
    nmask[lk.ffn] = 1
    torch.testing.assert_close(attn(S, 4, 2), attn({**W, "o": W["o"] * mask}, heads, kv))
    torch.testing.assert_close(mlp(S), mlp({**W, "down": W["down"] * nmask}))
    # hidden channels: a sliced row/column pair equals the source restricted to those channels
    keep_h = Keep(torch.tensor([0, 3, 4, 10, 23]), [0], {0: lk}, hd)
    up = slice_tensor(W["up"], axes["up"], keep_h, 0, None)
    torch.testing.assert_close(up, W["up"][lk.ffn][:, keep_h.hidden])
