"""The per-layer report of a compiled model: formats, sizes and how much each layer's output suffers.

SQNR of a node is measured on its output tensor as the simulated model computes it (after the
node's quantizer, if it has one) against the float model's same tensor, over the calibration
data: 10·log10(Σ float² / Σ (float − simulated)²). Both graphs keep the node names of the
captured model, so the comparison needs no bookkeeping beyond a name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .fx_util import NodeOutputs


@dataclass(frozen=True)
class ReportRow:
    node: str
    op_kind: str
    group: int | None
    weight_format: str
    activation_format: str
    params: int
    weight_bytes: float
    sqnr_db: float


@dataclass(frozen=True)
class BiasFit:
    """A kernel whose bias did not fit the accumulator grid: the output channels whose weight
    scale was raised, by at most `scale_factor`, so that the largest bias `bias_max` fits."""

    node: str
    channels: tuple[int, ...]
    bias_bits: int
    scale_factor: float
    bias_max: float


@dataclass(frozen=True)
class Report:
    target: str
    rows: tuple[ReportRow, ...]
    totals: dict[str, Any] = field(default_factory=dict)
    bias_fits: tuple[BiasFit, ...] = ()

    def _bias_fit_lines(self) -> list[str]:
        if not self.bias_fits:
            return []
        lines = [f"Biases beyond the accumulator grid ({sum(len(f.channels) for f in self.bias_fits)} channels "
                 f"in {len(self.bias_fits)} kernels): their weight scale was raised until the bias fits."]
        for f in self.bias_fits:
            shown = ", ".join(str(c) for c in f.channels[:16]) + (", ..." if len(f.channels) > 16 else "")
            lines.append(f"- {f.node}: channels {shown} (bias up to {f.bias_max:.3g}, {f.bias_bits}-bit bias, "
                         f"weight scale up to {f.scale_factor:.3g}x)")
        return lines

    def _table(self, markdown: bool) -> str:
        head = ("node", "op", "group", "weights", "activations", "params", "weight bytes", "SQNR dB")
        body = [
            (r.node, r.op_kind, "" if r.group is None else str(r.group), r.weight_format, r.activation_format,
             f"{r.params:,}", f"{r.weight_bytes:,.0f}", "inf" if math.isinf(r.sqnr_db) else f"{r.sqnr_db:.1f}")
            for r in self.rows
        ]
        totals = [f"{k.replace('_', ' ')}: {_fmt(v)}" for k, v in self.totals.items()]
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in body]
            fits = self._bias_fit_lines()
            return f"## qcompiler report: target {self.target}\n\n" + "\n".join(lines) + "\n\n" + \
                "\n".join(f"- {t}" for t in totals) + "\n" + ("\n" + "\n".join(fits) + "\n" if fits else "")
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
        fmt_row = lambda row: "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        lines = [f"target {self.target}", fmt_row(head), fmt_row(tuple("-" * w for w in widths))]
        lines += [fmt_row(row) for row in body]
        fits = self._bias_fit_lines()
        return "\n".join(lines + [""] + totals + ([""] + fits if fits else []))

    def __str__(self) -> str:
        return self._table(markdown=False)

    def to_markdown(self) -> str:
        return self._table(markdown=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def node_sqnr(float_gm: fx.GraphModule, quant_gm: fx.GraphModule, names: list[str],
              batches: list, max_samples: int = 64, chunk: int = 8) -> dict[str, float]:
    """SQNR in dB of each named node's output, simulated against float, over the batches."""
    quantized_at = {n.meta["quantizes"]: n.name for n in quant_gm.graph.nodes if "quantizes" in n.meta}
    float_want = {n: n for n in names}
    quant_want = {quantized_at.get(n, n): n for n in names}
    signal = {n: 0.0 for n in names}
    noise = {n: 0.0 for n in names}
    seen = 0
    with torch.no_grad():
        for args in batches:
            if seen >= max_samples:
                break
            first = args[0]
            n_rows = first.shape[0] if isinstance(first, torch.Tensor) and first.ndim else 1
            for start in range(0, n_rows, chunk):
                if seen >= max_samples:
                    break
                take = lambda t: t[start:start + chunk] if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == n_rows else t
                a = tuple(take(t) for t in args)
                ref = NodeOutputs(float_gm, float_want)
                ref.run(*a)
                sim = NodeOutputs(quant_gm, quant_want)
                sim.run(*a)
                for name in names:
                    if name in ref.values and name in sim.values and ref.values[name].shape == sim.values[name].shape:
                        r = ref.values[name].double()
                        signal[name] += r.pow(2).sum().item()
                        noise[name] += (r - sim.values[name].double()).pow(2).sum().item()
                seen += min(chunk, n_rows - start)
    return {n: sqnr_db(signal[n], noise[n]) for n in names}


def sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
