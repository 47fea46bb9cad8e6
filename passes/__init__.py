"""Graph passes, one module per pass, in pipeline order (see DESIGN.md).

`BUILTIN_PASSES` is the registry the pass manager starts from: name -> pass, each a function
`(gm, ctx) -> GraphModule` with the name of its module.
"""
from __future__ import annotations

from . import (
    allocate_bits, balance_residual, calibrate, canonicalize, capture, convert, correct_bias, fold_bn, fuse,
    group_quantizers, insert_observers, model_requant, optimize_rounding, sensitivity,
)

_MODULES = (capture, canonicalize, fold_bn, fuse, balance_residual, group_quantizers, insert_observers, calibrate, sensitivity,
            allocate_bits, convert, optimize_rounding, correct_bias, model_requant)
BUILTIN_PASSES = {m.__name__.rpartition(".")[2]: getattr(m, m.__name__.rpartition(".")[2]) for m in _MODULES}
