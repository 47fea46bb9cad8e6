"""insert_observers: put an observer after every tensor a quantizer group quantizes.

Before: a graph annotated by `group_quantizers` (`ctx.groups`). After: every member tensor `t` of
an activation group is followed by a `call_module` node `qobs_<t>` (an `ObserverStub`) that all of
t's users now read; the stubs of one group share one observer, so a shared-scale group's range
covers all its tensors. Weights need no observer: `convert` quantizes them from the tensor itself.

The observer is chosen per group from the user's `observer` argument (a name, or a dict keyed by
node name, op kind or "default"), then the spec's `observer`, then `DEFAULT_OBSERVER`. A group
at one of the graph's ports that `ctx.options.boundary` names (a part of a model compiled in
parts, `qcompiler.partition`) takes the observer given there, calibrated on everything the
tensor carries between the parts and fixed.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..context import CompileContext
from ..errors import QCompileError
from ..fx_util import port_node
from ..observers import OBSERVERS, make_observer
from ..quantizers import ObserverStub

DEFAULT_OBSERVER = "mse"


def observer_name(group: Any, ctx: CompileContext) -> str:
    choice = ctx.options.observer
    if isinstance(choice, dict):
        for key in (*group.tensors, group.owner, group.op_kind):
            if key in choice:
                return choice[key]
    return default_observer_name(choice, ctx.target)


def default_observer_name(choice: Any, spec: Any) -> str:
    """The observer of a group that `choice` (the observer option) does not name by node or kind."""
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and "default" in choice:
        return choice["default"]
    return getattr(spec, "observer", None) or DEFAULT_OBSERVER


def _check_observer_choice(choice: Any) -> None:
    names = [choice] if isinstance(choice, str) else list(choice.values()) if isinstance(choice, dict) else []
    if choice is not None and not isinstance(choice, (str, dict)):
        raise QCompileError(f"observer must be a name or a dict of names, got {type(choice).__name__}")
    for name in names:
        if name not in OBSERVERS:
            raise QCompileError(f"unknown observer {name!r}; known observers: {', '.join(OBSERVERS)}")


def boundary_observers(gm: fx.GraphModule, ctx: CompileContext) -> dict[int, Any]:
    """group id -> the observer `ctx.options.boundary` gives the group's port (the first port's,
    if a group holds several)."""
    found: dict[int, Any] = {}
    for port, observer in (ctx.options.boundary or {}).items():
        node = port_node(gm, port)
        group = node.meta.get("group") if node is not None else None
        if group is not None:
            found.setdefault(group, observer)
    return found


def insert_observers(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    _check_observer_choice(ctx.options.observer)
    nodes = {n.name: n for n in gm.graph.nodes}
    ctx.observers = {}
    fixed = boundary_observers(gm, ctx)
    for group in ctx.groups:
        if group.kind != "activation" or group.fallback:
            continue
        observer = fixed[group.id] if group.id in fixed else make_observer(observer_name(group, ctx))
        ctx.observers[group.id] = observer
        for name in group.tensors:
            node = nodes[name]
            stub_name = f"qobs_{name}"
            gm.add_submodule(stub_name, ObserverStub(group.id, observer))
            with gm.graph.inserting_after(node):
                stub = gm.graph.call_module(stub_name, (node,))
            node.replace_all_uses_with(stub, delete_user_cb=lambda user: user is not stub)
            stub.meta.update(
                {k: node.meta[k] for k in ("shape", "dtype", "out_elems") if k in node.meta},
                op_kind="quantize", role="quantizer", quantizes=name, group=group.id, params=0, macs=0,
            )
    gm.recompile()
    return gm
