"""Small models shared by several pass tests, and a target with free activation widths for the
mixed-precision tests."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qcompiler.targets.spec import BUILTIN_DIR, load_target


class SmallNet(nn.Module):
    """conv-BN-ReLU, conv-ReLU, a residual 1x1 conv, a depthwise conv with ReLU6, pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.c4 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.c2(x))
        y = y + self.c3(y)
        y = F.relu6(self.c4(y))
        return self.fc(y.mean((2, 3)))


def small_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SmallNet()
        model.b1.running_mean.uniform_(-0.2, 0.2)
        model.b1.running_var.uniform_(0.5, 2.0)
    return model.eval()


def calib_batches(n: int = 8, size: int = 16, batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.randn(n, 3, size, size, generator=g).split(batch))


def npu_a4_spec(tmp_path: Path):
    """npu-int4 whose activations may also be 4-bit: activation groups get a choice, and the
    spec's `requires` coupling (4-bit weights need 8-bit inputs) and bops products matter."""
    text = (BUILTIN_DIR / "npu-int4.toml").read_text()
    text = text.replace('name = "npu-int4"', 'name = "npu-a4"')
    text = text.replace('inputs = ["a8"]', 'inputs = ["a8", "a4"]')
    text = text.replace("[formats.a8]", '[formats.a4]\ntype = "int"\nbits = 4\nsymmetric = false\n\n[formats.a8]')
    path = tmp_path / "npu-a4.toml"
    path.write_text(text)
    return load_target(str(path))


class Branches(nn.Module):
    """conv-ReLU branches joined by a shared-scale concat and a pass-through max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.head(nn.functional.max_pool2d(y, 2))
