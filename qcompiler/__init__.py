"""qcompiler: a quantization compiler for PyTorch models that targets edge accelerators."""
from __future__ import annotations

from .context import CompileContext
from .errors import (
    ArtifactError, BudgetError, CalibrationError, CaptureError, GroupingError, PassError,
    QCompileError, SpecError,
)
from .pass_manager import PassManager, PassRun

__version__ = "0.1.0"


def capture(model, example_inputs, leaf_modules=(), concrete_args=None):
    """Trace `model` into a torch.fx.GraphModule whose nodes carry shapes, params and MACs."""
    from .passes.capture import capture as _capture

    return _capture(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)


__all__ = [
    "ArtifactError", "BudgetError", "CalibrationError", "CaptureError", "CompileContext",
    "GroupingError", "PassError", "PassManager", "PassRun", "QCompileError", "SpecError",
    "capture",
]
