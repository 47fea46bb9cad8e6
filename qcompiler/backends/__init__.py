"""Lowering backends behind one table.

A backend turns a compiled model, given as `(simulated graph, plan, target)`, into something that
runs the target's way: `lower` returns a runnable module, `export` writes a file or directory.
`CompiledModel.lower(name)` and `CompiledModel.export(path, format=name)` look the name up here.

    reference  integer-only emulation of the target, bit-exact with the simulation (lower)
    qpack      the reference graph as data for a chip toolchain (export; docs/qpack.md)
    onnx       a QDQ model for ONNX Runtime (export)

`register_backend` adds one; docs/contributing.md shows how.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from torch import fx

from ..errors import QCompileError
from ..plan import Plan

Lower = Callable[[fx.GraphModule, Plan, Any], Any]
Export = Callable[..., Any]   # (simulated, plan, target, path, **options) -> what was written
Load = Callable[[Any], Any]   # path -> the runnable module an export holds


@dataclass(frozen=True)
class Backend:
    name: str
    lower: Lower | None = None
    export: Export | None = None
    load: Load | None = None
    description: str = ""


def _reference(simulated: fx.GraphModule, plan: Plan, target: Any) -> Any:
    from .reference import build_reference

    return build_reference(simulated, plan, target)


def _qpack(simulated: fx.GraphModule, plan: Plan, target: Any, path: Any) -> str:
    from .qpack import export_qpack

    return export_qpack(simulated, plan, target, path)


def _load_qpack(path: Any) -> Any:
    from .qpack import load_qpack

    return load_qpack(path)


def _onnx(simulated: fx.GraphModule, plan: Plan, target: Any, path: Any, **options: Any) -> Any:
    # Imported on use: onnx is a heavy import, and only an export needs it.
    from .onnx import export_onnx

    return export_onnx(simulated, plan, target, path, **options)


_BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", lower=_reference, export=None,
                         description="integer-only emulation of the target, bit-exact with the simulation"),
    "qpack": Backend("qpack", export=_qpack, load=_load_qpack,
                     description="the reference graph as data (docs/qpack.md)"),
    "onnx": Backend("onnx", export=_onnx, description="a QDQ ONNX model for ONNX Runtime"),
}


def register_backend(backend: Backend, *, replace_existing: bool = False) -> None:
    """Make `backend` available to `CompiledModel.lower` / `CompiledModel.export` by its name."""
    if not isinstance(backend, Backend) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", backend.name):
        raise QCompileError(f"register_backend takes a Backend whose name is letters, digits, _ and -, "
                            f"got {backend!r}")
    if backend.lower is None and backend.export is None:
        raise QCompileError(f"backend {backend.name!r} neither lowers nor exports; give lower= or export=")
    if backend.name in _BACKENDS and not replace_existing:
        raise QCompileError(f"a backend named {backend.name!r} is registered already; "
                            "pass replace_existing=True to replace it")
    _BACKENDS[backend.name] = backend


def backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


def _names(kind: str) -> str:
    return ", ".join(n for n, b in _BACKENDS.items() if getattr(b, kind) is not None)


def lower(name: str, simulated: fx.GraphModule, plan: Plan, target: Any) -> Any:
    backend = _BACKENDS.get(name)
    if backend is None or backend.lower is None:
        raise QCompileError(f"unknown backend {name!r} to lower to; available backends: {_names('lower')}"
                            + (f" (export formats: {_names('export')})" if backend is not None else ""))
    return backend.lower(simulated, plan, target)


def export(name: str, simulated: fx.GraphModule, plan: Plan, target: Any, path: Any, **options: Any) -> Any:
    backend = _BACKENDS.get(name)
    if backend is None or backend.export is None:
        raise QCompileError(f"unknown export format {name!r}; available: {_names('export')}")
    return backend.export(simulated, plan, target, path, **options)


def load(name: str, path: Any) -> Any:
    """What an export of backend `name` at `path` holds, as a runnable module."""
    backend = _BACKENDS.get(name)
    if backend is None or backend.load is None:
        raise QCompileError(f"backend {name!r} has no loader; loadable exports: {_names('load')}")
    return backend.load(path)
