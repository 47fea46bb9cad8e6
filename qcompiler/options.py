"""The settings of one compile: what the user asked for, frozen once the compile starts.

Passes read them from `ctx.options`; they never change during a run. A sweep that compiles
one model many ways (budgets, sensitivity methods) forks a run and gives the fork new options
with `dataclasses.replace`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .adaround import AdaRoundConfig
from .errors import QCompileError
from .executor import check_executor
from .threads import check_threads

# How `sensitivity` measures each (group, format); see qcompiler.sensitivity.
SENSITIVITY_METHODS: tuple[str, ...] = ("sqnr", "hessian", "adaround")
# Chosen on validation crops by the rule of benchmarks/defaults.py (benchmarks/defaults.md).
DEFAULT_SENSITIVITY = "sqnr"
DEFAULT_ALLOCATION_TIME_LIMIT = 60.0
# How `optimize_rounding` fits the rounding: per "layer" (AdaRound), per "block" or the whole "model".
RECONSTRUCTIONS: tuple[str, ...] = ("layer", "block", "model", "nearest")
# The target's `reconstruction`, or this where the target names none.
DEFAULT_RECONSTRUCTION = "layer"


@dataclass(frozen=True)
class EffortSettings:
    """What `qcompile(effort=...)` changes: the calibration samples the observers see (None: all),
    the per-layer AdaRound configuration, and the samples a budgeted compile's sensitivity is
    measured on (None: all). Fixed in advance, not tuned: "fast" runs a third of the narrow
    kernels' steps over a quarter of the samples (8-bit kernels keep their short schedule),
    "best" three times the steps on every kernel (no short schedule for 8-bit ones) over twice
    the samples; what each costs and gives on EfficientNet-Lite0 is in
    benchmarks/speed_effort.md. The sensitivity's samples were chosen on validation crops
    (benchmarks/sensitivity_samples.md)."""

    calibration_samples: int | None
    adaround: AdaRoundConfig
    sensitivity_samples: int | None = None


EFFORT_SETTINGS = {
    "fast": EffortSettings(calibration_samples=64, adaround=AdaRoundConfig(steps=100, max_samples=32),
                           sensitivity_samples=16),
    "default": EffortSettings(calibration_samples=None, adaround=AdaRoundConfig(), sensitivity_samples=16),
    "best": EffortSettings(calibration_samples=None, adaround=AdaRoundConfig(steps=900, max_samples=256, wide_bits=None)),
}
EFFORTS: tuple[str, ...] = tuple(EFFORT_SETTINGS)


@dataclass(frozen=True)
class CompileOptions:
    """Every setting of `qcompile` that passes read.

    observer: an observer name for every activation, or a dict keyed by node name, op kind or
        "default" (see `passes/insert_observers.py`); None: the target's default.
    budget: limits on the target's cost metrics, e.g. {"weight_memory": "1.5 MiB"}; None: the
        spec's default format everywhere.
    sensitivity: "sqnr" (default), "hessian" or "adaround" (`qcompiler.sensitivity`).
    reconstruction: "layer" (per-kernel AdaRound), "block" or "model" (`qcompiler.reconstruction`),
        "nearest" (weights keep round-to-nearest), or a ReconstructionConfig; None: the target's
        `reconstruction`, else "layer".
    host_fallback: with a budget, a kernel may run in float on the host where the spec allows.
    allocation_time_limit: seconds the bit-allocation solver may take.
    leaf_modules, concrete_args: how `capture` traces (see `qcompiler.tracing.trace`).
    progress: show progress bars.
    seed: every random choice of the compile (probes, sampled rows) derives from it.
    threads: torch threads while the passes run; None: the cores other processes leave free
        (`qcompiler.threads`). The plan does not depend on it (the rounding may, in its last bits).
    effort: "fast", "default" or "best": how many calibration samples the observers see and how
        long per-layer AdaRound runs (`EFFORT_SETTINGS`); "fast" also skips the plan check
        unless `qcompile(plan_check=True)` asks for it.
    executor: "local" or "ray": where independent measurements (the sensitivity of many groups)
        run (`qcompiler.executor`). The results are those of one process on one thread per task.
    boundary: set by `qcompiler.partition` for a part of a larger model: the observer of the
        quantizer group at each of the graph's ports ("input:i", a placeholder; "output:j", the
        j-th tensor of the output), shared with the parts the tensor passes to or comes from.
    """

    observer: str | Mapping[str, str] | None = None
    budget: Mapping[str, Any] | None = None
    sensitivity: str = DEFAULT_SENSITIVITY
    reconstruction: Any = None
    host_fallback: bool = False
    allocation_time_limit: float = DEFAULT_ALLOCATION_TIME_LIMIT
    leaf_modules: tuple[Any, ...] = ()
    concrete_args: Mapping[str, Any] | None = field(default=None, compare=False)
    progress: bool = True
    seed: int = 0
    threads: int | None = field(default=None, compare=False)
    effort: str = "default"
    executor: str = field(default="local", compare=False)
    boundary: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.effort not in EFFORTS:
            raise QCompileError(f"effort={self.effort!r} is not a setting; choose one of {', '.join(EFFORTS)}")
        if self.sensitivity not in SENSITIVITY_METHODS:
            raise QCompileError(f"sensitivity={self.sensitivity!r} is not a method; choose one of "
                                f"{', '.join(SENSITIVITY_METHODS)}")
        if isinstance(self.reconstruction, str) and self.reconstruction not in RECONSTRUCTIONS:
            raise QCompileError(f"reconstruction={self.reconstruction!r} is not a granularity; choose one of "
                                f"{', '.join(RECONSTRUCTIONS)} or give a ReconstructionConfig")
        if self.reconstruction is not None and not isinstance(self.reconstruction, str) \
                and not hasattr(self.reconstruction, "granularity"):
            raise QCompileError(f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)} or a "
                                f"ReconstructionConfig, got {type(self.reconstruction).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise QCompileError(f"seed must be an integer, got {self.seed!r}")
        check_threads(self.threads)
        check_executor(self.executor)
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))

    @property
    def effort_settings(self) -> EffortSettings:
        return EFFORT_SETTINGS[self.effort]
