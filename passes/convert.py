"""convert: freeze every group's format and parameters into the graph: the simulated model.

Before: a calibrated graph (`ObserverStub`s after quantized tensors, observers full of
statistics). After: each stub is a `FakeQuantize` with its group's chosen format and frozen
parameters, and each kernel whose weights are quantized is a copy of its module holding the
weights as the target stores them (decoded to float). `ctx.plan` records it all.

The chosen format of a group is `ctx.allocation[group.id]` (from `allocate_bits`), else the
spec's default.
"""
from __future__ import annotations

from torch import fx, nn

from ..context import CompileContext
from ..errors import QCompileError
from ..formats import HostFloat
from ..fx_util import copy_sharing_tensors, set_submodule
from ..groups import HOST_FLOAT
from ..kernel_modules import functional_kernel_error
from ..plan import GroupPlan, Plan
from ..quantizers import FakeQuantize, ObserverStub, quantize_weight, weight_axis


def _quantize_kernel_weights(gm: fx.GraphModule, node: fx.Node, group, fmt, ctx: CompileContext) -> tuple:
    """Install a copy of the kernel's module with quantized weights; returns the params of the first."""
    original = gm.get_submodule(node.target)
    module = copy_sharing_tensors(original)    # the user's module is never changed
    params = None
    axis = weight_axis(module)
    for qualified in group.weights:
        path = qualified[len(node.target) + 1:]
        owner_path, _, leaf = path.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        w = getattr(owner, leaf)
        qw, p = quantize_weight(fmt, w, axis)
        setattr(owner, leaf, nn.Parameter(qw, requires_grad=w.requires_grad))
        params = params if params is not None else p
    set_submodule(gm, node.target, module)
    ctx.float_kernels[node.target] = original  # the float side of later replays
    return params


def convert(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    nodes = {n.name: n for n in gm.graph.nodes}
    stubs: dict[int, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ObserverStub):
            stubs.setdefault(gm.get_submodule(n.target).group, []).append(n)
    plans = []
    for group in ctx.groups:
        name = "float" if group.fallback else ctx.allocation.get(group.id, group.default)
        # allocate_bits may move a kernel to the host (float weights) where the spec allows it
        to_host = group.kind == "weight" and name == HOST_FLOAT and ctx.target.unsupported.action == "host"
        if not group.fallback and not to_host and name not in group.candidates:
            raise QCompileError(f"group {group.id} was given format {name!r}, which is not among its candidates {group.candidates}")
        fmt = HostFloat() if group.fallback or to_host else group.formats[name]
        params = None
        if group.kind == "activation" and not group.fallback:
            observer = ctx.observers[group.id]
            params = None if isinstance(fmt, HostFloat) else observer.compute_qparams(fmt)
            for stub in stubs.get(group.id, []):
                set_submodule(gm, stub.target, FakeQuantize(group.id, fmt, params))
                stub.meta["format"] = fmt.name
                nodes[stub.meta["quantizes"]].meta["format"] = fmt.name
        elif to_host:
            kernel = nodes[group.owner]
            kernel.meta.update(role="host", fallback=True, weight_format="float")
            ctx.note("convert", f"{kernel.name} runs in float on the host (bit allocation)")
        elif group.kind == "weight":
            kernel = nodes[group.owner]
            if kernel.op != "call_module":
                raise QCompileError(functional_kernel_error(kernel.name))
            params = _quantize_kernel_weights(gm, kernel, group, fmt, ctx)
            kernel.meta["weight_format"] = fmt.name
        plans.append(GroupPlan(
            id=group.id, kind=group.kind, tensors=group.tensors, weights=group.weights, owner=group.owner,
            op_kind=group.op_kind, candidates=group.candidates, format_name=name, format=fmt,
            params=params, fallback=group.fallback or to_host,
        ))
    spec = ctx.target
    ctx.plan = Plan(target=spec.name, target_version=str(spec.version), groups=tuple(plans))
    gm.recompile()
    return gm
