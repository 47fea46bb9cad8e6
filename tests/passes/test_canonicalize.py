"""Tests of passes/canonicalize.py: one spelling per op kind, kinds on every node."""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qcompiler
from qcompiler.opkinds import ALL_OP_KINDS
from qcompiler.passes.canonicalize import CANONICAL, canonicalize


class Spellings(nn.Module):
    """The same few ops written every way PyTorch allows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.relu = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6()
        self.ht = nn.Hardtanh(0.0, 6.0)
        self.ht2 = nn.Hardtanh(-1.0, 1.0)
        self.hs = nn.Hardswish()
        self.drop = nn.Dropout(0.3)
        self.ident = nn.Identity()
        self.flat = nn.Flatten()
        self.soft = nn.Softmax(dim=1)
        self.gelu = nn.GELU(approximate="tanh")

    def forward(self, x):
        y = self.dw(self.relu(self.conv(x)))
        a = F.relu(y, inplace=True)
        b = torch.relu(y)
        c = y.relu()
        d = F.relu6(a) + self.relu6(b)  # operator.add
        d += self.ht(c)                 # operator.iadd
        e = torch.add(d, self.ht2(a))
        e = e.add(F.hardsigmoid(b))
        f = torch.mul(e, self.hs(c)) * torch.sigmoid(e)
        f = self.ident(self.drop(f))
        g = torch.cat([f, F.dropout(e, 0.1, training=False)], dim=1)
        h = torch.concat((g, g), 1)
        h = h.view(h.size(0), -1)
        return self.soft(self.gelu(self.flat(h.reshape(1, -1))))


def _canonical(model, x):
    return canonicalize(qcompiler.capture(model, x))


def test_every_spelling_maps_to_one_canonical_target_and_outputs_are_unchanged():
    model = Spellings().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = _canonical(model, x)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    for node in gm.graph.nodes:
        kind = node.meta["op_kind"]
        assert kind in ALL_OP_KINDS, (node.name, kind)
        if kind in CANONICAL and node.op != "call_module":
            assert node.op == "call_function" and node.target is CANONICAL[kind][0], (node.name, node.target)
    kinds = Counter(n.meta["op_kind"] for n in gm.graph.nodes)
    assert kinds["relu"] == 4            # module, F.relu(inplace), torch.relu, .relu()
    assert kinds["relu6"] == 3           # F.relu6, nn.ReLU6 and Hardtanh(0, 6)
    assert kinds["hardtanh"] == 1        # Hardtanh(-1, 1) stays a hardtanh
    assert kinds["add"] == 4 and kinds["mul"] == 2 and kinds["cat"] == 2
    assert kinds["conv"] == 1 and kinds["depthwise_conv"] == 1
    assert kinds["reshape"] == 2 and kinds["flatten"] == 1
    assert "other" not in kinds


def test_dropout_identity_and_inplace_ops_are_gone():
    gm = _canonical(Spellings().eval(), torch.randn(1, 3, 4, 4))
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert not isinstance(gm.get_submodule(node.target), (nn.Dropout, nn.Identity, nn.ReLU))
        assert node.target not in (F.dropout, operator.iadd, torch.relu_)
        assert node.kwargs.get("inplace") is not True
        assert not (node.op == "call_method" and str(node.target).endswith("_"))
    assert not any(isinstance(m, (nn.Dropout, nn.ReLU, nn.Hardtanh)) for m in gm.modules())


def test_activation_arguments_survive_the_rewrite():
    gm = _canonical(Spellings().eval(), torch.randn(1, 3, 4, 4))
    by_kind = {n.meta["op_kind"]: n for n in gm.graph.nodes}
    assert by_kind["gelu"].kwargs == {"approximate": "tanh"}
    assert by_kind["softmax"].kwargs == {"dim": 1}
    assert by_kind["hardtanh"].kwargs == {"min_val": -1.0, "max_val": 1.0}


def test_torchvision_models_are_labelled_without_unknown_tensor_ops():
    for name in ("mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"):
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, 64, 64)
        gm = _canonical(model, x)
        torch.testing.assert_close(gm(x), model(x))
        kinds = Counter(n.meta["op_kind"] for n in gm.graph.nodes)
        assert kinds["other"] == 0, name  # stochastic depth (identity at inference) removed
        assert kinds["depthwise_conv"] > 0, name


class TracedSizes(nn.Module):
    """reshape/view given a size computed in the graph: a traced tuple, or a traced int."""

    def forward(self, x):
        a = x.reshape(x.shape[:-1] + (-1,))  # timm's maxvit and vit_pe spell it this way
        b = a.view(a.numel())
        c = x.view(torch.int32).view(x.dtype)  # a reinterpretation of the bytes, not a reshape
        return b.permute(0) + x.flatten() + c.flatten()


def test_reshape_to_a_traced_tuple_or_int_gets_the_right_canonical_shape_argument():
    model = TracedSizes().eval()
    x = torch.randn(2, 3, 4)
    gm = _canonical(model, x)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in ("reshape", "view", "permute"):
        assert nodes[name].target in (torch.reshape, torch.permute), name
    assert nodes["reshape"].args[1].op == "call_function"        # the traced tuple itself
    assert nodes["view"].args[1] == (nodes["numel"],)            # a traced int: (n,)
    assert nodes["permute"].args[1] == (0,)
    # Views to a dtype stay as written: torch.reshape(x, (torch.int32,)) does not exist.
    assert [n.args[1] for n in gm.graph.nodes if n.target == "view"] == [torch.int32, nodes["getattr_2"]]
    # Without capture's facts a traced argument may be an int or a tuple: the method stays as written.
    bare = canonicalize(torch.fx.symbolic_trace(model))
    assert [n.name for n in bare.graph.nodes if n.target in ("reshape", "view")] == [
        "reshape", "view", "view_1", "view_2"]
    torch.testing.assert_close(bare(x), model(x), rtol=0, atol=0)
