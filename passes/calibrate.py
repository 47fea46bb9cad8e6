"""calibrate: run the calibration data through the observed graph.

Before: a graph with observers (`insert_observers`). After: the same graph; every observer has
seen every calibration batch. The data is `ctx.calib_batches` (made once by `calibration_batches`
from whatever the user gave: a DataLoader, any iterable of tensors, tuples or dicts), so later
passes (sensitivity, the report) can run over the same batches.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from ..context import CompileContext
from ..errors import CalibrationError

Batch = tuple[Any, ...]  # positional inputs of the graph


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
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
        tensors = _tensors(args)
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


def run_batches(gm: fx.GraphModule, batches: list[Batch], progress: bool, desc: str) -> None:
    with torch.no_grad():
        for args in tqdm(batches, desc=desc, disable=not progress, leave=False):
            gm(*args)


def calibrate(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    if ctx.calib_batches is None:
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        ctx.calib_batches = calibration_batches(ctx.calib_data, ctx.example_inputs, names)
    try:
        run_batches(gm, ctx.calib_batches, ctx.progress, "calibrate")
    except CalibrationError:
        raise
    except Exception as exc:
        shapes = [tuple(t.shape) for t in _tensors(ctx.calib_batches[0])]
        raise CalibrationError(
            f"the model fails on the calibration data (first batch shapes {shapes}): "
            f"{type(exc).__name__}: {exc}. Check that calibration batches have the shape of example_inputs"
        ) from exc
    return gm
