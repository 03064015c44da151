"""Sine positional encoding of a 2-D feature map (DETR / Mask2Former, normalised coordinates)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor


class PositionEmbeddingSine(nn.Module):
    """``forward(x [B,C,H,W]) -> pos [B, 2*num_pos_feats, H, W]`` (first half y, second half x).

    Pixel (i, j) has coordinates y = i + 1, x = j + 1 (1-based, the cumulative sum of a non-padded
    mask), normalised to (0, scale] by dividing by the map's height/width (+1e-6) when
    ``normalize``.  Channel 2k / 2k+1 hold sin / cos of coord / temperature^(2k / num_pos_feats).
    Depends only on the shape, dtype and device of ``x`` (no host synchronisation).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: Optional[float] = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale requires normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: [B, C, H, W]; mask: optional bool [B, H, W], True = padding (excluded from coordinates)."""
        B, _, H, W = x.shape
        if mask is None:
            y = torch.arange(1, H + 1, device=x.device, dtype=torch.float32)[None, :, None].expand(B, H, W)
            xx = torch.arange(1, W + 1, device=x.device, dtype=torch.float32)[None, None, :].expand(B, H, W)
        else:
            not_mask = (~mask).to(torch.float32)
            y = not_mask.cumsum(1)  # [B, H, W]
            xx = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            xx = xx / (xx[:, :, -1:] + eps) * self.scale
        k = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_pos_feats)  # [F]
        pos_x = xx[..., None] / dim_t  # [B, H, W, F]
        pos_y = y[..., None] / dim_t
        # Interleave sin (even channels) and cos (odd channels).
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]
        return pos.to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}"
