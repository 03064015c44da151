"""Mask2Former: backbone -> pixel decoder -> masked-attention transformer decoder."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from m2f.errors import InputError
from m2f.models.outputs import Mask2FormerOutput


class Mask2Former(nn.Module):
    """Meta-architecture built from three submodules (see docs/DESIGN.md).

    forward(images [B,3,H,W] normalised, H and W multiples of 32) -> Mask2FormerOutput with
    class logits [B,Q,K+1] and mask logits [B,Q,H/4,W/4] for every prediction.
    """

    def __init__(self, backbone: nn.Module, pixel_decoder: nn.Module, transformer_decoder: nn.Module,
                 pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
                 pixel_std: Sequence[float] = (58.395, 57.12, 57.375), size_divisibility: int = 32):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)
        self.size_divisibility = size_divisibility

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, images: Tensor, return_attention: bool = False) -> Mask2FormerOutput:
        features = self.backbone(images)  # {"res2": [B,C2,H/4,W/4], ..., "res5": [B,C5,H/32,W/32]}
        mask_features, multi_scale = self.pixel_decoder(features)  # [B,D,H/4,W/4], [1/32, 1/16, 1/8]
        if return_attention:
            return self.transformer_decoder(multi_scale, mask_features, return_attention=True)
        return self.transformer_decoder(multi_scale, mask_features)

    def preprocess(self, images: Sequence[Tensor]) -> Tuple[Tensor, List[Tuple[int, int]]]:
        """List of uint8 [3,H_i,W_i] -> (normalised images [B,3,Hp,Wp] zero-padded after normalisation
        to a multiple of ``size_divisibility``, original sizes [(H_i, W_i)])."""
        if len(images) == 0:
            raise InputError("Mask2Former.preprocess: expected at least one image")
        sizes: List[Tuple[int, int]] = []
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != 3:
                raise InputError(f"Mask2Former.preprocess: image {i} has shape {tuple(im.shape)}, expected [3,H,W]")
            sizes.append((int(im.shape[1]), int(im.shape[2])))
        d = self.size_divisibility
        hp = max(h for h, _ in sizes)
        wp = max(w for _, w in sizes)
        hp, wp = (hp + d - 1) // d * d, (wp + d - 1) // d * d
        out = torch.zeros(len(images), 3, hp, wp, device=self.device)
        for i, im in enumerate(images):
            x = (im.to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std
            out[i, :, : x.shape[1], : x.shape[2]] = x
        return out, sizes
