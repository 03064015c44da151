"""Transformer-encoder pixel decoder (MaskFormer's default; paper Table 4e row "Transformer encoder").

res5 is projected to ``conv_dim`` (1x1 conv), run through ``num_encoder_layers`` standard
DETR encoder layers (post-norm self-attention with sine positional encodings added to queries
and keys, ReLU FFN of ``ffn_dim``), passed through a 3x3 conv-norm-ReLU, and then the usual FPN
top-down path (:class:`~m2f.models.pixel_decoders.fpn.FPNPixelDecoder`) runs down to 1/4::

    y_5 = out_5(encoder(proj(res5)))          # [B, conv_dim, H/32, W/32]
    y_l = out_l(lat_l(res_l) + up(y_{l+1}))   # l = 4, 3, 2
    mask_features = conv3x3(y_2);  multi_scale = [y_5, y_4, y_3]
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from m2f_kernels.cpu_gemm import Conv2d, Linear
from m2f.config import PixelDecoderCfg
from m2f.errors import InputError
from m2f.models.checkpointing import run_block
from m2f.models.pixel_decoders.fpn import FPNPixelDecoder, conv_norm
from m2f.models.position_encoding import PositionEmbeddingSine
from m2f.registry import PIXEL_DECODERS


class EncoderLayer(nn.Module):
    """DETR encoder layer (post-norm): x = LN(x + SA(x+pos, x+pos, x)); x = LN(x + FFN(x)).

    ``forward(x [B, S, D], pos [B, S, D]) -> [B, S, D]``.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0, gemm_backend: str = "reference"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = Linear(dim, ffn_dim, backend=gemm_backend)
        self.linear2 = Linear(ffn_dim, dim, backend=gemm_backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for lin in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        q = x + pos
        x = self.norm1(x + self.dropout(self.self_attn(q, q, x, need_weights=False)[0]))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ffn))


class TransformerEncoderPixelDecoder(FPNPixelDecoder):
    """See the module docstring.  Same interface as :class:`FPNPixelDecoder`."""

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], conv_dim: int = 256,
                 mask_dim: int = 256, norm: str = "GN", num_encoder_layers: int = 6, num_heads: int = 8,
                 ffn_dim: int = 2048, dropout: float = 0.0, gemm_backend: str = "reference",
                 activation_checkpointing: bool = False):
        if conv_dim % num_heads:
            raise InputError(f"pixel_decoder.conv_dim={conv_dim} must be divisible by pixel_decoder.num_heads={num_heads}")
        if conv_dim % 2:
            raise InputError(f"pixel_decoder.conv_dim={conv_dim} must be even (sine encoding: half y, half x)")
        super().__init__(in_channels, in_strides, conv_dim=conv_dim, mask_dim=mask_dim, norm=norm,
                         gemm_backend=gemm_backend)
        self.input_proj = Conv2d(in_channels[self.names[0]], conv_dim, kernel_size=1, backend=gemm_backend)
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.zeros_(self.input_proj.bias)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.layers = nn.ModuleList(
            [EncoderLayer(conv_dim, num_heads, ffn_dim, dropout, gemm_backend) for _ in range(num_encoder_layers)])
        self.activation_checkpointing = activation_checkpointing  # encoder layers; m2f.models.checkpointing

    def top_output_conv(self, in_ch: int, conv_dim: int, norm: str) -> nn.Module:
        # After the encoder the coarsest map already has conv_dim channels.
        return conv_norm(conv_dim, conv_dim, 3, norm, relu=True, gemm_backend=self.gemm_backend)

    def top(self, x: Tensor) -> Tensor:
        src = self.input_proj(x)  # [B, D, h, w]
        B, D, h, w = src.shape
        pos = self.pe_layer(src).flatten(2).transpose(1, 2)  # [B, h*w, D]
        tokens = src.flatten(2).transpose(1, 2)  # [B, h*w, D]
        for layer in self.layers:
            tokens = run_block(self.activation_checkpointing, layer, tokens, pos)
        return self.output_convs[0](tokens.transpose(1, 2).reshape(B, D, h, w))


@PIXEL_DECODERS.register("transformer_encoder")
def _(cfg: PixelDecoderCfg, in_channels: Dict[str, int], in_strides: Dict[str, int],
      gemm_backend: str = "reference") -> nn.Module:
    return TransformerEncoderPixelDecoder(
        in_channels, in_strides, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, norm=cfg.norm,
        num_encoder_layers=cfg.num_encoder_layers, num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim,
        dropout=cfg.dropout, gemm_backend=gemm_backend, activation_checkpointing=cfg.activation_checkpointing)
