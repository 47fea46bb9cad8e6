"""fold_bn: BatchNorm folded into the conv, conv-transpose or linear that produces its input.

Before::

    x -> conv (W, b) -> bn (mean, var, gamma, beta, eps) -> y
    z -> add -> bn2 -> ...                                      (no foldable producer)

After::

    x -> conv (W * s, (b - mean) * s + beta) -> y               s = gamma / sqrt(var + eps)
    z -> add -> Affine(s, beta - mean * s, channel_dim=1) -> ...

The folded conv is a NEW module (new Parameters, a bias created if there was none) installed in
the graph module; no tensor is modified in place and neither the user's model nor earlier
pipeline snapshots (which share tensors with this graph) change. The weights are computed in
float64 and cast back to the producer's dtype.

Folding uses the running statistics whatever mode the BatchNorm is in: the compiled model is an
inference model (the returned graph module is put in eval mode). A BatchNorm is folded only when
its producer's output has no other user (else the other user would see the rescaled tensor); such
a BatchNorm, and one with no foldable producer (after an add, on a graph input), becomes an
`Affine` from `qcompiler.layers`, op kind "affine". A BatchNorm with `track_running_stats=False`
normalises every batch with its own statistics, which no fixed weights reproduce; it stays, and
so does a functional `F.batch_norm` call with `training=True` or statistics that are not
attributes of the model. Every decision other than a plain fold is written to `ctx.note`.

A leaf module (kept opaque by capture, or named in `leaf_modules`) runs its own forward, which
the graph does not see: its BatchNorms stay inside it, unfolded and untouched, and a conv or
BatchNorm that a leaf also uses is replaced only under a fresh path.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from ..context import CompileContext
from ..fx_util import copy_sharing_tensors, fetch_attr, snapshot
from ..layers import Affine

STAGE = "fold_bn"

# (producer module type, the rank its output must have, or None for "spatial dims + 2").
# A linear's features are its last dim and BatchNorm normalises dim 1, so only a rank-2 linear
# output ([N, C]) lines the two up. Conv-transpose is listed before conv because it subclasses it.
PRODUCERS: tuple[tuple[type[nn.Module], int | None], ...] = (
    (_ConvTransposeNd, None),
    (_ConvNd, None),
    (nn.Linear, 2),
)
# Users of the producer's output that read only its shape, rank, dtype or device (timm's
# BatchNormAct2d asserts `x.ndim == 4`): folding leaves all of those as they were.
METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
BATCH_NORM_MODULES: tuple[type[nn.Module], ...] = (_BatchNorm,)
BATCH_NORM_FUNCTIONS: tuple[Any, ...] = (F.batch_norm,)

_BN_SIGNATURE = inspect.signature(F.batch_norm)


@dataclass(frozen=True)
class BatchNormStats:
    """What an eval-mode BatchNorm computes, as float64 per-channel scale and shift."""

    scale: torch.Tensor
    shift: torch.Tensor

    @classmethod
    def from_stats(cls, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float) -> "BatchNormStats":
        mean, var = mean.detach().double(), var.detach().double()
        gamma = torch.ones_like(mean) if weight is None else weight.detach().double()
        beta = torch.zeros_like(mean) if bias is None else bias.detach().double()
        scale = gamma / torch.sqrt(var + eps)
        return cls(scale=scale, shift=beta - mean * scale)

    @property
    def channels(self) -> int:
        return self.scale.numel()


def _rank(node: fx.Node) -> int | None:
    """The rank of a node's output, from capture's meta["shape"] or ShapeProp's tensor_meta."""
    shape = node.meta.get("shape")
    if shape is None and hasattr(node.meta.get("tensor_meta"), "shape"):
        shape = node.meta["tensor_meta"].shape
    if isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in shape):
        return len(shape)
    return None


def _implied_rank(bn_node: fx.Node, gm: fx.GraphModule) -> int | None:
    """BatchNorm2d and 3d accept only rank 4 and 5 inputs; BatchNorm1d takes rank 2 or 3."""
    if bn_node.op == "call_module":
        bn = gm.get_submodule(bn_node.target)
        for cls, rank in ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5)):
            if isinstance(bn, cls):
                return rank
    return None


def _stats_of(node: fx.Node, gm: fx.GraphModule) -> BatchNormStats | str | None:
    """The folding statistics of a BatchNorm node, a reason it cannot be folded, or None."""
    if node.op == "call_module":
        bn = gm.get_submodule(node.target)
        if not isinstance(bn, BATCH_NORM_MODULES):
            return None
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            return "track_running_stats=False: it normalises each batch with its own statistics"
        return BatchNormStats.from_stats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    if node.op == "call_function" and node.target in BATCH_NORM_FUNCTIONS:
        try:
            bound = _BN_SIGNATURE.bind(*node.args, **node.kwargs)
        except TypeError as exc:
            return f"its arguments do not match F.batch_norm ({exc})"
        bound.apply_defaults()
        a = bound.arguments
        if a["training"] is not False:
            return f"training={a['training']!r}: it normalises with batch statistics"
        if not isinstance(a["eps"], (int, float)):
            return "eps is computed in the graph, not a constant"
        tensors: dict[str, torch.Tensor | None] = {}
        for name in ("running_mean", "running_var", "weight", "bias"):
            value = a[name]
            if value is None and name in ("weight", "bias"):
                tensors[name] = None
            elif isinstance(value, fx.Node) and value.op == "get_attr":
                tensors[name] = fetch_attr(gm, value.target)
            else:
                return f"its {name} is not an attribute of the model (it is {value!r})"
        return BatchNormStats.from_stats(tensors["running_mean"], tensors["running_var"],
                                         tensors["weight"], tensors["bias"], float(a["eps"]))
    return None


def _foldable_producer(bn_node: fx.Node, stats: BatchNormStats, gm: fx.GraphModule,
                       ) -> tuple[fx.Node | None, str]:
    """The conv/linear node to fold into, or None and why there is none."""
    src = bn_node.args[0] if bn_node.args else bn_node.kwargs.get("input")
    if not isinstance(src, fx.Node) or src.op != "call_module":
        what = f"{src.name!r}, a {src.op} node" if isinstance(src, fx.Node) else repr(src)
        return None, f"its input ({what}) is not a conv, conv-transpose or linear module"
    m = gm.get_submodule(src.target)
    kind = next(((cls, rank) for cls, rank in PRODUCERS if isinstance(m, cls)), None)
    if kind is None:
        return None, f"its input {src.name!r} is a {type(m).__name__}, not a conv, conv-transpose or linear"
    _, rank = kind
    others = [u for u in src.users if u is not bn_node and not _reads_only_metadata(u, src)]
    if others:
        names = ", ".join(repr(u.name) for u in others)
        return None, f"the output of {src.name!r} is also used by {names}"
    if parametrize.is_parametrized(m):
        return None, f"{src.name!r} has parametrized weights, which cannot be replaced"
    channels = m.out_features if isinstance(m, nn.Linear) else m.out_channels
    if channels != stats.channels:
        return None, f"{src.name!r} has {channels} output channels but the BatchNorm {stats.channels}"
    want = rank if rank is not None else len(m.kernel_size) + 2
    have = _rank(src) or _rank(bn_node) or _implied_rank(bn_node, gm)
    if have != want:
        got = "unknown (run capture first)" if have is None else str(have)
        return None, f"the output rank of {src.name!r} is {got}, its channels are at dim 1 only with rank {want}"
    return src, ""


def _reads_only_metadata(user: fx.Node, src: fx.Node) -> bool:
    """Whether `user` reads nothing of `src` but its shape, rank, dtype or device."""
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) == 2 and user.args[0] is src and user.args[1] in METADATA_ATTRIBUTES
    if user.op == "call_method" and user.target in METADATA_METHODS:
        return user.args[0] is src and src not in user.args[1:] and src not in user.kwargs.values()
    return False


def _folded_weights(m: nn.Module, stats: BatchNormStats) -> tuple[torch.Tensor, torch.Tensor]:
    """New weight and bias of a producer followed by an eval BatchNorm, computed in float64."""
    w = m.weight.detach()
    b = torch.zeros(stats.channels, dtype=torch.float64) if m.bias is None else m.bias.detach().double()
    s = stats.scale
    if isinstance(m, _ConvTransposeNd):
        # Weight is [in, out / groups, *k]: output channel g * (out / groups) + j scales [g-th block, j].
        g = m.groups
        blocks = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        s_view = s.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
    else:
        # Conv [out, in / groups, *k] and linear [out, in]: output channel is dim 0.
        blocks, s_view = w, s.reshape(-1, *([1] * (w.dim() - 1)))
    # torch.mul promotes to float64 without a separate float64 copy of the weight.
    folded = torch.mul(blocks, s_view).reshape(w.shape)
    return folded.to(w.dtype), (b * s + stats.shift).to(w.dtype)


def _with_weights(m: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of `m` with new weight and bias Parameters; `m` and its tensors stay untouched."""
    new = copy_sharing_tensors(m)
    new.weight = nn.Parameter(weight, requires_grad=m.weight.requires_grad)
    new.bias = nn.Parameter(bias, requires_grad=m.weight.requires_grad)
    return new


def _fresh_name(gm: fx.GraphModule, base: str) -> str:
    """An unused module path near `base`. Never inside a module that the graph calls: its forward
    would run the new module too (a Sequential runs every child), so such a path moves to the root."""
    parent = base.rpartition(".")[0]
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    if parent and any(parent == t or parent.startswith(t + ".") for t in called):
        base = base.replace(".", "_")
    names = dict(gm.named_modules())
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    return name


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _to_affine(gm: fx.GraphModule, bn_node: fx.Node, stats: BatchNormStats, name: str,
               dtype: torch.dtype) -> fx.Node:
    """Replace a BatchNorm node by a call of the Affine `name` (installed if not there yet)."""
    if not isinstance(dict(gm.named_modules()).get(name), Affine):
        gm.add_submodule(name, Affine(stats.scale.to(dtype), stats.shift.to(dtype), channel_dim=1))
    src = bn_node.args[0] if bn_node.args else bn_node.kwargs["input"]
    with gm.graph.inserting_after(bn_node):
        new = gm.graph.call_module(name, (src,))
    new.meta.update({k: v for k, v in bn_node.meta.items() if k != "op_kind"})
    new.meta.update(op_kind="affine", params=2 * stats.channels, macs=0)
    bn_node.replace_all_uses_with(new)
    return new


def _module_references(gm: fx.GraphModule) -> Counter[str]:
    """How many nodes use each module path: its calls, calls of a leaf module that contains it (the
    leaf's forward runs it unseen by the graph), and reads of its attributes (get_attr)."""
    refs: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            refs.update(_subtree(gm, n.target))
        elif n.op == "get_attr":
            parts = n.target.split(".")
            refs.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            refs.update(_subtree(gm, n.target)[1:])
    return refs


def _subtree(gm: fx.GraphModule, target: str) -> list[str]:
    """`target` and the paths of every module inside it, or [target] if it is not a module."""
    try:
        m = gm.get_submodule(target)
    except AttributeError:
        return [target]
    return [target] + [f"{target}.{name}" for name, _ in m.named_modules(remove_duplicate=False) if name]


def _install_folded(gm: fx.GraphModule, producer: fx.Node, module: nn.Module, refs: Counter[str]) -> None:
    """Put the folded module where `producer` calls it, without changing the module's other uses."""
    if refs[producer.target] > 1:
        # Other nodes call the module or read its weights and must keep seeing the unfolded ones.
        name = _fresh_name(gm, f"{producer.target}_bnfold")
        refs[producer.target] -= 1
        refs[name] = 1
        producer.target = name
    gm.add_submodule(producer.target, module)
    producer.meta["params"] = _params(module)


def fold_bn(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """The fold_bn pass: returns a new GraphModule; `gm` and the tensors it shares are unchanged."""
    gm = snapshot(gm)
    refs = _module_references(gm)
    affine_names: dict[str, str] = {}   # BatchNorm module path -> its Affine's path
    counts: Counter[str] = Counter()
    for node in list(gm.graph.nodes):
        stats = _stats_of(node, gm)
        if stats is None:
            continue
        if isinstance(stats, str):
            counts["kept"] += 1
            ctx.note(STAGE, f"BatchNorm {node.name!r} not folded and left in the graph: {stats}")
            continue
        if node.op == "call_module" and gm.get_submodule(node.target).training:
            ctx.note(STAGE, f"BatchNorm {node.name!r} was in training mode; folded with its running "
                            "statistics (the compiled model is an inference model)")
        attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        producer, why = _foldable_producer(node, stats, gm)
        if producer is not None:
            m = gm.get_submodule(producer.target)
            _install_folded(gm, producer, _with_weights(m, *_folded_weights(m, stats)), refs)
            node.replace_all_uses_with(producer)
            counts["folded"] += 1
        else:
            new = _to_affine(gm, node, stats, _affine_name(gm, node, refs, affine_names),
                             _dtype_of(node, gm))
            counts["affine"] += 1
            ctx.note(STAGE, f"BatchNorm {node.name!r} not folded: {why}; it is now the per-channel "
                            f"affine {new.target!r}")
        gm.graph.erase_node(node)
        for attr in attrs:
            if not attr.users:
                gm.graph.erase_node(attr)
    _drop_unused_batch_norms(gm)
    hidden = _batch_norms_inside_leaves(gm)
    if hidden:
        shown = ", ".join(repr(p) for p in hidden[:5]) + (", ..." if len(hidden) > 5 else "")
        ctx.note(STAGE, f"{len(hidden)} BatchNorm(s) inside leaf modules ({shown}) run unfolded "
                        "inside them: the graph does not see into a leaf")
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    ctx.note(STAGE, f"folded {counts['folded']} BatchNorm(s); {counts['affine']} became per-channel "
                    f"affine; {counts['kept']} left as BatchNorm")
    return gm


def _affine_name(gm: fx.GraphModule, bn_node: fx.Node, refs: Counter[str],
                 affine_names: dict[str, str]) -> str:
    """Where the Affine replacing `bn_node` lives: the BatchNorm's own path when no other node uses
    that BatchNorm (reports keep the user's names), else one fresh path per BatchNorm module."""
    if bn_node.op != "call_module":
        return _fresh_name(gm, f"{bn_node.name}_affine")
    if refs[bn_node.target] == 1:
        return bn_node.target
    if bn_node.target not in affine_names:
        affine_names[bn_node.target] = _fresh_name(gm, f"{bn_node.target}_affine")
    return affine_names[bn_node.target]


def _dtype_of(node: fx.Node, gm: fx.GraphModule) -> torch.dtype:
    dtype = node.meta.get("dtype")
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if node.op == "call_module":
        bn = gm.get_submodule(node.target)
        if bn.running_mean is not None and bn.running_mean.is_floating_point():
            return bn.running_mean.dtype
    return torch.float32


def _drop_unused_batch_norms(gm: fx.GraphModule) -> None:
    """Delete the BatchNorm modules no node uses any more. A BatchNorm inside a leaf module is used
    by that leaf's forward even though no node names it: deleting it would silently change the leaf
    (a Sequential skips a missing child)."""
    refs = _module_references(gm)
    for name, m in list(gm.named_modules()):
        if isinstance(m, BATCH_NORM_MODULES) and not refs[name]:
            gm.delete_submodule(name)


def _batch_norms_inside_leaves(gm: fx.GraphModule) -> list[str]:
    """Paths of the BatchNorm modules that some called module (an opaque or user leaf) contains."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    inside: list[str] = []
    for target in sorted(called):
        inside += [p for p in _subtree(gm, target)[1:]
                   if isinstance(gm.get_submodule(p), BATCH_NORM_MODULES) and p not in inside]
    return inside
