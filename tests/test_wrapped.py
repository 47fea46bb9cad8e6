"""Tests of qcompiler/wrapped.py: torchvision's wrapped helpers written as primitive ops."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import PatchMerging, _patch_merging_pad

from qcompiler.passes.canonicalize import canonicalize
from qcompiler.tracing import capture_module
from qcompiler.wrapped import PatchMergingPad


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 7, 8, 3), (2, 6, 9, 3), (1, 2, 5, 5, 4)])
def test_patch_merging_pad_equals_torchvision(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(PatchMergingPad(shape)(x), _patch_merging_pad(x))


def test_swin_patch_merging_becomes_data_movement_in_canonicalize():
    torch.manual_seed(0)
    model = nn.Sequential(PatchMerging(4)).eval()
    x = torch.randn(2, 7, 9, 4)
    gm = canonicalize(capture_module(model, x))
    kinds = [n.meta["op_kind"] for n in gm.graph.nodes]
    assert "other" not in kinds
    assert kinds.count("pad") == 1 and kinds.count("getitem") == 4 and kinds.count("cat") == 1
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
