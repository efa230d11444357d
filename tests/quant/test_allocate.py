"""The mixed-precision allocator (pure maths): budget, monotonicity, determinism, infeasibility."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from weightsmith.errors import UsageError
from weightsmith.quant.allocate import (
    Unit,
    _hull,
    allocate,
    allocate_avg_bits,
    budget_bytes,
    min_avg_bits,
)

WIDTHS = (2, 3, 4, 8)


def _units(seed: int, n: int = 12) -> list[Unit]:
    """Units shaped like linears: bytes ~ bits·numel/8 + metadata, error ~ sensitivity·4^-bits with noise."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        numel = rng.choice([4096, 8192, 12288, 24576])
        meta = rng.choice([64, 128, 512])
        sens = rng.lognormvariate(0, 2)
        opts = {b: (b * numel // 8 + meta, sens * 4.0**-b * rng.uniform(0.7, 1.3)) for b in WIDTHS}
        if rng.random() < 0.15:  # a module the format cannot store at 3 bits
            del opts[3]
        out.append(Unit(f"u{i}", opts))
    return out


def _uniform(units: list[Unit]) -> dict[int, int]:
    return {b: sum(u.options[b][0] if b in u.options else u.options[4][0] for u in units) for b in WIDTHS}


def _brute(units: list[Unit], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*[sorted(u.options) for u in units]):
        cost = sum(u.options[b][0] for u, b in zip(units, combo))
        if cost <= budget:
            best = min(best, sum(u.options[b][1] for u, b in zip(units, combo)))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_budget_respected_and_monotone(seed):
    units = _units(seed)
    lo = sum(min(o[0] for o in u.options.values()) for u in units)
    hi = sum(max(o[0] for o in u.options.values()) for u in units)
    prev = float("inf")
    for budget in range(lo, hi + 1, max(1, (hi - lo) // 97)):
        a = allocate(units, budget)
        assert a.bytes <= budget and a.budget == budget
        assert a.bytes == sum(u.options[a.bits[u.name]][0] for u in units)
        assert a.error <= prev * (1 + 1e-12), (budget, a.error, prev)  # more budget never costs quality
        prev = a.error
    assert allocate(units, hi).error == pytest.approx(sum(min(o[1] for o in u.options.values()) for u in units))


@pytest.mark.parametrize("seed", range(6))
def test_close_to_the_optimum_and_never_worse_than_uniform(seed):
    units = _units(seed, n=6)
    uni = _uniform(units)
    # the greedy's classical bound: within the largest single upgrade's error reduction of the optimum
    step = max(
        u.options[h[j - 1]][1] - u.options[h[j]][1] for u in units for h in [_hull(u.options)] for j in range(1, len(h))
    )
    for b in (2, 3, 4):
        a = allocate(units, uni[b])
        opt = _brute(units, uni[b])
        assert opt * (1 - 1e-12) <= a.error <= opt + step, (b, a.error, opt, step)
        if all(b in u.options for u in units):
            assert a.error <= math.fsum(u.options[b][1] for u in units) * (1 + 1e-12)


def test_deterministic_and_independent_of_dict_order():
    units = _units(3)
    shuffled = [Unit(u.name, dict(reversed(list(u.options.items())))) for u in units]
    budget = _uniform(units)[3]
    a, b, c = allocate(units, budget), allocate(units, budget), allocate(shuffled, budget)
    assert a == b == c


def test_hull_skips_widths_that_do_not_pay():
    # 3 bits costs 3/4 of the way from 2 to 4 but removes only a quarter of the error: never on the hull
    assert _hull({2: (100, 10.0), 3: (175, 7.5), 4: (200, 0.0)}) == [2, 4]
    # a width that is no better than a cheaper one is dropped
    assert _hull({2: (100, 1.0), 3: (150, 1.0), 4: (200, 0.5)}) == [2, 4]
    assert _hull({2: (100, 8.0), 3: (150, 4.0), 4: (200, 2.0), 8: (400, 0.0)}) == [2, 3, 4, 8]


def test_budget_of_avg_bits():
    uni = {2: 1000, 3: 1400, 4: 1800, 8: 3400}
    assert budget_bytes(3, uni) == 1400 and budget_bytes(2.5, uni) == 1200 and budget_bytes(6, uni) == 2600
    with pytest.raises(UsageError, match=r"--avg-bits 1\.5: must be between 2 and 8"):
        budget_bytes(1.5, uni)


def test_infeasible_budget_names_the_option_and_the_minimum():
    units = [Unit("a", {4: (580, 1.0), 8: (1100, 0.0)}), Unit("b", {2: (500, 1.0), 3: (700, 0.5), 4: (900, 0.1)})]
    uni = {2: 1000, 3: 1400, 4: 1800, 8: 3400}
    with pytest.raises(UsageError) as e:
        allocate_avg_bits(2.0, units, uni)
    msg = str(e.value)
    assert "\n" not in msg and "--avg-bits 2" in msg and "minimum feasible value is 2.2" in msg, msg
    assert min_avg_bits(1080, uni) == 2.2 and budget_bytes(2.2, uni) >= 1080 > budget_bytes(2.19, uni)
    a = allocate_avg_bits(2.2, units, uni)
    assert a.bits == {"a": 4, "b": 2} and a.bytes == 1080
