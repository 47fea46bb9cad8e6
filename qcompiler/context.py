"""The compile context: the one place where state shared between passes lives.

Facts about single nodes live on the graph (`node.meta`, keys declared in `qcompiler.meta`);
everything a pass hands to a later one lives here, as a typed field with its meaning. A pass
reads and writes the context and never reaches into another pass's module.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .options import CompileOptions

if TYPE_CHECKING:  # types only: the context imports no numerics
    from .allocation import AllocationProblem, AllocationResult
    from .adaround import LayerRounding
    from .groups import QuantizerGroup, Tie
    from .observers import Observer
    from .plan import Plan
    from .sensitivity import SensitivityTable
    from .targets.spec import TargetSpec


@dataclass
class CompileContext:
    """What one compile knows beyond the graph, filled in as the passes run."""

    model: torch.nn.Module
    example_inputs: tuple[Any, ...]
    target: TargetSpec | None = None
    """The validated target spec."""
    calib_data: Any = None
    """The calibration data as the user gave it (DataLoader, list of batches, ...)."""
    options: CompileOptions = field(default_factory=CompileOptions)
    """The user's settings (frozen)."""
    front_end: str = "torch.fx"
    """What captured the graph: "torch.fx" or "torch.export" (`capture`)."""
    calib_batches: list[tuple[Any, ...]] | None = None
    """The calibration data, materialised and checked once (`calibrate`)."""
    channels_last: bool = False
    """Whether `calib_batches` (and validation batches) hold image tensors channels-last
    (`calibrate`, `qcompiler.calibration.runs_channels_last`)."""
    groups: list[QuantizerGroup] = field(default_factory=list)
    """Quantizer groups (`group_quantizers`), indexed by their id."""
    ties: list[Tie] = field(default_factory=list)
    """Bit-width couplings between groups (`group_quantizers`)."""
    observers: dict[int, Observer] = field(default_factory=dict)
    """Activation group id -> its observer (`insert_observers`, filled by `calibrate`)."""
    sensitivity: SensitivityTable | None = None
    """Output noise per (group, candidate format) (`sensitivity`)."""
    allocation_problem: AllocationProblem | None = None
    """The integer program `allocate_bits` solved."""
    allocation_result: AllocationResult | None = None
    """The solver's answer: status, objective, costs (`allocate_bits`)."""
    allocation: dict[int, str] = field(default_factory=dict)
    """Group id -> chosen format name; groups not listed take the spec default (`convert`)."""
    float_kernels: dict[str, torch.nn.Module] = field(default_factory=dict)
    """Module target -> the float kernel `convert` replaced by its quantized copy; the float side
    of every replay (`optimize_rounding`, `correct_bias`)."""
    rounding: dict[str, LayerRounding] = field(default_factory=dict)
    """Module target -> what AdaRound did to that kernel (`optimize_rounding`)."""
    reconstruction: list[Any] = field(default_factory=list)
    """What block or model reconstruction did to each block (`optimize_rounding`)."""
    plan: Plan | None = None
    """Every group's frozen format and parameters (`convert`; `model_requant` may raise scales)."""
    notes: dict[str, list[str]] = field(default_factory=dict)
    """Diagnostics each pass wants the user to see, keyed by stage name."""

    def note(self, stage: str, message: str) -> None:
        self.notes.setdefault(stage, []).append(message)

    def fork(self) -> "CompileContext":
        """A context that later passes can change without touching this one (tensors, modules
        and observers are shared: passes replace them, never modify them in place)."""
        out = copy.copy(self)
        out.groups, out.ties = list(self.groups), list(self.ties)
        out.observers, out.allocation = dict(self.observers), dict(self.allocation)
        out.float_kernels, out.rounding = dict(self.float_kernels), dict(self.rounding)
        out.reconstruction = list(self.reconstruction)
        out.notes = {k: list(v) for k, v in self.notes.items()}
        return out


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """`example_inputs` may be one tensor or a tuple/list of positional inputs."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)
