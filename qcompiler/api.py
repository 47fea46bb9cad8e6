"""qcompile(): the product's front door.

`qcompile` checks the inputs, loads the target, runs the pass pipeline (`PassManager`) and
returns the `CompiledModel` that run produced. `pipeline` gives the pass list a compile runs,
which `pareto` and every sweep share.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from .allocation import absolute_budgets, build_problem, check_metrics, combine_problems, solve_allocation
from .allocator import reuse_freed_memory
from .calibration import as_channels_last, calibration_batches
from .compiled import CompiledModel
from .context import CompileContext, as_input_tuple
from .errors import CaptureError, QCompileError
from .executor import check_executor, map_tasks
from .fx_util import port_node
from .options import CompileOptions
from .passes.insert_observers import default_observer_name
from .pass_manager import PassManager, PassRun
from .plan_check import check_plan
from .quality_search import compile_to_quality, read_quality_target
from .targets.spec import TargetSpec, load_target
from .threads import torch_threads

DEFAULT_PASSES = (
    "capture", "canonicalize", "fold_bn", "fuse", "balance_residual", "group_quantizers", "insert_observers",
    "calibrate", "convert", "optimize_rounding", "model_requant",
)


def load_spec(target: Any) -> TargetSpec:
    """A TargetSpec as given, or loaded from a built-in name or a spec file path."""
    return target if isinstance(target, TargetSpec) else load_target(target)


def pipeline(passes: Sequence[Any] | PassManager | None = None, *, budget: bool = False) -> PassManager:
    """The PassManager a compile runs: `passes` (the default pipeline if None); with a budget,
    `sensitivity` and `allocate_bits` join just before `convert` unless they are there."""
    manager = passes.copy() if isinstance(passes, PassManager) else PassManager(list(passes or DEFAULT_PASSES))
    if budget:
        if "convert" not in manager.names:
            raise QCompileError(f"a budget needs a convert stage to apply the allocation; the pipeline is {manager.names}")
        manager.ensure("sensitivity", before="convert").ensure("allocate_bits", before="convert")
    return manager


def check_inputs(model: Any, example_inputs: Any) -> tuple[Any, ...]:
    if not isinstance(model, nn.Module):
        raise QCompileError(f"qcompile needs a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise QCompileError(f"example_inputs[{i}] is a {type(x).__name__}; give a tensor or a tuple of tensors")
    return inputs


def start_run(manager: PassManager, model: nn.Module, example_inputs: Any, target: Any, calib_data: Any,
              options: CompileOptions, stop: str | None = None) -> PassRun:
    """Run `manager` on `model` (through `stop`), seeded by `options.seed` without touching the
    caller's random state: the one way every compile and sweep starts."""
    spec = load_spec(target)
    if options.budget is not None:
        check_metrics(spec, options.budget)
    ctx = CompileContext(model=model, example_inputs=check_inputs(model, example_inputs), target=spec,
                         calib_data=calib_data, options=options)
    return resume(manager, ctx=ctx, model=model, stop=stop)


def resume(manager: PassManager, *, run: PassRun | None = None, ctx: CompileContext | None = None,
           model: nn.Module | None = None, start: str | None = None, stop: str | None = None) -> PassRun:
    """Run (or continue `run`) under the run's seed and thread count (`qcompiler.threads`), with
    freed buffers kept for reuse (`qcompiler.allocator`), restoring the caller's random state,
    thread count and malloc settings after."""
    options = (run.ctx if run is not None else ctx).options
    with torch.random.fork_rng(devices=[]), torch_threads(options.threads), reuse_freed_memory():
        torch.manual_seed(options.seed)
        if run is not None:
            return manager.run(resume=run, start=start, stop=stop)
        return manager.run(model, ctx=ctx, start=start, stop=stop)


def qcompile(model: nn.Module, example_inputs: Any, *, target: Any = "npu-int8", calib_data: Any = None,
             budget: dict[str, Any] | None = None, observer: Any = None,
             passes: Sequence[Any] | PassManager | None = None, progress: bool = True, seed: int = 0,
             leaf_modules: Sequence[Any] = (), concrete_args: dict[str, Any] | None = None,
             sensitivity: str | None = None, host_fallback: bool = False,
             reconstruction: Any = None, plan_check: bool | None = None, validation_data: Any = None,
             split: Sequence[str] | None = None, threads: int | None = None,
             target_quality: dict[str, Any] | None = None, effort: str = "default",
             executor: str = "local") -> CompiledModel:
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
    sensitivity: how `sensitivity` measures each (group, format): "sqnr" (default), "hessian", or
        "adaround" (sqnr after a short AdaRound of each weight candidate).
    host_fallback: with a budget, a kernel may also run in float on the host where the target's
        `[unsupported]` action is "host" (one more candidate, costed by `[unsupported.host_cost]`).
    reconstruction: how `optimize_rounding` fits the integer weights to float: "layer" (default,
        per-kernel AdaRound), "block" (each residual block jointly, with learned activation steps)
        or "model" (EPTQ's whole-model Hessian-weighted distillation); or a ReconstructionConfig.
    plan_check: with a budget, also finish the compile with the widest uniform plan that fits and
        keep whichever plan's output is closer to float (`qcompiler.plan_check`); this runs the
        passes after `convert` twice when the two plans differ. None (default): on, except with
        effort="fast".
    validation_data: batches the plan check and the accuracy-target search measure on (like
        calib_data); the calibration data if None (optimistic: give data the compile did not see).
    target_quality: instead of a budget, the least output quality to reach at the lowest cost,
        e.g. {"sqnr_db": 25} or {"top1_agreement": 0.95}, optionally with "cost" (the metric to
        minimise, "weight_memory" by default), "max_evaluations" (8) and "tolerance" (0.01).
        A binary + interpolation search over budgets finishes and measures a few plans on
        validation_data and keeps the cheapest that meets it (`qcompiler.quality_search`); the
        report lists every plan tried.
    split: module paths to compile as separate graphs while the rest of the forward runs eagerly
        in float (`qcompiler.partition`). Without it, a model whose root torch.fx cannot trace
        (a detector: resizing, anchors, box decoding, NMS) is split automatically into its
        largest traceable parts, and a `PartitionedModel` is returned; example_inputs and every
        calib_data item are then whatever the model's forward takes (a list of images). A tensor
        passed between parts has one quantizer, and a budget spans all parts; target_quality,
        plan_check=True and validation_data are refused there.
    threads: torch threads while the passes run. None (default): the cores this process may use
        that other processes leave free, at most torch's own setting (`qcompiler.threads`); a
        busy machine then gets no spinning threads. The plan does not depend on it; on large
        models the optimised rounding may differ in the last bits (`qcompiler.threads`), so fix
        it where artifacts must match bit for bit.
    effort: "fast", "default" or "best" (`qcompiler.options.EFFORT_SETTINGS`): "fast" calibrates
        on the first 64 samples, runs a third of AdaRound's steps over a quarter of its samples
        and skips the plan check; "best" runs three times the steps over twice the samples.
        What each costs and gives is in benchmarks/speed_effort.md.
    executor: "local" (default) or "ray": with a budget, the sensitivity of the groups is measured
        in Ray tasks (`qcompiler.executor`: a local Ray instance, or the cluster RAY_ADDRESS names).
        The model is the same either way.
    """
    def in_parts(parts: Sequence[str] | None) -> Any:
        unsupported = [name for name, given in (("target_quality", target_quality is not None),
                                                ("plan_check=True", plan_check is True),
                                                ("validation_data", validation_data is not None)) if given]
        if unsupported:
            raise QCompileError(f"{type(model).__name__} is compiled in parts (its root cannot be traced, or split= "
                                f"names the parts), which does not support {', '.join(unsupported)} yet: give a "
                                "budget= instead, or compile a traceable submodule on its own")
        return _compile_partitioned(model, example_inputs, target, calib_data, parts, budget=budget, observer=observer,
                                    passes=passes, progress=progress, seed=seed, leaf_modules=leaf_modules,
                                    sensitivity=sensitivity, reconstruction=reconstruction, threads=threads,
                                    effort=effort, executor=executor, host_fallback=host_fallback)

    if split is not None:
        return in_parts(split)
    try:
        check_inputs(model, example_inputs)
    except QCompileError:
        if not _root_untraceable(model, leaf_modules, concrete_args):
            raise
        return in_parts(None)
    if target_quality is not None:
        if budget is not None:
            raise QCompileError("give either budget= (a cost limit) or target_quality= (a quality to reach at "
                                "the least cost), not both")
    try:
        return _compile_whole(model, example_inputs, target=target, calib_data=calib_data, budget=budget,
                              observer=observer, passes=passes, progress=progress, seed=seed,
                              leaf_modules=leaf_modules, concrete_args=concrete_args, sensitivity=sensitivity,
                              host_fallback=host_fallback, reconstruction=reconstruction, plan_check=plan_check,
                              validation_data=validation_data, threads=threads, target_quality=target_quality,
                              effort=effort, executor=executor)
    except CaptureError as exc:
        if not exc.root_untraceable:
            raise
        return in_parts(None)


def compile_many(model: nn.Module, example_inputs: Any, jobs: Sequence[dict[str, Any]], *, calib_data: Any = None,
                 executor: str = "local", **common: Any) -> list[CompiledModel]:
    """One model compiled for many targets or budgets: `qcompile(model, example_inputs,
    calib_data=calib_data, **common, **job)` for every job (a dict of qcompile keywords, e.g.
    {"target": "npu-int4", "budget": {"weight_memory": 0.6}}), in order. executor="ray" runs each
    compile as a Ray task, the model and data going once through Ray's object store
    (`qcompiler.executor`); every model is the one `qcompile` gives in this process."""
    check_executor(executor)
    known = set(inspect.signature(qcompile).parameters) - {"model", "example_inputs", "calib_data", "executor"}
    for i, job in enumerate([common, *jobs]):
        where = "compile_many keywords" if i == 0 else f"job {i - 1}"
        if not isinstance(job, dict):
            raise QCompileError(f"{where} must be a dict of qcompile keywords, got {type(job).__name__}")
        unknown = sorted(set(job) - known)
        if unknown:
            raise QCompileError(f"{where}: {', '.join(map(repr, unknown))} is not a qcompile keyword; "
                                f"the keywords are {', '.join(sorted(known))}")
    data = None if calib_data is None else list(calib_data)
    return map_tasks(_compile_job, (model, example_inputs, data, common), list(jobs), executor)


def _compile_job(shared: tuple, job: dict[str, Any]) -> CompiledModel:
    model, example_inputs, calib_data, common = shared
    return qcompile(model, example_inputs, calib_data=calib_data, **{**common, **job})


def _root_untraceable(model: Any, leaf_modules: Sequence[Any], concrete_args: dict[str, Any] | None) -> bool:
    if not isinstance(model, nn.Module):
        return False
    from .tracing import trace

    try:
        trace(model, leaf_modules, concrete_args)
    except CaptureError as exc:
        return exc.root_untraceable
    return False


def _compile_partitioned(model: nn.Module, example_inputs: Any, target: Any, calib_data: Any,
                         split: Sequence[str] | None, *, budget: Any, **options: Any) -> Any:
    """Compile the traceable parts of `model` (see `qcompiler.partition`); a budget spans them all."""
    from .partition import compile_parts, find_partition, relative_leaves

    spec = load_spec(target)
    if budget is not None:
        check_metrics(spec, budget)
    partition = find_partition(model, options["leaf_modules"], split)
    if calib_data is None:
        calib_data = [example_inputs]
    items = list(calib_data)
    if not items:
        raise QCompileError("calibration data is empty: give at least one batch of what the model's forward takes")

    host_fallback = options.pop("host_fallback")

    def part_options(job: Any) -> dict[str, Any]:
        return {**options, "leaf_modules": relative_leaves(options["leaf_modules"], job.path), "boundary": job.ports}

    def compile_all(jobs: list[Any], boundaries: list[Any]) -> dict[str, CompiledModel]:
        if budget is not None:
            return _compile_parts_to_budget(jobs, boundaries, spec, budget, part_options, host_fallback)
        return {job.path: _compile_whole(job.module, job.inputs[0], target=spec, calib_data=job.inputs, budget=None,
                                         plan_check=False, concrete_args=None, host_fallback=False,
                                         validation_data=None, **part_options(job))
                for job in jobs}

    return compile_parts(model, partition, items, compile_all, spec, default_observer_name(options["observer"], spec))


def _compile_parts_to_budget(jobs: list[Any], boundaries: list[Any], spec: TargetSpec, budget: Any,
                             part_options: Any, host_fallback: bool) -> dict[str, CompiledModel]:
    """Every part through `sensitivity`, one bit-allocation program over all their groups (a
    tensor passed between parts takes one bit width), then each part finished with its share."""
    runs = []
    for job in jobs:
        settings = part_options(job)
        passes = settings.pop("passes")
        manager = pipeline(passes, budget=True)
        options = _options(budget=budget, host_fallback=host_fallback, concrete_args=None, **settings)
        runs.append((manager, start_run(manager, job.module, job.inputs[0], spec, job.inputs, options,
                                        stop="sensitivity")))
    problems = [build_problem(run.gm, spec, run.ctx.groups, run.ctx.ties, run.ctx.sensitivity, list(budget),
                              host_fallback=host_fallback) for _, run in runs]
    index = {job.path: i for i, job in enumerate(jobs)}
    equal = []
    for b in boundaries:
        pairs = []
        for path, port in b.ports:
            node = port_node(runs[index[path]][1].gm, port)
            if node is not None and node.meta.get("group") is not None:
                pairs.append((index[path], node.meta["group"]))
        equal.append(pairs)
    problem, owners = combine_problems(problems, equal)
    result = solve_allocation(problem, absolute_budgets(problem, budget),
                              time_limit=runs[0][1].ctx.options.allocation_time_limit)
    compiled = {}
    for job, (manager, run), owned in zip(jobs, runs, owners):
        run.ctx.allocation.update({owned[g]: c for g, c in result.choice.items() if g in owned})
        run.ctx.allocation_problem, run.ctx.allocation_result = problem, result
        run.ctx.note("allocate_bits", f"one program over all {len(jobs)} parts: {result.summary()}")
        after = manager.names[manager.names.index("allocate_bits") + 1]
        compiled[job.path] = CompiledModel.from_run(resume(manager, run=run, start=after))
    return compiled


def _compile_whole(model: nn.Module, example_inputs: Any, *, target: Any, calib_data: Any, budget: Any,
                   observer: Any, passes: Any, progress: bool, seed: int, leaf_modules: Sequence[Any],
                   concrete_args: Any, sensitivity: Any, host_fallback: bool, reconstruction: Any,
                   plan_check: bool | None, validation_data: Any, threads: int | None,
                   target_quality: Any = None, effort: str = "default", executor: str = "local",
                   boundary: dict | None = None) -> CompiledModel:
    check_inputs(model, example_inputs)
    options = _options(observer=observer, budget=budget, host_fallback=host_fallback, boundary=boundary,
                       leaf_modules=leaf_modules, concrete_args=concrete_args, progress=progress, seed=seed,
                       threads=threads, effort=effort, executor=executor, sensitivity=sensitivity,
                       reconstruction=reconstruction)
    if target_quality is not None:
        spec = load_spec(target)
        wanted = read_quality_target(target_quality, spec)
        manager = pipeline(passes, budget=True)
        run = start_run(manager, model, example_inputs, spec, calib_data, options, stop="sensitivity")
        return CompiledModel.from_run(compile_to_quality(
            run, lambda r: resume(manager, run=r, start="convert"), run.float_graph or model,
            _validation_batches(run, validation_data, "target_quality"), wanted))
    if plan_check is None:
        plan_check = effort != "fast"
    manager = pipeline(passes, budget=budget is not None)
    if budget is None or not plan_check or manager.names.index("allocate_bits") + 1 == len(manager.names):
        return CompiledModel.from_run(start_run(manager, model, example_inputs, target, calib_data, options))
    run = start_run(manager, model, example_inputs, target, calib_data, options, stop="allocate_bits")
    finished = check_plan(run, lambda r: resume(manager, run=r, start=manager.names[manager.names.index("allocate_bits") + 1]),
                          run.float_graph or model, _validation_batches(run, validation_data, "plan_check"))
    return CompiledModel.from_run(finished)


def _options(*, sensitivity: Any, reconstruction: Any, leaf_modules: Sequence[Any], **settings: Any) -> CompileOptions:
    """CompileOptions from qcompile's keywords (None leaves a setting at its default)."""
    return CompileOptions(leaf_modules=tuple(leaf_modules), **settings,
                          **({"sensitivity": sensitivity} if sensitivity is not None else {}),
                          **({"reconstruction": reconstruction} if reconstruction is not None else {}))


def _validation_batches(run: PassRun, validation_data: Any, who: str) -> list[tuple[Any, ...]]:
    """The batches plans are compared on: validation_data, else the calibration batches."""
    batches = run.ctx.calib_batches if validation_data is None else calibration_batches(
        validation_data, run.ctx.example_inputs, [n.target for n in run.gm.graph.nodes if n.op == "placeholder"])
    if validation_data is not None and run.ctx.channels_last:
        batches = [as_channels_last(b) for b in batches]
    if not batches:
        raise QCompileError(f"{who} needs validation data (or calibration data) to compare plans on; "
                            "give validation_data" + (" or pass plan_check=False" if who == "plan_check" else ""))
    return batches
