"""Model core: masked attention semantics, attention backends, every decoder switch, backbone
options, parameter counts and the absence of host synchronisation."""
from __future__ import annotations

from typing import get_args

import pytest
import torch

from m2f_kernels.mask_product import mask_product  # noqa: E402
from m2f.config import CrossAttention, FeatureSchedule, LayerOrder, QueryFeatures  # noqa: E402
from m2f.config import DecoderCfg, get_preset  # noqa: E402
from m2f.errors import InputError  # noqa: E402
from m2f.models.backbone import FrozenBatchNorm2d, ResNetBackbone  # noqa: E402
from m2f.models.build import build_model  # noqa: E402
from m2f.models.transformer_decoder import (  # noqa: E402
    CROSS_ATTENTION,
    SCHEDULES,
    Attention,
    SMCAPrior,
    build_transformer_decoder,
    foreground_attention,
    masked_attention_bias,
)

B, C, NQ, K = 2, 64, 6, 5
SIZES = [(2, 3), (4, 6), (8, 12)]  # 1/32, 1/16, 1/8 of a 64 x 96 image


def _features(seed: int = 0, channels: int = C):
    g = torch.Generator().manual_seed(seed)
    ms = [torch.randn(B, channels, h, w, generator=g) for h, w in SIZES]
    mask_features = torch.randn(B, channels, 16, 24, generator=g)
    return ms, mask_features


# ----------------------------------------------------------------------------------------------
# (a)-(c) attention module
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_masked_attention_ignores_keys_outside_the_mask(backend):
    torch.manual_seed(0)
    attn = Attention(C, 4, backend=backend).eval()
    h, w = SIZES[1]
    q = torch.randn(B, NQ, C)
    mem = torch.randn(B, h * w, C)
    pos = torch.randn(B, h * w, C)
    mask_logits = torch.randn(B, NQ, 16, 24) * 3
    bias = masked_attention_bias(mask_logits, [(h, w)], 0.5)  # [B, 1, Q, HW]
    assert bias.shape == (B, 1, NQ, h * w)
    blocked = torch.isinf(bias[:, 0])  # [B, Q, HW]
    assert 0.1 < blocked.float().mean() < 0.9
    out, _ = attn(q, mem + pos, mem, bias)
    for qi in range(NQ):
        outside = blocked[:, qi, :, None]  # [B, HW, 1]
        mem2 = torch.where(outside, torch.randn_like(mem) * 10, mem)
        out2, _ = attn(q, mem2 + pos, mem2, bias)
        torch.testing.assert_close(out2[:, qi], out[:, qi], atol=1e-5, rtol=1e-5)
        # ... while the output of a query that sees those keys does change.
        assert (out2 - out).abs().max() > 1e-2
    # Changing a key inside the mask changes the query's output.
    inside = ~blocked[:, 0, :, None]
    mem3 = torch.where(inside, torch.randn_like(mem) * 10, mem)
    out3, _ = attn(q, mem3 + pos, mem3, bias)
    assert (out3[:, 0] - out[:, 0]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_fully_blocked_query_attends_everywhere(backend):
    torch.manual_seed(1)
    attn = Attention(C, 4, backend=backend).eval()
    h, w = SIZES[0]
    q, mem = torch.randn(B, NQ, C), torch.randn(B, h * w, C)
    mask_logits = torch.randn(B, NQ, 16, 24) * 3
    mask_logits[:, 0] = -10.0  # query 0: empty mask
    mask_logits[:, 1] = 10.0  # query 1: full mask
    bias = masked_attention_bias(mask_logits, [(h, w)], 0.5)
    assert torch.all(bias[:, 0, 0] == 0) and torch.all(bias[:, 0, 1] == 0)
    out, _ = attn(q, mem, mem, bias)
    full, _ = attn(q, mem, mem, None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :2], full[:, :2], atol=1e-5, rtol=1e-5)


def test_reference_and_sdpa_backends_agree():
    torch.manual_seed(2)
    ref = Attention(C, 4, backend="reference").eval()
    fast = Attention(C, 4, backend="sdpa").eval()
    fast.load_state_dict(ref.state_dict())
    q, mem = torch.randn(B, NQ, C), torch.randn(B, 50, C)
    bias = masked_attention_bias(torch.randn(B, NQ, 5, 10) * 3, [(5, 10)], 0.5)
    for b in (None, bias):
        torch.testing.assert_close(ref(q, mem, mem, b)[0], fast(q, mem, mem, b)[0], atol=1e-5, rtol=1e-5)
    # Whole decoder, both backends.
    ms, mf = _features()
    d_ref = build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ,
                                                 attention_backend="reference"), C, C, K).eval()
    d_fast = build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ,
                                                  attention_backend="sdpa"), C, C, K).eval()
    d_fast.load_state_dict(d_ref.state_dict())
    with torch.no_grad():
        a, b = d_ref(ms, mf), d_fast(ms, mf)
    for pa, pb in zip(a.predictions(), b.predictions()):
        torch.testing.assert_close(pa.mask_logits, pb.mask_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pa.class_logits, pb.class_logits, atol=1e-4, rtol=1e-4)


def test_attention_maps_respect_masks():
    torch.manual_seed(3)
    ms, mf = _features()
    dec = build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ),
                                    C, C, K).eval()
    with torch.no_grad():
        out = dec(ms, mf, return_attention=True)
        plain = dec(ms, mf)
    torch.testing.assert_close(out.mask_logits, plain.mask_logits, atol=1e-4, rtol=1e-4)
    assert len(out.attention_maps) == 9
    preds = out.predictions()
    for i, a in enumerate(out.attention_maps):
        h, w = SIZES[i % 3]
        assert a.shape == (B, NQ, h * w)
        torch.testing.assert_close(a.sum(-1), torch.ones(B, NQ))
        bias = masked_attention_bias(preds[i].mask_logits, [(h, w)], 0.5)[:, 0]
        assert torch.all(a[torch.isinf(bias)] == 0)


def test_foreground_attention_masked_vs_standard():
    """Masked attention puts all its weight inside the previous prediction's mask."""
    torch.manual_seed(6)
    ms, mf = _features()
    fg_frac = {}
    for kind in ("masked", "standard"):
        dec = build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ,
                                                   cross_attention=kind, feature_schedule="single_8"), C, C, K).eval()
        if kind == "masked":
            state = dec.state_dict()
        dec.load_state_dict(state)
        with torch.no_grad():
            out = dec(ms, mf, return_attention=True)
        # foreground of layer i = the mask that drove it (prediction i)
        sizes = dec.attended_sizes(ms)
        per_layer = [foreground_attention([a], p.mask_logits > 0, [s])
                     for a, p, s in zip(out.attention_maps, out.predictions(), sizes)]
        fg_frac[kind] = torch.cat(per_layer)
    # Masked: 1 unless the mask was empty (then attends everywhere); standard: clearly below.
    assert fg_frac["masked"].mean() > 0.9
    assert fg_frac["standard"].mean() < fg_frac["masked"].mean() - 0.1


# ----------------------------------------------------------------------------------------------
# (d) every decoder switch: forward + backward
# ----------------------------------------------------------------------------------------------
SWITCHES = [
    *[{"cross_attention": v} for v in sorted(CROSS_ATTENTION)],
    *[{"feature_schedule": v} for v in sorted(SCHEDULES)],
    *[{"layer_order": v} for v in get_args(LayerOrder)],
    *[{"query_features": v} for v in get_args(QueryFeatures)],
    {"query_features": "zero", "cross_attention": "mask_pooling"},
    {"pre_norm": True}, {"dropout": 0.1}, {"attention_backend": "reference"}, {"enforce_input_projection": True},
    {"num_layers": 4, "num_queries": 3},
]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_decoder_switch_forward_backward(switch):
    torch.manual_seed(4)
    cfg = DecoderCfg(**{**dict(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ), **switch})
    dec = build_transformer_decoder(cfg, in_channels=48, mask_dim=C, num_classes=K).train()
    ms, mf = _features(channels=48)
    mf = torch.randn(B, C, 16, 24)
    ms = [m.requires_grad_() for m in ms]
    out = dec(ms, mf)
    preds = out.predictions()
    n_expected = cfg.num_layers + (1 if cfg.query_features == "learnable_supervised" else 0)
    assert len(preds) == n_expected
    for p in preds:
        assert p.class_logits.shape == (B, cfg.num_queries, K + 1)
        assert p.mask_logits.shape == (B, cfg.num_queries, 16, 24)
        assert torch.isfinite(p.class_logits).all() and torch.isfinite(p.mask_logits).all()
    loss = sum(p.class_logits.square().mean() + p.mask_logits.square().mean() for p in preds)
    loss.backward()
    # Exactly the attended levels receive (finite, non-zero) gradient.
    attended = {"single_32": {0}, "single_16": {1}, "single_8": {2}}.get(cfg.feature_schedule, {0, 1, 2})
    if cfg.feature_schedule == "multi_scale":
        attended = {i % 3 for i in range(cfg.num_layers)}
    for lvl, m in enumerate(ms):
        if lvl in attended:
            assert torch.isfinite(m.grad).all() and m.grad.abs().sum() > 0
        else:
            assert m.grad is None
    grads = [p.grad for n, p in dec.named_parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_cross_attention_registry_is_the_config_literal():
    """One switch, one place: the registry's variants are exactly the config's choices, and each
    decoder picks its variant once at construction."""
    assert set(CROSS_ATTENTION) == set(get_args(CrossAttention))
    assert set(SCHEDULES) == set(get_args(FeatureSchedule))
    for name, variant in CROSS_ATTENTION.items():
        dec = build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ,
                                                   cross_attention=name), C, C, K)
        assert dec.cross_variant is variant
        assert all(layer.mask_pooling == variant.pools for layer in dec.layers)
    with pytest.raises(ValueError, match="valid choices"):
        build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, cross_attention="sparse"), C, C, K)


def test_cross_attention_kinds_differ():
    torch.manual_seed(5)
    ms, mf = _features()
    outs = {}
    base = build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ), C, C, K)
    for kind in sorted(CROSS_ATTENTION):
        dec = build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ,
                                                   cross_attention=kind), C, C, K).eval()
        missing, unexpected = dec.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("smca.") for k in missing), (kind, missing)
        assert bool(missing) == CROSS_ATTENTION[kind].query_prior
        with torch.no_grad():
            outs[kind] = dec(ms, mf).mask_logits
    kinds = list(outs)
    for i in range(len(kinds)):
        for j in range(i + 1, len(kinds)):
            assert (outs[kinds[i]] - outs[kinds[j]]).abs().max() > 1e-3, (kinds[i], kinds[j])


def test_smca_prior_is_smcas_gaussian():
    """SMCAPrior's bias, element by element: -(s_x^2 (x_k - c_x)^2 + s_y^2 (y_k - c_y)^2) / beta, the
    centre = sigmoid(MLP) * (W, H) of the 1/32 level + the head's offset, distances in 1/32 cells."""
    torch.manual_seed(7)
    nH, L = 4, 3
    prior = SMCAPrior(C, nH, L, beta=8.0)
    for lin in prior.scales:  # non-trivial scales (they start at 1)
        torch.nn.init.normal_(lin.weight, std=0.1)
    x, pos = torch.randn(B, NQ, C), torch.randn(B, NQ, C)
    coarse, sizes = SIZES[0], SIZES[:2]
    bias0, centre = prior(x, pos, 0, sizes, coarse)
    bias1, centre1 = prior(x + 1, pos, 1, sizes, coarse, centre)
    assert bias0.shape == (B, nH, NQ, sum(h * w for h, w in sizes)) and centre1 is centre
    assert (centre > 0).all() and (centre < 1).all()
    H32, W32 = coarse
    for layer, xin, bias in ((0, x, bias0), (1, x + 1, bias1)):
        h = prior.norms[layer](xin + pos)
        off = prior.offsets[layer](h).view(B, NQ, nH, 2)
        sc = prior.scales[layer](h).view(B, NQ, nH, 2) ** 2
        for b, q, head in ((0, 0, 0), (1, NQ - 1, nH - 1), (0, 2, 1)):
            cx = centre[b, q, 0] * W32 + off[b, q, head, 0]
            cy = centre[b, q, 1] * H32 + off[b, q, head, 1]
            k = 0
            for hl, wl in sizes:
                for i in range(hl):
                    for j in range(wl):
                        xk, yk = (j + 0.5) * W32 / wl, (i + 0.5) * H32 / hl
                        want = -(sc[b, q, head, 0] * (xk - cx) ** 2 + sc[b, q, head, 1] * (yk - cy) ** 2) / 8.0
                        torch.testing.assert_close(bias[b, head, q, k], want, rtol=1e-5, atol=1e-5)
                        k += 1


def test_smca_is_predicted_from_the_queries_not_the_masks():
    """The paper's SMCA costs what plain cross-attention costs (Table 4c: 213G both): its prior needs
    no intermediate mask prediction.  So the final queries (hence class logits) do not depend on the
    mask features with smca and standard, and do with masked and smca_mask; smca's prior learns."""
    ms, mf = _features()
    mf2 = mf + torch.randn_like(mf)
    for kind, depends in (("smca", False), ("standard", False), ("masked", True), ("smca_mask", True)):
        torch.manual_seed(3)
        dec = build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ,
                                                   cross_attention=kind), C, C, K).eval()
        with torch.no_grad():
            a, b = dec(ms, mf).class_logits, dec(ms, mf2).class_logits
        assert (a - b).abs().max().item() > 1e-4 if depends else torch.equal(a, b), kind
    dec = build_transformer_decoder(DecoderCfg(hidden_dim=C, num_heads=4, ffn_dim=128, num_queries=NQ,
                                               cross_attention="smca"), C, C, K).train()
    out = dec(ms, mf)
    sum(p.class_logits.square().mean() + p.mask_logits.square().mean() for p in out.predictions()).backward()
    for name in ("centre.layers.0.weight", "offsets.0.weight", "scales.0.bias", "scales.8.bias", "norms.4.weight"):
        g = dec.smca.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name


def test_smca_row_shares_its_base_rows_initialisation():
    """Paired seeds: the smca model draws every shared weight exactly as the masked-attention model."""
    sd = {}
    for kind in ("masked", "smca"):
        torch.manual_seed(11)
        sd[kind] = build_model(get_preset("tiny", {"decoder.cross_attention": kind})).state_dict()
    extra = set(sd["smca"]) - set(sd["masked"])
    assert extra and all(".smca." in k for k in extra) and set(sd["masked"]) <= set(sd["smca"])
    assert all(torch.equal(v, sd["smca"][k]) for k, v in sd["masked"].items())


# ----------------------------------------------------------------------------------------------
# Full model, backbone, parameter counts
# ----------------------------------------------------------------------------------------------
def test_tiny_model_forward_backward_and_preprocess():
    cfg = get_preset("tiny")
    model = build_model(cfg).train()
    imgs = [torch.randint(0, 256, (3, 70, 100), dtype=torch.uint8),
            torch.randint(0, 256, (3, 64, 90), dtype=torch.uint8)]
    x, sizes = model.preprocess(imgs)
    assert x.shape == (2, 3, 96, 128) and sizes == [(70, 100), (64, 90)]
    assert torch.all(x[0, :, 70:] == 0) and torch.all(x[1, :, :, 90:] == 0)
    expect = (imgs[0].float() - torch.tensor(cfg.pixel_mean).view(3, 1, 1)) / torch.tensor(cfg.pixel_std).view(3, 1, 1)
    torch.testing.assert_close(x[0, :, :70, :100], expect)
    out = model(x)
    assert len(out.predictions()) == 10
    assert out.class_logits.shape == (2, 50, cfg.num_classes + 1)
    assert out.mask_logits.shape == (2, 50, 24, 32)
    out.mask_logits.mean().backward()
    assert model.backbone.conv1.weight.grad is not None
    with pytest.raises(InputError):
        model.preprocess([torch.zeros(1, 8, 8, dtype=torch.uint8)])


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_param_counts():
    n = _count(build_model(get_preset("r50_coco_panoptic")))
    assert 43e6 <= n <= 46e6, n  # paper Table 1: 44M
    n101 = _count(build_model(get_preset("r101_coco_panoptic")))
    assert 62e6 <= n101 <= 65e6, n101  # paper: 63M


def test_backbone_norms_freeze_and_weights(tmp_path):
    import torchvision

    x = torch.randn(1, 3, 64, 64)
    for norm in ("frozen_bn", "bn", "syncbn", "gn"):
        bb = ResNetBackbone("resnet18", norm=norm)
        feats = bb(x)
        shapes = [tuple(f.shape) for f in feats.values()]
        assert shapes == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    bb = ResNetBackbone("resnet50", norm="bn", freeze_at=2)
    assert not bb.conv1.weight.requires_grad and not any(p.requires_grad for p in bb.layer1.parameters())
    assert all(p.requires_grad for p in bb.layer2.parameters())
    assert isinstance(bb.bn1, FrozenBatchNorm2d) and isinstance(bb.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(bb.layer2[0].bn1, torch.nn.BatchNorm2d)
    assert bb.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    # stride placement
    assert ResNetBackbone("resnet50", stride_in_3x3=False).layer2[0].conv1.stride == (2, 2)
    assert ResNetBackbone("resnet50").layer2[0].conv2.stride == (2, 2)
    # torchvision weights load (fc ignored) and give torchvision's features
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    bb = ResNetBackbone("resnet18", norm="frozen_bn", weights=str(path))
    tv.eval()
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(bb(x)["res5"], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError):
        ResNetBackbone("resnet18", weights=str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(InputError):
        ResNetBackbone("resnet18", weights=str(tmp_path / "bad.pth"))


# ----------------------------------------------------------------------------------------------
# (f) no host synchronisation
# ----------------------------------------------------------------------------------------------
def _forbid(*_a, **_k):
    raise AssertionError("host synchronisation in the model forward")


@pytest.mark.parametrize("kind", sorted(CROSS_ATTENTION))
def test_no_host_sync_in_forward(monkeypatch, kind):
    cfg = get_preset("tiny", {"decoder.cross_attention": kind})
    model = build_model(cfg).eval()
    x = torch.randn(1, 3, 64, 96)
    for name in ("item", "nonzero", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, _forbid)
    with torch.no_grad():
        out = model(x)
    monkeypatch.undo()
    assert torch.isfinite(out.mask_logits).all()
    # The patch is effective.
    monkeypatch.setattr(torch.Tensor, "item", _forbid)
    with pytest.raises(AssertionError):
        torch.zeros(()).item()


_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")


def test_no_sync_ops_dispatched():
    """Stricter: no aten op that needs data on the host (scalar reads, data-dependent shapes) runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncDetector(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in _SYNC_OPS:
                self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = build_model(get_preset("tiny")).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad(), SyncDetector() as det:
        model(x)
    assert det.seen == []
    with SyncDetector() as det:  # the detector works
        torch.ones(3).nonzero()
        bool(torch.ones(()))
    assert len(det.seen) == 2


# ----------------------------------------------------------------------------------------------
# (g) mask head product: backward over the queries that have a gradient
# ----------------------------------------------------------------------------------------------
def _sparse_grad(shape, rows_per_image, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.zeros(shape)
    for b, rows in enumerate(rows_per_image):
        grad[b, rows] = torch.randn(len(rows), *shape[2:], generator=g)
    return grad


@pytest.mark.parametrize("gemm", ["reference", "auto"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("rows", [[[3, 7, 50], [7, 9]], [[], [0]], [list(range(20)), list(range(20))]])
def test_mask_product_equals_einsum_with_sparse_gradients(rows, layout, gemm):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 20 if len(rows[0]) == 20 else 60, 32, generator=g, requires_grad=True)
    feats = torch.randn(2, 32, 9, 11, generator=g).contiguous(memory_format=layout).requires_grad_()
    out = mask_product(emb, feats, gemm)
    ref = torch.einsum("bqc,bchw->bqhw", emb, feats)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    # channels-last features give channels-last logits (and a gradient in the features' layout)
    assert out.is_contiguous(memory_format=layout)
    grad = _sparse_grad(out.shape, rows)
    got = torch.autograd.grad(out, [emb, feats], grad)
    want = torch.autograd.grad(ref, [emb, feats], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    assert got[1].is_contiguous(memory_format=layout)
    # rows without gradient get exact zeros
    for b_, r in enumerate(rows):
        others = [q for q in range(emb.shape[1]) if q not in r]
        assert torch.equal(got[0][b_, others], torch.zeros(len(others), 32))


def test_mask_product_backward_skips_rows_without_gradient():
    """The CPU backward multiplies only the rows with a gradient: a non-finite embedding in a row
    that receives none does not reach the features' gradient (the dense product would give NaN)."""
    emb = torch.randn(1, 10, 8)
    emb[0, 4] = float("inf")
    emb.requires_grad_()
    feats = torch.randn(1, 8, 5, 5, requires_grad=True)
    grad = _sparse_grad((1, 10, 5, 5), [[1, 2]])
    _, gf = torch.autograd.grad(mask_product(emb, feats), [emb, feats], grad)
    assert torch.isfinite(gf).all()
    _, gf_dense = torch.autograd.grad(torch.einsum("bqc,bchw->bqhw", emb, feats), [emb, feats], grad)
    assert not torch.isfinite(gf_dense).all()
    rest = [q for q in range(10) if q != 4]
    torch.testing.assert_close(gf, torch.autograd.grad(
        torch.einsum("bqc,bchw->bqhw", emb[:, rest], feats), feats, grad[:, rest])[0], rtol=1e-6, atol=1e-6)


def test_mask_product_double_backward_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(1, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mask_product, (emb, feats))  # one-hot output gradients: sparse rows
    assert torch.autograd.gradgradcheck(mask_product, (emb, feats))


def test_mask_product_under_autocast_matches_einsum():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 12, 16, generator=g, requires_grad=True)
    feats = torch.randn(1, 16, 6, 6, generator=g, requires_grad=True)
    grad = _sparse_grad((1, 12, 6, 6), [[0, 5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mask_product(emb, feats)
        ref = torch.einsum("bqc,bchw->bqhw", emb, feats)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    got = torch.autograd.grad(out, [emb, feats], grad.bfloat16())
    want = torch.autograd.grad(ref, [emb, feats], grad.bfloat16())
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", ["resnet18", "resnet50"])
def test_resnet_channels_last_weights_are_bit_identical(kind):
    """The ResNet keeps its convolution weights channels_last (a speed choice): outputs and weight
    gradients equal those of the same weights in the default layout, bit for bit."""
    import copy

    from m2f.models.backbone import ResNetBackbone

    torch.manual_seed(0)
    a = ResNetBackbone(kind, norm="frozen_bn" if kind == "resnet50" else "bn")
    assert a.conv1.weight.is_contiguous(memory_format=torch.channels_last) and not a.conv1.weight.is_contiguous()
    b = copy.deepcopy(a)
    for p in b.parameters():
        p.data = p.data.contiguous()
    x = torch.randn(2, 3, 64, 64)
    fa, fb = a(x), b(x)
    sum((v ** 2).mean() for v in fa.values()).backward()
    sum((v ** 2).mean() for v in fb.values()).backward()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()) if p.grad is not None)
