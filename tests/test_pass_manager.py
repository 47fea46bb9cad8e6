"""Tests of qcompiler/pass_manager.py: editing the pipeline, stages, timings, snapshots, drawing."""
from __future__ import annotations

import shutil
import time

import pytest
import torch
from torch import fx, nn

import qcompiler
from qcompiler import PassError, PassManager
from qcompiler.drawing import DrawingUnavailable


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(), nn.Flatten(), nn.LazyLinear(2)).eval()


def _model_ready():
    m = _model()
    m(torch.randn(1, 3, 6, 6))  # materialise the lazy layer
    return m


def test_stages_timings_and_snapshots():
    model = _model_ready()
    x = torch.randn(1, 3, 6, 6)
    start = time.perf_counter()
    run = PassManager(["capture", "canonicalize"]).run(model, x)
    wall = time.perf_counter() - start
    assert run.stages == ["capture", "canonicalize"]
    assert set(run.timings) == {"capture", "canonicalize"} and all(t > 0 for t in run.timings.values())
    assert sum(run.timings.values()) <= wall   # each pass is timed alone, snapshots excluded
    before, after = run.node_counts["canonicalize"]
    assert after == before - 1  # dropout went
    # Each stage is its own graph: the capture snapshot still has the dropout, canonicalize not.
    kinds_capture = [n.target for n in run.graph("capture").graph.nodes if n.op == "call_module"]
    assert "2" in kinds_capture
    assert "2" not in [n.target for n in run.graph("canonicalize").graph.nodes if n.op == "call_module"]
    for stage in run.stages:
        torch.testing.assert_close(run.graph(stage)(x), model(x))
    assert "canonicalize" in run.summary()
    with pytest.raises(KeyError, match="no stage"):
        run.graph("fold_bn")


def test_user_can_insert_drop_and_replace_passes():
    seen = []

    def count_nodes(gm, ctx):
        seen.append(len(gm.graph.nodes))
        ctx.note("count_nodes", f"{len(gm.graph.nodes)} nodes")
        return gm

    def double_output(gm: fx.GraphModule, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            doubled = gm.graph.call_function(torch.mul, (out.args[0], 2.0))
        out.args = (doubled,)
        gm.recompile()
        return gm

    pm = PassManager(["capture", "canonicalize"])
    pm.insert(count_nodes, after="capture").insert(("double", double_output))
    assert pm.names == ["capture", "count_nodes", "canonicalize", "double"]
    pm.drop("canonicalize")
    pm.replace("count_nodes", count_nodes)
    assert pm.names == ["capture", "count_nodes", "double"]
    model = _model_ready()
    x = torch.randn(1, 3, 6, 6)
    run = pm.run(model, x)
    assert seen and run.ctx.notes["count_nodes"]
    torch.testing.assert_close(run.graph()(x), 2 * model(x))
    torch.testing.assert_close(run.graph("capture")(x), model(x))  # earlier snapshot unaffected


def test_bad_pipelines_are_clear_errors():
    with pytest.raises(PassError, match="unknown pass 'fold_bnn'"):
        PassManager(["capture", "fold_bnn"])
    with pytest.raises(PassError, match="appears twice"):
        PassManager(["capture", "capture"])
    with pytest.raises(PassError, match="expected a torch.fx.GraphModule"):
        PassManager(["capture", ("broken", lambda gm, ctx: None)]).run(_model_ready(), torch.randn(1, 3, 6, 6))


@pytest.mark.parametrize("suffix", ["svg", "png", "pdf", "dot"])
def test_render_writes_each_format(tmp_path, monkeypatch, suffix):
    # As on a fresh machine, no system Graphviz: SVG and PNG come from the renderers qcompiler
    # installs; PDF, which only the system `dot` draws, falls back to the DOT source with a note
    # on how to draw it (tests/test_drawing.py covers the system `dot` and no renderer at all).
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    assert shutil.which("dot") is None
    run = PassManager(["capture", "canonicalize"]).run(_model_ready(), torch.randn(1, 3, 6, 6))
    path = tmp_path / f"g.{suffix}"
    if suffix == "pdf":
        with pytest.raises(DrawingUnavailable, match=r"dot -Tpdf \S*g\.dot -o \S*g\.pdf") as info:
            run.render(str(path), stage="canonicalize")
        assert not path.exists() and info.value.dot_path == str(tmp_path / "g.dot")
        path = tmp_path / "g.dot"
    else:
        assert run.render(str(path), stage="canonicalize") == str(path)
    data = path.read_bytes()
    assert len(data) > 100
    if suffix == "png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        return
    text = data.decode("utf-8")
    assert "conv" in text and "1×4×4×4" in text
    if suffix == "svg":
        assert "<svg" in text and 'class="node"' in text
    else:
        assert text.startswith("digraph")


def test_render_marks_opaque_leaves(tmp_path):
    class Opaque(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Opaque()).eval()
    run = PassManager(["capture", "canonicalize"]).run(model, torch.randn(1, 3, 4, 4))
    src = open(run.render(str(tmp_path / "g.dot")), encoding="utf-8").read()
    assert "opaque: float on host" in src and "box3d" in src
    with pytest.raises(qcompiler.QCompileError, match="must end in"):
        run.render(str(tmp_path / "g.jpeg2000"))
