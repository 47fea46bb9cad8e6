"""The modules quantization puts into graphs, and weight quantization.

`ObserverStub` sits after a tensor during calibration and feeds its group's observer;
`FakeQuantize` replaces it after `convert`, applying the group's frozen format and parameters.
Weights are quantized once, at convert time, straight from the weight tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .formats import FloatFormat, Format, HostFloat, IntFormat, LUTFormat, QParams, qparams_from_tensor


class ObserverStub(nn.Module):
    """Identity that shows every tensor passing through to its group's observer."""

    def __init__(self, group: int, observer: Any):
        super().__init__()
        self.group = group
        self.observer = observer
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled:
            self.observer.update(x.detach())
        return x

    def extra_repr(self) -> str:
        return f"group={self.group}, observer={type(self.observer).__name__}"


@contextlib.contextmanager
def observers_paused(module: nn.Module) -> Iterator[None]:
    """Run `module` meanwhile without its observer stubs recording anything; each stub gets back
    the state it had."""
    stubs = [m for m in module.modules() if isinstance(m, ObserverStub)]
    previous = [s.enabled for s in stubs]
    for s in stubs:
        s.enabled = False
    try:
        yield
    finally:
        for s, enabled in zip(stubs, previous):
            s.enabled = enabled


class FakeQuantize(nn.Module):
    """Rounds and clamps a tensor to its group's format, in float (straight-through gradient)."""

    def __init__(self, group: int, fmt: Format, params: QParams | None):
        super().__init__()
        self.group = group
        self.fmt = fmt
        self.params = params

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.fmt, HostFloat):
            return x
        return self.fmt.fake_quant(x, self.params)

    def extra_repr(self) -> str:
        return f"group={self.group}, format={self.fmt.name}"


def weight_axis(module: nn.Module) -> int:
    """The output-channel axis of a weight: 1 for transposed convs ([in, out/groups, k...]), else 0."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


# Weights of at most this many bits get an MSE clipping search; wider formats lose next to
# nothing to min-max ranges (measured: identical int8 per-channel MSE on conv weights).
SEARCH_MAX_BITS = 6


def _mse_clip(fmt: IntFormat | FloatFormat, w: Tensor, axis: int | None, steps: int = 20) -> QParams:
    """The clipping of a weight's range that minimises the quantization MSE, per channel or tensor.

    Narrow formats lose most to outliers: for int4 the best clip often lies well inside max|w|.
    Candidates shrink the observed range from 100 % to 40 %; each channel keeps its best.
    """
    rows = w.reshape(1, -1) if axis is None else w.movedim(axis, 0).reshape(w.shape[axis], -1)
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    as_range = (lambda t: t.reshape(())) if axis is None else (lambda t: t)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo, hi
    for i in range(steps):
        ratio = 1.0 - 0.6 * i / steps
        p = fmt.qparams_from_range(as_range(lo * ratio), as_range(hi * ratio), axis)
        q = fmt.fake_quant(w, p)
        err = (q - w).pow(2)
        err = err.reshape(1, -1).sum(1) if axis is None else err.movedim(axis, 0).reshape(w.shape[axis], -1).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * ratio, best_lo)
        best_hi = torch.where(better, hi * ratio, best_hi)
    return fmt.qparams_from_range(as_range(best_lo), as_range(best_hi), axis)


def weight_qparams(fmt: Format, w: Tensor, axis: int, search: bool = True) -> QParams | None:
    """Quantization parameters for a weight tensor in `fmt` (None: the weight stays float).

    Uniform per-tensor and per-channel formats search the MSE-optimal clipping when `search`;
    per-group, NF4 and look-up-table formats take their parameters from the tensor directly.
    """
    w = w.detach().float()
    if isinstance(fmt, HostFloat):
        return None
    if isinstance(fmt, (IntFormat, FloatFormat)) and fmt.granularity in ("per_tensor", "per_channel"):
        ax = axis if fmt.granularity == "per_channel" else None
        if search and isinstance(fmt, IntFormat) and fmt.bits <= SEARCH_MAX_BITS:
            return _zero_channels_take_a_live_scale(_mse_clip(fmt, w, ax), w, ax)
        return _zero_channels_take_a_live_scale(qparams_from_tensor(fmt, w, ax), w, ax)
    if isinstance(fmt, LUTFormat):
        return qparams_from_tensor(fmt, w, axis if fmt.granularity == "per_channel" else None)
    return qparams_from_tensor(fmt, w)


def _zero_channels_take_a_live_scale(params: QParams, w: Tensor, axis: int | None) -> QParams:
    """All-zero weights (a channel whose BatchNorm gamma is 0, as zero-init residual branches
    have) are exact at any scale, but their range gives the smallest scale there is (SCALE_EPS).
    On the chip that scale is the channel's accumulator grid `s_in * s_w`: a residual joined on it
    becomes astronomically many codes and the requantization factor underflows to 0, so the
    output loses the residual. Such channels take the largest scale of the tensor's other
    channels (1.0 when every weight is zero): their codes stay 0, their grid a normal one."""
    rows = w.reshape(1, -1) if axis is None else w.movedim(axis, 0).reshape(w.shape[axis], -1)
    dead = rows.abs().amax(dim=1) == 0
    if not bool(dead.any()):
        return params
    scale = params.scale.reshape(-1)            # one per row: per tensor, one row
    live = scale[~dead]
    fill = live.max() if live.numel() else scale.new_ones(())
    return dataclasses.replace(params, scale=torch.where(dead, fill, scale).reshape(params.scale.shape))


def quantize_weight(fmt: Format, w: Tensor, axis: int, search: bool = True) -> tuple[Tensor, QParams | None]:
    """(the weight as the target stores it, decoded to float; its parameters)."""
    params = weight_qparams(fmt, w, axis, search)
    if params is None:
        return w, None
    with torch.no_grad():
        return fmt.fake_quant(w.detach().float(), params).to(w.dtype), params
