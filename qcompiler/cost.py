"""The target's cost model evaluated on a graph: per-node variables and metric totals.

A spec's `[cost]` formulas are over per-node variables (targets.formulas.VARIABLES). This module
computes those variables for every kernel of an annotated graph under a choice of formats, and
sums a metric over the graph; `TargetSpec.cost_of` evaluates them, for chip kernels and for nodes
that fall back to the host alike.
Element counts and MACs are per sample (capture records them for the example batch).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx

FLOAT_BITS = 32


def batch_size(gm: fx.GraphModule) -> int:
    for n in gm.graph.nodes:
        if n.op == "placeholder" and isinstance(n.meta.get("shape"), tuple) and n.meta["shape"]:
            return max(1, int(n.meta["shape"][0]))
    return 1


def costed_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Kernels on the chip (one node per fused kernel: its first) and nodes run on the host."""
    out = []
    for n in gm.graph.nodes:
        role = n.meta.get("role")
        if role == "chip" and n.meta.get("kernel", n.name) == n.name:
            out.append(n)
        elif role == "host":
            out.append(n)
    return out


def _final(node: fx.Node, nodes: dict[str, fx.Node]) -> fx.Node:
    return nodes[node.meta["fused_into"]] if "fused_into" in node.meta else node


def _module_sizes(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int, int]:
    """(parameters, weight elements without biases, conv groups) of a node's module."""
    if node.op != "call_module":
        return int(node.meta.get("params", 0)), int(node.meta.get("params", 0)), 1
    module = gm.get_submodule(node.target)
    params = biases = 0
    for name, p in module.named_parameters():
        params += p.numel()
        biases += p.numel() if name.rsplit(".", 1)[-1].endswith("bias") else 0
    return params, params - biases, int(getattr(module, "groups", 1))


def node_variables(gm: fx.GraphModule, node: fx.Node, nodes: dict[str, fx.Node], bits_of: Callable[[int], int],
                   scales_of: Callable[[int], int], batch: int) -> dict[str, float]:
    """The formula variables of one costed node; `bits_of(group id)` gives a group's chosen bits."""
    last = _final(node, nodes)
    params, weight_elems, conv_groups = _module_sizes(gm, node)
    wg = node.meta.get("weight_group")
    inputs = [s for s in node.all_input_nodes if s.meta.get("shape") is not None and s.meta.get("role") != "meta"]
    in_groups = [s.meta["group"] for s in inputs if "group" in s.meta]
    a_bits = bits_of(in_groups[0]) if in_groups else FLOAT_BITS
    if wg is not None:
        w_bits = bits_of(wg)
        w_scales = scales_of(wg)
    elif node.meta.get("op_kind") == "matmul" and len(in_groups) > 1:
        w_bits, w_scales = bits_of(in_groups[1]), 0
    else:
        w_bits, w_scales = (FLOAT_BITS if params else 0), 0
    out_group = last.meta.get("group")
    return {
        "params": params, "weight_elems": weight_elems, "macs": node.meta.get("macs", 0) / batch,
        "w_bits": w_bits, "a_bits": a_bits,
        "out_bits": bits_of(out_group) if out_group is not None else FLOAT_BITS,
        "in_elems": sum(s.meta.get("out_elems", 0) for s in inputs) / batch,
        "out_elems": last.meta.get("out_elems", 0) / batch,
        "groups": conv_groups, "w_scales": w_scales,
    }


def node_cost(spec: Any, metric: str, gm: fx.GraphModule, node: fx.Node, nodes: dict[str, fx.Node],
              bits_of: Callable[[int], int], scales_of: Callable[[int], int], batch: int,
              on_host: bool | None = None) -> float:
    """One costed node's value of `metric` under the formats `bits_of` describes.

    `on_host` overrides where the node runs (its `role` meta otherwise): the bit allocation asks
    what a chip kernel would cost if it fell back to the host.
    """
    variables = node_variables(gm, node, nodes, bits_of, scales_of, batch)
    host = node.meta.get("role") == "host" if on_host is None else on_host
    return spec.cost_of(metric, on_host=host, **variables)


def metric_total(spec: Any, metric: str, gm: fx.GraphModule, bits_of: Callable[[int], int],
                 scales_of: Callable[[int], int]) -> float:
    """Sum of `metric` over the graph under the formats `bits_of` describes."""
    nodes = {n.name: n for n in gm.graph.nodes}
    batch = batch_size(gm)
    return sum((node_cost(spec, metric, gm, n, nodes, bits_of, scales_of, batch) for n in costed_nodes(gm)), 0.0)
