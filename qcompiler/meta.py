"""Facts about graph nodes: every `node.meta` key qcompiler writes, declared once.

A fact about one node lives on that node (`node.meta[key]`), written by the pass named here and
read by later passes, the report, the drawing, the cost model and the backends. Keys marked
`saved` travel with a saved model (`CompiledModel.save`), because a loaded model's report,
drawing and cost figures read them. `tests/test_architecture.py` checks that the source reads
and writes no other key.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetaKey:
    name: str
    writer: str        # the pass (or module) that writes it
    meaning: str
    saved: bool = True


NODE_META: tuple[MetaKey, ...] = (
    MetaKey("op_kind", "capture, canonicalize", "the canonical op kind (qcompiler.opkinds)"),
    MetaKey("shape", "capture", "output shape (a tuple; nested lists for several outputs)"),
    MetaKey("dtype", "capture", "output dtype"),
    MetaKey("params", "capture", "parameter elements of the node (weights and biases)"),
    MetaKey("macs", "capture", "multiply-accumulates for the example batch"),
    MetaKey("in_elems", "capture", "elements of the first tensor input"),
    MetaKey("out_elems", "capture", "elements of the output"),
    MetaKey("opaque", "capture", "a module that could not be traced and runs as one float call", saved=False),
    MetaKey("fusion", "fuse", "the op kinds of the fused kernel this node starts"),
    MetaKey("kernel", "fuse", "the node that starts the fused kernel this node belongs to"),
    MetaKey("fused_into", "fuse", "on a kernel's first node: the kernel's last node"),
    MetaKey("role", "group_quantizers",
            "'chip' (a kernel of the target), 'pass' (pass-through), 'host' (float on the host), "
            "'source' (an input or constant) or 'meta' (no tensor), 'quantizer' (an observer or "
            "quantizer node)"),
    MetaKey("group", "group_quantizers", "id of the activation group that quantizes the output"),
    MetaKey("weight_group", "group_quantizers", "id of the weight group of a kernel"),
    MetaKey("fallback", "group_quantizers, convert", "the node runs in float on the host"),
    MetaKey("quantizes", "insert_observers", "on a quantizer node: the node whose output it quantizes"),
    MetaKey("format", "convert", "the output's number format name"),
    MetaKey("weight_format", "convert", "the kernel's weight format name"),
    MetaKey("bias_fit", "model_requant",
            "output channels whose weight scale was raised so that their bias fits its integer width"),
)

# Keys on `gm.meta` (the whole graph).
GRAPH_META: tuple[MetaKey, ...] = (
    MetaKey("opaque_modules", "capture", "module path -> why it could not be traced (text)"),
    MetaKey("opaque_details", "capture", "module path -> the reason, source line and fix", saved=False),
    MetaKey("bound_defaults", "capture",
            "optional forward arguments left out of example_inputs, traced at their defaults", saved=False),
    MetaKey("front_end", "capture", "what captured the graph: 'torch.fx' or 'torch.export'", saved=False),
    MetaKey("fx_failure", "capture", "with torch.export: why torch.fx could not trace the root", saved=False),
    MetaKey("fact_inputs", "capture",
            "the inputs the facts were recorded on (canonicalize records them again after a rewrite)", saved=False),
    MetaKey("target", "backends.qpack", "on a loaded qpack: the target's name, version and requantization",
            saved=False),
)

SAVED_NODE_META: tuple[str, ...] = tuple(k.name for k in NODE_META if k.saved)
