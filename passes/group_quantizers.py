"""group_quantizers: decide where quantizers sit, which are one, and what formats each may take.

Before: a canonical graph with fused kernels marked (`fuse`). After: the same graph, annotated;
`ctx.groups` holds the `QuantizerGroup`s and `ctx.ties` the bit-width couplings. On the nodes:
`meta["role"]` ("chip", "pass", "host", "source", "meta"), `meta["group"]` (id of the activation
group quantizing the node's output), `meta["weight_group"]` (id of the kernel's weight group),
`meta["fallback"]` (runs in float on the host).

Rules come from the target spec and are declared where they arise, then solved in one place:
- a kernel's output and every tensor a kernel or pass-through op reads is quantized, except
  inside a fused kernel and except an attention mask, which a softmax adds to its scores as it
  reads them (`masked_softmax`);
- a pass-through op's output is one quantizer with its input; a shared-scale op's inputs and
  output are one quantizer. These are edges; networkx's connected components are the groups;
- a group's candidates are the formats every member's producer (`ops.<kind>.outputs`) and
  consumers (`ops.<kind>.inputs`) accept; an empty intersection falls back to float on the host
  where the spec allows it, and is an error naming nodes and keys where it does not;
- couplings narrow candidates (min_bits) or become ties between groups (equal_bits, requires).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import networkx as nx
import torch
from torch import fx

from ..attention import softmax_mask
from ..context import CompileContext
from ..errors import GroupingError
from ..fx_util import graph_ports
from ..groups import QuantizerGroup, Tie
from ..opkinds import META
from ..tracing import source_line

# Weight tensors of a kernel module, by op kind (attribute paths inside the module).
MODULE_WEIGHTS = {
    "conv": ("weight",), "depthwise_conv": ("weight",), "conv_transpose": ("weight",),
    "linear": ("weight",), "embedding": ("weight",),
    "multi_head_attention": ("in_proj_weight", "out_proj.weight"),
}


def _is_float_tensor(node: fx.Node) -> bool:
    shape, dtype = node.meta.get("shape"), node.meta.get("dtype")
    return isinstance(shape, tuple) and isinstance(dtype, torch.dtype) and dtype.is_floating_point


class _Graph:
    """The facts group_quantizers derives from the spec for one graph."""

    def __init__(self, gm: fx.GraphModule, spec: Any):
        self.gm, self.spec = gm, spec
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.order = {n.name: i for i, n in enumerate(gm.graph.nodes)}

    def anchor(self, node: fx.Node) -> fx.Node:
        return self.nodes[node.meta.get("kernel", node.name)]

    def rule(self, node: fx.Node) -> Any:
        return self.spec.op_rule(self.anchor(node).meta.get("op_kind"))

    def role(self, node: fx.Node) -> str:
        kind = node.meta.get("op_kind")
        if node.op in ("placeholder", "get_attr"):
            return "source"
        if node.op == "output" or kind in META:
            return "meta"
        if node.meta.get("opaque"):
            return "host"
        if self.rule(node) is not None:
            return "chip"
        if kind in self.spec.pass_through:
            return "pass"
        return "host"

    def weights(self, node: fx.Node) -> tuple[str, ...]:
        kind = node.meta.get("op_kind")
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            names = []
            for attr in MODULE_WEIGHTS.get(kind, ()):
                owner, _, leaf = f"{node.target}.{attr}".rpartition(".")
                if getattr(self.gm.get_submodule(owner), leaf, None) is not None:
                    names.append(f"{node.target}.{attr}")
            del module
            return tuple(names)
        if node.op == "call_function" and kind in MODULE_WEIGHTS and len(node.args) > 1:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                return (w.target,)
        return ()


def _data_input(node: fx.Node) -> fx.Node | None:
    for arg in node.args:
        if isinstance(arg, fx.Node):
            return arg
    return None


def _ordered_intersection(lists: list[tuple[str, ...]]) -> tuple[str, ...]:
    first, rest = lists[0], [set(l) for l in lists[1:]]
    return tuple(f for f in first if all(f in r for r in rest))


def group_quantizers(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    spec = ctx.target
    if spec is None:
        raise GroupingError("group_quantizers needs a target: give target=... to qcompile or the pass manager")
    g = _Graph(gm, spec)
    nodes = list(gm.graph.nodes)
    for n in nodes:
        n.meta["role"] = g.role(n)
        for key in ("group", "weight_group", "fallback"):
            n.meta.pop(key, None)
    _refuse_or_mark_host(g, nodes, ctx)

    # Weight tensors read by functional kernels are weights, not activations.
    weight_sources = {w for n in nodes if n.meta["role"] == "chip" for w in g.weights(n)}
    tensors = [
        n for n in nodes
        if _is_float_tensor(n) and "fused_into" not in n.meta and n.meta["role"] != "meta"
        and not (n.op == "get_attr" and n.target in weight_sources)
    ]
    tensor_set = set(tensors)

    # Declared constraints: what each tensor's producer and consumers accept, and sharing edges.
    constraints: dict[fx.Node, list[tuple[tuple[str, ...], str, str | None]]] = {t: [] for t in tensors}
    share = nx.Graph()
    share.add_nodes_from(tensors)
    for t in tensors:
        if t.meta["role"] == "chip":
            rule, anchor = g.rule(t), g.anchor(t)
            constraints[t].append((rule.outputs, f"ops.{anchor.meta['op_kind']}.outputs ({anchor.name})",
                                   rule.default_outputs))
        for user in t.users:
            if user.meta["role"] == "chip" and t is not softmax_mask(user) and not (
                    user.op == "call_function" and t.op == "get_attr" and t.target in g.weights(user)):
                rule, anchor = g.rule(user), g.anchor(user)
                constraints[t].append((rule.inputs, f"ops.{anchor.meta['op_kind']}.inputs ({user.name})",
                                       rule.default_inputs))
    for n in nodes:
        if n not in tensor_set:
            continue
        if n.meta["role"] == "pass":
            src = _data_input(n)
            # split/chunk yield tuples: the getitem after them shares the tensor that was split.
            while src is not None and src not in tensor_set and src.meta.get("role") == "pass":
                src = _data_input(src)
            if src in tensor_set:
                share.add_edge(n, src)
        if n.meta["role"] == "chip" and n.meta.get("op_kind") in spec.shared_scale:
            for src in n.all_input_nodes:
                if src in tensor_set:
                    share.add_edge(n, src)

    groups: list[QuantizerGroup] = []
    components = sorted(nx.connected_components(share), key=lambda c: min(g.order[m.name] for m in c))
    for comp in components:
        members = sorted(comp, key=lambda m: g.order[m.name])
        found = [c for m in members for c in constraints[m]]
        if not found:
            continue  # nothing on the chip reads or writes these tensors: they stay float
        group = _activation_group(len(groups), members, found, spec, ctx)
        groups.append(group)
        for m in members:
            m.meta["group"] = group.id
    _add_weight_groups(g, nodes, groups, spec)
    _apply_min_bits(g, nodes, groups, spec, set(ctx.options.boundary or ()))
    ctx.groups = groups
    ctx.ties = _ties(g, nodes, groups, spec)
    return gm


def _refuse_or_mark_host(g: _Graph, nodes: list[fx.Node], ctx: CompileContext) -> None:
    host = [n for n in nodes if n.meta["role"] == "host"]
    if host and g.spec.unsupported.action != "host":
        lines = [f"  {n.name}: op kind {n.meta.get('op_kind')!r} at {source_line(n)}" for n in host[:10]]
        raise GroupingError(
            f"target {g.spec.name!r} cannot run {len(host)} node(s) and its spec refuses host fallback:\n"
            + "\n".join(lines)
            + "\n  add [ops.<kind>] rules for these op kinds to the spec, or set [unsupported] action = \"host\""
        )
    for n in host:
        n.meta["fallback"] = True
        ctx.note("group_quantizers", f"{n.name} ({n.meta.get('op_kind')}) runs in float on the host")


def _activation_group(gid: int, members: list[fx.Node], found: list, spec: Any, ctx: CompileContext) -> QuantizerGroup:
    candidates = _ordered_intersection([c[0] for c in found])
    owner = members[0]
    common = dict(id=gid, kind="activation", tensors=tuple(m.name for m in members), weights=(),
                  owner=owner.name, op_kind=owner.meta.get("op_kind", owner.op))
    if not candidates:
        detail = "; ".join(f"{where} = [{', '.join(c)}]" for c, where, _ in found)
        if spec.unsupported.action != "host":
            raise GroupingError(
                f"no number format fits tensor(s) {', '.join(m.name for m in members)}: {detail}. "
                "Make these lists share a format in the spec, or set [unsupported] action = \"host\""
            )
        for m in members:
            m.meta["fallback"] = True
        ctx.note("group_quantizers", f"group {gid} ({', '.join(m.name for m in members)}) stays float: {detail}")
        return QuantizerGroup(**common, candidates=(), default="", fallback=True, reason=f"no common format: {detail}")
    defaults = [d or c[0] for c, _, d in found]
    default = next((d for d in defaults if d in candidates), candidates[0])
    return QuantizerGroup(**common, candidates=candidates, default=default,
                          formats={c: spec.format(c) for c in candidates})


def _add_weight_groups(g: _Graph, nodes: list[fx.Node], groups: list[QuantizerGroup], spec: Any) -> None:
    for n in nodes:
        if n.meta["role"] != "chip" or g.anchor(n) is not n:
            continue
        weights = g.weights(n)
        rule = g.rule(n)
        if not weights or not rule.weights:
            continue
        default = rule.default_weights or rule.weights[0]
        group = QuantizerGroup(
            id=len(groups), kind="weight", tensors=(), weights=weights, owner=n.name,
            op_kind=n.meta["op_kind"], candidates=tuple(rule.weights), default=default,
            formats={c: spec.format(c) for c in rule.weights},
        )
        groups.append(group)
        n.meta["weight_group"] = group.id


def _weighted_kernels(nodes: list[fx.Node]) -> list[fx.Node]:
    return [n for n in nodes if "weight_group" in n.meta]


def _apply_min_bits(g: _Graph, nodes: list[fx.Node], groups: list[QuantizerGroup], spec: Any,
                    boundary: set[str]) -> None:
    """min_bits couplings at the model's first layer, last layer and outputs. In a part of a model
    compiled in parts, ports that other parts feed or read (`boundary`) are not the model's ends:
    a part whose every input comes from another part has no first layer of the model, and so on."""
    kernels = _weighted_kernels(nodes)
    if not kernels:
        return
    ports = graph_ports(g.gm)
    inputs = [p for p in ports if p.startswith("input:")]
    outputs = [p for p in ports if p.startswith("output:")]
    inner = {"first": bool(inputs) and all(p in boundary for p in inputs),
             "last": bool(outputs) and all(p in boundary for p in outputs)}
    for coupling in spec.couplings:
        if coupling.kind != "min_bits":
            continue
        if coupling.where == "output":
            inner_groups = {ports[p].meta.get("group") for p in outputs if p in boundary}
            _narrow(groups, [gid for gid in _output_groups(nodes) if gid not in inner_groups], coupling,
                    "the model's outputs")
            continue
        if inner.get(coupling.where):
            continue
        kernel = kernels[0] if coupling.where == "first" else kernels[-1]
        touched: list[int] = []
        if coupling.tensors in ("all", "weights"):
            touched.append(kernel.meta["weight_group"])
        if coupling.tensors in ("all", "activations"):
            # the first layer's input, the last layer's output
            if coupling.where == "first":
                src = _data_input(kernel)
                if src is not None and "group" in src.meta:
                    touched.append(src.meta["group"])
            else:
                last = g.nodes[kernel.meta.get("fused_into", kernel.name)]
                if "group" in last.meta:
                    touched.append(last.meta["group"])
        _narrow(groups, touched, coupling, f"the {coupling.where} layer ({kernel.name})")


def _output_groups(nodes: list[fx.Node]) -> list[int]:
    """The activation groups of the tensors the graph returns."""
    out = next((n for n in nodes if n.op == "output"), None)
    return [] if out is None else sorted({s.meta["group"] for s in out.all_input_nodes if "group" in s.meta})


def _narrow(groups: list[QuantizerGroup], touched: list[int], coupling: Any, where: str) -> None:
    """Keep only the candidates of at least `coupling.bits` bits in the touched groups."""
    for gid in touched:
        grp = groups[gid]
        if grp.fallback:
            continue
        kept = tuple(c for c in grp.candidates if grp.formats[c].bits >= coupling.bits)
        if not kept:
            raise GroupingError(
                f"couplings: min_bits {coupling.bits} at {where} leaves "
                f"group {gid} no format: its candidates are {', '.join(grp.candidates)}"
            )
        default = grp.default if grp.default in kept else kept[0]
        groups[gid] = replace(grp, candidates=kept, default=default, formats={c: grp.formats[c] for c in kept},
                              reason=f"min_bits {coupling.bits} at {where}")


def _ties(g: _Graph, nodes: list[fx.Node], groups: list[QuantizerGroup], spec: Any) -> list[Tie]:
    ties: list[Tie] = []
    for coupling in spec.couplings:
        if coupling.kind == "equal_bits":
            for n in nodes:
                if n.meta["role"] == "chip" and n.meta.get("op_kind") in coupling.ops:
                    ids = sorted({s.meta["group"] for s in n.all_input_nodes if "group" in s.meta})
                    if len(ids) > 1:
                        ties.append(Tie("equal_bits", tuple(ids), n.name))
        elif coupling.kind == "requires":
            for n in _weighted_kernels(nodes):
                if coupling.ops and n.meta.get("op_kind") not in coupling.ops:
                    continue
                inputs = sorted({s.meta["group"] for s in n.all_input_nodes if "group" in s.meta})
                if inputs:
                    ties.append(Tie("requires", (n.meta["weight_group"], *inputs), n.name,
                                    weight_bits=coupling.if_weight_bits_at_most,
                                    activation_bits=coupling.then_activation_bits))
    return ties
