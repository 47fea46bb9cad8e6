"""Number formats: what a quantized tensor's values can be.

One small frozen dataclass per family. A format knows how to round and clamp (quantize),
decode (dequantize) and simulate (fake_quant with a straight-through gradient); it knows
nothing about statistics (observers) or graphs (passes). Target specs name formats; the
spec loader builds these objects, so invalid formats (int1, FP8 E9M9) are rejected here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

Granularity = Literal["per_tensor", "per_channel", "per_group"]
ScaleKind = Literal["float", "pow2"]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
SCALE_KINDS = ("float", "pow2")


@dataclass(frozen=True)
class IntFormat:
    """Uniform integer quantization: x ≈ scale * (q - zero_point), q in [qmin, qmax]."""

    bits: int
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = "per_tensor"
    group_size: int | None = None
    scale_kind: ScaleKind = "float"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 16:
            raise ValueError(f"integer formats have 2 to 16 bits, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.scale_kind not in SCALE_KINDS:
            raise ValueError(f"scale_kind must be one of {SCALE_KINDS}, got {self.scale_kind!r}")
        if (self.granularity == "per_group") != (self.group_size is not None):
            raise ValueError("group_size is required with granularity 'per_group' and only then")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def family(self) -> str:
        return "int"

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)
        return 0

    @property
    def qmax(self) -> int:
        # Narrow range drops the most negative signed code so that the range is odd-symmetric.
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def name(self) -> str:
        base = f"{'int' if self.signed else 'uint'}{self.bits}"
        tags = []
        if not self.symmetric:
            tags.append("asym")
        if self.narrow_range:
            tags.append("narrow")
        if self.scale_kind == "pow2":
            tags.append("pow2")
        if self.granularity == "per_channel":
            tags.append("pc")
        elif self.granularity == "per_group":
            tags.append(f"g{self.group_size}")
        return "_".join([base] + tags)


# Minifloat layouts: (exponent bits, mantissa bits, bias, largest finite value).
MINIFLOATS = {
    "e4m3": (4, 3, 7, 448.0),       # OCP FP8 E4M3 (fn: no infinities, one NaN pattern)
    "e5m2": (5, 2, 15, 57344.0),    # OCP FP8 E5M2 (IEEE-like)
    "e2m1": (2, 1, 1, 6.0),         # OCP FP4 E2M1
}


@dataclass(frozen=True)
class FloatFormat:
    """A scaled minifloat (FP8 E4M3/E5M2, FP4 E2M1): x ≈ scale * decode(code)."""

    kind: str
    granularity: Granularity = "per_tensor"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in MINIFLOATS:
            raise ValueError(f"minifloat kind must be one of {tuple(MINIFLOATS)}, got {self.kind!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if (self.granularity == "per_group") != (self.group_size is not None):
            raise ValueError("group_size is required with granularity 'per_group' and only then")

    @property
    def family(self) -> str:
        return "fp"

    @property
    def bits(self) -> int:
        e, m, _, _ = MINIFLOATS[self.kind]
        return 1 + e + m

    @property
    def name(self) -> str:
        return f"fp{self.bits}_{self.kind}" + ("_pc" if self.granularity == "per_channel" else "")


@dataclass(frozen=True)
class NF4Format:
    """4-bit NormalFloat with block-wise absmax scaling (QLoRA's 16 levels)."""

    block_size: int = 64

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @property
    def family(self) -> str:
        return "nf4"

    @property
    def bits(self) -> int:
        return 4

    @property
    def granularity(self) -> str:
        return "per_group"

    @property
    def name(self) -> str:
        return f"nf4_b{self.block_size}"


@dataclass(frozen=True)
class LUTFormat:
    """Weight clustering: each value is an index into a k-means codebook of 2**bits entries."""

    bits: int
    granularity: Granularity = "per_tensor"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"look-up tables have 2**bits entries with bits 1 to 8, got {self.bits!r}")
        if self.granularity not in ("per_tensor", "per_channel"):
            raise ValueError(f"look-up tables are per_tensor or per_channel, got {self.granularity!r}")

    @property
    def family(self) -> str:
        return "lut"

    @property
    def name(self) -> str:
        return f"lut{self.bits}" + ("_pc" if self.granularity == "per_channel" else "")


@dataclass(frozen=True)
class HostFloat:
    """Not quantized: the tensor stays float32 (activations of weight-only targets, host fallback)."""

    @property
    def family(self) -> str:
        return "float"

    @property
    def bits(self) -> int:
        return 32

    @property
    def granularity(self) -> str:
        return "per_tensor"

    @property
    def name(self) -> str:
        return "float32"


Format = Union[IntFormat, FloatFormat, NF4Format, LUTFormat, HostFloat]
