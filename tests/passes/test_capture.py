"""Tests of passes/capture.py: tracing, opaque leaves, CaptureError and node facts."""
from __future__ import annotations

import math
import operator

import pytest
import torch
import torchvision
from torch import nn

import qcompiler
from qcompiler import CaptureError


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # decided by tensor values: untraceable
            return x * 2
        return x - 1


class InnerControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), DataDependent())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class TopLevelControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            y = y.relu()
        return y


def test_control_flow_inside_a_submodule_becomes_opaque_and_outputs_are_kept():
    model = InnerControlFlow().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = qcompiler.capture(model, x)
    assert list(gm.meta["opaque_modules"]) == ["body.1"]
    reason = gm.meta["opaque_modules"]["body.1"]
    assert "control flow" in reason and "test_capture.py" in reason
    opaque_nodes = [n for n in gm.graph.nodes if n.meta.get("opaque")]
    assert [n.target for n in opaque_nodes] == ["body.1"]
    # The traceable parts around it are still traced node by node.
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"stem", "head"} <= targets
    for sign in (1, -1):  # both branches of the opaque module still run correctly
        xs = sign * x.abs()
        torch.testing.assert_close(gm(xs), model(xs), rtol=0, atol=0)


def test_top_level_control_flow_raises_capture_error_with_location_and_fix():
    with pytest.raises(CaptureError) as info:
        qcompiler.capture(TopLevelControlFlow(), torch.randn(1, 3, 4, 4))
    msg = str(info.value)
    assert "TopLevelControlFlow" in msg
    assert "test_capture.py" in msg and "if y.mean() > 0" in msg
    assert "data-dependent control flow" in msg
    assert "concrete_args" in msg
    assert "Traceback" not in msg


def test_detector_root_cannot_be_traced_but_its_backbone_can():
    model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    with pytest.raises(CaptureError) as info:
        qcompiler.capture(model, [torch.randn(3, 64, 64)])
    msg = str(info.value)
    assert "RetinaNet" in msg and "retinanet.py" in msg
    assert "iteration over a traced value" in msg
    assert "model.backbone" in msg
    gm = qcompiler.capture(model.backbone, torch.randn(1, 3, 64, 64))
    assert gm.meta["opaque_modules"] == {}
    x = torch.randn(1, 3, 64, 64)
    out, ref = gm(x), model.backbone(x)
    assert out.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])


def test_user_leaf_modules_by_path_and_by_type():
    model = InnerControlFlow().eval()
    gm = qcompiler.capture(model, torch.randn(1, 3, 8, 8), leaf_modules=["body"])
    assert gm.meta["opaque_modules"] == {}  # asked for, not forced
    assert "body" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    gm = qcompiler.capture(model, torch.randn(1, 3, 8, 8), leaf_modules=[DataDependent])
    assert gm.meta["opaque_modules"] == {}
    with pytest.raises(CaptureError, match="not a submodule"):
        qcompiler.capture(model, torch.randn(1, 3, 8, 8), leaf_modules=["nope"])


def test_concrete_args_remove_the_control_flow():
    class Switch(nn.Module):
        def forward(self, x, double: bool = False):
            return x * 2 if double else x

    gm = qcompiler.capture(Switch(), (torch.ones(2),), concrete_args={"double": True})
    # The branch is gone: what computes is x * 2 alone, whatever x holds.
    (mul,) = gm.graph.find_nodes(op="call_function", target=operator.mul)
    assert mul.args[1] == 2 and list(gm.graph.find_nodes(op="output")[0].args) == [mul]
    # torch.fx keeps the fixed argument as a checked parameter: it must be passed as fixed.
    x = torch.randn(5)
    torch.testing.assert_close(gm(x, True), 2 * x)
    with pytest.raises(AssertionError, match="specialized to have value True"):
        gm(x, False)
    # Fixed the other way, the graph is the identity.
    gm = qcompiler.capture(Switch(), (torch.ones(2),), concrete_args={"double": False})
    assert not gm.graph.find_nodes(op="call_function", target=operator.mul)
    torch.testing.assert_close(gm(x, False), x)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(CaptureError, match="example inputs"):
        qcompiler.capture(nn.Linear(4, 2), torch.randn(1, 5))
    with pytest.raises(CaptureError, match="nn.Module"):
        qcompiler.capture(lambda x: x, torch.randn(1))


def test_capture_does_not_change_the_users_model_mode_or_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qcompiler.capture(model, torch.randn(2, 3, 8, 8))
    assert model.training and model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _facts(gm):
    return {n.name: n.meta for n in gm.graph.nodes}


def test_macs_and_params_of_every_conv_kind_match_hand_counts():
    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 8, 3, padding=1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.t = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            y = self.t(self.dw(self.g(self.c(x))))
            z = self.fc(y.mean((2, 3)))
            return z @ z.t(), torch.bmm(y.flatten(2), y.flatten(2).transpose(1, 2))

    gm = qcompiler.capture(Convs(), torch.randn(1, 4, 5, 5))
    f = _facts(gm)
    assert f["c"]["macs"] == 8 * 25 * 4 * 9 and f["c"]["params"] == 8 * 4 * 9 + 8
    assert f["g"]["macs"] == 8 * 25 * 4 * 9 and f["g"]["params"] == 8 * 4 * 9 + 8
    assert f["dw"]["macs"] == 8 * 25 * 9 and f["dw"]["params"] == 8 * 9 + 8
    # transposed: every input element meets (out/groups) * k*k weights
    assert f["t"]["macs"] == 8 * 25 * 3 * 4 and f["t"]["shape"] == (1, 6, 10, 10)
    assert f["fc"]["macs"] == 5 * 6 and f["fc"]["params"] == 35
    assert f["matmul"]["macs"] == 1 * 1 * 5
    assert f["bmm"]["macs"] == 6 * 6 * 100
    assert f["c"]["dtype"] == torch.float32 and f["c"]["out_elems"] == 8 * 25 and f["c"]["in_elems"] == 100


def test_attention_macs():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    gm = qcompiler.capture(Attn(), torch.randn(1, 10, 16))
    macs = _facts(gm)["mha"]["macs"]
    # 3 input projections + output projection (L*E*E each) + scores and weighted sum (2*L*L*E)
    assert macs == 4 * 10 * 16 * 16 + 2 * 10 * 10 * 16


def test_resnet18_total_macs_are_the_published_figure():
    gm = qcompiler.capture(torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224))
    total = sum(n.meta["macs"] for n in gm.graph.nodes)
    assert math.isclose(total / 1e9, 1.814, rel_tol=0.01)  # 1.81 GMACs, as torchvision documents
    assert sum(n.meta["params"] for n in gm.graph.nodes) == 11_689_512


class OptionalArguments(nn.Module):
    """timm's ViTs spell their forward `forward(self, x, attn_mask=None, is_causal=False)`."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, scale: float = 2.0):
        y = self.fc(x) * scale
        if mask is not None:
            y = y + mask
        return y


def test_optional_arguments_left_out_of_example_inputs_are_fixed_at_their_defaults():
    model = OptionalArguments().eval()
    x = torch.randn(3, 4)
    # Named in concrete_args, mask stays as torch.fx made it (a checked parameter); scale is bound.
    gm = qcompiler.capture(model, (x,), concrete_args={"mask": None})
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 2
    assert gm.meta["bound_defaults"] == ["scale"]
    gm = qcompiler.capture(model, (x,))
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert gm.meta["bound_defaults"] == ["mask", "scale"]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    # Every pass and the calibration data see one input (the replays of AdaRound raised an
    # IndexError on timm's deit before).
    compiled = qcompiler.qcompile(model, x, target="npu-int8", calib_data=[x, torch.randn(3, 4)], progress=False)
    assert any("mask, scale not in example_inputs: fixed at their defaults" in n
               for n in compiled._run.ctx.notes["capture"])
    from qcompiler.mixed_precision import output_sqnr_db
    assert output_sqnr_db(model(x).double(), compiled(x).double()) > 30


class CachedBias(nn.Module):
    """Memoises a tensor in a dict keyed by str(device), as timm's LeViT attention does."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4))
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return x + self.cache[key]


class Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x   # untraceable: becomes an opaque leaf on a retry


class CachedThenBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = CachedBias(), Branchy()

    def forward(self, x):
        return self.b(self.a(x))


def test_a_trace_leaves_no_proxies_in_the_models_caches():
    # The first attempt memoised a proxy; the retry (with `b` opaque) used to read it back and
    # build a graph referring to a node of the failed attempt.
    model = CachedThenBranchy().eval()
    x = torch.rand(3, 4)
    gm = qcompiler.capture(model, x)
    assert list(gm.meta["opaque_modules"]) == ["b"]
    assert model.a.cache == {}                            # nothing of the trace left in the user's model
    torch.testing.assert_close(gm(x), model(x))
    gm2 = qcompiler.capture(model, x)                     # a second capture of the same model
    torch.testing.assert_close(gm2(x), model(x))


def test_functions_timm_registers_as_not_traceable_become_single_calls():
    # CrossViT's forward calls scale_image, which branches on the input size; timm registers it
    # for FX. Without honouring that, the root could not be captured at all.
    import timm
    from timm.models.crossvit import scale_image

    torch.manual_seed(0)
    model = timm.create_model("crossvit_tiny_240", pretrained=False).eval()
    x = torch.randn(1, 3, 240, 240)
    gm = qcompiler.capture(model, x)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is scale_image]
    assert len(calls) == 2                                # one per branch of the two-scale model
    torch.testing.assert_close(gm(x), model(x))
