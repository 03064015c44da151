"""Semantic-FPN pixel decoder (Panoptic FPN's semantic branch; paper Table 4e row "Semantic FPN").

1. A plain FPN (detectron2 style, no activations) over res2..res5::

       P_5 = out_5(lat_5(res5));  P_l = out_l(lat_l(res_l) + up_nearest(P_{l+1}))

   lat: 1x1 conv-norm, out: 3x3 conv-norm.
2. Every level is brought to 1/4 by a stack of log2(stride/4) "3x3 conv-norm-ReLU, 2x bilinear
   upsampling" steps (one conv without upsampling for P_2), the four 1/4 maps are summed and a
   1x1 conv gives the mask features.

``forward(features) -> (mask_features [B, mask_dim, H/4, W/4], [P_5, P_4, P_3])``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from m2f_kernels.cpu_gemm import Conv2d
from m2f.config import PixelDecoderCfg
from m2f.errors import InputError
from m2f.models.pixel_decoders.fpn import NUM_MULTI_SCALE, c2_xavier_fill, conv_norm, levels_low_res_first
from m2f.registry import PIXEL_DECODERS


class SemanticFPNPixelDecoder(nn.Module):
    """See the module docstring.  ``head_dim`` = channels of the per-level upsampling stacks
    (Panoptic FPN: 128; default: conv_dim)."""

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], conv_dim: int = 256,
                 mask_dim: int = 256, norm: str = "GN", head_dim: int = 0, gemm_backend: str = "reference"):
        super().__init__()
        self.gemm_backend = gemm_backend
        head_dim = head_dim or conv_dim
        self.names = levels_low_res_first(in_strides)  # res5 .. res2
        self.conv_dim, self.mask_dim = conv_dim, mask_dim
        self.lateral_convs = nn.ModuleList([conv_norm(in_channels[n], conv_dim, 1, norm, gemm_backend=self.gemm_backend) for n in self.names])
        self.output_convs = nn.ModuleList([conv_norm(conv_dim, conv_dim, 3, norm, gemm_backend=self.gemm_backend) for _ in self.names])
        finest = in_strides[self.names[-1]]
        if any(in_strides[a] != 2 * in_strides[b] for a, b in zip(self.names, self.names[1:])):
            raise InputError(f"semantic_fpn: backbone strides must halve level by level, got {in_strides}")
        # heads[i]: log2(stride_i / finest) conv-norm-ReLU steps (at least one), each but the
        # P_2 one followed by a 2x upsampling (done in forward, to the next level's exact size).
        self.heads = nn.ModuleList()
        for n in self.names:
            steps = max(1, int(round(math.log2(in_strides[n] / finest))))
            self.heads.append(nn.ModuleList(
                [conv_norm(conv_dim if k == 0 else head_dim, head_dim, 3, norm, relu=True, gemm_backend=self.gemm_backend) for k in range(steps)]))
        self.upsample_steps = [int(round(math.log2(in_strides[n] / finest))) for n in self.names]
        self.mask_features = Conv2d(head_dim, mask_dim, kernel_size=1, backend=gemm_backend)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, List[Tensor]]:
        # 1. FPN, coarse to fine.
        fpn: List[Tensor] = []
        for i, (name, lat, out) in enumerate(zip(self.names, self.lateral_convs, self.output_convs)):
            x = lat(features[name])  # [B, D, h_l, w_l]
            if i > 0:
                x = x + F.interpolate(fpn[-1], size=x.shape[-2:], mode="nearest")
            fpn.append(out(x))
        # Sizes of each stride's map, finest last: upsampling steps land exactly on them.
        sizes = [tuple(p.shape[-2:]) for p in fpn]
        # 2. Each level up to 1/4 and summed.
        total = None
        for i, (p, head) in enumerate(zip(fpn, self.heads)):
            x = p
            for k, conv in enumerate(head):
                x = conv(x)
                if k < self.upsample_steps[i]:
                    x = F.interpolate(x, size=sizes[i + k + 1], mode="bilinear", align_corners=False)
            total = x if total is None else total + x  # [B, head_dim, H/4, W/4]
        return self.mask_features(total), fpn[:NUM_MULTI_SCALE]


@PIXEL_DECODERS.register("semantic_fpn")
def _(cfg: PixelDecoderCfg, in_channels: Dict[str, int], in_strides: Dict[str, int],
      gemm_backend: str = "reference") -> nn.Module:
    return SemanticFPNPixelDecoder(in_channels, in_strides, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim,
                                   norm=cfg.norm, gemm_backend=gemm_backend)
