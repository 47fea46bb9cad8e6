"""The one exception family of qcompiler.

Every error says what is wrong, where (module path and source line, node name, spec key) and
what to do about it. Catch `QCompileError` to catch them all.
"""
from __future__ import annotations


class QCompileError(Exception):
    """Base class of every error qcompiler raises on purpose."""


class CaptureError(QCompileError):
    """The model (or the part of it that must be traced) cannot be captured as a torch.fx graph."""

    root_untraceable = False
    """True when the forward of the module given cannot be traced at all (not one of its parts)."""


class SpecError(QCompileError):
    """A target spec is malformed: the message names the file, the key path and what is expected."""


class GroupingError(QCompileError):
    """The graph cannot be quantized under the target's rules (e.g. no format all members accept)."""


class CalibrationError(QCompileError):
    """Calibration data is missing, empty, malformed or not finite."""


class BudgetError(QCompileError):
    """A budget is malformed or cannot be met."""


class ArtifactError(QCompileError):
    """A saved model or exported artifact is missing, corrupted or inconsistent."""


class PassError(QCompileError):
    """A pass pipeline is malformed (unknown pass name, pass returned something that is no graph)."""


class OnnxExportError(QCompileError):
    """A compiled model cannot be written as ONNX (an op or format ONNX cannot express)."""
