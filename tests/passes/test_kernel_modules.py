"""Functional convs and linears whose weights are constants become module kernels
(qcompiler/kernel_modules.py, run by canonicalize), and are then quantized like any kernel."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler.context import CompileContext
from qcompiler.passes.canonicalize import canonicalize


class Reparameterised(nn.Module):
    """The kernels spelled functionally, as re-parameterised and scaled-weight blocks write them."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w3 = nn.Parameter(torch.randn(8, 3, 3, 3, generator=g) * 0.3)
        self.w1 = nn.Parameter(torch.randn(8, 3, 1, 1, generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(8, generator=g) * 0.1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3, generator=g) * 0.3)
        self.gain = nn.Parameter(torch.full((8, 1, 1, 1), 0.5))
        self.fc = timm.layers.Linear(8, 5)      # nn.Linear whose forward calls F.linear

    def forward(self, x):
        # a 3x3 branch plus a 1x1 branch folded into one kernel at run time
        w = self.w3 + F.pad(self.w1, [1, 1, 1, 1])
        y = F.relu(F.conv2d(x, w, self.b, 1, 1))
        y = F.conv2d(y, self.dw * self.gain, None, stride=2, padding="valid", groups=8)
        # a weight computed from the input is an activation: it stays functional
        dyn = y.mean(dim=(0, 2, 3)).reshape(8, 1, 1, 1).expand(8, 1, 1, 1).contiguous()
        y = F.conv2d(y, dyn, groups=8)
        return self.fc(y.mean(dim=(2, 3)))


def _canonical(model, x):
    ctx = CompileContext(model=model, example_inputs=(x,))
    return canonicalize(qcompiler.capture(model, (x,)), ctx), ctx


def test_constant_weights_become_modules_and_the_output_is_exact():
    model = Reparameterised().eval()
    x = torch.randn(2, 3, 10, 10)
    gm, ctx = _canonical(model, x)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    modules = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    kinds = {type(m) for m in modules.values()}
    assert kinds == {nn.Conv2d, nn.Linear}, modules
    convs = [m for m in modules.values() if isinstance(m, nn.Conv2d)]
    assert sorted((m.kernel_size, m.groups, m.stride, m.padding) for m in convs) == [
        ((3, 3), 1, (1, 1), (1, 1)), ((3, 3), 8, (2, 2), (0, 0))]        # "valid" spelled as the integers it means
    fused = next(m for m in convs if m.groups == 1)
    torch.testing.assert_close(fused.weight, model.w3 + F.pad(model.w1, [1, 1, 1, 1]), rtol=0, atol=0)
    assert fused.bias is model.b                 # a parameter read directly is shared, not copied
    linear = next(m for m in modules.values() if isinstance(m, nn.Linear))
    assert linear.weight is model.fc.weight
    # The input-dependent conv is still the functional call, with a computed weight.
    dynamic = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.conv2d]
    assert len(dynamic) == 1 and dynamic[0].meta["op_kind"] in ("conv", "depthwise_conv")
    assert {n.meta["op_kind"] for n in gm.graph.nodes if n.op == "call_module"} == {
        "conv", "depthwise_conv", "linear"}
    assert any("became module kernels" in note for note in ctx.notes["canonicalize"])
    # No dangling weight arithmetic is left behind.
    assert not any(n.op == "call_function" and n.target is F.pad for n in gm.graph.nodes)


def test_functional_kernels_are_quantized_and_run_integer_exact():
    model = Reparameterised().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 10, 10, generator=g) for _ in range(4)]
    x = torch.randn(4, 3, 10, 10, generator=g)
    compiled = qcompiler.qcompile(model, calib[0], target="npu-int8", calib_data=calib, progress=False)
    weight_groups = [gp for gp in compiled.plan.groups if gp.kind == "weight"]
    assert len(weight_groups) == 3 and all(gp.format_name == "w8" for gp in weight_groups)
    with torch.no_grad():
        ref, out = model(x), compiled(x)
    from qcompiler.mixed_precision import output_sqnr_db
    assert output_sqnr_db(ref.double(), out.double()) > 25
    # The reference backend computes the same codes from integers.
    ref_backend = compiled.lower("reference")
    torch.testing.assert_close(ref_backend(x), out, rtol=0, atol=0)


def test_timm_models_with_functional_kernels_compile():
    # Both raised "weights of functional kernel linear cannot be quantized yet" before.
    for name in ("mobilenetv3_small_050", "starnet_s050"):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(2, 3, 64, 64)
        compiled = qcompiler.qcompile(model, x, target="npu-int8", calib_data=[x],
                                      passes=["capture", "canonicalize", "fold_bn", "fuse", "group_quantizers",
                                              "insert_observers", "calibrate", "convert"], progress=False)
        functional = [n for n in compiled.simulated.graph.nodes
                      if n.op == "call_function" and n.target in (F.linear, F.conv2d)]
        assert not functional, name
        assert torch.isfinite(compiled(x)).all()


class SamePadding(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding="same")
        self.b = nn.Conv2d(4, 4, (5, 3), padding="same", dilation=(1, 2))
        self.c = nn.Conv2d(4, 4, 2, padding="same")           # 1 pixel in total: asymmetric

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def test_same_padding_becomes_integers_where_symmetric_and_the_integer_backend_agrees():
    model = SamePadding().eval()
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(2, 3, 9, 9, generator=g) for _ in range(3)]
    gm, _ = _canonical(model, calib[0])
    assert (gm.get_submodule("a").padding, gm.get_submodule("b").padding) == ((1, 1), (2, 2))
    assert gm.get_submodule("c").padding == "same" and model.a.padding == "same"   # the user's model untouched
    torch.testing.assert_close(gm(calib[0]), model(calib[0]), rtol=0, atol=0)
    compiled = qcompiler.qcompile(model, calib[0], target="npu-int8", calib_data=calib, progress=False)
    x = torch.randn(2, 3, 9, 9, generator=g)
    # a and b run as integer kernels; c (asymmetric) stays a float fake-quant kernel, identically.
    torch.testing.assert_close(compiled.lower("reference")(x), compiled(x), rtol=0, atol=0)
