"""Running one fx node at a time, with a choice of module per target.

Passes that replay a graph node by node over calibration data (the simulated model beside its
float twin) need to run a node on given argument values, swapping the module a `call_module`
node calls; `torch.fx.Interpreter` runs whole graphs only.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

NodeRunner = Callable[[fx.Node, tuple, dict], Any]


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The attribute a dotted `get_attr` target names, from `root`."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def node_runner(gm: fx.GraphModule, module_of: Callable[[str], nn.Module]) -> NodeRunner:
    """run(node, args, kwargs): the node's output, calling `module_of(target)` for call_module."""
    def run(node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            return module_of(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return fetch_attr(gm, node.target)
        raise ValueError(f"cannot run node {node.name} (op {node.op!r}) on its own")
    return run
