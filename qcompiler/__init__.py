"""qcompiler: a quantization compiler for PyTorch models that targets edge accelerators."""
from __future__ import annotations

from typing import Any

from .api import compile_many, qcompile
from . import backends
from .backends import Backend, register_backend
from .compiled import CompiledModel, load_compiled
from .context import CompileContext
from .errors import (
    ArtifactError, BudgetError, CalibrationError, CaptureError, GroupingError, OnnxExportError,
    PassError, QCompileError, SpecError,
)
from .mixed_precision import ParetoResult, pareto
from .options import CompileOptions
from .pass_manager import PassManager, PassRun, register_pass
from .targets.spec import TargetSpec, list_targets, load_target
from .tracing import capture_module
from .version import __version__


def capture(model: Any, example_inputs: Any, leaf_modules: Any = (), concrete_args: Any = None) -> Any:
    """Trace `model` into a torch.fx.GraphModule whose nodes carry shapes, params and MACs."""
    return capture_module(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)


def load(path: Any, model: Any = None) -> Any:
    """Load a model saved with `CompiledModel.save` (JSON + safetensors; no code is loaded).

    A model compiled in parts (`PartitionedModel.save`) needs `model`, the float model it was
    compiled from: its forward runs the code around the parts, which a save never holds."""
    from .partition import is_partitioned_save, load_partitioned

    if is_partitioned_save(path):
        return load_partitioned(path, model)
    return load_compiled(path)


def load_qpack(path: Any) -> Any:
    """The reference backend stored in a qpack directory (`CompiledModel.export`), without model code."""
    return backends.load("qpack", path)


__all__ = [
    "Backend", "CompileContext", "CompileOptions", "CompiledModel", "ParetoResult", "PassManager", "PassRun",
    "TargetSpec", "__version__", "capture", "compile_many", "list_targets", "load", "load_qpack", "load_target", "pareto",
    "qcompile", "register_backend", "register_pass",
    "ArtifactError", "BudgetError", "CalibrationError", "CaptureError", "GroupingError", "OnnxExportError",
    "PassError", "QCompileError", "SpecError",
]
