"""End to end: capture + canonicalize + fold_bn on real torchvision architectures keep outputs."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from qcompiler import PassManager

# (builder, input size): the smallest input each architecture accepts keeps the suite fast.
MODELS = {
    "resnet18": (torchvision.models.resnet18, 64),
    "resnet50": (torchvision.models.resnet50, 64),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, 64),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, 64),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, 64),
    "regnet_x_400mf": (torchvision.models.regnet_x_400mf, 64),
    "shufflenet_v2_x1_0": (torchvision.models.shufflenet_v2_x1_0, 64),
    "googlenet": (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False), 64),
    "densenet121": (torchvision.models.densenet121, 64),
    "squeezenet1_1": (torchvision.models.squeezenet1_1, 64),
    "mnasnet1_0": (torchvision.models.mnasnet1_0, 64),
    "convnext_tiny": (torchvision.models.convnext_tiny, 64),
    "vit_b_16": (torchvision.models.vit_b_16, 224),
    "swin_t": (torchvision.models.swin_t, 224),
    "deeplabv3_mobilenet_v3_large": (
        lambda: torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights_backbone=None, aux_loss=False), 64),
}


def randomise_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial statistics: default-initialised BatchNorm (mean 0, var 1) hides folding bugs."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=generator) * 0.5 + 1.0)
                m.bias.data.copy_(torch.randn(c, generator=generator) * 0.2)


def _out(y):
    return y["out"] if isinstance(y, dict) else y


@pytest.mark.parametrize("name", list(MODELS))
def test_capture_canonicalize_fold_bn_preserve_outputs(name):
    builder, size = MODELS[name]
    torch.manual_seed(0)
    model = builder().eval()
    with torch.no_grad():
        randomise_batch_norm(model, torch.Generator().manual_seed(1))
        for m in model.modules():  # ViT's zero-initialised head would make every output 0
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0.0, 0.02)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    run = PassManager(["capture", "canonicalize", "fold_bn"]).run(model, x)
    gm = run.graph("fold_bn")
    assert gm.meta["opaque_modules"] == {}
    with torch.no_grad():
        ref, out = _out(model(x)), _out(gm(x))
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, rel
    kinds = [n.meta["op_kind"] for n in gm.graph.nodes]
    assert "batch_norm" not in kinds
    assert "other" not in kinds
    assert all(isinstance(n.meta.get("macs"), (int, float)) for n in gm.graph.nodes)
