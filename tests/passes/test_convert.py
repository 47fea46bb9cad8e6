"""Tests of passes/convert.py: observers become frozen fake-quantizers, weights become what the
target stores, and the plan records every group's chosen format and parameters.

References are computed by hand here: a min-max asymmetric int8 range gives
scale = (max - min) / 255 and zero point = -128 - round(min / scale); a symmetric narrow-range
int8 weight channel gives scale = max|w| / 127 and codes round(w / scale) in [-127, 127].
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

sys.path.insert(0, str(Path(__file__).parent))
from mp_models import calib_batches, small_net  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler import PassManager, QCompileError  # noqa: E402
from qcompiler.formats import HostFloat  # noqa: E402
from qcompiler.fx_util import snapshot  # noqa: E402
from qcompiler.passes.convert import convert  # noqa: E402
from qcompiler.quantizers import FakeQuantize, ObserverStub  # noqa: E402

CALIBRATED = ["capture", "canonicalize", "fold_bn", "fuse", "group_quantizers", "insert_observers", "calibrate"]


class UpNet(nn.Module):
    """A conv, then a transposed conv (weights [in, out, k, k]: output channels on axis 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)))


def _calibrated(model: nn.Module, target: str = "npu-int8", batches=None):
    batches = batches or calib_batches(n=8, size=16, batch=4)
    run = PassManager(CALIBRATED).run(model, batches[0][:1], target=qcompiler.load_target(target),
                                      calib_data=batches, observer="minmax", progress=False)
    return run, batches


def _float_outputs(gm: fx.GraphModule, batches) -> dict[str, torch.Tensor]:
    """Every node's output over all batches (concatenated), by torch.fx's own Interpreter."""
    seen: dict[str, list[torch.Tensor]] = {}

    class Record(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            seen.setdefault(n.name, []).append(out)
            return out

    with torch.no_grad():
        for b in batches:
            Record(gm).run(b)
    return {k: torch.cat([v.reshape(-1) for v in vs]) for k, vs in seen.items() if isinstance(vs[0], torch.Tensor)}


def test_activation_quantizers_are_the_hand_computed_int8_grids():
    run, batches = _calibrated(small_net())
    float_gm = run.graph("fuse")
    values = _float_outputs(float_gm, batches)
    gm = convert(run.gm, run.ctx)
    stubs = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("qobs_")]
    assert stubs and not any(isinstance(m, ObserverStub) for m in gm.modules())
    probe = torch.linspace(-8, 8, 1001)
    for node in stubs:
        fq = gm.get_submodule(node.target)
        assert isinstance(fq, FakeQuantize) and fq.fmt.name == "int8_asym"
        seen = values[node.args[0].name]
        lo, hi = min(float(seen.min()), 0.0), max(float(seen.max()), 0.0)
        scale = (hi - lo) / 255
        zero_point = max(-128, min(127, -128 - round(lo / scale)))
        assert float(fq.params.scale) == pytest.approx(scale, rel=1e-6), node.name
        assert int(fq.params.zero_point) == zero_point, node.name
        # The quantizer rounds to that grid and saturates at its ends.
        s, z = fq.params.scale.float(), fq.params.zero_point.float()
        codes = torch.clamp(torch.round(probe / s) + z, -128, 127)
        assert torch.equal(fq(probe), (codes - z) * s), node.name
        assert node.meta["format"] == "int8_asym"


def test_weights_are_decoded_codes_of_the_hand_computed_per_channel_scales():
    run, _ = _calibrated(small_net())
    float_gm = snapshot(run.graph("fuse"))
    before = {n.target: run.gm.get_submodule(n.target) for n in run.gm.graph.nodes if "weight_group" in n.meta}
    gm = convert(run.gm, run.ctx)
    plan = run.ctx.plan
    weight_groups = [g for g in plan.groups if g.kind == "weight"]
    assert [g.owner for g in weight_groups] == ["c1", "c2", "c3", "c4", "fc"]
    for g in weight_groups:
        w = float_gm.get_submodule(g.owner).weight.detach()
        rows = w.reshape(w.shape[0], -1)
        scale = rows.abs().amax(1) / 127                                  # narrow range: +-127
        assert g.format_name == "w8" and g.params.axis == 0
        torch.testing.assert_close(g.params.scale, scale, rtol=1e-6, atol=0)
        view = (-1,) + (1,) * (w.ndim - 1)
        s = g.params.scale.reshape(view)
        expected = torch.clamp(torch.round(w / s), -127, 127) * s
        q = gm.get_submodule(g.owner).weight.detach()
        assert torch.equal(q, expected), g.owner
        assert (q != w).any()   # the weights did change
        # The float kernel is kept for later passes, its weights untouched; the graph holds a copy.
        assert run.ctx.float_kernels[g.owner] is before[g.owner] is not gm.get_submodule(g.owner)
        assert torch.equal(before[g.owner].weight, w)
        assert gm.graph.find_nodes(op="call_module", target=g.owner)[0].meta["weight_format"] == "int8_narrow_pc"


def test_transposed_conv_weights_are_scaled_per_output_channel_on_axis_1():
    torch.manual_seed(0)
    run, _ = _calibrated(UpNet().eval())
    w = run.gm.get_submodule("up").weight.detach().clone()   # [in=6, out=4, 2, 2]
    gm = convert(run.gm, run.ctx)
    g = next(g for g in run.ctx.plan.groups if g.kind == "weight" and g.owner == "up")
    scale = w.transpose(0, 1).reshape(4, -1).abs().amax(1) / 127
    assert g.params.axis == 1 and g.params.scale.shape == (4,)
    torch.testing.assert_close(g.params.scale, scale, rtol=1e-6, atol=0)
    s = g.params.scale.reshape(1, -1, 1, 1)
    assert torch.equal(gm.get_submodule("up").weight.detach(), torch.clamp(torch.round(w / s), -127, 127) * s)


def test_the_allocation_chooses_each_groups_format():
    run, _ = _calibrated(small_net(), target="npu-int4")
    groups = {g.owner: g for g in run.ctx.groups if g.kind == "weight"}
    assert groups["c2"].candidates == ("w8", "w4")
    run.ctx.allocation = {groups["c2"].id: "w4"}
    w = run.gm.get_submodule("c2").weight.detach().clone()
    gm = convert(run.gm, run.ctx)
    chosen = {g.owner: g.format_name for g in run.ctx.plan.groups if g.kind == "weight"}
    assert chosen == {"c1": "w8", "c2": "w4", "c3": "w8", "c4": "w8", "fc": "w8"}
    p = run.ctx.plan.group(groups["c2"].id).params
    codes = gm.get_submodule("c2").weight.detach() / p.scale.reshape(-1, 1, 1, 1)
    # Signed 4-bit codes: integers in [-8, 7], at most 16 distinct values per output channel.
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.round().min() >= -8 and codes.round().max() <= 7
    assert max(len(torch.unique(c.round())) for c in codes) <= 16
    # int4 clips outliers (an MSE search), so its scale is at most max|w| / 7 per channel.
    assert (p.scale <= w.reshape(w.shape[0], -1).abs().amax(1) / 7 * (1 + 1e-6)).all()


def test_a_format_outside_the_candidates_is_refused():
    run, _ = _calibrated(small_net())
    gid = next(g.id for g in run.ctx.groups if g.kind == "weight")
    run.ctx.allocation = {gid: "w4"}   # npu-int8 has no w4
    with pytest.raises(QCompileError, match=rf"group {gid} was given format 'w4', which is not among its candidates \('w8',\)"):
        convert(run.gm, run.ctx)


def test_a_kernel_moved_to_the_host_keeps_its_float_weights():
    run, _ = _calibrated(small_net())
    g = next(g for g in run.ctx.groups if g.kind == "weight" and g.owner == "c3")
    w = run.gm.get_submodule("c3").weight
    run.ctx.allocation = {g.id: "float"}   # npu-int8 runs unsupported work on the host
    gm = convert(run.gm, run.ctx)
    assert gm.get_submodule("c3").weight is w
    plan = run.ctx.plan.group(g.id)
    assert plan.fallback and plan.params is None and plan.format_name == "float" and isinstance(plan.format, HostFloat)
    node = gm.graph.find_nodes(op="call_module", target="c3")[0]
    assert node.meta["role"] == "host" and node.meta["weight_format"] == "float"
    assert any("c3 runs in float on the host" in n for n in run.ctx.notes["convert"])


def test_the_plan_has_one_entry_per_group_and_shares_the_quantizers_parameters():
    run, _ = _calibrated(small_net())
    gm = convert(run.gm, run.ctx)
    plan = run.ctx.plan
    assert plan.target == "npu-int8" and plan.target_version == str(run.ctx.target.version)
    assert [g.id for g in plan.groups] == [g.id for g in run.ctx.groups]
    for g in plan.groups:
        if g.kind == "activation":
            for t in g.tensors:
                assert gm.get_submodule(f"qobs_{t}").params is g.params
    # Converting is deterministic: the same calibration gives the same plan.
    again, _ = _calibrated(small_net())
    convert(again.gm, again.ctx)
    for a, b in zip(plan.groups, again.ctx.plan.groups):
        assert a.format_name == b.format_name and torch.equal(a.params.scale, b.params.scale)
