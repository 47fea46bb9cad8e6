"""End to end: real torchvision architectures compile under every built-in target.

Random weights: this checks structure (every op kind finds a rule, a fallback or a clear error),
finite per-layer figures and exact save/load round trips, not accuracy (see the demo for that).
"""
from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

import qcompiler

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), 32),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), 32),
    "googlenet": (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False), 32),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32), 32),
}


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    with torch.no_grad():
        for m in model.modules():  # ViT's zero-initialised head would make every output 0
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0.0, 0.02)
    return model


@pytest.mark.parametrize("target", qcompiler.list_targets())
@pytest.mark.parametrize("name", list(MODELS))
def test_compiles_under_every_target(name, target, tmp_path):
    model = _model(name)
    size = MODELS[name][1]
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 3, size, size, generator=g)]
    x = torch.randn(2, 3, size, size, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = qcompiler.qcompile(model, x, target=target, calib_data=calib, progress=False)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    report = compiled.report()
    assert report.rows
    assert all(not math.isnan(row.sqnr_db) for row in report.rows), [r.node for r in report.rows if math.isnan(r.sqnr_db)]
    assert report.totals["weight_memory_bytes"] == compiled.weight_memory_bytes > 0
    # Every weight group got one of its candidate formats and every activation quantizer is on.
    for g_plan in compiled.plan.groups:
        assert g_plan.fallback or g_plan.format_name in g_plan.candidates
    if name != "vit_b_16" or target == "npu-int8":  # saving 86 M parameters is slow: once is enough
        compiled.save(str(tmp_path / "m"))
        loaded = qcompiler.load(str(tmp_path / "m"))
        with torch.no_grad():
            assert torch.equal(loaded(x), out)
