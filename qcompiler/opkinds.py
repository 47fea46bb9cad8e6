"""The canonical op-kind vocabulary.

`canonicalize` writes one of these names into `node.meta["op_kind"]`; target specs refer to ops
by the same names. Keeping the list in one place means a spec that names an op kind the compiler
does not know is rejected at load time instead of silently matching nothing.
"""
from __future__ import annotations

# Kernels with weights.
WEIGHTED = ("conv", "depthwise_conv", "conv_transpose", "linear", "embedding")
# Two-operand arithmetic and tensor joins.
BINARY = ("add", "sub", "mul", "div", "matmul")
JOIN = ("cat",)
POOLING = ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "mean")
ACTIVATIONS = (
    "relu", "relu6", "hardtanh", "clamp", "leaky_relu", "prelu", "hardswish", "hardsigmoid",
    "silu", "gelu", "sigmoid", "tanh", "softmax", "log_softmax", "elu", "mish", "exp",
)
NORMALIZATION = ("layer_norm", "batch_norm", "group_norm", "instance_norm", "affine")
# Ops that move or select data without changing values.
DATA_MOVEMENT = (
    "reshape", "flatten", "permute", "transpose", "getitem", "contiguous", "expand", "split",
    "chunk", "squeeze", "unsqueeze", "pad", "interpolate", "pixel_shuffle", "roll", "stack",
)
ATTENTION = ("multi_head_attention", "scaled_dot_product_attention", "shifted_window_attention")
# Nodes that produce no tensor of their own worth quantizing (shape queries, constants).
META = ("size", "placeholder", "output", "get_attr", "constant")
# A submodule kept as an opaque leaf because it could not be traced; it runs in float.
OPAQUE = ("opaque",)
OTHER = ("other",)

ALL_OP_KINDS: tuple[str, ...] = (
    WEIGHTED + BINARY + JOIN + POOLING + ACTIVATIONS + NORMALIZATION + DATA_MOVEMENT
    + ATTENTION + META + OPAQUE + OTHER
)

# Clamp-like activations: a quantizer after them can spend its whole range on what survives.
CLAMPS = ("relu", "relu6", "hardtanh", "clamp")

# Colour of each family in graph drawings before quantization decides formats.
FAMILY_COLOURS = {
    "weighted": "#8ecae6",
    "binary": "#ffb703",
    "join": "#fb8500",
    "pooling": "#b7e4c7",
    "activation": "#f4acb7",
    "normalization": "#cdb4db",
    "data_movement": "#e9ecef",
    "attention": "#90be6d",
    "meta": "#ffffff",
    "opaque": "#6c757d",
    "other": "#ffd6a5",
}


def family(kind: str) -> str:
    """The family a canonical op kind belongs to (used for colours and reports)."""
    for name, members in (
        ("weighted", WEIGHTED), ("binary", BINARY), ("join", JOIN), ("pooling", POOLING),
        ("activation", ACTIVATIONS), ("normalization", NORMALIZATION),
        ("data_movement", DATA_MOVEMENT), ("attention", ATTENTION), ("meta", META),
        ("opaque", OPAQUE),
    ):
        if kind in members:
            return name
    return "other"
