"""Hierarchical capture: compile the traceable parts of a model whose root cannot be traced.

A detector's forward resizes and normalises images, generates anchors, decodes boxes and runs
NMS, all Python control flow that torch.fx cannot trace and a chip does not run. Its network
(backbone, FPN, heads) can be traced part by part. `find_partition` descends from the root:
a module that traces whole, with no opaque submodule holding parameters, is a part; one that
does not is split into its children; a module without parameters that does not trace runs
eagerly on the host. The user can also name the parts (`split=[...]`).

`compile_parts` runs the float model eagerly on the calibration data, records what each part
receives (a head shared by five FPN levels sees all five), compiles every part as its own graph
with those inputs as its calibration data, and installs the compiled parts into a copy of the
model (sharing its tensors; the user's model is not changed). The result, `PartitionedModel`,
runs the model's own forward: pre- and post-processing in float, exactly as the model defines
it, and the parts as the chip computes them.

Not yet: a tensor passed from one part to the next is quantized by both (the producer's output
quantizer and the consumer's input quantizer, each calibrated on float values), the parts do
not share one mixed-precision budget, and a partitioned model is saved part by part.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import CaptureError, QCompileError
from .fx_util import copy_sharing_tensors, set_submodule, tree_map_detach
from .tracing import trace

__all__ = ["Partition", "PartitionedModel", "compile_parts", "find_partition", "relative_leaves"]


@dataclass
class Partition:
    """Which modules are compiled as graphs and which run eagerly on the host, and why."""

    parts: list[str]
    host: dict[str, str] = field(default_factory=dict)     # module path -> why it runs eagerly in float
    split: dict[str, str] = field(default_factory=dict)    # module path -> why it was split into its children

    def table(self) -> str:
        rows = [("module", "runs", "why")]
        rows += [(p or "<root>", "split, own code on host", why) for p, why in self.split.items()]
        rows += [(p, "compiled graph", "traces whole") for p in self.parts]
        rows += [(p or "<root>", "host (float)", why) for p, why in self.host.items()]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
        lines.insert(1, f"{'-' * width[0]}  {'-' * width[1]}  {'-' * 3}")
        return "\n".join(lines)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _reason_and_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    where = next((line for line in lines if line.startswith("where:")), "")
    reason = next((line for line in lines if line.startswith("reason:")), "")
    return "; ".join(x for x in (reason, where) if x) or (lines[0] if lines else "")


def relative_leaves(leaf_modules: Sequence[Any], path: str) -> list[Any]:
    """The user's leaf modules as seen from the submodule at `path`: types as given, paths
    inside it without its prefix, paths elsewhere dropped."""
    if not path:
        return list(leaf_modules)
    prefix = path + "."
    return [leaf[len(prefix):] if isinstance(leaf, str) else leaf for leaf in leaf_modules
            if not isinstance(leaf, str) or leaf.startswith(prefix)]


def _traces_whole(module: nn.Module, leaf_modules: Sequence[Any], path: str = "") -> tuple[bool, str]:
    """(True, "") if `module` traces with every parameter-holding submodule inside the graph."""
    if type(module).forward is nn.Module.forward:
        return False, f"a container ({type(module).__name__}) with no forward of its own"
    try:
        gm = trace(module, relative_leaves(leaf_modules, path))
    except CaptureError as exc:
        return False, _reason_and_line(exc)
    opaque = [p for p in gm.meta["opaque_modules"] if _has_parameters(module.get_submodule(p))]
    if opaque:
        return False, f"submodule(s) {', '.join(opaque)} hold parameters but cannot be traced"
    return True, ""


def find_partition(model: nn.Module, leaf_modules: Sequence[Any] = (), split: Sequence[str] | None = None) -> Partition:
    """The largest traceable parameter-holding modules of `model` (or the user's `split`)."""
    if split is not None:
        paths = list(split)
        for a in paths:
            for b in paths:
                if a != b and b.startswith(a + "."):
                    raise QCompileError(f"split parts {a!r} and {b!r} overlap: name one of them")
        for p in paths:
            try:
                module = model.get_submodule(p)
            except AttributeError:
                raise QCompileError(f"split names {p!r}, which is not a submodule of {type(model).__name__}") from None
            ok, why = _traces_whole(module, leaf_modules, p)
            if not ok:
                raise CaptureError(f"split part {p!r} ({type(module).__name__}) cannot be traced: {why}")
        return Partition(paths, split={"": "split= names the parts; everything outside them runs eagerly"})

    partition = Partition([])

    def visit(module: nn.Module, path: str) -> None:
        ok, why = _traces_whole(module, leaf_modules, path)
        if ok and _has_parameters(module):
            partition.parts.append(path)
            return
        if ok or not _has_parameters(module):
            partition.host[path] = "no parameters: pre- or post-processing" if ok or not why else why
            return
        partition.split[path] = why
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    if not partition.parts:
        try:
            trace(model, relative_leaves(leaf_modules, ""))
        except CaptureError as exc:
            raise CaptureError(f"{exc}\n  no part of {type(model).__name__} that holds parameters traces either, "
                               "so it cannot be compiled in parts") from None
        raise CaptureError(f"no part of {type(model).__name__} that holds parameters can be traced by torch.fx")
    return partition


def _as_call(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, dict):
        return (), item
    if isinstance(item, tuple):
        return item, {}
    return (item,), {}


def record_part_inputs(model: nn.Module, parts: Sequence[str], batches: Sequence[Any]) -> dict[str, list[tuple]]:
    """What each part receives when the float model runs eagerly on `batches` (every call)."""
    seen: dict[str, list[tuple]] = {p: [] for p in parts}
    handles = []

    def hook(path: str) -> Callable:
        def record(module, args, kwargs):
            if kwargs:
                raise QCompileError(f"part {path!r} is called with keyword arguments {sorted(kwargs)}; "
                                    "name a part called with positional tensors (split=[...])")
            seen[path].append(tree_map_detach(args))
        return record

    for p in parts:
        handles.append(model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for item in batches:
                args, kwargs = _as_call(item)
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    for p, calls in seen.items():
        if not calls:
            raise QCompileError(f"part {p!r} was never called when the model ran on the calibration data")
        for args in calls:
            if not args or not all(isinstance(a, torch.Tensor) for a in args):
                kinds = [type(a).__name__ for a in args]
                raise QCompileError(f"part {p!r} receives {kinds}; a compiled part takes tensors: name its "
                                    "submodules instead (split=[...])")
    return seen


class PartitionedModel(nn.Module):
    """A model whose traceable parts are compiled graphs; the rest of its forward runs eagerly
    in float on the host. Call it as the original model."""

    def __init__(self, root: nn.Module, parts: dict[str, Any], partition: Partition, target: Any):
        super().__init__()
        self.root = root
        object.__setattr__(self, "parts", dict(parts))       # path -> CompiledModel (also inside root)
        self.partition = partition
        self.target = target
        self.eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.root(*args, **kwargs)

    @property
    def weight_memory_bytes(self) -> float:
        return sum(p.weight_memory_bytes for p in self.parts.values())

    def report(self) -> str:
        lines = [f"target {self.target.name}", "", "partition (hierarchical capture):", self.partition.table()]
        for path, part in self.parts.items():
            lines += ["", f"== part {path} ==", str(part.report())]
        return "\n".join(lines)

    def lower(self, backend: str = "reference") -> dict[str, Any]:
        """Each compiled part lowered to `backend`, by module path."""
        return {path: part.lower(backend) for path, part in self.parts.items()}


def compile_parts(model: nn.Module, partition: Partition, calib_items: Sequence[Any],
                  compile_one: Callable[[nn.Module, tuple, list[tuple], str], Any], target: Any) -> PartitionedModel:
    """Compile every part on what it receives from `calib_items`; install them in a copy of model."""
    calls = record_part_inputs(model, partition.parts, calib_items)
    root = copy_sharing_tensors(model)
    compiled = {}
    for path in partition.parts:
        part = model.get_submodule(path)
        inputs = calls[path]
        compiled[path] = compile_one(part, inputs[0], inputs, path)
        set_submodule(root, path, compiled[path])
    return PartitionedModel(root, compiled, partition, target)
