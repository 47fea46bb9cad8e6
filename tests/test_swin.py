"""Swin: torchvision's window attention (`shifted_window_attention`, one wrapped node after capture)
decomposed into linears, matmuls and a softmax whose additive mask is the relative position bias
plus the shifted-window mask, on a small `SwinTransformer` compiled under every target."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torchvision.models import swin_transformer
from torchvision.models.swin_transformer import SwinTransformer

import qcompiler
from qcompiler.attention import decompose_attention, masked_softmax, shift_mask
from qcompiler.passes.canonicalize import canonicalize
from qcompiler.tracing import capture_module

NPU_TARGETS = ("npu-int8", "npu-int4", "npu-int8-transformer")
# Patch 4, window 4: a 44x44 input gives 11x11 tokens (padded to 12x12, shifted windows), then 6x6
# after patch merging (which pads 11 to 12), padded to 8x8 and shifted again. A 32x32 input needs
# no padding and its second stage is one window, which torchvision does not shift.
SIZE = 44


def _swin(**options) -> SwinTransformer:
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10, **options).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):          # randomised LayerNorm statistics
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, swin_transformer.ShiftedWindowAttention):
                # torchvision draws the table with std 0.02: too small for a wrong bias to show.
                m.relative_position_bias_table.normal_(0, 1.0)
        model.head.weight.normal_(0, 0.2)
        model.head.bias.normal_(0, 0.1)
    return model


def _inputs(n: int, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _kinds(gm) -> Counter:
    return Counter(n.meta.get("op_kind") for n in gm.graph.nodes)


@pytest.mark.parametrize("size, rolls", [(32, 2), (SIZE, 4)])
def test_window_attention_is_decomposed_exactly(size, rolls):
    model = _swin()
    x = _inputs(2, size)
    gm = canonicalize(capture_module(model, x))
    kinds = _kinds(gm)
    assert kinds["shifted_window_attention"] == 0 and kinds["other"] == 0
    assert kinds["matmul"] == 2 * 4 and kinds["softmax"] == 4
    assert kinds["linear"] == 4 * 4 + 1 + 1        # qkv, proj and two MLP layers per block; merging; head
    assert kinds["roll"] == rolls                  # a shift and its reversal per shifted block
    assert sum(n.target is masked_softmax for n in gm.graph.nodes) == 4
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_shift_mask_separates_the_regions_a_cyclic_shift_brings_together():
    # 8x8 map, 4x4 windows, shift 2: the last window mixes four regions, the first none.
    mask = shift_mask((8, 8), (4, 4), (2, 2))
    assert mask.shape == (4, 16, 16)
    assert not mask[0].any()
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    region = ((rows >= 2).long() * 2 + (cols >= 2).long()).flatten()   # last window's quadrants
    same = region[:, None] == region[None, :]
    assert torch.equal(mask[3] == 0, same)


def test_window_attention_the_decomposition_cannot_write_stays_whole():
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    x = _inputs(1, 32)
    torch.manual_seed(0)
    v2 = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                         block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2).eval()
    done, kept = decompose_attention(capture_module(v2, x))
    assert not done and len(kept) == 2 and all("Swin V2" in why for why in kept.values())

    training = _swin(attention_dropout=0.1).train()
    gm = capture_module(training, x)
    done, kept = decompose_attention(gm)
    assert not done and len(kept) == 4 and all("dropout in training mode" in why for why in kept.values())

    gm = capture_module(_swin(), x)
    for node in gm.graph.nodes:
        if node.name == "features_1_0_norm1":
            del node.meta["shape"]
    done, kept = decompose_attention(gm)
    assert len(done) == 3 and list(kept) == ["shifted_window_attention"]
    assert "shape" in kept["shifted_window_attention"]


@pytest.fixture(scope="module")
def swin_compiled():
    model = _swin()
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(4, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    return {t: qcompiler.qcompile(model, calib[0], target=t, calib_data=calib, progress=False)
            for t in qcompiler.list_targets()}


def test_swin_compiles_under_every_target_with_attention_quantized(swin_compiled):
    assert len(swin_compiled) >= 7
    for target, compiled in swin_compiled.items():
        rows = compiled.report().rows
        assert not any(r.op_kind in ("shifted_window_attention", "other") for r in rows), target
        matmuls = [r for r in rows if r.op_kind == "matmul"]
        assert len(matmuls) == 8, target
        if target.startswith("npu"):
            assert all(r.activation_format.startswith("a") for r in rows if r.op_kind in ("matmul", "softmax")), target
        # The bias and shift mask reach the softmax as they are: no quantizer between.
        softmaxes = [n for n in compiled.simulated.graph.nodes if n.target is masked_softmax]
        assert len(softmaxes) == 4, target
        assert all(n.args[1].op == "get_attr" for n in softmaxes), target


@pytest.mark.parametrize("target", NPU_TARGETS)
def test_swin_reference_backend_is_bit_exact(swin_compiled, target):
    compiled = swin_compiled[target]
    x = _inputs(3, seed=3)
    with torch.no_grad():
        out = compiled(x)
        assert torch.equal(compiled.lower("reference")(x), out)
        assert float(out.abs().max()) > 0.1


def test_swin_attention_matmuls_run_on_integers(swin_compiled):
    from qcompiler.backends.reference import IntegerMatmul
    from qcompiler.exact import ExactMatmul

    compiled = swin_compiled["npu-int8"]
    assert sum(isinstance(m, ExactMatmul) for m in compiled.simulated.modules()) == 8
    assert sum(isinstance(m, IntegerMatmul) for m in compiled.lower("reference").modules()) == 8


@pytest.mark.parametrize("target", ["cpu-x86-int8", "npu-int8"])
def test_swin_exports_to_onnx_and_runs_in_onnx_runtime(swin_compiled, target, tmp_path):
    """The cyclic shifts (Slice and Concat) and the softmaxes with their additive mask export; ONNX
    Runtime computes what the simulation does (npu-int8's integer kernels it runs in float)."""
    import onnxruntime as ort
    from qcompiler.mixed_precision import output_sqnr_db

    compiled = swin_compiled[target]
    path = compiled.export_onnx(tmp_path / "swin.onnx").path
    disabled = ["QDQS8ToU8Transformer"] if target == "npu-int8" else None
    session = ort.InferenceSession(path, disabled_optimizers=disabled)
    x = _inputs(4, seed=3)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = compiled(x)
    assert output_sqnr_db(want.double(), got.double()) >= 25.0


def test_a_target_that_runs_window_attention_whole_keeps_it(tmp_path):
    from importlib.resources import files

    text = files("qcompiler.targets").joinpath("npu-int8.toml").read_text()
    text = text.replace('name = "npu-int8"', 'name = "npu-window-attention"').replace(
        "[ops]\n", '[ops]\nshifted_window_attention = { inputs = ["a8"] }\n')
    spec = tmp_path / "npu-window-attention.toml"
    spec.write_text(text)
    model, x = _swin(), _inputs(2)
    compiled = qcompiler.qcompile(model, x, target=str(spec), calib_data=[x], progress=False)
    kinds = Counter(r.op_kind for r in compiled.report().rows)
    assert kinds["shifted_window_attention"] == 4 and kinds["matmul"] == 0
