"""calibrate: run the calibration data through the observed graph.

Before: a graph with observers (`insert_observers`). After: the same graph; every observer has
seen every calibration batch (the first 64 samples with `effort="fast"`). The data is
`ctx.calib_batches` (made once from whatever the user gave by
`qcompiler.calibration.calibration_batches`), so later passes (sensitivity, rounding, the
report) run over the same batches. Image batches are kept channels-last when the graph gives the
same output that way (`ctx.channels_last`): every later replay then runs its convolutions in the
layout the CPU runs fastest.
"""
from __future__ import annotations

from torch import fx

from ..calibration import ensure_calibration_batches, first_samples, run_batches, tensors_of
from ..context import CompileContext
from ..errors import CalibrationError


def calibrate(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    ensure_calibration_batches(gm, ctx)
    limit = ctx.options.effort_settings.calibration_samples
    batches = ctx.calib_batches if limit is None else first_samples(ctx.calib_batches, limit)
    try:
        run_batches(gm, batches, ctx.options.progress, "calibrate")
    except CalibrationError:
        raise
    except Exception as exc:
        shapes = [tuple(t.shape) for t in tensors_of(ctx.calib_batches[0])]
        raise CalibrationError(
            f"the model fails on the calibration data (first batch shapes {shapes}): "
            f"{type(exc).__name__}: {exc}. Check that calibration batches have the shape of example_inputs"
        ) from exc
    return gm
