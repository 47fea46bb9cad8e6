"""Quantization-aware training of a compiled model: `prepare`, train in any loop, `convert`.

`fit` is a ready loop (label-free distillation from the float model, or a labelled loss).
"""
from .fit import EpochLog, fit
from .model import METHODS, QATKernel, QATModule, convert, prepare

__all__ = ["METHODS", "EpochLog", "QATKernel", "QATModule", "convert", "fit", "prepare"]
