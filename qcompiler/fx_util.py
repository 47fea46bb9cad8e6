"""Small operations on modules and graphs that several parts of qcompiler need, written once."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The attribute a dotted `get_attr` or `call_module` target names, from `root`."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `target` of `root`, replacing what is there."""
    parent, _, leaf = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def copy_sharing_tensors(module: Any) -> Any:
    """A structural deep copy of `module` that shares its parameter and buffer tensors.

    Passes never modify a tensor in place (they install new modules or parameters), so sharing
    tensors keeps the user's model and every stage of a compile intact at the memory cost of
    one model.
    """
    memo: dict[int, Any] = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a GraphModule's graph and module objects that shares every tensor (and its meta).

    Leaf modules of a traced GraphModule are the user's own module objects; a pass that installs
    into a snapshot leaves the user's model and earlier stages exactly as they were.
    """
    snap = copy_sharing_tensors(gm)
    snap.meta = dict(getattr(gm, "meta", {}))
    return snap


def graph_ports(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """A graph's ports by name: "input:i" is the i-th placeholder, "output:j" the j-th leaf of
    what the graph returns (in pytree order, as the forward's value flattens) where it is a node."""
    ports = {f"input:{i}": n for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    out = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    leaves = tree_leaves(out.args[0]) if out is not None and out.args else []
    ports.update({f"output:{j}": leaf for j, leaf in enumerate(leaves) if isinstance(leaf, fx.Node)})
    return ports


def port_node(gm: fx.GraphModule, port: str) -> fx.Node | None:
    """The node at one of a graph's ports (`graph_ports`), None where there is none."""
    if port.partition(":")[0] not in ("input", "output"):
        raise ValueError(f"a port is 'input:i' or 'output:j', got {port!r}")
    return graph_ports(gm).get(port)


def tree_map_detach(value: Any) -> Any:
    """`value` (a tensor, or tuples, lists and dicts of them) with every tensor detached."""
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, value)


class NodeOutputs(fx.Interpreter):
    """Runs a graph and keeps the outputs of the named nodes: `values[key]` for each node name ->
    key of `wanted`."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[str, str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        key = self.wanted.get(n.name)
        if key is not None and isinstance(out, torch.Tensor):
            self.values[key] = out.detach()
        return out
