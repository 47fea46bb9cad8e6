"""qcompile() and CompiledModel: the product's front door.

`qcompile` loads the target, checks the inputs, runs the pass pipeline and wraps the result in a
`CompiledModel`: an nn.Module whose forward is the simulated (fake-quant) model, with the plan,
the per-layer report, the cost figures and every stage of the pipeline to inspect or draw.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import fx, nn

from .context import CompileContext, as_input_tuple
from .errors import BudgetError, QCompileError
from .formats import HostFloat
from .pass_manager import PassManager, PassRun

DEFAULT_PASSES = (
    "capture", "canonicalize", "fold_bn", "fuse", "group_quantizers", "insert_observers",
    "calibrate", "convert", "optimize_rounding", "model_requant",
)
# The last stage whose graph still computes in float: the reference for per-node SQNR.
FLOAT_REFERENCE_STAGE = "fuse"


def with_allocation(manager: PassManager) -> PassManager:
    """The pipeline with `sensitivity` and `allocate_bits` just before `convert` (if not there)."""
    names = manager.names
    if "convert" not in names:
        raise QCompileError(f"a budget needs a convert stage to apply the allocation; the pipeline is {names}")
    out = PassManager(list(manager._stages))  # the caller's manager stays as it was
    for name in ("sensitivity", "allocate_bits"):
        if name not in out.names:
            out.insert(name, before="convert")
    return out


def _load_spec(target: Any) -> Any:
    from .targets.spec import TargetSpec, load_target

    if isinstance(target, TargetSpec):
        return target
    return load_target(target)


class CompiledModel(nn.Module):
    """A quantized model: call it to run the simulation; inspect it through its plan and report."""

    def __init__(self, simulated: fx.GraphModule, plan: Any, target: Any, groups: Sequence[Any] = (),
                 run: PassRun | None = None, float_graph: fx.GraphModule | None = None,
                 calib_batches: list | None = None, compile_seconds: float | None = None):
        super().__init__()
        self.simulated = simulated
        self.plan = plan
        self.target = target
        self.groups = list(groups)
        self._run = run
        # Kept outside nn.Module's registry: the float graph is a reference, not part of the model.
        object.__setattr__(self, "_float_graph", float_graph)
        self._calib_batches = calib_batches
        self.compile_seconds = compile_seconds
        self._report = None
        self.eval()

    def forward(self, *args: Any) -> Any:
        return self.simulated(*args)

    # -- the pipeline's stages ----------------------------------------------------------------
    @property
    def stages(self) -> list[str]:
        return list(self._run.stages) if self._run is not None else []

    @property
    def timings(self) -> dict[str, float]:
        return dict(self._run.timings) if self._run is not None else {}

    def graph(self, stage: str | None = None) -> fx.GraphModule:
        if stage is None:
            return self.simulated
        if self._run is None:
            raise QCompileError("a loaded model keeps only its final graph; stages exist right after qcompile()")
        return self._run.graph(stage)

    def render(self, path: str, stage: str | None = None, **kwargs: Any) -> str:
        from .drawing import render_graph

        return render_graph(self.graph(stage), path, **kwargs)

    # -- costs ------------------------------------------------------------------------------
    def _bits_of(self, gid: int) -> int:
        return self.plan.group(gid).format.bits

    def _scales_of(self, gid: int) -> int:
        p = self.plan.group(gid).params
        if p is None:
            return 0
        return int(p.codebook.numel() if p.codebook is not None else p.scale.numel())

    def cost(self, metric: str) -> float:
        """The value of one of the target's cost metrics for this model (e.g. "bops", "latency")."""
        from .cost import metric_total

        if metric not in self.target.cost:
            raise QCompileError(f"target {self.target.name!r} has no cost metric {metric!r}; it has {', '.join(self.target.cost)}")
        return metric_total(self.target, metric, self.simulated, self._bits_of, self._scales_of)

    @property
    def weight_memory_bytes(self) -> float:
        """What the weights occupy on the target, by the spec's `weight_memory` formula."""
        if "weight_memory" in self.target.cost:
            return self.cost("weight_memory")
        return float(sum(_weight_bytes_plain(g, self.simulated) for g in self.plan.groups if g.kind == "weight"))

    # -- the report ---------------------------------------------------------------------------
    def report(self) -> Any:
        if self._report is None:
            self._report = build_report(self)
        return self._report

    # -- lowering ----------------------------------------------------------------------------
    def lower(self, backend: str = "reference") -> fx.GraphModule:
        """The model for a backend: "reference" is the integer-only emulation of the target.

        It returns a `ReferenceModule` (an fx.GraphModule): float inputs are quantized by the
        input quantizer, kernels compute on integer codes, outputs are dequantized; its
        `codes(x)` gives the output codes.
        """
        if backend != "reference":
            raise QCompileError(f"unknown backend {backend!r}; available backends: reference")
        from .reference import build_reference

        return build_reference(self.simulated)

    # -- artifacts ---------------------------------------------------------------------------
    def export(self, path: str, format: str = "qpack") -> str:
        """Write the lowered model for a chip toolchain; "qpack" (docs/qpack.md) is the format."""
        if format != "qpack":
            raise QCompileError(f"unknown export format {format!r}; available: qpack (ONNX: export_onnx)")
        from .qpack import export_qpack

        return export_qpack(self, path)

    def save(self, path: str) -> str:
        from .artifact import save_compiled

        return save_compiled(self, path)

    def export_onnx(self, path: str, **kwargs: Any) -> Any:
        """Write a QDQ ONNX model that ONNX Runtime runs; see `qcompiler.onnx_export.export_onnx`."""
        from .onnx_export import export_onnx

        return export_onnx(self, path, **kwargs)


def _weight_bytes_plain(group: Any, gm: fx.GraphModule) -> float:
    numel = sum(gm.get_parameter(w).numel() for w in group.weights)
    return numel * group.format.bits / 8


def build_report(compiled: CompiledModel) -> Any:
    from .cost import batch_size, costed_nodes, node_variables
    from .report import BiasFit, Report, ReportRow, node_sqnr

    gm = compiled.simulated
    nodes = {n.name: n for n in gm.graph.nodes}
    kernels = costed_nodes(gm)
    names = [nodes[n.meta.get("fused_into", n.name)].name for n in kernels]
    sqnr = {}
    if compiled._float_graph is not None and compiled._calib_batches:
        sqnr = node_sqnr(compiled._float_graph, gm, names, compiled._calib_batches)
    wm = compiled.target.cost.get("weight_memory")
    batch = batch_size(gm)
    rows = []
    for kernel, out_name in zip(kernels, names):
        last = nodes[out_name]
        wg = kernel.meta.get("weight_group")
        ag = last.meta.get("group")
        variables = node_variables(gm, kernel, nodes, compiled._bits_of, compiled._scales_of, batch)
        host = kernel.meta.get("role") == "host"
        if wm is not None and not host:
            weight_bytes = wm.evaluate(**variables) if variables["params"] else 0.0
        else:
            weight_bytes = variables["params"] * 4.0
        rows.append(ReportRow(
            node=kernel.name if out_name == kernel.name else f"{kernel.name}..{out_name}",
            op_kind="+".join(kernel.meta["fusion"]) if "fusion" in kernel.meta else kernel.meta.get("op_kind", "?"),
            group=ag,
            weight_format=compiled.plan.group(wg).format_name if wg is not None else ("float" if variables["params"] else "-"),
            activation_format="host float" if host else (compiled.plan.group(ag).format_name if ag is not None else "float"),
            params=int(variables["params"]), weight_bytes=weight_bytes,
            sqnr_db=sqnr.get(out_name, float("nan")),
        ))
    weight_groups = [g for g in compiled.plan.groups if g.kind == "weight"]
    n_weights = sum(gm.get_parameter(w).numel() for g in weight_groups for w in g.weights)
    avg_bits = (sum(gm.get_parameter(w).numel() * g.format.bits for g in weight_groups for w in g.weights)
                / n_weights) if n_weights else 0.0
    totals = {
        "weight_memory_bytes": compiled.weight_memory_bytes,
        "average_weight_bits": avg_bits,
        "float_fallbacks": sum(1 for n in kernels if n.meta.get("role") == "host"),
        "quantizer_groups": len(compiled.plan.groups),
    }
    extra = compiled._run.ctx.extra if compiled._run is not None else {}
    if "sensitivity" in extra:
        table = extra["sensitivity"]
        totals["sensitivity"] = (f"{table.method}, {len(table.measured)} groups with a choice, "
                                 f"{table.samples} samples, {table.seconds:.1f} s")
    if "allocation" in extra:
        totals["bit allocation"] = extra["allocation"].summary()
    fits = tuple(BiasFit(node=n.name, channels=tuple(n.meta["bias_fit"]["channels"]),
                         bias_bits=int(n.meta["bias_fit"]["bias_bits"]),
                         scale_factor=float(n.meta["bias_fit"]["scale_factor"]),
                         bias_max=float(n.meta["bias_fit"]["bias_max"]))
                 for n in gm.graph.nodes if "bias_fit" in n.meta)
    if fits:
        totals["bias_fitted_channels"] = sum(len(f.channels) for f in fits)
    return Report(target=compiled.target.name, rows=tuple(rows), totals=totals, bias_fits=fits)


def qcompile(model: nn.Module, example_inputs: Any, *, target: Any = "npu-int8", calib_data: Any = None,
             budget: dict[str, Any] | None = None, observer: Any = None,
             passes: Sequence[Any] | PassManager | None = None, progress: bool = True, seed: int = 0,
             leaf_modules: Sequence[Any] = (), concrete_args: dict[str, Any] | None = None,
             sensitivity: str | None = None, host_fallback: bool = False) -> CompiledModel:
    """Compile a float model for a target; returns the simulated quantized model.

    example_inputs: a tensor or a tuple of tensors, batch dimension included.
    target: a built-in target name (see `qcompiler.list_targets()`), a path to a TOML spec, or a
        loaded TargetSpec.
    calib_data: a DataLoader or any iterable of tensors, tuples (extra items such as labels are
        ignored) or dicts; without it the model is calibrated on example_inputs alone (a warning).
    observer: an observer name for every activation, or a dict keyed by node name, op kind or
        "default"; the target's default otherwise.
    budget: limits on the target's cost metrics, e.g. {"weight_memory": "1.5 MiB"}, {"bops": 0.5}
        (a number in (0, 1] or "60%" is a fraction of the value with every group at the spec's
        default format), several at once. Mixed precision: the `sensitivity` and `allocate_bits`
        passes run before `convert` and pick the format of every group that has a choice.
    sensitivity: how `sensitivity` measures each (group, format): "hessian" (default) or "sqnr".
    host_fallback: with a budget, a kernel may also run in float on the host where the target's
        `[unsupported]` action is "host" (one more candidate, costed by `[unsupported.host_cost]`).
    """
    if not isinstance(model, nn.Module):
        raise QCompileError(f"qcompile needs a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise QCompileError(f"example_inputs[{i}] is a {type(x).__name__}; give a tensor or a tuple of tensors")
    spec = _load_spec(target)
    manager = passes if isinstance(passes, PassManager) else PassManager(list(passes or DEFAULT_PASSES))
    if budget is not None:
        from .passes.allocate_bits import check_metrics

        check_metrics(spec, budget)
        manager = with_allocation(manager)
    if sensitivity is not None:
        from .passes.sensitivity import METHODS

        if sensitivity not in METHODS:
            raise QCompileError(f"sensitivity={sensitivity!r} is not a method; choose one of {', '.join(METHODS)}")
    ctx = CompileContext(model=model, example_inputs=inputs, leaf_modules=tuple(leaf_modules),
                         concrete_args=concrete_args, target=spec, calib_data=calib_data,
                         observer=observer, budget=budget, progress=progress, seed=seed)
    if sensitivity is not None:
        ctx.extra["sensitivity_method"] = sensitivity
    ctx.extra["host_fallback"] = host_fallback
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        run = manager.run(model, ctx=ctx)
    seconds = time.perf_counter() - start
    if ctx.plan is None:
        raise QCompileError(f"the pipeline {manager.names} has no convert stage, so nothing was quantized")
    float_graph = run.snapshots.get(FLOAT_REFERENCE_STAGE)
    return CompiledModel(run.gm, ctx.plan, spec, ctx.groups, run=run, float_graph=float_graph,
                         calib_batches=ctx.calib_batches, compile_seconds=seconds)
