"""pytest-benchmark micro-benchmarks of the hot ops (CPU, R50-at-512 shapes scaled down to stay quick).

    python -m pytest benchmarks --benchmark-only
    M2F_BENCH_SHAPES=r50_512 python -m pytest benchmarks --benchmark-only -k deform   # full R50-at-512 levels

Deformable attention: the grid_sample reference (m2f_kernels.ms_deform_attn) vs the embedding_bag
gather the model runs (m2f.models.pixel_decoders.msdeform); masked cross-attention: explicit
softmax vs scaled_dot_product_attention; point sampling; the Hungarian matcher; a linear layer per GEMM
backend (m2f_kernels/cpu_gemm.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from m2f_kernels.ms_deform_attn import (ms_deform_attn_gather, ms_deform_attn_levels, ms_deform_attn_recompute,
                                    ms_deform_attn_reference)
from m2f.models.transformer_decoder import Attention, masked_attention_bias

torch.set_num_threads(1)  # the shared 2-core machine: one thread is the stable measurement

# MSDeformAttn encoder at 256x256 input: levels 8x8, 16x16, 32x32 (S = 1344 keys = queries);
# M2F_BENCH_SHAPES=r50_512: the R50 model at 512x512 (16x16, 32x32, 64x64: S = 5376), one encoder layer.
SHAPES = [(16, 16), (32, 32), (64, 64)] if os.environ.get("M2F_BENCH_SHAPES") == "r50_512" else [(8, 8), (16, 16), (32, 32)]
IMPLS = {"reference": ms_deform_attn_reference, "gather": ms_deform_attn_gather,
         "levels": ms_deform_attn_levels, "recompute": ms_deform_attn_recompute}
B, NH, DH, L, P = 1, 8, 32, 3, 4


def _deform_inputs(requires_grad: bool = False):
    g = torch.Generator().manual_seed(0)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(B, S, NH, DH, generator=g)
    loc = torch.rand(B, S, NH, L, P, 2, generator=g) * 1.2 - 0.1
    attn = torch.rand(B, S, NH, L, P, generator=g).softmax(-1)
    return [t.requires_grad_(requires_grad) for t in (value, loc, attn)]


@pytest.mark.parametrize("impl", ["reference", "gather", "levels"])
def test_deform_attn_forward(benchmark, impl):
    fn = IMPLS[impl]
    value, loc, attn = _deform_inputs()
    with torch.no_grad():
        out = benchmark(fn, value, SHAPES, loc, attn)
    assert out.shape == (B, loc.shape[1], NH * DH)


@pytest.mark.parametrize("impl", ["reference", "gather", "levels", "recompute"])
def test_deform_attn_forward_backward(benchmark, impl):
    fn = IMPLS[impl]
    value, loc, attn = _deform_inputs(requires_grad=True)

    def step():
        fn(value, SHAPES, loc, attn).sum().backward()
        return value.grad

    assert benchmark(step) is not None


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_masked_attention(benchmark, backend):
    """One masked cross-attention: 100 queries over the 1/8 level of a 512 input (64x64 keys)."""
    torch.manual_seed(0)
    C, Q, HW = 256, 100, 64
    attn = Attention(C, 8, backend=backend).eval()
    q, kv = torch.randn(1, Q, C), torch.randn(1, HW * HW, C)
    bias = masked_attention_bias(torch.randn(1, Q, 128, 128), [(HW, HW)], 0.5)
    with torch.no_grad():
        out, _ = benchmark(attn, q, kv, kv, bias)
    assert out.shape == (1, Q, C)


def test_point_sampling(benchmark):
    """Importance sampling of K = 12544 points on 20 matched masks (1/4 of a 512 input)."""
    from m2f.loss.point_sampling import calculate_uncertainty, point_sample, uncertainty_point_coords

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 1, 128, 128, generator=g)

    def run():
        coords = uncertainty_point_coords(logits, calculate_uncertainty, 12544, 3.0, 0.75, generator=g)
        return point_sample(logits, coords)

    assert benchmark(run).shape == (20, 1, 12544)


def test_hungarian_matcher(benchmark):
    """Point matching of 100 queries to 20 targets (512 input, K = 12544 points)."""
    from m2f.loss.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(0)
    cls = torch.randn(1, 100, 134, generator=g)
    masks = torch.randn(1, 100, 128, 128, generator=g)
    tgt = [{"labels": torch.randint(0, 133, (20,), generator=g), "masks": torch.rand(20, 512, 512, generator=g) > 0.5}]
    matcher = HungarianMatcher(mode="point")
    out = benchmark(matcher, cls, masks, tgt)
    assert len(out[0][0]) == 20


@pytest.mark.parametrize("backend", ["reference", "onednn"])
def test_linear_forward_backward(benchmark, backend):
    """The pixel decoder's FFN expansion (tokens x 256 -> 1024) forward + backward per GEMM backend
    (m2f_kernels/cpu_gemm.py; "reference" = F.linear, MKL on x86)."""
    from m2f_kernels.cpu_gemm import linear, onednn_available

    if backend == "onednn" and not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear op")
    g = torch.Generator().manual_seed(0)
    S = sum(h * w for h, w in SHAPES)
    x = torch.randn(S, 256, generator=g, requires_grad=True)
    w = torch.randn(1024, 256, generator=g, requires_grad=True)
    b = torch.zeros(1024, requires_grad=True)

    def step():
        linear(x, w, b, backend).sum().backward()
        return w.grad

    assert benchmark(step) is not None
