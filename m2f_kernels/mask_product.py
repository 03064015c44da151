"""The mask head's product: mask logits = ``einsum("bqc,bchw->bqhw", embed, features)``.

:func:`mask_product_reference` is the specification (the einsum).  :func:`mask_product` is the fast
path with the same function (:class:`_MaskProduct`): an autograd function whose CPU backward
multiplies only the queries that receive a gradient, with its products through the CPU GEMM backend
(:mod:`m2f_kernels.cpu_gemm`), and which keeps channels-last features' layout.  Under ``torch.jit.trace``
(fvcore's FLOP count) the einsum runs, which tracers see into.  Nothing here imports m2f.
"""
from __future__ import annotations

import torch
from torch import Tensor

from m2f_kernels.cpu_gemm import bmm_nt


def mask_product_reference(embed: Tensor, features: Tensor) -> Tensor:
    """embed [B, Q, C], features [B, C, H, W] -> mask logits [B, Q, H, W]."""
    return torch.einsum("bqc,bchw->bqhw", embed, features)


class _MaskProduct(torch.autograd.Function):
    """``einsum("bqc,bchw->bqhw", embed, features)``, the mask head's product, with a backward that
    skips queries whose gradient is all zero.

    The losses reach the mask logits only through the *matched* queries (the masked attention's
    mask is detached, the matcher runs without grad), so most rows of the incoming gradient are zero
    (e.g. 80 of 100 with 20 targets).  On CPU the backward computes both products over the union of
    nonzero rows of the batch: the result is the dense one up to float summation order (skipped rows
    contribute exact zeros), for about (rows kept / Q) of the two [C, Q] x [Q, HW] products.
    On other devices (finding the rows would synchronise with the host) and under ``create_graph``
    the plain dense products run.  Under autocast the products run in the gradient's dtype, as
    autocast's own ``bmm`` does.

    Layout: with channels-last features (the pixel decoders' convolutions on a channels-last
    backbone) the logits come out channels-last too ([B, H, W, Q] in memory, one [HW, C] x [C, Q]
    product without a copy of the features), and the features' gradient is returned in their
    layout.  Downstream, ``F.interpolate`` of channels-last logits (the masked attention's resizing)
    runs without the two layout copies it makes of NCHW input on CPU (~4 ms each call at 512 px)."""

    @staticmethod
    def forward(ctx, embed: Tensor, features: Tensor, backend: str) -> Tensor:
        ctx.save_for_backward(embed, features)
        ctx.backend = backend
        B, C, H, W = features.shape
        Q = embed.shape[1]
        if _channels_inner(features):  # [B, HW, C] x [B, C, Q] -> [B, HW, Q], viewed [B, Q, H, W]
            out = bmm_nt(features.permute(0, 2, 3, 1).reshape(B, H * W, C), embed, backend)
            return out.view(B, H, W, Q).permute(0, 3, 1, 2)
        return bmm_nt(embed, features.reshape(B, C, H * W).transpose(1, 2), backend).view(B, Q, H, W)

    @staticmethod
    def backward(ctx, grad: Tensor):
        embed, features = ctx.saved_tensors
        B, C, H, W = features.shape
        Q = embed.shape[1]
        g = grad.reshape(B, Q, H * W)
        e = embed.to(g.dtype)
        cl = _channels_inner(features)
        f = (features.permute(0, 2, 3, 1).reshape(B, H * W, C).transpose(1, 2) if cl
             else features.reshape(B, C, H * W)).to(g.dtype)  # [B, C, HW] (a view when possible)
        rows = None
        if g.device.type == "cpu" and not torch.is_grad_enabled():
            live = g.ne(0).any(2).any(0).nonzero().squeeze(1)  # [R]
            if live.numel() < Q:
                rows = live
                g, e = g[:, rows], e[:, rows]  # [B, R, HW], [B, R, C]
        # create_graph: plain differentiable bmm; else the GEMM backend's products
        backend = "reference" if torch.is_grad_enabled() else ctx.backend
        grad_e = grad_f = None
        if ctx.needs_input_grad[0]:
            grad_e = bmm_nt(g, f, backend)  # [B, R, HW] x [B, HW, C] -> [B, R, C]
            if rows is not None:
                full = grad_e.new_zeros(B, Q, C)
                full[:, rows] = grad_e
                grad_e = full
            grad_e = grad_e.to(embed.dtype)
        if ctx.needs_input_grad[1]:
            if cl:  # [B, HW, R] x [B, R, C] -> [B, HW, C]: the features' channels-last layout
                grad_f = bmm_nt(g.transpose(1, 2), e.transpose(1, 2), backend).view(B, H, W, C).permute(0, 3, 1, 2)
            else:
                grad_f = bmm_nt(e.transpose(1, 2), g.transpose(1, 2), backend).view(B, C, H, W)
            grad_f = grad_f.to(features.dtype)
        return grad_e, grad_f, None


def _channels_inner(x: Tensor) -> bool:
    """[B, C, H, W] stored channels-last (channels innermost), more than one channel and pixel."""
    return x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def mask_product(embed: Tensor, features: Tensor, gemm_backend: str = "reference") -> Tensor:
    """Mask logits [B, Q, H, W] = ``einsum("bqc,bchw->bqhw", embed [B, Q, C], features [B, C, H, W])``
    (:class:`_MaskProduct`: the backward skips queries without gradient; the products through
    ``gemm_backend``, m2f_kernels/cpu_gemm.py).  Under ``torch.jit.trace`` (fvcore's FLOP count) the
    plain einsum, which tracers see into."""
    if torch.jit.is_tracing():
        return mask_product_reference(embed, features)
    return _MaskProduct.apply(embed, features, gemm_backend)
