"""The quantization plan: for every quantizer group, its members, chosen format and parameters.

Frozen values; `to_json()` gives what `save` writes and the report shows (the tensors of the
parameters go to the tensor file, not the JSON).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .formats import Format, QParams


@dataclass(frozen=True)
class GroupPlan:
    id: int
    kind: str                       # "activation" | "weight"
    tensors: tuple[str, ...]        # graph nodes whose outputs it quantizes
    weights: tuple[str, ...]        # qualified weight names it quantizes
    owner: str
    op_kind: str
    candidates: tuple[str, ...]
    format_name: str                # the spec's name of the chosen format ("float" if not quantized)
    format: Format
    params: QParams | None          # scale, zero point, axis, codebook; None when float
    fallback: bool = False

    @property
    def bits(self) -> int:
        return self.format.bits

    def describe(self) -> dict[str, Any]:
        """The format and parameters as plain JSON values (scales summarised when long)."""
        fmt = self.format
        out: dict[str, Any] = {
            "format": self.format_name, "family": fmt.family, "bits": fmt.bits,
            "granularity": getattr(fmt, "granularity", "per_tensor"),
        }
        for attr in ("signed", "symmetric", "narrow_range", "scale_kind", "group_size", "kind", "block_size"):
            if hasattr(fmt, attr):
                out[attr] = getattr(fmt, attr)
        if self.params is not None:
            scale = self.params.scale.reshape(-1)
            out["scale"] = scale.tolist() if scale.numel() <= 4 else {
                "count": scale.numel(), "min": scale.min().item(), "max": scale.max().item()}
            if self.params.zero_point is not None:
                zp = self.params.zero_point.reshape(-1)
                out["zero_point"] = zp.tolist() if zp.numel() <= 4 else {"count": zp.numel()}
            out["axis"] = self.params.axis
        return out


@dataclass(frozen=True)
class Plan:
    target: str
    target_version: str
    groups: tuple[GroupPlan, ...]

    def group(self, gid: int) -> GroupPlan:
        return self.groups[gid]

    def with_group(self, group: GroupPlan) -> "Plan":
        """This plan with `group` in place of the group of the same id."""
        groups = list(self.groups)
        groups[group.id] = group
        return replace(self, groups=tuple(groups))

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target, "target_version": self.target_version,
            "groups": [
                {"id": g.id, "kind": g.kind, "tensors": list(g.tensors), "weights": list(g.weights),
                 "owner": g.owner, "op_kind": g.op_kind, "candidates": list(g.candidates),
                 "fallback": g.fallback, **g.describe()}
                for g in self.groups
            ],
        }


def params_tensors(plan: Plan) -> dict[str, torch.Tensor]:
    """Every parameter tensor of the plan, by a stable key, for the tensor file."""
    out: dict[str, torch.Tensor] = {}
    for g in plan.groups:
        if g.params is None:
            continue
        out[f"group{g.id}.scale"] = g.params.scale.detach().float().contiguous()
        if g.params.zero_point is not None:
            out[f"group{g.id}.zero_point"] = g.params.zero_point.detach().contiguous()
        if g.params.codebook is not None:
            out[f"group{g.id}.codebook"] = g.params.codebook.detach().float().contiguous()
    return out
