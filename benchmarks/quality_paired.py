"""Held-out quality of the default npu-int8 compile against an earlier commit's, on the same crops
(python benchmarks/quality_paired.py --baseline COMMIT [--calib 256] [--heldout 500] [--out FILE]).

Speed work must not cost fidelity, and a top-1 agreement measured in two runs months apart
cannot say whether it did: the crops differ, and a few hundred crops from 11 photos leave
intervals several points wide. This compiles EfficientNet-Lite0 (real ImageNet weights) for
npu-int8 with the default pipeline twice in one run, with the baseline commit's qcompiler and
with this checkout's, on the same calibration crops, and measures both on the same held-out
crops: top-1 agreement with float (95 % interval clustered by photo), logits SQNR, and the
paired difference of agreement crop by crop (a cluster-robust t interval,
`qcompiler.stats.paired_difference_interval`), where the crops' own difficulty cancels.

The baseline runs from a temporary git worktree installed into its own virtual environment
(with this environment's packages), each side in a fresh process (`benchmarks/quality_worker.py`).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from qcompiler.mixed_precision import output_sqnr_db
from qcompiler.stats import paired_difference_interval
from qcompiler.zoo import efficientnet_lite0

from common import BENCHMARKS, REPO, SPLIT_NOTE, agreement, emit, header, load_split, logits, out_path, parser

WORKER = BENCHMARKS / "quality_worker.py"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def _baseline_python(commit: str, where: Path) -> Path:
    """A virtual environment (this one's packages) with qcompiler installed from `commit`."""
    tree, venv = where / "tree", where / "venv"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=REPO, check=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(tree)], check=True,
                   stdout=subprocess.DEVNULL)
    return python


def _side(python: Path | str, data: Path, out: Path) -> dict:
    subprocess.run([str(python), str(WORKER), str(data), str(out)], check=True, cwd=tempfile.gettempdir())
    result = np.load(out)
    return {"logits": torch.from_numpy(result["logits"]), "seconds": float(result["seconds"]),
            "source": str(result["source"])}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--calib", type=int, default=256, help="calibration crops (default 256)")
    ap.add_argument("--heldout", type=int, default=500, help="held-out crops (default 500)")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.heldout = 16, 24
    baseline = _git("rev-parse", "--short", args.baseline)
    top = header("Held-out quality against an earlier commit, paired", __file__, argv,
                 notes=[__doc__.split("\n\n", 1)[1].strip(), SPLIT_NOTE])
    calib = load_split("calib", args.calib)
    held = load_split("heldout", args.heldout)
    ref = logits(efficientnet_lite0().eval(), held.crops)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        data = where / "data.npz"
        np.savez(data, calib=calib.crops.numpy(), heldout=held.crops.numpy())
        try:
            python = _baseline_python(baseline, where)
            sides = {f"`{baseline}` (baseline)": _side(python, data, where / "base.npz"),
                     f"`{_git('rev-parse', '--short', 'HEAD')}` (this checkout)": _side(sys.executable, data,
                                                                                       where / "head.npz")}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(where / "tree")], cwd=REPO,
                           capture_output=True)
    measured = {name: agreement(ref, side["logits"], held.photos) for name, side in sides.items()}
    lines = [top, "", f"Calibration: {calib.describe}; measured on {held.describe}; target `npu-int8`, "
             "default pipeline, default effort.", "",
             "| qcompiler | top-1 agreement with float | logits SQNR | compile (s, one run) | imported from |",
             "|---|---|---:|---:|---|"]
    for name, side in sides.items():
        m = measured[name]
        source = side["source"].replace(tmp, "<temporary worktree>")
        lines.append(f"| {name} | {m.cell()} | {m.sqnr_db:.2f} dB | {side['seconds']:.1f} | `{source}` |")
    (base_name, base), (head_name, head) = measured.items()
    diff = paired_difference_interval(np.array(head.hits, dtype=float), np.array(base.hits, dtype=float),
                                      list(held.photos))
    base_logits, head_logits = (side["logits"] for side in sides.values())
    same = int((base_logits.argmax(1) == head_logits.argmax(1)).sum())
    lines += ["", f"Paired, this checkout minus the baseline, crop by crop: top-1 agreement "
              f"{100 * diff.estimate:+.1f} points, 95 % interval [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] "
              f"over {diff.n} crops from {diff.clusters} photos"
              + (" (excludes zero)" if diff.excludes_zero else " (includes zero)") + f"; logits SQNR "
              f"{head.sqnr_db - base.sqnr_db:+.2f} dB. The two compiled models give the same top-1 on {same} of "
              f"{len(held.crops)} crops; their logits are {output_sqnr_db(base_logits.double(), head_logits.double()):.1f} "
              "dB apart."]
    emit("\n".join(lines), out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
