"""Activation checkpointing (backbone.activation_checkpointing, pixel_decoder.activation_checkpointing):
the same losses and gradients as the plain forward, fewer tensors kept for backward, not part of a
run's identity, and a clear error where a component has nothing to checkpoint."""
from __future__ import annotations

import pytest
import torch

from m2f.bench.common import synthetic_targets
from m2f.config import config_hash, get_preset
from m2f.errors import InputError
from m2f.loss import build_criterion
from m2f.models.build import build_model

CKPT = ["backbone.activation_checkpointing=true", "pixel_decoder.activation_checkpointing=true"]


def _loss_and_grads(overrides, size=64):
    cfg = get_preset("tiny", overrides)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    criterion = build_criterion(cfg.loss, cfg.num_classes)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    targets = [synthetic_targets(3, cfg.num_classes, size, size, "cpu", seed=s) for s in range(2)]
    torch.manual_seed(2)  # point sampling, drop path
    loss = sum(criterion(model(x), targets).values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", [
    [],  # ResNet + MSDeformAttn encoder
    ["backbone.kind=swin_t", "backbone.drop_path_rate=0.3"],  # Swin blocks with random drop path
    ["pixel_decoder.kind=transformer_encoder", "backbone.freeze_at=2"],  # frozen stages checkpointed too
    ["pixel_decoder.deform_attn_backend=reference_recompute", "pixel_decoder.dropout=0.1"],
])
def test_same_loss_and_gradients(variant):
    ref_loss, ref = _loss_and_grads(variant)
    loss, got = _loss_and_grads(variant + CKPT)
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys() and len(ref) > 50
    for name, g in ref.items():
        assert torch.equal(got[name], g), name


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``model(x)``."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.parametrize("part", ["backbone", "pixel_decoder"])
def test_keeps_fewer_activations(part):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 128, 128)
    plain = build_model(get_preset("tiny")).train()
    ckpt = build_model(get_preset("tiny", [f"{part}.activation_checkpointing=true"])).train()
    ckpt.load_state_dict(plain.state_dict())
    feats = plain.backbone(x)
    if part == "backbone":
        a, b = _saved_bytes(plain.backbone, x), _saved_bytes(ckpt.backbone, x)
    else:
        a, b = _saved_bytes(plain.pixel_decoder, feats), _saved_bytes(ckpt.pixel_decoder, feats)
    # only the blocks' inputs (and what surrounds the blocks) remain
    assert b < 0.5 * a, (part, a, b)
    with torch.no_grad():  # inference is untouched
        assert torch.equal(plain(x).mask_logits, ckpt(x).mask_logits)


def test_execution_only_fields_leave_the_run_identity_alone():
    assert config_hash(get_preset("tiny", CKPT)) == config_hash(get_preset("tiny"))
    # a field that changes the function still changes it
    assert config_hash(get_preset("tiny", ["pixel_decoder.dropout=0.1"])) != config_hash(get_preset("tiny"))


@pytest.mark.parametrize("override,field", [
    (["pixel_decoder.kind=fpn", "pixel_decoder.activation_checkpointing=true"], "pixel_decoder.activation_checkpointing"),
    (["pixel_decoder.kind=semantic_fpn", "pixel_decoder.activation_checkpointing=true"],
     "pixel_decoder.activation_checkpointing"),
])
def test_unsupported_kind_is_a_clear_error(override, field):
    with pytest.raises(InputError, match=field):
        build_model(get_preset("tiny", override))
