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

A tensor passed from one part to another (a backbone's feature map read by two heads, a head's
first conv feeding its last) is quantized once. While the float model runs, the hooks see which
part outputs reach which part inputs as the same tensor object. Every port one tensor passes
through joins one `Boundary`: one observer calibrated on every value it carries, then fixed. Each
part's compile uses that observer for the quantizer group of its port (`CompileOptions.
boundary`), so producer and consumer hold the same format parameters, and the consumer's input
quantizer maps the producer's quantized output onto itself. `PartitionedModel.save` writes the
parts and the partition as data; `load_partitioned` installs them into the user's float model,
whose forward is the host code (an artifact never holds code).

With a budget, every part runs through `sensitivity`, one bit-allocation program covers the
groups of all parts (their costs add up; a boundary's groups take equal bits), and each part
finishes with its share of the plan (`qcompiler.api._compile_parts_to_budget`). The parts'
sensitivities are each measured at their own outputs and summed, an approximation of their
effect on the model's output; the plan check of a whole-graph compile is not run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import ArtifactError, CaptureError, QCompileError
from .fx_util import copy_sharing_tensors, port_node, set_submodule, tree_map_detach
from .observers import FixedObserver, make_observer
from .tracing import trace

__all__ = ["Boundary", "Partition", "PartitionedModel", "compile_parts", "find_partition", "load_partitioned",
           "relative_leaves"]

PARTITION_FILE = "partition.json"
PARTITION_FORMAT = "qcompiler-partitioned-model"
PARTITION_FORMAT_VERSION = 1


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


@dataclass
class Boundary:
    """One tensor passed between compiled parts: the ports it passes through, as (part path,
    "input:i" | "output:j"), and the one observer every one of their quantizers uses."""

    ports: list[tuple[str, str]]
    observer: Any = None

    def describe(self) -> str:
        return " -> ".join(f"{path}[{port}]" for path, port in self.ports)


@dataclass
class Traffic:
    """What the parts exchanged while the float model ran on the calibration data."""

    inputs: dict[str, list[tuple]]            # part -> the positional tensors of every call
    shared: list[tuple[list[tuple[str, str]], list[torch.Tensor]]]   # ports one tensor passed, its values


class _PortSets:
    """Union-find over ports; a set's values are kept once per distinct tensor."""

    def __init__(self) -> None:
        self.parent: dict[tuple[str, str], tuple[str, str]] = {}
        self.values: dict[tuple[str, str], dict[tuple[int, int], torch.Tensor]] = {}

    def add(self, port: tuple[str, str], key: tuple[int, int], value: torch.Tensor) -> None:
        self.parent.setdefault(port, port)
        self.values.setdefault(port, {})[key] = value

    def find(self, port: tuple[str, str]) -> tuple[str, str]:
        while self.parent[port] != port:
            self.parent[port] = self.parent[self.parent[port]]
            port = self.parent[port]
        return port

    def union(self, a: tuple[str, str], b: tuple[str, str]) -> None:
        self.parent[self.find(a)] = self.find(b)

    def shared(self, order: Sequence[str]) -> list[tuple[list[tuple[str, str]], list[torch.Tensor]]]:
        """Every set that holds a part's output and a part's input: its ports (in part order) and
        its distinct values."""
        sets: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for port in self.parent:
            sets.setdefault(self.find(port), []).append(port)
        rank = {p: i for i, p in enumerate(order)}
        out = []
        for ports in sets.values():
            kinds = {port.split(":")[0] for _, port in ports}
            if kinds != {"input", "output"}:
                continue
            ports.sort(key=lambda p: (rank[p[0]], p[1].startswith("input"), int(p[1].split(":")[1])))
            values: dict[tuple[int, int], torch.Tensor] = {}
            for port in ports:
                values.update(self.values[port])
            out.append((ports, [values[k] for k in sorted(values)]))
        out.sort(key=lambda item: (rank[item[0][0][0]], item[0][0][1]))
        return out


def record_traffic(model: nn.Module, parts: Sequence[str], batches: Sequence[Any]) -> Traffic:
    """What each part receives when the float model runs eagerly on `batches` (every call), and
    which tensors one part's output hands to another part's input."""
    seen: dict[str, list[tuple]] = {p: [] for p in parts}
    ports = _PortSets()
    produced: dict[int, tuple[tuple[str, str], torch.Tensor]] = {}   # id -> (port, the tensor, held)
    batch = [0]
    handles = []

    def before(path: str) -> Callable:
        def record(module, args, kwargs):
            if kwargs:
                raise QCompileError(f"part {path!r} is called with keyword arguments {sorted(kwargs)}; "
                                    "name a part called with positional tensors (split=[...])")
            seen[path].append(tree_map_detach(args))
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    port = (path, f"input:{i}")
                    ports.add(port, (batch[0], id(a)), a.detach())
                    if id(a) in produced:
                        ports.union(produced[id(a)][0], port)
        return record

    def after(path: str) -> Callable:
        def record(module, args, output):
            for j, t in enumerate(tree_leaves(output)):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    port = (path, f"output:{j}")
                    ports.add(port, (batch[0], id(t)), t.detach())
                    produced[id(t)] = (port, t)     # held for the batch, so no other tensor takes its id
        return record

    for p in parts:
        handles.append(model.get_submodule(p).register_forward_pre_hook(before(p), with_kwargs=True))
        handles.append(model.get_submodule(p).register_forward_hook(after(p)))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for item in batches:
                args, kwargs = _as_call(item)
                model(*args, **kwargs)
                produced.clear()
                batch[0] += 1
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
    return Traffic(seen, ports.shared(parts))


def calibrate_boundaries(shared: list[tuple[list[tuple[str, str]], list[torch.Tensor]]],
                         observer_name: str) -> list[Boundary]:
    """One fixed observer per tensor passed between parts, calibrated on every value it carried."""
    boundaries = []
    for ports, values in shared:
        observer = make_observer(observer_name)
        for v in values:
            observer.update(v)
        boundaries.append(Boundary(ports, FixedObserver(observer)))
    return boundaries


class PartitionedModel(nn.Module):
    """A model whose traceable parts are compiled graphs; the rest of its forward runs eagerly
    in float on the host. Call it as the original model."""

    def __init__(self, root: nn.Module, parts: dict[str, Any], partition: Partition, target: Any,
                 boundaries: Sequence[Boundary] = ()):
        super().__init__()
        self.root = root
        object.__setattr__(self, "parts", dict(parts))       # path -> CompiledModel (also inside root)
        self.partition = partition
        self.target = target
        self.boundaries = list(boundaries)
        self.eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.root(*args, **kwargs)

    @property
    def weight_memory_bytes(self) -> float:
        return sum(p.weight_memory_bytes for p in self.parts.values())

    def port_quantizer(self, path: str, port: str) -> tuple[str, Any] | None:
        """(format name, QParams) of the quantizer at a part's port; None where it is not quantized."""
        part = self.parts[path]
        node = port_node(part.simulated, port)
        group = node.meta.get("group") if node is not None else None
        if group is None:
            return None
        g = part.plan.group(group)
        return g.format_name, g.params

    def boundary_table(self) -> str:
        """Every tensor passed between parts, and whether its ports hold one quantizer."""
        rows = []
        for b in self.boundaries:
            found = [self.port_quantizer(path, port) for path, port in b.ports]
            quantized = [q for q in found if q is not None]
            if len(quantized) < len(found):
                verdict = "float at " + ", ".join(f"{p}[{port}]" for (p, port), q in zip(b.ports, found) if q is None)
            elif all(same_quantizer(q, quantized[0]) for q in quantized):
                verdict = f"one quantizer ({quantized[0][0]})"
            else:
                verdict = "formats differ: " + ", ".join(sorted({q[0] for q in quantized}))
            rows.append(f"{b.describe()}: {verdict}")
        return "\n".join(rows) if rows else "(no tensor passes directly from one part to another)"

    def report(self) -> str:
        lines = [f"target {self.target.name}", "", "partition (hierarchical capture):", self.partition.table(),
                 "", "tensors passed between parts:", self.boundary_table()]
        for path, part in self.parts.items():
            lines += ["", f"== part {path} ==", str(part.report())]
        return "\n".join(lines)

    def lower(self, backend: str = "reference") -> dict[str, Any]:
        """Each compiled part lowered to `backend`, by module path."""
        return {path: part.lower(backend) for path, part in self.parts.items()}

    def render(self, path: str | os.PathLike[str], stage: str | None = None, **kwargs: Any) -> list[str]:
        """One drawing per part: `path` with the part's module path before the suffix
        (`model.svg` -> `model.backbone.svg`, ...); returns the files written. Where no renderer
        can draw the format, every part's DOT source is still written before the error says so."""
        from .drawing import DrawingUnavailable

        stem, suffix = os.path.splitext(os.fspath(path))
        written, missing = [], []
        for part_path, part in self.parts.items():
            try:
                written.append(part.render(f"{stem}.{part_path}{suffix}", stage, **kwargs))
            except DrawingUnavailable as exc:
                missing.append(exc)
        if missing:
            first = missing[0]
            raise DrawingUnavailable(os.fspath(path), ", ".join(e.dot_path for e in missing), first.reason, first.hint)
        return written

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write every part (`CompiledModel.save`, one directory each) and the partition as JSON.
        The host code is the float model's own forward, which a save never holds: read it back
        with `qcompiler.load(path, model=<the float model>)`."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / PARTITION_FILE).is_file())):
            raise ArtifactError(f"cannot save to {path}: it is not an empty directory or a previous save of a model "
                                f"compiled in parts (it has no {PARTITION_FILE}); choose a new or empty directory")
        path.mkdir(parents=True, exist_ok=True)
        folders = {}
        for i, (part_path, part) in enumerate(self.parts.items()):
            folders[part_path] = f"part{i:02d}"
            part.save(path / folders[part_path])
        document = {
            "format": PARTITION_FORMAT, "format_version": PARTITION_FORMAT_VERSION, "target": self.target.name,
            "parts": [{"module": p, "directory": folders[p]} for p in self.parts],
            "host": self.partition.host, "split": self.partition.split,
            "boundaries": [[list(port) for port in b.ports] for b in self.boundaries],
        }
        (path / PARTITION_FILE).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
        return str(path)


def same_quantizer(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    """Equal format names and equal parameters (scale, zero point, codebook)."""
    if a[0] != b[0]:
        return False
    pa, pb = a[1], b[1]
    if pa is None or pb is None:
        return pa is pb
    for key in ("scale", "zero_point", "codebook"):
        x, y = getattr(pa, key, None), getattr(pb, key, None)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def is_partitioned_save(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / PARTITION_FILE).is_file()


def load_partitioned(path: str | os.PathLike[str], model: nn.Module | None) -> PartitionedModel:
    """A model saved with `PartitionedModel.save`, its parts installed into a copy of `model`
    (the float model it was compiled from: its forward is the host code)."""
    from .compiled import load_compiled

    path = Path(path)
    try:
        document = json.loads((path / PARTITION_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path / PARTITION_FILE} cannot be read as a partitioned save: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != PARTITION_FORMAT:
        raise ArtifactError(f"{path / PARTITION_FILE} is not a {PARTITION_FORMAT} document")
    if document.get("format_version") != PARTITION_FORMAT_VERSION:
        raise ArtifactError(f"{path / PARTITION_FILE} has format_version {document.get('format_version')!r}; this "
                            f"qcompiler reads version {PARTITION_FORMAT_VERSION}")
    if model is None:
        raise ArtifactError(f"{path} holds a model compiled in parts; the code around the parts (pre- and "
                            "post-processing) is the float model's own forward, which a save never stores. Pass the "
                            "float model it was compiled from: qcompiler.load(path, model=float_model)")
    root = copy_sharing_tensors(model)
    parts = {}
    for entry in document.get("parts", []):
        module, folder = str(entry["module"]), str(entry["directory"])
        if "/" in folder or "\\" in folder or folder.startswith("."):
            raise ArtifactError(f"{path / PARTITION_FILE}: part directory {folder!r} must be a plain name inside the save")
        try:
            model.get_submodule(module)
        except AttributeError:
            raise ArtifactError(f"{path} compiled the submodule {module!r}, which {type(model).__name__} does not have; "
                                "pass the float model the save was compiled from") from None
        parts[module] = load_compiled(path / folder)
        set_submodule(root, module, parts[module])
    if not parts:
        raise ArtifactError(f"{path / PARTITION_FILE} lists no parts")
    partition = Partition(list(parts), host=dict(document.get("host", {})), split=dict(document.get("split", {})))
    boundaries = [Boundary([(str(p), str(port)) for p, port in ports]) for ports in document.get("boundaries", [])]
    return PartitionedModel(root, parts, partition, next(iter(parts.values())).target, boundaries)


@dataclass
class PartJob:
    """One part to compile: its module, what it received on every call, and the fixed observers
    of its ports that are boundaries ("input:i" / "output:j" -> observer)."""

    path: str
    module: nn.Module
    inputs: list[tuple]
    ports: dict[str, Any]


def compile_parts(model: nn.Module, partition: Partition, calib_items: Sequence[Any],
                  compile_all: Callable[[list[PartJob], list[Boundary]], dict[str, Any]], target: Any,
                  observer_name: str) -> PartitionedModel:
    """Compile every part on what it receives from `calib_items`, each tensor passed between two
    parts with one quantizer; install the parts in a copy of model."""
    traffic = record_traffic(model, partition.parts, calib_items)
    boundaries = calibrate_boundaries(traffic.shared, observer_name)
    jobs = [PartJob(path, model.get_submodule(path), traffic.inputs[path],
                    {port: b.observer for b in boundaries for p, port in b.ports if p == path})
            for path in partition.parts]
    compiled = compile_all(jobs, boundaries)
    root = copy_sharing_tensors(model)
    for path in partition.parts:
        set_submodule(root, path, compiled[path])
    return PartitionedModel(root, {p: compiled[p] for p in partition.parts}, partition, target, boundaries)
