"""Tests of qcompiler.formats: rounding, clamping, layouts and gradients of every number format.

References are independent of the implementation: brute-force enumeration of every
representable value, torch's own float8 casts, hand-worked examples, the NF4 construction from
normal quantiles, and loops over channels/groups.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.formats import (
    NF4_LEVELS, SCALE_EPS, FloatFormat, HostFloat, IntFormat, LUTFormat, NF4Format, QParams,
    aminmax_all, dense_view, fit_codebook, minifloat_tables, qparams_from_range, qparams_from_tensor,
)

FAST = settings(max_examples=40, deadline=None)


def per_tensor(scale: float, zero_point: int | None = None) -> QParams:
    zp = None if zero_point is None else torch.tensor(zero_point, dtype=torch.int32)
    return QParams(scale=torch.tensor(scale), zero_point=zp, axis=None)


def nearest_distance(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Distance from each x to the closest grid value, by brute force (float64)."""
    return (x.double()[..., None] - grid.double()).abs().amin(dim=-1)


int_formats = st.builds(
    IntFormat,
    bits=st.integers(2, 8),
    signed=st.booleans(),
    symmetric=st.booleans(),
    narrow_range=st.booleans(),
    scale_kind=st.sampled_from(["float", "pow2"]),
)


# ---------------------------------------------------------------------------------------------
# Integer formats


@FAST
@given(
    fmt=int_formats,
    lo=st.floats(-50, 0),
    hi=st.floats(0, 50),
    seed=st.integers(0, 2 ** 16),
)
def test_int_codes_in_range_and_nearest_representable(fmt, lo, hi, seed):
    params = qparams_from_range(fmt, lo, hi)
    gen = torch.Generator().manual_seed(seed)
    # Values well beyond the range too, to exercise clamping.
    x = (torch.rand(300, generator=gen) * 1.5 - 0.25) * (hi - lo) + lo
    codes = fmt.quantize(x, params)
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= fmt.qmin and int(codes.max()) <= fmt.qmax
    zp = 0 if params.zero_point is None else int(params.zero_point)
    grid = (torch.arange(fmt.qmin, fmt.qmax + 1, dtype=torch.float32) - zp) * params.scale
    deq = fmt.dequantize(codes, params)
    # The result is a grid value, and no grid value is closer than it (up to float32 rounding).
    assert torch.all(nearest_distance(deq, grid) == 0)
    err = (x.double() - deq.double()).abs()
    assert torch.all(err <= nearest_distance(x, grid) + 1e-5 * float(params.scale) + 1e-6)
    # fake_quant has exactly the value of dequantize(quantize(x)).
    assert torch.equal(fmt.fake_quant(x, params), deq)


@FAST
@given(bits=st.integers(9, 16), signed=st.booleans(), symmetric=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_wide_int_formats_err_at_most_half_a_step(bits, signed, symmetric, seed):
    fmt = IntFormat(bits, signed=signed, symmetric=symmetric)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * 5
    params = qparams_from_tensor(fmt, x)
    codes = fmt.quantize(x, params)
    assert int(codes.min()) >= fmt.qmin and int(codes.max()) <= fmt.qmax
    covered = x if (signed or not symmetric) else x[x >= 0]
    err = (fmt.fake_quant(covered, params) - covered).abs()
    # float32 carries x / scale (up to 2**16 for 16 bits) to about 2**-8 of a step.
    assert float(err.max()) <= float(params.scale) * (0.5 + 1e-2)


def test_int_round_half_to_even_hand_worked():
    fmt = IntFormat(8)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 126.5, 127.5, 300.0, -300.0])
    codes = fmt.quantize(x, per_tensor(1.0))
    assert codes.tolist() == [0, 2, 2, 0, -2, -2, 3, 126, 127, 127, -128]


def test_int_symmetric_hand_worked():
    fmt = IntFormat(8)
    params = qparams_from_range(fmt, -2.0, 1.0)
    assert params.zero_point is None
    assert float(params.scale) == pytest.approx(2.0 / 127)
    codes = fmt.quantize(torch.tensor([-2.0, 1.0, 0.0, 0.01]), params)
    assert codes.tolist() == [-127, 64, 0, 1]      # 1.0 / (2/127) = 63.5 -> 64 (even)


def test_int_asymmetric_hand_worked():
    fmt = IntFormat(8, signed=False, symmetric=False)
    params = qparams_from_range(fmt, -1.0, 3.0)
    # scale = 4 / 255; zero point = 0 - round(-1 / scale) = round(63.75) = 64
    assert float(params.scale) == pytest.approx(4.0 / 255)
    assert params.zero_point is not None and params.zero_point.dtype == torch.int32
    assert int(params.zero_point) == 64
    codes = fmt.quantize(torch.tensor([-1.0, 0.0, 3.0, 5.0]), params)
    assert codes.tolist() == [0, 64, 255, 255]


def test_int_narrow_range_and_unsigned_limits():
    assert (IntFormat(8, narrow_range=True).qmin, IntFormat(8, narrow_range=True).qmax) == (-127, 127)
    assert (IntFormat(4, signed=False).qmin, IntFormat(4, signed=False).qmax) == (0, 15)
    fmt = IntFormat(4, signed=False)
    params = qparams_from_range(fmt, -3.0, 1.5)        # unsigned symmetric: range [0, 1.5]
    assert float(params.scale) == pytest.approx(0.1)
    assert fmt.quantize(torch.tensor([-3.0, 1.5]), params).tolist() == [0, 15]


@FAST
@given(
    bits=st.integers(2, 8),
    narrow=st.booleans(),
    absmax=st.floats(0.01, 100),
    seed=st.integers(0, 2 ** 16),
)
def test_symmetric_formats_are_odd_symmetric(bits, narrow, absmax, seed):
    fmt = IntFormat(bits, narrow_range=narrow)
    params = qparams_from_range(fmt, -absmax, absmax)
    x = (torch.rand(500, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * absmax * 1.3
    q_pos = fmt.quantize(x, params)
    q_neg = fmt.quantize(-x, params)
    # Without narrow range the most negative code has no positive twin: compare where unclamped.
    ok = (q_pos.abs() <= fmt.qmax) & (q_neg.abs() <= fmt.qmax)
    if narrow:
        assert bool(ok.all())
    assert torch.equal(q_neg[ok], -q_pos[ok])


@FAST
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    lo=st.floats(-100, 100),
    width=st.floats(0, 100),
    pow2=st.booleans(),
)
def test_asymmetric_zero_is_exactly_representable(bits, signed, lo, width, pow2):
    fmt = IntFormat(bits, signed=signed, symmetric=False, scale_kind="pow2" if pow2 else "float")
    params = qparams_from_range(fmt, lo, lo + width)
    zero = torch.zeros(3)
    assert torch.equal(fmt.fake_quant(zero, params), zero)
    assert fmt.qmin <= int(params.zero_point) <= fmt.qmax


@FAST
@given(
    fmt=int_formats.filter(lambda f: f.scale_kind == "pow2"),
    lo=st.floats(-1e3, 0),
    hi=st.floats(0, 1e3),
)
def test_pow2_scales_are_powers_of_two_and_never_clip(fmt, lo, hi):
    params = qparams_from_range(fmt, lo, hi)
    scale = float(params.scale)
    mantissa, _ = math.frexp(scale)
    assert mantissa == 0.5
    plain = qparams_from_range(IntFormat(fmt.bits, fmt.signed, fmt.symmetric, fmt.narrow_range), lo, hi)
    assert scale >= float(plain.scale)
    assert scale < 2 * float(plain.scale) or float(plain.scale) <= SCALE_EPS
    # The ends of the observed range are representable to within half a step (no clipping).
    ends = torch.tensor([lo if (fmt.signed or not fmt.symmetric) else 0.0, hi])
    err = (fmt.fake_quant(ends, params) - ends).abs()
    assert torch.all(err <= scale / 2 + 1e-6 * scale)


def test_zero_range_gets_a_tiny_positive_scale():
    for fmt in (IntFormat(8), IntFormat(8, symmetric=False), FloatFormat("e4m3"), IntFormat(4, scale_kind="pow2")):
        params = qparams_from_range(fmt, 0.0, 0.0)
        assert float(params.scale) == SCALE_EPS
        out = fmt.fake_quant(torch.tensor([0.0, 1.0, -1.0]), params)
        assert torch.isfinite(out).all() and float(out[0]) == 0.0


@FAST
@given(
    fmt=st.sampled_from([
        IntFormat(8, granularity="per_channel"),
        IntFormat(4, symmetric=False, signed=False, granularity="per_channel"),
        IntFormat(3, scale_kind="pow2", granularity="per_channel"),
        FloatFormat("e4m3", granularity="per_channel"),
        FloatFormat("e2m1", granularity="per_channel"),
    ]),
    axis=st.integers(0, 2),
    seed=st.integers(0, 2 ** 16),
)
def test_per_channel_equals_loop_over_channels(fmt, axis, seed):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed)) * torch.tensor([0.1, 1, 10, 3])[None, :, None]
    params = qparams_from_tensor(fmt, x, axis=axis)
    assert params.axis == axis and params.scale.shape == (x.shape[axis],)
    codes = fmt.quantize(x, params)
    out = fmt.fake_quant(x, params)
    tensor_fmt = type(fmt)(**{**fmt.__dict__, "granularity": "per_tensor"})
    for c in range(x.shape[axis]):
        xc = x.select(axis, c)
        zp = None if params.zero_point is None else params.zero_point[c]
        pc = QParams(scale=params.scale[c], zero_point=zp, axis=None)
        # Each channel's params are the per-tensor params of that channel alone.
        ref_params = qparams_from_tensor(tensor_fmt, xc)
        assert torch.equal(ref_params.scale, pc.scale)
        assert torch.equal(codes.select(axis, c), tensor_fmt.quantize(xc, pc))
        assert torch.equal(out.select(axis, c), tensor_fmt.fake_quant(xc, pc))


@FAST
@given(
    fmt=st.sampled_from([
        IntFormat(4, granularity="per_group", group_size=8),
        IntFormat(4, symmetric=False, granularity="per_group", group_size=5),
        FloatFormat("e2m1", granularity="per_group", group_size=16),
    ]),
    shape=st.sampled_from([(6, 16), (4, 3, 3, 3), (2, 5, 1, 7)]),
    seed=st.integers(0, 2 ** 16),
)
def test_per_group_equals_loop_over_groups(fmt, shape, seed):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    params = qparams_from_tensor(fmt, w)
    rows, k = shape[0], w[0].numel()
    n_groups = -(-k // fmt.group_size)
    assert params.scale.shape == (rows, n_groups) and params.axis == 0
    out = fmt.fake_quant(w, params).reshape(rows, k)
    codes = fmt.quantize(w, params).reshape(rows, k)
    flat = w.reshape(rows, k)
    tensor_fmt = type(fmt)(**{**fmt.__dict__, "granularity": "per_tensor", "group_size": None})
    for r in range(rows):
        for g in range(n_groups):
            sl = slice(g * fmt.group_size, min(k, (g + 1) * fmt.group_size))
            zp = None if params.zero_point is None else params.zero_point[r, g]
            pg = QParams(scale=params.scale[r, g], zero_point=zp, axis=None)
            # The group's params are those of its own elements (plus 0, which pads the last group).
            ref = qparams_from_range(tensor_fmt, min(float(flat[r, sl].min()), 0.0), max(float(flat[r, sl].max()), 0.0))
            assert torch.allclose(ref.scale, pg.scale)
            assert torch.equal(codes[r, sl], tensor_fmt.quantize(flat[r, sl], pg))
            assert torch.equal(out[r, sl], tensor_fmt.fake_quant(flat[r, sl], pg))


def test_granularity_mismatches_raise_value_error():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="per-tensor"):
        IntFormat(8).quantize(x, QParams(torch.ones(4), None, 0))
    with pytest.raises(ValueError, match="axis"):
        IntFormat(8, granularity="per_channel").quantize(x, QParams(torch.ones(4), None, None))
    with pytest.raises(ValueError, match="channels"):
        IntFormat(8, granularity="per_channel").quantize(x, QParams(torch.ones(5), None, 0))
    with pytest.raises(ValueError, match="2 dimensions"):
        IntFormat(8, granularity="per_group", group_size=2).quantize(torch.randn(6), QParams(torch.ones(3), None, 0))
    with pytest.raises(ValueError, match="per-channel"):
        qparams_from_range(IntFormat(8, granularity="per_channel"), 0.0, 1.0)
    with pytest.raises(ValueError, match="fit_codebook"):
        qparams_from_range(LUTFormat(4), -1.0, 1.0)
    with pytest.raises(ValueError, match="exceeds"):
        qparams_from_range(IntFormat(8), 1.0, -1.0)
    with pytest.raises(ValueError, match="symmetric"):
        IntFormat(8).quantize(x, per_tensor(1.0, zero_point=3))


# ---------------------------------------------------------------------------------------------
# Minifloats


def _fp8_probe_values(dtype: torch.dtype, max_value: float) -> torch.Tensor:
    """Every representable value, every midpoint (a tie), one float32 ulp either side of each
    midpoint, a dense grid across the range and the subnormal range, both signs."""
    all_codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = all_codes[torch.isfinite(all_codes)]
    values = finite[finite >= 0].unique()
    mids = (values[1:] + values[:-1]) / 2
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    smallest = float(values[1])
    dense = torch.linspace(0, max_value, 100_001)
    tiny = torch.linspace(0, 4 * smallest, 1001)
    probe = torch.cat([values, mids, up, down, dense, tiny])
    probe = probe[probe <= max_value]
    return torch.cat([probe, -probe])


@pytest.mark.parametrize("kind,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_matches_torch_casts_within_range(kind, dtype):
    fmt = FloatFormat(kind)
    x = _fp8_probe_values(dtype, fmt.max_value)
    params = per_tensor(1.0)
    codes = fmt.quantize(x, params)
    reference = x.to(dtype)
    assert torch.equal(codes, reference.view(torch.uint8))
    assert torch.equal(fmt.dequantize(codes, params), reference.float())
    # With a scale: torch's cast of x / scale, multiplied back.
    scaled = per_tensor(0.37)
    assert torch.equal(fmt.quantize(x * 0.37, scaled), (x * 0.37 / 0.37).to(dtype).view(torch.uint8))


@pytest.mark.parametrize("kind,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_decode_table_matches_torch(kind, dtype):
    _, _, table = minifloat_tables(kind)
    reference = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    same = (table == reference) | (torch.isnan(table) & torch.isnan(reference))
    assert bool(same.all())


@pytest.mark.parametrize("kind,max_code", [("e4m3", 0x7E), ("e5m2", 0x7B), ("e2m1", 0x7)])
def test_minifloats_saturate(kind, max_code):
    fmt = FloatFormat(kind)
    sign = 1 << (fmt.bits - 1)
    x = torch.tensor([fmt.max_value * 1.01, fmt.max_value * 1000, math.inf, -fmt.max_value * 2, -math.inf])
    codes = fmt.quantize(x, per_tensor(1.0))
    assert codes.tolist() == [max_code, max_code, max_code, max_code | sign, max_code | sign]
    out = fmt.fake_quant(x, per_tensor(1.0))
    assert out.tolist() == [fmt.max_value] * 3 + [-fmt.max_value] * 2


def test_fp4_e2m1_levels_and_ties_to_even():
    fmt = FloatFormat("e2m1")
    values, _, table = minifloat_tables("e2m1")
    assert values.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert table[8:].tolist() == [-0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    # Ties go to the even code: 0.25 -> 0 (code 0), 0.75 -> 1 (code 2), 1.25 -> 1 (code 2),
    # 1.75 -> 2 (code 4), 2.5 -> 2 (code 4), 3.5 -> 4 (code 6), 5 -> 4 (code 6).
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    out = fmt.fake_quant(ties, per_tensor(1.0))
    assert out.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert fmt.fake_quant(-ties, per_tensor(1.0)).tolist() == [-v for v in out.tolist()]


@FAST
@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 16))
def test_fp4_rounds_to_nearest_of_the_eight_magnitudes(scale, seed):
    fmt = FloatFormat("e2m1")
    magnitudes = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    grid = torch.cat([magnitudes, -magnitudes]) * torch.tensor(scale)
    x = (torch.rand(400, generator=torch.Generator().manual_seed(seed)) * 14 - 7) * scale
    params = per_tensor(scale)
    out = fmt.fake_quant(x, params)
    assert torch.all(nearest_distance(out, grid) == 0)
    inside = x.abs() <= 6 * scale
    err = (x - out).abs().double()
    assert torch.all(err[inside] <= nearest_distance(x[inside], grid) + 1e-6 * scale)
    assert torch.all(out[~inside].abs() == 6 * torch.tensor(scale))


def test_minifloat_qparams_map_absmax_to_largest_value():
    for kind in ("e4m3", "e5m2", "e2m1"):
        fmt = FloatFormat(kind)
        params = qparams_from_range(fmt, -3.0, 2.0)
        assert float(params.scale) == pytest.approx(3.0 / fmt.max_value)
        assert float(fmt.fake_quant(torch.tensor([-3.0]), params)) == pytest.approx(-3.0)


# ---------------------------------------------------------------------------------------------
# NF4


def test_nf4_table_is_qlora_normal_float():
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    assert levels.numel() == 16
    assert torch.all(levels[1:] > levels[:-1])
    assert levels[0] == -1 and levels[-1] == 1 and 0.0 in NF4_LEVELS
    assert int((levels < 0).sum()) == 7 and int((levels > 0).sum()) == 8
    # The construction: normal quantiles, 8 positive and 7 negative, normalised to [-1, 1].
    offset = (1 - 1 / 32 + 1 - 1 / 30) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    built = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    assert torch.allclose(built / built.max(), levels, atol=1e-6)


@FAST
@given(block=st.sampled_from([1, 7, 16, 64]), n=st.integers(1, 300), seed=st.integers(0, 2 ** 16))
def test_nf4_is_nearest_level_times_block_absmax(block, n, seed):
    fmt = NF4Format(block)
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    params = qparams_from_tensor(fmt, x)
    n_blocks = -(-n // block)
    assert params.scale.shape == (n_blocks,)
    codes = fmt.quantize(x, params)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    out = fmt.dequantize(codes, params)
    assert torch.equal(fmt.fake_quant(x, params), out)
    levels = torch.tensor(NF4_LEVELS)
    for b in range(n_blocks):
        sl = slice(b * block, min(n, (b + 1) * block))
        absmax = x[sl].abs().max().clamp_min(SCALE_EPS)
        assert float(params.scale[b]) == float(absmax)
        grid = levels * absmax
        assert torch.all(nearest_distance(out[sl], grid) == 0)
        err = (x[sl] - out[sl]).abs().double()
        assert torch.all(err <= nearest_distance(x[sl], grid) + 1e-6 * float(absmax))
    # The largest magnitude of each block is exact (it maps to level +-1).
    peak = x.abs().argmax()
    assert float(out[peak]) == float(x[peak])


def test_nf4_keeps_shape_and_rejects_wrong_block_count():
    fmt = NF4Format(4)
    w = torch.randn(3, 5)
    params = qparams_from_tensor(fmt, w)
    assert fmt.quantize(w, params).shape == w.shape
    with pytest.raises(ValueError, match="blocks"):
        fmt.quantize(torch.randn(40), params)


# ---------------------------------------------------------------------------------------------
# Look-up tables


@FAST
@given(bits=st.integers(1, 4), data=st.data())
def test_kmeans_recovers_exact_clusters(bits, data):
    k = 2 ** bits
    gaps = data.draw(st.lists(st.floats(1.0, 10.0), min_size=k, max_size=k))
    centres = torch.tensor(gaps).cumsum(0) - 20.0
    per_cluster = data.draw(st.integers(5, 40))
    seed = data.draw(st.integers(0, 2 ** 16))
    noise = torch.rand(k, per_cluster, generator=torch.Generator().manual_seed(seed)) * 0.2 - 0.1
    # Each cluster's noise has mean exactly 0, so its mean is exactly its centre.
    noise = noise - noise.mean(dim=1, keepdim=True)
    points = (centres[:, None] + noise).reshape(-1)
    points = points[torch.randperm(points.numel(), generator=torch.Generator().manual_seed(seed))]
    params = fit_codebook(LUTFormat(bits), points)
    assert params.codebook is not None and params.codebook.shape == (k,)
    assert torch.allclose(params.codebook, centres, atol=1e-4)


def test_kmeans_reseeds_empty_clusters_on_skewed_data():
    # Quantile initialisation puts every centre on the zeros; re-seeding must still find 0, 1, 2, 3.
    w = torch.cat([torch.zeros(1000), torch.tensor([1.0, 2.0, 3.0])])
    params = fit_codebook(LUTFormat(2), w)
    assert params.codebook.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert torch.equal(LUTFormat(2).fake_quant(w, params), w)


@FAST
@given(bits=st.integers(1, 5), seed=st.integers(0, 2 ** 16), few=st.booleans())
def test_lut_codebook_size_nearest_entry_and_determinism(bits, seed, few):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 50, generator=gen) ** 3
    if few:
        w = torch.randint(-2, 3, (3, 50), generator=gen).float()   # fewer values than entries
    fmt = LUTFormat(bits)
    params = fit_codebook(fmt, w)
    again = fit_codebook(fmt, w)
    assert torch.equal(params.codebook, again.codebook)
    assert params.codebook.unique().numel() <= 2 ** bits
    assert torch.all(params.codebook[1:] >= params.codebook[:-1])
    codes = fmt.quantize(w, params)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2 ** bits
    out = fmt.dequantize(codes, params)
    assert torch.all(nearest_distance(out, params.codebook) == 0)
    assert torch.all((w - out).abs().double() <= nearest_distance(w, params.codebook) + 1e-6)


def test_lut_per_channel_equals_per_tensor_per_row():
    w = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    fmt = LUTFormat(2, "per_channel")
    params = fit_codebook(fmt, w)
    assert params.axis == 0 and params.codebook.shape == (4, 4)
    out = fmt.fake_quant(w, params)
    for c in range(4):
        ref = fit_codebook(LUTFormat(2), w[c])
        assert torch.allclose(ref.codebook, params.codebook[c])
        assert torch.equal(out[c], LUTFormat(2).fake_quant(w[c], ref))
    # Channels along another axis.
    params1 = fit_codebook(fmt, w, axis=1)
    assert params1.codebook.shape == (3, 4)
    assert torch.equal(fmt.fake_quant(w, params1)[:, 1], LUTFormat(2).fake_quant(w[:, 1], fit_codebook(LUTFormat(2), w[:, 1])))


def test_lut_requires_a_codebook():
    with pytest.raises(ValueError, match="codebook"):
        LUTFormat(2).quantize(torch.randn(4), QParams(torch.ones(()), None, None))


# ---------------------------------------------------------------------------------------------
# Straight-through gradients and the host float format


@pytest.mark.parametrize("fmt,params,x,expected", [
    (IntFormat(8), per_tensor(0.1), [0.3, 12.7, 12.8, -12.8, -12.9, 100.0], [1, 1, 0, 1, 0, 0]),
    (IntFormat(4, signed=False, symmetric=False), per_tensor(0.5, 2), [-1.0, -1.3, 6.5, 6.8, 3.0], [1, 0, 1, 0, 1]),
    (FloatFormat("e4m3"), per_tensor(2.0), [896.0, 897.0, -896.0, -1000.0, 0.001], [1, 0, 1, 0, 1]),
    (FloatFormat("e2m1"), per_tensor(1.0), [6.0, 6.5, -5.0, -7.0], [1, 0, 1, 0]),
    (LUTFormat(1), QParams(torch.ones(()), None, None, torch.tensor([-1.0, 2.0])), [-1.0, -1.5, 0.3, 2.0, 2.5], [1, 0, 1, 1, 0]),
    (NF4Format(4), QParams(torch.tensor([2.0, 1.0]), None, None), [2.0, -1.9, 0.4, 1.0, 0.2, 0.3, -0.1, 0.0], [1] * 8),
])
def test_fake_quant_gradient_is_straight_through(fmt, params, x, expected):
    x = torch.tensor(x, requires_grad=True)
    out = fmt.fake_quant(x, params)
    assert torch.equal(out.detach(), fmt.dequantize(fmt.quantize(x.detach(), params), params))
    out.sum().backward()
    assert x.grad.tolist() == [float(e) for e in expected]


def test_fake_quant_gradient_zero_for_infinite_inputs():
    x = torch.tensor([math.inf, 1.0], requires_grad=True)
    IntFormat(8).fake_quant(x, per_tensor(0.1)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0]


def test_fake_quant_keeps_input_dtype():
    x = torch.randn(10, dtype=torch.float64)
    assert IntFormat(8).fake_quant(x, per_tensor(0.05)).dtype == torch.float64


def test_host_float_is_identity():
    fmt = HostFloat()
    x = torch.randn(5)
    params = qparams_from_range(fmt, -1.0, 1.0)
    assert fmt.quantize(x, params) is x and fmt.dequantize(x, params) is x and fmt.fake_quant(x, params) is x
    assert qparams_from_tensor(fmt, x).scale == 1.0


@pytest.mark.parametrize("fmt", [
    IntFormat(8, symmetric=False),
    IntFormat(8, narrow_range=True, granularity="per_channel"),
    IntFormat(4, signed=False),
    IntFormat(4, granularity="per_group", group_size=8),
    IntFormat(3, symmetric=False, granularity="per_channel", scale_kind="pow2"),
])
def test_fake_quant_without_gradient_gives_the_values_of_the_gradient_path(fmt):
    # The no-gradient path works in place; the gradient path encodes and decodes. Same values,
    # bit for bit, including inputs far outside the range (clamped) and exact ties.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 16, generator=gen) * 3
    axis = 1 if fmt.granularity == "per_channel" else None
    params = qparams_from_tensor(fmt, x * 0.5, axis=axis)   # half the range: many values clamp
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 3.5]) * params.scale.reshape(-1)[0]
    fast = fmt.fake_quant(x, params)
    slow = fmt.fake_quant(x.clone().requires_grad_(True), params).detach()
    assert torch.equal(fast, slow)
    assert fast.dtype == x.dtype and fast.shape == x.shape
    half = x.half()
    assert torch.equal(fmt.fake_quant(half, params),
                       fmt.fake_quant(half.clone().requires_grad_(True), params).detach())


def test_dense_view_keeps_the_elements_and_aminmax_all_is_exact_in_any_layout():
    x = torch.randn(3, 5, 4, 6)
    moved = x.contiguous(memory_format=torch.channels_last)
    dense = dense_view(moved)
    assert dense.is_contiguous() and dense.data_ptr() == moved.data_ptr()   # a view, no copy
    assert torch.equal(dense.reshape(-1).sort().values, x.reshape(-1).sort().values)
    assert dense_view(x) is x and dense_view(x.transpose(2, 3)).shape == (3, 5, 6, 4)
    lo, hi = aminmax_all(moved)
    assert float(lo) == float(x.min()) and float(hi) == float(x.max())
