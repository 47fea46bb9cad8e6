"""qpack: the lowered (reference) graph as a portable artifact for a chip toolchain.

A qpack is a directory with `graph.json` (ops, tensor shapes, formats, scales and zero points,
multipliers and shifts, accumulator widths, the target's name and version) and
`tensors.safetensors` (integer weights, int32 biases, requantization constants, quantizer
parameters), described in docs/qpack.md. `load_qpack` rebuilds the reference backend from it
without the model's Python code: ops come from a fixed vocabulary (integer kernels, quantize,
dequantize) or from the same allowlists as saved models (`qcompiler.graph_codec`), and the
directory is read with the same checks (`graph_codec.ContainerReader`).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import fx, nn

from .. import graph_codec as codec
from ..errors import ArtifactError
from ..exact import ADD_LEFT_SHIFT
from ..formats import QParams
from ..fx_util import fetch_attr
from ..plan import Plan
from .reference import (
    Dequantize, IntegerAdd, IntegerEmbedding, IntegerGlobalAvgPool, IntegerKernel, IntegerLayerNorm, IntegerLUT, IntegerMatmul,
    IntegerScale, IntegerSoftmax, OnCodes, Quantize, ReferenceModule, build_reference,
)

FORMAT_NAME = "qpack"
FORMAT_VERSION = 1
GRAPH_FILE = "graph.json"
TENSOR_FILE = "tensors.safetensors"
ADD_ATTRS = ("zero_points", "qmin", "qmax", "mode", "rounding", "left_shift")
SOFTMAX_ATTRS = ("dim", "is_causal", "out_zero_point", "qmin", "qmax", "out_multiplier")
MATMUL_ATTRS = ("zero_points", "qmin", "qmax", "mode", "rounding")
SCALE_ATTRS = ("zero_points", "qmin", "qmax", "negate", "mode", "rounding")
LAYER_NORM_ATTRS = ("size", "in_zero_point", "eps_codes", "out_zero_point", "qmin", "qmax", "in_gain_bits")
POOL_ATTRS = ("window", "keepdim", "in_zero_point", "out_zero_point", "out_qmin", "out_qmax", "mode", "rounding")
KERNEL_ATTRS = ("in_zero_point", "in_qmin", "in_qmax", "out_zero_point", "out_qmin", "out_qmax",
                "accumulator_bits", "mode", "rounding", "residual_qmin")


def _shapes(ref: ReferenceModule, example: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Every node's output shape and dtype, by running the reference once."""
    out: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if isinstance(value, torch.Tensor):
                out[n.name] = {"shape": list(value.shape), "dtype": codec.torch_enum_name(value.dtype)}
            return value

    with torch.no_grad():
        Recorder(ref).run(*example)
    return out


def _tensor(tensors: dict[str, torch.Tensor], index: dict[str, Any], key: str, t: torch.Tensor) -> str:
    t = t.detach().clone().contiguous()     # clones: safetensors refuses shared storage
    tensors[key] = t
    index[key] = codec.tensor_info(t)
    return key


def _op_record(op: str, node: fx.Node, module: nn.Module, attrs: tuple[str, ...], names: tuple[str, ...],
               tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> dict[str, Any]:
    """The record of an integer op: its attributes and its named tensors (stored in the tensor file)."""
    return {"op": op, "attrs": {k: getattr(module, k) for k in attrs},
            "tensors": {k: _tensor(tensors, index, f"{node.name}.{k}", getattr(module, k)) for k in names}}


def _quantizer_record(node: fx.Node, module: Quantize, tensors: dict, index: dict) -> dict[str, Any]:
    p = module.params
    record: dict[str, Any] = {
        "op": "dequantize" if isinstance(module, Dequantize) else "quantize",
        "group": module.group, "format": codec.encode_format(module.fmt),
        "axis": None if p is None else p.axis, "tensors": {},
    }
    if p is not None:
        for field in ("scale", "zero_point", "codebook"):
            value = getattr(p, field)
            if value is not None:
                record["tensors"][field] = _tensor(tensors, index, f"{node.name}.{field}", value)
    return record


def export_qpack(simulated: fx.GraphModule, plan: Plan, target: Any, path: str | os.PathLike[str]) -> str:
    """Write the reference backend of a compiled model as a qpack directory; returns its path."""
    path, spec = Path(path), target
    ref = build_reference(simulated, plan, target)
    placeholders = [n for n in simulated.graph.nodes if n.op == "placeholder"]
    example = []
    for n in placeholders:
        shape = n.meta.get("shape")
        if not isinstance(shape, tuple):
            raise ArtifactError(f"cannot export: input {n.name} has no recorded shape")
        dtype = n.meta.get("dtype")
        example.append(torch.zeros(shape, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32))
    shapes = _shapes(ref, tuple(example))
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    nodes = []
    for node in ref.graph.nodes:
        where = f"node {node.name}"
        record: dict[str, Any] = {"name": node.name}
        if node.op == "placeholder":
            record["op"] = "input"
        elif node.op == "output":
            continue
        elif node.op == "get_attr":
            record.update(op="constant", tensor=_tensor(tensors, index, f"{node.name}.value",
                                                        fetch_attr(ref, node.target)))
        elif node.op == "call_module":
            module = ref.get_submodule(node.target)
            if isinstance(module, Quantize):
                record.update(_quantizer_record(node, module, tensors, index))
            elif isinstance(module, IntegerKernel):
                record.update(op=f"{module.kind}_int", conv=module.conv,
                              attrs={k: getattr(module, k) for k in KERNEL_ATTRS},
                              tensors={k: _tensor(tensors, index, f"{node.name}.{k}", getattr(module, k))
                                       for k in IntegerKernel.TENSORS})
            elif isinstance(module, IntegerAdd):
                record.update(_op_record("add_int", node, module, ADD_ATTRS, IntegerAdd.TENSORS, tensors, index))
            elif isinstance(module, IntegerMatmul):
                record.update(_op_record("matmul_int", node, module, MATMUL_ATTRS, IntegerMatmul.TENSORS, tensors, index))
            elif isinstance(module, IntegerScale):
                record.update(_op_record("scale_int", node, module, SCALE_ATTRS, IntegerScale.TENSORS, tensors, index))
            elif isinstance(module, IntegerEmbedding):
                record.update(op="embedding_int",
                              tensors={"table": _tensor(tensors, index, f"{node.name}.table", module.table)})
            elif isinstance(module, IntegerLayerNorm):
                names = IntegerLayerNorm.TENSORS + (("in_gain",) if module.in_gain_bits else ())
                record.update(_op_record("layer_norm_int", node, module, LAYER_NORM_ATTRS, names, tensors, index))
            elif isinstance(module, IntegerSoftmax):
                record.update(op="softmax_int", attrs={k: getattr(module, k) for k in SOFTMAX_ATTRS},
                              tensors={"exp_table": _tensor(tensors, index, f"{node.name}.exp_table", module.exp_table)})
            elif isinstance(module, IntegerLUT):
                record.update(op="lut_int", attrs={"in_qmin": module.in_qmin},
                              tensors={"table": _tensor(tensors, index, f"{node.name}.table", module.table)})
            elif isinstance(module, IntegerGlobalAvgPool):
                record.update(op="global_avg_pool_int", attrs={k: getattr(module, k) for k in POOL_ATTRS},
                              tensors={k: _tensor(tensors, index, f"{node.name}.{k}", getattr(module, k))
                                       for k in IntegerGlobalAvgPool.TENSORS})
            else:
                on_codes = isinstance(module, OnCodes)
                inner = module.inner if on_codes else module
                class_name = codec.CLASS_NAMES.get(type(inner))
                if class_name is None or isinstance(inner, (Quantize, IntegerKernel)):
                    raise ArtifactError(f"cannot export: {where} runs a {type(inner).__name__}, which a qpack "
                                        "cannot describe")
                args = codec.MODULE_CLASSES[class_name][1](inner)
                record.update(op="module", on_codes=on_codes, **{"class": class_name},
                              module_args={k: codec.encode_value(v, where, nodes_ok=False) for k, v in args.items()},
                              tensors={name: _tensor(tensors, index, f"{node.name}.{name}", t)
                                       for name, (_, t) in sorted(codec.module_state(inner).items())})
        elif node.op == "call_function":
            function = codec.function_name(node.target)
            if function is None or (function == "builtins.getattr" and not codec.getattr_allowed(node.args)):
                raise ArtifactError(f"cannot export: {where} calls {node.target!r}, outside the allowlist")
            record.update(op="function", target=function)
        else:
            if not codec.method_allowed(node.target):
                raise ArtifactError(f"cannot export: {where} calls method {node.target!r}")
            record.update(op="method", target=node.target)
        record["args"] = [codec.encode_value(a, where) for a in node.args]
        record["kwargs"] = [[k, codec.encode_value(v, where)] for k, v in node.kwargs.items()]
        if node.name in shapes:
            record["out"] = shapes[node.name]
        nodes.append(record)
    float_out = next(n for n in ref.graph.nodes if n.op == "output").args[0]
    codes_out = next(n for n in ref.code_graph.graph.nodes if n.op == "output").args[0]
    blob = st_save(tensors) if tensors else st_save({"_empty": torch.zeros(0)})
    document = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "target": {"name": spec.name, "version": str(spec.version),
                   "requant": {"mode": spec.requant.mode, "rounding": spec.requant.rounding,
                               "multiplier_bits": spec.requant.multiplier_bits}},
        "nodes": nodes,
        "outputs": {"float": codec.encode_value(float_out, "output"), "codes": codec.encode_value(codes_out, "output")},
        "tensors": codec.blob_record(blob, file=TENSOR_FILE, index=index),
    }
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    codec.write_container(path, GRAPH_FILE, document, TENSOR_FILE, blob)
    return str(path)


class _QpackLoader(codec.ContainerReader):
    def __init__(self, path: Path):
        super().__init__(path, GRAPH_FILE, TENSOR_FILE, format_name=FORMAT_NAME, format_version=FORMAT_VERSION,
                         kind="qpack", redo="export the model again")
        self.index: dict[str, Any] = {}

    def document(self) -> dict[str, Any]:
        doc = self.read_document()
        info = doc.get("tensors")
        if not isinstance(info, dict) or not isinstance(info.get("index"), dict):
            raise self.error("tensors", "missing the tensor index")
        self.read_tensors(info)
        self.index = info["index"]
        return doc

    def indexed(self, key: Any, where: str) -> torch.Tensor:
        """A tensor the node records name, checked against the tensor index."""
        if not isinstance(key, str) or key not in self.index:
            raise self.error(where, f"names tensor {key!r}, which the tensor index does not list")
        return self.tensor(key, self.index[key], where)

    def module(self, record: dict[str, Any], where: str) -> nn.Module:
        op = record["op"]
        tensors = record.get("tensors", {})
        if not isinstance(tensors, dict):
            raise ValueError("'tensors' must be an object")
        if op in ("quantize", "dequantize"):
            fmt = codec.decode_format(record["format"])
            params = None
            if "scale" in tensors:
                params = QParams(scale=self.indexed(tensors["scale"], where),
                                 zero_point=self.indexed(tensors["zero_point"], where) if "zero_point" in tensors else None,
                                 axis=record.get("axis"),
                                 codebook=self.indexed(tensors["codebook"], where) if "codebook" in tensors else None)
            cls = Dequantize if op == "dequantize" else Quantize
            return cls(int(record["group"]), fmt, params)
        if op in ("conv2d_int", "linear_int"):
            attrs = record["attrs"]
            if not isinstance(attrs, dict) or set(attrs) != set(KERNEL_ATTRS):
                raise ValueError(f"integer kernel attrs must be {', '.join(KERNEL_ATTRS)}")
            if set(tensors) != set(IntegerKernel.TENSORS):
                raise ValueError(f"integer kernel tensors must be {', '.join(IntegerKernel.TENSORS)}, got {sorted(tensors)}")
            conv = record.get("conv", {})
            if not isinstance(conv, dict):
                raise ValueError("'conv' must be an object")
            return IntegerKernel(op.removesuffix("_int"), conv, **attrs,
                                 tensors={k: self.indexed(v, where) for k, v in tensors.items()})
        if op == "add_int":
            attrs = record["attrs"]
            if isinstance(attrs, dict) and "left_shift" not in attrs:
                attrs = {**attrs, "left_shift": ADD_LEFT_SHIFT}  # packs written before it was recorded used 20
            if not isinstance(attrs, dict) or set(attrs) != set(ADD_ATTRS) or set(tensors) != set(IntegerAdd.TENSORS):
                raise ValueError(f"an add_int has attrs {', '.join(ADD_ATTRS)} and tensors {', '.join(IntegerAdd.TENSORS)}")
            return IntegerAdd(**attrs, tensors={k: self.indexed(v, where) for k, v in tensors.items()})
        if op == "matmul_int":
            attrs = record["attrs"]
            if not isinstance(attrs, dict) or set(attrs) != set(MATMUL_ATTRS) or set(tensors) != set(IntegerMatmul.TENSORS):
                raise ValueError(f"a matmul_int has attrs {', '.join(MATMUL_ATTRS)} and tensors multiplier, shift")
            return IntegerMatmul(**attrs, tensors={k: self.indexed(v, where) for k, v in tensors.items()})
        if op == "scale_int":
            attrs = record["attrs"]
            if not isinstance(attrs, dict) or set(attrs) != set(SCALE_ATTRS) or set(tensors) != set(IntegerScale.TENSORS):
                raise ValueError(f"a scale_int has attrs {', '.join(SCALE_ATTRS)} and tensors multiplier, shift")
            return IntegerScale(**attrs, tensors={k: self.indexed(v, where) for k, v in tensors.items()})
        if op == "embedding_int":
            if set(tensors) != set(IntegerEmbedding.TENSORS):
                raise ValueError("an embedding_int has the tensor table")
            return IntegerEmbedding(tensors={k: self.indexed(v, where) for k, v in tensors.items()})
        if op == "layer_norm_int":
            attrs = record["attrs"]
            if isinstance(attrs, dict) and "in_gain_bits" not in attrs:
                attrs = {**attrs, "in_gain_bits": 0}        # packs written before input gains existed
            names = set(IntegerLayerNorm.TENSORS) | ({"in_gain"} if isinstance(attrs, dict) and attrs.get("in_gain_bits") else set())
            if not isinstance(attrs, dict) or set(attrs) != set(LAYER_NORM_ATTRS) or set(tensors) != names:
                raise ValueError(f"a layer_norm_int has attrs {', '.join(LAYER_NORM_ATTRS)} and tensors gain, offset "
                                 "(and in_gain when in_gain_bits is not 0)")
            return IntegerLayerNorm(**attrs, tensors={k: self.indexed(v, where) for k, v in tensors.items()})
        if op == "softmax_int":
            attrs = record["attrs"]
            if not isinstance(attrs, dict) or set(attrs) != set(SOFTMAX_ATTRS) or set(tensors) != set(IntegerSoftmax.TENSORS):
                raise ValueError(f"a softmax_int has attrs {', '.join(SOFTMAX_ATTRS)} and tensors exp_table")
            return IntegerSoftmax(**attrs, tensors={k: self.indexed(v, where) for k, v in tensors.items()})
        if op == "lut_int":
            attrs = record["attrs"]
            if not isinstance(attrs, dict) or set(attrs) != {"in_qmin"} or set(tensors) != set(IntegerLUT.TENSORS):
                raise ValueError("a lut_int has attrs in_qmin and tensors table")
            return IntegerLUT(**attrs, tensors={k: self.indexed(v, where) for k, v in tensors.items()})
        if op == "global_avg_pool_int":
            attrs = record["attrs"]
            if not isinstance(attrs, dict) or set(attrs) != set(POOL_ATTRS) or set(tensors) != set(IntegerGlobalAvgPool.TENSORS):
                raise ValueError(f"a global_avg_pool_int has attrs {', '.join(POOL_ATTRS)} and tensors "
                                 f"{', '.join(IntegerGlobalAvgPool.TENSORS)}")
            return IntegerGlobalAvgPool(**attrs, tensors={k: self.indexed(v, where) for k, v in tensors.items()})
        if op == "module":
            class_name = record.get("class")
            if class_name not in codec.MODULE_CLASSES or class_name.startswith("qcompiler.quantizers") \
                    or class_name.startswith("qcompiler.exact"):
                raise ValueError(f"module class {class_name!r} is not one a qpack may contain")
            kwargs = {k: codec.decode_value(v, None) for k, v in record["module_args"].items()}
            module = codec.construct_module(class_name, kwargs, None)
            fresh = codec.module_state(module)
            if set(fresh) != set(tensors):
                raise ValueError(f"a {class_name} has tensors {sorted(fresh)}, the record lists {sorted(tensors)}")
            for name, (kind, t) in fresh.items():
                value = self.indexed(tensors[name], where)
                if tuple(value.shape) != tuple(t.shape):
                    raise ValueError(f"tensor {name} has shape {tuple(value.shape)}, a {class_name} with these "
                                     f"arguments needs {tuple(t.shape)}")
                owner_path, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_path) if owner_path else module
                setattr(owner, leaf, nn.Parameter(value, requires_grad=False) if kind == "parameter" else value)
            return OnCodes(module) if record.get("on_codes") else module
        raise ValueError(f"unknown op {op!r}")

    def build(self, doc: dict[str, Any]) -> ReferenceModule:
        records = doc.get("nodes")
        if not isinstance(records, list):
            raise self.error("nodes", "must be a list")
        root = nn.Module()
        graph = fx.Graph()
        nodes: dict[str, fx.Node] = {}
        for i, record in enumerate(records):
            where = f"nodes[{i}]"
            try:
                if not isinstance(record, dict):
                    raise ValueError("a node record must be an object")
                name, op = record["name"], record["op"]
                where = f"nodes[{i}] ({name})"
                if not isinstance(name, str) or not name.isidentifier() or name in nodes or hasattr(root, name):
                    raise ValueError(f"node name {name!r} is not a fresh identifier")
                args = tuple(codec.decode_value(a, nodes) for a in record.get("args", []))
                kwargs = {}
                for pair in record.get("kwargs", []):
                    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                        raise ValueError(f"a keyword argument is a [name, value] pair, got {pair!r:.80}")
                    kwargs[pair[0]] = codec.decode_value(pair[1], nodes)
                if op == "input":
                    fx_op, target = "placeholder", name
                elif op == "constant":
                    root.register_buffer(name, self.indexed(record["tensor"], where))
                    fx_op, target = "get_attr", name
                elif op == "function":
                    fx_op, target = "call_function", codec.resolve_function(record["target"])
                    if target is getattr and not codec.getattr_allowed(args):
                        raise ValueError("getattr reads only public attributes")
                elif op == "method":
                    fx_op, target = "call_method", record["target"]
                    if not codec.method_allowed(target):
                        raise ValueError(f"method {target!r} is not an allowed tensor method")
                else:
                    root.add_module(name, self.module(record, where))
                    fx_op, target = "call_module", name
                node = graph.create_node(fx_op, target, args, kwargs, name=name)
                if node.name != name:
                    raise ValueError(f"node name {name!r} is not usable in a graph")
            except ArtifactError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise self.error(where, f"{type(exc).__name__}: {exc}") from None
            except Exception as exc:  # a constructor's own checks (QCompileError and kin)
                raise self.error(where, f"{type(exc).__name__}: {exc}") from None
            nodes[name] = node
        outputs = doc.get("outputs")
        if not isinstance(outputs, dict) or set(outputs) != {"float", "codes"}:
            raise self.error("outputs", "must give the 'float' and 'codes' outputs")
        try:
            float_out = codec.decode_value(outputs["float"], nodes)
            codes_out = codec.decode_value(outputs["codes"], nodes)
        except ValueError as exc:
            raise self.error("outputs", str(exc)) from None
        code_graph = copy.deepcopy(graph)
        by_name = {n.name: n for n in code_graph.nodes}
        graph.output(float_out)
        code_graph.output(fx.node.map_arg(codes_out, lambda a: by_name[a.name]))
        try:
            graph.lint()
            module = ReferenceModule(root, graph, class_name="ReferenceModule")
            codes = fx.GraphModule(root, code_graph, class_name="ReferenceCodes")
        except Exception as exc:
            raise self.error("nodes", f"do not form a valid graph ({type(exc).__name__}: {exc})") from None
        codes.graph.eliminate_dead_code()
        codes.recompile()
        module.code_graph = codes
        module.meta["target"] = doc.get("target")
        return module.eval()


def load_qpack(path: str | os.PathLike[str]) -> ReferenceModule:
    """The reference backend stored in a qpack directory (no model code needed)."""
    loader = _QpackLoader(Path(path))
    return loader.build(loader.document())
