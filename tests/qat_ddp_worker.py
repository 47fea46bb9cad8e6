"""Run `qcompiler.qat.fit` on a saved compiled model, alone or as one rank under torchrun.

    python tests/qat_ddp_worker.py DIR            # one process, the whole batch
    torchrun --nproc_per_node=2 tests/qat_ddp_worker.py DIR

DIR holds `model/` (a saved CompiledModel) and `data.pt` (inputs and labels); the trained
module's state goes to `DIR/state-<world>.pt` (rank 0 writes it). `tests/test_qat.py` runs both
and compares them.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import qcompiler
from qcompiler import qat


def main(folder: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    compiled = qcompiler.load(os.path.join(folder, "model"))
    data = torch.load(os.path.join(folder, "data.pt"), weights_only=True)
    batches = [(data["x"][i:i + 32], data["y"][i:i + 32]) for i in range(0, len(data["x"]), 32)]
    module = qat.prepare(compiled, "lsq")
    qat.fit(compiled, batches, epochs=2, module=module, loss_fn=F.cross_entropy, lr=1e-3, step_lr=1e-2,
            checkpoint=False, progress=False)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()},
                   os.path.join(folder, f"state-{world}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
