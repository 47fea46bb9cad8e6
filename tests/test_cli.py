"""Tests of `qcompile compile`, `qcompile report` and `qcompile demo` (qcompiler/cli.py, qcompiler/demo.py).

The factories named on the command line (`test_cli:tiny_model` ...) live in this module; each test
that uses them puts the tests directory on sys.path, as a user's own module would be.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import CalibrationError, qcompile
from qcompiler.cli import (
    BudgetError, CommandLineError, compile_report_markdown, load_calib, main, parse_budget, parse_input_shape,
)
from qcompiler.demo import DemoResult, agreement_stats, results_table, run_demo
from qcompiler.targets import list_targets

HERE = Path(__file__).resolve().parent
SHAPE = (3, 16, 16)

NOT_CALLABLE = 42


# ---------------------------------------------------------------------------------------------
# Factories the command line imports
# ---------------------------------------------------------------------------------------------

def tiny_model() -> nn.Module:
    """Conv-BN-ReLU, a residual conv, pooling and a classifier; the same weights on every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyNet()


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


def not_a_model() -> dict:
    return {"conv": 1}


def broken_model() -> nn.Module:
    raise RuntimeError("weights file missing")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _calib(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture(scope="module")
def compile_run(tmp_path_factory):
    """One `qcompile compile` with a calibration file, shared by the tests that read its output."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(HERE))
    # No system Graphviz on PATH, as on a fresh machine: the drawings come from the in-process renderer.
    mp.setenv("PATH", str(tmp_path_factory.mktemp("no-programs")))
    try:
        tmp = tmp_path_factory.mktemp("compile")
        calib_path = tmp / "calib.pt"
        torch.save(_calib(), calib_path)
        out = tmp / "out"
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["compile", "test_cli:tiny_model", "--target", "npu-int8", "--calib", str(calib_path),
                         "--seed", "3", "--no-progress", "--out", str(out)])
    finally:
        mp.undo()
    return {"code": code, "out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "calib": calib_path}


def _run_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err and captured.out == ""
    # Warnings (e.g. about random calibration data) may come first; then one error message.
    lines = captured.err.splitlines()
    first_error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert all(line.startswith("warning: ") for line in lines[:first_error])
    assert captured.err.count("error: ") == 1
    return "\n".join(lines[first_error:])


# ---------------------------------------------------------------------------------------------
# qcompile compile
# ---------------------------------------------------------------------------------------------

def test_compile_writes_every_output(compile_run):
    assert compile_run["code"] == 0, compile_run["stderr"]
    out = compile_run["out"]
    for name in ("model/model.json", "model/tensors.safetensors", "report.md", "graph.svg", "graph_groups.svg"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert report.startswith("## qcompiler report: target npu-int8")
    assert "## Compile time" in report and "| pass | seconds |" in report
    for stage in qcompiler.api.DEFAULT_PASSES:
        assert f"| {stage} | " in report
    # The final graph is labelled and coloured by format (8-bit green), the groups drawing by group.
    final_svg = (out / "graph.svg").read_text()
    groups_svg = (out / "graph_groups.svg").read_text()
    assert "<svg" in final_svg and "out: int8" in final_svg and "#95d5b2" in final_svg
    assert "group 1" in groups_svg and "group 1" not in final_svg
    # No --calib warning when a file was given.
    assert "warning" not in compile_run["stderr"]


def test_compiled_model_matches_a_fresh_qcompile_with_the_same_seed(compile_run):
    calib = torch.load(compile_run["calib"], weights_only=True)
    fresh = qcompile(tiny_model(), calib[:1], target="npu-int8", calib_data=list(calib.split(32)),
                     seed=3, progress=False)
    loaded = qcompiler.load(compile_run["out"] / "model")
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = fresh(x)
        assert torch.equal(loaded(x), expected)
        # It is quantized, not the float model.
        assert not torch.equal(expected, tiny_model()(x))
    summary = compile_run["stdout"]
    assert "npu-int8" in summary
    assert f"quantizer groups: {len(fresh.plan.groups)} " in summary
    assert f"{fresh.weight_memory_bytes:.0f} B" in summary
    for name in ("report.md", "graph.svg", "graph_groups.svg", "model"):
        assert str(compile_run["out"] / name) in summary


def test_compile_without_calib_uses_seeded_random_data_and_warns(tmp_path, on_path, capsys):
    out = tmp_path / "out"
    code = main(["compile", "test_cli:tiny_model", "--target", "npu-int8", "--input-shape", "2,3,16,16",
                 "--seed", "5", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.startswith("warning: no --calib given") and "meaningless" in captured.err
    assert "[2, 3, 16, 16]" in captured.err
    example = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    fresh = qcompile(tiny_model(), example, target="npu-int8", calib_data=[example], seed=5, progress=False)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(qcompiler.load(out / "model")(x), fresh(x))


def test_compile_with_block_reconstruction_matches_qcompile(tmp_path, on_path, capsys):
    calib = _calib(16)
    torch.save(calib, tmp_path / "calib.pt")
    out = tmp_path / "out"
    code = main(["compile", "test_cli:tiny_model", "--target", "npu-int4", "--calib", str(tmp_path / "calib.pt"),
                 "--reconstruction", "block", "--seed", "2", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    fresh = qcompile(tiny_model(), calib[:1], target="npu-int4", calib_data=list(calib.split(32)), seed=2,
                     progress=False, reconstruction="block")
    layer = qcompile(tiny_model(), calib[:1], target="npu-int4", calib_data=list(calib.split(32)), seed=2,
                     progress=False)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(qcompiler.load(out / "model")(x), fresh(x))
    # Whether a block beats its per-layer start depends on the data; that the blocks ran, the
    # report says (a layer-only compile's report has no such line).
    assert "reconstruction: 3 blocks, 3 kernels" in (out / "report.md").read_text()
    assert "reconstruction:" not in compile_report_markdown(layer)


def test_compile_with_fast_effort_matches_qcompile(tmp_path, on_path, capsys):
    calib = _calib(96)  # "fast" calibrates on the first 64
    torch.save(calib, tmp_path / "calib.pt")
    out = tmp_path / "out"
    code = main(["compile", "test_cli:tiny_model", "--target", "npu-int4", "--calib", str(tmp_path / "calib.pt"),
                 "--effort", "fast", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    fast = qcompile(tiny_model(), calib[:1], target="npu-int4", calib_data=list(calib.split(32)), progress=False,
                    effort="fast")
    default = qcompile(tiny_model(), calib[:1], target="npu-int4", calib_data=list(calib.split(32)), progress=False)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(qcompiler.load(out / "model")(x), fast(x))
        assert not torch.equal(fast(x), default(x))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["compile", "test_cli:tiny_model", "--target", "npu-int4", "--effort", "quick", "--out", str(tmp_path / "o2")])
    assert exc.value.code == 2 and "invalid choice: 'quick'" in capsys.readouterr().err


def test_compile_with_a_quality_target_matches_qcompile(tmp_path, on_path, capsys):
    calib, validation = _calib(16), _calib(8, seed=3)
    torch.save(calib, tmp_path / "calib.pt")
    torch.save(validation, tmp_path / "val.pt")
    out = tmp_path / "out"
    code = main(["compile", "test_cli:tiny_model", "--target", "npu-int4", "--calib", str(tmp_path / "calib.pt"),
                 "--validation", str(tmp_path / "val.pt"), "--target-quality", "sqnr_db=20, cost=weight_memory",
                 "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    fresh = qcompile(tiny_model(), calib[:1], target="npu-int4", calib_data=list(calib.split(32)), progress=False,
                     validation_data=[validation], target_quality={"sqnr_db": 20.0})
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(qcompiler.load(out / "model")(x), fresh(x))
    assert "accuracy target: sqnr_db >= 20 dB" in (out / "report.md").read_text()
    capsys.readouterr()
    err = _run_error(capsys, ["compile", "test_cli:tiny_model", "--target", "npu-int4", "--target-quality",
                              "sqnr_db", "--out", str(tmp_path / "o2")])
    assert "is not KEY=VALUE" in err
    err = _run_error(capsys, ["compile", "test_cli:tiny_model", "--target", "npu-int4", "--target-quality",
                              "sqnr_db=20", "--budget", "weight_memory=0.8", "--out", str(tmp_path / "o3")])
    assert "either --budget or --target-quality" in err


def test_report_prints_the_table(compile_run, capsys):
    assert main(["report", str(compile_run["out"])]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "target npu-int8"
    assert lines[1].split()[:3] == ["node", "op", "group"]
    kinds = [line.split()[1] for line in lines[3:] if line and not line.startswith(("weight", "average", "float", "quantizer", "("))]
    # conv+BN+ReLU fuses, conv2+add+ReLU fuses, then the pool and the classifier.
    assert kinds == ["conv+relu", "conv+add+relu", "adaptive_avg_pool", "linear"]
    assert "quantizer groups:" in text and "report.md has the values measured at compile time" in text
    # A saved-model directory itself is accepted too.
    assert main(["report", str(compile_run["out"] / "model")]) == 0
    assert capsys.readouterr().out.splitlines()[:3] == lines[:3]


# ---------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit code 2, no traceback
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, fragment", [
    ("test_cli.tiny_model", "is not of the form MODULE:FACTORY"),
    ("test_cli:", "is not of the form MODULE:FACTORY"),
    ("no_such_module_qc7:build", "no module named 'no_such_module_qc7'"),
    ("test_cli:tiny_modle", "has no attribute 'tiny_modle' (from 'test_cli:tiny_modle'); did you mean 'tiny_model'"),
    ("test_cli:NOT_CALLABLE", "is not callable (it is of type int)"),
    ("test_cli:not_a_model", "test_cli:not_a_model() returned a dict, not a torch.nn.Module"),
    ("test_cli:broken_model", "raised RuntimeError: weights file missing"),
])
def test_bad_model_factories(model, fragment, tmp_path, on_path, capsys):
    err = _run_error(capsys, ["compile", model, "--target", "npu-int8", "--input-shape", "1,3,16,16",
                              "--out", str(tmp_path / "o")])
    assert fragment in err
    assert not (tmp_path / "o").exists()


def test_unknown_target_lists_known_targets(tmp_path, on_path, capsys):
    err = _run_error(capsys, ["compile", "test_cli:tiny_model", "--target", "npu-int9", "--out", str(tmp_path)])
    assert "unknown target 'npu-int9'" in err
    for name in list_targets():
        assert name in err


@pytest.mark.parametrize("argv_tail, fragment", [
    (["--budget", "weight_memory=1B"], "below the smallest feasible value"),
    (["--budget", "weight_memory=1MB,weight_memory=2MB"], "given twice"),
    (["--budget", "weight_memory=1.5XB"], "unknown unit 'XB'"),
    (["--budget", "1.5MiB"], "METRIC=VALUE"),
    (["--budget", "no_such_metric=2"], "target 'npu-int8' has no cost metric 'no_such_metric'"),
    (["--budget", "weight_memory=1MB", "--budget", "weight_memory=2MB"], "given twice"),
    (["--input-shape", "1,3,x"], "--input-shape '1,3,x' is not a shape"),
    (["--input-shape", "1,0,16,16"], "is not a shape"),
    (["--observer", "no_such_observer"], "unknown observer 'no_such_observer'"),
])
def test_bad_options(argv_tail, fragment, tmp_path, on_path, capsys):
    argv = ["compile", "test_cli:tiny_model", "--target", "npu-int8", "--out", str(tmp_path / "o"), "--no-progress"]
    if "--input-shape" not in argv_tail:
        argv += ["--input-shape", "1,3,16,16"]
    err = _run_error(capsys, argv + argv_tail)
    assert fragment in err


def test_calib_file_with_nan_is_a_calibration_error(tmp_path, on_path, capsys):
    data = _calib(10)
    data[4, 1, 2, 3] = float("nan")
    data[7, 0, 0, 0] = float("inf")
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    with pytest.raises(CalibrationError, match="2 NaN or Inf value"):
        load_calib(str(path))
    err = _run_error(capsys, ["compile", "test_cli:tiny_model", "--target", "npu-int8", "--calib", str(path),
                              "--out", str(tmp_path / "o")])
    assert str(path) in err and "2 NaN or Inf value(s) out of 7680" in err


@pytest.mark.parametrize("content, fragment", [
    ({"x": torch.zeros(2)}, "holds a dict, not a tensor"),
    (torch.zeros(0, 3), "at least one sample"),
    (None, "does not exist"),
])
def test_bad_calib_files(content, fragment, tmp_path, on_path, capsys):
    path = tmp_path / "calib.pt"
    if content is not None:
        torch.save(content, path)
    err = _run_error(capsys, ["compile", "test_cli:tiny_model", "--target", "npu-int8", "--calib", str(path),
                              "--out", str(tmp_path / "o")])
    assert fragment in err


def test_calib_shape_must_match_input_shape(tmp_path, on_path, capsys):
    path = tmp_path / "calib.pt"
    torch.save(_calib(4), path)
    err = _run_error(capsys, ["compile", "test_cli:tiny_model", "--target", "npu-int8", "--calib", str(path),
                              "--input-shape", "1,3,8,8", "--out", str(tmp_path / "o")])
    assert "have shape (3, 16, 16)" in err


def test_out_must_not_be_a_file(tmp_path, on_path, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    err = _run_error(capsys, ["compile", "test_cli:tiny_model", "--target", "npu-int8", "--out", str(file)])
    assert "is a file" in err


def test_report_of_something_that_is_not_a_compile_output(tmp_path, capsys):
    assert "is not a directory" in _run_error(capsys, ["report", str(tmp_path / "missing")])
    (tmp_path / "other.txt").write_text("hello")
    assert "is not a compile output" in _run_error(capsys, ["report", str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# Argument parsers, against hand-computed values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("weight_memory=1.5MiB", ("weight_memory", 1.5 * 1024 * 1024)),
    ("weight_memory = 2 KiB", ("weight_memory", 2048.0)),
    ("weight_memory=2KB", ("weight_memory", 2000.0)),
    ("weight_memory=3MB", ("weight_memory", 3_000_000.0)),
    ("weight_memory=100B", ("weight_memory", 100.0)),
    ("bops=0.5", ("bops", 0.5)),
    ("latency=.25", ("latency", 0.25)),
    ("bops=1e9", ("bops", 1e9)),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["=5", "weight_memory=", "weight_memory=-1", "weight_memory=0",
                                  "weight_memory=1.5 Mib Mib", "1w=5", "weight_memory=1.5furlongs"])
def test_parse_budget_rejects(text):
    with pytest.raises(BudgetError):
        parse_budget(text)


def test_parse_input_shape():
    assert parse_input_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_input_shape(" 2, 3 ,8 ") == (2, 3, 8)
    for bad in ("", "1,,3", "1,3,-4", "1.5,3", "a"):
        with pytest.raises(CommandLineError):
            parse_input_shape(bad)


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------

def test_agreement_stats_hand_computed():
    # Three samples, six classes. Float top-1: 0, 1, 2; the first two are confident
    # (softmax of a logit 10 above five zeros is ~0.9997), the third is not (all equal but one 0.1).
    ref = torch.zeros(3, 6)
    ref[0, 0] = 10.0
    ref[1, 1] = 10.0
    ref[2, 2] = 0.1
    out = ref.clone()
    out[1, 5] = 11.0          # sample 1: top-1 flips to class 5, class 1 still in the top-5
    out[2, 2] = -1.0          # sample 2: class 2 drops to last place, out of the top-5
    stats = agreement_stats(ref, out)
    assert stats.top1 == pytest.approx(1 / 3)
    assert stats.top5 == pytest.approx(2 / 3)
    assert stats.confident_count == 2 and stats.confident_top1 == pytest.approx(1 / 2)
    signal = 100 + 100 + 0.01
    noise = 11.0 ** 2 + 1.1 ** 2
    assert stats.sqnr_db == pytest.approx(10 * math.log10(signal / noise))
    same = agreement_stats(ref, ref)
    assert math.isinf(same.sqnr_db) and same.top1 == same.top5 == 1.0
    assert math.isnan(agreement_stats(torch.zeros(2, 4), torch.zeros(2, 4)).confident_top1)


def test_run_demo_small(tmp_path):
    results = run_demo(["npu-int8"], n_calib=8, n_heldout=16, out_dir=tmp_path, progress=False)
    assert len(results) == 1
    r = results[0]
    assert isinstance(r, DemoResult) and r.target == "npu-int8" and r.n_heldout == 16
    # The figures are the float and the compiled model's on the held-out crops: recompute them.
    from qcompiler.demo import CONFIDENT_SOFTMAX, logits_in_chunks
    from qcompiler.sample_data import sample_crops
    from qcompiler.zoo import efficientnet_lite0

    heldout = sample_crops(16, seed=0, split="heldout")
    ref = logits_in_chunks(efficientnet_lite0().eval(), heldout)
    assert r.confident_count == int((ref.softmax(1).amax(1) >= CONFIDENT_SOFTMAX).sum())
    if r.model_dir is not None:
        again = agreement_stats(ref, logits_in_chunks(qcompiler.load(r.model_dir), heldout))
        assert (r.top1_agreement, r.top5_agreement, r.confident_top1_agreement) == pytest.approx(
            (again.top1, again.top5, again.confident_top1), nan_ok=True)
    # W8A8 keeps the float model's top-1 on most crops (15 of 16 measured) and its top-5 on all.
    assert r.top1_agreement >= 0.75 and r.top5_agreement >= 0.9
    # 8-bit weights and activations keep the logits well above the noise.
    assert math.isfinite(r.sqnr_db) and r.sqnr_db > 10
    # 4,652,008 float32 parameters (benchmarks/float_baseline.md); int8 weights take about a quarter.
    assert r.float_weight_memory_bytes == 4_652_008 * 4
    assert 0.2 < r.weight_memory_bytes / r.float_weight_memory_bytes < 0.3
    assert r.compile_seconds > 0
    assert Path(r.graph_path) == tmp_path / "npu-int8.svg" and "<svg" in Path(r.graph_path).read_text()
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# qcompiler demo: EfficientNet-Lite0")
    assert "| npu-int8 |" in report and "## qcompiler report: target npu-int8" in report
    if r.model_dir is not None:
        assert r.save_error is None and (Path(r.model_dir) / "model.json").is_file()
    else:  # the artifact format cannot hold every module yet: said in the result and the report
        assert r.save_error and r.save_error in report


def _fake_result(target: str) -> DemoResult:
    return DemoResult(target=target, n_heldout=10, top1_agreement=0.9, top5_agreement=1.0,
                      confident_top1_agreement=math.nan, confident_count=0, sqnr_db=21.04,
                      weight_memory_bytes=2**20, float_weight_memory_bytes=4 * 2**20,
                      compile_seconds=3.0, graph_path=f"{target}.svg", model_dir=None, save_error=None)


def test_demo_command_passes_options_and_prints_the_table(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake_run_demo(targets, n_calib, n_heldout, out_dir, progress=True, echo=None):
        seen.update(targets=targets, n_calib=n_calib, n_heldout=n_heldout, out_dir=out_dir, progress=progress)
        return [_fake_result(t) for t in targets]

    monkeypatch.setattr("qcompiler.demo.run_demo", fake_run_demo)
    assert main(["demo", "--targets", "npu-int8, npu-int4", "--calib", "12", "--heldout", "30",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen == {"targets": ["npu-int8", "npu-int4"], "n_calib": 12, "n_heldout": 30,
                    "out_dir": str(tmp_path), "progress": False}
    out = capsys.readouterr().out
    assert out.startswith(results_table([_fake_result("npu-int8"), _fake_result("npu-int4")]))
    row = next(line for line in out.splitlines() if line.startswith("npu-int4"))
    assert row.split() == ["npu-int4", "90.0", "%", "100.0", "%", "n/a", "(0)", "21.0", "1.00", "MiB",
                           "4.0x", "smaller", "3.0"]

    main(["demo"])
    assert seen["targets"] == ["npu-int8", "npu-int4", "cpu-x86-int8"]
    assert (seen["n_calib"], seen["n_heldout"], seen["progress"]) == (256, 500, True)


def test_demo_command_errors(capsys, tmp_path):
    # Targets are checked before anything is loaded or compiled.
    err = _run_error(capsys, ["demo", "--targets", "npu-int8,npu-int9", "--out", str(tmp_path)])
    assert "unknown target 'npu-int9'" in err
    with pytest.raises(SystemExit) as info:
        main(["demo", "--calib", "0"])
    assert info.value.code == 2
