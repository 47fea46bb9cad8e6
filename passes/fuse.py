"""fuse: mark the target's fused kernels, so that no quantizer is placed inside one.

Before: a canonical graph (every node has `meta["op_kind"]`), BatchNorm folded.
After: the same nodes; every chain that matches one of `ctx.target.fusions` (e.g. conv → relu6,
conv → add → relu, linear → gelu) is one kernel. Its first node gets `meta["fusion"]` (the
pattern) and every node in it `meta["kernel"]` (the first node's name); every node but the last
gets `meta["fused_into"]` (the last node's name): its output never leaves the kernel and is not
quantized. The graph is annotated, not rewritten, so every stage still runs as float.

A chain matches when each node's output feeds only the next node of the pattern. Longer patterns
win over shorter ones, earlier nodes over later ones; a node belongs to at most one kernel.
"""
from __future__ import annotations

from torch import fx

from ..context import CompileContext


def _next_in_chain(node: fx.Node, kind: str, claimed: set[fx.Node]) -> fx.Node | None:
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "output" or user in claimed or user.meta.get("op_kind") != kind:
        return None
    return user


def match_chain(node: fx.Node, pattern: tuple[str, ...], claimed: set[fx.Node]) -> list[fx.Node] | None:
    if node in claimed or node.meta.get("op_kind") != pattern[0]:
        return None
    chain = [node]
    for kind in pattern[1:]:
        nxt = _next_in_chain(chain[-1], kind, claimed)
        if nxt is None:
            return None
        chain.append(nxt)
    return chain


def fuse(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    if ctx.target is None:
        return gm
    patterns = sorted((tuple(p) for p in ctx.target.fusions), key=len, reverse=True)
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        for pattern in patterns:
            chain = match_chain(node, pattern, claimed)
            if chain is None:
                continue
            claimed.update(chain)
            node.meta["fusion"] = pattern
            for member in chain:
                member.meta["kernel"] = node.name
            for member in chain[:-1]:
                member.meta["fused_into"] = chain[-1].name
            break
    return gm
