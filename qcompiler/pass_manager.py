"""The pass manager: an ordered, editable list of graph passes with per-stage instrumentation.

A pass is a callable `(gm, ctx) -> GraphModule`. The first pass receives the user's `nn.Module`
(capture turns it into a graph). After every pass the manager records wall time, the node count
before and after, and a snapshot of the graph, so any stage can be inspected or drawn later
without a line of instrumentation inside the passes.
"""
from __future__ import annotations

import copy
import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx

from .context import CompileContext, as_input_tuple
from .errors import PassError

log = logging.getLogger(__name__)

Pass = Callable[[Any, CompileContext], fx.GraphModule]

# Built-in passes by name: each lives in qcompiler.passes.<name> as a function of that name.
BUILTIN_PASSES = (
    "capture", "canonicalize", "fold_bn", "fuse", "group_quantizers", "insert_observers",
    "calibrate", "sensitivity", "allocate_bits", "convert", "optimize_rounding", "correct_bias",
    "model_requant",
)


def resolve_pass(name: str) -> Pass:
    if name not in BUILTIN_PASSES:
        raise PassError(
            f"unknown pass {name!r}; built-in passes are {', '.join(BUILTIN_PASSES)}, "
            "or give a callable (gm, ctx) -> GraphModule as a stage"
        )
    try:
        module = importlib.import_module(f"qcompiler.passes.{name}")
    except ModuleNotFoundError as exc:
        raise PassError(f"pass {name!r} is not available in this version of qcompiler") from exc
    return getattr(module, name)


def _stage(entry: str | Pass | tuple[str, Pass]) -> tuple[str, Pass]:
    if isinstance(entry, str):
        return entry, resolve_pass(entry)
    if isinstance(entry, tuple) and len(entry) == 2 and callable(entry[1]):
        return str(entry[0]), entry[1]
    if callable(entry):
        return getattr(entry, "__name__", type(entry).__name__), entry
    raise PassError(f"a stage must be a pass name, a callable or a (name, callable) pair, not {entry!r}")


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph and module structure that shares parameter and buffer tensors.

    Passes never modify a tensor in place (they install new modules or parameters), so sharing
    tensors keeps every stage inspectable at the memory cost of one model.
    """
    memo: dict[int, Any] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        memo[id(t)] = t
    snap = copy.deepcopy(gm, memo)
    snap.meta = dict(gm.meta)
    return snap


def node_count(gm: Any) -> int:
    return len(gm.graph.nodes) if isinstance(gm, fx.GraphModule) else 0


@dataclass
class PassRun:
    """What a pipeline run produced: the final graph and every stage's snapshot and figures."""

    ctx: CompileContext
    stages: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    node_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    snapshots: dict[str, fx.GraphModule] = field(default_factory=dict)
    gm: fx.GraphModule | None = None

    def graph(self, stage: str | None = None) -> fx.GraphModule:
        """The GraphModule as it was after `stage` (the last stage if None)."""
        if stage is None:
            stage = self.stages[-1]
        if stage not in self.snapshots:
            raise KeyError(f"no stage {stage!r}; stages are {self.stages}")
        return self.snapshots[stage]

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


class PassManager:
    """An ordered list of passes the user can edit before running.

    >>> pm = PassManager(["capture", "canonicalize", "fold_bn"])
    >>> pm.drop("fold_bn"); pm.insert(my_pass, after="canonicalize")
    """

    def __init__(self, stages: Sequence[str | Pass | tuple[str, Pass]]):
        self._stages: list[tuple[str, Pass]] = [_stage(s) for s in stages]
        self._check_unique()

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self._stages]

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

    def insert(self, entry: str | Pass | tuple[str, Pass], *, before: str | None = None,
               after: str | None = None, index: int | None = None) -> "PassManager":
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

    def drop(self, name: str) -> "PassManager":
        del self._stages[self._index(name)]
        return self

    def replace(self, name: str, entry: str | Pass | tuple[str, Pass]) -> "PassManager":
        new_name, fn = _stage(entry)
        if not isinstance(entry, (str, tuple)):
            new_name = name  # a bare callable takes over the stage it replaces, name included
        self._stages[self._index(name)] = (new_name, fn)
        self._check_unique()
        return self

    def run(self, model: torch.nn.Module, example_inputs: Any = None, *,
            ctx: CompileContext | None = None, **ctx_fields: Any) -> PassRun:
        if ctx is None:
            ctx = CompileContext(model=model, example_inputs=as_input_tuple(example_inputs), **ctx_fields)
        run = PassRun(ctx=ctx)
        current: Any = model
        for name, fn in self._stages:
            before = node_count(current)
            start = time.perf_counter()
            result = fn(current, ctx)
            elapsed = time.perf_counter() - start
            if not isinstance(result, fx.GraphModule):
                raise PassError(f"pass {name!r} returned {type(result).__name__}, expected a torch.fx.GraphModule")
            current = result
            run.stages.append(name)
            run.timings[name] = elapsed
            run.node_counts[name] = (before, node_count(current))
            run.snapshots[name] = snapshot(current)
            log.info("pass %s: %.3fs, %d -> %d nodes", name, elapsed, before, node_count(current))
        run.gm = current
        return run
