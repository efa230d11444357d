"""Which key directions keep RoPE: RoRoPE + FreqFold (TransMLA) and partial-RoPE selection (MHA2MLA).

Keys of all KV heads are viewed as frequency "slots" (KV head j, frequency i), each a pair of rows
(real, imag) of `k_proj`. A block of slots sharing (approximately) one frequency is rotated by an
orthogonal basis V applied identically to real and imag rows; with one frequency per block this
commutes with RoPE exactly. The rotated components are split into the kept RoPE pairs (the shared
decoupled key of DeepSeek's layout) and the rest, which lose RoPE and go into the latent.

Every query head h (KV group g) follows the same basis: its query for component k is
Σ_i V[(g, i), k] · q_h[i] (real and imag alike). This is represented as a map T_h from the head's
original d query dims to component rows, so the query projection rows are T_h @ W_q^h.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.convert.mla.rope import half_pairs


@dataclass
class Split:
    """Key rows split into RoPE pairs (interleaved) and RoPE-free rows, with the query maps."""

    rope_k: torch.Tensor  # [d_r, H+1] kept key rows, interleaved pairs (last column = bias)
    rope_freq: torch.Tensor  # [d_r/2] inverse frequency each kept pair turns at
    rope_q: torch.Tensor  # [n_h, d_r, d] head query (rotate-half dims) -> rope query rows
    nope_k: torch.Tensor  # [m, H+1] key rows that lose RoPE
    nope_q: torch.Tensor  # [n_h, m, d]
    kept_energy: float  # fraction of the key's second moment kept in the RoPE part
    freq_error: float  # energy-weighted |Δ log freq| of folded components (0 when exact)


def slot_rows(wk: torch.Tensor, n_kv: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_kv, d/2, H+1] real rows and imag rows of the augmented key projection."""
    r, i = half_pairs(d)
    w = wk.reshape(n_kv, d, -1)
    return w[:, r], w[:, i]


def _pair_cov(kr: torch.Tensor, ki: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return kr @ C @ kr.T + ki @ C @ ki.T


def _query_energy(wq_heads: torch.Tensor, C: torch.Tensor, d: int) -> torch.Tensor:
    """[n_h, d/2] second moment of each query head's frequency pairs (real + imag)."""
    r, i = half_pairs(d)
    n_h, d_, H1 = wq_heads.shape
    w = wq_heads.reshape(-1, H1)
    e = ((w @ C) * w).sum(-1).reshape(n_h, d_)
    return e[:, r] + e[:, i]


@dataclass
class Block:
    slots: list[tuple[int, int]]  # (kv head, frequency index)
    keep: int  # components kept as RoPE pairs
    freqs: torch.Tensor | None = None  # [keep] target frequencies (None: component's own, exact)


def _query_rows(v, idx_i, idx_j, *, n_h: int, g: int, d: int, dtype) -> torch.Tensor:
    """[n_h, 2, d]: a key component v over (kv head, frequency) slots, as the query-side rows
    (real and imaginary halves) of every query head of each KV group."""
    tq = torch.zeros(n_h, 2, d, dtype=dtype)
    for h in range(n_h):
        mask = idx_j == h // g
        tq[h, 0, idx_i[mask]] = v[mask]
        tq[h, 1, idx_i[mask] + d // 2] = v[mask]
    return tq


def _rotate(wk, wq, C, *, n_h, n_kv, d, blocks, basis):
    """Per block: orthonormal basis over its slots, and each component's score and key energy."""
    g = n_h // n_kv
    kr, ki = slot_rows(wk, n_kv, d)
    qe = _query_energy(wq.reshape(n_h, d, -1), C, d)  # [n_h, d/2]
    G = (wk @ C @ wk.T).reshape(n_kv, d, n_kv, d)  # key second moments, all rows at once
    r_, i_ = half_pairs(d)
    Gp = G[:, r_][:, :, :, r_] + G[:, i_][:, :, :, i_]  # [n_kv, d/2, n_kv, d/2]: pair covariances
    total_k = float(sum(Gp[j, :, j, :].trace() for j in range(n_kv)))
    comps = []  # (score, block index, component vector over block slots, key energy)
    for b, blk in enumerate(blocks):
        idx_j = torch.tensor([s[0] for s in blk.slots])
        idx_i = torch.tensor([s[1] for s in blk.slots])
        cov = Gp[idx_j[:, None], idx_i[:, None], idx_j[None, :], idx_i[None, :]]
        if basis == "pca":
            evals, evecs = torch.linalg.eigh(cov)
            order = torch.argsort(evals, descending=True)
            V, lam = evecs[:, order], evals[order].clamp_min(0)
        else:
            V, lam = torch.eye(len(blk.slots), dtype=cov.dtype), cov.diagonal().clamp_min(0)
        for k in range(V.shape[1]):
            v = V[:, k]
            # ‖k‖·Σ_h ‖q_h‖ on this component (MHA2MLA's 2-norm score; cross terms ignored)
            qk = 0.0
            for h in range(n_h):
                mask = idx_j == h // g
                qk += float(((v[mask] ** 2) * qe[h, idx_i[mask]]).sum().sqrt())
            comps.append((float(lam[k]) ** 0.5 * qk, b, v, float(lam[k])))
    return kr, ki, comps, total_k


def block_scores(wk, wq, C, *, n_h, n_kv, d, blocks, basis="pca") -> list[list[float]]:
    """Scores of each block's components, best first (to allocate RoPE pairs across layers)."""
    _, _, comps, _ = _rotate(wk, wq, C, n_h=n_h, n_kv=n_kv, d=d, blocks=blocks, basis=basis)
    out: list[list[float]] = [[] for _ in blocks]
    for c in comps:
        out[c[1]].append(c[0])
    return [sorted(x, reverse=True) for x in out]


def allocate_pairs(scores: list[list[list[float]]], pairs: int) -> list[int]:
    """How many RoPE pairs each block (frequency) gets, the same for every layer (the RoPE table is
    one config for the whole model): greedy on the k-th best component's score summed over layers.

    scores[layer][block] = component scores, best first."""
    nb = len(scores[0])
    total = [[sum(layer[b][k] for layer in scores) for k in range(len(scores[0][b]))] for b in range(nb)]
    counts = [0] * nb
    for _ in range(pairs):
        best, arg = None, None
        for b in range(nb):
            if counts[b] < len(total[b]) and (best is None or total[b][counts[b]] > best):
                best, arg = total[b][counts[b]], b
        if arg is None:
            raise ValueError(f"{pairs} RoPE pairs exceed the {sum(len(t) for t in total)} available")
        counts[arg] += 1
    return counts


def build_split(
    wk: torch.Tensor,
    wq: torch.Tensor,
    C: torch.Tensor,
    *,
    n_h: int,
    n_kv: int,
    d: int,
    inv_freq: torch.Tensor,
    blocks: list[Block],
    basis: str = "pca",
) -> Split:
    """Rotate each block of slots (PCA of the keys, or the slots themselves) and keep each block's
    `keep` best components as RoPE pairs: at the block's own frequency (single-frequency blocks,
    exact) or at the block's target frequencies (FreqFold, approximate)."""
    g = n_h // n_kv
    kr, ki, comps, total_k = _rotate(wk, wq, C, n_h=n_h, n_kv=n_kv, d=d, blocks=blocks, basis=basis)
    by_block: dict[int, list[int]] = {b: [] for b in range(len(blocks))}
    for n, c in enumerate(comps):
        by_block[c[1]].append(n)
    kept = {b: sorted(by_block[b], key=lambda n: (-comps[n][0], n))[: blk.keep] for b, blk in enumerate(blocks)}
    rope_k, rope_f, rope_q, nope_k, nope_q = [], [], [], [], []
    kept_e, ferr = 0.0, 0.0
    H1 = wk.shape[1]
    for b, blk in enumerate(blocks):
        idx_j = torch.tensor([s[0] for s in blk.slots])
        idx_i = torch.tensor([s[1] for s in blk.slots])
        br, bi = kr[idx_j, idx_i], ki[idx_j, idx_i]
        keep_set = set(kept[b])
        # kept components at target frequencies: sorted by their energy-weighted mean source frequency
        ks = list(kept[b])
        if blk.freqs is not None:
            logf = torch.log(inv_freq[idx_i].double())
            centre = {n: float((comps[n][2] ** 2 * logf).sum()) for n in ks}
            ks.sort(key=lambda n: -centre[n])  # highest frequency first, like the target table
        for slot_n, n in enumerate(ks):
            v = comps[n][2]
            tq = _query_rows(v, idx_i, idx_j, n_h=n_h, g=g, d=d, dtype=wk.dtype)
            rope_k.append(torch.stack([v @ br, v @ bi]))
            rope_q.append(tq)
            if blk.freqs is None:
                f = inv_freq[idx_i][v.abs().argmax()]
                if len(set(idx_i.tolist())) > 1:
                    raise ValueError("a block without target frequencies must hold a single frequency")
            else:
                f = blk.freqs[slot_n]
                w = v**2
                ferr += comps[n][3] * float(
                    (w * (torch.log(inv_freq[idx_i].double()) - torch.log(f.double())).abs()).sum()
                )
            rope_f.append(f)
            kept_e += comps[n][3]
        for n in by_block[b]:
            if n in keep_set:
                continue
            v = comps[n][2]
            tq = _query_rows(v, idx_i, idx_j, n_h=n_h, g=g, d=d, dtype=wk.dtype)
            nope_k.append(torch.stack([v @ br, v @ bi]))
            nope_q.append(tq)

    def cat_k(rows):
        return torch.cat(rows) if rows else torch.zeros(0, H1, dtype=wk.dtype)

    def cat_q(rows):
        return torch.cat(rows, dim=1) if rows else torch.zeros(n_h, 0, d, dtype=wk.dtype)

    return Split(
        rope_k=cat_k(rope_k),
        rope_freq=torch.stack([torch.as_tensor(f) for f in rope_f]).float() if rope_f else torch.zeros(0),
        rope_q=cat_q(rope_q),
        nope_k=cat_k(nope_k),
        nope_q=cat_q(nope_q),
        kept_energy=kept_e / max(total_k, 1e-30),
        freq_error=ferr / max(kept_e, 1e-30),
    )


# ---- block layouts --------------------------------------------------------------------------------


def single_frequency_blocks(n_kv: int, d: int, keep: list[int] | None = None) -> list[Block]:
    """One block per frequency (all KV heads): RoRoPE without folding; rotations commute with RoPE,
    so each kept pair turns at its own source frequency (carried exactly by the exact target)."""
    return [Block([(j, i) for j in range(n_kv)], keep=keep[i] if keep else 0) for i in range(d // 2)]


def freqfold_blocks(n_kv: int, d: int, d_r: int, fold: int, inv_freq: torch.Tensor) -> list[Block]:
    """FreqFold for a shared standard-RoPE key of d_r dims (target pair p turns at source frequency
    p·collapse, collapse = d/d_r): blocks of `fold` adjacent source frequencies across all KV heads,
    each keeping fold/collapse components at the block's target frequencies."""
    collapse = d // d_r
    half = d // 2
    blocks = []
    for b0 in range(0, half, fold):
        freqs = list(range(b0, min(b0 + fold, half)))
        targets = [f for f in freqs if f % collapse == 0]
        blocks.append(Block([(j, i) for j in range(n_kv) for i in freqs], keep=len(targets), freqs=inv_freq[targets]))
    return blocks


def head_selection_blocks(n_kv: int, d: int, kept: list[list[int]]) -> list[Block]:
    """MHA2MLA partial RoPE: per KV head j, the frequencies kept[j] keep RoPE, exactly, per head."""
    blocks = []
    for j in range(n_kv):
        for i in range(d // 2):
            blocks.append(Block([(j, i)], keep=1 if i in kept[j] else 0))
    return blocks


def engine_head_selection_blocks(
    n_kv: int, d: int, d_r: int, score: torch.Tensor, inv_freq: torch.Tensor
) -> list[Block]:
    """MHA2MLA partial RoPE for one shared standard-RoPE key of d_r dims (the engine target): target
    pair p turns at source frequency i = p·collapse (collapse = d/d_r), so each of those frequencies
    keeps RoPE, exactly, in the KV head with the highest 2-norm score there; every other pair
    (other frequencies, other heads) loses RoPE and goes to the latent.

    score: [n_kv, d/2] 2-norm scores (two_norm_scores summed over layers)."""
    if d % d_r:
        raise ValueError(f"rope dim {d_r} must divide head_dim {d}")
    collapse = d // d_r
    blocks = []
    for i in range(d // 2):
        best = int(torch.argmax(score[:, i])) if i % collapse == 0 else -1
        for j in range(n_kv):
            keep = int(j == best)
            blocks.append(Block([(j, i)], keep=keep, freqs=inv_freq[[i]] if keep else None))
    return blocks


def partial_rope_frequencies(
    strategy: str, n_kv: int, d: int, per_head: int, score: torch.Tensor | None = None
) -> list[list[int]]:
    """Frequencies kept per KV head (MHA2MLA's S_high, S_low, S_uniform, S_2-norm).

    score: [n_kv, d/2] 2-norm scores (query norms summed over the KV group × key norm).
    """
    half = d // 2
    if not 0 <= per_head <= half:
        raise ValueError(f"{per_head} RoPE pairs per KV head is outside 0..{half}")
    if strategy == "high":
        base = list(range(per_head))
        return [base for _ in range(n_kv)]
    if strategy == "low":
        base = list(range(half - per_head, half))
        return [base for _ in range(n_kv)]
    if strategy == "uniform":
        step = half / max(per_head, 1)
        base = sorted({int(k * step) for k in range(per_head)})
        return [base for _ in range(n_kv)]
    if strategy == "2norm":
        if score is None:
            raise ValueError("2norm selection needs calibration scores")
        return [sorted(torch.argsort(score[j], descending=True)[:per_head].tolist()) for j in range(n_kv)]
    raise ValueError(f"unknown partial-RoPE strategy {strategy!r}; valid: high, low, uniform, 2norm")


def two_norm_scores(
    wk: torch.Tensor, wq: torch.Tensor, C: torch.Tensor, *, n_h: int, n_kv: int, d: int
) -> torch.Tensor:
    """[n_kv, d/2] MHA2MLA's 2-norm score: ‖k pair‖ · Σ_(heads of the group) ‖q pair‖ (RMS over data)."""
    g = n_h // n_kv
    kr, ki = slot_rows(wk, n_kv, d)
    ke = ((kr @ C) * kr).sum(-1) + ((ki @ C) * ki).sum(-1)
    qe = _query_energy(wq.reshape(n_h, d, -1), C, d)
    qs = qe.clamp_min(0).sqrt().reshape(n_kv, g, -1).sum(1)
    return ke.clamp_min(0).sqrt() * qs
