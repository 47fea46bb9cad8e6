"""`fit`: a ready training loop for a compiled model, label-free or labelled, on one or many processes.

Label-free (the default): the loss is the mean squared error between the quantized model's
outputs and the float teacher's on the same inputs (knowledge distillation; no labels needed).
With `hessian=True` it is EPTQ's Hessian-weighted distillation instead: the outputs' squared
error plus the squared error of every quantized activation against the float model's, each
weighted per element by tr(J^T J) / numel of the model's output with respect to it
(`qcompiler.sensitivity.hessian_weights`, label-free), each of the two terms scaled so that the
compiled model scores 1 on the first batch.
Labelled: give `loss_fn(outputs, labels)` and batches of (inputs..., labels).

Adam with two learning rates (latent weights and biases; learned steps and zero points), a
cosine schedule over all steps, a progress bar, and best-on-validation checkpointing: the
validation metric is measured in eval mode, which is the converted integer model, before the
first epoch and after each one; the parameters that scored best are the ones converted. So the
result is never worse than the compiled model on the validation data.

Under `torch.distributed` (DDP; gloo on CPU) each rank trains on its equal slice of every
global batch and DDP averages the gradients, which equals one process on the whole batch. The
quantizers' steps are parameters, synchronised like the weights; nothing is calibrated during
training (the ranges come from the compiled plan), so no statistics differ between ranks.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from ..compiled import CompiledModel
from ..errors import QCompileError
from .model import QATModule, as_batches, convert, prepare
from .reestimate import reestimate_statistics


@dataclass(frozen=True)
class EpochLog:
    epoch: int                 # 0: before training
    train_loss: float          # mean over the epoch's steps (nan for epoch 0)
    validation: float          # the validation metric in eval mode (lower is better)
    seconds: float             # training and validation
    train_seconds: float       # the training steps alone (0 for epoch 0)


def _shard(batch: tuple[Any, ...], rank: int, world: int) -> tuple[Any, ...]:
    if world == 1:
        return batch
    n = next(t.shape[0] for t in batch if isinstance(t, Tensor))
    if n % world:
        raise QCompileError(f"a global batch of {n} does not split evenly over {world} processes; "
                            "use a batch size divisible by the world size")
    return tuple(t.chunk(world)[rank] if isinstance(t, Tensor) and t.dim() and t.shape[0] == n else t for t in batch)


def fit(compiled: CompiledModel, data: Iterable[Any], *, epochs: int = 1, method: str = "lsq",
        teacher: nn.Module | None = None, loss_fn: Callable[[Any, Any], Tensor] | None = None,
        validation_data: Iterable[Any] | None = None, lr: float = 1e-4, step_lr: float = 1e-3,
        zero_point_lr: float = 0.05,
        qsin_weight: float = 1.0, p: float = 0.5, seed: int = 0, progress: bool = True,
        hessian: bool = False, checkpoint: bool = True, module: QATModule | None = None,
        log: list[EpochLog] | None = None, reestimate: bool = False,
        reestimate_samples: int = 256) -> CompiledModel:
    """Train `compiled` with QAT and return the converted `CompiledModel` (see the module docstring).

    data: batches of inputs (label-free) or of (inputs..., labels) when `loss_fn` is given.
    teacher: the float model to distil from (default: the float graph of the compile).
    validation_data: batches like `data` for checkpointing (default: the training batches).
    lr, step_lr, zero_point_lr: Adam's learning rates of the weights, the learned log steps and
        the learned zero points (in codes).
    qsin_weight: the weight of QSin's regulariser in the loss.
    hessian: label-free only: EPTQ's Hessian-weighted distillation of the quantized activations too
        (needs the float graph of a fresh compile as the teacher).
    checkpoint: keep the parameters that scored best on validation (False: the last ones).
    module: an already prepared module to continue training (method and p are then its own).
    log: a list that receives one `EpochLog` per evaluation.
    reestimate: after training, re-estimate the folded BatchNorm statistics on the first
        `reestimate_samples` training inputs (`reestimate_statistics`; needs the compile's float
        graph): every kernel's output channels get the float model's mean and deviation again.
    """
    if epochs < 1:
        raise QCompileError(f"qat.fit needs at least one epoch, got {epochs}")
    batches = as_batches(data)
    val = as_batches(validation_data) if validation_data is not None else batches
    if loss_fn is None:
        teacher = teacher if teacher is not None else compiled._float_graph
        if teacher is None:
            raise QCompileError("label-free QAT distils from the float model: pass teacher=float_model "
                                "(a loaded CompiledModel keeps no float graph), or loss_fn= with labelled data")
        teacher = teacher.eval()
    qat = module if module is not None else prepare(compiled, method, p=p, seed=seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    model: nn.Module = qat
    weighted: _HessianLoss | None = None
    if hessian:
        if loss_fn is not None or compiled._float_graph is None:
            raise QCompileError("hessian=True is label-free distillation against the compile's own float graph: "
                                "use it without loss_fn, on a CompiledModel fresh from qcompile")
        weighted = _HessianLoss(qat, compiled._float_graph, batches)
        model = weighted.student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    if loss_fn is None and weighted is None:
        # Plain distillation: the teacher's outputs once, as labels (they never change).
        with torch.no_grad():
            batches = [(*b, teacher(*b)) for b in batches]
            val = [(*b, teacher(*b)) for b in val]
        loss_fn = torch.nn.functional.mse_loss

    def split(batch: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
        return (batch[:-1], batch[-1]) if loss_fn is not None else (batch, None)

    def loss_of(out: Any, inputs: tuple[Any, ...], labels: Any) -> Tensor:
        if loss_fn is not None:
            return loss_fn(out, labels)
        with torch.no_grad():
            target = teacher(*inputs)
        return torch.nn.functional.mse_loss(out, target)

    def validate() -> float:
        qat.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in val:
                inputs, labels = split(batch)
                n = next((t.shape[0] for t in inputs if isinstance(t, Tensor) and t.dim()), 1)
                total += float(loss_of(qat(*inputs), inputs, labels)) * n
                count += n
        return total / max(count, 1)

    steps = qat.step_parameters()
    groups = [{"params": qat.weight_parameters(), "lr": lr}]
    if steps:
        groups.append({"params": steps, "lr": step_lr})
    if qat.zero_point_parameters():
        groups.append({"params": qat.zero_point_parameters(), "lr": zero_point_lr})
    opt = torch.optim.Adam(groups)
    total_steps = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * i / total_steps)).item()))
    order_gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    best = validate()
    history = [EpochLog(0, float("nan"), best, time.perf_counter() - start, 0.0)]
    best_state = copy.deepcopy(qat.state_dict())
    bar = tqdm(total=total_steps, desc=f"qat ({qat.method})", unit="step", disable=not progress or rank != 0)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        qat.train()
        losses = []
        for i in torch.randperm(len(batches), generator=order_gen).tolist():
            inputs, labels = split(_shard(batches[i], rank, world))
            if weighted is not None:
                loss = weighted(model(*inputs), inputs)
            else:
                loss = loss_of(model(*inputs), inputs, labels)
            if qat.method == "qsin":
                loss = loss + qsin_weight * qat.regularizer()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        trained = time.perf_counter() - t0
        score = validate()
        history.append(EpochLog(epoch, sum(losses) / len(losses), score, time.perf_counter() - t0, trained))
        if score < best or not checkpoint:
            best, best_state = score, copy.deepcopy(qat.state_dict())
    bar.close()
    qat.load_state_dict(best_state)
    if reestimate:
        if compiled._float_graph is None:
            raise QCompileError("reestimate=True compares with the compile's float graph: use a CompiledModel fresh "
                                "from qcompile, or call qat.reestimate_statistics(module, data, teacher=...)")
        inputs, count = [], 0
        for batch in batches:
            x = split(batch)[0]
            inputs.append(x)
            count += next((t.shape[0] for t in x if isinstance(t, Tensor) and t.dim()), 1)
            if count >= reestimate_samples:
                break
        reestimate_statistics(qat, inputs, compiled._float_graph)
    if log is not None:
        log.extend(history)
    return convert(qat)


def _tapped(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """`gm` (sharing its modules) returning (its output, the values of the nodes `names`)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output((fx.node.map_arg(node.args[0], lambda a: env[a]), *[env[by_name[n]] for n in names]))
        else:
            env[node] = graph.node_copy(node, lambda a: env[a])
    return fx.GraphModule(gm, graph)


class _HessianLoss:
    """EPTQ's label-free loss: the outputs' squared error plus the Hessian-weighted squared error
    of every quantized activation, each term scaled so the compiled model scores 1."""

    def __init__(self, qat: QATModule, teacher: fx.GraphModule, batches: list[tuple[Any, ...]],
                 samples: int = 32, probes: int = 8):
        from ..calibration import first_samples
        from ..sensitivity import hessian_weights
        from ..trainable import LearnedStep
        from .model import FixedQuant

        float_names = {n.name for n in teacher.graph.nodes}
        taps = list(dict.fromkeys(
            n.args[0].name for n in qat.graph.graph.nodes
            if n.op == "call_module" and isinstance(qat.graph.get_submodule(n.target), (LearnedStep, FixedQuant))
            and isinstance(n.args[0], fx.Node) and n.args[0].op != "placeholder" and n.args[0].name in float_names))
        weights = hessian_weights(teacher, taps, first_samples(batches, samples), probes)
        self.taps = [t for t in taps if weights.get(t, 0.0) > 0.0]
        self.weights = [weights[t] for t in self.taps]
        self.student = _tapped(qat.graph, self.taps)
        self.teacher = _tapped(teacher, self.taps)
        with torch.no_grad():
            out, taps_err = self._terms(self.student.train()(*batches[0]), batches[0])
        self.scale = (1.0 / max(float(out), 1e-30), 1.0 / max(float(taps_err), 1e-30))

    def _terms(self, student: tuple[Any, ...], inputs: tuple[Any, ...]) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            teacher = self.teacher(*inputs)
        out = torch.nn.functional.mse_loss(student[0], teacher[0])
        taps = sum((w * (q - f).pow(2).mean() for w, q, f in zip(self.weights, student[1:], teacher[1:])),
                   out.new_zeros(()))
        return out, taps

    def __call__(self, student: tuple[Any, ...], inputs: tuple[Any, ...]) -> Tensor:
        out, taps = self._terms(student, inputs)
        return out * self.scale[0] + taps * self.scale[1]
