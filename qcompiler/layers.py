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


class ScaledAdd(nn.Module):
    """`a * gain_a + b * gain_b`, one gain per channel of the last dimension: a residual add whose
    inputs and output carry per-channel factors (`passes.balance_residual`). Its op kind is
    "add"; an integer adder applies the gains as per-channel rescale multipliers."""

    def __init__(self, gain_a: torch.Tensor, gain_b: torch.Tensor):
        super().__init__()
        gain_a, gain_b = torch.as_tensor(gain_a), torch.as_tensor(gain_b)
        if gain_a.dim() != 1 or gain_a.shape != gain_b.shape:
            raise ValueError(f"ScaledAdd needs two 1-D gains of one length, got shapes {tuple(gain_a.shape)} "
                             f"and {tuple(gain_b.shape)}")
        self.register_buffer("gain_a", gain_a.detach().clone().float())
        self.register_buffer("gain_b", gain_b.detach().clone().float())

    @property
    def channels(self) -> int:
        return self.gain_a.numel()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * self.gain_a + b * self.gain_b

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


# GainLayerNorm's input factors are multiples of 2**-GAIN_BITS, so that an integer LayerNorm
# multiplies its input codes by integers.
GAIN_BITS = 8


class GainLayerNorm(nn.LayerNorm):
    """`LayerNorm(x * input_gain)`: a LayerNorm over the last dimension whose input carries one
    factor per channel (`passes.balance_residual`; multiples of 2**-GAIN_BITS). Its op kind is
    "layer_norm"."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias)
        self.register_buffer("input_gain", torch.ones(self.normalized_shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.input_gain)
