"""Observers: statistics gathered over calibration data, turned into a range and then QParams.

An observer sees tensors (`update`), keeps bounded-memory statistics, and on request produces
a clipping range for a format (`compute_range`) and that format's parameters
(`compute_qparams`). It never rounds anything itself: the format does (see formats.py).

Every observer works per tensor (`axis=None`) or per channel (`axis=k`, statistics kept for
each index along dimension k, which must keep its size across updates). Observers are
deterministic: no randomness at all. The histogram-based ones (percentile, MSE, histogram/KL)
share one running histogram per channel whose range grows by exact merges of neighbouring
bins, so counts are never smeared when a later batch widens the range. Memory is
channels * bins whatever the amount of data; the MSE and KL searches cost
channels * bins * grid fake-quant evaluations once, in `compute_range`, which is why
per-channel observers default to fewer bins (DEFAULT_CHANNEL_BINS) than per-tensor ones.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .errors import CalibrationError
from .formats import (
    FloatFormat, Format, HostFloat, IntFormat, LUTFormat, NF4Format, QParams, as_per_channel, dense_view,
    qparams_from_range,
)


class UnknownObserverError(CalibrationError):
    """An observer name that is not in OBSERVERS."""


class Observer:
    """Base class: input validation, per-channel layout, format checks and QParams."""

    kind: ClassVar[str] = ""

    def __init__(self, axis: int | None = None, label: str = "") -> None:
        self.axis = axis
        # Where the observer sits (node or group name), for error messages.
        self.label = label
        self.num_channels: int | None = None
        self.batches = 0

    # -- public API ------------------------------------------------------------------------

    def update(self, x: Tensor) -> None:
        """Add one batch of observed values. NaN or inf anywhere raises CalibrationError."""
        rows = self._rows(x)
        if rows.shape[0] == 1:
            # A whole-tensor reduction runs on every thread; one row reduced along dim 1 runs on
            # one (18x slower on a 150 MB activation). Exact either way: min and max do not round.
            lo, hi = (t.reshape(1) for t in torch.aminmax(rows))
        else:
            lo, hi = torch.aminmax(rows, dim=1)
        # min/max propagate NaN and expose inf, so this checks every element in one pass.
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise CalibrationError(
                f"{self._where()} received a tensor with NaN or inf values (shape "
                f"{tuple(x.shape)}); check the calibration data and the float model's numerics"
            )
        self._update(rows, lo, hi)
        self.batches += 1

    def compute_range(self, fmt: Format | None = None) -> tuple[Tensor, Tensor]:
        """(min, max) to quantize to: scalars per tensor, vectors of channels per channel."""
        self._require_data()
        lo, hi = self._range(fmt)
        if self.axis is None:
            return lo.reshape(()), hi.reshape(())
        return lo, hi

    def compute_qparams(self, fmt: Format) -> QParams:
        """The format's QParams for the observed statistics."""
        if isinstance(fmt, HostFloat):
            return fmt.qparams_from_range()
        self._check_format(fmt)
        lo, hi = self.compute_range(fmt)
        return qparams_from_range(fmt, lo, hi, axis=self.axis)

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.num_channels = None
        self.batches = 0
        self._reset()

    def __repr__(self) -> str:
        where = f", label={self.label!r}" if self.label else ""
        return f"{type(self).__name__}(axis={self.axis}{where}, batches={self.batches})"

    # -- for subclasses --------------------------------------------------------------------

    def _update(self, rows: Tensor, lo: Tensor, hi: Tensor) -> None:
        raise NotImplementedError

    def _range(self, fmt: Format | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _widen(self, lo: Tensor, hi: Tensor) -> None:
        """Extend the running [min_val, max_val] to cover a batch's [lo, hi]."""
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def _reset(self) -> None:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{type(self).__name__}" + (f" at {self.label!r}" if self.label else "")

    def _rows(self, x: Tensor) -> Tensor:
        """x as float32 [channels, elements]; one row when per tensor."""
        if not isinstance(x, Tensor):
            raise CalibrationError(f"{self._where()} expects a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise CalibrationError(
                f"{self._where()} received an empty tensor of shape {tuple(x.shape)}; every "
                "calibration batch must contain data"
            )
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        if self.axis is None:
            return dense_view(x).reshape(1, -1)
        if not -x.ndim <= self.axis < x.ndim:
            raise CalibrationError(
                f"{self._where()} observes channels along axis {self.axis} but received a "
                f"{x.ndim}-d tensor of shape {tuple(x.shape)}"
            )
        channels = x.shape[self.axis]
        if self.num_channels is not None and channels != self.num_channels:
            raise CalibrationError(
                f"{self._where()} saw {self.num_channels} channels along axis {self.axis} "
                f"before and now {channels} (shape {tuple(x.shape)}); per-channel observers "
                "need a fixed channel count"
            )
        self.num_channels = channels
        return x.movedim(self.axis, 0).reshape(channels, -1).contiguous()

    def _require_data(self) -> None:
        if self.batches == 0:
            raise CalibrationError(
                f"{self._where()} has seen no data; run calibration (update) before asking "
                "for a range"
            )

    def _check_format(self, fmt: Format) -> None:
        if isinstance(fmt, LUTFormat):
            raise ValueError(
                f"{self._where()}: {fmt.name} is a k-means look-up table; fit its codebook on "
                "the weight with formats.fit_codebook instead of observing a range"
            )
        if isinstance(fmt, NF4Format) or fmt.granularity == "per_group":
            raise ValueError(
                f"{self._where()}: {fmt.name} has per-group/block parameters, which observers "
                "(per tensor or per channel) cannot provide; use formats.qparams_from_tensor on "
                "the weight"
            )
        if fmt.granularity == "per_channel" and self.axis is None:
            raise ValueError(
                f"{self._where()}: {fmt.name} is per-channel but the observer is per-tensor; "
                "create the observer with the channel axis"
            )
        if fmt.granularity == "per_tensor" and self.axis is not None:
            raise ValueError(
                f"{self._where()}: {fmt.name} is per-tensor but the observer is per-channel "
                f"(axis {self.axis}); create a per-tensor observer"
            )


class MinMaxObserver(Observer):
    """The running minimum and maximum of everything seen."""

    kind = "minmax"

    def __init__(self, axis: int | None = None, label: str = "") -> None:
        super().__init__(axis, label)
        self._reset()

    def _update(self, rows: Tensor, lo: Tensor, hi: Tensor) -> None:
        self._widen(lo, hi)

    def _range(self, fmt: Format | None) -> tuple[Tensor, Tensor]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val, self.max_val

    def _reset(self) -> None:
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (PyTorch's convention).

    The first batch sets the range; batch t then moves it by `averaging_constant` towards the
    batch's own min/max: m <- m + c * (batch_min - m).
    """

    kind = "moving_average"

    def __init__(
        self, axis: int | None = None, label: str = "", averaging_constant: float = 0.01
    ) -> None:
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant
        super().__init__(axis, label)

    def _update(self, rows: Tensor, lo: Tensor, hi: Tensor) -> None:
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)


# ---------------------------------------------------------------------------------------------
# The running histogram behind the percentile, MSE and histogram/KL observers.

# Bins when none are given. Per channel the search observers cost channels * bins per
# candidate range, so they default to fewer bins (a weight row holds a few thousand values).
DEFAULT_BINS = 2048
DEFAULT_CHANNEL_BINS = 256
# Elements binned at once: bounds the int64 temporaries of per-channel binning to 32 MiB.
_BIN_CHUNK = 2 ** 22
_HISTC_CHUNK = 2 ** 24
# Rows x bins evaluated at once by the range searches.
_SEARCH_CHUNK = 2 ** 20


class RunningHistogram:
    """Per-channel histograms of `bins` equal bins over [lo, lo + bins * width].

    When a batch falls outside the range, the range grows to `width * 2**k` per bin, its start
    moved down by a whole number of old bins: every old bin then lies inside exactly one new
    bin, so growing merges counts exactly instead of re-spreading them. One channel is binned
    by torch.histc, many at once by a vectorised bincount; the two agree except for values
    within float rounding of a bin edge.
    """

    def __init__(self, bins: int) -> None:
        if not isinstance(bins, int) or bins < 8:
            raise ValueError(f"a histogram needs an integer number of bins >= 8, got {bins!r}")
        self.bins = bins
        self.counts: Tensor | None = None      # [C, bins] float64
        self.lo: Tensor | None = None          # [C] float64
        self.width: Tensor | None = None       # [C] float64

    def add(self, rows: Tensor, lo: Tensor, hi: Tensor) -> None:
        """Count `rows` [C, N]; `lo`/`hi` are their per-row min and max."""
        lo64, hi64 = lo.double(), hi.double()
        if self.counts is None:
            span = hi64 - lo64
            # A constant first batch still needs a positive width; later batches grow it.
            span = torch.where(span > 0, span, lo64.abs().clamp_min(1.0) * 2.0 ** -20)
            self.lo, self.width = lo64, span / self.bins
            self.counts = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64)
        else:
            self._grow(lo64, hi64)
        self._accumulate(rows)

    @property
    def hi(self) -> Tensor:
        assert self.lo is not None and self.width is not None
        return self.lo + self.bins * self.width

    def centers(self) -> Tensor:
        assert self.lo is not None and self.width is not None
        steps = torch.arange(self.bins, dtype=torch.float64) + 0.5
        return self.lo[:, None] + steps[None, :] * self.width[:, None]

    def quantile(self, q: float) -> Tensor:
        """The q-quantile of each channel, linear within the bin that holds it."""
        assert self.counts is not None and self.lo is not None and self.width is not None
        cdf = self.counts.cumsum(dim=1)
        rank = q * cdf[:, -1:]
        j = torch.searchsorted(cdf, rank).clamp_max(self.bins - 1)
        before = torch.where(j > 0, cdf.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(rank))
        inside = self.counts.gather(1, j)
        frac = torch.where(inside > 0, (rank - before) / inside.clamp_min(1e-300), torch.zeros_like(rank))
        return (self.lo[:, None] + (j + frac.clamp(0, 1)) * self.width[:, None]).squeeze(1)

    def _grow(self, new_lo: Tensor, new_hi: Tensor) -> None:
        assert self.counts is not None and self.lo is not None and self.width is not None
        top = self.hi
        need = (new_lo < self.lo) | (new_hi > top)
        if not need.any():
            return
        w = self.width
        shift = torch.ceil((self.lo - new_lo) / w).clamp_min(0)
        shift = torch.where(self.lo - shift * w > new_lo, shift + 1, shift)
        start = self.lo - shift * w
        reach = torch.maximum(new_hi, top)
        k = torch.ceil(torch.log2(((reach - start) / (self.bins * w)).clamp_min(1.0)))
        k = torch.where(start + self.bins * w * torch.exp2(k) < reach, k + 1, k)
        shift = torch.where(need, shift, torch.zeros_like(shift))
        k = torch.where(need, k, torch.zeros_like(k))
        old_bins = torch.arange(self.bins, dtype=torch.float64)
        target = torch.floor((old_bins[None, :] + shift[:, None]) / torch.exp2(k)[:, None])
        target = target.clamp(0, self.bins - 1).long()
        self.counts = torch.zeros_like(self.counts).scatter_add_(1, target, self.counts)
        self.lo = torch.where(need, start, self.lo)
        self.width = w * torch.exp2(k)

    def _accumulate(self, rows: Tensor) -> None:
        assert self.counts is not None
        if rows.shape[0] == 1:
            self.counts[0] += self._histc(rows[0])
        else:
            self.counts += self._bincount(rows)

    def _histc(self, row: Tensor) -> Tensor:
        """One channel with torch.histc: a single pass, the fast path for big activations."""
        assert self.lo is not None
        # Edges rounded outwards to float32, so no value of the row falls outside them.
        lo = _float32_towards(self.lo[:1], -math.inf).item()
        hi = _float32_towards(self.hi[:1], math.inf).item()
        added = torch.zeros(self.bins, dtype=torch.float64)
        # histc counts in float32, exact only up to 2**24 per bin: feed it chunks that small.
        for chunk in row.split(_HISTC_CHUNK):
            added += torch.histc(chunk, self.bins, lo, hi).double()
        if added.sum().item() != row.numel():
            # Not expected with outward-rounded edges; recount so that nothing goes missing.
            added = torch.histc(row.clamp(lo, hi).double(), self.bins, lo, hi)
        return added

    def _bincount(self, rows: Tensor) -> Tensor:
        """Many channels at once: bin indices offset per channel, one bincount per chunk."""
        assert self.lo is not None and self.width is not None
        channels, n = rows.shape
        start = self.lo.to(torch.float32)[:, None]
        inv_width = (1.0 / self.width).to(torch.float32)[:, None]
        offsets = (torch.arange(channels) * self.bins)[:, None]
        added = torch.zeros(channels * self.bins, dtype=torch.long)
        step = max(1, _BIN_CHUNK // channels)
        for j in range(0, n, step):
            # Clamping (not dropping) keeps values that float rounding puts a hair outside;
            # after it, truncation to an integer is the floor.
            index = (rows[:, j:j + step] - start).mul_(inv_width).clamp_(0, self.bins - 1).long()
            added += torch.bincount((index + offsets).reshape(-1), minlength=channels * self.bins)
        return added.view(channels, self.bins).double()


def _float32_towards(v: Tensor, direction: float) -> Tensor:
    """v (float64) rounded to a float32 on the side of `direction` (-inf: down, +inf: up)."""
    f = v.to(torch.float32)
    wrong_side = f.double() > v if direction < 0 else f.double() < v
    return torch.where(wrong_side, torch.nextafter(f, torch.full_like(f, direction)), f)


class _HistogramBased(Observer):
    """Shared state of the histogram observers: exact min/max plus a running histogram."""

    def __init__(self, axis: int | None = None, label: str = "", bins: int | None = None) -> None:
        super().__init__(axis, label)
        self.bins = bins if bins is not None else DEFAULT_BINS if axis is None else DEFAULT_CHANNEL_BINS
        self._reset()

    def _update(self, rows: Tensor, lo: Tensor, hi: Tensor) -> None:
        self._widen(lo, hi)
        self.histogram.add(rows, lo, hi)

    def _reset(self) -> None:
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None
        self.histogram = RunningHistogram(self.bins)

    def _needs_format(self, fmt: Format | None) -> IntFormat | FloatFormat | None:
        """The format to search for; None means 'no search' (host float)."""
        if fmt is None:
            raise ValueError(f"{self._where()} searches a range for a format: pass one")
        if isinstance(fmt, HostFloat):
            return None
        self._check_format(fmt)
        assert isinstance(fmt, (IntFormat, FloatFormat))
        return fmt

    def _search(self, fmt: IntFormat | FloatFormat, alphas: Tensor, score: "Score") -> tuple[Tensor, Tensor]:
        """The range alpha * [min, max] with the lowest score, per channel.

        `alphas` is descending, so among equal scores the least clipping wins.
        """
        assert self.min_val is not None and self.max_val is not None
        assert self.histogram.counts is not None
        centers = self.histogram.centers().to(torch.float32)
        counts = self.histogram.counts
        channels, bins = centers.shape
        scores = torch.empty(channels, alphas.numel(), dtype=torch.float64)
        chunk = max(1, _SEARCH_CHUNK // (channels * bins))
        for first in range(0, alphas.numel(), chunk):
            a = alphas[first:first + chunk]
            pc, params = _candidate_params(fmt, self.min_val, self.max_val, a)
            # Row r of every [A*C, bins] tensor is candidate r // C applied to channel r % C.
            value = score(pc, params, centers.repeat(a.numel(), 1), counts.repeat(a.numel(), 1))
            scores[:, first:first + a.numel()] = value.view(a.numel(), channels).T
        best = alphas[scores.argmin(dim=1)]
        return best * self.min_val, best * self.max_val


class PercentileObserver(_HistogramBased):
    """Clips at the (100 - p)-th and p-th percentiles of everything seen (from a histogram)."""

    kind = "percentile"

    def __init__(
        self, axis: int | None = None, label: str = "", percentile: float = 99.99,
        bins: int | None = None,
    ) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        super().__init__(axis, label, bins)

    def _range(self, fmt: Format | None) -> tuple[Tensor, Tensor]:
        assert self.min_val is not None and self.max_val is not None
        q = self.percentile / 100.0
        lo = self.histogram.quantile(1.0 - q).to(torch.float32)
        hi = self.histogram.quantile(q).to(torch.float32)
        # Interpolation inside a bin may step past the data; the true extremes bound it.
        lo = torch.minimum(torch.maximum(lo, self.min_val), self.max_val)
        hi = torch.minimum(torch.maximum(hi, lo), self.max_val)
        return lo, hi


Score = Callable[[Any, QParams, Tensor, Tensor], Tensor]


def _alpha_grid(steps: int, smallest: float) -> Tensor:
    # Descending, so that argmin (first minimum) prefers the least clipping among ties.
    return torch.linspace(1.0, smallest, steps, dtype=torch.float32)


def _candidate_params(
    fmt: IntFormat | FloatFormat, lo: Tensor, hi: Tensor, alphas: Tensor
) -> tuple[IntFormat | FloatFormat, QParams]:
    """Params for every (alpha, channel) pair, as the rows of a per-channel format."""
    pc = as_per_channel(fmt)
    cand_lo = (alphas[:, None] * lo.reshape(1, -1)).reshape(-1)
    cand_hi = (alphas[:, None] * hi.reshape(1, -1)).reshape(-1)
    return pc, pc.qparams_from_range(cand_lo, cand_hi, axis=0)


def _check_search_args(grid: int, smallest_alpha: float) -> None:
    if grid < 2 or not 0.0 < smallest_alpha < 1.0:
        raise ValueError(
            f"need grid >= 2 and 0 < smallest_alpha < 1, got grid={grid}, smallest_alpha={smallest_alpha}"
        )


def _weighted_mse(pc: Any, params: QParams, centers: Tensor, counts: Tensor) -> Tensor:
    err = (pc.fake_quant(centers, params) - centers).square_()
    return (err.double() * counts).sum(dim=1)


def _kl_divergence(pc: Any, params: QParams, centers: Tensor, counts: Tensor) -> Tensor:
    """KL(P || Q) of each row: one candidate range applied to one channel's histogram."""
    rows, bins = centers.shape
    values = pc.fake_quant(centers, params)
    # The representable interval of each row: where +-huge saturates to.
    extremes = pc.fake_quant(torch.tensor([-3e38, 3e38]).repeat(rows, 1), params)
    inside = (centers >= extremes[:, :1]) & (centers <= extremes[:, 1:])
    occupied = counts > 0
    zero = torch.zeros_like(counts)
    hist_in = torch.where(inside, counts, zero)
    below = torch.where(centers < extremes[:, :1], counts, zero).sum(dim=1, keepdim=True)
    above = torch.where(centers > extremes[:, 1:], counts, zero).sum(dim=1, keepdim=True)
    index = torch.arange(bins).expand(rows, bins)
    kept = inside & occupied
    first_in = torch.where(kept, index, bins).amin(dim=1, keepdim=True).clamp_max(bins - 1)
    last_in = torch.where(kept, index, -1).amax(dim=1, keepdim=True).clamp_min(0)
    p = hist_in.scatter_add(1, first_in, below).scatter_add_(1, last_in, above)
    # Quantization cells are runs of bins that round to the same value.
    change = torch.ones_like(values, dtype=torch.long)
    change[:, 1:] = (values[:, 1:] != values[:, :-1]).long()
    cell = change.cumsum(dim=1) - 1
    nonzero = (p > 0).to(torch.float64)
    cell_mass = torch.zeros_like(counts).scatter_add_(1, cell, hist_in)
    cell_nonzero = torch.zeros_like(counts).scatter_add_(1, cell, nonzero)
    q = cell_mass.gather(1, cell) / cell_nonzero.gather(1, cell).clamp_min(1.0) * nonzero
    p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-300)
    q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-300)
    # A bin with data that Q leaves empty (its whole cell was clipped) gets a tiny probability
    # instead of an infinite divergence, as in TensorRT's smoothing.
    q = torch.where((p > 0) & (q <= 0), torch.full_like(q, 1e-10), q)
    return torch.where(p > 0, p * torch.log(p / q), zero).sum(dim=1)


class _ClippingSearch(_HistogramBased):
    """A clipping range alpha * [min, max] chosen from a grid of alphas by a score per candidate
    (lower is better) over the histogram; subclasses set the grid and the score."""

    default_grid: ClassVar[int]
    default_smallest_alpha: ClassVar[float]
    score: ClassVar[Callable[..., Tensor]]

    def __init__(self, axis: int | None = None, label: str = "", bins: int | None = None,
                 grid: int | None = None, smallest_alpha: float | None = None) -> None:
        self.grid = self.default_grid if grid is None else grid
        self.smallest_alpha = self.default_smallest_alpha if smallest_alpha is None else smallest_alpha
        _check_search_args(self.grid, self.smallest_alpha)
        super().__init__(axis, label, bins)

    def _range(self, fmt: Format | None) -> tuple[Tensor, Tensor]:
        assert self.min_val is not None and self.max_val is not None
        search = self._needs_format(fmt)
        if search is None:
            return self.min_val, self.max_val
        return self._search(search, _alpha_grid(self.grid, self.smallest_alpha), type(self).score)


class MSEObserver(_ClippingSearch):
    """The clipping range alpha * [min, max] that minimises the fake-quant MSE for the format.

    The data is summarised by a histogram (bounded memory); its bin centres, weighted by their
    counts, stand in for the data when each alpha of a grid is scored.
    """

    kind = "mse"
    default_grid, default_smallest_alpha = 100, 0.01
    score = staticmethod(_weighted_mse)


class HistogramObserver(_ClippingSearch):
    """Entropy calibration à la TensorRT: the clipping range with the least KL divergence.

    For each candidate range alpha * [min, max], P is the histogram restricted to the range
    with the clipped mass folded into its outermost occupied bins, and Q spreads each
    quantization cell's in-range mass evenly over the cell's occupied bins; the alpha
    minimising KL(P || Q) wins. Cells are found by fake-quantizing the bin centres, so the same
    code serves integer and minifloat formats.
    """

    kind = "histogram"
    default_grid, default_smallest_alpha = 128, 1.0 / 16
    score = staticmethod(_kl_divergence)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "histogram": HistogramObserver,
}
OBSERVER_NAMES: tuple[str, ...] = tuple(OBSERVERS)


class FixedObserver(Observer):
    """A calibrated observer that later data does not change: the one quantizer of a tensor that
    several compiled graphs share (`qcompiler.partition`) is calibrated once, on every value it
    carries, and each graph's compile reads it as it is."""

    def __init__(self, observer: Observer) -> None:
        super().__init__(axis=observer.axis, label=observer.label)
        self.observer = observer
        self.kind = observer.kind
        self.num_channels, self.batches = observer.num_channels, observer.batches

    def update(self, x: Tensor) -> None:
        pass

    def reset(self) -> None:
        pass

    def compute_range(self, fmt: Format | None = None) -> tuple[Tensor, Tensor]:
        return self.observer.compute_range(fmt)

    def compute_qparams(self, fmt: Format) -> QParams:
        return self.observer.compute_qparams(fmt)

    def __repr__(self) -> str:
        return f"FixedObserver({self.observer!r})"


def make_observer(name: str, axis: int | None = None, **kw: Any) -> Observer:
    """A new observer by registry name, e.g. make_observer("percentile", percentile=99.9)."""
    if name not in OBSERVERS:
        raise UnknownObserverError(
            f"unknown observer {name!r}; known observers are {', '.join(sorted(OBSERVERS))}"
        )
    return OBSERVERS[name](axis=axis, **kw)
