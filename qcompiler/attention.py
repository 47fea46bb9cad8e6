"""Attention as primitive ops, so that each of its parts is quantized like any other op.

`nn.MultiheadAttention`, `F.scaled_dot_product_attention` and torchvision's Swin window attention
(`shifted_window_attention`, an `fx.wrap`ped function) are single nodes after capture. A target
that runs attention as one kernel can say so (`multi_head_attention`,
`scaled_dot_product_attention` or `shifted_window_attention` among its `[ops]`); for every other
target `decompose_attention` rewrites them into linears (the in- and out-projections, as module
kernels), reshapes and transposes that split and merge the heads, two activation x activation
matmuls, a scalar multiply by the softmax scale and a softmax. An attention mask enters only the
softmax (`masked_softmax`): masked scores are never quantized, as on an NPU whose softmax kernel
takes the mask beside its int8 input. Swin's relative position bias and shifted-window mask are
constants at inference: they become one additive mask of that softmax (which the integer softmax
of fixed-point targets takes as code offsets and weights, `qcompiler.exact.softmax_mask_codes`).

What is not decomposed (it stays one node, runs where the target says, and the reason is noted):
attention dropout, grouped-query attention, `add_bias_kv`, `add_zero_attn`, a
`nn.MultiheadAttention` whose averaged attention weights the model reads, Swin V2's cosine
attention, and a window attention whose input shape capture did not record.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fx_util import set_submodule
from .kernel_modules import constant_value


@fx.wrap
def masked_softmax(x: torch.Tensor, mask: torch.Tensor | None, dim: int, is_causal: bool = False) -> torch.Tensor:
    """softmax(x) along `dim` over the positions `mask` allows, as `F.scaled_dot_product_attention`
    applies its `attn_mask`: a boolean mask keeps the True positions, a float mask is added to
    the scores; `is_causal` keeps position j of row i only where j <= i."""
    if is_causal:
        rows, cols = x.shape[-2], x.shape[-1]
        causal = torch.ones(rows, cols, dtype=torch.bool, device=x.device).tril()
        x = x.masked_fill(~causal, float("-inf"))
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else x + mask
    return torch.softmax(x, dim)


def softmax_mask(node: fx.Node) -> Any:
    """The mask a `masked_softmax` node reads beside its scores (None for any other node): a
    constant of the softmax kernel, never a tensor to quantize."""
    if node.op == "call_function" and node.target is masked_softmax:
        return node.kwargs.get("mask", node.args[1] if len(node.args) > 1 else None)
    return None


def _sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    found = dict(zip(names, node.args))
    found.update(node.kwargs)
    return found


def _sdpa_reason(args: dict[str, Any]) -> str | None:
    if args.get("dropout_p", 0.0) not in (0, 0.0):
        return f"attention dropout p={args['dropout_p']} (it is applied even in eval mode)"
    if args.get("enable_gqa"):
        return "grouped-query attention"
    if not isinstance(args.get("is_causal", False), bool) or isinstance(args.get("scale"), fx.Node):
        return "a traced is_causal or scale"
    return None


def _decompose_sdpa(graph: fx.Graph, node: fx.Node) -> str | None:
    """Replace one scaled_dot_product_attention call; returns why not, or None when done."""
    args = _sdpa_arguments(node)
    reason = _sdpa_reason(args)
    if reason is not None:
        return reason
    q, k, v = args["query"], args["key"], args["value"]
    head_dim = (q.meta.get("shape") or (None,))[-1] if isinstance(q, fx.Node) else None
    scale = args.get("scale")
    if scale is None:
        if not isinstance(head_dim, int):
            return "the query's head size is unknown"
        scale = 1.0 / math.sqrt(head_dim)
    mask, causal = args.get("attn_mask"), bool(args.get("is_causal", False))
    with graph.inserting_before(node):
        scores = graph.call_function(torch.matmul, (q, graph.call_function(torch.transpose, (k, -2, -1))))
        scaled = graph.call_function(operator.mul, (scores, float(scale)))
        if mask is None and not causal:
            probs = graph.call_function(F.softmax, (scaled,), {"dim": -1})
        else:
            probs = graph.call_function(masked_softmax, (scaled, mask, -1, causal))
        out = graph.call_function(torch.matmul, (probs, v))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return None


class MultiheadAttentionParts(nn.Module):
    """`nn.MultiheadAttention` without masks, written in primitive ops (same weights)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, heads = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim, self.batch_first = heads, e // heads, mha.batch_first
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(e)
            in_features = (e, e, e)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
            in_features = (e, mha.kdim, mha.vdim)
        biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None,) * 3
        self.q_proj, self.k_proj, self.v_proj = (
            _linear(w, b, n) for w, b, n in zip(weights, biases, in_features))
        out = mha.out_proj
        self.out_proj = _linear(out.weight.detach(), None if out.bias is None else out.bias.detach(), e)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            query, key, value = (torch.transpose(t, 0, 1) for t in (query, key, value))
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q, torch.transpose(k, -2, -1)) * (1.0 / math.sqrt(self.head_dim))
        out = torch.matmul(F.softmax(scores, dim=-1), v)
        out = torch.transpose(out, 1, 2)
        out = self.out_proj(torch.reshape(out, (out.size(0), out.size(1), self.num_heads * self.head_dim)))
        return out if self.batch_first else torch.transpose(out, 0, 1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return torch.transpose(torch.reshape(x, (x.size(0), x.size(1), self.num_heads, self.head_dim)), 1, 2)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


_MHA_PARAMETERS = list(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


def _mha_reason(mha: nn.MultiheadAttention, node: fx.Node) -> str | None:
    bound = dict(zip(_MHA_PARAMETERS, node.args))
    bound.update(node.kwargs)
    for name in ("key_padding_mask", "attn_mask"):
        if bound.get(name) is not None:
            return f"an {name}"
    if bound.get("is_causal"):
        return "is_causal"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv or add_zero_attn"
    if mha.dropout > 0 and mha.training:
        return "attention dropout in training mode"
    if mha.embed_dim % mha.num_heads:
        return "an embedding size not divisible by the number of heads"
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
            return "its output tuple is used whole"
        if user.args[1] == 1 and user.users:
            return "the model reads its attention weights"
    return None


def _decompose_mha(gm: fx.GraphModule, node: fx.Node) -> str | None:
    mha = gm.get_submodule(node.target)
    reason = _mha_reason(mha, node)
    if reason is not None:
        return reason
    bound = dict(zip(_MHA_PARAMETERS, node.args))
    bound.update(node.kwargs)
    parts = MultiheadAttentionParts(mha).to(mha.out_proj.weight.device)
    set_submodule(gm, node.target, parts)
    sub = fx.symbolic_trace(parts)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    val_map = {p: bound[name] for p, name in zip(placeholders, ("query", "key", "value"))}
    before = set(gm.graph.nodes)
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(sub.graph, val_map)
    for new in gm.graph.nodes:
        if new not in before and new.op in ("call_module", "get_attr"):
            new.target = f"{node.target}.{new.target}"
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return None


# torchvision.models.swin_transformer.shifted_window_attention, named without importing torchvision.
SHIFTED_WINDOW_ATTENTION = ("torchvision.models.swin_transformer", "shifted_window_attention")


def is_shifted_window_attention(target: Any) -> bool:
    return (getattr(target, "__module__", None), getattr(target, "__name__", None)) == SHIFTED_WINDOW_ATTENTION


def shift_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Swin's mask of a shifted window partition, [windows, N, N] with N = window area: 0 where
    two tokens of a window came from the same region before the cyclic shift, -100 where not
    (torchvision's value, added to the scores)."""
    pad_h, pad_w = padded
    regions = torch.zeros(pad_h, pad_w)
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    regions = regions.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    differ = regions.unsqueeze(1) != regions.unsqueeze(2)
    return torch.zeros(differ.shape).masked_fill(differ, -100.0)


class ShiftedWindowAttentionOps(nn.Module):
    """Swin V1 window attention at inference for one input shape [B, H, W, C], in primitive ops:
    pad to whole windows, roll by the shift, partition into windows, the qkv linear, q·kᵀ times
    the scale, softmax with `bias` (relative position bias plus shift mask) added, attn·v, the
    proj linear, merge windows, roll back, crop. Every size but the batch is fixed here."""

    def __init__(self, shape: tuple[int, int, int, int], window: tuple[int, int], shift: tuple[int, int],
                 heads: int):
        super().__init__()
        _, self.height, self.width, self.channels = shape
        self.window, self.heads = window, heads
        self.pad_bottom = (window[0] - self.height % window[0]) % window[0]
        self.pad_right = (window[1] - self.width % window[1]) % window[1]
        self.padded = (self.height + self.pad_bottom, self.width + self.pad_right)
        # A window as large as the padded map leaves nothing to shift (torchvision's rule).
        self.shift = tuple(0 if w >= p else s for w, p, s in zip(window, self.padded, shift))
        self.grid = (self.padded[0] // window[0], self.padded[1] // window[1])
        self.tokens = window[0] * window[1]
        self.scale = float((self.channels // heads) ** -0.5)

    @property
    def windows(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
        (wh, ww), (gh, gw), n, c = self.window, self.grid, self.tokens, self.channels
        if self.pad_bottom or self.pad_right:
            x = F.pad(x, (0, 0, 0, self.pad_right, 0, self.pad_bottom))
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        x = torch.permute(torch.reshape(x, (-1, gh, wh, gw, ww, c)), (0, 1, 3, 2, 4, 5))
        x = torch.reshape(x, (-1, n, c))
        qkv = torch.reshape(F.linear(x, qkv_weight, qkv_bias), (-1, n, 3, self.heads, c // self.heads))
        qkv = torch.permute(qkv, (2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, torch.transpose(k, -2, -1)) * self.scale
        if any(self.shift):     # the mask differs per window: scores [B, windows, heads, N, N]
            probs = masked_softmax(torch.reshape(scores, (-1, self.windows, self.heads, n, n)), bias, -1)
            probs = torch.reshape(probs, (-1, self.heads, n, n))
        else:
            probs = masked_softmax(scores, bias, -1)
        x = torch.reshape(torch.transpose(torch.matmul(probs, v), 1, 2), (-1, n, c))
        x = F.linear(x, proj_weight, proj_bias)
        x = torch.permute(torch.reshape(x, (-1, gh, gw, wh, ww, c)), (0, 1, 3, 2, 4, 5))
        x = torch.reshape(x, (-1, self.padded[0], self.padded[1], c))
        if any(self.shift):
            x = torch.roll(x, shifts=self.shift, dims=(1, 2))
        if self.pad_bottom or self.pad_right:
            x = x[:, :self.height, :self.width, :]
        return x


_SWIN_PARAMETERS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                    "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")


def _swin_reason(args: dict[str, Any], shape: Any) -> str | None:
    if args.get("logit_scale") is not None:
        return "Swin V2 cosine attention (logit_scale)"
    if args.get("training", True) is not False and (args.get("attention_dropout", 0.0) or args.get("dropout", 0.0)):
        return "dropout in training mode"
    if not (isinstance(shape, tuple) and len(shape) == 4 and all(isinstance(d, int) for d in shape)):
        return "the input's shape [B, H, W, C] is unknown (capture recorded none)"
    window, shift, heads = args.get("window_size"), args.get("shift_size"), args.get("num_heads")
    if not all(isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) for i in v)
               for v in (window, shift)) or not isinstance(heads, int):
        return "a traced window size, shift or number of heads"
    if shape[3] % heads:
        return "channels not divisible by the number of heads"
    return None


def _decompose_swin(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Replace one shifted_window_attention call; returns why not, or None when done."""
    args = dict(zip(_SWIN_PARAMETERS, node.args))
    args.update(node.kwargs)
    x = args["input"]
    reason = _swin_reason(args, x.meta.get("shape") if isinstance(x, fx.Node) else None)
    if reason is not None:
        return reason
    ops = ShiftedWindowAttentionOps(x.meta["shape"], tuple(args["window_size"]), tuple(args["shift_size"]),
                                    args["num_heads"])
    position_bias = constant_value(args["relative_position_bias"], gm)
    if not isinstance(position_bias, torch.Tensor):
        return "a relative position bias that depends on the input"
    bias = position_bias.detach().float().reshape(1, ops.heads, ops.tokens, ops.tokens)
    if any(ops.shift):
        bias = bias + shift_mask(ops.padded, ops.window, ops.shift).unsqueeze(1).to(bias.device)
    name, i = f"{node.name}_bias", 1
    while hasattr(gm, name):
        name, i = f"{node.name}_bias_{i}", i + 1
    gm.register_buffer(name, bias.contiguous())
    sub = fx.symbolic_trace(ops)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_before(node):
        bias_node = gm.graph.get_attr(name)
        values = (x, args["qkv_weight"], args.get("qkv_bias"), args["proj_weight"], args.get("proj_bias"), bias_node)
        out = gm.graph.graph_copy(sub.graph, dict(zip(placeholders, values)))
    node.replace_all_uses_with(out)
    _erase_with_dead_inputs(gm.graph, node)
    return None


def _erase_with_dead_inputs(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node`, then whatever computed only its inputs (the position-bias table lookup)."""
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for n in inputs:
        if not n.users and n.op in ("call_function", "call_method", "get_attr"):
            _erase_with_dead_inputs(graph, n)


def decompose_attention(gm: fx.GraphModule, keep: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """Rewrite every attention node whose kind is not in `keep` into primitive ops. Returns the
    names of the nodes decomposed and, for those left whole, the reason."""
    done: list[str] = []
    kept: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            if "scaled_dot_product_attention" in keep:
                continue
            name, reason = node.name, _decompose_sdpa(gm.graph, node)
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention) \
                and not node.meta.get("opaque"):
            if "multi_head_attention" in keep:
                continue
            name, reason = node.name, _decompose_mha(gm, node)
        elif node.op == "call_function" and is_shifted_window_attention(node.target):
            if "shifted_window_attention" in keep:
                continue
            name, reason = node.name, _decompose_swin(gm, node)
        else:
            continue
        if reason is None:
            done.append(name)
        else:
            kept[name] = reason
    if done:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return done, kept
