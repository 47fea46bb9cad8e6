"""Requantization numerics against exact rational arithmetic and hand-worked cases."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from qcompiler.errors import QCompileError
from qcompiler.requant import (
    ROUNDINGS, fixed_point_multiplier, is_exact, power_of_two_shift, requant_constants, requantize,
    round_float, rounding_right_shift,
)


def _round_fraction(x: Fraction, rounding: str) -> int:
    """An independent definition of every rounding mode, on exact rationals."""
    fl = math.floor(x)
    frac = x - fl
    if rounding == "floor":
        return fl
    if rounding == "toward_zero":
        return fl if x >= 0 else math.ceil(x)
    if frac != Fraction(1, 2):
        return fl + (1 if frac > Fraction(1, 2) else 0)
    return {"half_up": fl + 1, "half_down": fl, "half_even": fl + (fl % 2),
            "half_away_from_zero": fl + 1 if x > 0 else fl}[rounding]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_rounding_shift_matches_fractions(rounding):
    rng = random.Random(0)
    values = [rng.randint(-2**40, 2**40) for _ in range(400)] + list(range(-20, 21))
    # Exact ties for every shift: k * 2**s + 2**(s-1).
    values += [k * 2**s + 2**(s - 1) for k in (-3, -2, -1, 0, 1, 2) for s in (1, 3, 7)]
    for shift in (1, 3, 7, 20):
        p = torch.tensor(values, dtype=torch.int64)
        got = rounding_right_shift(p, torch.tensor(shift), rounding).tolist()
        want = [_round_fraction(Fraction(v, 2**shift), rounding) for v in values]
        assert got == want, (rounding, shift)


def test_hand_worked_roundings():
    p = torch.tensor([5, -5, 6, -6, 7, -7], dtype=torch.int64)        # / 4: 1.25 -1.25 1.5 -1.5 1.75 -1.75
    two = torch.tensor(2)
    assert rounding_right_shift(p, two, "half_even").tolist() == [1, -1, 2, -2, 2, -2]
    assert rounding_right_shift(p, two, "half_away_from_zero").tolist() == [1, -1, 2, -2, 2, -2]
    assert rounding_right_shift(p, two, "half_up").tolist() == [1, -1, 2, -1, 2, -2]
    assert rounding_right_shift(p, two, "half_down").tolist() == [1, -1, 1, -2, 2, -2]
    assert rounding_right_shift(p, two, "floor").tolist() == [1, -2, 1, -2, 1, -2]
    assert rounding_right_shift(p, two, "toward_zero").tolist() == [1, -1, 1, -1, 1, -1]
    # A 2.5 tie: half_even goes to 2, away from zero to 3.
    assert rounding_right_shift(torch.tensor([10]), two, "half_even").tolist() == [2]
    assert rounding_right_shift(torch.tensor([10]), two, "half_away_from_zero").tolist() == [3]
    # Negative shifts are exact left shifts.
    assert rounding_right_shift(torch.tensor([3, -3]), torch.tensor(-4), "half_even").tolist() == [48, -48]


def test_fixed_point_multiplier_hand_worked():
    m, s = fixed_point_multiplier(torch.tensor([0.5, 0.75, 1.0, 2.0**-20]), 32)
    assert m.tolist() == [2**30, 3 * 2**29, 2**30, 2**30]
    assert s.tolist() == [31, 31, 30, 50]
    # 8-bit multiplier of 1/3: 0.333.. = 0.666.. * 2**-1 -> M = round(0.666 * 128) = 85, shift 8.
    m, s = fixed_point_multiplier(torch.tensor([1 / 3]), 8)
    assert (m.item(), s.item()) == (85, 8)
    # Rounding up to the next power of two renormalises: 0.99999 with 4 bits -> M=4, shift 2.
    m, s = fixed_point_multiplier(torch.tensor([0.99999]), 4)
    assert (m.item(), s.item()) == (4, 2)


def test_fixed_point_multiplier_is_nearest_and_normalised():
    rng = random.Random(1)
    reals = [rng.uniform(1e-6, 4.0) for _ in range(300)]
    m, s = fixed_point_multiplier(torch.tensor(reals, dtype=torch.float64), 32)
    for r, mi, si in zip(reals, m.tolist(), s.tolist()):
        assert 2**30 <= mi < 2**31
        err = abs(Fraction(mi, 2**si) - Fraction(r))
        assert err <= Fraction(1, 2**(si + 1))          # the nearest 32-bit fixed-point value


def test_tiny_factor_caps_the_shift():
    m, s = fixed_point_multiplier(torch.tensor([2.0**-70, 0.0]), 32)
    assert s.tolist() == [62, 0] and m.tolist() == [0, 0]


@pytest.mark.parametrize("rounding", ["half_even", "half_away_from_zero", "half_up"])
def test_fixed_point_requantize_matches_fractions(rounding):
    rng = random.Random(2)
    reals = torch.tensor([rng.uniform(1e-5, 0.9) for _ in range(8)], dtype=torch.float64)
    m, s, f = requant_constants(reals, "fixed_point", 32)
    acc = torch.tensor([[rng.randint(-2**31, 2**31 - 1) for _ in range(8)] for _ in range(50)])
    got = requantize(acc, "fixed_point", rounding, m, s, f)
    for row, grow in zip(acc.tolist(), got.tolist()):
        for a, g, mi, si in zip(row, grow, m.tolist(), s.tolist()):
            assert g == _round_fraction(Fraction(a * mi, 2**si), rounding)


def test_shift_mode_needs_powers_of_two():
    assert power_of_two_shift(torch.tensor([0.25, 4.0, 1.0])).tolist() == [2, -2, 0]
    with pytest.raises(QCompileError, match="power-of-two"):
        power_of_two_shift(torch.tensor([0.3]))
    m, s, f = requant_constants(torch.tensor([2.0**-5]), "shift", None)
    acc = torch.tensor([47, -47, 48, -48, 16, -16])           # /32: 1.47 -1.47 1.5 -1.5 0.5 -0.5
    assert requantize(acc, "shift", "half_up", m, s, f).tolist() == [1, -1, 2, -1, 1, 0]


def test_float_mode_is_float32_arithmetic():
    real = torch.tensor([0.1], dtype=torch.float64)
    m, s, f = requant_constants(real, "float", None)
    acc = torch.tensor([5, 15, 25, 2**25 + 1])
    got = requantize(acc, "float", "half_even", m, s, f)
    # float32(acc) * float32(0.1), rounded half to even: computed by hand in numpy-free float32.
    want = [round(float(torch.tensor(float(a), dtype=torch.float32) * torch.tensor(0.1, dtype=torch.float32)))
            for a in acc.tolist()]
    assert got.tolist() == want
    assert round_float(torch.tensor([0.5, 1.5, -0.5, -2.5]), "half_away_from_zero").tolist() == [1, 2, -1, -3]


def test_exactness_flag():
    real = torch.tensor([0.375, 1 / 3], dtype=torch.float64)
    m, s, _ = requant_constants(real, "fixed_point", 32)
    assert is_exact(real[:1], m[:1], s[:1], "fixed_point")
    assert not is_exact(real[1:], m[1:], s[1:], "fixed_point")


def test_unknown_rounding_is_a_clear_error():
    with pytest.raises(QCompileError, match="unknown rounding"):
        rounding_right_shift(torch.tensor([1]), torch.tensor(1), "stochastic")


@pytest.mark.parametrize("mode", ["fixed_point", "shift", "float"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_float64_path_equals_the_int64_path(mode, rounding):
    from qcompiler.requant import requantize_float64

    g = torch.Generator().manual_seed(3)
    reals = torch.tensor([2.0**-9, 2.0**-14, 2.0**-3], dtype=torch.float64) if mode == "shift" else \
        torch.rand(3, generator=g, dtype=torch.float64) * 0.01 + 1e-4
    m, s, f = requant_constants(reals, mode, 32)
    acc = torch.randint(-2**20, 2**20, (500, 3), generator=g)
    # Exact ties of the shift: multiples of 2**(shift-1).
    if mode == "shift":
        acc[:20] = torch.arange(-10, 10).reshape(-1, 1) * (1 << (s - 1))
    fast = requantize_float64(acc.double(), mode, rounding, m, s, f)
    assert fast is not None
    want = requantize(acc, mode, rounding, m, s, f)
    assert torch.equal(fast.to(torch.int64), want)
    # In place (the simulation's path): same result, written over the caller's temporary.
    scratch = acc.double()
    again = requantize_float64(scratch, mode, rounding, m, s, f, inplace=True)
    assert torch.equal(again.to(torch.int64), want)
    if mode != "float":
        assert again.data_ptr() == scratch.data_ptr()
    if mode == "fixed_point":
        assert requantize_float64(torch.tensor([2.0**31]).reshape(1, 1).expand(1, 3), mode, rounding, m, s, f) is None


@pytest.mark.parametrize("span", [2**17, 2**20])   # the ulp-nudge path (below 2**50 / M) and the general one
@pytest.mark.parametrize("mode", ["fixed_point", "shift"])
def test_float64_half_away_ties_equal_the_int64_path(mode, span):
    """Ties of half_away_from_zero: factors 3/8, 5/8, 1/16 and 1/2 put many products exactly on
    a half; both float64 roundings must send them away from zero as the integer path does."""
    from qcompiler.requant import requantize_float64

    g = torch.Generator().manual_seed(5)
    reals = torch.tensor([0.375, 0.625, 0.0625, 0.5] if mode == "fixed_point" else [2.0**-1, 2.0**-3, 2.0**-4, 1.0],
                         dtype=torch.float64)
    m, s, f = requant_constants(reals, mode, 32)
    acc = torch.randint(-span, span, (4000, 4), generator=g)
    acc[:200] = torch.arange(-100, 100).reshape(-1, 1)          # small values: ties everywhere
    acc[200:400] = torch.arange(-100, 100).reshape(-1, 1) * 8 + 4
    want = requantize(acc, mode, "half_away_from_zero", m, s, f)
    got = requantize_float64(acc.double(), mode, "half_away_from_zero", m, s, f, inplace=True)
    assert torch.equal(got.to(torch.int64), want)
    frac = (acc.double() * reals).remainder(1.0)
    assert int((frac == 0.5).sum()) > 100          # the case under test occurs
