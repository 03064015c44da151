"""Pixel decoders (paper Table 4e): every registered kind runs forward + backward on a fake
res2..res5 dict at non-square sizes with the agreed output interface; kind-specific checks for
FPN top-down wiring, BiFPN fusion weights and FaPN's deformable alignment."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import m2f.models.pixel_decoders  # noqa: F401  (fills the registry)
from m2f.config import PixelDecoderCfg
from m2f.errors import InputError
from m2f.models.pixel_decoders.bifpn import BiFPNPixelDecoder, FastFusion
from m2f.models.pixel_decoders.fapn import FaPNPixelDecoder, ModulatedDeformConv
from m2f.registry import PIXEL_DECODERS

MINE = ["fpn", "semantic_fpn", "bifpn", "fapn", "transformer_encoder"]
KINDS = MINE + (["msdeform"] if "msdeform" in PIXEL_DECODERS else [])
IN_CHANNELS = {"res2": 16, "res3": 24, "res4": 40, "res5": 48}
IN_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
CONV_DIM, MASK_DIM = 64, 48


def _cfg(kind: str, norm: str = "GN") -> PixelDecoderCfg:
    return PixelDecoderCfg(kind=kind, conv_dim=CONV_DIM, mask_dim=MASK_DIM, norm=norm, num_encoder_layers=1,
                           num_heads=4, ffn_dim=64, bifpn_repeats=2)


def _build(kind: str, norm: str = "GN"):
    torch.manual_seed(0)
    return PIXEL_DECODERS.get(kind)(_cfg(kind, norm), IN_CHANNELS, IN_STRIDES)


def _features(H: int, W: int, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    # ceil(H / s): what a backbone gives for sizes that are not multiples of 32.
    return {k: torch.randn(batch, c, -(-H // IN_STRIDES[k]), -(-W // IN_STRIDES[k]), generator=g)
            for k, c in IN_CHANNELS.items()}


# Parameters a loss cannot reach at initialisation: FaPN's offset branch sits behind DCNv2's
# zero-initialised offset/modulation conv (checked separately once that conv is non-zero);
# msdeform's level embedding only enters the queries, whose offset / attention-weight
# projections start with zero weights (Deformable DETR init).
_NO_GRAD_AT_INIT = {"fapn": (".offset.",), "msdeform": ("level_embed",)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(96, 160), (100, 148)])
def test_forward_backward_interface(kind, size):
    model = _build(kind).train()
    feats = _features(*size)
    mask_features, multi_scale = model(feats)
    B = 2
    assert mask_features.shape == (B, MASK_DIM) + tuple(feats["res2"].shape[-2:])
    assert isinstance(multi_scale, list) and len(multi_scale) == 3
    # LOW resolution first: 1/32, 1/16, 1/8.
    for x, name in zip(multi_scale, ["res5", "res4", "res3"]):
        assert x.shape == (B, CONV_DIM) + tuple(feats[name].shape[-2:]), (name, x.shape)
    outs = [mask_features] + multi_scale
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(float(o.detach().std()) > 1e-3 for o in outs)  # not constant
    loss = sum(o.square().mean() for o in outs)
    loss.backward()
    skip = _NO_GRAD_AT_INIT.get(kind, ())
    for n, p in model.named_parameters():
        if any(s in n for s in skip):
            continue
        assert p.grad is not None, f"{kind}: no gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
        assert float(p.grad.abs().sum()) > 0, f"{kind}: zero gradient for {n}"


@pytest.mark.parametrize("kind", MINE)
@pytest.mark.parametrize("norm", ["BN", "none"])
def test_other_norms(kind, norm):
    model = _build(kind, norm).train()
    mask_features, multi_scale = model(_features(64, 96))
    assert mask_features.shape == (2, MASK_DIM, 16, 24)
    assert all(torch.isfinite(x).all() for x in [mask_features] + multi_scale)
    norms = (torch.nn.BatchNorm2d,) if norm == "BN" else (torch.nn.GroupNorm, torch.nn.BatchNorm2d)
    has = any(isinstance(m, norms) for m in model.modules())
    assert has == (norm == "BN")


@pytest.mark.parametrize("kind", MINE)
def test_top_down_wiring(kind):
    """res5 reaches the mask features (top-down path).  res2 reaches the multi-scale maps only
    through a bottom-up path, i.e. only for BiFPN."""
    model = _build(kind).eval()
    feats = _features(64, 96)
    with torch.no_grad():
        mf, ms = model(feats)
        f5 = dict(feats, res5=feats["res5"] + 1.0)
        mf5, _ = model(f5)
        f2 = dict(feats, res2=feats["res2"] + 1.0)
        _, ms2 = model(f2)
    assert (mf5 - mf).abs().max() > 1e-4
    changed = max(float((a - b).abs().max()) for a, b in zip(ms, ms2))
    if kind == "bifpn":
        assert changed > 1e-4
    else:
        assert changed == 0.0


def test_bad_norm_and_channels():
    with pytest.raises(InputError, match="32"):
        PIXEL_DECODERS.get("fpn")(PixelDecoderCfg(kind="fpn", conv_dim=48), IN_CHANNELS, IN_STRIDES)
    with pytest.raises(InputError, match="res2"):
        PIXEL_DECODERS.get("fpn")(_cfg("fpn"), {"res4": 8, "res5": 8}, {"res4": 16, "res5": 32})


# ---------------------------------------------------------------------------------------------
# BiFPN
# ---------------------------------------------------------------------------------------------
def test_bifpn_fusion_weights_nonnegative_and_normalised():
    model = _build("bifpn")
    assert isinstance(model, BiFPNPixelDecoder) and len(model.layers) == 2
    fusions = [f for layer in model.layers for f in layer.fusions()]
    assert len(fusions) == 2 * (3 + 3)  # per layer: 3 top-down + 3 bottom-up nodes
    assert sorted(len(f.weight) for f in fusions[:6]) == [2, 2, 2, 2, 3, 3]
    with torch.no_grad():
        for f in fusions:
            f.weight.uniform_(0.1, 3.0)
        fusions[0].weight[0] = -5.0
    for f in fusions:
        w = f.normalized_weights()
        assert (w >= 0).all()
        assert float(w.detach().sum()) == pytest.approx(1.0, abs=1e-3)
    assert float(fusions[0].normalized_weights()[0].detach()) == 0.0  # negative raw weight -> ignored
    # The forward is the normalised weighted sum.
    f = FastFusion(3)
    with torch.no_grad():
        f.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
    xs = [torch.randn(2, 4, 5, 6) for _ in range(3)]
    expected = (1.0 * xs[0] + 2.0 * xs[1]) / (3.0 + f.eps)
    assert torch.allclose(f(xs), expected, atol=1e-6)
    # Outputs still finite and the model still runs with the perturbed weights.
    mf, ms = model(_features(64, 96))
    assert torch.isfinite(mf).all()


# ---------------------------------------------------------------------------------------------
# FaPN
# ---------------------------------------------------------------------------------------------
def _dcn(seed=0):
    torch.manual_seed(seed)
    return ModulatedDeformConv(16, 8, groups=4)


def test_fapn_zero_offsets_is_plain_conv():
    dcn = _dcn()
    x, feat = torch.randn(2, 16, 7, 9), torch.randn(2, 8, 7, 9)
    # DCNv2 init: zero offsets, modulation sigmoid(0) = 0.5.
    expected = 0.5 * F.conv2d(x, dcn.weight, padding=1) + dcn.bias[None, :, None, None]
    assert torch.allclose(dcn(x, feat), expected, atol=1e-5)


def test_fapn_offsets_move_the_sampling_grid():
    dcn = _dcn()
    x, feat = torch.randn(2, 16, 7, 9), torch.randn(2, 8, 7, 9)
    n = 2 * 4 * 9
    base = dcn(x, feat)
    with torch.no_grad():
        dcn.offset_mask.bias[0:n:2] = 1.0  # dy = +1 for every group and tap
        dcn.offset_mask.bias[n:] = 30.0  # modulation ~ 1
    # Tap (ky, kx) of output (i, j) now reads x[i + ky, j + kx - 1]: a 3x3 conv over x padded by
    # 0 rows on top and 2 below (instead of 1 and 1).
    expected = F.conv2d(F.pad(x, (1, 1, 0, 2)), dcn.weight, dcn.bias)
    out = dcn(x, feat)
    assert (out - base).abs().max() > 1e-2
    assert torch.allclose(out, expected, atol=1e-4)
    # Fractional, feature-dependent offsets: bilinear sampling, still differs and is finite.
    with torch.no_grad():
        dcn.offset_mask.weight.normal_(std=0.1)
    out2 = dcn(x, feat)
    assert torch.isfinite(out2).all() and (out2 - out).abs().max() > 1e-3


def test_fapn_offset_branch_trains_once_offsets_are_nonzero():
    model = _build("fapn").train()
    assert isinstance(model, FaPNPixelDecoder)
    with torch.no_grad():
        for fam in model.align:
            fam.dcn.offset_mask.weight.normal_(std=0.01)
    mf, ms = model(_features(64, 96))
    (mf.square().mean() + sum(x.square().mean() for x in ms)).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
