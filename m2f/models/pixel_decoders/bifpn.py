"""BiFPN pixel decoder (EfficientDet; paper Table 4e row "BiFPN").

res2..res5 are projected to ``conv_dim`` (1x1 conv-norm) and passed through ``repeats`` BiFPN
layers.  With levels indexed fine -> coarse (0 = 1/4, 3 = 1/32), one layer is::

    td_3 = x_3
    td_i  = conv(swish(fuse(x_i, up(td_{i+1}))))                  i = 2, 1, 0   (top-down)
    out_0 = td_0
    out_i = conv(swish(fuse(x_i, td_i, down(out_{i-1}))))         i = 1, 2      (bottom-up)
    out_3 = conv(swish(fuse(x_3, down(out_2))))

``fuse`` is EfficientDet's fast normalised fusion, sum_j w_j x_j / (eps + sum_j w_j) with
w = ReLU(learned weights) (non-negative, summing to ~1); ``conv`` a depthwise-separable 3x3 conv +
norm; ``up`` nearest upsampling, ``down`` 3x3/2 max pooling.  The mask features are a 1x1 conv of
the final 1/4 level; ``multi_scale`` = the final 1/32, 1/16, 1/8 levels.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from m2f_kernels.cpu_gemm import Conv2d
from m2f.config import PixelDecoderCfg
from m2f.errors import InputError
from m2f.models.pixel_decoders.fpn import NUM_MULTI_SCALE, c2_xavier_fill, conv_norm, levels_low_res_first
from m2f.registry import PIXEL_DECODERS


class FastFusion(nn.Module):
    """Fast normalised fusion of ``n`` same-shaped maps: sum_j w_j x_j with w = relu(p) / (sum relu(p) + eps)."""

    def __init__(self, n: int, eps: float = 1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def normalized_weights(self) -> Tensor:
        """[n] non-negative weights summing to sum/(sum + eps) <= 1."""
        w = F.relu(self.weight)
        return w / (w.sum() + self.eps)

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        w = self.normalized_weights().to(xs[0].dtype)
        out = xs[0] * w[0]
        for j in range(1, len(xs)):
            out = out + xs[j] * w[j]
        return out


class SeparableConv(nn.Module):
    """Depthwise 3x3 conv -> pointwise 1x1 conv -> norm.  [B, C, h, w] -> [B, C, h, w]."""

    def __init__(self, dim: int, norm: str, gemm_backend: str = "reference"):
        super().__init__()
        self.depthwise = Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False, backend=gemm_backend)
        self.pointwise = conv_norm(dim, dim, 1, norm, gemm_backend=gemm_backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


def _resize_like(x: Tensor, size: Tuple[int, int]) -> Tensor:
    # Only when a backbone rounds sizes differently from ceil(h/2) (shapes are Python ints: no sync).
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="nearest")


class BiFPNLayer(nn.Module):
    """One BiFPN layer over ``num_levels`` maps of ``dim`` channels, fine -> coarse order."""

    def __init__(self, dim: int, num_levels: int, norm: str, gemm_backend: str = "reference"):
        super().__init__()
        L = num_levels
        self.fuse_td = nn.ModuleList([FastFusion(2) for _ in range(L - 1)])  # index i: level i (0..L-2)
        self.conv_td = nn.ModuleList([SeparableConv(dim, norm, gemm_backend) for _ in range(L - 1)])
        # index i-1: level i (1..L-1); the coarsest has no top-down node to fuse.
        self.fuse_bu = nn.ModuleList([FastFusion(3 if i < L - 1 else 2) for i in range(1, L)])
        self.conv_bu = nn.ModuleList([SeparableConv(dim, norm, gemm_backend) for _ in range(1, L)])

    def forward(self, xs: List[Tensor]) -> List[Tensor]:
        L = len(xs)
        td: List[Tensor] = [xs[-1]] * L
        for i in range(L - 2, -1, -1):
            up = F.interpolate(td[i + 1], size=xs[i].shape[-2:], mode="nearest")
            td[i] = self.conv_td[i](F.silu(self.fuse_td[i]([xs[i], up])))
        outs = [td[0]]
        for i in range(1, L):
            down = _resize_like(F.max_pool2d(outs[-1], kernel_size=3, stride=2, padding=1), xs[i].shape[-2:])
            inputs = [xs[i], td[i], down] if i < L - 1 else [xs[i], down]
            outs.append(self.conv_bu[i - 1](F.silu(self.fuse_bu[i - 1](inputs))))
        return outs

    def fusions(self) -> List[FastFusion]:
        return list(self.fuse_td) + list(self.fuse_bu)


class BiFPNPixelDecoder(nn.Module):
    """See the module docstring.  ``forward(features) -> (mask_features [B, mask_dim, H/4, W/4],
    [1/32, 1/16, 1/8] maps with conv_dim channels)``."""

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], conv_dim: int = 256,
                 mask_dim: int = 256, norm: str = "GN", repeats: int = 2, gemm_backend: str = "reference"):
        super().__init__()
        if repeats < 1:
            raise InputError(f"pixel_decoder.bifpn_repeats={repeats}: expected >= 1")
        self.names = levels_low_res_first(in_strides)[::-1]  # fine -> coarse: res2 .. res5
        self.conv_dim, self.mask_dim = conv_dim, mask_dim
        self.input_proj = nn.ModuleList([conv_norm(in_channels[n], conv_dim, 1, norm, gemm_backend=gemm_backend)
                                         for n in self.names])
        self.layers = nn.ModuleList([BiFPNLayer(conv_dim, len(self.names), norm, gemm_backend) for _ in range(repeats)])
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, backend=gemm_backend)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, List[Tensor]]:
        xs = [proj(features[n]) for proj, n in zip(self.input_proj, self.names)]  # fine -> coarse, [B, D, h_l, w_l]
        for layer in self.layers:
            xs = layer(xs)
        return self.mask_features(xs[0]), xs[::-1][:NUM_MULTI_SCALE]


@PIXEL_DECODERS.register("bifpn")
def _(cfg: PixelDecoderCfg, in_channels: Dict[str, int], in_strides: Dict[str, int],
      gemm_backend: str = "reference") -> nn.Module:
    return BiFPNPixelDecoder(in_channels, in_strides, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, norm=cfg.norm,
                             repeats=cfg.bifpn_repeats, gemm_backend=gemm_backend)
