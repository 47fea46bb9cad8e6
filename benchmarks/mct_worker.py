"""Sony MCT's 8-bit post-training quantization of EfficientNet-Lite0, run by `peers.run_mct`.

    <mct venv>/bin/python benchmarks/mct_worker.py --calib 500 --heldout 500 --out mct.npz

Runs in MCT's own virtual environment (`peers.mct_python`), never in the project's. MCT is
called with its defaults: the default PyTorch target platform (IMX500, TPC v1.0) and
`CoreConfig()`, so no mixed precision and no GPTQ. The calibration crops are its representative
data, in batches of 32, one pass. Only the MCT call is timed (torch threads at their default).
Writes `seconds`, `logits_quant` and `logits_float` (float32 [heldout, 1000]) with `np.savez`,
and a summary of what MCT quantized to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import model_compression_toolkit as mct  # noqa: E402

from benchmarks.common import load_split, logits  # noqa: E402
from qcompiler.zoo import efficientnet_lite0  # noqa: E402

BATCH = 32


def describe(model: torch.nn.Module) -> str:
    """Which layers carry a weight quantizer and where activations are quantized, in graph order."""
    wrapped, held = [], []
    for name, module in model.named_modules():
        for attr, q in getattr(module, "weights_quantizers", {}).items():
            wrapped.append(f"{name}.{attr}: {q.num_bits} bits{' per-channel' if q.per_channel else ''}")
        q = getattr(module, "activation_holder_quantizer", None)
        if q is not None:
            held.append(f"{name}: {q.num_bits} bits {type(q).__name__}")
    return "\n".join([f"{len(wrapped)} weight quantizers, first and last:", *wrapped[:2], *wrapped[-2:],
                      f"{len(held)} activation quantizers, first and last:", *held[:2], *held[-2:]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, required=True, help="calibration crops")
    ap.add_argument("--heldout", type=int, required=True, help="held-out crops")
    ap.add_argument("--out", type=Path, required=True, help="the .npz to write")
    args = ap.parse_args()

    model = efficientnet_lite0().eval()
    calib = load_split("calib", args.calib).crops
    heldout = load_split("heldout", args.heldout).crops
    logits_float = logits(model, heldout, BATCH).numpy()  # before MCT sees the model, in case it touches it

    def representative_data_gen():
        for batch in calib.split(BATCH):
            yield [batch.numpy()]

    tpc = mct.get_target_platform_capabilities()  # MCT's default for PyTorch (IMX500, v1.0)
    start = time.perf_counter()
    quantized, _ = mct.ptq.pytorch_post_training_quantization(
        model, representative_data_gen, target_platform_capabilities=tpc)
    seconds = time.perf_counter() - start
    print(describe(quantized), file=sys.stderr)

    quantized.eval()
    np.savez(args.out, seconds=np.float64(seconds), logits_quant=logits(quantized, heldout, BATCH).numpy(),
             logits_float=logits_float)


if __name__ == "__main__":
    main()
