"""qcompiler.pareto: one sensitivity run for many budgets; every point meets its budget; the
curve is monotone in memory; the CLI writes pareto.png and the table."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "passes"))
from mp_models import calib_batches, small_net  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.cli import main  # noqa: E402


def _evaluation() -> list[torch.Tensor]:
    return [b.flip(-1) for b in calib_batches(n=8, size=16, batch=4)]


@pytest.fixture(scope="module")
def result():
    batches = calib_batches()
    return qcompiler.pareto(small_net(), batches[0][:1], target="npu-int4", calib_data=batches,
                            budgets=[1.0, 0.8, 0.7, 0.01], eval_data=_evaluation(), progress=False)


def test_points_meet_their_budgets_and_share_one_sensitivity_run(result):
    ok = [p for p in result.points if p.status == "OPTIMAL"]
    assert len(ok) == 3
    assert result.points[-1].status == "INFEASIBLE"
    for p in ok:
        assert p.weight_memory_bytes <= p.budget["weight_memory"] * result.default_weight_memory_bytes * (1 + 1e-12)
        # Measured 48.5 to 48.8 dB and 8 of 8 top-1 at every budget: 4-bit weights on two
        # groups of this small net cost little.
        assert p.sqnr_db > 30 and p.top1_agreement >= 7 / 8
    mem = [p.weight_memory_bytes for p in ok]
    pred = [p.predicted for p in ok]
    assert mem == sorted(mem, reverse=True)
    assert pred == sorted(pred)  # less memory, more predicted noise
    assert ok[0].weight_memory_bytes == pytest.approx(result.default_weight_memory_bytes)
    assert "| weight_memory=0.8 |" in result.to_markdown()


def test_a_point_measures_the_model_its_plan_describes(result):
    # At the full budget every group keeps the spec's default: the plain qcompile model. Its
    # SQNR and top-1 agreement, measured here by hand, are the point's.
    batches = calib_batches()
    compiled = qcompiler.qcompile(small_net(), batches[0][:1], target="npu-int4", calib_data=batches, progress=False)
    first = result.points[0]
    assert first.choice == {g.id: g.format_name for g in compiled.plan.groups if g.id in first.choice}
    with torch.no_grad():
        ref = torch.cat([small_net()(b) for b in _evaluation()])
        out = torch.cat([compiled(b) for b in _evaluation()])
    sqnr = 10 * math.log10(float(ref.pow(2).sum()) / float((out - ref).pow(2).sum()))
    assert first.sqnr_db == pytest.approx(sqnr, abs=1e-6)
    assert first.top1_agreement == float((out.argmax(1) == ref.argmax(1)).double().mean())


def test_plot_is_a_png(result, tmp_path):
    path = result.plot(str(tmp_path / "p.png"))
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_pareto_writes_plot_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "passes"))
    calib = torch.cat(calib_batches())
    torch.save(calib, tmp_path / "calib.pt")
    code = main(["pareto", "mp_models:small_net", "--target", "npu-int4", "--calib", str(tmp_path / "calib.pt"),
                 "--budgets", "1.0,0.75", "--out", str(tmp_path / "o"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "o" / "pareto.png").is_file()
    assert "weight_memory=0.75" in (tmp_path / "o" / "pareto.md").read_text()
    assert "OPTIMAL" in out
