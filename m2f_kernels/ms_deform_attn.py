"""Multi-scale deformable attention (Deformable DETR), the op the MSDeformAttn pixel decoder spends
most of its time in: the readable reference, the fast paths and the one dispatch, in this file.

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

Implementations (``BACKENDS``; the config field ``pixel_decoder.deform_attn_backend``):

- :func:`ms_deform_attn_reference`: the specification, per-level ``grid_sample`` + weighted sum; any
  device and dtype, differentiable.  Every other path is tested against it.
- ``"reference"``: pure-PyTorch formulations of the same function.  Without autograd,
  :func:`ms_deform_attn_gather` folds the bilinear and attention weights into one ``embedding_bag``
  gather-and-sum (no [B*nH, Dh, Q, L*P] sample tensor); with autograd :func:`ms_deform_attn_levels`
  accumulates the weighted sum level by level (:class:`_SampleWeightedSum`; embedding_bag's own
  backward sorts its indices and is slower).
- ``"reference_recompute"``: trades time for memory: the gather runs forward keeping only its inputs
  and the backward recomputes the levels formulation (:func:`ms_deform_attn_recompute`).
- ``"triton"``: the Triton kernels below (CUDA, or CPU under Triton's interpreter).
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton runs here, else ``"reference"``.

Nothing here imports m2f: m2f_kernels/ is a leaf package.

Triton kernels
--------------
:func:`m2f_kernels.ms_deform_attn.ms_deform_attn_reference`).

:func:`ms_deform_attn_triton` has the
reference's semantics and shapes (B batch, S = sum_l H_l * W_l keys, nH heads, Dh channels per head,
Q queries, L levels, P points):

    value:              [B, S, nH, Dh]           fp32 / bf16 / fp16
    spatial_shapes:     sequence of L (H_l, W_l) python ints
    sampling_locations: [B, Q, nH, L, P, 2]      normalised (x, y); pixel coords are x * W_l - 0.5
    attention_weights:  [B, Q, nH, L, P]
    returns             [B, Q, nH * Dh]          in value's dtype

Bilinear sampling with zero padding outside each map, align_corners=False (as grid_sample and the
official CUDA op).  Accumulation is fp32 throughout; the value gradient is accumulated with fp32 atomic
adds (several queries sample the same pixel) and cast to value's dtype at the end; the location and
attention-weight gradients have one writer per element, so they are plain stores.

On a pixel centre (an integer pixel coordinate) bilinear sampling has a kink: the location gradient is
one-sided, and which side depends on how the coordinate rounds.  This kernel computes x * W_l - 0.5
(as the official CUDA op); grid_sample unnormalises 2x - 1, so the two can land on different sides.
Mask2Former's encoder starts with EVERY sampling point on a pixel centre (reference points at centres,
offsets initialised to whole pixels), so step 0's gradient of ``sampling_offsets`` differs between this
backend and the reference (both valid subgradients); off the kinks they agree
(``tests/test_kernels.py::test_model_step_triton_backend_matches_reference``).

Kernel layout (both directions): one program per (query block, head, batch) -- grid axis 0 is the query
block because it is the only axis that can be large.  A program holds a [BLOCK_Q, BLOCK_D] tile
(BLOCK_D = Dh rounded up to a power of two, masked) and loops over levels and points.  The loops are
deliberately not unrolled: unrolled, ptxas hoists all 4 * L * P gathers and spills (255 registers).
Level shapes and start offsets come from a small cached int32 table, so no host sync and no
recompilation per image size.

Runs on CUDA, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton
is imported), which is how the tests check it on a machine without a GPU.  Importing this module without
triton installed works; :func:`triton_available` then returns False.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("reference", "reference_recompute", "triton", "auto")


# ---------------------------------------------------------------------------------------------
# The specification
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch fast paths ("reference", "reference_recompute")
# ---------------------------------------------------------------------------------------------
def ms_deform_attn_gather(value: Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: Tensor,
                          attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention as one weighted gather (``F.embedding_bag``, mode "sum").

    Same shapes and semantics as ``m2f_kernels.ms_deform_attn.ms_deform_attn_reference``:
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


# ---------------------------------------------------------------------------------------------
# Triton ("triton"): the kernels, their autograd function and checks
# ---------------------------------------------------------------------------------------------
try:  # triton is optional: the reference path needs none of this
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _HAS_TRITON = False


def _interpreter_active() -> bool:
    """True when triton's CPU interpreter will run our kernels (the env var is read at @triton.jit time)."""
    if not _HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_ms_deform_attn_fwd_kernel, InterpretedFunction)


def triton_available() -> bool:
    """Triton importable and able to run here: a CUDA device, or the CPU interpreter active."""
    if not _HAS_TRITON:
        return False
    return _interpreter_active() or torch.cuda.is_available()


if _HAS_TRITON:

    @triton.jit
    def _bilinear_corners(loc_ptr, loc_off, mask_q, Hl, Wl):
        """Pixel-space bilinear setup for one (level, point) of a query block.

        loc_off: [BLOCK_Q] element offset of x (y follows).  Returns the four corner key indices within
        the level (y * W + x, int32), their validity masks, the fractional parts (lx, ly) and x, y (fp32).
        """
        x = tl.load(loc_ptr + loc_off, mask=mask_q, other=0.0).to(tl.float32)
        y = tl.load(loc_ptr + loc_off + 1, mask=mask_q, other=0.0).to(tl.float32)
        wf = Wl.to(tl.float32)
        hf = Hl.to(tl.float32)
        # align_corners=False: pixel centre i sits at (i + 0.5) / size.  Clamping to [-2, size + 1] keeps
        # the int conversion finite; beyond -1 / size every corner is outside, so the result is unchanged.
        px = tl.minimum(tl.maximum(x * wf - 0.5, -2.0), wf + 1.0)
        py = tl.minimum(tl.maximum(y * hf - 0.5, -2.0), hf + 1.0)
        x0f = tl.floor(px)
        y0f = tl.floor(py)
        lx = px - x0f
        ly = py - y0f
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        x1 = x0 + 1
        y1 = y0 + 1
        vx0 = (x0 >= 0) & (x0 < Wl)
        vx1 = (x1 >= 0) & (x1 < Wl)
        vy0 = (y0 >= 0) & (y0 < Hl)
        vy1 = (y1 >= 0) & (y1 < Hl)
        m00 = mask_q & vy0 & vx0
        m01 = mask_q & vy0 & vx1
        m10 = mask_q & vy1 & vx0
        m11 = mask_q & vy1 & vx1
        k00 = y0 * Wl + x0
        k01 = k00 + 1
        k10 = k00 + Wl
        k11 = k10 + 1
        return k00, k01, k10, k11, m00, m01, m10, m11, lx, ly

    @triton.jit
    def _ms_deform_attn_fwd_kernel(
        value_ptr,  # [B, S, NH, DH]
        levels_ptr,  # [L, 3] int32: (H, W, start)
        loc_ptr,  # [B, Q, NH, L, P, 2]
        attn_ptr,  # [B, Q, NH, L, P]
        out_ptr,  # [B, Q, NH, DH]
        Q,
        S,
        NH: tl.constexpr,
        DH: tl.constexpr,
        L: tl.constexpr,
        P: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
        offs_d = tl.arange(0, BLOCK_D)  # [BD]
        mask_q = offs_q < Q
        if BLOCK_D == DH:  # no channel padding: a constant mask lets the gathers vectorise along Dh
            mask_d = tl.full([BLOCK_D], 1, tl.int1)
        else:
            mask_d = offs_d < DH
        qh = (b * Q + offs_q) * NH + h  # [BQ] int64: row of (b, q, h) in loc / attn / out
        v_base = value_ptr + b * S * NH * DH + h * DH  # value[b, 0, h, 0]
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for lvl in range(L):
            Hl = tl.load(levels_ptr + 3 * lvl)
            Wl = tl.load(levels_ptr + 3 * lvl + 1)
            start = tl.load(levels_ptr + 3 * lvl + 2)
            for pt in range(P):
                lp = lvl * P + pt
                a = tl.load(attn_ptr + qh * (L * P) + lp, mask=mask_q, other=0.0).to(tl.float32)  # [BQ]
                k00, k01, k10, k11, m00, m01, m10, m11, lx, ly = _bilinear_corners(
                    loc_ptr, (qh * (L * P) + lp) * 2, mask_q, Hl, Wl)
                hx = 1.0 - lx
                hy = 1.0 - ly
                # [BQ, BD] gathers; masked corners (outside the map) read as zero padding
                v00 = tl.load(v_base + (start + k00)[:, None] * (NH * DH) + offs_d[None, :],
                              mask=m00[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
                v01 = tl.load(v_base + (start + k01)[:, None] * (NH * DH) + offs_d[None, :],
                              mask=m01[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
                v10 = tl.load(v_base + (start + k10)[:, None] * (NH * DH) + offs_d[None, :],
                              mask=m10[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
                v11 = tl.load(v_base + (start + k11)[:, None] * (NH * DH) + offs_d[None, :],
                              mask=m11[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
                acc += (a * hy * hx)[:, None] * v00 + (a * hy * lx)[:, None] * v01 \
                    + (a * ly * hx)[:, None] * v10 + (a * ly * lx)[:, None] * v11
        out_ptrs = out_ptr + qh[:, None] * DH + offs_d[None, :]
        tl.store(out_ptrs, acc, mask=mask_q[:, None] & mask_d[None, :])

    @triton.jit
    def _ms_deform_attn_bwd_kernel(
        value_ptr,  # [B, S, NH, DH]
        levels_ptr,  # [L, 3] int32: (H, W, start)
        loc_ptr,  # [B, Q, NH, L, P, 2]
        attn_ptr,  # [B, Q, NH, L, P]
        grad_out_ptr,  # [B, Q, NH, DH]
        grad_value_ptr,  # [B, S, NH, DH] fp32, zero-initialised, atomic adds
        grad_loc_ptr,  # [B, Q, NH, L, P, 2] fp32
        grad_attn_ptr,  # [B, Q, NH, L, P] fp32
        Q,
        S,
        NH: tl.constexpr,
        DH: tl.constexpr,
        L: tl.constexpr,
        P: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        mask_q = offs_q < Q
        if BLOCK_D == DH:  # no channel padding: a constant mask lets the gathers vectorise along Dh
            mask_d = tl.full([BLOCK_D], 1, tl.int1)
        else:
            mask_d = offs_d < DH
        qh = (b * Q + offs_q) * NH + h
        v_base = value_ptr + b * S * NH * DH + h * DH
        gv_base = grad_value_ptr + b * S * NH * DH + h * DH
        go = tl.load(grad_out_ptr + qh[:, None] * DH + offs_d[None, :],
                     mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # [BQ, BD]
        for lvl in range(L):
            Hl = tl.load(levels_ptr + 3 * lvl)
            Wl = tl.load(levels_ptr + 3 * lvl + 1)
            start = tl.load(levels_ptr + 3 * lvl + 2)
            for pt in range(P):
                lp = lvl * P + pt
                a = tl.load(attn_ptr + qh * (L * P) + lp, mask=mask_q, other=0.0).to(tl.float32)
                k00, k01, k10, k11, m00, m01, m10, m11, lx, ly = _bilinear_corners(
                    loc_ptr, (qh * (L * P) + lp) * 2, mask_q, Hl, Wl)
                hx = 1.0 - lx
                hy = 1.0 - ly
                m00d = m00[:, None] & mask_d[None, :]
                m01d = m01[:, None] & mask_d[None, :]
                m10d = m10[:, None] & mask_d[None, :]
                m11d = m11[:, None] & mask_d[None, :]
                o00 = (start + k00)[:, None] * (NH * DH) + offs_d[None, :]
                o01 = (start + k01)[:, None] * (NH * DH) + offs_d[None, :]
                o10 = (start + k10)[:, None] * (NH * DH) + offs_d[None, :]
                o11 = (start + k11)[:, None] * (NH * DH) + offs_d[None, :]
                v00 = tl.load(v_base + o00, mask=m00d, other=0.0).to(tl.float32)
                v01 = tl.load(v_base + o01, mask=m01d, other=0.0).to(tl.float32)
                v10 = tl.load(v_base + o10, mask=m10d, other=0.0).to(tl.float32)
                v11 = tl.load(v_base + o11, mask=m11d, other=0.0).to(tl.float32)
                # d out / d value[corner] = a * w_corner  (scattered: many queries hit one pixel)
                ga = go * a[:, None]  # [BQ, BD]
                tl.atomic_add(gv_base + o00, ga * (hy * hx)[:, None], mask=m00d, sem="relaxed")
                tl.atomic_add(gv_base + o01, ga * (hy * lx)[:, None], mask=m01d, sem="relaxed")
                tl.atomic_add(gv_base + o10, ga * (ly * hx)[:, None], mask=m10d, sem="relaxed")
                tl.atomic_add(gv_base + o11, ga * (ly * lx)[:, None], mask=m11d, sem="relaxed")
                # d out / d a = sampled value
                sampled = hy[:, None] * (hx[:, None] * v00 + lx[:, None] * v01) \
                    + ly[:, None] * (hx[:, None] * v10 + lx[:, None] * v11)
                g_attn = tl.sum(go * sampled, axis=1)  # [BQ]
                # d sampled / d lx, d ly; pixel = loc * size - 0.5 so d pixel / d loc = size
                dlx = hy[:, None] * (v01 - v00) + ly[:, None] * (v11 - v10)
                dly = hx[:, None] * (v10 - v00) + lx[:, None] * (v11 - v01)
                g_x = a * tl.sum(go * dlx, axis=1) * Wl.to(tl.float32)
                g_y = a * tl.sum(go * dly, axis=1) * Hl.to(tl.float32)
                tl.store(grad_attn_ptr + qh * (L * P) + lp, g_attn, mask=mask_q)
                tl.store(grad_loc_ptr + (qh * (L * P) + lp) * 2, g_x, mask=mask_q)
                tl.store(grad_loc_ptr + (qh * (L * P) + lp) * 2 + 1, g_y, mask=mask_q)


_LEVEL_TABLES: Dict[Tuple[Tuple[Tuple[int, int], ...], str], Tensor] = {}


def _level_table(shapes: Tuple[Tuple[int, int], ...], device: torch.device) -> Tensor:
    """[L, 3] int32 (H, W, start offset), cached per (shapes, device): one H2D copy per image size."""
    key = (shapes, str(device))
    table = _LEVEL_TABLES.get(key)
    if table is None:
        rows, start = [], 0
        for h, w in shapes:
            rows.append((h, w, start))
            start += h * w
        table = torch.tensor(rows, dtype=torch.int32, device=device)
        if len(_LEVEL_TABLES) > 256:  # many distinct image sizes (e.g. eval at native size): stay bounded
            _LEVEL_TABLES.clear()
        _LEVEL_TABLES[key] = table
    return table


def _launch_params(Q: int, Dh: int) -> Tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_D, num_warps): a 2048-element fp32 tile per program, 8 elements a thread, on GPU
    (sm_90 offline compile at Dh=32: forward 70 / backward 128 registers, no spills); tiny in the interpreter."""
    block_d = triton.next_power_of_2(Dh)
    if _interpreter_active():
        block_q = min(16, triton.next_power_of_2(max(Q, 1)))
        return block_q, block_d, 1
    block_q = max(1, min(64, 2048 // block_d))
    block_q = min(block_q, max(16, triton.next_power_of_2(max(Q, 1))))
    num_warps = max(1, min(8, block_q * block_d // 256))
    return block_q, block_d, num_warps


def _check_inputs(value: Tensor, shapes: Tuple[Tuple[int, int], ...], loc: Tensor, attn: Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, nH, Dh], got shape {tuple(value.shape)}")
    B, S, nH, Dh = value.shape
    if loc.dim() != 6 or loc.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be [B, Q, nH, L, P, 2], got {tuple(loc.shape)}")
    _, Q, _, L, P, _ = loc.shape
    if tuple(loc.shape[:3]) != (B, Q, nH) or len(shapes) != L:
        raise ValueError(f"sampling_locations {tuple(loc.shape)} do not match value {tuple(value.shape)} "
                         f"and {len(shapes)} spatial_shapes")
    if tuple(attn.shape) != (B, Q, nH, L, P):
        raise ValueError(f"attention_weights must be {(B, Q, nH, L, P)}, got {tuple(attn.shape)}")
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"spatial_shapes {list(shapes)} cover {sum(h * w for h, w in shapes)} keys, value has {S}")
    if S * nH * Dh >= 2**31:
        raise ValueError(f"value has {S * nH * Dh} elements per image; the kernel indexes them with int32")
    if value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"value dtype {value.dtype} unsupported; expected float32, float16 or bfloat16")
    devices = {t.device for t in (value, loc, attn)}
    if len(devices) != 1:
        raise ValueError(f"value, sampling_locations and attention_weights on different devices: {devices}")
    if value.is_cuda == _interpreter_active():
        where = "CPU tensors (TRITON_INTERPRET=1 is set)" if _interpreter_active() else "CUDA tensors"
        raise ValueError(f"ms_deform_attn_triton needs {where}; got tensors on {value.device}")


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper; inputs are contiguous and validated by :func:`ms_deform_attn_triton`."""

    @staticmethod
    def forward(ctx, value: Tensor, levels: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        B, S, nH, Dh = value.shape
        _, Q, _, L, P, _ = loc.shape
        out = torch.empty(B, Q, nH, Dh, device=value.device, dtype=value.dtype)
        block_q, block_d, warps = _launch_params(Q, Dh)
        grid = (triton.cdiv(Q, block_q), nH, B)
        if Q > 0 and B > 0:
            _ms_deform_attn_fwd_kernel[grid](value, levels, loc, attn, out, Q, S, NH=nH, DH=Dh, L=L, P=P,
                                             BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(value, levels, loc, attn)
        return out.view(B, Q, nH * Dh)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, levels, loc, attn = ctx.saved_tensors
        B, S, nH, Dh = value.shape
        _, Q, _, L, P, _ = loc.shape
        grad_out = grad_out.contiguous()  # [B, Q, nH * Dh]
        grad_value = torch.zeros(B, S, nH, Dh, device=value.device, dtype=torch.float32)
        grad_loc = torch.empty(loc.shape, device=loc.device, dtype=torch.float32)
        grad_attn = torch.empty(attn.shape, device=attn.device, dtype=torch.float32)
        block_q, block_d, warps = _launch_params(Q, Dh)
        grid = (triton.cdiv(Q, block_q), nH, B)
        if Q > 0 and B > 0:
            _ms_deform_attn_bwd_kernel[grid](value, levels, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
                                             Q, S, NH=nH, DH=Dh, L=L, P=P, BLOCK_Q=block_q, BLOCK_D=block_d,
                                             num_warps=warps)
        return grad_value.to(value.dtype), None, grad_loc.to(loc.dtype), grad_attn.to(attn.dtype)


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Triton multi-scale deformable attention; same contract as ``ms_deform_attn_reference``.

    value [B, S, nH, Dh], sampling_locations [B, Q, nH, L, P, 2], attention_weights [B, Q, nH, L, P]
    -> [B, Q, nH * Dh] in value's dtype.  Differentiable w.r.t. all three tensors (gradients returned in
    each input's dtype).  Needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    if not _HAS_TRITON:
        raise ImportError("triton is not installed; use backend='reference'")
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    levels = _level_table(shapes, value.device)
    return _MSDeformAttnFunction.apply(value.contiguous(), levels, sampling_locations.contiguous(),
                                       attention_weights.contiguous())


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"pixel_decoder.deform_attn_backend: {backend!r} is not a backend; "
                         f"valid choices: {list(BACKENDS)}")
    if backend == "triton" and not _HAS_TRITON:
        raise ValueError("pixel_decoder.deform_attn_backend: 'triton' asked for, but triton is not installed; "
                         "use 'auto' or 'reference'")
    return backend


def resolve_backend(backend: str, device: "torch.device | str") -> str:
    """The implementation ``backend`` runs on ``device``: "auto" -> "triton" on CUDA with Triton,
    else "reference"; the others as named (for recording with results)."""
    if backend != "auto":
        return backend
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "reference"


def ms_deform_attn(value: Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: Tensor,
                   attention_weights: Tensor, backend: str = "reference") -> Tensor:
    """Multi-scale deformable attention through ``backend`` (module docstring); shapes as
    :func:`ms_deform_attn_reference`."""
    impl = resolve_backend(check_backend(backend), value.device)
    if impl == "triton":
        return ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (value, sampling_locations, attention_weights))
    if not needs_grad:
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "reference_recompute":
        return ms_deform_attn_recompute(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_levels(value, spatial_shapes, sampling_locations, attention_weights)


__all__ = ["BACKENDS", "ms_deform_attn", "ms_deform_attn_reference", "ms_deform_attn_gather", "ms_deform_attn_levels",
           "ms_deform_attn_recompute", "ms_deform_attn_triton", "resolve_backend", "triton_available"]
