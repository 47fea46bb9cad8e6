"""Other quantizers run beside qcompile in the same benchmark, so their figures share a machine,
a load and a commit: today Sony's Model Compression Toolkit (MCT) 2.6.0, 8-bit post-training
quantization of EfficientNet-Lite0 with its defaults (`mct_worker.py` says what that is).

MCT runs in its own virtual environment, in a subprocess: it pins networkx, matplotlib and
pydantic below what the project uses, and those pins land in its environment only, never in the
project's. The environment is built on first use, under ~/.cache/qcompiler-bench, with the system
site-packages visible so that it reuses the machine's torch and the project's own install.

    from peers import run_mct
    r = run_mct(calib=500, heldout=500)   # {"seconds", "logits_quant", "logits_float"}
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
MCT_REQUIREMENT = "model-compression-toolkit==2.6.0"
MCT_VENV = Path.home() / ".cache" / "qcompiler-bench" / "mct-2.6.0"
# No pins of our own. MCT 2.6.0 requires networkx<3.6, matplotlib<3.10 and pydantic<2.12; the
# system has newer ones, and pip resolves by installing networkx 3.5, matplotlib 3.9.4 and
# pydantic 2.11 (with its pydantic-core) into this venv, where they shadow the system's (pip then
# warns that a system package unrelated to MCT, aws-sam-translator, wants pydantic 2.13: harmless
# here, nothing in this venv imports it). Its other dependencies (tensorboard, PuLP,
# mct-quantizers, edge-mdt-cl) are new to the machine and torch is not among them, so pip's
# constraint file (/etc/xdg/pip) is left as it is. The venv is made --without-pip: a bundled pip
# would bring the interpreter's old setuptools (65.5 on 3.11), which shadows the system's and
# breaks torch's requirement (setuptools>=77); the system's pip installs into the venv as well.
_MARKER = MCT_VENV / "installed.txt"
_LOG = MCT_VENV / "last-run.log"


def mct_python() -> str:
    """The python of MCT's virtual environment, creating it and installing MCT on first use."""
    python = MCT_VENV / "bin" / "python"
    if _MARKER.is_file() and _MARKER.read_text().strip() == MCT_REQUIREMENT and python.exists():
        return str(python)
    # --clear: no marker means an earlier attempt stopped part way; start from nothing.
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", "--system-site-packages",
                    str(MCT_VENV)], check=True)
    if sys.prefix != sys.base_prefix:
        # Called from inside a virtual environment: --system-site-packages shows the base
        # interpreter's packages, not this environment's, where torch and qcompiler live. Add them
        # after the venv's own (addsitedir also reads their .pth files: editable installs).
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        parents = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
        Path(purelib, "qcompiler-parent.pth").write_text(
            "".join(f"import site; site.addsitedir({p!r})\n" for p in sorted(parents)))
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", MCT_REQUIREMENT],
                   check=True)
    _MARKER.write_text(MCT_REQUIREMENT + "\n")
    return str(python)


def run_mct(calib: int, heldout: int) -> dict:
    """MCT PTQ (8-bit defaults) of EfficientNet-Lite0 on `calib` calibration crops: the seconds
    its quantization call took, and the quantized and float logits on `heldout` held-out crops.
    The worker's output (MCT's log, what it quantized) is kept in last-run.log in its venv."""
    python = mct_python()
    # MCT works on CUDA whenever it sees a GPU; qcompile is timed on the CPU, so is MCT.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory(prefix="mct-") as tmp:
        out = Path(tmp) / "mct.npz"
        proc = subprocess.run([python, str(BENCHMARKS / "mct_worker.py"), "--calib", str(calib),
                               "--heldout", str(heldout), "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        _LOG.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.splitlines()[-30:])
            raise RuntimeError(f"MCT worker failed (exit {proc.returncode}, full log {_LOG}):\n{tail}")
        with np.load(out) as data:
            return {"seconds": float(data["seconds"]),
                    "logits_quant": torch.from_numpy(data["logits_quant"]),
                    "logits_float": torch.from_numpy(data["logits_float"])}
