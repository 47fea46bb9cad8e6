"""The benchmark scripts' shared machinery (benchmarks/common.py) and their command lines.

A quick run of every script takes minutes, too long for the suite; these tests check what makes a
published table reproducible: the header (commit, dirty flag, pipeline, exact command), the
timing summary, the clustered agreement, and that every script parses its command line.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
common = importlib.import_module("common")

SCRIPTS = ("adaround_schedule", "defaults", "detection", "effnet", "float_baseline", "mixed_precision", "onnx_export", "pipeline_timing",
           "reference_backend", "segmentation", "sensitivity_samples", "speed", "zoo_sweep", "minilm", "vit", "quality_paired")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_git_revision_marks_a_dirty_tree(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "bench@example.com")
    _git(tmp_path, "config", "user.name", "bench")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "a.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "a.md").write_text("# old table\n")
    (tmp_path / "README.md").write_text("# readme\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    head = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert common.git_revision(tmp_path) == head
    (tmp_path / "notes.txt").write_text("untracked, outside the code directories")
    assert common.git_revision(tmp_path) == head
    (tmp_path / "benchmarks" / "a.md").write_text("# a benchmark's fresh output\n")
    (tmp_path / "README.md").write_text("# readme quoting it\n")
    assert common.git_revision(tmp_path) == head                     # Markdown cannot change a figure
    (tmp_path / "benchmarks" / "new.py").write_text("y = 2\n")       # an uncommitted benchmark
    assert common.git_revision(tmp_path) == head + "-dirty"
    (tmp_path / "benchmarks" / "new.py").unlink()
    (tmp_path / "benchmarks" / "a.py").write_text("x = 2\n")          # an edited tracked file
    assert common.git_revision(tmp_path) == head + "-dirty"


def test_header_names_commit_pipeline_and_command():
    from qcompiler.api import DEFAULT_PASSES

    text = common.header("Title", "/anywhere/benchmarks/effnet.py", ["--calib", "64", "--out", "a b.md"])
    head = _git(BENCHMARKS.parent, "rev-parse", "--short", "HEAD")
    assert text.startswith("# Title\n")
    assert "`python benchmarks/effnet.py --calib 64 --out 'a b.md'`" in text   # shell-quoted, runnable
    assert f"at commit `{head}" in text
    assert "Pipeline: " + " → ".join(DEFAULT_PASSES) + "." in text
    assert "Pipeline" not in common.header("T", "x.py", [], passes=None)


def test_spread_reports_median_and_range_never_the_best_run():
    assert common.spread([3.0, 1.0, 2.0, 10.0, 2.5], "x") == "2.50x (1.00-10.00, 5 rounds)"
    assert common.spread([4.0], " s", 1) == "4.0 s (4.0-4.0, 1 rounds)"


def test_out_path_quick_prints_unless_told(tmp_path):
    ap = common.parser("benchmarks/effnet.py", "d")
    assert common.out_path("effnet.py", ap.parse_args([])) == BENCHMARKS / "effnet.md"
    assert common.out_path("effnet.py", ap.parse_args(["--quick"])) is None
    explicit = ap.parse_args(["--quick", "--out", str(tmp_path / "q.md")])
    assert common.out_path("effnet.py", explicit) == tmp_path / "q.md"


def test_agreement_counts_hits_per_photo():
    ref = torch.zeros(6, 3)
    ref[:, 0] = 1.0                                   # float says class 0 everywhere
    out = ref.clone()
    out[4:, 2] = 2.0                                  # the two crops of photo "c" flip
    res = common.agreement(ref, out, ["a", "a", "b", "b", "c", "c"])
    assert res.top1_rate == pytest.approx(4 / 6) and res.hits == (True,) * 4 + (False,) * 2
    assert res.top1.clusters == 3 and res.top1.icc == pytest.approx(1.0)
    assert res.cell().startswith("66.7 % [")
    noise = float((out - ref).pow(2).sum())
    assert res.sqnr_db == pytest.approx(10 * np.log10(6.0 / noise))
    single = common.agreement(ref, out, ["a"] * 6)   # one photo: no interval to give
    assert single.top1 is None and single.cell() == "66.7 %"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_has_a_command_line_with_quick_and_out(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    usage = capsys.readouterr().out
    assert "--quick" in usage and "--out" in usage and f"benchmarks/{name}.py" in usage
    with pytest.raises(SystemExit) as info:
        module.main(["--no-such-option"])
    assert info.value.code == 2
