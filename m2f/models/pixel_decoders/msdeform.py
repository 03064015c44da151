"""MSDeformAttn pixel decoder (the paper's default; Table 4e).

A Deformable-DETR encoder (``num_encoder_layers`` layers of multi-scale deformable self-attention
+ FFN, post-norm) runs over the res3..res5 features projected to ``conv_dim`` (1x1 conv + norm),
with sine positional encodings plus a learnable embedding per level.  One FPN step then merges the
1/8 encoder output into res2 (1x1 lateral conv + bilinear upsampling + 3x3 output conv) and a 1x1
"mask_features" conv yields the 1/4 per-pixel embedding.

``forward(features) -> (mask_features [B, mask_dim, H/4, W/4],
[1/32, 1/16, 1/8] maps with conv_dim channels)`` (low resolution first).

Speed (see reports/bench/README.md): ``backend="reference"`` runs pure-PyTorch formulations of
the same function as ``kernels.ms_deform_attn.ms_deform_attn_reference`` (the grid_sample spec):
:func:`ms_deform_attn_gather` folds the bilinear and attention weights into one ``embedding_bag``
gather-and-sum (no [B*nH, Dh, Q, L*P] sample tensor); with autograd
:func:`ms_deform_attn_levels` accumulates the weighted sum level by level (no stack of the levels'
samples; embedding_bag's own backward sorts its indices and is slower).  ``"reference_recompute"``
trades time for memory: the gather runs forward keeping only its inputs and the backward recomputes
the levels formulation (:func:`ms_deform_attn_recompute`).  The sine
positional encodings and reference points depend only on the level shapes: cached per shape.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kernels.ms_deform_attn import ms_deform_attn
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


def ms_deform_attn_gather(value: Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: Tensor,
                          attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention as one weighted gather (``F.embedding_bag``, mode "sum").

    Same shapes and semantics as ``kernels.ms_deform_attn.ms_deform_attn_reference``:
    value [B, S, nH, Dh]; sampling_locations [B, Q, nH, L, P, 2] normalised (x, y);
    attention_weights [B, Q, nH, L, P] -> [B, Q, nH * Dh].  Bilinear, zero outside each map,
    align_corners=False (pixel coordinate = loc * size - 0.5).

    Each level's map gets a zero border (1 pixel before, 2 after), so clamping a sample's
    coordinate into [-1, size] gives the same bilinear value as the unpadded map with zero padding
    (a sample at or beyond the border reads only zeros) and no validity masks are needed.  Each of
    the L*P samples reads its 4 corners: the corner's row in the padded ``value`` viewed as
    [B*S'*nH, Dh] and its weight (bilinear weight x attention weight).  Everything is computed on
    contiguous [B, Q, nH, P] tensors per level (broadcasts over size-2 inner dimensions are slow on
    CPU).  The weights are differentiable in the locations and attention weights (through the
    fractional part of the coordinate, as grid_sample's gradient; zero where clamped, where the
    function is 0); embedding_bag's backward gives the gradients of ``value`` and of the weights.
    No host synchronisation.
    """
    B, S, nH, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    dev, itype = value.device, torch.int32  # int32 indices: B*S'*nH stays far below 2**31
    if sampling_locations.dtype in (torch.float16, torch.bfloat16):  # pixel coordinates need float32
        sampling_locations = sampling_locations.float()
    padded, starts, offset = [], [], 0
    for v, (h, w) in zip(value.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes):
        padded.append(F.pad(v.reshape(B, h, w, nH * Dh), (0, 0, 1, 2, 1, 2)).reshape(B, -1, nH, Dh))
        starts.append(offset)
        offset += (h + 3) * (w + 3)
    rows = torch.cat(padded, 1).reshape(-1, Dh)  # [B*S'*nH, Dh]
    # row of (batch b, head h) at padded position 0 of level 0: [B, 1, nH, 1, 1]
    base = (torch.arange(B, dtype=itype, device=dev).view(B, 1, 1, 1, 1) * (offset * nH)
            + torch.arange(nH, dtype=itype, device=dev).view(1, 1, nH, 1, 1))
    idx_levels, w_levels = [], []
    for lvl, (h, w) in enumerate(spatial_shapes):
        loc = sampling_locations[:, :, :, lvl]  # [B, Q, nH, P, 2]
        x = (loc[..., 0] * w + 0.5).clamp(0, w + 1)  # coordinate in the padded map: [0, w + 1]
        y = (loc[..., 1] * h + 0.5).clamp(0, h + 1)
        x0, y0 = x.detach().floor(), y.detach().floor()
        fx, fy = x - x0, y - y0
        wp = w + 3
        pos = (y0 * wp + x0).to(itype) + starts[lvl]  # exact: positions < 2**24
        corners = pos[..., None] + torch.tensor([0, 1, wp, wp + 1], dtype=itype, device=dev)
        idx_levels.append(corners * nH + base)  # [B, Q, nH, P, 4]
        a = attention_weights[:, :, :, lvl]
        ay1 = a * fy
        ay0 = a - ay1
        gx = 1 - fx
        w_levels.append(torch.stack((ay0 * gx, ay0 * fx, ay1 * gx, ay1 * fx), -1))
    idx = torch.stack(idx_levels, 3).reshape(B * Q * nH, L * P * 4)
    wts = torch.stack(w_levels, 3).reshape(B * Q * nH, L * P * 4).to(value.dtype)
    out = F.embedding_bag(idx, rows, per_sample_weights=wts, mode="sum")
    return out.view(B, Q, nH * Dh)


_WORKSPACE = threading.local()


def _workspace(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A CPU scratch tensor reused across calls (one per thread, the last shape asked for).

    A fresh 22-88 MB tensor per level and layer is page-faulted in on every allocation (the C
    library hands such blocks back to the OS when freed): writing the samples' gradient into fresh
    memory took ~8 ms per level at 512 px against ~1 ms into memory already mapped."""
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = torch.empty(shape, dtype=dtype)
        _WORKSPACE.buf = buf
    return buf


class _SampleWeightedSum(torch.autograd.Function):
    """One level of the levels formulation: ``(grid_sample(value, grid) * weights).sum(2)``.

    value [N, Dh, H, W], grid [N, P, Q, 2] in [-1, 1], weights [N, 1, P, Q] -> [N, Dh, Q]
    (bilinear, zero padding, ``align_corners=False``).  Autograd's own graph of this expression
    wrote the samples' gradient [N, Dh, P, Q] in a permuted layout that ``grid_sample``'s backward
    then copied, and materialised the [N, Dh, P, Q] products.  Here the sums over P (forward) and
    over Dh (the weights' gradient) accumulate slice by slice (``addcmul_``), and the samples'
    gradient is written contiguous and handed straight to ``grid_sampler_2d_backward``; on CPU into
    a reused scratch tensor (:func:`_workspace`), which never leaves this backward.  The samples are
    computed in ``grid_sample``'s dtype (float32 under autocast, as autocast runs it) and the
    gradients are returned in the inputs' dtypes.  ``create_graph`` (double backward) runs the
    same expression through plain differentiable ops."""

    @staticmethod
    def forward(ctx, value: Tensor, grid: Tensor, weights: Tensor) -> Tensor:
        samples = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        ctx.save_for_backward(value, grid, weights, samples)
        dtype = torch.result_type(samples, weights)
        out = samples[:, :, 0] * weights[:, :, 0]  # [N, Dh, Q]
        for p in range(1, samples.shape[2]):
            out.addcmul_(samples[:, :, p], weights[:, :, p].to(dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, grid, weights, samples = ctx.saved_tensors
        needs_v, needs_g, needs_w = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiate the plain expression of the saved
            # inputs (they keep their history, so the gradients do too)
            s = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out = (s * weights).sum(2)
            inputs = (value, grid, weights)
            wanted = [t for t, n in zip(inputs, (needs_v, needs_g, needs_w)) if n]
            got = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
            return tuple(next(got) if n else None for n in (needs_v, needs_g, needs_w))
        # The gradient arrives as the transpose of the output projection's input gradient (Q outer,
        # Dh inner); reading it Q-contiguous makes the products below stream instead of stride.
        g = grad_out.contiguous().unsqueeze(2)  # [N, Dh, 1, Q]
        grad_v = grad_g = grad_w = None
        if needs_w:  # [N, 1, P, Q], accumulated over Dh without the [N, Dh, P, Q] product
            dtype = torch.result_type(samples, g)
            grad_w = samples[:, :1] * g[:, :1]
            for d in range(1, samples.shape[1]):
                grad_w.addcmul_(samples[:, d:d + 1], g[:, d:d + 1].to(dtype))
            grad_w = grad_w.to(weights.dtype)
        if needs_v or needs_g:
            dtype = samples.dtype
            grad_s = (_workspace(samples.shape, dtype) if samples.device.type == "cpu"
                      else torch.empty(samples.shape, dtype=dtype, device=samples.device))
            torch.mul(g.to(dtype), weights.to(dtype), out=grad_s)
            grad_v, grad_g = torch.ops.aten.grid_sampler_2d_backward(
                grad_s, value.to(dtype), grid.to(dtype), 0, 0, False, [needs_v, needs_g])  # bilinear, zeros
            grad_v = grad_v.to(value.dtype) if needs_v else None
            grad_g = grad_g.to(grid.dtype) if needs_g else None
        return grad_v, grad_g, grad_w


def ms_deform_attn_levels(value: Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: Tensor,
                          attention_weights: Tensor) -> Tensor:
    """The grid_sample formulation, accumulated per level (shapes as :func:`ms_deform_attn_gather`)."""
    B, S, nH, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # points as rows of the sampled "image": the weighted sum over P then runs over a non-inner
    # dimension with Q contiguous (a sum over an inner dimension of 4 is slow on CPU).  The grids
    # and weights are laid out [B*nH, L, P, Q] once (contiguous, so the per-level products
    # broadcast over Dh without strided reads).
    # (``contiguous``: with B == 1 the reshapes are views that keep Q at stride nH*L*P.)
    grids = (2.0 * sampling_locations - 1.0).permute(0, 2, 3, 4, 1, 5).reshape(B * nH, L, P, Q, 2).contiguous()
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(B * nH, L, 1, P, Q).contiguous()
    out: Optional[Tensor] = None
    levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    for lvl, (v, (h, w)) in enumerate(zip(levels, spatial_shapes)):
        v = v.flatten(2).transpose(1, 2).reshape(B * nH, Dh, h, w)  # [B*nH, Dh, H_l, W_l]
        o = _SampleWeightedSum.apply(v, grids[:, lvl], weights[:, lvl])  # [B*nH, Dh, Q]
        out = o if out is None else out + o
    return out.view(B, nH * Dh, Q).transpose(1, 2)  # [B, Q, nH*Dh]


class _DeformAttnRecompute(torch.autograd.Function):
    """Training path of the reference backend: forward by :func:`ms_deform_attn_gather`, saving
    only its inputs; backward recomputes :func:`ms_deform_attn_levels` and differentiates it.

    The per-level [B*nH, Dh, P, Q] samples and their products with the attention weights
    (3 x 88 MB per encoder layer at 1024 px, batch 1) are not kept between forward and backward:
    training memory falls by about that much per layer for one extra gather per layer.  Mixed
    input dtypes (autocast) are computed in float32, as grid_sample under autocast does.
    First-order gradients only.
    """

    @staticmethod
    def forward(ctx, value: Tensor, sampling_locations: Tensor, attention_weights: Tensor,
                spatial_shapes: Tuple[Tuple[int, int], ...]) -> Tensor:
        ctx.dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        if len(set(ctx.dtypes)) > 1:
            value, sampling_locations, attention_weights = (
                t.float() for t in (value, sampling_locations, attention_weights))
        ctx.spatial_shapes = spatial_shapes
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(n) for t, n in zip(saved, needs)]
            out = ms_deform_attn_levels(inputs[0], ctx.spatial_shapes, inputs[1], inputs[2])
            wanted = [t for t in inputs if t.requires_grad]
            got = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype)))
        grads = [next(got).to(dt) if n else None for n, dt in zip(needs, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None


def ms_deform_attn_recompute(value: Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """Differentiable deformable attention that keeps only its inputs for backward
    (:class:`_DeformAttnRecompute`); shapes as :func:`ms_deform_attn_gather`."""
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    return _DeformAttnRecompute.apply(value, sampling_locations, attention_weights, shapes)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR).

    forward(query [B,Q,C], reference_points [B,Q,L,2] in [0,1] (x,y), value_in [B,S,C],
    spatial_shapes [(H_l, W_l)] * L) -> [B,Q,C]

    backend "reference" runs :func:`ms_deform_attn_gather` (no autograd) or
    :func:`ms_deform_attn_levels` (pure PyTorch, any device); "reference_recompute" trains with
    :func:`ms_deform_attn_recompute` (less memory, slower); "triton" / "auto" dispatch through
    ``kernels.ms_deform_attn.ms_deform_attn``.
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, backend: str = "reference"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MSDeformAttn: dim {dim} not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.num_levels, self.num_points = dim, num_heads, num_levels, num_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
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
        if self.backend in ("reference", "reference_recompute"):
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (value, loc, weights))
            if not needs_grad:
                impl = ms_deform_attn_gather
            else:
                impl = ms_deform_attn_recompute if self.backend == "reference_recompute" else ms_deform_attn_levels
            out = impl(value, spatial_shapes, loc, weights)  # [B, Q, C]
        else:
            out = ms_deform_attn(value, spatial_shapes, loc, weights, backend=self.backend)  # [B, Q, C]
        return self.output_proj(out)


def set_deform_attn_backend(module: nn.Module, backend: str) -> None:
    """Switch every :class:`MSDeformAttn` under ``module`` to ``backend`` (same weights)."""
    for m in module.modules():
        if isinstance(m, MSDeformAttn):
            m.backend = backend


class DeformableEncoderLayer(nn.Module):
    """Post-norm: x = LN(x + MSDeformAttn(x + pos)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float, backend: str):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_heads, num_levels, num_points, backend)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
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
    """

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], conv_dim: int = 256,
                 mask_dim: int = 256, norm: str = "GN", num_encoder_layers: int = 6, num_heads: int = 8,
                 num_points: int = 4, ffn_dim: int = 1024, dropout: float = 0.0,
                 transformer_in_features: Sequence[str] = ("res3", "res4", "res5"), common_stride: int = 4,
                 backend: str = "reference"):
        super().__init__()
        # Transformer levels, LOW resolution first (res5, res4, res3).
        self.trans_names: List[str] = sorted(transformer_in_features, key=lambda k: -in_strides[k])
        self.num_levels = len(self.trans_names)
        self.input_proj = nn.ModuleList()
        for name in self.trans_names:
            conv = nn.Conv2d(in_channels[name], conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, _norm(norm, conv_dim)))
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList([
            DeformableEncoderLayer(conv_dim, num_heads, self.num_levels, num_points, ffn_dim, dropout, backend)
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
            lat = nn.Conv2d(in_channels[name], conv_dim, kernel_size=1, bias=use_bias)
            out = nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=use_bias)
            _c2_xavier_fill(lat)
            _c2_xavier_fill(out)
            self.lateral_convs.append(nn.Sequential(lat, _norm(norm, conv_dim)))
            self.output_convs.append(nn.Sequential(out, _norm(norm, conv_dim), nn.ReLU()))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _c2_xavier_fill(self.mask_features)
        self.conv_dim, self.mask_dim = conv_dim, mask_dim
        self.activation_checkpointing = False  # encoder layers; see m2f.models.checkpointing
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
def _(cfg: PixelDecoderCfg, in_channels: Dict[str, int], in_strides: Dict[str, int]) -> nn.Module:
    return MSDeformAttnPixelDecoder(
        in_channels, in_strides, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, norm=cfg.norm,
        num_encoder_layers=cfg.num_encoder_layers, num_heads=cfg.num_heads, num_points=cfg.num_points,
        ffn_dim=cfg.ffn_dim, dropout=cfg.dropout, backend=cfg.deform_attn_backend,
    )
