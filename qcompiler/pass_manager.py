"""The pass manager: the one orchestrator of every pipeline, with per-stage instrumentation.

A pass is a callable `(gm, ctx) -> GraphModule`. The first pass receives the user's `nn.Module`
(capture turns it into a graph). After every pass the manager records wall time, the node count
before and after, and a snapshot of the graph, so any stage can be inspected or drawn later
without a line of instrumentation inside the passes. It also records the last stage whose graph
still computes in float (no observer or quantizer in it): the reference that per-node SQNR is
measured against.

A run can stop after a named stage and be resumed later from there, whole or forked: a Pareto
sweep runs the pipeline up to `sensitivity` once, then forks that run once per budget and
resumes each fork at `allocate_bits`. Passes are found by name in a registry that holds the
built-in passes (`qcompiler.passes.BUILTIN_PASSES`) and whatever `register_pass` added.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from torch import fx

from .context import CompileContext, as_input_tuple
from .errors import PassError
from .fx_util import snapshot
from .options import CompileOptions
from .passes import BUILTIN_PASSES
from .quantizers import FakeQuantize, ObserverStub

log = logging.getLogger(__name__)

Pass = Callable[[Any, CompileContext], fx.GraphModule]

_REGISTRY: dict[str, Pass] = dict(BUILTIN_PASSES)


def register_pass(name: str, fn: Pass, *, replace_existing: bool = False) -> None:
    """Make `fn` available as a stage called `name` in every PassManager (e.g. `"equalize"`)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise PassError(f"a pass name must be an identifier, got {name!r}")
    if not callable(fn):
        raise PassError(f"pass {name!r} must be a callable (gm, ctx) -> GraphModule, got {type(fn).__name__}")
    if name in _REGISTRY and not replace_existing and _REGISTRY[name] is not fn:
        raise PassError(f"a pass named {name!r} is registered already; pass replace_existing=True to replace it")
    _REGISTRY[name] = fn


def registered_passes() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def resolve_pass(name: str) -> Pass:
    if name not in _REGISTRY:
        raise PassError(
            f"unknown pass {name!r}; registered passes are {', '.join(_REGISTRY)}; give a callable "
            "(gm, ctx) -> GraphModule as a stage or register one with qcompiler.register_pass"
        )
    return _REGISTRY[name]


def _stage(entry: Any) -> tuple[str, Pass]:
    if isinstance(entry, str):
        return entry, resolve_pass(entry)
    if isinstance(entry, tuple) and len(entry) == 2 and callable(entry[1]):
        return str(entry[0]), entry[1]
    if callable(entry):
        return getattr(entry, "__name__", type(entry).__name__), entry
    raise PassError(f"a stage must be a pass name, a callable or a (name, callable) pair, not {entry!r}")


def node_count(gm: Any) -> int:
    return len(gm.graph.nodes) if isinstance(gm, fx.GraphModule) else 0


def computes_in_float(gm: Any) -> bool:
    """Whether a stage's graph is still the float model: no observer or quantizer in it."""
    return isinstance(gm, fx.GraphModule) and not any(
        isinstance(m, (ObserverStub, FakeQuantize)) for m in gm.modules())


@dataclass
class PassRun:
    """What a pipeline run produced: the final graph and every stage's snapshot and figures."""

    ctx: CompileContext
    stages: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    node_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    snapshots: dict[str, fx.GraphModule] = field(default_factory=dict)
    gm: fx.GraphModule | None = None
    float_stage: str | None = None
    """The last stage whose graph computes in float: the reference of per-node SQNR."""
    seconds: float = 0.0
    """Wall time of every stage so far (pass and snapshot), resumed runs included."""

    def graph(self, stage: str | None = None) -> fx.GraphModule:
        """The GraphModule as it was after `stage` (the last stage if None)."""
        if stage is None:
            stage = self.stages[-1]
        if stage not in self.snapshots:
            raise KeyError(f"no stage {stage!r}; stages are {self.stages}")
        return self.snapshots[stage]

    @property
    def float_graph(self) -> fx.GraphModule | None:
        return self.snapshots.get(self.float_stage) if self.float_stage is not None else None

    def render(self, path: str, stage: str | None = None, **kwargs: Any) -> str:
        from .drawing import render_graph

        return render_graph(self.graph(stage), path, **kwargs)

    def summary(self) -> str:
        """A text table: stage, seconds, nodes before -> after."""
        lines = [f"{'stage':<20} {'seconds':>9} {'nodes':>15}"]
        for s in self.stages:
            before, after = self.node_counts[s]
            lines.append(f"{s:<20} {self.timings[s]:>9.3f} {before:>7} -> {after:<6}")
        return "\n".join(lines)

    def fork(self, **options: Any) -> "PassRun":
        """An independent copy to resume differently; `options` replace fields of ctx.options."""
        ctx = self.ctx.fork()
        if options:
            ctx.options = replace(ctx.options, **options)
        return replace(self, ctx=ctx, stages=list(self.stages), timings=dict(self.timings),
                       node_counts=dict(self.node_counts), snapshots=dict(self.snapshots),
                       gm=snapshot(self.gm) if self.gm is not None else None)


# CompileContext fields PassManager.run accepts as keywords, besides the options' fields.
_CONTEXT_FIELDS = ("target", "calib_data", "options")


def new_context(model: Any, example_inputs: Any, **fields: Any) -> CompileContext:
    """A context for a fresh run: `fields` are CompileContext fields (target, calib_data,
    options) or CompileOptions fields (progress, seed, observer, budget, ...)."""
    settings = {k: v for k, v in fields.items() if k not in _CONTEXT_FIELDS}
    unknown = set(settings) - set(CompileOptions.__dataclass_fields__)
    if unknown:
        raise PassError(f"unknown run setting(s) {', '.join(sorted(unknown))}; settings are "
                        f"{', '.join(_CONTEXT_FIELDS + tuple(CompileOptions.__dataclass_fields__))}")
    options = fields.get("options") or CompileOptions()
    if settings:
        options = replace(options, **settings)
    return CompileContext(model=model, example_inputs=as_input_tuple(example_inputs),
                          target=fields.get("target"), calib_data=fields.get("calib_data"), options=options)


class PassManager:
    """An ordered list of passes the user can edit before running.

    >>> pm = PassManager(["capture", "canonicalize", "fold_bn"])
    >>> pm.drop("fold_bn"); pm.insert(my_pass, after="canonicalize")
    """

    def __init__(self, stages: Sequence[Any]):
        self._stages: list[tuple[str, Pass]] = [_stage(s) for s in stages]
        self._check_unique()

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self._stages]

    def copy(self) -> "PassManager":
        return PassManager(list(self._stages))

    def _index(self, name: str) -> int:
        for i, (n, _) in enumerate(self._stages):
            if n == name:
                return i
        raise PassError(f"no stage {name!r} in {self.names}")

    def _check_unique(self) -> None:
        seen = set()
        for n in self.names:
            if n in seen:
                raise PassError(f"stage {n!r} appears twice; give the second a different name")
            seen.add(n)

    def insert(self, entry: Any, *, before: str | None = None, after: str | None = None,
               index: int | None = None) -> "PassManager":
        stage = _stage(entry)
        if before is not None:
            pos = self._index(before)
        elif after is not None:
            pos = self._index(after) + 1
        elif index is not None:
            pos = index
        else:
            pos = len(self._stages)
        self._stages.insert(pos, stage)
        self._check_unique()
        return self

    def ensure(self, name: str, *, before: str) -> "PassManager":
        """Insert the registered pass `name` before stage `before` unless the pipeline has it."""
        if name not in self.names:
            self.insert(name, before=before)
        return self

    def drop(self, name: str) -> "PassManager":
        del self._stages[self._index(name)]
        return self

    def replace(self, name: str, entry: Any) -> "PassManager":
        new_name, fn = _stage(entry)
        if not isinstance(entry, (str, tuple)):
            new_name = name  # a bare callable takes over the stage it replaces, name included
        self._stages[self._index(name)] = (new_name, fn)
        self._check_unique()
        return self

    def run(self, model: Any = None, example_inputs: Any = None, *, ctx: CompileContext | None = None,
            start: str | None = None, stop: str | None = None, resume: PassRun | None = None,
            **fields: Any) -> PassRun:
        """Run the stages from `start` through `stop` (both included; default: all).

        A fresh run starts from `model` with `ctx` or a context built from `fields` (see
        `new_context`). `resume=run` continues a run instead (use `run.fork()` first to keep the
        original): its graph and context go on, its record grows, and `start` defaults to the
        stage after the run's last one.
        """
        if resume is not None:
            if model is not None or ctx is not None or fields:
                raise PassError("resume=run continues that run's graph and context; give no model, ctx or settings")
            run, current = resume, resume.gm
            if start is None:
                done = [n for n in self.names if n in resume.stages]
                start = self.names[self._index(done[-1]) + 1] if done and done[-1] != self.names[-1] else None
                if start is None:
                    return run
        else:
            if ctx is None:
                ctx = new_context(model, example_inputs, **fields)
            elif fields:
                raise PassError("give either ctx or context fields, not both")
            run, current = PassRun(ctx=ctx), model
        first = self._index(start) if start is not None else 0
        last = self._index(stop) if stop is not None else len(self._stages) - 1
        if last < first:
            raise PassError(f"stop stage {stop!r} comes before start stage {self.names[first]!r}")
        for name, fn in self._stages[first:last + 1]:
            current = self._run_stage(run, name, fn, current)
        run.gm = current
        return run

    @staticmethod
    def _run_stage(run: PassRun, name: str, fn: Pass, current: Any) -> fx.GraphModule:
        before = node_count(current)
        begin = time.perf_counter()
        result = fn(current, run.ctx)
        elapsed = time.perf_counter() - begin
        if not isinstance(result, fx.GraphModule):
            raise PassError(f"pass {name!r} returned {type(result).__name__}, expected a torch.fx.GraphModule")
        if name in run.snapshots:
            raise PassError(f"stage {name!r} already ran in this run; fork the run and resume after it")
        run.stages.append(name)
        run.timings[name] = elapsed
        run.node_counts[name] = (before, node_count(result))
        run.snapshots[name] = snapshot(result)
        if computes_in_float(result):
            run.float_stage = name
        run.seconds += time.perf_counter() - begin
        log.info("pass %s: %.3fs, %d -> %d nodes", name, elapsed, before, node_count(result))
        return result
