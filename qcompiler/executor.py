"""Independent tasks in this process or on a Ray cluster (`executor="local" | "ray"`).

`map_tasks(fn, shared, items, executor)` returns `[fn(shared, item) for item in items]`. With
`executor="ray"` every item is one Ray task: `shared` (a model, a calibrated graph, the data) is
serialised once into Ray's object store and every task reads it from there; `fn` is a module-level
function of qcompiler, which the workers import by name (nothing of the caller is pickled with
it). Each task runs torch on `TASK_THREADS` thread, as Ray gives it one CPU, so its results are
those of one process on one thread (`qcompiler.threads` says what the thread count can change).

Graphs travel whole. torch.fx pickles a GraphModule as its Python code and traces that code again
on arrival, which renames nodes and drops `node.meta`, where the passes keep what they know about
each node (`qcompiler.meta`). `dumps` therefore sends every graph as its node list (names, ops,
targets, arguments, meta) with the modules and attributes it calls, and `loads` rebuilds the very
same graph. This is transient transport between processes of one compile; artifacts on disk stay
JSON plus tensors (`CompiledModel.save`).

Ray: without a running instance, `map_tasks` starts a local one on this machine (all its cores).
To use a cluster, start it (`ray start --head` on one machine, `ray start --address=HEAD:6379` on
the others, each with qcompiler installed in the same version, and the model's own code
importable there unless it is defined in the script being run) and either set
`RAY_ADDRESS=HEAD:6379` before running, or call `ray.init(address="HEAD:6379")` before qcompiler
does; `map_tasks` uses whatever Ray instance this process is connected to.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch.fx.node import map_arg

from .allocator import reuse_freed_memory
from .errors import QCompileError
from .threads import torch_threads

EXECUTORS: tuple[str, ...] = ("local", "ray")
TASK_THREADS = 1


def check_executor(executor: Any) -> str:
    if executor not in EXECUTORS:
        raise QCompileError(f"executor={executor!r} is not supported; choose one of {', '.join(EXECUTORS)}")
    return executor


# ---------------------------------------------------------------------------------------------
# Transport: pickle, with graphs sent node by node
# ---------------------------------------------------------------------------------------------

class _NodeName(str):
    """A node argument in transit: the name of the node it refers to."""


def _graph_module_state(gm: fx.GraphModule) -> tuple:
    nodes = []
    owned: dict[str, Any] = {}
    for n in gm.graph.nodes:
        args = map_arg(n.args, lambda a: _NodeName(a.name))
        kwargs = map_arg(n.kwargs, lambda a: _NodeName(a.name))
        nodes.append((n.name, n.op, n.target, args, kwargs, n.type, dict(n.meta)))
        if n.op == "call_module":
            owned[n.target] = gm.get_submodule(n.target)
        elif n.op == "get_attr":
            owned[n.target] = _get_path(gm, n.target)
    return type(gm).__name__, nodes, owned, dict(gm.meta), gm.graph._codegen


def _get_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _rebuild_graph_module(class_name: str, nodes: list[tuple], owned: dict[str, Any], meta: dict[str, Any],
                          codegen: Any) -> fx.GraphModule:
    graph = fx.Graph()
    made: dict[str, fx.Node] = {}

    def node_of(a: Any) -> Any:
        return made[a] if isinstance(a, _NodeName) else a

    for name, op, target, args, kwargs, type_expr, node_meta in nodes:
        args = torch.fx.node.map_aggregate(args, node_of)
        kwargs = torch.fx.node.map_aggregate(kwargs, node_of)
        node = graph.create_node(op, target, args, kwargs, name=name, type_expr=type_expr)
        if node.name != name:
            raise QCompileError(f"a graph could not be rebuilt after transport: node {name!r} came back as {node.name!r}")
        node.meta = node_meta
        made[name] = node
    graph._codegen = codegen
    gm = fx.GraphModule(owned, graph, class_name)
    gm.meta = meta
    return gm


def _pickler(base: type) -> type:
    class Pickler(base):  # type: ignore[misc, valid-type]
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, fx.GraphModule):
                return _rebuild_graph_module, _graph_module_state(obj)
            return super().reducer_override(obj) if hasattr(base, "reducer_override") else NotImplemented

    return Pickler


_Pickler = _pickler(pickle.Pickler)


def dumps(obj: Any, *, by_value: bool = False) -> bytes:
    """`obj` as bytes for another process of this compile, graphs node for node (see above).
    by_value: classes and functions defined in the script being run (`__main__`, where users
    often define their model) travel by value (Ray's cloudpickle), not by name."""
    buffer = io.BytesIO()
    pickler = _cloud_pickler() if by_value else _Pickler
    pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _cloud_pickler() -> type:
    global _CLOUD_PICKLER
    if _CLOUD_PICKLER is None:
        from ray import cloudpickle

        _CLOUD_PICKLER = _pickler(cloudpickle.Pickler)
    return _CLOUD_PICKLER


_CLOUD_PICKLER: type | None = None


def loads(data: bytes) -> Any:
    """What `dumps` wrote, in a process of the same compile (never data from elsewhere)."""
    return pickle.loads(data)


# ---------------------------------------------------------------------------------------------
# Running tasks
# ---------------------------------------------------------------------------------------------

def map_tasks(fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any], executor: str = "local") -> list[Any]:
    """[fn(shared, item) for item in items], here or as Ray tasks (in order either way)."""
    check_executor(executor)
    if executor == "local" or not items:
        return [fn(shared, item) for item in items]
    ray = _ray()
    remote = ray.remote(num_cpus=1)(_run_task)
    shared_ref = ray.put(dumps(shared, by_value=True))
    futures = [remote.remote(fn, shared_ref, dumps(item, by_value=True)) for item in items]
    return [loads(data) for data in ray.get(futures)]


def _run_task(fn: Callable[[Any, Any], Any], shared: bytes, item: bytes) -> bytes:
    with torch_threads(TASK_THREADS), reuse_freed_memory():
        return dumps(fn(loads(shared), loads(item)), by_value=True)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise QCompileError("executor='ray' needs Ray: pip install 'ray>=2.9' (or qcompiler[ray]), or use "
                            "executor='local'") from None
    if not ray.is_initialized():
        # A cluster named by RAY_ADDRESS, else a local instance on this machine's cores.
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


def ray_cpus() -> int:
    """CPUs Ray tasks can run on at once: the cluster's total."""
    return max(1, int(_ray().cluster_resources().get("CPU", 1)))
