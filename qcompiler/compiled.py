"""CompiledModel: what `qcompile` returns, and the one way any run becomes one.

A `CompiledModel` is an nn.Module whose forward is the simulated (fake-quant) model, with the
plan, the per-layer report, the cost figures and every stage of the pipeline to inspect or draw.
`CompiledModel.from_run` finishes a pipeline run (qcompile, pareto and every sweep use it);
`load_compiled` rebuilds one from a save. Lowering and export go through the backend table
(`qcompiler.backends`), saving through `qcompiler.artifact`.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from torch import fx, nn

from . import backends
from .artifact import load_compiled as read_saved
from .artifact import save_compiled
from .cost import batch_size, costed_nodes, metric_total, node_variables
from .errors import QCompileError
from .pass_manager import PassRun
from .reconstruction import reconstruction_summary
from .report import BiasFit, Report, ReportRow, node_sqnr


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
        self._report: Report | None = None
        self.eval()

    @classmethod
    def from_run(cls, run: PassRun) -> "CompiledModel":
        """The compiled model a finished pipeline run produced."""
        ctx = run.ctx
        if ctx.plan is None:
            raise QCompileError(f"the pipeline {run.stages} has no convert stage, so nothing was quantized")
        return cls(run.gm, ctx.plan, ctx.target, ctx.groups, run=run, float_graph=run.float_graph,
                   calib_batches=ctx.calib_batches, compile_seconds=run.seconds)

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
        if metric not in self.target.cost:
            raise QCompileError(f"target {self.target.name!r} has no cost metric {metric!r}; it has {', '.join(self.target.cost)}")
        return metric_total(self.target, metric, self.simulated, self._bits_of, self._scales_of)

    @property
    def weight_memory_bytes(self) -> float:
        """What the weights occupy on the target, by the spec's `weight_memory` formula."""
        if "weight_memory" in self.target.cost:
            return self.cost("weight_memory")
        return float(sum(sum(self.simulated.get_parameter(w).numel() for w in g.weights) * g.format.bits / 8
                         for g in self.plan.groups if g.kind == "weight"))

    # -- the report ---------------------------------------------------------------------------
    def report(self) -> Report:
        if self._report is None:
            self._report = build_report(self)
        return self._report

    # -- backends -----------------------------------------------------------------------------
    def lower(self, backend: str = "reference") -> Any:
        """The model for a backend (`qcompiler.backends`): "reference" is the integer-only
        emulation of the target, a `ReferenceModule` (an fx.GraphModule): float inputs are
        quantized by the input quantizer, kernels compute on integer codes, outputs are
        dequantized; its `codes(x)` gives the output codes."""
        return backends.lower(backend, self.simulated, self.plan, self.target)

    def export(self, path: str | os.PathLike[str], format: str = "qpack", **options: Any) -> Any:
        """Write the model for a toolchain: "qpack" (docs/qpack.md) or "onnx" (see `export_onnx`)."""
        return backends.export(format, self.simulated, self.plan, self.target, path, **options)

    def export_onnx(self, path: str | os.PathLike[str], **options: Any) -> Any:
        """Write a QDQ ONNX model that ONNX Runtime runs (opset=21, strict=False, dynamic_batch=True);
        returns the path and the notes of what ONNX could not express exactly."""
        return self.export(path, format="onnx", **options)

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the model as data (JSON + safetensors, no code); `qcompiler.load` reads it back."""
        return save_compiled(self.simulated, self.plan, self.target, path)


def load_compiled(path: str | os.PathLike[str]) -> CompiledModel:
    """A model saved with `CompiledModel.save`: its final graph, plan and target (no stages)."""
    saved = read_saved(path)
    return CompiledModel(saved.simulated, saved.plan, saved.target)


def build_report(compiled: CompiledModel) -> Report:
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
    totals: dict[str, Any] = {
        "weight_memory_bytes": compiled.weight_memory_bytes,
        "average_weight_bits": avg_bits,
        "float_fallbacks": sum(1 for n in kernels if n.meta.get("role") == "host"),
        "quantizer_groups": len(compiled.plan.groups),
    }
    ctx = compiled._run.ctx if compiled._run is not None else None
    if ctx is not None and ctx.front_end != "torch.fx":
        totals["captured_by"] = ctx.front_end
    if ctx is not None and ctx.sensitivity is not None:
        table = ctx.sensitivity
        totals["sensitivity"] = (f"{table.method}, {len(table.measured)} groups with a choice, "
                                 f"{table.samples} samples, {table.seconds:.1f} s")
    if ctx is not None and ctx.allocation_result is not None:
        totals["bit allocation"] = ctx.allocation_result.summary()
        steps = ctx.allocation_result.extra.get("quality_search", [])[1:]
        if steps:
            totals["accuracy-target search"] = " | ".join(f"{i}. {line}" for i, line in enumerate(steps, 1))
    if ctx is not None and ctx.reconstruction:
        totals["reconstruction"] = reconstruction_summary(ctx.reconstruction)
    fits = tuple(BiasFit(node=n.name, channels=tuple(n.meta["bias_fit"]["channels"]),
                         bias_bits=int(n.meta["bias_fit"]["bias_bits"]),
                         scale_factor=float(n.meta["bias_fit"]["scale_factor"]),
                         bias_max=float(n.meta["bias_fit"]["bias_max"]))
                 for n in gm.graph.nodes if "bias_fit" in n.meta)
    if fits:
        totals["bias_fitted_channels"] = sum(len(f.channels) for f in fits)
    return Report(target=compiled.target.name, rows=tuple(rows), totals=totals, bias_fits=fits)
