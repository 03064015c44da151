"""The one builder: Config -> modules.

Each slot has a registry (``m2f.registry``) of small adapter functions that read their config
section and call a module's plain constructor:

    @BACKBONES.register("resnet50")
    def _(cfg: BackboneCfg) -> nn.Module: ...

    @PIXEL_DECODERS.register("fpn")
    def _(cfg: PixelDecoderCfg, in_channels: dict[str, int], in_strides: dict[str, int]) -> nn.Module: ...
"""
from __future__ import annotations

from kernels.cpu_gemm import set_gemm_backend
from m2f.config import Config
from m2f.models.checkpointing import set_activation_checkpointing
from m2f.registry import BACKBONES, PIXEL_DECODERS


def _import_all() -> None:
    # Importing the modules fills the registries.
    import m2f.models.backbone  # noqa: F401
    try:
        import m2f.models.swin  # noqa: F401
    except ModuleNotFoundError as e:  # pragma: no cover - while swin.py is being written
        if e.name != "m2f.models.swin":
            raise
    import m2f.models.pixel_decoders  # noqa: F401


def build_backbone(cfg: Config):
    _import_all()
    backbone = BACKBONES.get(cfg.backbone.kind)(cfg.backbone)
    set_activation_checkpointing(backbone, cfg.backbone.activation_checkpointing,
                                 f"backbone.activation_checkpointing (backbone.kind={cfg.backbone.kind})")
    return backbone


def build_pixel_decoder(cfg: Config, in_channels, in_strides):
    _import_all()
    decoder = PIXEL_DECODERS.get(cfg.pixel_decoder.kind)(cfg.pixel_decoder, in_channels, in_strides)
    set_activation_checkpointing(decoder, cfg.pixel_decoder.activation_checkpointing,
                                 f"pixel_decoder.activation_checkpointing (pixel_decoder.kind={cfg.pixel_decoder.kind})")
    return decoder


def build_transformer_decoder(cfg: Config):
    from m2f.models.transformer_decoder import build_transformer_decoder as _b

    return _b(cfg.decoder, in_channels=cfg.pixel_decoder.conv_dim, mask_dim=cfg.pixel_decoder.mask_dim,
              num_classes=cfg.num_classes)


def build_model(cfg: Config):
    from m2f.models.mask2former import Mask2Former

    backbone = build_backbone(cfg)
    pixel_decoder = build_pixel_decoder(cfg, backbone.out_channels, backbone.out_strides)
    decoder = build_transformer_decoder(cfg)
    model = Mask2Former(backbone, pixel_decoder, decoder, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)
    return set_gemm_backend(model, cfg.gemm_backend)
