"""Swin backbones: feature maps equal HF's SwinBackbone (weights mapped by swin_state_dict_from_hf),
timm / official checkpoints load, any input size works, registered variants have the paper's sizes."""
from __future__ import annotations

import pytest
import torch

from m2f.config import BackboneCfg
from m2f.errors import InputError
from m2f.models.swin import (
    SwinBackbone,
    _normalise_checkpoint_keys,
    build_swin_from_hf_config,
    shifted_window_mask,
    swin_state_dict_from_hf,
)
from m2f.registry import BACKBONES

import transformers  # noqa: E402  (test dependencies: a missing one fails)
import timm  # noqa: E402

TOL = 1e-4
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _hf_backbone(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7, seed=0):
    """Random HF SwinBackbone; every weight perturbed so that no parameter sits at its init
    (HF zero-inits the relative position tables, and unit LayerNorms hide swapped norms)."""
    cfg = transformers.SwinConfig(embed_dim=embed_dim, depths=list(depths), num_heads=list(heads),
                                  window_size=window, drop_path_rate=0.0, out_features=STAGES)
    torch.manual_seed(seed)
    hf = transformers.SwinBackbone(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def _ours_from_hf(hf, **kw) -> SwinBackbone:
    c = hf.config
    model = SwinBackbone(embed_dim=c.embed_dim, depths=c.depths, num_heads=c.num_heads,
                         window_size=c.window_size, drop_path_rate=0.0, **kw)
    model.load_state_dict(swin_state_dict_from_hf(hf), strict=True)
    return model.eval()


def _max_diffs(ours: dict, hf_maps) -> list[float]:
    assert list(ours) == ["res2", "res3", "res4", "res5"]
    diffs = []
    for o, r in zip(ours.values(), hf_maps):
        assert o.shape == r.shape
        diffs.append(float((o - r).abs().max()))
    return diffs


@pytest.fixture(scope="module")
def swin_t_pair():
    hf = _hf_backbone()
    model, kwargs = build_swin_from_hf_config(hf.config)
    assert kwargs == {"kind": "swin_t", "window_size": 7, "drop_path_rate": 0.0}
    model.load_state_dict(swin_state_dict_from_hf(hf), strict=True)
    return hf, model.eval()


def test_swin_t_matches_hf_feature_maps(swin_t_pair):
    """Full Swin-T, batch 2, 96x160: every stage needs window padding (24x40 -> 28x42, ...,
    3x5 -> 7x7) before the shift."""
    hf, model = swin_t_pair
    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        ref = hf(pixel_values=x).feature_maps
        ours = model(x)
    diffs = _max_diffs(ours, ref)
    print("swin_t vs HF max abs diff per level:", diffs)
    assert max(diffs) < TOL, diffs
    # The maps are not trivially small (a test that cannot fail is no test).
    assert all(float(r.abs().mean()) > 0.1 for r in ref)


# 224x448: no padding anywhere (every stage a multiple of 7) -- only a shift mask.
# 100x150: not a multiple of the patch; patch embedding and patch merging pad as well.
# 64x96: res4/res5 smaller than one window.
@pytest.mark.parametrize("size", [(224, 448), (100, 150), (64, 96)])
def test_small_swin_matches_hf_at_other_sizes(size):
    hf = _hf_backbone(embed_dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=7, seed=2)
    model = _ours_from_hf(hf)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        diffs = _max_diffs(model(x), hf(pixel_values=x).feature_maps)
    assert max(diffs) < TOL, diffs


def test_parity_is_discriminative(swin_t_pair):
    """A perturbed relative-position entry, or the shift mask removed, breaks parity."""
    hf, model = swin_t_pair
    x = torch.randn(2, 3, 64, 96)  # res2 16x24 -> padded 21x28
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = hf(pixel_values=x).feature_maps
        model.layers[2].blocks[3].attn.relative_position_bias_table[84, 0] += 0.5  # (dh, dw) = (0, 0)
        assert max(_max_diffs(model(x), ref)) > 1e-3
        model.load_state_dict(sd)
        model.layers[1].blocks[1].shift = 0  # W-MSA instead of SW-MSA
        assert max(_max_diffs(model(x), ref)) > 1e-3
        model.layers[1].blocks[1].shift = 3
        assert max(_max_diffs(model(x), ref)) < TOL


def test_window12_matches_hf():
    """Swin-B/L style window 12 (official Mask2Former B/L), reduced widths/depths for speed."""
    hf = _hf_backbone(embed_dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=12, seed=3)
    model = _ours_from_hf(hf)
    x = torch.randn(2, 3, 128, 224)  # 32x56 -> 36x60 padded at res2; res5 4x7 -> one 12x12 window
    with torch.no_grad():
        diffs = _max_diffs(model(x), hf(pixel_values=x).feature_maps)
    assert max(diffs) < TOL, diffs


def test_shift_mask_regions():
    mask = shifted_window_mask(8, 8, 4, 2, torch.device("cpu"), torch.float32)  # 4 windows of 4x4
    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) <= {0.0, -100.0}
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    # Bottom-right window: 4 regions of 2x2 tokens; a token attends to its 4 region mates.
    assert ((mask[3] == 0).sum(1) == 4).all()
    assert torch.equal(mask[3], mask[3].T)


def test_timm_checkpoint_loads_and_matches_timm_features(tmp_path):
    """A timm SwinTransformer state dict loads unchanged; without padding (224 input, always
    partition) our stage outputs equal timm's up to the added output LayerNorms.  The official
    layout (patch merging at the end of a stage, detectron2 norm0..3) loads the same weights."""
    net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, always_partition=True,
                            drop_path_rate=0.0).eval()
    path = tmp_path / "swin_t_timm.pth"
    torch.save({"model": net.state_dict()}, path)
    model = BACKBONES.get("swin_t")(BackboneCfg(kind="swin_t", weights=str(path), drop_path_rate=0.0)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model(x)
        h = net.patch_embed(x)
        for name, stage in zip(ours, net.layers):
            h = stage(h)
            ref = torch.nn.functional.layer_norm(h, h.shape[-1:]).permute(0, 3, 1, 2)
            assert (ours[name] - ref).abs().max() < TOL, name

    # Official Microsoft / detectron2 layout.
    official = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if k.startswith("layers.") and parts[2] == "downsample":
            k = ".".join(["layers", str(int(parts[1]) - 1)] + parts[2:])
        elif k.startswith("out_norms."):
            k = f"norm{int(parts[1][3]) - 2}.{parts[2]}"
        official["backbone." + k] = v * 1.0
    remapped = _normalise_checkpoint_keys(official)
    assert set(remapped) == set(model.state_dict())
    assert all(torch.equal(remapped[k], v) for k, v in model.state_dict().items())


def test_bad_weights_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        SwinBackbone(weights=str(tmp_path / "nope.pth"))
    small = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}
    path = tmp_path / "w7.pth"
    torch.save(SwinBackbone(window_size=7, **small).state_dict(), path)
    with pytest.raises(InputError, match="window_size"):  # window-7 tables into a window-12 model
        SwinBackbone(window_size=12, weights=str(path), **small)
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(InputError, match="does not match the Swin layout"):
        SwinBackbone(window_size=7, weights=str(path), **small)


def test_variants_and_any_input_size():
    counts = {}
    for kind, (dim, depths, heads) in {"swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24))}.items():
        m = BACKBONES.get(kind)(BackboneCfg(kind=kind, drop_path_rate=0.2))
        assert m.out_channels == {"res2": dim, "res3": 2 * dim, "res4": 4 * dim, "res5": 8 * dim}
        assert m.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        assert [len(s.blocks) for s in m.layers] == list(depths)
        assert [s.blocks[0].attn.num_heads for s in m.layers] == list(heads)
        counts[kind] = sum(p.numel() for p in m.parameters())
    # timm's swin_tiny (28,288,354) minus its head (769,000) and final norm (1,536), plus 4 out norms.
    assert counts["swin_t"] == 28_288_354 - 769_000 - 1_536 + 2 * (96 + 192 + 384 + 768)
    # Stochastic depth grows linearly to drop_path_rate over all blocks.
    assert m.layers[3].blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    assert m.layers[0].blocks[1].drop_path1.drop_prob == pytest.approx(0.2 / 11)

    torch.manual_seed(0)
    m = SwinBackbone(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7,
                     drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 96, 160, requires_grad=True)
    out = m(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 16, 24, 40), "res3": (2, 32, 12, 20), "res4": (2, 64, 6, 10), "res5": (2, 128, 3, 5)}
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert x.grad.abs().sum() > 0


def test_hf_config_rejections():
    cfg = transformers.SwinConfig(embed_dim=64, depths=[2, 2, 6, 2], num_heads=[2, 4, 8, 16])
    with pytest.raises(NotImplementedError, match="embed_dim"):
        build_swin_from_hf_config(cfg)
    hf = transformers.SwinBackbone(transformers.SwinConfig(
        embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], out_features=["stage2", "stage3", "stage4"]))
    with pytest.raises(NotImplementedError, match="res2"):
        swin_state_dict_from_hf(hf)


# Classifier-free parameter counts (4 output LayerNorms included, ImageNet head and final norm not).
# Official totals with the 1000-class head: Swin-T 28.3M (window 7), Swin-S 49.6M (7),
# Swin-B 88M (12), Swin-L 197M (12); the head + final norm is ~0.77M / 1.03M / 1.54M.
@pytest.mark.parametrize("kind,window,lo,hi,dim", [
    ("swin_t", 7, 27.0e6, 28.0e6, 96), ("swin_s", 7, 48.3e6, 49.3e6, 96),
    ("swin_b", 12, 86.0e6, 88.0e6, 128), ("swin_l", 12, 194.0e6, 197.0e6, 192)])
def test_registered_kinds_build_with_paper_sizes(kind, window, lo, hi, dim):
    with torch.device("meta"):  # structure and counts only: no weight init cost
        m = BACKBONES.get(kind)(BackboneCfg(kind=kind, window_size=window))
    n = sum(p.numel() for p in m.parameters())
    assert lo < n < hi, (kind, n)
    assert m.out_channels == {"res2": dim, "res3": 2 * dim, "res4": 4 * dim, "res5": 8 * dim}
    assert m.layers[0].blocks[0].attn.relative_position_bias_table.shape[0] == (2 * window - 1) ** 2


def test_swin_l_forward_small_input():
    """Real Swin-L (window 12, official Mask2Former-L setting) on a 32x64 input: every stage is
    smaller than a window (res2 8x16 ... res5 1x2), so every stage pads."""
    torch.manual_seed(0)
    m = BACKBONES.get("swin_l")(BackboneCfg(kind="swin_l", window_size=12, drop_path_rate=0.3)).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 32, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (1, 192, 8, 16), "res3": (1, 384, 4, 8), "res4": (1, 768, 2, 4), "res5": (1, 1536, 1, 2)}
    for v in out.values():  # out LayerNorm with unit init: per-position mean 0, variance 1
        assert torch.isfinite(v).all()
        assert v.mean(1).abs().max() < 1e-4
        assert (v.var(1, unbiased=False) - 1).abs().max() < 1e-2
