"""Tests of passes/correct_bias.py: after correction, every corrected kernel's output has, per
channel and over the calibration data, the mean of the float model's same output.

The reference is measured with forward hooks on whole-model runs (the corrected simulated model
and the float model), not with the pass's own node-by-node replay.
"""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import qcompiler
from qcompiler import PassManager
from qcompiler.fx_util import snapshot
from qcompiler.passes.correct_bias import MAX_SAMPLES, correct_bias

CONVERTED = ["capture", "canonicalize", "fold_bn", "fuse", "group_quantizers", "insert_observers",
             "calibrate", "convert"]
KERNELS = ("c1", "c2", "c3", "fc")


class Net(nn.Module):
    """conv-BN-ReLU6, a depthwise conv with ReLU, a 1x1 conv without bias, pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c3 = nn.Conv2d(8, 16, 1, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self.bn(self.c1(x)))
        y = torch.relu(self.c2(y))
        return self.fc(self.c3(y).mean((2, 3)))


def _net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Net()
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.3, 0.3)
            model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _data(n: int, seed: int, batch: int = 8) -> list[torch.Tensor]:
    return list(torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed)).split(batch))


def _converted(batches, four_bit: bool = True, allocation_of=None):
    """The simulated model before bias correction: 4-bit weights where npu-int4 allows them."""
    model = _net()
    pm = PassManager(CONVERTED[:-1])
    run = pm.run(model, batches[0][:1], target=qcompiler.load_target("npu-int4"), calib_data=batches,
                 progress=False)
    weight_groups = [g for g in run.ctx.groups if g.kind == "weight"]
    if four_bit:
        run.ctx.allocation = {g.id: "w4" for g in weight_groups if "w4" in g.candidates}
    if allocation_of is not None:
        run.ctx.allocation.update(allocation_of(weight_groups))
    gm = PassManager(["convert"]).run(run.gm, ctx=run.ctx).gm
    return model, run.graph("fuse"), gm, run.ctx


def _channel_means(gm: fx.GraphModule, batches, targets=KERNELS) -> dict[str, torch.Tensor]:
    """Per output channel, the mean of each kernel's output over all batches (forward hooks)."""
    outs: dict[str, list[torch.Tensor]] = {t: [] for t in targets}
    hooks = [gm.get_submodule(t).register_forward_hook(lambda m, a, o, t=t: outs[t].append(o.detach()))
             for t in targets]
    try:
        with torch.no_grad():
            for b in batches:
                gm(b)
    finally:
        for h in hooks:
            h.remove()
    means = {}
    for t, os in outs.items():
        o = torch.cat(os).double()
        dim = 1 if o.ndim == 4 else o.ndim - 1
        means[t] = o.mean([d for d in range(o.ndim) if d != dim])
    return means


def test_corrected_kernels_have_the_float_channel_means_on_the_calibration_data():
    batches = _data(32, seed=1)
    _, float_gm, gm, ctx = _converted(batches)
    before = snapshot(gm)
    gm = correct_bias(gm, ctx)
    ref = _channel_means(float_gm, batches)
    err_before = {t: (m - ref[t]).abs() for t, m in _channel_means(before, batches).items()}
    err_after = {t: (m - ref[t]).abs() for t, m in _channel_means(gm, batches).items()}
    for t in KERNELS:
        scale = ref[t].abs().max()
        # 0 up to float32 rounding (measured: at most 5e-8 of the largest channel mean).
        assert err_after[t].max() <= 1e-6 * scale, (t, float(err_after[t].max()))
        # 4-bit weights had left a real offset (measured: 2.5e-4 to 5e-2 of that scale).
        assert err_before[t].max() > 100 * err_after[t].max(), t
    assert ctx.notes["correct_bias"] == ["corrected the biases of 4 kernels on 32 samples"]


def test_correction_also_shrinks_the_output_bias_on_held_out_data():
    batches, heldout = _data(48, seed=1), _data(48, seed=2)
    _, float_gm, gm, ctx = _converted(batches)
    before = snapshot(gm)
    gm = correct_bias(gm, ctx)
    ref = _channel_means(float_gm, heldout, ("fc",))["fc"]
    err_before = (_channel_means(before, heldout, ("fc",))["fc"] - ref).abs().mean()
    err_after = (_channel_means(gm, heldout, ("fc",))["fc"] - ref).abs().mean()
    # Measured: 6.7e-4 before, 2.2e-5 after; the offsets are the weights', not the data's.
    assert err_after < 0.2 * err_before, (float(err_before), float(err_after))


def test_the_shift_is_on_the_bias_alone_and_no_users_tensor_changes():
    batches = _data(16, seed=1)
    model, float_gm, gm, ctx = _converted(batches)
    user = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {t: gm.get_submodule(t).weight for t in KERNELS}
    old_bias = {t: gm.get_submodule(t).bias for t in KERNELS}
    assert old_bias["c3"] is None                       # c3 has no bias: correction gives it one
    gm = correct_bias(gm, ctx)
    for t in KERNELS:
        m = gm.get_submodule(t)
        assert m.weight is weights[t]
        assert m.bias is not None and m.bias is not old_bias[t] and not m.bias.requires_grad
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in user.items())
    assert all(torch.equal(float_gm.get_submodule(t).weight, ctx.float_kernels[t].weight) for t in KERNELS)


def test_a_kernel_left_in_float_is_not_corrected():
    batches = _data(16, seed=1)
    # npu-int4 may run a kernel on the host: c3 keeps float weights and needs no correction.
    _, _, gm, ctx = _converted(batches, allocation_of=lambda groups: {
        next(g.id for g in groups if g.owner == "c3"): "float"})
    assert "c3" not in ctx.float_kernels
    gm = correct_bias(gm, ctx)
    assert gm.get_submodule("c3").bias is None
    assert ctx.notes["correct_bias"] == ["corrected the biases of 3 kernels on 16 samples"]


def test_only_the_first_max_samples_are_used():
    batches = _data(MAX_SAMPLES + 32, seed=1, batch=16)
    first = batches[: MAX_SAMPLES // 16]
    _, float_gm, gm, ctx = _converted(batches)
    gm = correct_bias(gm, ctx)
    assert ctx.notes["correct_bias"] == [f"corrected the biases of 4 kernels on {MAX_SAMPLES} samples"]
    ref = _channel_means(float_gm, first, ("fc",))["fc"]
    err = (_channel_means(gm, first, ("fc",))["fc"] - ref).abs().max()
    assert err <= 1e-6 * ref.abs().max()


def test_nothing_to_correct_leaves_the_graph_alone():
    batches = _data(16, seed=1)
    _, _, gm, ctx = _converted(batches)
    biases = {t: gm.get_submodule(t).bias for t in KERNELS}
    ctx.calib_batches = []
    assert correct_bias(gm, ctx) is gm
    assert all(gm.get_submodule(t).bias is biases[t] for t in KERNELS)
    assert "correct_bias" not in ctx.notes
