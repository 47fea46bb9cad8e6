"""Tests of qcompiler.observers: statistics against torch's own reductions and hand computations,
range searches against the plain min-max range on heavy-tailed data, per-channel observers
against per-tensor observers run channel by channel, and the error paths."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.errors import CalibrationError, QCompileError
from qcompiler.formats import FloatFormat, as_per_channel, HostFloat, IntFormat, LUTFormat, NF4Format, qparams_from_range
from qcompiler.observers import (
    OBSERVERS, HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver,
    PercentileObserver, RunningHistogram, make_observer,
)

FAST = settings(max_examples=25, deadline=None)


def heavy_tailed(n: int, seed: int) -> torch.Tensor:
    """Student-t with 2 degrees of freedom: a few huge outliers around a narrow bulk."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen)
    chi2 = torch.randn(n, 2, generator=gen).square().sum(dim=1)
    return z / (chi2 / 2).sqrt()


def fq_mse(fmt, x: torch.Tensor, lo, hi) -> float:
    params = qparams_from_range(fmt, lo, hi)
    return float((fmt.fake_quant(x, params) - x).square().mean())


@FAST
@given(
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=5),
    scales=st.lists(st.floats(0.01, 100), min_size=5, max_size=5),
    seed=st.integers(0, 2 ** 16),
)
def test_minmax_is_the_true_min_and_max(sizes, scales, seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, generator=gen) * s + s for n, s in zip(sizes, scales)]
    obs = MinMaxObserver()
    for b in batches:
        obs.update(b)
    lo, hi = obs.compute_range()
    everything = torch.cat(batches)
    assert lo.shape == () and float(lo) == float(everything.min()) and float(hi) == float(everything.max())


def test_moving_average_hand_computed():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs.update(torch.tensor([0.0, 4.0]))
    obs.update(torch.tensor([-2.0, 8.0]))
    obs.update(torch.tensor([1.0, 2.0]))
    lo, hi = obs.compute_range()
    # min: 0 -> 0 + .5 (-2 - 0) = -1 -> -1 + .5 (1 + 1) = 0 ; max: 4 -> 6 -> 6 + .5 (2 - 6) = 4
    assert float(lo) == 0.0 and float(hi) == 4.0
    assert MovingAverageMinMaxObserver().averaging_constant == 0.01


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_matches_torch_quantile_within_resolution(percentile):
    # Later batches widen the range, so the histogram has to grow (and merge) on the way.
    batches = [heavy_tailed(20_000, seed) * (1 + seed) for seed in range(4)]
    obs = PercentileObserver(percentile=percentile)
    for b in batches:
        obs.update(b)
    everything = torch.cat(batches).double()
    lo, hi = obs.compute_range()
    width = float(obs.histogram.width[0])
    ref_hi = float(torch.quantile(everything, percentile / 100))
    ref_lo = float(torch.quantile(everything, 1 - percentile / 100))
    assert abs(float(hi) - ref_hi) <= 2 * width
    assert abs(float(lo) - ref_lo) <= 2 * width
    assert float(hi) < float(everything.max())


def test_percentile_100_is_min_max():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    obs = PercentileObserver(percentile=100.0)
    obs.update(x)
    lo, hi = obs.compute_range()
    assert float(hi) == float(x.max()) and float(lo) == float(x.min())


@FAST
@given(
    spreads=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=6),
    offsets=st.lists(st.floats(-100, 100), min_size=6, max_size=6),
    constant_first=st.booleans(),
)
def test_running_histogram_grows_by_exact_merges(spreads, offsets, constant_first):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, 500, generator=gen) * s + o for s, o in zip(spreads, offsets)]
    if constant_first:
        batches.insert(0, torch.full((1, 10), offsets[-1]))
    hist = RunningHistogram(64)
    for b in batches:
        hist.add(b, b.amin(dim=1), b.amax(dim=1))
    everything = torch.cat(batches, dim=1)
    assert hist.counts.shape == (1, 64)                       # memory stays bounded
    assert float(hist.counts.sum()) == everything.numel()     # nothing lost in merges
    assert float(hist.lo[0]) <= float(everything.min()) and float(hist.hi[0]) >= float(everything.max())
    # Exact merging: the counts equal a histogram of all data with the final edges (up to values
    # sitting on an edge, which float rounding may put on either side).
    edges_ref = torch.histc(everything.double(), 64, float(hist.lo[0]), float(hist.hi[0]))
    assert float((hist.counts[0] - edges_ref).abs().sum()) <= 2 * len(batches)


def laplace(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64).clamp_min(1e-12)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * -torch.log(u)).float()


@pytest.mark.parametrize("fmt", [
    IntFormat(8), IntFormat(4), IntFormat(3, signed=False, symmetric=False), IntFormat(4, scale_kind="pow2"),
    FloatFormat("e2m1"),
])
@pytest.mark.parametrize("source", [laplace, heavy_tailed])
def test_mse_observer_beats_min_max_on_heavy_tailed_data(fmt, source):
    batches = [source(10_000, seed) for seed in range(3)]
    if fmt.family == "int" and not fmt.signed:
        batches = [b.abs() for b in batches]
    mse_obs, mm_obs = MSEObserver(), MinMaxObserver()
    for b in batches:
        mse_obs.update(b)
        mm_obs.update(b)
    x = torch.cat(batches)
    lo, hi = mse_obs.compute_range(fmt)
    mm_lo, mm_hi = mm_obs.compute_range()
    searched, plain = fq_mse(fmt, x, lo, hi), fq_mse(fmt, x, mm_lo, mm_hi)
    assert searched <= plain
    # A brute-force search over the raw data (not the histogram) finds nothing much better.
    alphas = torch.linspace(1, 0.01, 100)
    rows = as_per_channel(fmt)
    params = rows.qparams_from_range(alphas * mm_lo, alphas * mm_hi, axis=0)
    data = x.expand(alphas.numel(), -1)
    brute = float((rows.fake_quant(data, params) - data).square().mean(dim=1).min())
    assert searched <= 1.05 * brute
    if fmt.bits <= 4 and source is laplace:
        # Narrow formats on exponential tails: clipping is worth a lot, the search must find it.
        assert float(hi) < 0.8 * float(mm_hi) and searched < 0.7 * plain


def test_mse_observer_keeps_full_range_for_uniform_data():
    x = torch.linspace(-1, 1, 10_001)
    obs = MSEObserver()
    obs.update(x)
    lo, hi = obs.compute_range(IntFormat(8))
    assert float(hi) >= 0.97 and float(lo) <= -0.97


@pytest.mark.parametrize("fmt", [IntFormat(8), IntFormat(8, signed=False, symmetric=False), IntFormat(6)])
def test_histogram_kl_clips_outliers_of_heavy_tailed_data(fmt):
    batches = [heavy_tailed(20_000, seed) for seed in range(3)]
    if not fmt.signed:
        batches = [b.abs() for b in batches]
    obs = HistogramObserver()
    for b in batches:
        obs.update(b)
    x = torch.cat(batches)
    lo, hi = obs.compute_range(fmt)
    assert float(hi) < 0.5 * float(x.max())
    assert float(lo) > 0.5 * float(x.min()) or float(x.min()) >= 0
    # The clipped range still holds the bulk of the data.
    inside = ((x >= lo) & (x <= hi)).float().mean()
    assert float(inside) > 0.98


def test_histogram_kl_works_for_minifloats():
    x = torch.cat([heavy_tailed(20_000, seed) for seed in range(2)])
    obs = HistogramObserver()
    obs.update(x)
    lo, hi = obs.compute_range(FloatFormat("e4m3"))
    assert float(x.min()) <= float(lo) < 0 < float(hi) <= float(x.max())
    params = obs.compute_qparams(FloatFormat("e4m3"))
    assert float(params.scale) == pytest.approx(max(-float(lo), float(hi)) / 448)


def test_histogram_kl_keeps_most_of_the_range_for_uniform_data():
    x = torch.rand(50_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    obs = HistogramObserver()
    obs.update(x)
    lo, hi = obs.compute_range(IntFormat(8))
    assert float(hi) > 0.9 and float(lo) < -0.9


OBSERVER_KWARGS = {
    "minmax": {},
    "moving_average": {"averaging_constant": 0.3},
    # Per-channel observers default to fewer bins than per-tensor ones: fix them to compare.
    "percentile": {"percentile": 99.0, "bins": 512},
    "mse": {"grid": 40, "bins": 512},
    "histogram": {"grid": 32, "bins": 512},
}


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("axis", [1, -1])
def test_per_channel_equals_per_tensor_on_each_channel(name, axis):
    gen = torch.Generator().manual_seed(7)
    channel_scales = torch.tensor([0.01, 1.0, 30.0])
    shape_scale = [1, 3, 1] if axis == 1 else [1, 1, 3]
    batches = [
        (torch.randn(4, 3, 50, generator=gen) if axis == 1 else torch.randn(4, 50, 3, generator=gen))
        * channel_scales.reshape(shape_scale) * (1 + i) + i
        for i in range(3)
    ]
    pc = make_observer(name, axis=axis, **OBSERVER_KWARGS[name])
    fmt_pc = IntFormat(4, symmetric=False, granularity="per_channel")
    fmt_pt = IntFormat(4, symmetric=False)
    for b in batches:
        pc.update(b)
    lo, hi = pc.compute_range(fmt_pc)
    params = pc.compute_qparams(fmt_pc)
    assert lo.shape == (3,) and params.axis == axis and params.scale.shape == (3,)
    for c in range(3):
        single = make_observer(name, **OBSERVER_KWARGS[name])
        for b in batches:
            single.update(b.select(axis, c))
        ref_lo, ref_hi = single.compute_range(fmt_pt)
        assert torch.allclose(lo[c], ref_lo, rtol=1e-6, atol=0) and torch.allclose(hi[c], ref_hi, rtol=1e-6, atol=0)
        ref_params = single.compute_qparams(fmt_pt)
        assert torch.allclose(params.scale[c], ref_params.scale, rtol=1e-6)
        assert int(params.zero_point[c]) == int(ref_params.zero_point)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_raise_calibration_error_naming_the_observer(name, bad):
    obs = make_observer(name, label="layer1.relu")
    obs.update(torch.randn(10))
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(CalibrationError, match=f"{type(obs).__name__} at 'layer1.relu'"):
        obs.update(x)
    per_channel = make_observer(name, axis=0)
    with pytest.raises(CalibrationError, match=type(obs).__name__):
        per_channel.update(x.reshape(2, 5))


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_error_paths_and_reset(name):
    obs = make_observer(name, axis=0)
    with pytest.raises(CalibrationError, match="no data"):
        obs.compute_qparams(IntFormat(8, granularity="per_channel"))
    with pytest.raises(CalibrationError, match="empty"):
        obs.update(torch.empty(0, 3))
    obs.update(torch.randn(3, 4))
    with pytest.raises(CalibrationError, match="channels"):
        obs.update(torch.randn(5, 4))
    with pytest.raises(ValueError, match="per-tensor"):
        obs.compute_qparams(IntFormat(8))
    with pytest.raises(ValueError, match="fit_codebook"):
        obs.compute_qparams(LUTFormat(4))
    with pytest.raises(ValueError, match="qparams_from_tensor"):
        obs.compute_qparams(NF4Format())
    with pytest.raises(ValueError, match="qparams_from_tensor"):
        obs.compute_qparams(IntFormat(4, granularity="per_group", group_size=2))
    assert float(obs.compute_qparams(HostFloat()).scale) == 1.0
    # After reset the observer is as good as new: a different channel count is fine.
    obs.reset()
    obs.update(torch.arange(10.0).reshape(5, 2))
    lo, hi = obs.compute_range(IntFormat(8, granularity="per_channel"))
    assert lo.shape == (5,) and float(hi[4]) <= 9.0
    per_tensor = make_observer(name)
    per_tensor.update(torch.randn(4))
    with pytest.raises(ValueError, match="per-channel"):
        per_tensor.compute_qparams(IntFormat(8, granularity="per_channel"))


def test_make_observer_rejects_unknown_names_listing_known_ones():
    with pytest.raises(QCompileError) as info:
        make_observer("kl_magic")
    message = str(info.value)
    assert "kl_magic" in message and all(name in message for name in OBSERVERS)
    assert set(OBSERVERS) == {"minmax", "moving_average", "percentile", "mse", "histogram"}
    obs = make_observer("percentile", axis=1, percentile=99.9)
    assert isinstance(obs, PercentileObserver) and obs.axis == 1 and obs.percentile == 99.9


@pytest.mark.parametrize("name", ["mse", "histogram", "percentile"])
def test_histogram_observers_are_deterministic_and_bounded(name):
    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        obs = make_observer(name)
        for seed in range(6):
            obs.update(heavy_tailed(5000, seed) * (seed + 1))
        assert obs.histogram.counts.shape == (1, obs.bins)
        lo, hi = obs.compute_range(IntFormat(8))
        return lo, hi, obs.histogram.counts

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert float(first[2].sum()) == 6 * 5000


def test_compute_qparams_goes_through_the_format():
    obs = MinMaxObserver()
    obs.update(torch.tensor([-1.0, 3.0]))
    params = obs.compute_qparams(IntFormat(8, signed=False, symmetric=False))
    assert int(params.zero_point) == 64 and float(params.scale) == pytest.approx(4 / 255)
    fp = obs.compute_qparams(FloatFormat("e4m3"))
    assert float(fp.scale) == pytest.approx(3 / 448)
