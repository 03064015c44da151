"""FaPN pixel decoder (feature-aligned FPN, Huang et al. ICCV 2021; paper Table 4e row "FaPN").

An FPN whose lateral connections are *feature selection modules* (FSM) and whose top-down
merges are *feature alignment modules* (FAM)::

    FSM(x) = conv1x1-norm(x + x * sigmoid(conv1x1(avgpool(x))))         # channel re-weighting
    FAM(res_l, y) : lat = FSM(res_l); up = bilinear_up(y)
                    offsets, modulation = conv3x3(conv1x1-norm([lat, 2 * up]))
                    return ReLU(DCNv2(up; offsets, sigmoid(modulation))) + lat

    y_5 = out_5(FSM(res5));  y_l = out_l(FAM(res_l, y_{l+1}))   # out: 3x3 conv-norm-ReLU
    mask_features = conv3x3(y_2);  multi_scale = [y_5, y_4, y_3]

DCNv2 is ``torchvision.ops.deform_conv2d`` (``deformable_groups`` offset groups, 3x3 kernel) with
modulation masks; its offset/modulation conv starts at zero (DCNv2 init), so at initialisation
the alignment samples the regular grid with modulation 0.5.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d

from m2f_kernels.cpu_gemm import Conv2d
from m2f.config import PixelDecoderCfg
from m2f.errors import InputError
from m2f.models.pixel_decoders.fpn import NUM_MULTI_SCALE, c2_xavier_fill, conv_norm, levels_low_res_first
from m2f.registry import PIXEL_DECODERS


class FeatureSelection(nn.Module):
    """FSM: [B, C_in, h, w] -> [B, C_out, h, w]; channel attention from global average pooling."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, gemm_backend: str = "reference"):
        super().__init__()
        self.attention = Conv2d(in_ch, in_ch, kernel_size=1, bias=False, backend=gemm_backend)
        c2_xavier_fill(self.attention)
        self.proj = conv_norm(in_ch, out_ch, 1, norm, gemm_backend=gemm_backend)

    def forward(self, x: Tensor) -> Tensor:
        att = torch.sigmoid(self.attention(x.mean(dim=(2, 3), keepdim=True)))  # [B, C_in, 1, 1]
        return self.proj(x + x * att)


class ModulatedDeformConv(nn.Module):
    """DCNv2 3x3 conv whose offsets and modulation come from a separate feature map.

    ``forward(x [B, C, h, w], offset_feat [B, C_off, h, w]) -> [B, C, h, w]``.
    Offsets: [B, 2 * G * 9, h, w] as (dy, dx) per group and kernel tap; modulation [B, G * 9, h, w].
    """

    def __init__(self, dim: int, offset_in: int, groups: int = 8, kernel: int = 3, gemm_backend: str = "reference"):
        super().__init__()
        if dim % groups:
            raise InputError(f"fapn: conv_dim={dim} must be divisible by the {groups} deformable groups")
        self.groups, self.kernel = groups, kernel
        self.weight = nn.Parameter(torch.empty(dim, dim, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.offset_mask = Conv2d(offset_in, 3 * groups * kernel * kernel, kernel, padding=kernel // 2,
                                  backend=gemm_backend)
        nn.init.zeros_(self.offset_mask.weight)  # DCNv2: start from the regular grid
        nn.init.zeros_(self.offset_mask.bias)

    def offsets_and_mask(self, offset_feat: Tensor) -> Tuple[Tensor, Tensor]:
        om = self.offset_mask(offset_feat)  # [B, 3*G*k*k, h, w]
        n = 2 * self.groups * self.kernel * self.kernel
        return om[:, :n], torch.sigmoid(om[:, n:])

    def forward(self, x: Tensor, offset_feat: Tensor) -> Tensor:
        offset, mask = self.offsets_and_mask(offset_feat)
        p = self.kernel // 2
        return deform_conv2d(x, offset.to(x.dtype), self.weight.to(x.dtype), self.bias.to(x.dtype),
                             padding=(p, p), mask=mask.to(x.dtype))


class FeatureAlign(nn.Module):
    """FAM: ``forward(lateral_in [B, C_in, h, w], top [B, D, h', w']) -> [B, D, h, w]``."""

    def __init__(self, in_ch: int, dim: int, norm: str, deformable_groups: int = 8, gemm_backend: str = "reference"):
        super().__init__()
        self.lateral = FeatureSelection(in_ch, dim, norm, gemm_backend)
        self.offset = conv_norm(2 * dim, dim, 1, norm, gemm_backend=gemm_backend)
        self.dcn = ModulatedDeformConv(dim, dim, groups=deformable_groups, gemm_backend=gemm_backend)

    def forward(self, lateral_in: Tensor, top: Tensor) -> Tensor:
        lat = self.lateral(lateral_in)  # [B, D, h, w]
        up = F.interpolate(top, size=lat.shape[-2:], mode="bilinear", align_corners=False)
        offset_feat = self.offset(torch.cat([lat, 2 * up], dim=1))  # [B, D, h, w]
        return F.relu(self.dcn(up, offset_feat)) + lat


class FaPNPixelDecoder(nn.Module):
    """See the module docstring.  ``forward(features) -> (mask_features [B, mask_dim, H/4, W/4],
    [1/32, 1/16, 1/8] maps with conv_dim channels)``."""

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], conv_dim: int = 256,
                 mask_dim: int = 256, norm: str = "GN", deformable_groups: int = 8, gemm_backend: str = "reference"):
        super().__init__()
        self.names = levels_low_res_first(in_strides)  # res5 .. res2
        self.conv_dim, self.mask_dim = conv_dim, mask_dim
        self.top_lateral = FeatureSelection(in_channels[self.names[0]], conv_dim, norm, gemm_backend)
        self.align = nn.ModuleList(
            [FeatureAlign(in_channels[n], conv_dim, norm, deformable_groups, gemm_backend) for n in self.names[1:]])
        self.output_convs = nn.ModuleList([conv_norm(conv_dim, conv_dim, 3, norm, relu=True, gemm_backend=gemm_backend)
                                           for _ in self.names])
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1, backend=gemm_backend)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, List[Tensor]]:
        y = self.output_convs[0](self.top_lateral(features[self.names[0]]))  # [B, D, H/32, W/32]
        outs = [y]
        for name, fam, out in zip(self.names[1:], self.align, self.output_convs[1:]):
            y = out(fam(features[name], y))  # [B, D, h_l, w_l]
            outs.append(y)
        return self.mask_features(y), outs[:NUM_MULTI_SCALE]


@PIXEL_DECODERS.register("fapn")
def _(cfg: PixelDecoderCfg, in_channels: Dict[str, int], in_strides: Dict[str, int],
      gemm_backend: str = "reference") -> nn.Module:
    return FaPNPixelDecoder(in_channels, in_strides, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, norm=cfg.norm,
                            gemm_backend=gemm_backend)
