"""optimize_rounding: choose each integer weight's rounding direction by layer reconstruction (AdaRound).

Before: a converted graph (`convert`): every quantized kernel holds its weights rounded to the
nearest code of its group's format and parameters. After: the same graph with the same scales
and zero points, but each conv / linear weight with an integer format rounded up or down,
whichever reconstructs the layer's float output best (`qcompiler.adaround`); with bias
correction (the default), every quantized kernel's bias also absorbs its mean output error.

Kernels are optimised one at a time in execution order, over a replay of the simulated and float
models side by side (`qcompiler.replay.PairedReplay`), so each kernel is fitted to the inputs the
final model gives it. `ctx.rounding` records what happened to each kernel.
"""
from __future__ import annotations

import torch
from torch import fx
from tqdm.auto import tqdm

from ..adaround import AdaRoundConfig, activation_slope, roundable_kernels, round_kernel
from ..calibration import batch_samples, first_samples, sub_batches
from ..context import CompileContext
from ..options import DEFAULT_RECONSTRUCTION
from ..reconstruction import ReconstructionConfig, reconstruct
from ..replay import PairedReplay, correct_channel_bias, is_weighted_kernel

STAGE = "optimize_rounding"
REPLAY_BATCH = 8


def reconstruction_choice(ctx: CompileContext):
    """What the compile asked for, else what the target names, else `DEFAULT_RECONSTRUCTION`."""
    if ctx.options.reconstruction is not None:
        return ctx.options.reconstruction
    return getattr(ctx.target, "reconstruction", None) or DEFAULT_RECONSTRUCTION


def optimize_rounding(gm: fx.GraphModule, ctx: CompileContext, config: AdaRoundConfig | None = None) -> fx.GraphModule:
    choice = reconstruction_choice(ctx)
    if config is None and choice == "nearest":
        ctx.note(STAGE, "weights keep round-to-nearest (reconstruction='nearest')")
        return gm
    if config is None and choice != "layer":
        return _reconstruct(gm, ctx, choice)
    cfg = config or ctx.options.effort_settings.adaround
    kernels, skipped = roundable_kernels(gm, ctx.plan, ctx.float_kernels)
    for why in skipped:
        ctx.note(STAGE, f"kept round-to-nearest for {why}")
    correctable = cfg.correct_bias and any(is_weighted_kernel(m) for m in ctx.float_kernels.values())
    if not kernels:
        ctx.note(STAGE, "no kernel with integer weights to optimise")
        if not correctable:
            return gm
    if not ctx.calib_batches:
        ctx.note(STAGE, "no calibration data: every weight keeps round-to-nearest")
        return gm
    # Replayed in small batches: a node's values then stay in the CPU's cache through the several
    # element-wise passes of a quantizer, which runs the simulation about a third faster.
    samples = list(sub_batches(first_samples(ctx.calib_batches, cfg.max_samples), REPLAY_BATCH))
    gen = torch.Generator().manual_seed(ctx.options.seed)
    by_name = {n.name: n for n in gm.graph.nodes}
    replay = PairedReplay(gm, ctx.float_kernels, samples)
    thin: list[str] = []
    bar = tqdm(total=len(kernels), desc=STAGE, unit="layer", disable=not ctx.options.progress)
    for step in replay:
        node = step.node
        kernel = kernels.get(node.name)
        if kernel is not None:
            slope = activation_slope(node, kernel.geometry, by_name, replay.run_float) if cfg.activation_weighted else None
            done = round_kernel(gm, node, kernel, ctx.float_kernels[node.target],
                                replay.sim[node.args[0]], replay.ref[node.args[0]], slope, cfg, gen)
            if done is None:
                thin.append(node.name)
            else:
                ctx.rounding[node.target] = done
            bar.update(1)
        # Every quantized kernel gets its mean error removed, optimised rounding or not
        # (FP8, NF4 and look-up-table weights keep their rounding but not their offsets).
        if cfg.correct_bias and node.op == "call_module" and is_weighted_kernel(ctx.float_kernels.get(node.target)):
            step.sim = correct_channel_bias(gm.get_submodule(node.target), step.simulate(), step.ref)
    bar.close()
    if thin:
        ctx.note(STAGE, f"kept round-to-nearest for {', '.join(thin)}: fewer calibration rows than "
                        f"{cfg.min_rows_per_input:g} x its inputs; give more calibration samples")
    results = ctx.rounding
    gain = sorted(r.rounded_error / r.nearest_error for r in results.values() if r.nearest_error > 0)
    ctx.note(STAGE, f"AdaRound on {len(results)} kernels over {sum(batch_samples(s) for s in samples)} samples "
                    f"({cfg.objective} objective, bias {'corrected' if cfg.correct_bias else 'kept'}); "
                    f"{sum(r.kept_nearest for r in results.values())} kept round-to-nearest"
                    + (f"; median objective vs nearest {gain[len(gain) // 2]:.3f}" if gain else ""))
    return gm


def _reconstruct(gm: fx.GraphModule, ctx: CompileContext, choice) -> fx.GraphModule:
    """Block or whole-model reconstruction (`qcompiler.reconstruction`)."""
    cfg = ReconstructionConfig(granularity=choice) if isinstance(choice, str) else choice
    kernels, skipped = roundable_kernels(gm, ctx.plan, ctx.float_kernels)
    for why in skipped:
        ctx.note(STAGE, f"kept round-to-nearest for {why}")
    if not kernels:
        ctx.note(STAGE, "no kernel with integer weights to optimise")
        return gm
    if not ctx.calib_batches:
        ctx.note(STAGE, "no calibration data: every weight keeps round-to-nearest")
        return gm
    if cfg.start == "layer":
        optimize_rounding(gm, ctx, AdaRoundConfig())
    results = reconstruct(gm, ctx, cfg)
    ctx.reconstruction = results
    kept = [r.block for r in results if r.kept_nearest]
    gain = sorted(r.loss / r.nearest_loss for r in results if not r.kept_nearest and r.nearest_loss > 0)
    ctx.note(STAGE, f"{cfg.granularity} reconstruction of {sum(len(r.kernels) for r in results)} kernels in "
                    f"{len(results)} blocks ({cfg.steps} steps each, {cfg.loss} loss, "
                    f"{sum(r.steps_learned for r in results)} activation steps learned)"
                    + (f"; median loss vs nearest {gain[len(gain) // 2]:.3f}" if gain else "")
                    + (f"; kept round-to-nearest in {', '.join(kept)}" if kept else ""))
    undecided = sum(r.undecided for r in results)
    if undecided:
        ctx.note(STAGE, f"{undecided} of {sum(r.weights for r in results)} rounding variables were still soft "
                        "at the end and were rounded at 1/2; more steps or a larger reg_weight harden them")
    gm.recompile()
    return gm
