"""The second front end: `torch.export`, for models `torch.fx.symbolic_trace` cannot trace.

Hugging Face models (transformers 5 has no FX tracer), models that assign into tensors or branch
on shapes trace with `torch.export` instead. Its graph holds ATen operators
(`aten.linear.default`, `aten.view.default`, ...). `export_module` rewrites every ATen operator
that has a spelling in the `torch.fx` front end to that spelling (`F.linear`, `torch.reshape`,
`operator.add`, ...), so `canonicalize` and every later pass see one kind of graph whichever
front end captured the model. ATen operators without one (mask arithmetic: `arange`, `gather`,
comparisons) stay as they are: they compute integer or boolean tensors, which are never
quantized, or run in float on the host like any op the target lacks.

Every dimension of every input is exported dynamic where the model allows it (`Dim.AUTO`), so
the captured graph runs on calibration batches and sequences of any size the model accepts.
Shape guards and dtype assertions of the exported program are dropped: the passes run the graph
on the calibration data, which the user's model accepts by construction.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import CaptureError

aten = torch.ops.aten

# ATen operator -> (the fx front end's spelling, how its arguments map: None keeps them).
_Adapt = Callable[[tuple, dict], tuple[tuple, dict]]


def _same(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, kwargs


def _first(n: int) -> _Adapt:
    return lambda args, kwargs: (tuple(args[:n]), {})


def _embedding(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # aten.embedding(weight, indices, padding_idx=-1, scale_grad_by_freq, sparse)
    return (args[1], args[0]), {}


def _layer_norm(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # aten.layer_norm(input, normalized_shape, weight, bias, eps, cudnn_enable)
    return tuple(args[:5]), {k: v for k, v in kwargs.items() if k in ("weight", "bias", "eps")}


def _softmax(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # aten._softmax(input, dim, half_to_float) / aten.softmax.int(input, dim, dtype=None)
    return (args[0], args[1]), {}


def _binary(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    return (tuple(args), {}) if len(args) == 2 and not kwargs else None


RETARGET: dict[Any, tuple[Callable, _Adapt]] = {
    aten.linear.default: (F.linear, _same),
    aten.conv1d.default: (F.conv1d, _same),
    aten.conv2d.default: (F.conv2d, _same),
    aten.conv3d.default: (F.conv3d, _same),
    aten.embedding.default: (F.embedding, _embedding),
    aten.layer_norm.default: (F.layer_norm, _layer_norm),
    aten.group_norm.default: (F.group_norm, _first(5)),
    aten.scaled_dot_product_attention.default: (F.scaled_dot_product_attention, _same),
    aten.softmax.int: (F.softmax, _softmax),
    aten._softmax.default: (F.softmax, _softmax),
    aten.log_softmax.int: (F.log_softmax, _softmax),
    aten.gelu.default: (F.gelu, _same),
    aten.relu.default: (F.relu, _same),
    aten.relu_.default: (F.relu, _same),
    aten.hardtanh.default: (F.hardtanh, _same),
    aten.hardtanh_.default: (F.hardtanh, _same),
    aten.hardswish.default: (F.hardswish, _same),
    aten.hardsigmoid.default: (F.hardsigmoid, _same),
    aten.silu.default: (F.silu, _same),
    aten.sigmoid.default: (torch.sigmoid, _same),
    aten.tanh.default: (torch.tanh, _same),
    aten.exp.default: (torch.exp, _same),
    # aten.dropout(input, p, train) is F.dropout(input, p, training); canonicalize removes it.
    aten.dropout.default: (F.dropout, _same),
    aten.add.Tensor: (operator.add, _binary),
    aten.sub.Tensor: (operator.sub, _binary),
    aten.mul.Tensor: (operator.mul, _binary),
    aten.div.Tensor: (operator.truediv, _binary),
    aten.matmul.default: (torch.matmul, _same),
    aten.bmm.default: (torch.matmul, _same),
    aten.mm.default: (torch.matmul, _same),
    aten.view.default: (torch.reshape, _same),
    aten.reshape.default: (torch.reshape, _same),
    aten._unsafe_view.default: (torch.reshape, _same),
    aten.transpose.int: (torch.transpose, _same),
    aten.permute.default: (torch.permute, _same),
    aten.flatten.using_ints: (torch.flatten, _same),
    aten.unsqueeze.default: (torch.unsqueeze, _same),
    aten.squeeze.dim: (torch.squeeze, _same),
    aten.cat.default: (torch.cat, _same),
    aten.stack.default: (torch.stack, _same),
    aten.mean.dim: (torch.mean, _same),
    aten.adaptive_avg_pool2d.default: (F.adaptive_avg_pool2d, _same),
    aten.max_pool2d.default: (F.max_pool2d, _same),
    aten.avg_pool2d.default: (F.avg_pool2d, _same),
}

# Exported-program bookkeeping with no value to compute: dropped.
_DROPPED = (aten._assert_tensor_metadata.default,)


def _dynamic_shapes(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    from torch.export import Dim

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {d: Dim.AUTO for d in range(value.dim())}
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        return None

    return tuple(spec(x) for x in inputs)


def _retarget(gm: fx.GraphModule) -> int:
    """Rewrite ATen nodes to the fx front end's spellings; returns how many were rewritten."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        if node.target in _DROPPED and not node.users:
            graph.erase_node(node)
            continue
        found = RETARGET.get(node.target)
        if found is None:
            continue
        target, adapt = found
        adapted = adapt(tuple(node.args), dict(node.kwargs))
        if adapted is None:
            continue
        node.target, (node.args, node.kwargs) = target, adapted
        count += 1
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph.lint()
    gm.recompile()
    return count


def _batch_of_two(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """`inputs` with a batch of one repeated to two. torch.export specialises every dimension of
    size 1 (it cannot tell it from a broadcast), so a graph captured on a batch of one would
    refuse every other batch size; captured on two, the batch stays dynamic. Inputs are left as
    they are unless every tensor among them has a leading dimension of 1."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or not all(x.dim() >= 1 and x.shape[0] == 1 for x in tensors):
        return inputs
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in inputs)


def export_module(model: nn.Module, inputs: tuple[Any, ...]) -> fx.GraphModule:
    """`model` captured by `torch.export` on `inputs` (positional), as a GraphModule in the fx
    front end's spellings. Raises CaptureError (root_untraceable) with export's reason."""
    was_training = model.training
    model.eval()
    inputs = _batch_of_two(tuple(inputs))
    try:
        program = torch.export.export(model, tuple(inputs), dynamic_shapes=_dynamic_shapes(inputs), strict=False)
    except Exception as exc:
        error = CaptureError(f"torch.export cannot capture {type(model).__name__} either: "
                             f"{type(exc).__name__}: {_first_line(exc)}")
        error.root_untraceable = True
        raise error from exc
    finally:
        model.train(was_training)
    exported = program.module()
    # A plain GraphModule over the same graph and submodules: the exported module's class adds
    # state-swapping hooks the passes do not need. The graph keeps export's pytree calling
    # convention (positional inputs in, the model's own output structure out).
    gm = fx.GraphModule(exported, exported.graph, type(model).__name__)
    gm._in_spec, gm._out_spec = exported._in_spec, exported._out_spec
    _retarget(gm)
    return gm


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
