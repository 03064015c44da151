"""FPN pixel decoder (MaskFormer's "BasePixelDecoder"; paper Table 4e row "FPN").

Top-down over the backbone levels, coarsest first::

    y_5 = out_5(res5)                                  # 3x3 conv-norm-ReLU (no lateral)
    y_l = out_l(lat_l(res_l) + up_nearest(y_{l+1}))    # lat: 1x1 conv-norm; out: 3x3 conv-norm-ReLU
    mask_features = conv3x3(y_2)                       # [B, mask_dim, H/4, W/4]
    multi_scale   = [y_5, y_4, y_3]                    # conv_dim channels, 1/32, 1/16, 1/8

Also holds the small conv helpers the other pixel decoders of this package share.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from m2f_kernels.cpu_gemm import Conv2d
from m2f.config import PixelDecoderCfg
from m2f.errors import InputError
from m2f.registry import PIXEL_DECODERS

NUM_MULTI_SCALE = 3  # maps handed to the transformer decoder: 1/32, 1/16, 1/8


def make_norm(norm: str, channels: int) -> nn.Module:
    """``pixel_decoder.norm``: "GN" (32 groups), "BN", or "none" (identity)."""
    if norm == "GN":
        if channels % 32:
            raise InputError(f"pixel_decoder.norm=GN needs channels divisible by 32 (32 groups), got {channels}")
        return nn.GroupNorm(32, channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise InputError(f"pixel_decoder.norm={norm!r}: expected one of 'GN', 'BN', 'none'")


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2's "XavierFill" (detectron2's FPN init): kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def conv_norm(in_ch: int, out_ch: int, kernel: int, norm: str, relu: bool = False, groups: int = 1,
              gemm_backend: str = "reference") -> nn.Sequential:
    """conv(kernel, stride 1, 'same' padding) -> norm -> optional ReLU.  Bias only without a norm.
    ``gemm_backend``: m2f_kernels/cpu_gemm.py (1x1 convolutions of channels-last input)."""
    conv = Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=norm == "none", groups=groups,
                  backend=gemm_backend)
    c2_xavier_fill(conv)
    layers: List[nn.Module] = [conv, make_norm(norm, out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def levels_low_res_first(in_strides: Dict[str, int]) -> List[str]:
    """Backbone level names sorted coarse -> fine (res5, res4, res3, res2)."""
    if len(in_strides) < NUM_MULTI_SCALE + 1:
        raise InputError(f"pixel decoder: needs {NUM_MULTI_SCALE + 1} backbone levels (res2..res5), got {sorted(in_strides)}")
    return sorted(in_strides, key=lambda k: -in_strides[k])


class FPNPixelDecoder(nn.Module):
    """See the module docstring.

    ``forward(features: {"res2": [B,C2,H/4,W/4], ..., "res5": [B,C5,H/32,W/32]})
    -> (mask_features [B, mask_dim, H/4, W/4], [y_5, y_4, y_3] with conv_dim channels)``.

    Subclasses change how the coarsest level is turned into ``y_5`` by overriding :meth:`top`.
    """

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], conv_dim: int = 256,
                 mask_dim: int = 256, norm: str = "GN", gemm_backend: str = "reference"):
        super().__init__()
        self.gemm_backend = gemm_backend
        self.names = levels_low_res_first(in_strides)  # res5, res4, res3, res2
        self.conv_dim, self.mask_dim = conv_dim, mask_dim
        # lateral_convs[0] is unused for the coarsest level (it has no lateral): Identity.
        self.lateral_convs = nn.ModuleList(
            [nn.Identity()] + [conv_norm(in_channels[n], conv_dim, 1, norm, gemm_backend=self.gemm_backend) for n in self.names[1:]])
        self.output_convs = nn.ModuleList(
            [self.top_output_conv(in_channels[self.names[0]], conv_dim, norm)]
            + [conv_norm(conv_dim, conv_dim, 3, norm, relu=True, gemm_backend=self.gemm_backend) for _ in self.names[1:]])
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1, backend=gemm_backend)
        c2_xavier_fill(self.mask_features)

    def top_output_conv(self, in_ch: int, conv_dim: int, norm: str) -> nn.Module:
        """The 3x3 conv applied to the coarsest level (MaskFormer: straight from res5)."""
        return conv_norm(in_ch, conv_dim, 3, norm, relu=True, gemm_backend=self.gemm_backend)

    def top(self, x: Tensor) -> Tensor:
        """Coarsest level [B, C5, h, w] -> y_5 [B, conv_dim, h, w]."""
        return self.output_convs[0](x)

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, List[Tensor]]:
        y = self.top(features[self.names[0]])  # [B, D, H/32, W/32]
        outs = [y]
        for name, lat, out in zip(self.names[1:], self.lateral_convs[1:], self.output_convs[1:]):
            lateral = lat(features[name])  # [B, D, h_l, w_l]
            y = out(lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
            outs.append(y)
        return self.mask_features(y), outs[:NUM_MULTI_SCALE]


@PIXEL_DECODERS.register("fpn")
def _(cfg: PixelDecoderCfg, in_channels: Dict[str, int], in_strides: Dict[str, int],
      gemm_backend: str = "reference") -> nn.Module:
    return FPNPixelDecoder(in_channels, in_strides, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, norm=cfg.norm,
                           gemm_backend=gemm_backend)
