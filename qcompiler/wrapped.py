"""torchvision helpers that `torch.fx.wrap` keeps as one node, written as the primitive ops they are
for the input shape capture recorded. Left wrapped, such a node has op kind "other" and runs in
float on the host, splitting the quantized graph around it.

Swin's `_patch_merging_pad` pads height and width to even sizes and gathers the four pixels of
every 2x2 patch along channels: a pad, four strided slices and a cat, all data movement.
(Swin's window attention is the business of `qcompiler.attention`.)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

PATCH_MERGING_PAD = ("torchvision.models.swin_transformer", "_patch_merging_pad")


class PatchMergingPad(nn.Module):
    """`_patch_merging_pad` for inputs [..., H, W, C] of one rank, height and width."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.pad_bottom, self.pad_right = shape[-3] % 2, shape[-2] % 2
        # x[..., i::2, j::2, :] spelled without the Ellipsis, which the exporters do not take.
        lead = (slice(None),) * (len(shape) - 3)
        self.patches = [lead + (slice(i, None, 2), slice(j, None, 2), slice(None)) for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_bottom or self.pad_right:
            x = F.pad(x, (0, 0, 0, self.pad_right, 0, self.pad_bottom))
        return torch.cat([x[index] for index in self.patches], -1)


# (module, name) of a wrapped function -> the module that computes it for an input shape.
STATIC_FORMS: dict[tuple[str, str], Any] = {PATCH_MERGING_PAD: PatchMergingPad}


def _static_form(node: fx.Node) -> nn.Module | None:
    if node.op != "call_function" or len(node.args) != 1 or node.kwargs:
        return None
    build = STATIC_FORMS.get((getattr(node.target, "__module__", None), getattr(node.target, "__name__", None)))
    x = node.args[0]
    shape = x.meta.get("shape") if isinstance(x, fx.Node) else None
    if build is None or not (isinstance(shape, tuple) and len(shape) >= 3 and all(isinstance(d, int) for d in shape)):
        return None
    return build(shape)


def unwrap_functions(gm: fx.GraphModule) -> list[str]:
    """Replace every call of a function in STATIC_FORMS whose input shape is known by its primitive
    ops; returns the names of the nodes replaced."""
    done = []
    for node in list(gm.graph.nodes):
        form = _static_form(node)
        if form is None:
            continue
        sub = fx.symbolic_trace(form)
        (placeholder,) = [n for n in sub.graph.nodes if n.op == "placeholder"]
        with gm.graph.inserting_before(node):
            out = gm.graph.graph_copy(sub.graph, {placeholder: node.args[0]})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done.append(node.name)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
