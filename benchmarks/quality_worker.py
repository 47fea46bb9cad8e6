"""One side of `benchmarks/quality_paired.py`: compile EfficientNet-Lite0 for npu-int8 with the
qcompiler that `import qcompiler` finds (the caller sets PYTHONPATH to the commit under test)
and write its logits on the held-out crops.

python benchmarks/quality_worker.py DATA.npz OUT.npz

DATA holds `calib` and `heldout` crops (N x 3 x 224 x 224, float32); OUT gets `logits`,
`seconds` (the compile) and `source` (where qcompiler was imported from). Only the API every
version since the first has (qcompile, qcompiler.zoo.efficientnet_lite0) is used.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch


def main(data_path: str, out_path: str) -> int:
    import qcompiler
    from qcompiler.zoo import efficientnet_lite0

    data = np.load(data_path)
    calib = torch.from_numpy(data["calib"])
    held = torch.from_numpy(data["heldout"])
    model = efficientnet_lite0().eval()
    start = time.perf_counter()
    compiled = qcompiler.qcompile(model, calib[:1], target="npu-int8", calib_data=list(calib.split(32)),
                                  progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = torch.cat([compiled(part) for part in held.split(32)]).float()
    np.savez(out_path, logits=logits.numpy(), seconds=np.float64(seconds), source=np.str_(qcompiler.__file__))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
