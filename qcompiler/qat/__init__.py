"""Quantization-aware training of a compiled model: `prepare`, train in any loop, `convert`.

`fit` is a ready loop (label-free distillation from the float model, or a labelled loss);
`reestimate_statistics` re-estimates the folded BatchNorm statistics on data (also `fit(reestimate=True)`).
"""
from .fit import EpochLog, fit
from .model import METHODS, QATKernel, QATModule, convert, prepare
from .reestimate import Correction, reestimate_statistics

__all__ = ["METHODS", "Correction", "EpochLog", "QATKernel", "QATModule", "convert", "fit", "prepare",
           "reestimate_statistics"]
