"""Numerical parity with HF transformers' Mask2Former (random weights, offline).

Every one of the 10 predictions (query-feature prediction + 9 decoder layers) must match HF's
class and mask logits to 1e-4 (abs, float32, eval mode) for a R50 paper-size model and the tiny
preset's model.  HF weights are perturbed beyond the default init (non-zero biases, random BN
statistics and affine, random level/query embeddings) so that a wrong mapping cannot pass.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (a test dependency: a missing one fails, never skips)

from m2f.config import apply_overrides  # noqa: E402
from m2f.convert import from_hf  # noqa: E402
from m2f.models.build import build_model  # noqa: E402

TOL = 1e-4


def _hf_model(size: str, num_labels: int, **extra):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    if size == "r50":
        bc = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
                          out_features=["stage1", "stage2", "stage3", "stage4"],
                          downsample_in_bottleneck=extra.pop("downsample_in_bottleneck", False))
        kw = dict(feature_size=256, mask_feature_size=256, hidden_dim=256, encoder_layers=6,
                  encoder_feedforward_dim=1024, dim_feedforward=2048, num_queries=100, decoder_layers=10)
    else:  # the "tiny" preset: ResNet-18, hidden 128, 50 queries, 3 encoder layers
        bc = ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                          out_features=["stage1", "stage2", "stage3", "stage4"])
        kw = dict(feature_size=128, mask_feature_size=128, hidden_dim=128, encoder_layers=3,
                  encoder_feedforward_dim=256, dim_feedforward=512, num_queries=50, decoder_layers=10)
    cfg = Mask2FormerConfig(backbone_config=bc, num_labels=num_labels, use_pretrained_backbone=False,
                            **{**kw, **extra})
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(cfg)
    _randomise(model)
    return model.eval()


def _hf_swin_model():
    """A small HF Mask2Former with a Swin-T backbone (1 encoder layer, 3 decoder layers), randomised."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    bc = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                    out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=bc, num_labels=5, use_pretrained_backbone=False, feature_size=128,
                            mask_feature_size=128, hidden_dim=128, encoder_layers=1, encoder_feedforward_dim=256,
                            dim_feedforward=256, num_queries=20, decoder_layers=4)
    torch.manual_seed(0)
    hf = Mask2FormerForUniversalSegmentation(cfg)
    _randomise(hf)
    return hf.eval()


@torch.no_grad()
def _randomise(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            c = mod.num_features
            mod.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.2)
            mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
            mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        elif isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            mod.weight.copy_(1 + torch.randn(mod.weight.shape, generator=g) * 0.2)
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "norm" not in name and p.abs().max() == 0:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        if "sampling_offsets.weight" in name or "attention_weights.weight" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        if "level_embed" in name or "queries" in name:
            p.copy_(torch.randn(p.shape, generator=g))
    # Larger mask logits, so that the masked attention blocks a sizeable, query-dependent part
    # of every level (a mapping error in the masks then shows).
    last = model.model.transformer_module.decoder.mask_predictor.mask_embedder.layers[2].layers[0]
    last.weight.mul_(8.0)
    last.bias.zero_()


@pytest.mark.parametrize("size,hw,extra", [
    ("tiny", (128, 192), {}),
    ("r50", (96, 160), {}),
    # variants: stride in the bottleneck's 1x1 conv; pre-norm decoder layers
    ("r50", (64, 96), {"downsample_in_bottleneck": True}),
    ("tiny", (64, 96), {"pre_norm": True}),
], ids=["tiny", "r50", "r50-stride1x1", "tiny-prenorm"])
def test_parity_with_hf(size, hw, extra):
    hf = _hf_model(size, num_labels=7, **extra)
    model, cfg = from_hf(hf)
    assert cfg.backbone.stride_in_3x3 == (not extra.get("downsample_in_bottleneck", False))
    assert cfg.decoder.pre_norm == extra.get("pre_norm", False)
    assert cfg.decoder.num_layers == 9 and cfg.num_classes == 7
    assert cfg.backbone.kind == ("resnet50" if size == "r50" else "resnet18")
    torch.manual_seed(2)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_auxiliary_logits=True)
        ours = model(x)
    hf_preds = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in ref.auxiliary_logits]
    hf_preds.append((ref.class_queries_logits, ref.masks_queries_logits))
    preds = ours.predictions()
    assert len(preds) == len(hf_preds) == 10
    nq = cfg.decoder.num_queries
    # Discriminative: the masks that drive masked attention block a sizeable share of pixels.
    fg = torch.stack([(m > 0).float().mean() for _, m in hf_preds[:-1]]).mean()
    assert 0.1 < fg < 0.9
    worst = 0.0
    for i, (p, (hc, hm)) in enumerate(zip(preds, hf_preds)):
        assert p.class_logits.shape == hc.shape == (2, nq, 8)
        assert p.mask_logits.shape == hm.shape == (2, nq, hw[0] // 4, hw[1] // 4)
        assert hm.std() > 0.3  # far from constant
        dc = (p.class_logits - hc).abs().max().item()
        dm = (p.mask_logits - hm).abs().max().item()
        assert dc < TOL and dm < TOL, f"prediction {i}: class diff {dc:.2e}, mask diff {dm:.2e}"
        worst = max(worst, dc, dm)
    print(f"HF parity {size} {extra}: max abs diff {worst:.2e}")


def test_parity_is_discriminative():
    """A perturbed weight, or plain instead of masked cross-attention, must break parity."""
    hf = _hf_model("tiny", num_labels=7)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = hf(pixel_values=x).masks_queries_logits
        model, cfg = from_hf(hf)
        assert (model(x).mask_logits - ref).abs().max() < TOL
        standard = build_model(apply_overrides(cfg, {"decoder.cross_attention": "standard"}))
        standard.load_state_dict(model.state_dict())
        assert (standard(x).mask_logits - ref).abs().max() > 1e-2
        model, _ = from_hf(hf)
        model.transformer_decoder.layers[4].cross_attn.k_proj.weight.mul_(1.01)
        assert (model(x).mask_logits - ref).abs().max() > 1e-3


def test_parity_with_hf_swin():
    """Swin-T backbone (weights mapped by m2f.models.swin.swin_state_dict_from_hf)."""
    hf = _hf_swin_model()
    model, m2f_cfg = from_hf(hf)
    assert m2f_cfg.backbone.kind == "swin_t"
    x = torch.randn(2, 3, 224, 224)  # every stage a multiple of the window: no padding differences
    with torch.no_grad():
        ref = hf(pixel_values=x, output_auxiliary_logits=True)
        ours = model(x)
    hf_preds = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in ref.auxiliary_logits]
    hf_preds.append((ref.class_queries_logits, ref.masks_queries_logits))
    assert len(ours.predictions()) == len(hf_preds) == 4
    for p, (hc, hm) in zip(ours.predictions(), hf_preds):
        assert (p.class_logits - hc).abs().max() < TOL and (p.mask_logits - hm).abs().max() < TOL
