"""MSDeformAttn pixel decoder (the paper's default; Table 4e).

A Deformable-DETR encoder (``num_encoder_layers`` layers of multi-scale deformable self-attention
+ FFN, post-norm) runs over the res3..res5 features projected to ``conv_dim`` (1x1 conv + norm),
with sine positional encodings plus a learnable embedding per level.  One FPN step then merges the
1/8 encoder output into res2 (1x1 lateral conv + bilinear upsampling + 3x3 output conv) and a 1x1
"mask_features" conv yields the 1/4 per-pixel embedding.

``forward(features) -> (mask_features [B, mask_dim, H/4, W/4],
[1/32, 1/16, 1/8] maps with conv_dim channels)`` (low resolution first).

The deformable attention itself (its reference, fast paths and dispatch on ``backend``) is
:mod:`m2f_kernels.ms_deform_attn`.  The sine positional encodings and reference points depend only on
the level shapes: cached per shape.  ``gemm_backend`` (m2f_kernels/cpu_gemm.py) computes the linear
layers and 1x1 convolutions; ``activation_checkpointing`` recomputes the encoder layers in backward.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from m2f_kernels.cpu_gemm import Conv2d, Linear
from m2f_kernels.ms_deform_attn import check_backend, ms_deform_attn
from m2f.config import PixelDecoderCfg
from m2f.models.checkpointing import run_block
from m2f.models.position_encoding import PositionEmbeddingSine
from m2f.registry import PIXEL_DECODERS


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "GN":
        return nn.GroupNorm(32, channels)
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    # "Caffe2 XavierFill" as used by detectron2-style FPN convs: kaiming uniform with a=1.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR).

    forward(query [B,Q,C], reference_points [B,Q,L,2] in [0,1] (x,y), value_in [B,S,C],
    spatial_shapes [(H_l, W_l)] * L) -> [B,Q,C]

    ``backend``: the implementation of the attention (``m2f_kernels.ms_deform_attn.BACKENDS``);
    ``gemm_backend``: the linear layers' (``m2f_kernels.cpu_gemm.BACKENDS``).
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, backend: str = "reference",
                 gemm_backend: str = "reference"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MSDeformAttn: dim {dim} not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.num_levels, self.num_points = dim, num_heads, num_levels, num_points
        self.backend = check_backend(backend)
        self.sampling_offsets = Linear(dim, num_heads * num_levels * num_points * 2, backend=gemm_backend)
        self.attention_weights = Linear(dim, num_heads * num_levels * num_points, backend=gemm_backend)
        self.value_proj = Linear(dim, dim, backend=gemm_backend)
        self.output_proj = Linear(dim, dim, backend=gemm_backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nH, L, P = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        # Initial offsets: head h looks along direction 2*pi*h/nH, point p at distance p + 1.
        thetas = torch.arange(nH, dtype=torch.float32) * (2.0 * math.pi / nH)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [nH, 2]
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(nH, 1, 1, 2).repeat(1, L, P, 1)
        grid = grid * torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value_in: Tensor,
                spatial_shapes: Sequence[Tuple[int, int]]) -> Tensor:
        B, Q, C = query.shape
        S = value_in.shape[1]
        nH, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_in).view(B, S, nH, C // nH)  # [B, S, nH, Dh]
        offsets = self.sampling_offsets(query).view(B, Q, nH, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, nH, L * P).softmax(-1).view(B, Q, nH, L, P)
        # Offsets are in pixels of each level: normalise by (W_l, H_l).
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(value, spatial_shapes, loc, weights, backend=self.backend)  # [B, Q, C]
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Post-norm: x = LN(x + MSDeformAttn(x + pos)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float, backend: str, gemm_backend: str = "reference"):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_heads, num_levels, num_points, backend, gemm_backend)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = Linear(dim, ffn_dim, backend=gemm_backend)
        self.linear2 = Linear(ffn_dim, dim, backend=gemm_backend)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor,
                spatial_shapes: Sequence[Tuple[int, int]]) -> Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x + pos, reference_points, x, spatial_shapes)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ffn))


def encoder_reference_points(spatial_shapes: Sequence[Tuple[int, int]], batch: int, device, dtype) -> Tensor:
    """Pixel centres of every level, normalised to [0,1]: [B, S, L, 2] as (x, y), same for all L."""
    refs = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))  # [H*W, 2]
    ref = torch.cat(refs, 0)  # [S, 2]
    return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


class MSDeformAttnPixelDecoder(nn.Module):
    """See the module docstring.

    Args:
        in_channels / in_strides: backbone outputs, e.g. {"res2": 256, ...} / {"res2": 4, ...}.
        transformer_in_features: the levels the deformable encoder sees (res3..res5).
        common_stride: stride of the mask features (4): FPN steps run down to it.
        backend: the deformable attention's implementation (``m2f_kernels.ms_deform_attn.BACKENDS``).
        gemm_backend: the linear layers' and 1x1 convolutions' (``m2f_kernels.cpu_gemm.BACKENDS``).
        activation_checkpointing: recompute each encoder layer in backward (same gradients, less memory).
    """

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], conv_dim: int = 256,
                 mask_dim: int = 256, norm: str = "GN", num_encoder_layers: int = 6, num_heads: int = 8,
                 num_points: int = 4, ffn_dim: int = 1024, dropout: float = 0.0,
                 transformer_in_features: Sequence[str] = ("res3", "res4", "res5"), common_stride: int = 4,
                 backend: str = "reference", gemm_backend: str = "reference", activation_checkpointing: bool = False):
        super().__init__()
        # Transformer levels, LOW resolution first (res5, res4, res3).
        self.trans_names: List[str] = sorted(transformer_in_features, key=lambda k: -in_strides[k])
        self.num_levels = len(self.trans_names)
        self.input_proj = nn.ModuleList()
        for name in self.trans_names:
            conv = Conv2d(in_channels[name], conv_dim, kernel_size=1, backend=gemm_backend)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, _norm(norm, conv_dim)))
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList([
            DeformableEncoderLayer(conv_dim, num_heads, self.num_levels, num_points, ffn_dim, dropout, backend,
                                   gemm_backend)
            for _ in range(num_encoder_layers)
        ])
        # FPN levels finer than the transformer's finest, down to common_stride, LOW resolution first.
        min_stride = min(in_strides[k] for k in self.trans_names)
        self.fpn_names: List[str] = sorted(
            [k for k in in_channels if common_stride <= in_strides[k] < min_stride], key=lambda k: -in_strides[k]
        )
        use_bias = norm == "none"
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for name in self.fpn_names:
            lat = Conv2d(in_channels[name], conv_dim, kernel_size=1, bias=use_bias, backend=gemm_backend)
            out = Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=use_bias, backend=gemm_backend)
            _c2_xavier_fill(lat)
            _c2_xavier_fill(out)
            self.lateral_convs.append(nn.Sequential(lat, _norm(norm, conv_dim)))
            self.output_convs.append(nn.Sequential(out, _norm(norm, conv_dim), nn.ReLU()))
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, backend=gemm_backend)
        _c2_xavier_fill(self.mask_features)
        self.conv_dim, self.mask_dim = conv_dim, mask_dim
        self.activation_checkpointing = activation_checkpointing  # encoder layers; m2f.models.checkpointing
        # (shapes, batch, device, dtype) -> (sine encodings [B, S, D], reference points [B, S, L, 2])
        self._shape_cache: Dict[tuple, Tuple[Tensor, Tensor]] = {}

    def _shape_constants(self, shapes: List[Tuple[int, int]], batch: int, like: Tensor) -> Tuple[Tensor, Tensor]:
        """Sine positional encodings of every level, flattened [B, S, D], and the encoder reference
        points [B, S, L, 2]; both depend only on the shapes, so they are computed once per shape."""
        key = (tuple(shapes), batch, like.device, like.dtype)
        hit = self._shape_cache.get(key)
        if hit is None:
            with torch.no_grad():
                pe = [self.pe_layer(like.new_empty(batch, 1, h, w)).flatten(2).transpose(1, 2) for h, w in shapes]
                hit = (torch.cat(pe, 1), encoder_reference_points(shapes, batch, like.device, like.dtype))
            if len(self._shape_cache) >= 16:  # many input sizes (multi-scale test): bounded
                self._shape_cache.clear()
            self._shape_cache[key] = hit
        return hit

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, List[Tensor]]:
        srcs = [proj(features[name]) for proj, name in zip(self.input_proj, self.trans_names)]  # [B, D, H_l, W_l]
        B = srcs[0].shape[0]
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]  # python ints from shapes: no sync
        x = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, D]
        sine, ref = self._shape_constants(shapes, B, x)  # [B, S, D], [B, S, L, 2]
        level = torch.cat([self.level_embed[lvl].to(x.dtype).expand(h * w, -1)
                           for lvl, (h, w) in enumerate(shapes)], 0)  # [S, D]
        pos_flat = sine + level  # [B, S, D]
        for layer in self.layers:
            x = run_block(self.activation_checkpointing, layer, x, pos_flat, ref, shapes)
        outs = [
            y.transpose(1, 2).reshape(B, self.conv_dim, h, w)
            for y, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes)
        ]  # [1/32, 1/16, 1/8]
        multi_scale = list(outs)
        cur = outs[-1]
        for name, lat, out_conv in zip(self.fpn_names, self.lateral_convs, self.output_convs):
            lateral = lat(features[name])  # [B, D, H_f, W_f]
            cur = out_conv(lateral + F.interpolate(cur, size=lateral.shape[-2:], mode="bilinear",
                                                   align_corners=False))
        return self.mask_features(cur), multi_scale[: self.num_levels]


@PIXEL_DECODERS.register("msdeform")
def _(cfg: PixelDecoderCfg, in_channels: Dict[str, int], in_strides: Dict[str, int],
      gemm_backend: str = "reference") -> nn.Module:
    return MSDeformAttnPixelDecoder(
        in_channels, in_strides, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, norm=cfg.norm,
        num_encoder_layers=cfg.num_encoder_layers, num_heads=cfg.num_heads, num_points=cfg.num_points,
        ffn_dim=cfg.ffn_dim, dropout=cfg.dropout, backend=cfg.deform_attn_backend, gemm_backend=gemm_backend,
        activation_checkpointing=cfg.activation_checkpointing,
    )
