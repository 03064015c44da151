"""Every registered kind of every slot builds into a full model that runs forward + backward
(timm's habit: the registry is the test matrix)."""
from __future__ import annotations

import pytest
import torch

from m2f.config import all_paths, get_args_choices, get_preset
from m2f.models.build import _import_all, build_model
from m2f.registry import BACKBONES, PIXEL_DECODERS

_import_all()

# Small but complete: 64x96 input, 2 encoder layers, 3 decoder layers, 8 queries.
SMALL = ["decoder.num_layers=3", "decoder.num_queries=8", "pixel_decoder.num_encoder_layers=1", "num_classes=4"]


def _check(cfg, H=64, W=96):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(2, 3, H, W)
    out = model(x)
    preds = out.predictions()
    n_expected = cfg.decoder.num_layers + (cfg.decoder.query_features == "learnable_supervised")
    assert len(preds) == n_expected
    for p in preds:
        assert p.class_logits.shape == (2, cfg.decoder.num_queries, cfg.num_classes + 1)
        assert p.mask_logits.shape == (2, cfg.decoder.num_queries, H // 4, W // 4)
        assert torch.isfinite(p.class_logits).all() and torch.isfinite(p.mask_logits).all()
    loss = sum(p.class_logits.square().mean() + p.mask_logits.square().mean() for p in preds)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and n.startswith("pixel_decoder")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the pixel decoder"
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_config_kinds_equal_registered_kinds():
    assert set(get_args_choices("backbone.kind")) == set(BACKBONES.names())
    assert set(get_args_choices("pixel_decoder.kind")) == set(PIXEL_DECODERS.names())


@pytest.mark.parametrize("kind", PIXEL_DECODERS.names())
def test_every_pixel_decoder_kind(kind):
    _check(get_preset("tiny", SMALL + [f"pixel_decoder.kind={kind}"]))


@pytest.mark.parametrize("kind", [k for k in BACKBONES.names() if not k.startswith("swin")] + ["swin_t"])
def test_every_backbone_kind(kind):
    extra = ["backbone.drop_path_rate=0.0"] if kind.startswith("swin") else []
    _check(get_preset("tiny", SMALL + [f"backbone.kind={kind}"] + extra))


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in BACKBONES.names() if k.startswith("swin") and k != "swin_t"])
def test_large_swin_backbones_forward(kind):
    # Swin-S/B/L forward only (backward of 200M params is slow on CPU and adds nothing the swin_t case lacks).
    cfg = get_preset("tiny", SMALL + [f"backbone.kind={kind}", "backbone.window_size=7"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.mask_logits.shape == (1, 8, 16, 16) and torch.isfinite(out.mask_logits).all()


def test_every_override_path_resolves():
    cfg = get_preset("tiny")
    assert "decoder.cross_attention" in all_paths() and "loss.matching" in all_paths()
    for path in all_paths():
        obj = cfg
        for part in path.split("."):
            obj = getattr(obj, part)
