"""The FLOP floor of a training step: its counted FLOPs over the best GEMM rate measured on the machine.

FLOPs are counted, not estimated. :func:`m2f.bench.profile.count_step_flops` runs one training step
(forward, loss, backward; the parts of :func:`m2f.bench.profile.profile_step`) under
``torch.utils.flop_counter.FlopCounterMode``. It counts every matrix product, convolution and
attention product, forward and backward, at 2 FLOPs per multiply-add. The model is built with the
reference kernels (:data:`REFERENCE_KERNELS`: PyTorch's own ops, which the counter knows; the fused
kernels compute the same function) and without activation checkpointing (no recomputed forward).

Not counted: elementwise ops, norms, softmax, sampling (``grid_sample``), the matcher's assignment and
the optimizer. The floor is therefore a lower bound on any implementation of the step.

fvcore's count (:mod:`m2f.flops`, the paper's FLOPs column) is of the forward only, and counts a
multiply-add as ONE flop. Until 2026-12-07 ``bench speed`` took "3 x fvcore forward x batch" as the
step's work and divided it by a GEMM rate measured at 2 FLOPs per multiply-add: those floors were
about half of the true floor (the tiny preset at batch 4, 128 px: 13.9 "GFLOP" where the counter
finds 27.2).

The rate (:func:`peak_gemm_rate`) is the best float32 throughput of an n x n x n product, n = 1024 and
2048, at the current thread setting. On CPU it takes the better of ``torch.mm`` (the BLAS PyTorch was
built with) and oneDNN's linear op, whichever this CPU runs faster. It approximates what the cores
reach on large, well-shaped work. The convolutions of a ResNet at these sizes run near it.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, Optional, Sequence

import torch

from m2f_kernels.cpu_gemm import _mm_nt, onednn_available

# The kernel fields set for counting: each value is the plain PyTorch implementation of the same function.
REFERENCE_KERNELS: Dict[str, Any] = {
    "gemm_backend": "reference",
    "decoder.attention_backend": "reference",
    "pixel_decoder.deform_attn_backend": "reference",
    "backbone.activation_checkpointing": False,
    "pixel_decoder.activation_checkpointing": False,
}

COUNTER = ("torch.utils.flop_counter.FlopCounterMode over one training step (forward, loss, backward) with "
           "the reference kernels: matrix products, convolutions and attention, 2 FLOPs per multiply-add; "
           "elementwise ops, norms, sampling and the optimizer not counted (a lower bound)")


def flop_counter(enabled: bool):
    """A FlopCounterMode context that prints nothing, or a no-op context."""
    if not enabled:
        return nullcontext()
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


def peak_gemm_rate(device: str, sizes: Optional[Sequence[int]] = None, reps: int = 3) -> Dict[str, Any]:
    """The best measured float32 GEMM rate (GFLOP/s at 2 FLOPs per multiply-add) of n x n x n products
    at the current thread setting: ``{"gflops_per_s": best, "by_impl": {"mm_1024": ..., ...}}``; on
    CPU both ``torch.mm`` and oneDNN's linear op (when this build has it).  ``sizes``: n = 1024 and
    2048 on CPU, 4096 and 8192 on a GPU (smaller products leave a GPU idle)."""
    from m2f.bench.common import interleaved

    if sizes is None:
        sizes = (1024, 2048) if torch.device(device).type == "cpu" else (4096, 8192)
    onednn = torch.device(device).type == "cpu" and onednn_available()
    fns = {}
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
        fns[f"mm_{n}"] = lambda a=a, b=b: a @ b
        if onednn:
            fns[f"onednn_{n}"] = lambda a=a, b=b: _mm_nt(a, b)
    t = interleaved(fns, reps, device)  # one warm-up each, then the best of ``reps``
    by = {k: 2 * int(k.rsplit("_", 1)[1]) ** 3 / v["min_s"] / 1e9 for k, v in t.items()}
    return {"gflops_per_s": max(by.values()), "by_impl": by}


def floor_summary(flops: Dict[str, int], rate: Dict[str, Any], step_s: Dict[str, float]) -> Dict[str, Any]:
    """The floor of a step that counted ``flops`` (parts), at ``rate`` (:func:`peak_gemm_rate`), and
    each timed step's distance from it (``step_s``: {"m2f": seconds, ...})."""
    total = sum(flops.values())
    floor = total / 1e9 / rate["gflops_per_s"]
    return {"train_step_gflop": total / 1e9, "gflop_by_part": {k: v / 1e9 for k, v in flops.items()},
            "gemm_gflops_per_s": rate["gflops_per_s"], "gemm_by_impl": rate["by_impl"], "floor_s": floor,
            "share_of_peak": {k: floor / s for k, s in step_s.items() if s},
            "rule": f"counted step FLOPs / best measured float32 GEMM rate (n^3 products, n in "
                    f"{sorted({int(k.rsplit('_', 1)[1]) for k in rate['by_impl']})})", "counter": COUNTER}
