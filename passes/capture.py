"""capture: turn the user's float nn.Module into a torch.fx.GraphModule whose nodes know their facts.

Before: the user's `nn.Module`. After: a `GraphModule` (`qcompiler.tracing.capture_module`) in
which every node carries its shape, dtype, params, MACs and element counts, found by running the
graph on the example inputs. Optional forward arguments the example inputs leave out are fixed
at their defaults. Submodules that cannot be traced stay opaque leaves that run in
float; each gets a note with the reason. A root torch.fx cannot trace is captured by
`torch.export` instead (`qcompiler.export_frontend`, noted); if that fails too, `CaptureError`.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..context import CompileContext
from ..tracing import capture_module


def capture(model: Any, ctx: CompileContext) -> fx.GraphModule:
    options = ctx.options
    gm = capture_module(model, ctx.example_inputs, options.leaf_modules, options.concrete_args)
    ctx.front_end = gm.meta.get("front_end", "torch.fx")
    if ctx.front_end == "torch.export":
        ctx.note("capture", f"captured by torch.export (torch.fx cannot trace the root: {gm.meta['fx_failure']})")
    for path, reason in gm.meta["opaque_modules"].items():
        ctx.note("capture", f"kept {path!r} opaque (runs in float on the host): {reason}")
    bound = gm.meta.get("bound_defaults", [])
    if bound:
        ctx.note("capture", f"optional argument(s) {', '.join(bound)} not in example_inputs: fixed at their defaults")
    return gm
