"""qcompiler: a quantization compiler for PyTorch models that targets edge accelerators."""
from __future__ import annotations

from .context import CompileContext
from .errors import (
    ArtifactError, BudgetError, CalibrationError, CaptureError, GroupingError, OnnxExportError,
    PassError, QCompileError, SpecError,
)
from .api import CompiledModel, qcompile
from .pass_manager import PassManager, PassRun
from .mixed_precision import ParetoResult, pareto
from .targets.spec import TargetSpec, list_targets, load_target

__version__ = "0.1.0"


def capture(model, example_inputs, leaf_modules=(), concrete_args=None):
    """Trace `model` into a torch.fx.GraphModule whose nodes carry shapes, params and MACs."""
    from .passes.capture import capture as _capture

    return _capture(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)


def load(path):
    """Load a model saved with `CompiledModel.save` (JSON + safetensors; no code is loaded)."""
    from .artifact import load_compiled

    return load_compiled(path)


def load_qpack(path):
    """The reference backend stored in a qpack directory (`CompiledModel.export`), without model code."""
    from .qpack import load_qpack as _load_qpack

    return _load_qpack(path)


__all__ = [
    "CompiledModel", "TargetSpec", "list_targets", "load", "load_qpack", "load_target", "qcompile",
    "ArtifactError", "BudgetError", "CalibrationError", "CaptureError", "CompileContext",
    "GroupingError", "OnnxExportError", "PassError", "PassManager", "PassRun", "QCompileError", "SpecError",
    "ParetoResult", "capture", "pareto",
]
