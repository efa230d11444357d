"""Orthogonal rotations that fold into a model's weights (pure tensor maths, float64).

A decoder whose norms are RMSNorms with unit weights computes the same function when its residual
stream is rotated by an orthogonal Q (QuaRot, Ashkboos et al. 2024; SpinQuant's R1): RMSNorm(xQ) =
RMSNorm(x)Q because ‖xQ‖ = ‖x‖. So, with row vectors x and nn.Linear weights W [out, in]:

- the RMSNorm scale γ is first folded into every linear that reads the normed stream (W·diag(γ)),
  and the norm's weight becomes ones;
- the embedding becomes E·Q, every reader of the residual W·Q, every writer Qᵀ·W (bias b·Q);
- per head, the values can be rotated by R (head_dim) between v_proj and o_proj (SpinQuant's R2):
  v_proj rows Rᵀ·W_v[h], bias b_v[h]·R, o_proj input columns W_o[:, h]·R.

Rotated weights have flatter, more Gaussian distributions (outliers spread over all channels),
which is what low-bit grids want; the function of the model does not change.

Q is a randomised Hadamard matrix, H·diag(s)/√d with random signs s: Sylvester's construction for
powers of two, times (Kronecker) a Paley matrix for sizes 2^a·(p+1) (p ≡ 3 mod 4 prime) or
2^a·2(p+1) (p ≡ 1 mod 4 prime) — 576 = 16·36, 896 = 32·28, 960 = 16·60, 5120 = 256·20 — and a
seeded random orthogonal matrix (QR of a Gaussian) for sizes none of these reach.
"""

from __future__ import annotations

import torch

DTYPE = torch.float64


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(n**0.5) + 1))


def _jacobsthal(p: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character mod a prime p."""
    squares = {(x * x) % p for x in range(1, p)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, p)], dtype=DTYPE)
    idx = (torch.arange(p)[None, :] - torch.arange(p)[:, None]) % p
    return chi[idx]


def _paley(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n from Paley's constructions with a prime p, or None."""
    p = n - 1
    if _is_prime(p) and p % 4 == 3:  # Paley I: I + S, S skew
        q = _jacobsthal(p)
        s = torch.zeros(n, n, dtype=DTYPE)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = q
        return torch.eye(n, dtype=DTYPE) + s
    if n % 2 == 0:
        p = n // 2 - 1
        if _is_prime(p) and p % 4 == 1:  # Paley II: symmetric conference matrix C
            c = torch.zeros(p + 1, p + 1, dtype=DTYPE)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(p)
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=DTYPE)
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=DTYPE)
            return torch.kron(c, a) + torch.kron(torch.eye(p + 1, dtype=DTYPE), b)
    return None


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=DTYPE)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n (Sylvester ⊗ Paley), or None if these constructions miss n."""
    two = n & -n  # largest power of two dividing n
    if two == n:
        return _sylvester(n)
    for a in range(two.bit_length()):
        m = n >> a  # n = 2^a · m, m = odd part · 2^(k−a)
        base = _paley(m)
        if base is not None:
            return torch.kron(_sylvester(1 << a), base)
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix)."""
    a = torch.randn(n, n, generator=generator, dtype=DTYPE)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(orthogonal [n, n] float64, kind): a randomised Hadamard diag(s)·H/√n when one exists."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        return random_orthogonal(n, g), "random orthogonal"
    signs = torch.randint(0, 2, (n,), generator=g).to(DTYPE) * 2 - 1
    return signs[:, None] * h / n**0.5, "randomised Hadamard"


# ---- folding into weights (W is an nn.Linear weight [out, in]; biases are [out]) -------------


def reader(w: torch.Tensor, q: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """A linear reading the (normed) residual: W·diag(γ)·Q."""
    w = w.to(DTYPE)
    if norm is not None:
        w = w * norm.to(DTYPE)[None, :]
    return w @ q


def writer(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A linear writing into the residual: Qᵀ·W (its bias: `rotate_rows`)."""
    return q.T @ w.to(DTYPE)


def rotate_rows(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row vectors living in the residual basis (embedding rows, a writer's bias): x·Q."""
    return x.to(DTYPE) @ q


def heads_out(w: torch.Tensor, r: torch.Tensor, head_dim: int) -> torch.Tensor:
    """v_proj weight [heads·hd, in] (or bias [heads·hd]): each head's outputs rotated by R."""
    if w.dim() == 1:
        return (w.to(DTYPE).view(-1, head_dim) @ r).reshape(-1)
    n, k = w.shape
    return torch.einsum("ji,hjk->hik", r, w.to(DTYPE).view(n // head_dim, head_dim, k)).reshape(n, k)


def heads_in(w: torch.Tensor, r: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj weight [out, heads·hd]: each head's input columns rotated by R."""
    n, k = w.shape
    return (w.to(DTYPE).view(n, k // head_dim, head_dim) @ r).reshape(n, k)
