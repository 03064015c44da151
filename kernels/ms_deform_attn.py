"""Multi-scale deformable attention (Deformable DETR), the op the MSDeformAttn pixel decoder spends
most of its time in.

``ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, backend=...)``

Shapes (B batch, S = sum_l H_l * W_l flattened keys, nH heads, Dh channels per head, Q queries,
L levels, P points):
    value:              [B, S, nH, Dh]
    spatial_shapes:     sequence of L (H_l, W_l) python ints (no host sync to read them)
    sampling_locations: [B, Q, nH, L, P, 2]  normalised (x, y) in [0, 1]
    attention_weights:  [B, Q, nH, L, P]     (softmax over L*P done by the caller)
    returns             [B, Q, nH * Dh]

Semantics: bilinear sampling, zero padding outside the map, align_corners=False (pixel centres at
(i + 0.5) / size), as the official CUDA op and torch's grid_sample.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Readable PyTorch path (grid_sample); runs on any device, differentiable, any dtype."""
    B, S, nH, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    if sum(sizes) != S:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} cover {sum(sizes)} keys, value has {S}")
    values = value.split(sizes, dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # [B, H*W, nH, Dh] -> [B*nH, Dh, H, W]
        v = values[lvl].flatten(2).transpose(1, 2).reshape(B * nH, Dh, int(h), int(w))
        # [B, Q, nH, P, 2] -> [B*nH, Q, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> [B*nH, Dh, Q, P]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B, Q, nH, L, P] -> [B*nH, 1, Q, L*P]
    attn = attention_weights.transpose(1, 2).reshape(B * nH, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # [B*nH, Dh, Q]
    return out.view(B, nH * Dh, Q).transpose(1, 2).contiguous()


def resolve_backend(backend: str, device: "torch.device | str") -> str:
    """The implementation ``backend`` runs on ``device``: "auto" -> "triton" on CUDA with Triton,
    else "reference"; the others as named (for recording with results)."""
    if backend != "auto":
        return backend
    try:
        from kernels.ms_deform_attn_triton import triton_available
    except ImportError:
        return "reference"
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "reference"


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str = "reference",
) -> Tensor:
    """Dispatch on ``backend``: "reference", "triton" or "auto" (triton on CUDA when available)."""
    if backend == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    if backend in ("triton", "auto"):
        try:
            from kernels.ms_deform_attn_triton import ms_deform_attn_triton, triton_available
        except ImportError:
            if backend == "triton":
                raise
            return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
        if backend == "auto" and not (value.is_cuda and triton_available()):
            return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
        return ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)
    raise ValueError(f"unknown ms_deform_attn backend {backend!r}; valid choices: ['reference', 'triton', 'auto']")
