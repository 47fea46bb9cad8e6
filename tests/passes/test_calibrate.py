"""Tests of passes/calibrate.py: every observer sees exactly the calibration data, and bad data
is refused with an error that names the batch.

The reference is the float graph run by torch.fx's own Interpreter, batch by batch: each
group's range must be the minimum and maximum of its tensors over all batches, computed by hand.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

sys.path.insert(0, str(Path(__file__).parent))
from mp_models import Branches, calib_batches, small_net  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler import CalibrationError, CompileContext, PassManager  # noqa: E402
from qcompiler.fx_util import snapshot  # noqa: E402
from qcompiler.calibration import calibration_batches  # noqa: E402
from qcompiler.passes.calibrate import calibrate  # noqa: E402

GROUPED = ["capture", "canonicalize", "fold_bn", "fuse", "group_quantizers"]


def _observed(model: nn.Module, batches, target: str = "npu-int8", observer="minmax"):
    """(float graph with groups, observed graph, ctx): calibrate not yet run."""
    run = PassManager(GROUPED).run(model, batches[0][:1], target=qcompiler.load_target(target),
                                   calib_data=batches, observer=observer, progress=False)
    float_gm = snapshot(run.gm)
    gm = PassManager(["insert_observers"]).run(run.gm, ctx=run.ctx).gm
    return float_gm, gm, run.ctx


def _node_outputs(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's output on `x`, by node name (torch.fx's Interpreter, not our replay code)."""
    seen: dict[str, torch.Tensor] = {}

    class Record(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            seen[n.name] = out
            return out

    with torch.no_grad():
        Record(gm).run(x)
    return seen


@pytest.mark.parametrize("model_fn", [small_net, lambda: Branches().eval()], ids=["small_net", "branches"])
def test_each_group_range_is_the_min_and_max_of_its_tensors_over_every_batch(model_fn):
    model = model_fn()
    batches = calib_batches(n=10, size=16, batch=3)  # 3 + 3 + 3 + 1 samples: an uneven last batch
    float_gm, gm, ctx = _observed(model, batches)
    calibrate(gm, ctx)
    assert [b[0].shape[0] for b in ctx.calib_batches] == [3, 3, 3, 1]
    # The reference runs what the observers saw: the batches in the layout the pass chose.
    assert all(torch.equal(b, c[0]) for b, c in zip(batches, ctx.calib_batches))
    outputs = [_node_outputs(float_gm, b[0]) for b in ctx.calib_batches]
    for gid, observer in ctx.observers.items():
        group = ctx.groups[gid]
        assert observer.batches == len(batches) * len(group.tensors)
        values = torch.cat([o[t].reshape(-1) for o in outputs for t in group.tensors])
        lo, hi = observer.compute_range()
        assert float(lo) == float(values.min()) and float(hi) == float(values.max()), group.tensors
    # The stubs only watch: the calibrated graph computes what the float graph computes.
    torch.testing.assert_close(gm(batches[0]), float_gm(batches[0]), rtol=0, atol=0)


def test_dropping_a_batch_would_show():
    # The same check is sensitive to the data: calibrating on all but the last batch gives
    # another range for at least one group (the hand computation above is not vacuous).
    batches = calib_batches(n=12, size=16, batch=4)
    _, gm_all, ctx_all = _observed(small_net(), batches)
    _, gm_some, ctx_some = _observed(small_net(), batches[:-1])
    calibrate(gm_all, ctx_all)
    calibrate(gm_some, ctx_some)
    ranges = lambda ctx: [tuple(float(v) for v in o.compute_range()) for o in ctx.observers.values()]
    assert ranges(ctx_all) != ranges(ctx_some)


def test_batches_are_materialised_once_and_shared_with_later_passes():
    batches = calib_batches(n=8, size=16, batch=4)
    consumed = []

    def once():  # a generator: it can be iterated only once
        for b in batches:
            consumed.append(b)
            yield b

    _, gm, ctx = _observed(small_net(), batches)
    ctx.calib_data = once()
    ctx.calib_batches = None
    calibrate(gm, ctx)
    assert len(consumed) == 2 and len(ctx.calib_batches) == 2
    assert all(torch.equal(b[0], c) for b, c in zip(ctx.calib_batches, consumed))
    # Calibrating again reuses the stored batches: the observers see them a second time.
    calibrate(gm, ctx)
    assert all(o.batches == 2 * 2 for o in ctx.observers.values())  # one tensor per group here


def test_batch_forms_tuples_with_labels_and_dicts():
    x = torch.randn(4, 3, 8, 8)
    labels = torch.arange(4)
    [batch] = calibration_batches([(x, labels)], (x,), ["x"])   # the label is dropped
    assert len(batch) == 1 and batch[0] is x
    [batch] = calibration_batches([{"extra": labels, "x": x}], (x,), ["x"])
    assert len(batch) == 1 and batch[0] is x
    batches = calibration_batches([x, x[:2]], (x,), ["x"])
    assert [len(b) for b in batches] == [1, 1] and batches[0][0] is x and batches[1][0].shape[0] == 2
    with pytest.warns(UserWarning, match="no calib_data given"):
        [batch] = calibration_batches(None, (x,), ["x"])   # the example inputs alone
    assert batch[0] is x


@pytest.mark.parametrize("data,message", [
    ([], "calibration data is empty"),
    (iter(()), "calibration data is empty"),
    (torch.randn(4, 3, 8, 8), "single tensor; give an iterable of batches"),
    (42, "must be iterable"),
    ([torch.randn(2, 3, 8, 8), "text"], "calibration batch 1 is a str"),
    ([torch.randn(2, 3, 8, 8), {"y": torch.randn(1)}], r"calibration batch 1 is a dict without the model input\(s\) \['x'\]"),
    ([torch.randn(2, 3, 8, 8), ()], "calibration batch 1 holds no tensor"),
])
def test_bad_calibration_data_is_a_clear_error(data, message):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(CalibrationError, match=message):
        calibration_batches(data, (x,), ["x"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_names_the_batch_and_the_count(bad):
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    batches[2][1, 0, 3, 3] = bad
    batches[2][0, 2, 0, 0] = bad
    with pytest.raises(CalibrationError, match=r"calibration batch 2 contains 2 NaN or Inf value\(s\)"):
        calibration_batches(batches, (batches[0],), ["x"])


def test_through_the_pass_nan_data_stops_before_any_observer_sees_it():
    batches = calib_batches(n=8, size=16, batch=4)
    _, gm, ctx = _observed(small_net(), batches)
    bad = [b.clone() for b in batches]
    bad[1][0, 0, 0, 0] = float("nan")
    ctx.calib_data, ctx.calib_batches = bad, None
    with pytest.raises(CalibrationError, match="calibration batch 1 contains 1 NaN"):
        calibrate(gm, ctx)
    assert all(o.batches == 0 for o in ctx.observers.values())


def test_data_that_does_not_fit_the_model_names_the_shapes():
    batches = calib_batches(n=4, size=16, batch=4)
    _, gm, ctx = _observed(small_net(), batches)
    ctx.calib_data, ctx.calib_batches = [torch.randn(4, 5, 16, 16)], None  # 5 channels, the model takes 3
    with pytest.raises(CalibrationError, match=r"first batch shapes \[\(4, 5, 16, 16\)\].*shape of example_inputs"):
        calibrate(gm, ctx)


def flatten_by_view(y: torch.Tensor) -> torch.Tensor:
    return y.view(y.size(0), -1)


torch.fx.wrap("flatten_by_view")   # kept whole by the tracer: its `.view` reaches the graph as is


class FlattensWithView(nn.Module):
    """Flattens with `.view` inside a function the tracer keeps whole: the view fails on a
    channels-last activation (channels and pixels cannot be merged without a copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(flatten_by_view(self.conv(x)))


class ReadsStrides(nn.Module):
    """Reads its activation's memory as if it were NCHW: channels-last gives other values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.as_strided(y, y.shape, (y.shape[1] * y.shape[2] * y.shape[3], y.shape[2] * y.shape[3], y.shape[3], 1))


def test_image_batches_are_replayed_channels_last_with_the_same_values():
    batches = calib_batches(n=8, size=16, batch=4)
    _, gm, ctx = _observed(small_net(), batches)
    calibrate(gm, ctx)
    assert ctx.channels_last
    for given, kept in zip(batches, ctx.calib_batches):
        assert kept[0].is_contiguous(memory_format=torch.channels_last) and not kept[0].is_contiguous()
        assert torch.equal(given, kept[0])
    assert batches[0].is_contiguous()   # the user's tensors are not touched


@pytest.mark.parametrize("model", [FlattensWithView(), ReadsStrides()], ids=["view_fails", "strides_differ"])
def test_a_forward_that_depends_on_the_layout_keeps_the_users(model):
    batches = calib_batches(n=8, size=16, batch=4)
    with torch.no_grad():   # the premise: channels-last fails or changes this forward's output
        x = batches[0]
        try:
            moved = model(x.contiguous(memory_format=torch.channels_last))
            assert not torch.allclose(moved, model(x), atol=1e-3)
        except RuntimeError as exc:
            assert "view" in str(exc)
    _, gm, ctx = _observed(model.eval(), batches)
    calibrate(gm, ctx)
    assert not ctx.channels_last
    assert all(b[0] is c for b, c in zip(ctx.calib_batches, batches))
    assert all(o.batches > 0 for o in ctx.observers.values())


def test_inputs_without_images_keep_their_layout_and_the_probe_leaves_observers_alone():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    batches = [torch.randn(4, 6) for _ in range(2)]
    _, gm, ctx = _observed(model, batches)
    calibrate(gm, ctx)
    assert not ctx.channels_last and all(b[0] is c for b, c in zip(ctx.calib_batches, batches))
    # The probe of an image model runs the graph once more: its observers must not count it.
    images = calib_batches(n=8, size=16, batch=4)
    _, gm, ctx = _observed(small_net(), images)
    calibrate(gm, ctx)
    assert ctx.channels_last and all(o.batches == len(images) for o in ctx.observers.values())
