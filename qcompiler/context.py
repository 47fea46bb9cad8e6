"""The compile context: the one place where state shared between passes lives.

Facts about single nodes live on the graph (`node.meta`); everything else a pass needs from an
earlier pass (the target, quantizer groups, observers, the bit allocation, diagnostics) lives
here. A pass reads and writes the context and never reaches into another pass's module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CompileContext:
    model: torch.nn.Module
    example_inputs: tuple[Any, ...]
    leaf_modules: tuple[Any, ...] = ()
    concrete_args: dict[str, Any] | None = None
    target: Any = None                      # a validated TargetSpec once loaded
    calib_data: Any = None
    calib_batches: list[Any] | None = None  # the calibration data, materialised and checked once
    observer: Any = None                    # observer choice / overrides from the user
    budget: dict[str, Any] | None = None
    progress: bool = True
    seed: int = 0
    groups: list[Any] = field(default_factory=list)      # QuantizerGroup, from group_quantizers
    ties: list[Any] = field(default_factory=list)        # Tie: bit-width couplings between groups
    observers: dict[str, Any] = field(default_factory=dict)
    allocation: dict[int, str] = field(default_factory=dict)  # group id -> chosen format name
    plan: Any = None                        # frozen per-group formats and parameters
    # Diagnostics each pass wants the user to see, keyed by stage name.
    notes: dict[str, list[str]] = field(default_factory=dict)
    # Anything else a pass chooses to share; prefer a named field above when it is stable.
    extra: dict[str, Any] = field(default_factory=dict)

    def note(self, stage: str, message: str) -> None:
        self.notes.setdefault(stage, []).append(message)


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """`example_inputs` may be one tensor or a tuple/list of positional inputs."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)
