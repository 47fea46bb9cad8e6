"""sensitivity: how much the model output suffers when one quantizer group takes one format.

Before: a calibrated graph (`calibrate`). After: the same graph, unchanged; `ctx.sensitivity`
holds a `qcompiler.sensitivity.SensitivityTable`: for every group with a choice of format and
every candidate, the relative output noise power that quantizing that group alone in that format
causes, measured the way `ctx.options.sensitivity` says ("hessian" or "sqnr") on the first
calibration samples (as many as the effort setting's `sensitivity_samples`). Groups without a
choice get 0. No labels are used.
"""
from __future__ import annotations

from dataclasses import replace

from torch import fx

from ..calibration import first_samples
from ..context import CompileContext
from ..sensitivity import measure_sensitivity


def sensitivity(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    options = ctx.options
    # With host fallback a weight group with one format still has a choice (that format or float).
    host = options.host_fallback and ctx.target.unsupported.action == "host"
    groups = [g for g in ctx.groups
              if not g.fallback and (len(g.candidates) > 1 or (host and g.kind == "weight"))]
    limit = options.effort_settings.sensitivity_samples
    batches = ctx.calib_batches or []
    if limit is not None:
        batches = first_samples(batches, limit)
    table = measure_sensitivity(gm, groups, ctx.observers, batches, options.sensitivity,
                                options.seed, options.progress, options.executor)
    values = dict(table.values)
    for g in ctx.groups:
        if g.id not in values and not g.fallback:
            values[g.id] = {c: 0.0 for c in g.candidates}
    ctx.sensitivity = replace(table, values=values)
    ctx.note("sensitivity", f"{table.method}: {len(groups)} groups with a choice, "
                            f"{sum(len(g.candidates) for g in groups)} measurements on {table.samples} samples "
                            f"in {table.seconds:.1f} s")
    return gm
