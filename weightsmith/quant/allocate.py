"""Mixed precision under a byte budget (pure maths: numbers in, bit widths out).

Each *unit* (a set of linears that must share one bit width, e.g. the q/k/v that servers fuse) has,
for every width it can take, a byte cost (what the format stores for it: codes, scales, zero points,
g_idx) and an error estimate (its sensitivity at that width). `allocate` chooses one width per unit
so that the bytes stay within the budget and the summed error is small:

1. per unit, drop options that cost more without lowering the error and keep the lower convex hull
   of (bytes, error) from the cheapest option up: the upgrades along it have decreasing error
   reduction per byte;
2. start every unit at its cheapest option, then scan all units' upgrades in one order — best
   error reduction per byte first, ties by unit order then width — taking each that fits in the
   remaining bytes (a unit's later upgrade only after its earlier one).

3. keep the better of that and every uniform width that fits.

Deterministic (no randomness, total order on ties); never over budget; more budget never gives a
larger total error (an upgrade taken with less budget is either taken again or displaced by ones
with at least its reduction per byte, over at least its bytes; and more uniform widths fit). Greedy
on hulls is within one upgrade's error reduction of the optimum of the multiple-choice knapsack.

`budget_bytes` turns `--avg-bits` into bytes: the stored size of the same modules quantized
uniformly at that width, interpolated linearly between the two nearest supported widths when it is
not one of them (the size of a uniform model is affine in the width, up to word rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from weightsmith.errors import UsageError


@dataclass(frozen=True)
class Unit:
    name: str
    options: dict[int, tuple[int, float]]  # bits -> (bytes, error)


@dataclass
class Allocation:
    bits: dict[str, int]  # unit name -> chosen width
    bytes: int
    budget: int
    error: float  # Σ of the chosen options' errors


class Infeasible(ValueError):
    def __init__(self, need: int, budget: int):
        super().__init__(f"the cheapest choice needs {need} bytes, over the budget of {budget}")
        self.need, self.budget = need, budget


def _hull(options: dict[int, tuple[int, float]]) -> list[int]:
    """Widths on the lower convex hull of (bytes, error), cheapest first, error strictly falling."""
    pts = sorted(options.items(), key=lambda kv: (kv[1][0], kv[1][1], kv[0]))
    kept: list[tuple[int, int, float]] = []
    for b, (nbytes, err) in pts:
        if kept and (nbytes == kept[-1][1] or err >= kept[-1][2]):
            continue  # no cheaper than the last kept one, or no better
        kept.append((b, nbytes, err))
    hull: list[tuple[int, int, float]] = []
    for p in kept:  # lower hull: the slope (error per byte, negative) must keep rising
        while len(hull) >= 2:
            (_, x1, y1), (_, x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[1] - x1) >= (p[2] - y1) * (x2 - x1):  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return [b for b, _, _ in hull]


def allocate(units: list[Unit], budget: int) -> Allocation:
    if not units:
        return Allocation({}, 0, int(budget), 0.0)
    hulls = [_hull(u.options) for u in units]
    chosen = [h[0] for h in hulls]
    need = sum(u.options[c][0] for u, c in zip(units, chosen))
    if need > budget:
        raise Infeasible(need, int(budget))
    steps = []  # (-reduction per byte, unit index, step index, bytes, to)
    for i, (u, h) in enumerate(zip(units, hulls)):
        for j in range(1, len(h)):
            (b0, e0), (b1, e1) = u.options[h[j - 1]], u.options[h[j]]
            steps.append((-(e0 - e1) / (b1 - b0), i, j, b1 - b0, h[j]))
    steps.sort()
    left = budget - need
    at = [0] * len(units)  # position of each unit on its hull
    for _, i, j, cost, to in steps:
        if at[i] == j - 1 and cost <= left:
            at[i], chosen[i] = j, to
            left -= cost
    best = _result(units, chosen, budget)
    # the greedy can end up to one upgrade short of the optimum; never return worse than a uniform
    # width that fits (this keeps the monotonicity: a larger budget only adds candidates)
    for b in sorted({b for u in units for b in u.options}):
        if all(b in u.options for u in units):
            uni = _result(units, [b] * len(units), budget)
            if uni.bytes <= budget and uni.error < best.error:
                best = uni
    return best


def _result(units: list[Unit], chosen: list[int], budget: int) -> Allocation:
    return Allocation(
        {u.name: c for u, c in zip(units, chosen)},
        sum(u.options[c][0] for u, c in zip(units, chosen)),
        int(budget),
        math.fsum(u.options[c][1] for u, c in zip(units, chosen)),
    )


def budget_bytes(avg_bits: float, uniform: dict[int, int]) -> int:
    """Bytes of the modules at a uniform `avg_bits`, from their bytes at each supported width."""
    widths = sorted(uniform)
    if not widths[0] <= avg_bits <= widths[-1]:
        raise UsageError(f"--avg-bits {avg_bits:g}: must be between {widths[0]} and {widths[-1]}")
    if avg_bits in uniform:
        return uniform[int(avg_bits)]
    lo = max(b for b in widths if b < avg_bits)
    hi = min(b for b in widths if b > avg_bits)
    return math.floor(uniform[lo] + (avg_bits - lo) / (hi - lo) * (uniform[hi] - uniform[lo]))


def min_avg_bits(need: int, uniform: dict[int, int]) -> float:
    """The smallest --avg-bits (rounded up to 0.01) whose budget covers `need` bytes."""
    widths = sorted(uniform)
    for lo, hi in zip(widths, widths[1:]):
        if uniform[hi] >= need:
            if uniform[lo] >= need:
                return float(lo)
            x = lo + (need - uniform[lo]) / (uniform[hi] - uniform[lo]) * (hi - lo)
            x = math.ceil(x * 100 - 1e-9) / 100
            while budget_bytes(min(x, hi), uniform) < need:
                x += 0.01
            return round(min(x, float(hi)), 2)
    return float("inf")


def allocate_avg_bits(avg_bits: float, units: list[Unit], uniform: dict[int, int]) -> Allocation:
    """`allocate` under the budget of a uniform `avg_bits` model; an impossible budget is a usage error."""
    budget = budget_bytes(avg_bits, uniform)
    try:
        return allocate(units, budget)
    except Infeasible as e:
        lowest = min_avg_bits(e.need, uniform)
        raise UsageError(
            f"--avg-bits {avg_bits:g}: below what these modules can be stored in ({e.need} bytes > budget {budget}); "
            f"the minimum feasible value is {lowest:g}"
        ) from None
