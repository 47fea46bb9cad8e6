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
        nodes = list(compiled.simulated.graph.nodes)
        kinds = Counter(n.meta.get("op_kind") for n in nodes)
        assert kinds["shifted_window_attention"] == 0 and kinds["other"] == 0, target
        assert kinds["matmul"] == 8 and kinds["softmax"] == 4, target
        formats = {t: g.format_name for g in compiled.plan.groups for t in g.tensors}
        if target.startswith("npu"):
            assert all(formats[n.name].startswith("a") for n in nodes
                       if n.meta.get("op_kind") in ("matmul", "softmax")), target
        # The bias and shift mask reach the softmax as constants: no quantizer between.
        softmaxes = [n for n in nodes if n.meta.get("op_kind") == "softmax"]
        assert all(len(n.all_input_nodes) > 1 and all(a.op == "get_attr" for a in n.all_input_nodes[1:])
                   for n in softmaxes), target


@pytest.mark.parametrize("target", NPU_TARGETS)
def test_swin_reference_backend_is_bit_exact(swin_compiled, target):
    compiled = swin_compiled[target]
    x = _inputs(3, seed=3)
    with torch.no_grad():
        out = compiled(x)
        assert torch.equal(compiled.lower("reference")(x), out)
        assert float(out.abs().max()) > 0.1


@pytest.mark.parametrize("target", ["npu-int8", "dsp-fixed-point"])
def test_swin_attention_runs_on_integers_in_the_simulation_reference_qpack_and_a_saved_model(swin_compiled, target, tmp_path):
    from qcompiler.backends.reference import IntegerMatmul, IntegerSoftmax
    from qcompiler.exact import ExactMatmul, ExactSoftmax

    compiled = swin_compiled[target]
    simulated, reference = list(compiled.simulated.modules()), compiled.lower("reference")
    assert sum(isinstance(m, ExactMatmul) for m in simulated) == 8
    assert sum(isinstance(m, ExactSoftmax) for m in simulated) == 4      # with the additive mask
    assert sum(isinstance(m, IntegerMatmul) for m in reference.modules()) == 8
    assert sum(isinstance(m, IntegerSoftmax) for m in reference.modules()) == 4
    x = _inputs(2, seed=4)
    compiled.export(tmp_path / "swin.qpack", format="qpack")
    assert torch.equal(qcompiler.load_qpack(tmp_path / "swin.qpack").codes(x), reference.codes(x))
    compiled.save(tmp_path / "swin")
    with torch.no_grad():
        assert torch.equal(qcompiler.load(tmp_path / "swin")(x), compiled(x))


def _python_softmax_codes(row, weights, offsets, table, multiplier, z_out, qmin, qmax):
    """The integer softmax of one row with an additive mask, in Python integers (the definition in
    qcompiler.exact.softmax_codes)."""
    kept = [w > 0 for w in weights]
    logits = [q + c for q, c in zip(row, offsets)]
    top = max(l for l, k in zip(logits, kept) if k)
    e = [(table[min(top - l, len(table) - 1)] * w + 2 ** 14) // 2 ** 15 if k else 0
         for l, w, k in zip(logits, weights, kept)]
    total = max(sum(e), 1)
    return [min(max((v * multiplier + total * 2 ** 15) // (total * 2 ** 16) + z_out, qmin), qmax) for v in e]


@pytest.mark.parametrize("s_in, spread", [(0.0625, 1.0), (0.02, 1.0), (0.2, 5.0)])
def test_integer_softmax_with_an_additive_mask_equals_its_definition_and_float_within_a_code(s_in, spread):
    """Offsets put the mask on the code grid, so the row's maximum sees it, and weights carry the
    rest: measured within 0.52 of an output code of float softmax(s_in * q + mask) here, also where
    the mask spans more than the scores do (spread 5 at s_in 0.2)."""
    from qcompiler.exact import ExactSoftmax, softmax_mask_codes, softmax_table_entries

    s_out, z_out = 1 / 255, -128
    entries = softmax_table_entries(256, s_in, True)
    module = ExactSoftmax(entries, dim=-1, out_zero_point=z_out, qmin=-128, qmax=127,
                          out_multiplier=round(2 ** 16 / s_out))
    module.exp_table.copy_(torch.round(torch.exp(-torch.arange(entries, dtype=torch.float64) * s_in) * 2 ** 15).long())
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (2, 4, 3, 16, 16), generator=g)
    mask = torch.randn(4, 3, 16, 16, generator=g) * spread + shift_mask((8, 8), (4, 4), (2, 2)).unsqueeze(1)
    weights, offsets = softmax_mask_codes(mask, -1, s_in, 256)
    assert int((weights == 0).sum()) >= int((mask < -50).sum()) > 0      # the shift mask bars positions
    got = module.codes(q, weights.expand(q.shape), offsets)
    table = module.exp_table.tolist()
    for row, w, c, out in list(zip(q.reshape(-1, 16).tolist(), weights.expand(q.shape).reshape(-1, 16).tolist(),
                                   offsets.expand(q.shape).reshape(-1, 16).tolist(), got.reshape(-1, 16).tolist()))[::7]:
        assert out == _python_softmax_codes(row, w, c, table, module.out_multiplier, z_out, -128, 127)
    want = torch.softmax(q.double() * s_in + mask.double(), -1) / s_out + z_out
    assert float((got - want.clamp(-128, 127)).abs().max()) <= 0.6


@pytest.mark.parametrize("target", ["npu-int8"])
def test_swin_exports_to_onnx_and_runs_in_onnx_runtime(swin_compiled, target, tmp_path):
    """The cyclic shifts (Slice and Concat) and the integer softmaxes with their additive mask (as
    floats again) export; ONNX Runtime computes what the simulation does, its integer kernels in
    float. (A float softmax's mask: tests/test_onnx_export.py.)"""
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
