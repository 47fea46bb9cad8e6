"""Saved compiled models: a `model.json` and a `tensors.safetensors`, never code.

A save is a directory (a container of `qcompiler.graph_codec`). `model.json` holds the format
version, the target spec (its TOML text, so a custom spec file that is gone still loads), the
quantization plan and the simulated graph node by node; `tensors.safetensors` holds every tensor
(module parameters and buffers, get_attr constants, the plan's scales, zero points and
codebooks) under stable keys, and its SHA-256 is recorded in `model.json` so that corruption is
caught before anything is built. What may be in a graph, and how values are written, is the
codec's; this module lays out the document.
"""
from __future__ import annotations

import re
from pathlib import Path
import os
from typing import Any, NamedTuple

import torch
from safetensors.torch import save as st_save
from torch import fx, nn

from .errors import ArtifactError, QCompileError
from .formats import QParams
from .fx_util import fetch_attr
from .graph_codec import (
    CLASS_NAMES, FUNCTION_NAMESPACES, MODULE_CLASSES, ContainerReader, blob_record, construct_module, decode_format,
    decode_value, encode_format, encode_value, function_name, getattr_allowed, method_allowed, module_state,
    resolve_function, tensor_info, write_container,
)
from .meta import SAVED_NODE_META as META_KEYS
from .plan import GroupPlan, Plan, params_tensors
from .quantizers import FakeQuantize
from .version import __version__

FORMAT_NAME = "qcompiler-compiled-model"
FORMAT_VERSION = 1
MODEL_FILE = "model.json"
TENSOR_FILE = "tensors.safetensors"

# Type annotations of nodes only show in the generated code. Classes are saved by name from this
# table, string annotations (from `from __future__ import annotations`) as text of this shape;
# anything else is dropped.
NODE_TYPES: dict[str, type] = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}
_NODE_TYPE_NAMES = {t: name for name, t in NODE_TYPES.items()}
_ANNOTATION_TEXT = re.compile(r"[A-Za-z_][\w.\[\], ]{0,200}")
NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


class SavedModel(NamedTuple):
    """What a save holds: the simulated graph, its plan and its target spec."""

    simulated: fx.GraphModule
    plan: Plan
    target: Any


def _encode_group(g: GroupPlan) -> dict[str, Any]:
    params = None
    if g.params is not None:
        p = g.params
        params = {"axis": p.axis, "scale": tensor_info(p.scale),
                  "zero_point": None if p.zero_point is None else tensor_info(p.zero_point),
                  "codebook": None if p.codebook is None else tensor_info(p.codebook)}
    return {
        "id": g.id, "kind": g.kind, "tensors": list(g.tensors), "weights": list(g.weights),
        "owner": g.owner, "op_kind": g.op_kind, "candidates": list(g.candidates),
        "format_name": g.format_name, "format": encode_format(g.format), "params": params,
        "fallback": g.fallback,
    }


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def _owning_module(target: str, module_targets: set[str]) -> str | None:
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in module_targets:
            return prefix
    return None


def _save_module(gm: fx.GraphModule, node: fx.Node, plan: Plan, tensors: dict[str, torch.Tensor]
                 ) -> dict[str, Any]:
    target = node.target
    module = gm.get_submodule(target)
    if node.meta.get("opaque"):
        reason = gm.meta.get("opaque_modules", {}).get(target, "it could not be traced")
        raise ArtifactError(
            f"cannot save: module {target!r} ({type(module).__name__}) is an opaque leaf ({reason}); "
            "a saved model holds data, not Python code, so it cannot rebuild that module's forward. "
            "Make it traceable (concrete_args, or rewrite the data-dependent control flow) and "
            "compile again, or save only the traceable part of the model")
    class_name = CLASS_NAMES.get(type(module))
    if class_name is None:
        raise ArtifactError(
            f"cannot save: module {target!r} (node {node.name}) is a {type(module).__module__}."
            f"{type(module).__qualname__}, which a saved model cannot rebuild without its Python "
            f"code; saveable module classes are {', '.join(sorted(MODULE_CLASSES))}")
    args = MODULE_CLASSES[class_name][1](module)
    if isinstance(module, FakeQuantize):
        _check_fake_quantize(module, target, plan)
    where = f"module {target!r} ({class_name})"
    state = {}
    for name, (kind, t) in sorted(module_state(module).items()):
        state[name] = {"kind": kind, **tensor_info(t),
                       "requires_grad": bool(t.requires_grad) if kind == "parameter" else False}
        tensors[f"module.{target}.{name}"] = t
    return {"class": class_name, "args": {k: encode_value(v, where, nodes_ok=False) for k, v in args.items()},
            "state": state}


def _check_fake_quantize(module: FakeQuantize, target: str, plan: Plan) -> None:
    """A quantizer is saved as a reference to its plan group; refuse one that disagrees with it."""
    ok = 0 <= module.group < len(plan.groups)
    if ok:
        g = plan.group(module.group)
        ok = g.format == module.fmt and (
            (g.params is None and module.params is None)
            or (g.params is not None and module.params is not None and g.params.axis == module.params.axis
                and all(_same_tensor(getattr(g.params, f), getattr(module.params, f))
                        for f in ("scale", "zero_point", "codebook"))))
    if not ok:
        raise ArtifactError(
            f"cannot save: quantizer {target!r} (group {module.group}, {module.fmt.name}) does not match "
            "its group in the plan; a quantizer edited after compiling must be edited in the plan too")


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and torch.equal(a, b)


def _encode_graph(gm: fx.GraphModule, plan: Plan, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    nodes, modules, attrs = [], {}, {}
    module_targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for node in gm.graph.nodes:
        where = f"node {node.name} ({node.op} {node.target})"
        if node.op == "call_function":
            target = function_name(node.target)
            if target == "builtins.getattr" and not getattr_allowed(node.args):
                raise ArtifactError(f"cannot save: {where} reads attribute {node.args[1:]!r}; saved graphs read "
                                    "only public attributes with getattr")
            if target is None:
                fn = node.target
                raise ArtifactError(
                    f"cannot save: {where} calls {getattr(fn, '__module__', '?')}."
                    f"{getattr(fn, '__qualname__', repr(fn))}, which is not in the allowlist of functions a "
                    f"saved graph may call (public ops of {', '.join(FUNCTION_NAMESPACES)}: getattr only)")
        elif node.op == "call_method":
            target = node.target
            if not method_allowed(target):
                raise ArtifactError(f"cannot save: {where} calls method {target!r}, which is not an allowed "
                                    "torch.Tensor method")
        else:
            target = node.target
        if node.op == "call_module" and target not in modules:
            modules[target] = _save_module(gm, node, plan, tensors)
        elif node.op == "get_attr" and target not in attrs and _owning_module(target, module_targets) is None:
            value = fetch_attr(gm, target)
            if not isinstance(value, torch.Tensor):
                raise ArtifactError(f"cannot save: {where} reads a {type(value).__name__}; saved graphs "
                                    "read only tensors with get_attr")
            kind = "parameter" if isinstance(value, nn.Parameter) else "buffer"
            attrs[target] = {"kind": kind, **tensor_info(value),
                             "requires_grad": bool(value.requires_grad) if kind == "parameter" else False}
            tensors[f"attr.{target}"] = value
        meta = {k: encode_value(node.meta[k], f"{where} meta[{k!r}]", nodes_ok=False)
                for k in META_KEYS if k in node.meta}
        nodes.append({
            "name": node.name, "op": node.op, "target": target, "type": _encode_node_type(node.type),
            "args": [encode_value(a, where) for a in node.args],
            # Pairs, not an object: sort_keys would reorder them, and the order shows in the code.
            "kwargs": [[k, encode_value(v, where)] for k, v in node.kwargs.items()],
            "meta": meta,
        })
    return {"class_name": type(gm).__name__, "nodes": nodes, "modules": modules, "attrs": attrs}


def _encode_node_type(annotation: Any) -> dict[str, str] | None:
    if isinstance(annotation, str) and _ANNOTATION_TEXT.fullmatch(annotation):
        return {"text": annotation}
    name = _NODE_TYPE_NAMES.get(annotation) if isinstance(annotation, type) else None
    return None if name is None else {"class": name}


def _decode_node_type(data: Any) -> Any:
    if data is None:
        return None
    if isinstance(data, dict) and set(data) == {"class"} and data["class"] in NODE_TYPES:
        return NODE_TYPES[data["class"]]
    if (isinstance(data, dict) and set(data) == {"text"} and isinstance(data["text"], str)
            and _ANNOTATION_TEXT.fullmatch(data["text"])):
        return data["text"]
    raise ValueError(f"node type {data!r:.80} is neither one of {', '.join(NODE_TYPES)} nor annotation text")


def _encode_target(spec: Any) -> dict[str, Any]:
    if not getattr(spec, "text", ""):
        raise ArtifactError(
            f"cannot save: target {spec.name!r} has no TOML text to store (it was not loaded with "
            "load_target/loads_target); load the target from its spec file and compile again")
    # The file name only: a directory (often a temporary one) would make saves differ by machine.
    return {"name": spec.name, "version": str(spec.version), "source": Path(str(spec.source)).name,
            "toml": spec.text}


def _prepare_directory(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"cannot save to {path}: it exists and is not a directory; choose a new path")
    if path.is_dir() and any(path.iterdir()) and not (path / MODEL_FILE).is_file():
        raise ArtifactError(
            f"cannot save to {path}: the directory is not empty and is not a previous qcompiler save "
            f"(it has no {MODEL_FILE}); choose a new or empty directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create the save directory {path}: {exc.strerror or exc}") from None


def save_compiled(simulated: fx.GraphModule, plan: Plan, target: Any, path: str | os.PathLike[str]) -> str:
    """Write a compiled model (its simulated graph, plan and target) to the directory `path`.

    Refuses a non-empty directory that is not a previous save. Saves of equal compiles are
    byte-identical. Returns the path as a string.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    graph = _encode_graph(simulated, plan, tensors)
    target_record = _encode_target(target)
    for key, t in params_tensors(plan).items():
        tensors[f"plan.{key}"] = t
    # Clones: safetensors refuses tensors that share memory (tied weights, views of one buffer).
    blob = st_save({k: t.detach().contiguous().clone() for k, t in tensors.items()},
                   metadata={"format": "pt"})
    document = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "written_by": f"qcompiler {__version__}",
        "target": target_record,
        "plan": {"target": plan.target, "target_version": plan.target_version,
                 "groups": [_encode_group(g) for g in plan.groups]},
        "graph": graph,
        "tensors": blob_record(blob, file=TENSOR_FILE, count=len(tensors)),
    }
    _prepare_directory(path)
    write_container(path, MODEL_FILE, document, TENSOR_FILE, blob)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

class _Loader(ContainerReader):
    """Reads one save directory; every error names the file and the part of it that is wrong."""

    def __init__(self, path: Path):
        super().__init__(path, MODEL_FILE, TENSOR_FILE, format_name=FORMAT_NAME, format_version=FORMAT_VERSION,
                         kind="saved model", redo="save the model again")

    def tensor(self, key: str, info: Any, where: str, shape: tuple[int, ...] | None = None,
               cast: bool = True) -> torch.Tensor:
        # The plan's scales are stored as float32 whatever their dtype: cast them back.
        return super().tensor(key, info, where, shape, cast)

    # -- parts -------------------------------------------------------------------------------
    def target(self, data: Any) -> Any:
        from .targets.spec import loads_target

        if not isinstance(data, dict) or not isinstance(data.get("toml"), str):
            raise self.error("target", "missing the target spec's TOML text")
        # The spec's original file name, as recorded (no directory): loading it again, or saving
        # the loaded model, must not depend on where this save happens to live.
        source = data.get("source")
        if not isinstance(source, str) or not source or "/" in source or "\\" in source:
            source = f"{data.get('name')}.toml"
        try:
            spec = loads_target(data["toml"], source=source)
        except QCompileError as exc:
            raise self.error("target", f"the stored target spec does not load: {exc}") from None
        if spec.name != data.get("name") or str(spec.version) != data.get("version"):
            raise self.error("target", f"the stored spec is {spec.name!r} {spec.version!r} but the save "
                                       f"records {data.get('name')!r} {data.get('version')!r}")
        return spec

    def plan(self, data: Any) -> Plan:
        if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
            raise self.error("plan", "missing its list of groups")
        groups = []
        for i, g in enumerate(data["groups"]):
            where = f"plan.groups[{i}]"
            try:
                if g["id"] != i:
                    raise ValueError(f"group ids must be 0, 1, 2 ... in order, found {g['id']!r} at {i}")
                fmt = decode_format(g["format"])
                params = self.qparams(g["params"], i, where)
                groups.append(GroupPlan(
                    id=i, kind=_str(g["kind"]), tensors=_strs(g["tensors"]), weights=_strs(g["weights"]),
                    owner=_str(g["owner"]), op_kind=_str(g["op_kind"]), candidates=_strs(g["candidates"]),
                    format_name=_str(g["format_name"]), format=fmt, params=params, fallback=bool(g["fallback"]),
                ))
            except ArtifactError:
                raise
            except (KeyError, TypeError, ValueError) as exc:
                raise self.error(where, f"malformed ({type(exc).__name__}: {exc})") from None
        try:
            return Plan(target=_str(data.get("target")), target_version=_str(data.get("target_version")),
                        groups=tuple(groups))
        except TypeError as exc:
            raise self.error("plan", f"target and target_version must be strings ({exc})") from None

    def qparams(self, data: Any, gid: int, where: str) -> QParams | None:
        if data is None:
            return None
        parts = {}
        for part in ("scale", "zero_point", "codebook"):
            info = data[part]
            parts[part] = None if info is None else self.tensor(f"plan.group{gid}.{part}", info, f"{where}.{part}")
        axis = data["axis"]
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise ValueError(f"axis must be an integer or null, got {axis!r}")
        if parts["scale"] is None:
            raise ValueError("quantization parameters without a scale")
        return QParams(scale=parts["scale"], zero_point=parts["zero_point"], axis=axis, codebook=parts["codebook"])

    def module(self, target: str, data: Any, plan: Plan) -> nn.Module:
        where = f"graph.modules[{target!r}]"
        if not isinstance(data, dict) or not isinstance(data.get("args"), dict):
            raise self.error(where, "malformed module record")
        class_name = data.get("class")
        if not isinstance(class_name, str) or class_name not in MODULE_CLASSES:
            raise self.error(where, f"module class {class_name!r} is not one a saved model may contain "
                                    "(the file was written by another tool or has been tampered with)")
        try:
            kwargs = {k: decode_value(v, None) for k, v in data["args"].items()}
            module = construct_module(class_name, kwargs, plan)
        except (TypeError, ValueError, KeyError) as exc:
            raise self.error(where, f"cannot rebuild the {class_name} ({type(exc).__name__}: {exc})") from None
        saved = data.get("state", {})
        fresh = module_state(module)
        if not isinstance(saved, dict) or set(saved) != set(fresh):
            raise self.error(where, f"records tensors {sorted(saved) if isinstance(saved, dict) else saved!r} "
                                    f"but a {class_name} with these arguments has {sorted(fresh)}")
        for name, (kind, t) in fresh.items():
            info = saved[name]
            value = self.tensor(f"module.{target}.{name}", info, f"{where}.{name}", shape=tuple(t.shape))
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if kind == "parameter":
                value = nn.Parameter(value, requires_grad=bool(info.get("requires_grad", True)))
            setattr(owner, leaf, value)
        return module.eval()

    def graph(self, data: Any, plan: Plan) -> fx.GraphModule:
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
            raise self.error("graph", "missing its list of nodes")
        root = nn.Module()
        modules = data.get("modules", {})
        attrs = data.get("attrs", {})
        if not isinstance(modules, dict) or not isinstance(attrs, dict):
            raise self.error("graph", "'modules' and 'attrs' must be objects")
        # Parents before children, so that a module nested in another saved one replaces its copy.
        for target in sorted(modules, key=lambda t: (t.count("."), t)):
            _install(root, target, self.module(target, modules[target], plan), self)
        for target in sorted(attrs):
            info = attrs[target]
            t = self.tensor(f"attr.{target}", info, f"graph.attrs[{target!r}]")
            value = nn.Parameter(t, requires_grad=bool(info.get("requires_grad"))) if info.get("kind") == "parameter" else t
            _install(root, target, value, self)
        graph = fx.Graph()
        nodes: dict[str, fx.Node] = {}
        for i, record in enumerate(data["nodes"]):
            node = self.node(graph, nodes, record, modules, attrs, i)
            nodes[node.name] = node
        try:
            graph.lint()
            class_name = data.get("class_name", "GraphModule")
            if not isinstance(class_name, str) or not class_name.isidentifier():
                raise ValueError(f"class name {class_name!r} is not an identifier")
            gm = fx.GraphModule(root, graph, class_name)
        except Exception as exc:
            raise self.error("graph", f"does not form a valid graph ({type(exc).__name__}: {exc})") from None
        gm.meta["opaque_modules"] = {}
        return gm.eval()

    def node(self, graph: fx.Graph, nodes: dict[str, fx.Node], record: Any, modules: dict[str, Any],
             attrs: dict[str, Any], index: int) -> fx.Node:
        where = f"graph.nodes[{index}]"
        try:
            name, op, target = record["name"], record["op"], record["target"]
            where = f"graph.nodes[{index}] ({name})"
            if op not in NODE_OPS:
                raise ValueError(f"unknown node op {op!r}; one of {', '.join(NODE_OPS)}")
            if not isinstance(target, str):
                raise ValueError(f"target {target!r} must be a string")
            if op == "call_function":
                target = resolve_function(target)
            elif op == "call_method" and not method_allowed(target):
                raise ValueError(f"method {target!r} is not an allowed torch.Tensor method")
            elif op == "call_module" and target not in modules:
                raise ValueError(f"calls module {target!r}, which graph.modules does not define")
            elif op == "get_attr" and target not in attrs and _owning_module(target, set(modules)) is None:
                raise ValueError(f"reads {target!r}, which graph.attrs does not define")
            if not isinstance(record["args"], list) or not isinstance(record["kwargs"], list):
                raise ValueError("args must be a list and kwargs a list of [name, value] pairs")
            args = tuple(decode_value(a, nodes) for a in record["args"])
            if target is getattr and not getattr_allowed(args):
                raise ValueError(f"getattr reads {args[1:]!r:.80}; only public attribute names are allowed")
            kwargs = {}
            for pair in record["kwargs"]:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                        and pair[0].isidentifier()):
                    raise ValueError(f"a keyword argument is a [name, value] pair, got {pair!r:.80}")
                kwargs[pair[0]] = decode_value(pair[1], nodes)
            meta = record.get("meta", {})
            if not isinstance(meta, dict) or not set(meta) <= set(META_KEYS):
                raise ValueError(f"meta keys must be among {', '.join(META_KEYS)}")
            meta = {k: decode_value(v, None) for k, v in meta.items()}
            if not isinstance(name, str) or not name.isidentifier() or name in nodes:
                raise ValueError(f"node name {name!r} is not a fresh identifier")
            type_expr = _decode_node_type(record.get("type"))
        except (KeyError, TypeError, ValueError) as exc:
            raise self.error(where, f"{type(exc).__name__}: {exc}") from None
        node = graph.create_node(op, target, args, kwargs, name=name, type_expr=type_expr)
        if node.name != name:
            raise self.error(where, f"node name {name!r} is not usable in a graph (became {node.name!r})")
        node.meta.update(meta)
        return node


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r:.80}")
    return value


def _strs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list of strings, got {value!r:.80}")
    return tuple(_str(v) for v in value)


def _install(root: nn.Module, target: str, value: Any, loader: _Loader) -> None:
    """Put a module or tensor at the dotted path `target` under `root`, creating parents."""
    parts = target.split(".") if isinstance(target, str) else []
    if not parts or not all(p and (p.isidentifier() or p.isdigit()) for p in parts):
        raise loader.error("graph", f"{target!r} is not a valid dotted module path")
    owner = root
    for part in parts[:-1]:
        child = owner._modules.get(part)
        if child is None:
            if hasattr(owner, part):
                raise loader.error("graph", f"cannot place {target!r}: {part!r} is already a tensor")
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    leaf = parts[-1]
    try:
        if isinstance(value, nn.Module):
            owner.add_module(leaf, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    except (KeyError, TypeError, AttributeError) as exc:
        raise loader.error("graph", f"cannot place {target!r}: {exc}") from None


def load_compiled(path: str | os.PathLike[str]) -> SavedModel:
    """Read a model written by `save_compiled`: its final simulated graph, plan and target."""
    loader = _Loader(Path(path))
    doc = loader.read_document()
    loader.read_tensors(doc.get("tensors"))
    spec = loader.target(doc.get("target"))
    plan = loader.plan(doc.get("plan"))
    if (plan.target, plan.target_version) != (spec.name, str(spec.version)):
        raise loader.error("plan", f"was made for target {plan.target!r} {plan.target_version!r} but the "
                                   f"stored spec is {spec.name!r} {spec.version!r}")
    return SavedModel(loader.graph(doc.get("graph"), plan), plan, spec)
