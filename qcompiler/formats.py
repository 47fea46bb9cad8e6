"""Number formats: what a quantized tensor's values can be, and how values are rounded to them.

One small frozen dataclass per family. A format knows how to round and clamp (`quantize`),
decode (`dequantize`) and simulate (`fake_quant`, with a straight-through gradient); it knows
nothing about statistics (observers) or graphs (passes). Target specs name formats; the spec
loader builds these objects, so invalid formats (int1, FP8 E9M9) are rejected here.

What calibration decides for a tensor is a `QParams`; `qparams_from_range` turns an observed
range into one, `qparams_from_tensor` computes one straight from a (weight) tensor and
`fit_codebook` clusters a weight for a look-up-table format.

Conventions shared by all formats:

- Arithmetic is float32: inputs are converted, `dequantize` returns float32, `fake_quant`
  returns the input's dtype. Inputs must not be NaN (observers reject non-finite data);
  +-inf saturates to the largest code.
- Integer rounding is round-half-to-even (`torch.round`), the IEEE default and what ONNX
  QuantizeLinear does; minifloats round to nearest with ties to the even code (the IEEE rule).
- `fake_quant(x, p)` has the value of `dequantize(quantize(x, p), p)` exactly, and a
  straight-through gradient: d/dx = 1 where x lies in the representable range (its code was
  not clamped) and 0 where it was clamped (the clipped-STE of PACT/LSQ, so clipped values
  carry no gradient that could never change their output).
- Granularity layouts (`QParams.scale` shape for a tensor `x`):
  per-tensor: one element (shape `()` or `(1,)`), `axis` None;
  per-channel: `(x.shape[axis],)`, broadcast along `axis`;
  per-group: `x` is viewed as `[rows, K]` with `rows = x.shape[0]` and `K` the product of the
  other dimensions in row-major order (linear weights `[out, in]`, conv weights
  `[out, in*kh*kw]`); groups are `group_size` consecutive elements along `K`, the last group may
  be shorter; the scale has shape `(rows, ceil(K / group_size))` and `axis` is 0;
  NF4 blocks: `block_size` consecutive elements of the flattened tensor (last block padded),
  scale shape `(ceil(numel / block_size),)`;
  look-up tables: `codebook` of shape `(2**bits,)` per tensor or `(channels, 2**bits)` per
  channel along `axis`, sorted ascending.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal, Union

import torch
from torch import Tensor

Granularity = Literal["per_tensor", "per_channel", "per_group"]
ScaleKind = Literal["float", "pow2"]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
SCALE_KINDS = ("float", "pow2")

# Floor for scales so an all-zero range (a dead ReLU channel) still gives a usable, finite
# quantizer. A power of two so pow2 formats keep it, small enough to be harmless for real
# weights, large enough that 1/scale stays well inside int32 fixed-point requantization.
SCALE_EPS = 2.0 ** -32


@dataclass(frozen=True, eq=False)
class QParams:
    """What calibration decides for one tensor: scale, zero point, channel axis, codebook.

    See the module docstring for the shape each granularity expects. `zero_point` is None for
    symmetric formats (meaning 0) and an int32 tensor shaped like `scale` otherwise. `codebook`
    is only used by look-up-table formats.
    """

    scale: Tensor
    zero_point: Tensor | None
    axis: int | None
    codebook: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scale, Tensor):
            raise TypeError(f"QParams.scale must be a torch.Tensor, got {type(self.scale).__name__}")
        if self.zero_point is not None and self.zero_point.shape != self.scale.shape:
            raise ValueError(
                f"QParams.zero_point has shape {tuple(self.zero_point.shape)} but scale has "
                f"{tuple(self.scale.shape)}; they must match"
            )


# ---------------------------------------------------------------------------------------------
# Layout helpers: turn (x, params) into broadcastable views, and views back into x's shape.

Restore = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


def _norm_axis(axis: int, ndim: int, who: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{who}: channel axis {axis} is out of range for a {ndim}-d tensor")
    return axis % ndim


def _group_view(x: Tensor, group_size: int, who: str) -> tuple[Tensor, Restore]:
    """`x` as `[rows, n_groups, group_size]` (zero-padded), and the way back to x's shape."""
    if x.ndim < 2:
        raise ValueError(
            f"{who}: per-group quantization needs a tensor of at least 2 dimensions "
            f"([out, in] or [out, in, kh, kw]), got shape {tuple(x.shape)}; use per_tensor or "
            "per_channel for vectors"
        )
    rows = x.shape[0]
    flat = x.reshape(rows, -1)
    k = flat.shape[1]
    n_groups = -(-k // group_size)
    pad = n_groups * group_size - k
    if pad:
        # Zero padding is harmless: every range computed from it must include 0 anyway.
        flat = torch.nn.functional.pad(flat, (0, pad))
    shape = x.shape

    def restore(t: Tensor) -> Tensor:
        return t.reshape(rows, n_groups * group_size)[:, :k].reshape(shape)

    return flat.reshape(rows, n_groups, group_size), restore


def _uniform_layout(
    fmt: "IntFormat | FloatFormat", x: Tensor, params: QParams
) -> tuple[Tensor, Tensor, Tensor | None, Restore]:
    """Views of x, scale and zero point that broadcast against each other for `fmt`'s granularity."""
    scale = params.scale.to(device=x.device, dtype=torch.float32)
    zp = params.zero_point
    zp = None if zp is None else zp.to(device=x.device, dtype=torch.float32)
    who = fmt.name
    if fmt.granularity == "per_tensor":
        if scale.numel() != 1:
            raise ValueError(
                f"{who} is per-tensor but QParams.scale has shape {tuple(scale.shape)}; "
                "give one scale or use a per_channel/per_group format"
            )
        return x, scale.reshape(()), None if zp is None else zp.reshape(()), _identity
    if fmt.granularity == "per_channel":
        if params.axis is None:
            raise ValueError(f"{who} is per-channel but QParams.axis is None; set the channel axis")
        axis = _norm_axis(params.axis, x.ndim, who)
        if scale.shape != (x.shape[axis],):
            raise ValueError(
                f"{who}: QParams.scale has shape {tuple(scale.shape)} but the tensor has "
                f"{x.shape[axis]} channels along axis {axis}; expected shape ({x.shape[axis]},)"
            )
        view = [1] * x.ndim
        view[axis] = -1
        return x, scale.reshape(view), None if zp is None else zp.reshape(view), _identity
    assert fmt.group_size is not None
    xv, restore = _group_view(x, fmt.group_size, who)
    if scale.shape != xv.shape[:2]:
        raise ValueError(
            f"{who}: QParams.scale has shape {tuple(scale.shape)} but a tensor of shape "
            f"{tuple(x.shape)} has {tuple(xv.shape[:2])} (rows, groups) for group size "
            f"{fmt.group_size}"
        )
    return xv, scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1), restore


def _straight_through(x: Tensor, value: Tensor, in_range: Tensor) -> Tensor:
    """`value` in the forward pass; gradient 1 where `in_range`, 0 elsewhere."""
    value = value.to(x.dtype)
    if not x.requires_grad:
        return value
    # where() rather than a product so that clamped +-inf inputs give gradient 0, not NaN.
    return value.detach() + torch.where(in_range, x - x.detach(), torch.zeros_like(x))


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _range_tensors(
    fmt_name: str, min_val: Tensor | float, max_val: Tensor | float
) -> tuple[Tensor, Tensor]:
    lo = torch.as_tensor(min_val, dtype=torch.float32)
    hi = torch.as_tensor(max_val, dtype=torch.float32)
    if lo.shape != hi.shape:
        raise ValueError(
            f"{fmt_name}: min_val has shape {tuple(lo.shape)} but max_val has {tuple(hi.shape)}"
        )
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(f"{fmt_name}: the observed range must be finite, got [{lo}, {hi}]")
    if (lo > hi).any():
        raise ValueError(f"{fmt_name}: min_val exceeds max_val somewhere ({lo} > {hi})")
    return lo, hi


def _check_range_granularity(
    fmt: "IntFormat | FloatFormat", lo: Tensor, axis: int | None
) -> int | None:
    """Validate that the range's shape fits the format's granularity; return the QParams axis."""
    if fmt.granularity == "per_tensor":
        if axis is not None or lo.numel() != 1:
            raise ValueError(
                f"{fmt.name} is per-tensor: give scalar min/max and no axis "
                f"(got shape {tuple(lo.shape)}, axis {axis})"
            )
        return None
    if fmt.granularity == "per_channel":
        if axis is None or lo.ndim != 1:
            raise ValueError(
                f"{fmt.name} is per-channel: give min/max vectors of shape (channels,) and the "
                f"channel axis (got shape {tuple(lo.shape)}, axis {axis})"
            )
        return axis
    if lo.ndim != 2 or axis not in (None, 0):
        raise ValueError(
            f"{fmt.name} is per-group: give min/max of shape (rows, groups) and axis 0 or None "
            f"(got shape {tuple(lo.shape)}, axis {axis})"
        )
    return 0


def pow2_ceil(scale: Tensor) -> Tensor:
    """The smallest power of two >= scale, elementwise (exact: frexp, no log rounding)."""
    mantissa, exponent = torch.frexp(scale)
    # frexp gives mantissa in [0.5, 1): an exact power of two has mantissa 0.5 and stays itself.
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(scale), exponent)


class _ScaleGrid:
    """quantize / dequantize / fake_quant of a format whose codes sit on a scale grid (per tensor,
    channel or group, `_uniform_layout`); the format gives `_encode` and `_decode`.

    quantize: the codes (int32 for integer formats, uint8 bit patterns for minifloats), shaped
    like x; dequantize: their values; fake_quant: both at once, with a straight-through gradient
    inside the representable range.
    """

    granularity: Granularity
    group_size: int | None

    def _check_granularity(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if (self.granularity == "per_group") != (self.group_size is not None):
            raise ValueError("group_size is required with granularity 'per_group' and only then")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    def _check_params(self, params: QParams) -> None:
        pass

    def _as_codes(self, q: Tensor) -> Tensor:
        return q

    def quantize(self, x: Tensor, params: QParams) -> Tensor:
        self._check_params(params)
        xv, s, zp, restore = _uniform_layout(self, x, params)
        q, _ = self._encode(xv, s, zp)
        return restore(self._as_codes(q))

    def dequantize(self, codes: Tensor, params: QParams) -> Tensor:
        qv, s, zp, restore = _uniform_layout(self, codes, params)
        return restore(self._decode(qv, s, zp))

    def fake_quant(self, x: Tensor, params: QParams) -> Tensor:
        self._check_params(params)
        xv, s, zp, restore = _uniform_layout(self, x, params)
        if not x.requires_grad:
            fast = self._fake_values(xv, s, zp)
            if fast is not None:
                return restore(fast).to(x.dtype)
        q, in_range = self._encode(xv, s, zp)
        return _straight_through(x, restore(self._decode(q, s, zp)), restore(in_range))

    def _fake_values(self, xv: Tensor, s: Tensor, zp: Tensor | None) -> Tensor | None:
        """decode(encode(xv)) without a gradient, where the format can do it in fewer passes (the
        same operations in the same order, so the same values); None: use encode and decode."""
        return None


# ---------------------------------------------------------------------------------------------
# Integer formats.


@dataclass(frozen=True)
class IntFormat(_ScaleGrid):
    """Uniform integer quantization: x ≈ scale * (q - zero_point), q in [qmin, qmax].

    Symmetric formats have no zero point (it is 0); for unsigned formats that means the range
    [0, scale * qmax], the natural choice after a ReLU.
    """

    bits: int
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = "per_tensor"
    group_size: int | None = None
    scale_kind: ScaleKind = "float"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 16:
            raise ValueError(f"integer formats have 2 to 16 bits, got {self.bits!r}")
        self._check_granularity()
        if self.scale_kind not in SCALE_KINDS:
            raise ValueError(f"scale_kind must be one of {SCALE_KINDS}, got {self.scale_kind!r}")

    @property
    def family(self) -> str:
        return "int"

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)
        return 0

    @property
    def qmax(self) -> int:
        # Narrow range drops the most negative signed code so that the range is odd-symmetric.
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def name(self) -> str:
        base = f"{'int' if self.signed else 'uint'}{self.bits}"
        tags = []
        if not self.symmetric:
            tags.append("asym")
        if self.narrow_range:
            tags.append("narrow")
        if self.scale_kind == "pow2":
            tags.append("pow2")
        if self.granularity == "per_channel":
            tags.append("pc")
        elif self.granularity == "per_group":
            tags.append(f"g{self.group_size}")
        return "_".join([base] + tags)

    # -- numerics --------------------------------------------------------------------------

    def _check_params(self, params: QParams) -> None:
        if self.symmetric and params.zero_point is not None and bool((params.zero_point != 0).any()):
            raise ValueError(f"{self.name} is symmetric but QParams has a non-zero zero point")

    def _encode(self, xv: Tensor, s: Tensor, zp: Tensor | None) -> tuple[Tensor, Tensor]:
        q = torch.round(_as_float(xv) / s)
        if zp is not None:
            q = q + zp
        in_range = (q >= self.qmin) & (q <= self.qmax)
        return q.clamp(self.qmin, self.qmax), in_range

    @staticmethod
    def _decode(q: Tensor, s: Tensor, zp: Tensor | None) -> Tensor:
        q = q.to(torch.float32)
        if zp is not None:
            q = q - zp
        return q * s

    def _fake_values(self, xv: Tensor, s: Tensor, zp: Tensor | None) -> Tensor | None:
        # _encode then _decode, in place on the one new tensor (an activation of 150 MB was
        # read and written ten times, and the range mask was built for no gradient).
        q = torch.div(_as_float(xv), s).round_()
        if zp is not None:
            q.add_(zp)
        q.clamp_(self.qmin, self.qmax)
        if zp is not None:
            q.sub_(zp)
        return q.mul_(s)

    def _as_codes(self, q: Tensor) -> Tensor:
        return q.to(torch.int32)

    def qparams_from_range(
        self, min_val: Tensor | float, max_val: Tensor | float, axis: int | None = None
    ) -> QParams:
        lo, hi = _range_tensors(self.name, min_val, max_val)
        axis = _check_range_granularity(self, lo, axis)
        if self.symmetric:
            # Unsigned symmetric codes cannot hold negatives at all, so their resolution goes
            # to the positive side only instead of being sized by a |min| that clips anyway.
            absmax = torch.maximum(lo.abs(), hi.abs()) if self.signed else hi.clamp_min(0)
            scale = self._finish_scale(absmax / self.qmax)
            return QParams(scale=scale, zero_point=None, axis=axis)
        # The range must contain 0 so that zero (padding, ReLU output) is exactly representable.
        lo = lo.clamp_max(0)
        hi = hi.clamp_min(0)
        scale = self._finish_scale((hi - lo) / (self.qmax - self.qmin))
        zero_point = (self.qmin - torch.round(lo / scale)).clamp(self.qmin, self.qmax)
        return QParams(scale=scale, zero_point=zero_point.to(torch.int32), axis=axis)

    def _finish_scale(self, scale: Tensor) -> Tensor:
        scale = scale.clamp_min(SCALE_EPS)
        # Rounded up, not to nearest, so the observed range never clips.
        return pow2_ceil(scale) if self.scale_kind == "pow2" else scale


# ---------------------------------------------------------------------------------------------
# Minifloats.

# Minifloat layouts: (exponent bits, mantissa bits, bias, largest finite value).
MINIFLOATS = {
    "e4m3": (4, 3, 7, 448.0),       # OCP FP8 E4M3 (fn: no infinities, one NaN pattern)
    "e5m2": (5, 2, 15, 57344.0),    # OCP FP8 E5M2 (IEEE-like)
    "e2m1": (2, 1, 1, 6.0),         # OCP FP4 E2M1
}


@lru_cache(maxsize=None)
def minifloat_tables(kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """(finite non-negative values by code, midpoints between them, decode table of all codes).

    Non-negative codes 0..M of a minifloat are ordered like their values, so the code of a
    magnitude is its index in the first table. The decode table maps every bit pattern (sign
    included) to its value: NaN for NaN patterns, +-inf for E5M2's infinities. Cached: do not
    modify the returned tensors.
    """
    e_bits, m_bits, bias, max_finite = MINIFLOATS[kind]
    n_magnitudes = 2 ** (e_bits + m_bits)
    magnitude = []
    for code in range(n_magnitudes):
        exponent, mantissa = code >> m_bits, code & (2 ** m_bits - 1)
        if exponent == 0:                      # subnormal: no implicit leading one
            value = mantissa / 2 ** m_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + mantissa / 2 ** m_bits) * 2.0 ** (exponent - bias)
        magnitude.append(value)
    finite = [v for v in magnitude if v <= max_finite]
    assert finite == magnitude[: len(finite)] and finite[-1] == max_finite
    decode = [v if v <= max_finite else math.nan for v in magnitude]
    if kind == "e5m2":
        decode[0x7C] = math.inf                # IEEE-style infinity; 0x7D-0x7F stay NaN
    full = decode + [-v for v in decode]
    values = torch.tensor(finite, dtype=torch.float32)
    # Midpoints of neighbouring minifloats need one more mantissa bit: exact in float32.
    midpoints = (values[1:] + values[:-1]) / 2
    return values, midpoints, torch.tensor(full, dtype=torch.float32)


@dataclass(frozen=True)
class FloatFormat(_ScaleGrid):
    """A scaled minifloat (FP8 E4M3/E5M2, FP4 E2M1): x ≈ scale * decode(code).

    Saturating: anything beyond the largest finite value becomes it (never inf or NaN). Codes
    are the format's bit patterns (sign in the top bit) as uint8.
    """

    kind: str
    granularity: Granularity = "per_tensor"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in MINIFLOATS:
            raise ValueError(f"minifloat kind must be one of {tuple(MINIFLOATS)}, got {self.kind!r}")
        self._check_granularity()

    @property
    def family(self) -> str:
        return "fp"

    @property
    def bits(self) -> int:
        e, m, _, _ = MINIFLOATS[self.kind]
        return 1 + e + m

    @property
    def max_value(self) -> float:
        return MINIFLOATS[self.kind][3]

    @property
    def name(self) -> str:
        return f"fp{self.bits}_{self.kind}" + ("_pc" if self.granularity == "per_channel" else "")

    # -- numerics --------------------------------------------------------------------------

    def _encode(self, xv: Tensor, s: Tensor, zp: Tensor | None) -> tuple[Tensor, Tensor]:
        values, midpoints, _ = minifloat_tables(self.kind)
        values, midpoints = values.to(xv.device), midpoints.to(xv.device)
        y = _as_float(xv) / s
        magnitude = y.abs()
        in_range = magnitude <= self.max_value
        magnitude = magnitude.clamp_max(self.max_value)
        # searchsorted counts the midpoints strictly below: a tie lands on the lower code,
        # and is moved up when the lower code is odd (ties to even).
        idx = torch.searchsorted(midpoints, magnitude)
        last = midpoints.numel() - 1
        tie = magnitude == midpoints[idx.clamp_max(last)]
        idx = idx + (tie & (idx <= last) & (idx % 2 == 1)).to(idx.dtype)
        code = idx | (torch.signbit(y).to(idx.dtype) << (self.bits - 1))
        if self.bits == 8:
            code = torch.where(torch.isnan(y), torch.full_like(code, 0x7F), code)
        return code.to(torch.uint8), in_range

    def _decode(self, codes: Tensor, s: Tensor, zp: Tensor | None) -> Tensor:
        _, _, table = minifloat_tables(self.kind)
        return table.to(codes.device)[codes.long()] * s


    def qparams_from_range(
        self, min_val: Tensor | float, max_val: Tensor | float, axis: int | None = None
    ) -> QParams:
        lo, hi = _range_tensors(self.name, min_val, max_val)
        axis = _check_range_granularity(self, lo, axis)
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = (absmax / self.max_value).clamp_min(SCALE_EPS)
        return QParams(scale=scale, zero_point=None, axis=axis)


# ---------------------------------------------------------------------------------------------
# NormalFloat 4.

# QLoRA's NF4 levels (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) at
# linspace(offset, 0.5, 9)[:-1] for the 8 positive levels and linspace(offset, 0.5, 8)[:-1]
# (negated) for the 7 negative ones, offset = (1 - 1/32 + 1 - 1/30) / 2, plus an exact zero,
# all divided by the largest. Asymmetric by design: one more positive level than negative.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524030303955,
    0.44070982251167297, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _nf4_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return levels, (levels[1:] + levels[:-1]) / 2


@dataclass(frozen=True)
class NF4Format:
    """4-bit NormalFloat with block-wise absmax scaling (QLoRA's 16 levels)."""

    block_size: int = 64

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @property
    def family(self) -> str:
        return "nf4"

    @property
    def bits(self) -> int:
        return 4

    @property
    def granularity(self) -> str:
        return "per_group"

    @property
    def name(self) -> str:
        return f"nf4_b{self.block_size}"

    # -- numerics --------------------------------------------------------------------------

    def _blocks(self, x: Tensor) -> tuple[Tensor, Restore]:
        n = x.numel()
        n_blocks = max(1, -(-n // self.block_size))
        flat = x.reshape(-1)
        pad = n_blocks * self.block_size - n
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        shape = x.shape

        def restore(t: Tensor) -> Tensor:
            return t.reshape(-1)[:n].reshape(shape)

        return flat.reshape(n_blocks, self.block_size), restore

    def _layout(self, x: Tensor, params: QParams) -> tuple[Tensor, Tensor, Restore]:
        xv, restore = self._blocks(x)
        scale = params.scale.to(device=x.device, dtype=torch.float32)
        if scale.numel() != xv.shape[0]:
            raise ValueError(
                f"{self.name}: a tensor of {x.numel()} elements has {xv.shape[0]} blocks of "
                f"{self.block_size} but QParams.scale has {scale.numel()} entries; compute the "
                "params with qparams_from_tensor(fmt, x)"
            )
        return xv, scale.reshape(-1, 1), restore

    def _encode(self, xv: Tensor, s: Tensor) -> Tensor:
        _, midpoints = _nf4_tables(xv.device)
        # Ties between two levels go to the lower one (searchsorted counts midpoints below).
        return torch.searchsorted(midpoints, (_as_float(xv) / s).clamp(-1.0, 1.0)).to(torch.uint8)

    def quantize(self, x: Tensor, params: QParams) -> Tensor:
        """Level indices 0..15 (uint8), shaped like x."""
        xv, s, restore = self._layout(x, params)
        return restore(self._encode(xv, s))

    def dequantize(self, codes: Tensor, params: QParams) -> Tensor:
        cv, s, restore = self._layout(codes, params)
        levels, _ = _nf4_tables(codes.device)
        return restore(levels[cv.long()] * s)

    def fake_quant(self, x: Tensor, params: QParams) -> Tensor:
        xv, s, restore = self._layout(x, params)
        levels, _ = _nf4_tables(x.device)
        y = _as_float(xv) / s
        value = levels[self._encode(xv, s).long()] * s
        return _straight_through(x, restore(value), restore(y.abs() <= 1.0))

    def qparams_from_range(
        self, min_val: Tensor | float, max_val: Tensor | float, axis: int | None = None
    ) -> QParams:
        """Per-block ranges (vectors with one entry per block) to per-block absmax scales."""
        if axis is not None:
            raise ValueError(f"{self.name} uses blocks of the flattened tensor; axis must be None")
        lo, hi = _range_tensors(self.name, min_val, max_val)
        scale = torch.maximum(lo.abs(), hi.abs()).reshape(-1).clamp_min(SCALE_EPS)
        return QParams(scale=scale, zero_point=None, axis=None)


# ---------------------------------------------------------------------------------------------
# Look-up tables (weight clustering).


@dataclass(frozen=True)
class LUTFormat:
    """Weight clustering: each value is an index into a k-means codebook of 2**bits entries."""

    bits: int
    granularity: Granularity = "per_tensor"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"look-up tables have 2**bits entries with bits 1 to 8, got {self.bits!r}")
        if self.granularity not in ("per_tensor", "per_channel"):
            raise ValueError(f"look-up tables are per_tensor or per_channel, got {self.granularity!r}")

    @property
    def family(self) -> str:
        return "lut"

    @property
    def name(self) -> str:
        return f"lut{self.bits}" + ("_pc" if self.granularity == "per_channel" else "")

    # -- numerics --------------------------------------------------------------------------

    def _rows(self, x: Tensor, axis: int | None) -> tuple[Tensor, Restore]:
        """x as [channels, elements] (one row per tensor when per-tensor) and the way back."""
        if self.granularity == "per_tensor":
            shape = x.shape
            return x.reshape(1, -1), lambda t: t.reshape(shape)
        if axis is None:
            raise ValueError(f"{self.name} is per-channel: give the channel axis")
        axis = _norm_axis(axis, x.ndim, self.name)
        moved = x.movedim(axis, 0)
        moved_shape = moved.shape
        return moved.reshape(moved_shape[0], -1), lambda t: t.reshape(moved_shape).movedim(0, axis)

    def _layout(self, x: Tensor, params: QParams) -> tuple[Tensor, Tensor, Restore]:
        if params.codebook is None:
            raise ValueError(f"{self.name} needs QParams.codebook; compute it with fit_codebook")
        codebook = params.codebook.to(device=x.device, dtype=torch.float32)
        if self.granularity == "per_tensor" and params.axis is not None:
            raise ValueError(f"{self.name} is per-tensor but QParams.axis is {params.axis}")
        xv, restore = self._rows(x, params.axis)
        codebook = codebook.reshape(-1, codebook.shape[-1])
        if codebook.shape[0] != xv.shape[0]:
            raise ValueError(
                f"{self.name}: the codebook has {codebook.shape[0]} rows but the tensor has "
                f"{xv.shape[0]} channels"
            )
        if codebook.shape[1] > 2 ** self.bits:
            raise ValueError(
                f"{self.name}: a codebook of {codebook.shape[1]} entries does not fit {self.bits} bits"
            )
        if (codebook[:, 1:] < codebook[:, :-1]).any():
            raise ValueError(f"{self.name}: codebook entries must be sorted ascending per row")
        return xv, codebook, restore

    @staticmethod
    def _encode(xv: Tensor, codebook: Tensor) -> Tensor:
        midpoints = ((codebook[:, 1:] + codebook[:, :-1]) / 2).contiguous()
        # Ties between two entries go to the lower index.
        return torch.searchsorted(midpoints, _as_float(xv).contiguous())

    def quantize(self, x: Tensor, params: QParams) -> Tensor:
        """Codebook indices (uint8), shaped like x."""
        xv, codebook, restore = self._layout(x, params)
        return restore(self._encode(xv, codebook).to(torch.uint8))

    def dequantize(self, codes: Tensor, params: QParams) -> Tensor:
        cv, codebook, restore = self._layout(codes, params)
        return restore(torch.gather(codebook, 1, cv.long()))

    def fake_quant(self, x: Tensor, params: QParams) -> Tensor:
        xv, codebook, restore = self._layout(x, params)
        value = torch.gather(codebook, 1, self._encode(xv, codebook))
        xf = _as_float(xv)
        in_range = (xf >= codebook[:, :1]) & (xf <= codebook[:, -1:])
        return _straight_through(x, restore(value), restore(in_range))

    def qparams_from_range(
        self, min_val: Tensor | float, max_val: Tensor | float, axis: int | None = None
    ) -> QParams:
        raise ValueError(
            f"{self.name} is a k-means look-up table: a range does not determine it; compute its "
            "codebook from the weight with fit_codebook(fmt, weight)"
        )

    def fit_codebook(self, weight: Tensor, axis: int | None = None, iters: int = 30) -> QParams:
        """A k-means codebook of 2**bits entries per tensor or per channel (axis, default 0).

        Deterministic 1-D k-means: centres start at the quantiles (i + 0.5) / k of the data,
        then Lloyd iterations until nothing moves (at most `iters`). An empty cluster is
        re-seeded at the data point farthest from its centre, so k distinct values in the
        data give k distinct entries. Entries are sorted ascending.
        """
        if self.granularity == "per_tensor" and axis is not None:
            raise ValueError(f"{self.name} is per-tensor: fit_codebook takes no axis")
        if self.granularity == "per_channel" and axis is None:
            axis = 0
        if weight.numel() == 0:
            raise ValueError(f"{self.name}: cannot fit a codebook to an empty tensor")
        rows, _ = self._rows(weight.detach(), axis)
        if not torch.isfinite(rows).all():
            raise ValueError(f"{self.name}: the weight contains NaN or inf; cannot fit a codebook")
        codebook = _kmeans_1d(rows.to(torch.float64), 2 ** self.bits, iters).to(torch.float32)
        if self.granularity == "per_tensor":
            return QParams(scale=torch.ones(()), zero_point=None, axis=None, codebook=codebook[0])
        return QParams(
            scale=torch.ones(codebook.shape[0]), zero_point=None, axis=axis, codebook=codebook
        )


def _kmeans_1d(rows: Tensor, k: int, iters: int) -> Tensor:
    """Lloyd's k-means on each row of `rows` [C, N] (float64); returns sorted centres [C, k]."""
    data = rows.sort(dim=1).values
    c, n = data.shape
    # Prefix sums make every cluster's sum two lookups: with sorted data and sorted centres,
    # clusters are contiguous runs, found by a binary search of the midpoints.
    prefix = torch.nn.functional.pad(data.cumsum(dim=1), (1, 0))
    positions = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp_max(n - 1)
    centres = data[:, positions]
    ends_last = torch.full((c, 1), n, dtype=torch.long)
    for _ in range(iters):
        midpoints = ((centres[:, 1:] + centres[:, :-1]) / 2).contiguous()
        # Cluster i holds data in (mid[i-1], mid[i]]: ties go to the lower centre, as in encoding.
        ends = torch.cat([torch.searchsorted(data, midpoints, right=True), ends_last], dim=1)
        starts = torch.nn.functional.pad(ends[:, :-1], (1, 0))
        counts = ends - starts
        sums = prefix.gather(1, ends) - prefix.gather(1, starts)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        updated = _reseed_empty(data, updated, starts, ends, counts)
        updated = updated.sort(dim=1).values
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres


def _reseed_empty(
    data: Tensor, centres: Tensor, starts: Tensor, ends: Tensor, counts: Tensor
) -> Tensor:
    """Move empty clusters' centres onto the data points farthest from their own centres."""
    empty = counts == 0
    if not empty.any():
        return centres
    # The farthest point of a contiguous cluster is one of its two ends.
    nonempty = ~empty
    first = data.gather(1, starts.clamp_max(data.shape[1] - 1))
    last = data.gather(1, (ends - 1).clamp_min(0))
    candidates = torch.cat([first, last], dim=1)
    errors = torch.cat([(first - centres).abs(), (last - centres).abs()], dim=1)
    errors = torch.where(torch.cat([nonempty, nonempty], dim=1), errors, torch.full_like(errors, -1.0))
    order = errors.argsort(dim=1, descending=True, stable=True)
    ranked_values = candidates.gather(1, order)
    ranked_errors = errors.gather(1, order)
    # The j-th empty cluster (left to right) takes the j-th worst-served point.
    rank = (empty.cumsum(dim=1) - 1).clamp_min(0)
    take_value = ranked_values.gather(1, rank)
    take_ok = ranked_errors.gather(1, rank) > 0
    return torch.where(empty & take_ok, take_value, centres)


# ---------------------------------------------------------------------------------------------
# Host float.


@dataclass(frozen=True)
class HostFloat:
    """Not quantized: the tensor stays float32 (activations of weight-only targets, host fallback)."""

    @property
    def family(self) -> str:
        return "float"

    @property
    def bits(self) -> int:
        return 32

    @property
    def granularity(self) -> str:
        return "per_tensor"

    @property
    def name(self) -> str:
        return "float32"

    def quantize(self, x: Tensor, params: QParams | None = None) -> Tensor:
        return x

    def dequantize(self, codes: Tensor, params: QParams | None = None) -> Tensor:
        return codes

    def fake_quant(self, x: Tensor, params: QParams | None = None) -> Tensor:
        return x

    def qparams_from_range(
        self, min_val: Tensor | float = 0.0, max_val: Tensor | float = 0.0, axis: int | None = None
    ) -> QParams:
        return QParams(scale=torch.ones(()), zero_point=None, axis=None)


Format = Union[IntFormat, FloatFormat, NF4Format, LUTFormat, HostFloat]


# ---------------------------------------------------------------------------------------------
# Format-generic entry points.


def qparams_from_range(
    fmt: Format, min_val: Tensor | float, max_val: Tensor | float, axis: int | None = None
) -> QParams:
    """Observed min/max (scalars per tensor, vectors per channel) to the format's QParams.

    Symmetric int: scale = max(|min|, |max|) / qmax. Asymmetric int: the range is widened to
    include 0, scale = (max - min) / (qmax - qmin), integer zero point. pow2: scale rounded up
    to a power of two. Minifloats: scale = absmax / largest finite value. Scales are at least
    SCALE_EPS. Look-up tables raise ValueError (use fit_codebook).
    """
    return fmt.qparams_from_range(min_val, max_val, axis)


def fit_codebook(fmt: LUTFormat, weight: Tensor, axis: int | None = None, iters: int = 30) -> QParams:
    """k-means codebook QParams for a look-up-table format (see LUTFormat.fit_codebook)."""
    if not isinstance(fmt, LUTFormat):
        raise ValueError(f"fit_codebook needs a look-up-table format, got {fmt.name}")
    return fmt.fit_codebook(weight, axis=axis, iters=iters)


def _reduce_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    lo, hi = torch.aminmax(x, dim=-1)
    return lo, hi


def dense_view(x: Tensor) -> Tensor:
    """`x`'s elements as a contiguous view, in memory order: a channels-last tensor permuted to
    NHWC, anything else unchanged. Only for what does not depend on the order (min, max, sums,
    histograms): a reduction over a channels-last tensor runs up to 16x slower than over the
    same memory viewed densely."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return x


def aminmax_all(x: Tensor) -> tuple[Tensor, Tensor]:
    """(min, max) over every element of `x`, whatever its memory layout (no gradient: bounds
    decide code paths, never values that are differentiated)."""
    return torch.aminmax(dense_view(x.detach()))


def qparams_from_tensor(fmt: Format, x: Tensor, axis: int | None = None) -> QParams:
    """QParams computed from a tensor's own min/max at the format's granularity (weights).

    Per-channel formats use `axis` (default 0, the output channel of weights); per-group and
    NF4 formats use their fixed layouts; look-up tables fit a codebook.
    """
    x = _as_float(x.detach())
    if x.numel() == 0:
        raise ValueError(f"{fmt.name}: cannot compute quantization parameters of an empty tensor")
    if isinstance(fmt, HostFloat):
        return fmt.qparams_from_range()
    if isinstance(fmt, LUTFormat):
        return fmt.fit_codebook(x, axis=axis)
    if not torch.isfinite(x).all():
        raise ValueError(f"{fmt.name}: the tensor contains NaN or inf")
    if isinstance(fmt, NF4Format):
        blocks, _ = fmt._blocks(x)
        lo, hi = _reduce_rows(blocks)
        return fmt.qparams_from_range(lo, hi)
    if fmt.granularity == "per_tensor":
        if axis is not None:
            raise ValueError(f"{fmt.name} is per-tensor: qparams_from_tensor takes no axis")
        lo, hi = aminmax_all(x)
        return fmt.qparams_from_range(lo, hi)
    if fmt.granularity == "per_channel":
        axis = _norm_axis(0 if axis is None else axis, x.ndim, fmt.name)
        lo, hi = _reduce_rows(x.movedim(axis, 0).reshape(x.shape[axis], -1))
        return fmt.qparams_from_range(lo, hi, axis=axis)
    assert fmt.group_size is not None
    groups, _ = _group_view(x, fmt.group_size, fmt.name)
    lo, hi = _reduce_rows(groups)
    return fmt.qparams_from_range(lo, hi, axis=0)


def as_per_channel(fmt: IntFormat | FloatFormat) -> IntFormat | FloatFormat:
    """The same format with per-channel granularity (for evaluating many ranges at once)."""
    return dataclasses.replace(fmt, granularity="per_channel", group_size=None)
