"""Blocks of a graph: the units that reconstruction fits jointly.

A *cut* is a point of the graph's order where exactly one computed value is still needed by what
follows (the output of a residual block after its add, of a layer in a plain chain). Segments
between cuts are the smallest pieces that can be fitted alone: everything a segment's nodes
read comes in through one tensor.

- "model": the whole graph is one block (EPTQ's whole-model distillation).
- "block": segments merged into the network's own blocks, as in BRECQ. The depth of those blocks
  in the module hierarchy is read off the graph: the segments with several kernels are the
  residual blocks, and the common prefix of their kernels' module names (`layer1.0`,
  `features.3.conv`, `blocks.2.1`) says at which depth a block lives. Consecutive segments whose
  first kernel shares that prefix join one block (the non-residual inverted-residual blocks of
  MobileNet and EfficientNet); a segment without kernels (pooling, flatten) joins the block
  before it. A graph with no residual block has one block per segment.
- "layer": one block per segment (in a plain chain, one kernel each).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import fx, nn

from .errors import QCompileError

GRANULARITIES = ("layer", "block", "model")


@dataclass(frozen=True)
class Block:
    """A run of consecutive graph nodes, what it reads from before it and what later nodes read."""

    name: str
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]     # placeholders and computed values from before the block
    outputs: tuple[fx.Node, ...]    # values of the block that later nodes or the output use
    kernels: tuple[fx.Node, ...]    # the given kernels among `nodes`


def _computed(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]


def cut_segments(graph: fx.Graph) -> list[list[fx.Node]]:
    """The computed nodes split at every cut (see the module docstring), in order."""
    nodes = _computed(graph)
    index = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)

    def last_use(n: fx.Node) -> int:
        return max((index.get(u, end) for u in n.users), default=-1)

    # Values alive across position i: anything defined before i and used after i.
    live_until = max((last_use(p) for p in graph.nodes if p.op == "placeholder"), default=-1)
    segments, current = [], []
    for i, n in enumerate(nodes):
        current.append(n)
        if live_until <= i:
            segments.append(current)
            current = []
        live_until = max(live_until, last_use(n))
    if current:
        segments.append(current)
    return segments


def _prefix_depth(segments: list[list[fx.Node]], is_kernel: Callable[[fx.Node], bool]) -> int:
    """The module depth of the residual blocks (0 when the graph has none)."""
    depths = []
    for seg in segments:
        names = [n.target.split(".") for n in seg if is_kernel(n)]
        if len(names) < 2:
            continue
        depth = 0
        while all(len(x) > depth + 1 and x[depth] == names[0][depth] for x in names):
            depth += 1
        if depth:
            depths.append(depth)
    if not depths:
        return 0
    counts = Counter(depths)
    return min(d for d, c in counts.items() if c == max(counts.values()))


def find_blocks(gm: fx.GraphModule, kernels: Iterable[fx.Node], granularity: str) -> list[Block]:
    """The graph's blocks at `granularity` ("layer", "block" or "model"); each holds a kernel."""
    if granularity not in GRANULARITIES:
        raise QCompileError(f"reconstruction granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    kernel_set = set(kernels)

    def is_kernel(n: fx.Node) -> bool:
        return n in kernel_set

    segments = cut_segments(gm.graph)
    if granularity == "model":
        groups = [[n for seg in segments for n in seg]]
    else:
        depth = _prefix_depth(segments, is_kernel) if granularity == "block" else 0
        groups: list[list[fx.Node]] = []
        last_key = None
        for seg in segments:
            first = next((n for n in seg if is_kernel(n)), None)
            if first is None:
                if groups:
                    groups[-1].extend(seg)
                else:
                    groups.append(list(seg))
                continue
            key = tuple(first.target.split(".")[:depth]) if depth else None
            if groups and (key is not None and key == last_key or not any(is_kernel(n) for n in groups[-1])):
                groups[-1].extend(seg)
            else:
                groups.append(list(seg))
            last_key = key
    blocks = []
    for nodes in groups:
        ks = tuple(n for n in nodes if is_kernel(n))
        if not ks:
            continue
        blocks.append(_block(nodes, ks))
    return blocks


def _block(nodes: list[fx.Node], kernels: tuple[fx.Node, ...]) -> Block:
    inside = set(nodes)
    inputs: list[fx.Node] = []
    outputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
        if any(u not in inside for u in n.users):
            outputs.append(n)
    first = kernels[0].target
    name = first if len(kernels) == 1 else f"{first} .. {kernels[-1].target}"
    return Block(name=name, nodes=tuple(nodes), inputs=tuple(inputs), outputs=tuple(outputs), kernels=kernels)


def block_module(gm: fx.GraphModule, block: Block, module_of: Callable[[str], nn.Module],
                 taps: Iterable[fx.Node] = ()) -> fx.GraphModule:
    """The block as a GraphModule: block.inputs in, (block.outputs..., taps...) out.

    `module_of(target)` gives the module each call_module node runs (trainable stand-ins, float
    twins); constants (get_attr) come from `gm`.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, object] = {}
    for a in block.inputs:
        env[a] = graph.placeholder(a.name)

    def arg(a: fx.Node) -> fx.Node:
        if a not in env and a.op == "get_attr":
            env[a] = graph.node_copy(a)
            owner = gm
            for part in a.target.split("."):
                owner = getattr(owner, part)
            root[a.target] = owner
        return env[a]

    for n in block.nodes:
        if n.op == "call_module":
            root[n.target] = module_of(n.target)
        env[n] = graph.node_copy(n, arg)
    outs = list(block.outputs) + [t for t in taps if t not in block.outputs]
    graph.output(tuple(env[o] for o in outs))
    return fx.GraphModule(root, graph)
