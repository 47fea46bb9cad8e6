"""Quantizer groups: the unit that gets one number format and one set of quantization parameters.

An activation group quantizes one or more graph tensors (node outputs) that the hardware forces
to share a quantizer (the inputs and output of a shared-scale concat, a tensor and the outputs of
the pass-through ops after it). A weight group quantizes the weights of one kernel. Ties say which
groups' bit widths the hardware couples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .formats import Format

# The allocation's name for "this kernel runs in float on the host" (bit allocation with host fallback).
HOST_FLOAT = "float"


@dataclass(frozen=True)
class QuantizerGroup:
    id: int
    kind: Literal["activation", "weight"]
    tensors: tuple[str, ...]           # node names whose output tensors this group quantizes
    weights: tuple[str, ...]           # qualified names of the weight tensors it quantizes
    owner: str                         # the producing node (activation) or the kernel (weight)
    op_kind: str                       # the owner's op kind
    candidates: tuple[str, ...]        # names of the spec formats it may take, best first
    default: str                       # the spec's default among the candidates
    formats: dict[str, Format] = field(compare=False, repr=False, default_factory=dict)
    fallback: bool = False             # no format fits: the tensors stay float on the host
    reason: str = ""                   # why it fell back, or why candidates were narrowed

    def format(self, name: str | None = None) -> Format:
        return self.formats[name or self.default]

    @property
    def members(self) -> tuple[str, ...]:
        return self.tensors + self.weights


@dataclass(frozen=True)
class Tie:
    """A coupling between groups' bit widths, declared by a spec coupling.

    kind "equal_bits": all `groups` have equal bits. kind "requires": if group `groups[0]` (weights)
    has at most `weight_bits` bits, every other group (the kernel's inputs) has `activation_bits`.
    """

    kind: Literal["equal_bits", "requires"]
    groups: tuple[int, ...]
    node: str
    weight_bits: int | None = None
    activation_bits: int | None = None
