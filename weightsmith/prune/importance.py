"""Importance scores as pure functions over statistics collected on calibration text.

Minitron (arXiv 2407.14679): per channel, mean |activation| over the sequence, then L2 over
samples (the engine's ChannelImportance). Heads: L2 over head_dim of the o_proj-input channel
scores; MLP neurons: the down_proj-input channel scores; hidden channels: the per-channel scores
of every input/post-attention norm output, summed over layers (one global ranking). Depth: Block
Influence 1 - cos(h_in, h_out) averaged over tokens. Magnitude and Wanda (|W|·‖X‖) variants score
the same structures from weights (and input norms).
"""

from __future__ import annotations

import torch


def head_scores(channel_scores: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[heads*head_dim] channel scores of the o_proj input -> [heads] (L2 over head_dim)."""
    return channel_scores.float().view(heads, head_dim).norm(dim=1)


def magnitude_columns(w: torch.Tensor) -> torch.Tensor:
    """L2 norm of each input column of a weight [out, in] -> [in]."""
    return w.float().norm(dim=0)


def magnitude_rows(w: torch.Tensor) -> torch.Tensor:
    return w.float().norm(dim=1)


def wanda_columns(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023) summed per input column: Σ_rows |W_ij|·‖X_j‖ -> [in]."""
    return w.float().abs().sum(dim=0) * x_norm.float()


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """Σ over tokens of 1 - cos(h_in, h_out) and the token count (ShortGPT's Block Influence)."""
    a = h_in.float().reshape(-1, h_in.shape[-1])
    b = h_out.float().reshape(-1, h_out.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float((1 - cos).sum()), int(a.shape[0])


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, returned in ascending index order (stable under ties:
    the lower index wins, so all-equal scores keep a prefix)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()}")
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def keep_heads_per_group(
    scores: torch.Tensor, kv_heads: int, per_group: int, keep_groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA-consistent head choice: the same number of query heads kept in every kept KV group.

    scores: [q_heads]; returns (kept KV groups, kept query heads), both ascending; query heads of
    group g are g*q_per_kv .. (g+1)*q_per_kv-1 (transformers' repeat_kv layout).
    """
    q_heads = scores.numel()
    q_per_kv = q_heads // kv_heads
    if not 0 < per_group <= q_per_kv:
        raise ValueError(f"query heads per KV group must be in 1..{q_per_kv}, got {per_group}")
    groups = torch.arange(kv_heads) if keep_groups is None else keep_groups
    kept = []
    for g in groups.tolist():
        local = keep_top(scores[g * q_per_kv : (g + 1) * q_per_kv], per_group)
        kept += (local + g * q_per_kv).tolist()
    return groups, torch.tensor(kept, dtype=torch.long)


def group_scores(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Whole-group ranking: L2 over the group's query-head scores -> [kv_heads]."""
    return scores.float().view(kv_heads, -1).norm(dim=1)


def contiguous_block(scores: torch.Tensor, drop: int) -> list[int]:
    """The contiguous run of `drop` layers with the lowest total score (never the first or last
    layer when it can be avoided). Returns the layer indices to drop."""
    n = scores.numel()
    if not 0 <= drop < n:
        raise ValueError(f"cannot drop {drop} of {n} layers")
    if drop == 0:
        return []
    starts = range(1, n - drop) if n - drop > 1 else range(0, n - drop + 1)
    best = min(starts, key=lambda s: (float(scores[s : s + drop].sum()), s))
    return list(range(best, best + drop))
