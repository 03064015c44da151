"""float32 CPU GEMMs: the BLAS behind ``torch.mm`` / ``F.linear`` vs oneDNN's linear op
(m2f_kernels/cpu_gemm.py) on the model's linear-layer shapes, forward and both gradients, interleaved in
one process; GFLOP/s (best of ``--iters``), the ratio, and each one's error against the
float64 product.  Also one R50 training step with ``gemm_backend`` reference vs auto (``--step``).

    python -m m2f.bench gemm --threads 1 [--step] [--out reports/bench/gemm_cpu.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

# (M, K, N): rows (tokens / pixels) x input features -> output features, at 512 px, batch 1
SHAPES = [
    (5376, 256, 1024), (5376, 1024, 256), (5376, 256, 256), (5376, 256, 192),  # msdeform encoder
    (4096, 256, 256), (100, 256, 2048), (100, 2048, 256), (100, 256, 256),  # transformer decoder
    (16384, 256, 64), (16384, 64, 256), (4096, 512, 128), (1024, 1024, 256), (256, 2048, 512),  # 1x1 convs
]


def _best(fn: Callable[[], Any], iters: int) -> float:
    fn()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_table(iters: int, shapes: Sequence[tuple] = SHAPES) -> List[Dict[str, Any]]:
    from m2f_kernels.cpu_gemm import _mm_nt, _weight_grad

    rows = []
    g = torch.Generator().manual_seed(0)
    for M, K, N in shapes:
        x, w, gy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(M, N, generator=g)
        flop = 2.0 * M * K * N
        pairs = {"forward x W^T": (lambda: x @ w.t(), lambda: _mm_nt(x, w)),
                 "input grad g W": (lambda: gy @ w, lambda: _mm_nt(gy, w.t())),
                 "weight grad g^T x": (lambda: gy.t() @ x, lambda: _weight_grad(gy, x))}
        for op, (blas, dnn) in pairs.items():
            tb, td = _best(blas, iters), _best(dnn, iters)
            # accuracy: max |error| against the float64 product, relative to its max |value|
            exact = {"forward x W^T": lambda: x.double() @ w.double().t(), "input grad g W": lambda: gy.double() @ w.double(),
                     "weight grad g^T x": lambda: gy.double().t() @ x.double()}[op]()
            scale = float(exact.abs().max())
            rows.append({"M": M, "K": K, "N": N, "op": op, "blas_gflops": flop / tb / 1e9,
                         "onednn_gflops": flop / td / 1e9, "onednn_speedup": tb / td,
                         "blas_rel_err": float((blas().double() - exact).abs().max()) / scale,
                         "onednn_rel_err": float((dnn().double() - exact).abs().max()) / scale})
    return rows


def step_times(preset: str, size: int, iters: int) -> Dict[str, float]:
    """Median training step (forward, loss, backward) with gemm_backend reference vs oneDNN (the
    ``auto_s`` key: what ``auto`` runs where it picks oneDNN), alternating; ``auto_here`` = what
    ``auto`` resolves to on this CPU."""
    import statistics

    from m2f.bench.common import synthetic_targets
    from m2f.config import get_preset
    from m2f.loss import build_criterion
    from m2f.models.build import build_model

    models = {}
    for backend in ("reference", "auto"):  # one model per backend, the same weights
        torch.manual_seed(0)
        # "auto" is timed as oneDNN, what it picks on the CPUs where it picks it (m2f_kernels/cpu_gemm.py)
        impl = "onednn" if backend == "auto" else backend
        models[backend] = build_model(get_preset(preset, [f"gemm_backend={impl}"])).train()
    models["auto"].load_state_dict(models["reference"].state_dict())
    cfg = get_preset(preset)
    crit = build_criterion(cfg.loss, cfg.num_classes)
    x = torch.randn(1, 3, size, size)
    tgt = [synthetic_targets(20, cfg.num_classes, size, size, "cpu")]

    def step(model):
        sum(crit(model(x), tgt).values()).backward()
        model.zero_grad(set_to_none=True)

    times: Dict[str, List[float]] = {"reference": [], "auto": []}
    for _ in range(iters + 1):
        for backend in times:
            t0 = time.perf_counter()
            step(models[backend])
            times[backend].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # first round: warm-up
    from m2f_kernels.cpu_gemm import resolve_for_device

    return {"preset": preset, "size": size, "reference_s": med["reference"], "auto_s": med["auto"],
            "speedup": med["reference"] / med["auto"], "auto_timed_as": "onednn",
            "auto_here": resolve_for_device("auto", "cpu")}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=int, default=5, help="timed repetitions per shape (best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0 = leave)")
    p.add_argument("--step", action="store_true", help="also time an R50 training step per backend")
    p.add_argument("--size", type=int, default=512, help="image size for --step")
    p.add_argument("--out", default=None, help="JSON report path (written atomically)")


def run_cli(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from m2f_kernels.cpu_gemm import onednn_available
    from m2f.provenance import cpu_info, environment

    if not onednn_available():
        print("this PyTorch build has no working oneDNN linear op: nothing to compare")
        return 1
    rows = gemm_table(args.iters)
    print(f"{'M':>6} {'K':>5} {'N':>5}  {'op':<18} {'BLAS':>7} {'oneDNN':>7}  GFLOP/s  speed-up  rel. error BLAS / oneDNN")
    for r in rows:
        print(f"{r['M']:6d} {r['K']:5d} {r['N']:5d}  {r['op']:<18} {r['blas_gflops']:7.1f} {r['onednn_gflops']:7.1f}"
              f"           {r['onednn_speedup']:.2f}x     {r['blas_rel_err']:.1e} / {r['onednn_rel_err']:.1e}")
    result: Dict[str, Any] = {"kind": "gemm", "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "cpu": cpu_info()["model"], "blas": "torch.mm (MKL on x86)", "rows": rows,
                              "environment": environment("cpu")}
    if args.step:
        result["step"] = step_times("r50_coco_panoptic", args.size, max(1, args.iters // 2))
        s = result["step"]
        print(f"training step {s['size']}px: reference {s['reference_s']:.2f} s, auto {s['auto_s']:.2f} s "
              f"-> {s['speedup']:.2f}x")
    if args.out:
        from m2f.bench.report import write_result_path

        write_result_path(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0
