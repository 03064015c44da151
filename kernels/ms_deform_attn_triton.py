"""Triton multi-scale deformable attention, forward and backward (the fast path beside
:func:`kernels.ms_deform_attn.ms_deform_attn_reference`).

``ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)`` has the
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

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor

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


__all__ = ["ms_deform_attn_triton", "triton_available"]
