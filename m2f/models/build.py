"""The one builder: Config -> modules.

Each slot has a registry (``m2f.registry``) of small adapter functions that read their config
section and call a module's plain constructor; execution choices (the GEMM backend, kernel
backends, activation checkpointing) are constructor arguments too, passed down from the config:

    @BACKBONES.register("resnet50")
    def _(cfg: BackboneCfg, gemm_backend: str) -> nn.Module: ...

    @PIXEL_DECODERS.register("fpn")
    def _(cfg: PixelDecoderCfg, in_channels: dict[str, int], in_strides: dict[str, int], gemm_backend: str) -> nn.Module: ...
"""
from __future__ import annotations

from m2f.config import Config
from m2f.errors import InputError
from m2f.registry import BACKBONES, PIXEL_DECODERS


def _import_all() -> None:
    # Importing the modules fills the registries.
    import m2f.models.backbone  # noqa: F401
    import m2f.models.pixel_decoders  # noqa: F401
    import m2f.models.swin  # noqa: F401


def _check_checkpointing(module, enabled: bool, field: str) -> None:
    """A kind without checkpointable blocks cannot take ``activation_checkpointing=True``."""
    if enabled and not any(isinstance(getattr(m, "activation_checkpointing", None), bool) for m in module.modules()):
        raise InputError(f"{field}: {type(module).__name__} has no blocks to checkpoint; switch it off for this "
                         "kind (supported: ResNet and Swin backbones, msdeform and transformer_encoder pixel decoders)")


def build_backbone(cfg: Config):
    _import_all()
    backbone = BACKBONES.get(cfg.backbone.kind)(cfg.backbone, gemm_backend=cfg.gemm_backend)
    _check_checkpointing(backbone, cfg.backbone.activation_checkpointing,
                         f"backbone.activation_checkpointing (backbone.kind={cfg.backbone.kind})")
    return backbone


def build_pixel_decoder(cfg: Config, in_channels, in_strides):
    _import_all()
    decoder = PIXEL_DECODERS.get(cfg.pixel_decoder.kind)(cfg.pixel_decoder, in_channels, in_strides,
                                                         gemm_backend=cfg.gemm_backend)
    _check_checkpointing(decoder, cfg.pixel_decoder.activation_checkpointing,
                         f"pixel_decoder.activation_checkpointing (pixel_decoder.kind={cfg.pixel_decoder.kind})")
    return decoder


def build_transformer_decoder(cfg: Config):
    from m2f.models.transformer_decoder import build_transformer_decoder as _b

    return _b(cfg.decoder, in_channels=cfg.pixel_decoder.conv_dim, mask_dim=cfg.pixel_decoder.mask_dim,
              num_classes=cfg.num_classes, gemm_backend=cfg.gemm_backend)


def build_model(cfg: Config):
    from m2f.models.mask2former import Mask2Former

    backbone = build_backbone(cfg)
    pixel_decoder = build_pixel_decoder(cfg, backbone.out_channels, backbone.out_strides)
    decoder = build_transformer_decoder(cfg)
    return Mask2Former(backbone, pixel_decoder, decoder, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)
