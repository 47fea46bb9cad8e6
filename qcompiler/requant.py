"""Requantization numerics: how an integer accumulator becomes an output code on the target.

A kernel accumulates `acc = sum (q_in - z_in) * q_w + bias` exactly in integers; its real value
is `acc * s_acc` with `s_acc = s_in * s_w`. The output code is `requantize(acc) + z_out`, where
`requantize` multiplies by the real factor `r = s_acc / s_out` the way the target's `[requant]`
table says:

- mode "fixed_point": `r ~ M * 2**-shift` with an N-bit signed multiplier `M` in
  [2**(N-2), 2**(N-1)) (N = `multiplier_bits`); the code is `round(acc * M / 2**shift)`, computed
  exactly in int64 with a single rounding of the exact product (gemmlowp/TFLite round twice,
  in the doubling high multiply and in the rounding shift; a single rounding never differs by more
  than one code from it and only on exact ties);
- mode "shift": every scale is a power of two, so `r = 2**-shift` exactly and the code is a
  rounding arithmetic shift of the accumulator (a left shift when `shift < 0`);
- mode "float": `round(float32(acc) * float32(r))` in IEEE float32, as ONNX Runtime's x86
  kernels do.

Rounding modes and requantization modes are declared here and read by the spec schema. All functions take and return
tensors; integer ones work in int64 and never overflow for accumulators of at most
`64 - multiplier_bits` bits (checked).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import QCompileError
from .formats import aminmax_all

ROUNDINGS = ("half_even", "half_up", "half_down", "half_away_from_zero", "floor", "toward_zero")
MODES = ("float", "fixed_point", "shift")
# Largest right shift applied to an int64 product (shifting by 64 or more is undefined).
MAX_SHIFT = 62


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise QCompileError(f"unknown rounding {rounding!r}; known roundings: {', '.join(ROUNDINGS)}")


def fixed_point_multiplier(real: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(M, shift), int64, with M * 2**-shift the nearest N-bit fixed-point value to `real` (> 0).

    M is in [2**(bits-2), 2**(bits-1)) (its top magnitude bit set, so all N-1 bits carry
    precision), shift = bits - 1 - exponent. Factors so small that the shift would exceed
    MAX_SHIFT keep shift = MAX_SHIFT and a smaller M (fewer significant bits). A zero factor gives
    M = 0.
    """
    if not 2 <= bits <= 32:
        raise QCompileError(f"multiplier_bits must be 2..32, got {bits}")
    real = torch.as_tensor(real, dtype=torch.float64)
    if (real < 0).any() or not torch.isfinite(real).all():
        raise QCompileError("requantization factors must be finite and non-negative")
    mantissa, exponent = torch.frexp(real)               # real = mantissa * 2**exponent, m in [0.5, 1)
    m = torch.round(torch.ldexp(mantissa, torch.full_like(exponent, bits - 1))).to(torch.int64)
    exponent = exponent.to(torch.int64)
    # Rounding may carry the mantissa up to 2**(bits-1): renormalise.
    carry = m == (1 << (bits - 1))
    m = torch.where(carry, m >> 1, m)
    exponent = torch.where(carry, exponent + 1, exponent)
    shift = (bits - 1) - exponent
    too_far = shift > MAX_SHIFT
    if too_far.any():
        # M * 2**-shift with shift capped: M = round(real * 2**MAX_SHIFT).
        small = torch.round(torch.ldexp(real, torch.full_like(exponent, MAX_SHIFT))).to(torch.int64)
        m = torch.where(too_far, small, m)
        shift = torch.where(too_far, torch.full_like(shift, MAX_SHIFT), shift)
    zero = real == 0
    m = torch.where(zero, torch.zeros_like(m), m)
    shift = torch.where(zero, torch.zeros_like(shift), shift)
    return m, shift


def power_of_two_shift(real: Tensor) -> Tensor:
    """shift (int64) with real == 2**-shift exactly; raises if a factor is no power of two."""
    real = torch.as_tensor(real, dtype=torch.float64)
    mantissa, exponent = torch.frexp(real)
    if not bool((mantissa == 0.5).all()):
        bad = real[mantissa != 0.5].reshape(-1)[:3].tolist()
        raise QCompileError(
            f"requant mode 'shift' needs power-of-two scales, but a rescale factor is {bad}; give "
            "the target's formats scale = \"pow2\" or use mode \"fixed_point\"")
    return (1 - exponent).to(torch.int64)


def rounding_right_shift(p: Tensor, shift: Tensor, rounding: str) -> Tensor:
    """round(p / 2**shift) for int64 `p`, exactly, with the given rounding; shift <= 0 multiplies."""
    _check_rounding(rounding)
    p = p.to(torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64, device=p.device)
    if bool((shift > MAX_SHIFT).any()):
        raise QCompileError(f"right shifts above {MAX_SHIFT} bits are not supported")
    left = (-shift).clamp_min(0)
    s = shift.clamp_min(0)
    p = p * (1 << left) if bool((left > 0).any()) else p
    if not bool((s > 0).any()):
        return p
    one = torch.ones_like(s)
    half = torch.where(s > 0, one << (s - 1).clamp_min(0), torch.zeros_like(s))
    if rounding == "floor":
        return p >> s
    if rounding == "half_up":
        return (p + half) >> s
    if rounding == "half_down":
        return -((half - p) >> s)
    if rounding == "half_even":
        f = p >> s
        rem = p - (f << s)
        up = (rem > half) | ((rem == half) & (half > 0) & ((f & 1) == 1))
        return f + up.to(torch.int64)
    magnitude = p.abs()
    if rounding == "toward_zero":
        return torch.sign(p) * (magnitude >> s)
    return torch.sign(p) * ((magnitude + half) >> s)        # half_away_from_zero


def round_float(x: Tensor, rounding: str) -> Tensor:
    """Round float values to integers (float64 result) with the given rounding mode."""
    # float64 is exact for float32 inputs; the +-0.5 of the roundings below stays exact.
    return round_float_(x.to(torch.float64, copy=True), rounding)


def round_float_(x: Tensor, rounding: str) -> Tensor:
    """`round_float` in place on a float64 tensor `x` (one temporary at most); returns `x`."""
    _check_rounding(rounding)
    if rounding == "half_even":
        return x.round_()
    if rounding == "half_up":
        return x.add_(0.5).floor_()
    if rounding == "half_down":
        return x.sub_(0.5).ceil_()
    if rounding == "floor":
        return x.floor_()
    if rounding == "toward_zero":
        return x.trunc_()
    # half_away_from_zero: x + 0.5 rounds up for x >= 0 and x - 0.5 down for x < 0, then trunc.
    return x.add_(torch.copysign(torch.full((), 0.5, dtype=x.dtype), x)).trunc_()


def requantize(acc: Tensor, mode: str, rounding: str, multiplier: Tensor, shift: Tensor,
               float_multiplier: Tensor) -> Tensor:
    """The requantized accumulator (int64, before the output zero point and saturation).

    `multiplier`/`shift` (int64) serve "fixed_point" and "shift"; `float_multiplier` (float32)
    serves "float". All broadcast against `acc`.
    """
    if mode == "float":
        scaled = acc.to(torch.float32) * float_multiplier.to(torch.float32)
        return round_float(scaled, rounding).to(torch.int64)
    if mode == "shift":
        return rounding_right_shift(acc, shift, rounding)
    if mode == "fixed_point":
        return rounding_right_shift(acc.to(torch.int64) * multiplier, shift, rounding)
    raise QCompileError(f"unknown requant mode {mode!r}; known modes: {', '.join(MODES)}")


# Integers below this magnitude, and their halves, are exact in float64.
FLOAT64_SAFE = float(2 ** 52)


def requantize_float64(acc: Tensor, mode: str, rounding: str, multiplier: Tensor, shift: Tensor,
                       float_multiplier: Tensor, factor: Tensor | None = None,
                       acc_bound: float | None = None, inplace: bool = False) -> Tensor | None:
    """`requantize` computed in float64 when that is provably exact, else None.

    `acc` holds integers (float64). For "fixed_point" and "shift", `acc * M * 2**-shift` is exact
    in float64 when `|acc| * M < 2**52` (the product is an integer scaled by a power of two, and
    adding one half for the rounding stays exact); the result equals the int64 computation.
    `factor` may pass `M * 2**-shift` precomputed (float64), `acc_bound` a known bound on |acc|;
    `inplace` lets it overwrite a float64 `acc` (a temporary of the caller) with the result.
    """
    if mode == "float":
        return round_float(acc.to(torch.float32) * float_multiplier.to(torch.float32), rounding)
    m = multiplier if mode == "fixed_point" else torch.ones_like(multiplier)
    if acc.numel() == 0:
        return acc.to(torch.float64)
    if acc_bound is None:
        lo, hi = aminmax_all(acc)
        acc_bound = max(-float(lo), float(hi))
    if acc_bound * float(m.max()) >= FLOAT64_SAFE:
        return None
    if factor is None:
        factor = torch.ldexp(m.to(torch.float64), -shift.to(torch.float64))
    x = acc.mul_(factor) if inplace and acc.dtype == torch.float64 else acc.to(torch.float64) * factor
    if rounding == "half_away_from_zero" and acc_bound * float(m.max()) < _AWAY_SAFE and int(shift.min()) >= 0:
        # x = n * 2**-s with |n| < 2**50 and s >= 0, so ulp(x) <= 2**(-2-s) / 2. Multiplying by
        # 1 + 2**-52 moves x away from zero by one or two ulps: at most 2**(-2-s), less than the
        # 2**-s by which any x that is not a tie (a multiple of 1/2 lying on x's grid) stands from
        # the nearest tie, while a tie moves off it, outwards. Rounding to nearest-even then
        # rounds ties away from zero and everything else as before: two fast in-place passes
        # instead of a sign, an add and a truncation.
        return x.mul_(_AWAY).round_()
    return round_float_(x, rounding)


_AWAY = 1.0 + 2.0 ** -52
_AWAY_SAFE = float(2 ** 50)


def requant_constants(real: Tensor, mode: str, multiplier_bits: int | None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(multiplier int64, shift int64, float_multiplier float32) for rescale factors `real`."""
    real = torch.as_tensor(real, dtype=torch.float64)
    if mode == "fixed_point":
        m, s = fixed_point_multiplier(real, multiplier_bits or 32)
    elif mode == "shift":
        s = power_of_two_shift(real)
        m = torch.ones_like(s)
    elif mode == "float":
        m, s = torch.zeros_like(real, dtype=torch.int64), torch.zeros_like(real, dtype=torch.int64)
    else:
        raise QCompileError(f"unknown requant mode {mode!r}; known modes: {', '.join(MODES)}")
    return m, s, real.to(torch.float32)


def is_exact(real: Tensor, multiplier: Tensor, shift: Tensor, mode: str) -> bool:
    """Whether the hardware's multiplier equals the real rescale factor exactly."""
    if mode == "float":
        return bool((real.to(torch.float64) == real.to(torch.float32).to(torch.float64)).all())
    value = torch.ldexp(multiplier.to(torch.float64), -shift)
    return bool((value == real.to(torch.float64)).all())


def max_product_bits(accumulator_bits: int, mode: str, multiplier_bits: int | None) -> int:
    """Bits of `acc * M`: must stay below 64 for the int64 emulation to be exact."""
    return accumulator_bits + ((multiplier_bits or 32) if mode == "fixed_point" else 1)


# A bias code is kept this fraction inside its integer range, so that storing the raised weight
# scale as float32 (relative rounding 2**-24) can never push the bias over the edge.
_BIAS_MARGIN = 2.0 ** -20


def bias_fit_weight_scale(bias: Tensor, in_scale: float, weight_scale: Tensor, bias_bits: int,
                          pow2: bool = False, weight: Tensor | None = None, in_code_bound: float = 0.0,
                          accumulator_bits: int = 32) -> Tensor:
    """Weight scales (one per output channel) at which every bias fits a `bias_bits` integer.

    The bias joins the accumulator on its grid, as `round(b / (s_in * s_w))`. A channel whose
    weights (nearly) vanish next to its bias, typically a BatchNorm with a tiny gamma folded into
    it, gets a weight scale so small that this code exceeds the bias width. Chip toolchains then
    raise that channel's weight scale until the bias fits and re-quantize its weights, which round
    to almost nothing: they were negligible next to the bias. Channels whose bias fits keep their
    scale. `weight_scale` is per channel (shape [C]) or one per-tensor scale (shape [] or [1]),
    which then rises for all channels at once; `pow2` keeps scales powers of two.

    With `weight` (float, output channels first) and `in_code_bound` (the largest |input code -
    zero point|), a bias that dominates its channel must also leave the products room in the
    `accumulator_bits` accumulator: a bias code just inside int32 plus a negative sum of products
    wraps around on the chip (ONNX Runtime's int32 kernels do), where the emulation would not.
    For such a channel the scale solves |b|/(s_in s) + bound * sum_k(|w_k|/s + 1/2) <= limit;
    channels whose possible products outweigh the bias keep the bias-width rule alone.
    """
    bias = bias.detach().to(torch.float64).reshape(-1)
    scale = weight_scale.detach().to(torch.float64).reshape(-1)
    # Half a step below the largest code, so that rounding cannot reach past it either.
    limit = (2.0 ** (bias_bits - 1) - 1.0) * (1.0 - _BIAS_MARGIN) - 0.5
    need = bias.abs() / (float(in_scale) * limit)
    if weight is not None and in_code_bound > 0:
        w = weight.detach().to(torch.float64).reshape(bias.numel(), -1)
        products = float(in_code_bound) * w.abs().sum(1)            # in units of s_in
        acc_room = (2.0 ** (accumulator_bits - 1) - 1.0) * (1.0 - _BIAS_MARGIN) - 0.5
        acc_room -= float(in_code_bound) * w.shape[1] / 2           # the weights' rounding
        dominated = bias.abs() / float(in_scale) > products
        if acc_room > 0:
            acc_need = (bias.abs() / float(in_scale) + products) / acc_room
            need = torch.where(dominated, torch.maximum(need, acc_need), need)
    if scale.numel() == 1:
        need = need.max().reshape(1)
    if pow2:
        from .formats import pow2_ceil

        # A channel that needs nothing (a zero bias) stays at zero: pow2_ceil(0) would be 1.
        need = torch.where(need > 0, pow2_ceil(need), need)
    return torch.where(need > scale, need, scale).to(weight_scale.dtype).reshape(weight_scale.shape)
