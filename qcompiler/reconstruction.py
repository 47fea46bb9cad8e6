"""Block and whole-model reconstruction: rounding, activation steps and biases fitted jointly.

Per-layer AdaRound (`qcompiler.adaround`) fits each kernel to its own float output and cannot
trade error between layers. Here every kernel of a block (BRECQ, Li et al. 2021) or of the
whole model (EPTQ, Gordon et al. 2023) is fitted at once, over the calibration samples:

- the soft rounding of every integer weight (`SoftRoundedWeight`), annealed to hard decisions by
  AdaRound's regulariser 1 - |2h - 1|^beta, beta going from 20 to 2 after a warm-up;
- the step of every per-tensor integer activation quantizer in the block (`LearnedStep`, LSQ);
  on power-of-two targets the step stays a power of two;
- optionally the kernels' biases (they absorb the mean error, like bias correction).

The loss is EPTQ's label-free Hessian-weighted distillation: the squared error of each quantized
activation of the block (and of its outputs) against the float model's, weighted per element by
tr(J^T J) / numel, the trace of the Gauss-Newton Hessian of the model's output with respect to
that tensor (`qcompiler.sensitivity.hessian_weights`, the numbers the hessian sensitivity uses).
The simulated side of a block sees the simulated model's values so far (earlier blocks already
reconstructed); the float side sees the float model's, so each block also absorbs upstream
error. QDrop (Wei et al. 2022) lets each activation element skip its quantizer with a given
probability while fitting.

A block is kept only if its hard result beats round-to-nearest on its own objective over all
calibration samples; the result is ordinary integer codes on the plan's grid and new activation
scales in the plan, so `model_requant` and the backends see nothing new.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .adaround import RoundableKernel, roundable_kernels
from .blocks import Block, block_module, find_blocks
from .calibration import first_samples
from .errors import QCompileError
from .formats import IntFormat
from .fx_util import set_submodule
from .plan import Plan
from .quantizers import FakeQuantize
from .trainable import LearnedStep, SoftRoundedWeight


@dataclass(frozen=True)
class ReconstructionConfig:
    """Settings of block and model reconstruction (see the module docstring).

    The defaults are the setting with the best logits SQNR on EfficientNet-Lite0's validation
    crops with 4-bit weights everywhere (`benchmarks/reconstruction_validation.md`): per-layer
    AdaRound first, then 100 steps per block on the outputs' squared error, rounding only. The
    learned activation steps and biases and the Hessian-weighted loss were within noise of it
    there and stay options.

    granularity: "block" or "model" ("layer" is per-kernel AdaRound, `qcompiler.adaround`).
    steps: Adam iterations per block (for "model", in all).
    batch_size: calibration samples per iteration.
    lr, scale_lr, bias_lr: Adam learning rates of the rounding variables, the log activation
        steps and the biases.
    warmup: fraction of the steps without the rounding regulariser.
    harden: fraction of the steps at the end, after beta's annealing, over which the
        regulariser's weight grows a hundredfold so that every rounding variable ends at 0 or 1.
    reg_weight: the regulariser's weight per rounding variable, against the reconstruction loss
        normalised so that round-to-nearest scores 1.
    beta: start and end of the regulariser's annealed exponent.
    learn_scales, learn_weight_scales, learn_bias: fit the activation steps, the integer weights'
        scales (a gain per channel at `scale_lr`; not on power-of-two formats), the biases.
    qdrop: probability that an activation element skips its quantizer while fitting.
    loss: "hessian": the squared error of the block's outputs plus `tap_weight` times EPTQ's
        Hessian-weighted squared error of its quantized activations, each term normalised so that
        round-to-nearest scores 1; "mse": the outputs' term alone.
    probes, hessian_samples: Hutchinson probes per sub-batch, and samples, of the Hessian weights.
    max_samples: calibration samples used.
    start: "nearest": the rounding starts from the float weights, a block is judged against
        round-to-nearest; "layer": per-kernel AdaRound with bias correction runs first, each
        block's rounding starts from its decisions (h at 1 - start_margin or start_margin), and
        a block is kept only if it beats that result.
    """

    granularity: Literal["block", "model"] = "block"
    steps: int = 100
    batch_size: int = 8
    lr: float = 0.1
    scale_lr: float = 1e-3
    bias_lr: float = 1e-3
    warmup: float = 0.2
    harden: float = 0.1
    reg_weight: float = 30.0
    beta: tuple[float, float] = (20.0, 2.0)
    learn_scales: bool = False
    learn_weight_scales: bool = False
    learn_bias: bool = False
    qdrop: float = 0.0
    loss: Literal["hessian", "mse"] = "mse"
    tap_weight: float = 1.0
    probes: int = 8
    hessian_samples: int = 32
    max_samples: int = 128
    start: Literal["nearest", "layer"] = "layer"
    start_margin: float = 0.25

    def __post_init__(self) -> None:
        if self.granularity not in ("block", "model"):
            raise QCompileError(f"ReconstructionConfig.granularity must be 'block' or 'model' (per-layer is "
                                f"AdaRoundConfig), got {self.granularity!r}")
        for name in ("steps", "batch_size", "max_samples", "probes", "hessian_samples"):
            if getattr(self, name) < 1:
                raise QCompileError(f"ReconstructionConfig.{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.harden < 1.0 - self.warmup:
            raise QCompileError(f"ReconstructionConfig.harden is a fraction of the steps in [0, 1 - warmup), got {self.harden}")
        if not 0.0 <= self.warmup < 1.0:
            raise QCompileError(f"ReconstructionConfig.warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0.0 <= self.qdrop < 1.0:
            raise QCompileError(f"ReconstructionConfig.qdrop is a probability in [0, 1), got {self.qdrop}")
        if self.start not in ("nearest", "layer"):
            raise QCompileError(f"ReconstructionConfig.start must be 'nearest' or 'layer', got {self.start!r}")
        if not 0.0 < self.start_margin < 0.5:
            raise QCompileError(f"ReconstructionConfig.start_margin is in (0, 0.5), got {self.start_margin}")
        if self.loss not in ("hessian", "mse"):
            raise QCompileError(f"ReconstructionConfig.loss must be 'hessian' or 'mse', got {self.loss!r}")
        if len(self.beta) != 2 or min(self.beta) < 2.0:
            raise QCompileError(f"ReconstructionConfig.beta is (start, end) of the regulariser's exponent, both >= 2, got {self.beta}")


@dataclass(frozen=True)
class BlockResult:
    """What reconstruction did to one block, its objective in units of round-to-nearest's."""

    block: str
    kernels: tuple[str, ...]
    steps: int
    nearest_loss: float       # the objective with round-to-nearest and the calibrated steps (1 per term)
    loss: float               # the objective of the hard result
    kept_nearest: bool        # the result was no better, so the block was left as it was
    undecided: int            # rounding variables still strictly between 0 and 1 at the end
    changed: int              # weights whose code differs from round-to-nearest
    weights: int              # rounding variables
    steps_learned: int        # activation quantizers whose step was fitted
    seconds: float


def reconstruction_summary(results: list[BlockResult]) -> str:
    """One line: blocks, kernels, steps, the objective against round-to-nearest, what was kept."""
    done = [r for r in results if not r.kept_nearest]
    ratios = sorted(r.loss / r.nearest_loss for r in done if r.nearest_loss > 0)
    kept = len(results) - len(done)
    return (f"{len(results)} blocks, {sum(len(r.kernels) for r in results)} kernels, {results[0].steps} steps each; "
            + (f"median objective vs round-to-nearest {ratios[len(ratios) // 2]:.3f}; " if ratios else "")
            + f"{sum(r.changed for r in results)} of {sum(r.weights for r in results)} codes changed, "
            f"{sum(r.steps_learned for r in results)} activation steps learned"
            + (f"; {kept} blocks kept round-to-nearest" if kept else "")
            + f"; {sum(r.seconds for r in results):.1f} s")


class SoftKernel(nn.Module):
    """A conv or linear whose weight is a `SoftRoundedWeight` and whose bias may be learned."""

    def __init__(self, module: nn.Module, float_module: nn.Module, kernel: RoundableKernel, learn_bias: bool,
                 start_margin: float | None = None, learn_scale: bool = False, group: int | None = None):
        super().__init__()
        self.module = module
        self.group = group
        self.soft = SoftRoundedWeight(float_module.weight.detach(), kernel.fmt, kernel.params)
        if learn_scale and kernel.fmt.scale_kind != "pow2" and group is not None:
            self.soft.learn_scale()
        if start_margin is not None:
            # Start from the rounding the module holds now (per-layer AdaRound's).
            self.soft.start_from(module.weight.detach(), start_margin)
        bias = module.bias.detach().clone() if module.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=bool(learn_bias)) if bias is not None else None
        self.hard = False

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        w = self.soft.hard_weight() if self.hard else self.soft()
        params = {"weight": w}
        if self.bias is not None:
            params["bias"] = self.bias
        return functional_call(self.module, params, args, kwargs)


def _concat(values: list[Any]) -> Any:
    return torch.cat(values) if isinstance(values[0], Tensor) and values[0].dim() else values[0]


def _rows(value: Any, index: Tensor | slice, n: int) -> Any:
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == n:
        return value[index]
    return value


def _tensors(out: Any) -> list[Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


class _Objective:
    """The block's loss per sample: the squared error of its outputs, plus `tap_weight` times the
    Hessian-weighted squared error of its quantized activations; each term is scaled so that
    round-to-nearest scores 1 once `normalise` has seen its values."""

    def __init__(self, n_outputs: int, taps: list[fx.Node], hessian: dict[str, float], tap_weight: float):
        self.n_outputs = n_outputs
        self.hessian = [hessian.get(t.name, 0.0) for t in taps]
        self.tap_weight = tap_weight if any(w > 0.0 for w in self.hessian) else 0.0
        self.scale = (1.0, 1.0)

    @staticmethod
    def _sq(q: Any, f: Any) -> Tensor | float:
        if not (isinstance(q, Tensor) and q.is_floating_point()):
            return 0.0
        return (q - f).pow(2).sum() / max(1, q.shape[0] if q.dim() else 1)

    def terms(self, outs_q: list[Any], outs_f: list[Any]) -> tuple[Tensor, Tensor]:
        zero = outs_q[0].new_zeros(())
        out = sum((self._sq(q, f) for q, f in zip(outs_q[:self.n_outputs], outs_f[:self.n_outputs])), zero)
        taps = zero
        if self.tap_weight:
            taps = sum((w * self._sq(q, f) for w, q, f in zip(self.hessian, outs_q, outs_f) if w > 0.0), zero)
        return out, taps

    def normalise(self, out: float, taps: float) -> None:
        self.scale = (1.0 / max(out, 1e-30), 1.0 / max(taps, 1e-30))

    def __call__(self, outs_q: list[Any], outs_f: list[Any]) -> Tensor:
        out, taps = self.terms(outs_q, outs_f)
        return out * self.scale[0] + self.tap_weight * taps * self.scale[1]


def float_module_of(gm: fx.GraphModule, float_kernels: dict[str, nn.Module]):
    def module_of(target: str) -> nn.Module:
        module = gm.get_submodule(target)
        return nn.Identity() if isinstance(module, FakeQuantize) else float_kernels.get(target, module)
    return module_of


def _evaluate(block_gm: fx.GraphModule, targets: list[Any], inputs: list[Any], n: int,
              objective: _Objective, batch: int) -> tuple[float, float, list[Any]]:
    """The objective's two terms (outputs, taps) over all samples, unnormalised, and the block's
    outputs over all samples."""
    out = taps = 0.0
    outputs: list[list[Any]] = []
    with torch.no_grad():
        for start in range(0, n, batch):
            idx = slice(start, min(n, start + batch))
            values = _tensors(block_gm(*[_rows(x, idx, n) for x in inputs]))
            o, t = objective.terms(values, [_rows(f, idx, n) for f in targets])
            out += float(o) * (idx.stop - idx.start)
            taps += float(t) * (idx.stop - idx.start)
            outputs.append(values[:objective.n_outputs])
    return out / n, taps / n, [_concat([chunk[j] for chunk in outputs]) for j in range(objective.n_outputs)]


def _run(block_gm: fx.GraphModule, inputs: list[Any], n: int, batch: int) -> list[Any]:
    """The block's values (outputs and taps) over all samples, without gradients."""
    with torch.no_grad():
        chunks = [_tensors(block_gm(*[_rows(x, slice(s, min(n, s + batch)), n) for x in inputs]))
                  for s in range(0, n, batch)]
    return [_concat([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def reconstruct(gm: fx.GraphModule, ctx: Any, cfg: ReconstructionConfig,
                hessian: dict[str, float] | None = None) -> list[BlockResult]:
    """Reconstruct `gm` (a converted graph) block by block in place; `ctx.plan` gets the new steps.

    `hessian`: per-element Hessian weights by node name (computed here when None and
    cfg.loss == "hessian").
    """
    kernels, _ = roundable_kernels(gm, ctx.plan, ctx.float_kernels)
    nodes = {n.name: n for n in gm.graph.nodes}
    kernel_nodes = [nodes[k] for k in kernels]
    blocks = find_blocks(gm, kernel_nodes, cfg.granularity)
    samples = first_samples(ctx.calib_batches, cfg.max_samples)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n = sum(int(s[0].shape[0]) for s in samples)
    env_q: dict[fx.Node, Any] = {p: _concat([s[k] for s in samples]) for k, p in enumerate(placeholders)}
    env_f = dict(env_q)
    quant_nodes = [x for x in gm.graph.nodes if x.op == "call_module" and isinstance(gm.get_submodule(x.target), FakeQuantize)]
    quant_set = set(quant_nodes)
    if cfg.loss == "hessian" and hessian is None:
        from .sensitivity import hessian_weights

        watched = {x.args[0].name for x in quant_nodes if isinstance(x.args[0], fx.Node)}
        hessian = hessian_weights(float_graph(gm, ctx.float_kernels), sorted(watched),
                                  first_samples(samples, cfg.hessian_samples), cfg.probes)
    weights = hessian or {}
    gen = torch.Generator().manual_seed(ctx.options.seed)
    learned: dict[int, LearnedStep] = {}
    results: list[BlockResult] = []
    module_float = float_module_of(gm, ctx.float_kernels)
    order = {x: i for i, x in enumerate(gm.graph.nodes)}
    bar = tqdm(blocks, desc=f"reconstruct ({cfg.granularity})", unit="block", disable=not ctx.options.progress)
    for block in bar:
        start = time.perf_counter()
        # The taps are the values each quantizer of the block receives: its own rounding noise
        # is no error of the weights (through the straight-through gradient it would be chased).
        inside = set(block.nodes)
        taps = list(block.outputs) + list(dict.fromkeys(
            x.args[0] for x in block.nodes if x in quant_set and isinstance(x.args[0], fx.Node) and x.args[0] in inside))
        objective = _Objective(len(block.outputs), taps, weights, cfg.tap_weight if cfg.loss == "hessian" else 0.0)
        inputs_q = [env_q[a] for a in block.inputs]
        inputs_f = [env_f[a] for a in block.inputs]
        float_gm = block_module(gm, block, module_float, taps)
        nearest_gm = block_module(gm, block, gm.get_submodule, taps)
        eval_batch = max(cfg.batch_size, 16)
        # The float side's values, once: the targets of every step and what later blocks receive.
        targets = _run(float_gm, inputs_f, n, eval_batch)
        o, t, nearest_outputs = _evaluate(nearest_gm, targets, inputs_q, n, objective, eval_batch)
        objective.normalise(o, t)
        nearest = 1.0 + objective.tap_weight

        # The trainable stand-ins of this block.
        soft: dict[str, SoftKernel] = {}
        steps_here: dict[str, LearnedStep] = {}
        for x in block.nodes:
            if x.name in kernels:
                soft[x.target] = SoftKernel(gm.get_submodule(x.target), ctx.float_kernels[x.target],
                                            kernels[x.name], cfg.learn_bias,
                                            cfg.start_margin if cfg.start == "layer" else None,
                                            cfg.learn_weight_scales, x.meta.get("weight_group"))
            elif x in quant_nodes and cfg.learn_scales:
                fq = gm.get_submodule(x.target)
                if isinstance(fq.fmt, IntFormat) and fq.fmt.granularity == "per_tensor" and fq.params is not None:
                    if fq.group not in learned:
                        learned[fq.group] = LearnedStep(fq.group, fq.fmt, fq.params, cfg.qdrop)
                        learned[fq.group].generator = gen
                    steps_here[x.target] = learned[fq.group]
        owned = {id(s): s for s in steps_here.values() if s.log_scale.requires_grad}

        def module_of(target: str) -> nn.Module:
            return soft.get(target) or steps_here.get(target) or gm.get_submodule(target)

        sim_gm = block_module(gm, block, module_of, taps)
        groups = [{"params": [k.soft.v for k in soft.values()], "lr": cfg.lr}]
        gains = [k.soft.log_gain for k in soft.values() if k.soft.log_gain is not None]
        if owned or gains:
            groups.append({"params": [s.log_scale for s in owned.values()] + gains, "lr": cfg.scale_lr})
        biases = [k.bias for k in soft.values() if k.bias is not None and k.bias.requires_grad]
        if biases:
            groups.append({"params": biases, "lr": cfg.bias_lr})
        opt = torch.optim.Adam(groups)
        n_vars = max(1, sum(k.soft.numel_active() for k in soft.values()))
        warm = int(cfg.warmup * cfg.steps)
        anneal_end = cfg.steps - int(cfg.harden * cfg.steps)
        sim_gm.train()
        order_idx = torch.randperm(n, generator=gen)
        pos = 0
        for it in range(cfg.steps):
            if pos + cfg.batch_size > n:
                order_idx, pos = torch.randperm(n, generator=gen), 0
            idx = order_idx[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            outs = _tensors(sim_gm(*[_rows(x, idx, n) for x in inputs_q]))
            loss = objective(outs, [_rows(f, idx, n) for f in targets])
            if it >= warm:
                # beta anneals until the last `harden` steps; over those the regulariser's weight
                # grows a hundredfold, so that no rounding variable is left between 0 and 1.
                frac = min(1.0, (it - warm) / max(1, anneal_end - warm))
                beta = cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * frac
                boost = 1.0 + 99.0 * max(0.0, (it - anneal_end) / max(1, cfg.steps - anneal_end - 1))
                reg = sum(k.soft.regularizer(beta) for k in soft.values())
                loss = loss + cfg.reg_weight * boost * reg / n_vars
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sim_gm.eval()
        for k in soft.values():
            k.hard = True
        undecided = sum(k.soft.undecided() for k in soft.values())
        # The hard result is judged as installed (integer codes, frozen steps), so what is kept
        # is exactly what was measured; it goes back out if it does not beat round-to-nearest.
        undo = _install(gm, ctx, soft, owned, quant_nodes)
        o, t, outputs = _evaluate(block_module(gm, block, gm.get_submodule, taps), targets, inputs_q, n,
                                  objective, eval_batch)
        final = o * objective.scale[0] + objective.tap_weight * t * objective.scale[1]
        kept = not final < nearest
        if kept:
            undo()
            outputs = nearest_outputs
            for s in owned.values():
                s.reset()
        changed = sum(int((k.soft.codes() != k.soft.nearest).sum()) for k in soft.values()) if not kept else 0
        # Freeze the steps this block fitted: later blocks see them as they are now.
        for s in owned.values():
            s.log_scale.requires_grad_(False)
        results.append(BlockResult(
            block=block.name, kernels=tuple(k.target for k in block.kernels), steps=cfg.steps,
            nearest_loss=nearest, loss=final, kept_nearest=kept, undecided=undecided, changed=changed,
            weights=sum(k.soft.numel_active() for k in soft.values()), steps_learned=len(owned),
            seconds=time.perf_counter() - start))
        # What later blocks receive: this block's outputs as installed, and the float model's.
        for j, x in enumerate(block.outputs):
            env_q[x] = outputs[j]
            env_f[x] = targets[j]
        last = max(order[x] for x in block.nodes)
        for env in (env_q, env_f):
            for x in [x for x in env if all(order[u] <= last for u in x.users)]:
                del env[x]
    bar.close()
    return results


def float_graph(gm: fx.GraphModule, float_kernels: dict[str, nn.Module]) -> fx.GraphModule:
    """The float twin of a converted graph: float kernels, no quantizers, the same node names."""
    computed = [x for x in gm.graph.nodes if x.op not in ("placeholder", "output", "get_attr")]
    outputs = next(x for x in gm.graph.nodes if x.op == "output").all_input_nodes
    whole = Block(name="model", nodes=tuple(computed), inputs=tuple(x for x in gm.graph.nodes if x.op == "placeholder"),
                  outputs=tuple(outputs), kernels=())
    return block_module(gm, whole, float_module_of(gm, float_kernels))


def _install(gm: fx.GraphModule, ctx: Any, soft: dict[str, SoftKernel], steps: dict[int, LearnedStep],
             quant_nodes: list[fx.Node]) -> Callable[[], None]:
    """Write a block's hard result into the graph and the plan (every quantizer of a fitted group);
    returns what puts the previous state back."""
    saved_modules: dict[str, nn.Module] = {}
    saved_params: dict[str, tuple[Any, Any]] = {}
    for target, k in soft.items():
        module = gm.get_submodule(target)
        saved_params[target] = (module.weight, module.bias)
        # New Parameters: convert's module copy may share tensors with the user's model.
        module.weight = nn.Parameter(k.soft.hard_weight().to(module.weight.dtype), requires_grad=False)
        if k.bias is not None:
            module.bias = nn.Parameter(k.bias.detach().clone(), requires_grad=False)
    saved_plan: Plan = ctx.plan
    by_group = {s.group: s.qparams() for s in steps.values()}
    weight_params = {k.group: k.soft.qparams() for k in soft.values() if k.soft.log_gain is not None}
    for x in quant_nodes:
        fq = gm.get_submodule(x.target)
        if fq.group in by_group:
            saved_modules[x.target] = fq
            set_submodule(gm, x.target, FakeQuantize(fq.group, fq.fmt, by_group[fq.group]))
    plan = saved_plan
    for gid, params in list(by_group.items()) + list(weight_params.items()):
        plan = plan.with_group(replace(plan.group(gid), params=params))
    ctx.plan = plan

    def undo() -> None:
        for target, (weight, bias) in saved_params.items():
            module = gm.get_submodule(target)
            module.weight, module.bias = weight, bias
        for target, fq in saved_modules.items():
            set_submodule(gm, target, fq)
        ctx.plan = saved_plan
    return undo
