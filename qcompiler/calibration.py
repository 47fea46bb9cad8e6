"""Calibration data: what the user gave, as a checked list of batches of graph inputs.

`calibration_batches` turns a DataLoader or any iterable of tensors, tuples or dicts into a list
of tuples of positional inputs, once, refusing empty or non-finite data with an error that names
the batch. `runs_channels_last` decides whether the passes replay image batches channels-last
(convolutions, depthwise ones above all, run several times faster that way on the CPU). The
helpers below cut those batches the ways the passes that replay them need.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Iterator

import torch
from torch import fx
from tqdm.auto import tqdm

from .errors import CalibrationError
from .quantizers import observers_paused

Batch = tuple[Any, ...]  # positional inputs of the graph


def tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    return []


def _as_batch(item: Any, names: list[str], index: int) -> Batch:
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, dict):
        missing = [n for n in names if n not in item]
        if missing:
            raise CalibrationError(
                f"calibration batch {index} is a dict without the model input(s) {missing}; "
                f"its keys are {sorted(item)}"
            )
        return tuple(item[n] for n in names)
    if isinstance(item, (tuple, list)):
        # (inputs..., label) pairs from a labelled DataLoader: the model takes the first n.
        return tuple(item[: len(names)])
    raise CalibrationError(
        f"calibration batch {index} is a {type(item).__name__}; give tensors, tuples of tensors "
        "(extra trailing items such as labels are ignored) or dicts of keyword inputs"
    )


def calibration_batches(data: Iterable[Any] | None, example_inputs: tuple[Any, ...],
                        input_names: list[str]) -> list[Batch]:
    """Materialise and check the calibration data once: not empty, finite, tensors."""
    if data is None:
        warnings.warn(
            "no calib_data given: calibrating on example_inputs alone; quantization ranges from "
            "one batch are rarely representative, pass calib_data=<DataLoader or list of batches>",
            stacklevel=3,
        )
        data = [example_inputs if len(example_inputs) != 1 else example_inputs[0]]
    if isinstance(data, torch.Tensor):
        raise CalibrationError(
            "calib_data is a single tensor; give an iterable of batches, e.g. "
            "list(torch.split(x, 32)) or a DataLoader"
        )
    try:
        iterator = iter(data)
    except TypeError:
        raise CalibrationError(f"calib_data must be iterable (a DataLoader or a list of batches), got {type(data).__name__}") from None
    batches = []
    for i, item in enumerate(iterator):
        args = _as_batch(item, input_names, i)
        tensors = tensors_of(args)
        if not tensors:
            raise CalibrationError(f"calibration batch {i} holds no tensor")
        for t in tensors:
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).sum().item()
                raise CalibrationError(
                    f"calibration batch {i} contains {bad} NaN or Inf value(s); clean the data "
                    "(e.g. torch.nan_to_num) or drop that batch"
                )
        batches.append(args)
    if not batches:
        raise CalibrationError(
            "calibration data is empty: the iterable yielded no batch; give at least one batch "
            "(a few hundred samples is typical)"
        )
    return batches


def as_channels_last(args: Batch) -> Batch:
    """The batch with every 4-D floating-point tensor in channels-last memory (same values)."""
    return tuple(a.contiguous(memory_format=torch.channels_last)
                 if isinstance(a, torch.Tensor) and a.ndim == 4 and a.is_floating_point() else a for a in args)


def runs_channels_last(gm: fx.GraphModule, args: Batch) -> bool:
    """Whether the passes may replay the data channels-last: `args` has a 4-D floating-point
    input and the graph gives the same output on its first sample either way.

    The layout changes no value, only the order in which a convolution sums (outputs agree to
    float32 round-off), but a forward that calls `.view` on an activation fails on a
    channels-last one, and one that reads strides could silently differ: both keep the layout
    the user gave. Observers are paused meanwhile."""
    first = tuple(a[:1] if isinstance(a, torch.Tensor) and a.ndim > 0 else a for a in args)
    relaid = as_channels_last(first)
    if all(a is b for a, b in zip(first, relaid)):
        return False
    try:
        with observers_paused(gm), torch.no_grad():
            want, got = tensors_of(gm(*first)), tensors_of(gm(*relaid))
    except Exception:
        return False
    return len(want) == len(got) and all(_same_up_to_rounding(a, b) for a, b in zip(want, got))


def _same_up_to_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    scale = float(a.abs().max()) if a.numel() else 0.0
    return a.numel() == 0 or float((a - b).abs().max()) <= 1e-4 * scale + 1e-6


def ensure_calibration_batches(gm: fx.GraphModule, ctx: Any) -> list[Batch]:
    """`ctx.calib_batches`, made once from the user's data (checked, channels-last where the graph
    gives the same output that way: `ctx.channels_last`)."""
    if ctx.calib_batches is None:
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        batches = calibration_batches(ctx.calib_data, ctx.example_inputs, names)
        ctx.channels_last = runs_channels_last(gm, batches[0])
        ctx.calib_batches = [as_channels_last(b) for b in batches] if ctx.channels_last else batches
    return ctx.calib_batches


def run_batches(gm: fx.GraphModule, batches: list[Batch], progress: bool, desc: str) -> None:
    with torch.no_grad():
        for args in tqdm(batches, desc=desc, disable=not progress, leave=False):
            gm(*args)


def batch_samples(args: Batch) -> int:
    """Samples in a batch: the leading dimension of its first tensor with one (1 if none has)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    return 1


def first_samples(batches: list[Batch], limit: int) -> list[Batch]:
    """The first `limit` samples of the data, as batches (the last one cut)."""
    out, seen = [], 0
    for args in batches:
        if seen >= limit:
            break
        n = batch_samples(args)
        if seen + n > limit:
            args = tuple(a[: limit - seen] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a
                         for a in args)
            n = limit - seen
        out.append(args)
        seen += n
    return out


def sub_batches(batches: list[Batch], size: int) -> Iterator[Batch]:
    """Every batch cut into pieces of at most `size` samples (along dimension 0)."""
    for args in batches:
        n = batch_samples(args)
        if n <= size:
            yield tuple(args)
            continue
        for lo in range(0, n, size):
            yield tuple(a[lo:lo + size] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n else a
                        for a in args)
