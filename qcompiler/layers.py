"""Small nn.Modules that passes insert into graphs.

A pass that rewrites a graph sometimes needs an op that PyTorch has no module for (a BatchNorm
that could not be folded is, at inference, only a per-channel scale and shift). Those modules
live here so that every pass, the reference lowering and the ONNX export see one definition.
"""
from __future__ import annotations

import torch
from torch import nn


class Affine(nn.Module):
    """`x * scale + shift`, with one scale and one shift per channel along `channel_dim`.

    With `channel_dim=1` this is what an eval-mode BatchNorm computes on an `[N, C, ...]` input,
    with `scale = weight / sqrt(running_var + eps)` and `shift = bias - running_mean * scale`.
    Its canonical op kind is "affine".
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int = 1):
        super().__init__()
        scale = torch.as_tensor(scale)
        shift = torch.as_tensor(shift, dtype=scale.dtype)
        if scale.dim() != 1 or shift.shape != scale.shape:
            raise ValueError(
                f"Affine needs 1-D scale and shift of the same length (one per channel), "
                f"got shapes {tuple(scale.shape)} and {tuple(shift.shape)}"
            )
        if channel_dim < 0:
            # A negative dim would mean a different axis for inputs of different rank.
            raise ValueError(f"Affine channel_dim must be >= 0, got {channel_dim}")
        self.channel_dim = channel_dim
        # Parameters (not buffers) so that QAT and bias correction can adjust them like BN's own.
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())

    @property
    def num_channels(self) -> int:
        return self.scale.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= self.channel_dim or x.shape[self.channel_dim] != self.num_channels:
            raise ValueError(
                f"Affine over {self.num_channels} channels at dim {self.channel_dim} got an input of "
                f"shape {tuple(x.shape)}"
            )
        view = [1] * x.dim()
        view[self.channel_dim] = self.num_channels
        return x * self.scale.reshape(view) + self.shift.reshape(view)

    def extra_repr(self) -> str:
        return f"channels={self.num_channels}, channel_dim={self.channel_dim}"
