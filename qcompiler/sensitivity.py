"""Sensitivity: how much the model output suffers when one quantizer group takes one format.

`measure_sensitivity` runs over a calibrated graph (observer stubs after quantized tensors,
observers full of statistics) and returns a `SensitivityTable`: for every group with more than
one candidate format and every candidate, the output noise that quantizing that group alone in
that format causes, as a fraction of the output power (relative noise power, 10^(-SQNR/10)).
Noise powers of independent groups add up, so the bit allocation can minimise their sum. No
labels are used.

Two methods, both over the calibration batches:
- "sqnr" (phase 1 of Pandey & Nagel, 2023): only that group quantized, everything else float;
  the measured output noise power. The float value of every node is cached per batch and only
  the nodes downstream of the perturbed group are recomputed.
- "hessian" (the label-free Hessian of EPTQ, Gordon et al., 2023): the trace of the Gauss-Newton
  Hessian J^T J of the output with respect to each quantized tensor, estimated with Hutchinson's
  method from Rademacher vectors v on the output (tr(J^T J) = E_v ||J^T v||^2, one backward pass
  per probe for all tensors at once), times that tensor's squared quantization error per element.
  For a weight group the tensor is the kernel's output and the error is what the weight error
  does to it. Much cheaper than "sqnr": one forward, a few backward passes, one kernel call per
  candidate.
- "adaround": as "sqnr", but each weight candidate is first rounded by a short AdaRound of its
  kernel alone on the kernel's float inputs (`ROUNDED_CONFIG`, on the first `ROUNDED_SAMPLES`
  samples), so the program trades what each candidate costs after rounding is optimised, not
  before: rounding recovers much more of a 2-bit candidate's error than of an 8-bit one's.

A group with a single candidate has nothing to choose; it is not measured and gets 0 (unless
host fallback gives its kernel the choice of float on the host).
"""
from __future__ import annotations

import math
import time
from collections import ChainMap
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx
from torch.func import functional_call
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from .adaround import AdaRoundConfig, round_alone
from .calibration import batch_samples, sub_batches
from .errors import QCompileError
from .executor import map_tasks, ray_cpus
from .formats import IntFormat
from .fx_util import tree_map_detach
from .groups import QuantizerGroup
from .kernel_modules import functional_kernel_error
from .quantizers import ObserverStub, observers_paused, quantize_weight, weight_axis, weight_qparams

# Samples per forward pass: bounds the memory of the cached float activations of one batch.
SUB_BATCH = 16
# Rademacher probes per batch of the Hutchinson estimate.
HESSIAN_PROBES = 16
# "adaround": samples whose kernel inputs the short AdaRound fits, and its settings (per-layer,
# float inputs, no bias correction: the measured candidate changes nothing but the weights).
ROUNDED_SAMPLES = 32
ROUNDED_STEPS = 100


@dataclass(frozen=True)
class SensitivityTable:
    """Relative output noise power per (group, candidate); 0 for groups with one candidate."""

    method: str
    values: dict[int, dict[str, float]]
    measured: tuple[int, ...]              # groups that had a choice and were measured
    samples: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def of(self, gid: int, candidate: str) -> float:
        return self.values.get(gid, {}).get(candidate, 0.0)

    def sqnr_db(self, gid: int, candidate: str) -> float:
        v = self.of(gid, candidate)
        return math.inf if v <= 0 else -10.0 * math.log10(v)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "samples": self.samples, "seconds": self.seconds,
                "values": {str(g): dict(c) for g, c in self.values.items()}}

    def to_markdown(self, groups: list[Any] | None = None) -> str:
        owners = {g.id: g.owner for g in groups or ()}
        cands = sorted({c for g in self.measured for c in self.values[g]})
        lines = ["| group | owner | " + " | ".join(f"{c} SQNR dB" for c in cands) + " |",
                 "|---|---|" + "---|" * len(cands)]
        for g in self.measured:
            cells = [f"{self.sqnr_db(g, c):.1f}" if c in self.values[g] else "" for c in cands]
            lines.append(f"| {g} | {owners.get(g, '')} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def measure_sensitivity(gm: fx.GraphModule, groups: list[QuantizerGroup], observers: dict[int, Any],
                        batches: list[tuple[Any, ...]], method: str, seed: int = 0,
                        progress: bool = True, executor: str = "local") -> SensitivityTable:
    """The sensitivity of every group in `groups` (those with a choice) by `method` (see the
    module docstring); the observers keep their statistics (their stubs are off meanwhile).
    executor="ray": "sqnr" measures the groups in shards, as Ray tasks (`qcompiler.executor`);
    each group's value is the same as in one process."""
    if not batches:
        raise QCompileError("sensitivity needs calibration batches: run calibrate before it")
    start = time.perf_counter()
    with observers_paused(gm), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "hessian":
            values, samples = hessian_sensitivity(gm, groups, observers, batches, progress)
        elif method == "sqnr" and executor == "ray" and len(groups) > 1:
            values, samples = _sqnr_in_shards(gm, groups, observers, batches, seed, executor)
        else:
            values, samples = sqnr_sensitivity(gm, groups, observers, batches, progress,
                                               rounded=method == "adaround")
    return SensitivityTable(method, values, tuple(g.id for g in groups), samples, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Helpers shared by both methods
# ---------------------------------------------------------------------------------------------

def _stub_nodes(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    out: dict[int, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, ObserverStub):
                out.setdefault(m.group, []).append(n)
    return out


def _output_tensors(value: Any) -> list[torch.Tensor]:
    return [t.float() for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def quantized_weights(gm: fx.GraphModule, group: Any, fmt: Any) -> dict[str, torch.Tensor]:
    """The kernel's weights as `fmt` stores them, keyed by their name inside the kernel module."""
    kernel = _kernel_node(gm, group)
    module = gm.get_submodule(kernel.target)
    axis = weight_axis(module)
    out = {}
    for qualified in group.weights:
        local = qualified[len(kernel.target) + 1:]
        w = module.get_parameter(local)
        qw, _ = quantize_weight(fmt, w, axis)
        out[local] = qw.detach()
    return out


def _kernel_node(gm: fx.GraphModule, group: Any) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == group.owner:
            if n.op != "call_module":
                raise QCompileError(functional_kernel_error(n.name))
            return n
    raise QCompileError(f"group {group.id}: its kernel {group.owner} is not in the graph")


class _Runner(fx.Interpreter):
    """Runs a graph once to cache every node's value, then re-runs only what a change reaches."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.order = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.order)}
        self.cache: dict[fx.Node, Any] = {}

    def cache_float(self, args: tuple[Any, ...]) -> Any:
        self.env = {}
        out = self.run(*args)
        self.cache = dict(self.env)
        return out

    def rerun(self, perturb: dict[fx.Node, Callable[..., Any]]) -> Any:
        """The graph output when each node in `perturb` computes `perturb[node](*args, **kwargs)`
        from its (possibly changed) inputs instead of its own op; only what changes is recomputed."""
        changed: dict[fx.Node, Any] = {}
        start = min(self.index[n] for n in perturb)
        self.env = ChainMap(changed, self.cache)
        out_node = self.order[-1]
        for n in self.order[start:]:
            if n in perturb:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                changed[n] = perturb[n](*args, **kwargs)
            elif n.op == "output" or any(i in changed for i in n.all_input_nodes):
                changed[n] = self.run_node(n)
        return changed[out_node] if out_node in changed else self.cache[out_node]


# ---------------------------------------------------------------------------------------------
# sqnr: measured output noise with one group quantized
# ---------------------------------------------------------------------------------------------

def _candidates(gm: fx.GraphModule, groups: list[Any], observers: dict[int, Any]) -> tuple[dict, dict, dict]:
    """(weight group -> its kernel node, (group, candidate) -> quantized weights,
    (group, candidate) -> activation quantization parameters)."""
    kernels = {g.id: _kernel_node(gm, g) for g in groups if g.kind == "weight"}
    qweights = {(g.id, c): quantized_weights(gm, g, g.formats[c]) for g in groups if g.kind == "weight"
                for c in g.candidates}
    qparams = {(g.id, c): observers[g.id].compute_qparams(g.formats[c]) for g in groups
               if g.kind == "activation" for c in g.candidates}
    return kernels, qweights, qparams


def rounded_weights(gm: fx.GraphModule, groups: list[Any], batches: list[tuple[Any, ...]],
                    steps: int = ROUNDED_STEPS, samples: int = ROUNDED_SAMPLES,
                    ) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Each integer weight candidate of a conv or linear, rounded by AdaRound of its kernel alone
    (`steps` iterations) on the kernel's float inputs over the first `samples` samples (see
    "adaround"); keyed like `_candidates`' quantized weights."""
    cfg = AdaRoundConfig(objective="symmetric", correct_bias=False, steps=steps, wide_bits=None)
    runner = _Runner(gm)
    subs = list(sub_batches(batches, SUB_BATCH))
    kernels = {g.id: _kernel_node(gm, g) for g in groups if g.kind == "weight"}
    inputs: dict[int, list[torch.Tensor]] = {g: [] for g in kernels}
    seen = 0
    with torch.no_grad():
        for args in subs:
            if seen >= samples:
                break
            runner.cache_float(args)
            for gid, node in kernels.items():
                x = runner.cache.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
                if isinstance(x, torch.Tensor):
                    inputs[gid].append(x.detach().float())
            seen += batch_samples(args)
    gen = torch.Generator().manual_seed(0)
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for g in groups:
        if g.id not in kernels or not inputs[g.id]:
            continue
        module = gm.get_submodule(kernels[g.id].target)
        if list(g.weights) != [f"{kernels[g.id].target}.weight"]:
            continue
        for c in g.candidates:
            fmt = g.formats[c]
            if not isinstance(fmt, IntFormat) or fmt.granularity not in ("per_tensor", "per_channel"):
                continue
            params = weight_qparams(fmt, module.weight.detach(), weight_axis(module))
            w = round_alone(module, inputs[g.id], fmt, params, cfg, gen)
            if w is not None:
                out[(g.id, c)] = {"weight": w}
        inputs[g.id] = []
    return out


def sqnr_sensitivity(gm: fx.GraphModule, groups: list[Any], observers: dict[int, Any],
                     batches: list[tuple[Any, ...]], progress: bool = True, rounded: bool = False,
                     weights: dict[tuple[int, str], dict[str, torch.Tensor]] | None = None,
                     ) -> tuple[dict[int, dict[str, float]], int]:
    """(group id -> candidate -> output noise power / output power, samples used); `rounded`:
    integer weight candidates rounded by a short AdaRound first (the "adaround" method);
    `weights`: given weights for some (group, candidate) pairs instead."""
    runner = _Runner(gm)
    stub_nodes = _stub_nodes(gm)
    kernels, qweights, qparams = _candidates(gm, groups, observers)
    subs = list(sub_batches(batches, SUB_BATCH))
    if rounded:
        qweights.update(rounded_weights(gm, groups, batches))
    qweights.update(weights or {})
    noise = {(g.id, c): 0.0 for g in groups for c in g.candidates}
    signal, samples = 0.0, 0
    bar = tqdm(total=len(subs) * len(noise), desc="sensitivity (sqnr)", disable=not progress, leave=False)
    with torch.no_grad():
        for args in subs:
            ref = _output_tensors(runner.cache_float(args))
            signal += sum(float(t.pow(2).sum()) for t in ref)
            samples += batch_samples(args)
            for g in groups:
                for c in g.candidates:
                    if g.kind == "weight":
                        node = kernels[g.id]
                        module, qw = gm.get_submodule(node.target), qweights[(g.id, c)]
                        perturb = {node: lambda *a, _m=module, _w=qw, **kw: functional_call(_m, _w, a, kw)}
                    else:
                        fmt, p = g.formats[c], qparams[(g.id, c)]
                        quantize = (lambda x: x) if p is None else (lambda x, _f=fmt, _p=p: _f.fake_quant(x, _p))
                        perturb = {n: quantize for n in stub_nodes.get(g.id, [])}
                    if perturb:
                        out = _output_tensors(runner.rerun(perturb))
                        noise[(g.id, c)] += sum(float((o - r).pow(2).sum()) for o, r in zip(out, ref))
                    bar.update()
    bar.close()
    signal = max(signal, torch.finfo(torch.float32).tiny)
    values: dict[int, dict[str, float]] = {}
    for (gid, c), v in noise.items():
        values.setdefault(gid, {})[c] = v / signal
    return values, samples


def _sqnr_in_shards(gm: fx.GraphModule, groups: list[Any], observers: dict[int, Any],
                    batches: list[tuple[Any, ...]], seed: int, executor: str) -> tuple[dict[int, dict[str, float]], int]:
    """`sqnr_sensitivity` over interleaved shards of the groups, one task each (two per CPU, so
    that uneven shards even out). A group's noise does not depend on the other groups measured
    with it, and every shard sees the same float outputs, so the values are those of one run."""
    shards = min(len(groups), 2 * ray_cpus())
    parts = map_tasks(_sqnr_shard, (gm, groups, observers, batches, seed),
                      [[g.id for g in groups[i::shards]] for i in range(shards)], executor)
    measured = {gid: v for values, _ in parts for gid, v in values.items()}
    return {g.id: measured[g.id] for g in groups}, parts[0][1]


def _sqnr_shard(shared: tuple, ids: list[int]) -> tuple[dict[int, dict[str, float]], int]:
    gm, groups, observers, batches, seed = shared
    chosen = set(ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return sqnr_sensitivity(gm, [g for g in groups if g.id in chosen], observers, batches, progress=False)


# ---------------------------------------------------------------------------------------------
# hessian: Hutchinson trace of J^T J times the quantization error
# ---------------------------------------------------------------------------------------------

class _GradRunner(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)


def hutchinson_traces(gm: fx.GraphModule, args: tuple[Any, ...], nodes: list[fx.Node], probes: int,
                      generator: torch.Generator | None = None) -> tuple[dict[fx.Node, float], dict[fx.Node, Any], Any]:
    """Estimates of tr(J_n^T J_n) for the output's Jacobian J_n w.r.t. each node's value.

    Hutchinson with Rademacher probes v on the output: E_v ||J^T v||^2 = ||J||_F^2. Returns
    (trace per node, every node's float value, the output).
    """
    runner = _GradRunner(gm)
    args = tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    with torch.enable_grad():
        out = runner.run(*args)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        targets = [n for n in nodes if isinstance(runner.env.get(n), torch.Tensor) and runner.env[n].requires_grad]
        tensors = [runner.env[n] for n in targets]
        traces = {n: 0.0 for n in nodes}
        if outs and tensors:
            for _ in range(probes):
                vs = [torch.randint(0, 2, o.shape, generator=generator).to(o.dtype) * 2 - 1 for o in outs]
                grads = torch.autograd.grad(outs, tensors, vs, retain_graph=True, allow_unused=True)
                for n, gr in zip(targets, grads):
                    if gr is not None:
                        traces[n] += float(gr.detach().pow(2).sum()) / probes
    values = {n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in runner.env.items()}
    return traces, values, tree_map_detach(out)


def hessian_weights(gm: fx.GraphModule, names: list[str], batches: list[tuple[Any, ...]],
                    probes: int = HESSIAN_PROBES) -> dict[str, float]:
    """Node name -> tr(J^T J) / numel over the batches: the per-element weight of a squared
    error at that node in the output's noise (the factor `hessian_sensitivity` multiplies each
    candidate's error by). `gm` computes in float; probes and sub-batches as there."""
    by_name = {n.name: n for n in gm.graph.nodes}
    nodes = [by_name[x] for x in names if x in by_name]
    generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
    trace = {n: 0.0 for n in nodes}
    numel = {n: 0 for n in nodes}
    for args in sub_batches(batches, SUB_BATCH):
        tr, values, _ = hutchinson_traces(gm, args, nodes, probes, generator)
        for n in nodes:
            trace[n] += tr[n]
            numel[n] += values[n].numel() if isinstance(values.get(n), torch.Tensor) else 0
    return {n.name: trace[n] / numel[n] for n in nodes if numel[n]}


def hessian_sensitivity(gm: fx.GraphModule, groups: list[Any], observers: dict[int, Any],
                        batches: list[tuple[Any, ...]], progress: bool = True,
                        probes: int = HESSIAN_PROBES) -> tuple[dict[int, dict[str, float]], int]:
    """(group id -> candidate -> estimated output noise power / output power, samples used).

    Noise of tensor t under candidate c ~= tr(J_t^T J_t) / numel(t) * ||Q_c(t) - t||^2: the
    Gauss-Newton Hessian's trace spread evenly over the tensor's elements, times the error.
    """
    stub_nodes = _stub_nodes(gm)
    kernels, qweights, qparams = _candidates(gm, groups, observers)
    watched = {g.id: ([kernels[g.id]] if g.kind == "weight" else stub_nodes.get(g.id, [])) for g in groups}
    nodes = sorted({n for ns in watched.values() for n in ns}, key=lambda n: n.name)
    generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
    subs = list(sub_batches(batches, SUB_BATCH))
    trace = {n: 0.0 for n in nodes}
    numel = {n: 0 for n in nodes}
    err = {(g.id, c): {n: 0.0 for n in watched[g.id]} for g in groups for c in g.candidates}
    signal, samples = 0.0, 0
    for args in tqdm(subs, desc="sensitivity (hessian)", disable=not progress, leave=False):
        tr, values, out = hutchinson_traces(gm, args, nodes, probes, generator)
        signal += sum(float(t.pow(2).sum()) for t in _output_tensors(out))
        samples += batch_samples(args)
        with torch.no_grad():
            for n in nodes:
                trace[n] += tr[n]
                numel[n] += values[n].numel() if isinstance(values[n], torch.Tensor) else 0
            for g in groups:
                for c in g.candidates:
                    if g.kind == "weight":
                        node = kernels[g.id]
                        module = gm.get_submodule(node.target)
                        a = tuple(values[x] if isinstance(x, fx.Node) else x for x in node.args)
                        kw = {k: values[x] if isinstance(x, fx.Node) else x for k, x in node.kwargs.items()}
                        diff = functional_call(module, qweights[(g.id, c)], a, kw) - values[node]
                        err[(g.id, c)][node] += float(diff.pow(2).sum())
                    else:
                        fmt, p = g.formats[c], qparams[(g.id, c)]
                        for n in watched[g.id]:
                            if p is not None:
                                err[(g.id, c)][n] += float((fmt.fake_quant(values[n], p) - values[n]).pow(2).sum())
    signal = max(signal, torch.finfo(torch.float32).tiny)
    values_out: dict[int, dict[str, float]] = {}
    for (gid, c), per_node in err.items():
        noise = sum(trace[n] / max(numel[n], 1) * e for n, e in per_node.items())
        values_out.setdefault(gid, {})[c] = noise / signal
    return values_out, samples
