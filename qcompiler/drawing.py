"""Drawing graphs with graphviz.

Nodes are labelled with name, op kind and output shape. They are coloured by op kind before
quantization, by number format once a pass has written `node.meta["format"]`, or by quantizer
group (`node.meta["group"]`) on request. Opaque leaves (untraceable modules that run in float)
are grey 3-D boxes; nodes that fall back to float on the host have a dashed red border.
"""
from __future__ import annotations

import colorsys
import os
import shutil
from typing import Any, Literal

from torch import fx

from .errors import QCompileError
from .opkinds import FAMILY_COLOURS, family

ColourBy = Literal["auto", "kind", "format", "group"]
_HIDDEN_KINDS = ("size", "get_attr")
_FORMATS = ("svg", "png", "pdf", "dot")


def _palette(index: int) -> str:
    # Golden-ratio hue steps give distinct neighbours for any number of groups.
    hue = (index * 0.61803398875) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.35, 0.97)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _format_colour(name: str) -> str:
    """Fewer bits, warmer colour: 2-4 bit red/orange, 8 bit green, 16 bit blue, float grey."""
    bits = "".join(ch for ch in name.split("_")[0] if ch.isdigit())
    if not bits:
        return "#dee2e6"
    b = int(bits)
    if b <= 4:
        return "#f4a261"
    if b <= 8:
        return "#95d5b2"
    if b <= 16:
        return "#a9d6e5"
    return "#dee2e6"


def _shape_text(shape: Any) -> str:
    if shape is None:
        return ""
    if isinstance(shape, tuple):
        return "×".join(str(d) for d in shape)
    if isinstance(shape, list):
        return "(" + ", ".join(_shape_text(s) for s in shape) + ")"
    return str(shape)


def to_dot(gm: fx.GraphModule, colour_by: ColourBy = "auto", hide_meta: bool = True, title: str | None = None):
    """A graphviz.Digraph of `gm` (not yet rendered)."""
    import graphviz

    nodes = list(gm.graph.nodes)
    if colour_by == "auto":
        colour_by = "format" if any("format" in n.meta for n in nodes) else "kind"
    hidden = {n for n in nodes if hide_meta and n.meta.get("op_kind") in _HIDDEN_KINDS}
    dot = graphviz.Digraph(name=type(gm).__name__, graph_attr={"rankdir": "TB", "fontsize": "10"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "9"})
    if title:
        dot.attr(label=title, labelloc="t")
    for n in nodes:
        if n in hidden:
            continue
        kind = n.meta.get("op_kind", n.op)
        lines = [n.name, kind]
        shape = _shape_text(n.meta.get("shape"))
        if shape:
            lines.append(shape)
        fmt = n.meta.get("format")
        wfmt = n.meta.get("weight_format")
        if wfmt:
            lines.append(f"w: {wfmt}")
        if fmt:
            lines.append(f"out: {fmt}")
        attrs: dict[str, str] = {}
        if colour_by == "group" and n.meta.get("group") is not None:
            attrs["fillcolor"] = _palette(int(n.meta["group"]))
            lines.append(f"group {n.meta['group']}")
        elif colour_by == "format" and (fmt or wfmt):
            attrs["fillcolor"] = _format_colour(wfmt or fmt)
        else:
            attrs["fillcolor"] = FAMILY_COLOURS.get(family(kind), "#ffffff")
        if n.meta.get("opaque"):
            attrs.update(shape="box3d", style="filled,dashed", fillcolor="#adb5bd")
            lines.append("opaque: float on host")
        if n.meta.get("fallback"):
            attrs.update(color="#d00000", style="rounded,filled,dashed", penwidth="2")
            lines.append("host float fallback")
        if n.op in ("placeholder", "output"):
            attrs["shape"] = "oval"
        dot.node(n.name, "\n".join(lines), **attrs)
    for n in nodes:
        if n in hidden:
            continue
        for src in n.all_input_nodes:
            if src not in hidden:
                dot.edge(src.name, n.name)
    return dot


def render_graph(gm: fx.GraphModule, path: str | os.PathLike, colour_by: ColourBy = "auto",
                 hide_meta: bool = True, title: str | None = None, **_: Any) -> str:
    """Write `gm` as SVG, PNG, PDF (by the file suffix) or DOT source; returns the path written."""
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in _FORMATS:
        raise QCompileError(f"cannot render to {path!r}: the file name must end in one of .{', .'.join(_FORMATS)}")
    dot = to_dot(gm, colour_by=colour_by, hide_meta=hide_meta, title=title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "dot":
        with open(path, "w", encoding="utf-8") as f:
            f.write(dot.source)
        return path
    if shutil.which("dot") is None:
        raise QCompileError(
            "graphviz's `dot` program is not installed, so the graph cannot be drawn as "
            f"{fmt.upper()}; install it (Debian/Ubuntu: apt-get install graphviz) or render to a .dot file"
        )
    dot.render(outfile=path, format=fmt, cleanup=True)
    return path
