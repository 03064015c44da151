"""Benchmark multi-scale deformable attention: reference (grid_sample) vs Triton, forward and
forward+backward, at Mask2Former's pixel-decoder shapes, beside a memory-bandwidth lower bound.

    python -m m2f.bench kernels                       # CUDA: 1024x1024 input; CPU: reference at --size 256
    python -m m2f.bench kernels --size 512 --dtypes bfloat16 --iters 50
    python -m m2f.bench kernels --bandwidth-tbs 4.8   # H200's peak instead of H100's 3.35 TB/s
    python -m m2f.bench kernels --end-to-end          # + the R50 pixel decoder and a training step per backend

Shapes (Mask2Former's MSDeformAttn encoder, one layer): batch 2, levels at strides 8, 16, 32 of the input
(128^2 + 64^2 + 32^2 = 21504 keys at 1024x1024), every key is also a query, 256 channels in 8 heads,
4 points per level.  Writes ``reports/bench/kernels.json`` atomically (config, environment, one row per
backend x dtype, the bandwidth bound) and prints a table.

The bound counts compulsory traffic only: every input read once and every output written once (the
bilinear gathers are assumed to hit in L2); ``fraction_of_bound`` = bound time / measured time.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from m2f_kernels.ms_deform_attn import ms_deform_attn_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
H100_TBS = 3.35  # H100 SXM HBM3 peak, TB/s


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=None,
                   help="square input image side in pixels (default: 1024 on CUDA, 256 on CPU)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default %(default)s)")
    p.add_argument("--channels", type=int, default=256, help="model width (nH * Dh)")
    p.add_argument("--heads", type=int, default=8, help="attention heads nH (default %(default)s)")
    p.add_argument("--points", type=int, default=4, help="sampling points per level and head")
    p.add_argument("--strides", default="8,16,32", help="comma-separated feature strides, one level each")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, from {sorted(DTYPES)}")
    p.add_argument("--backends", default="reference,triton", help="comma-separated: reference, triton")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (compilation, caches)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--bandwidth-tbs", type=float, default=H100_TBS,
                   help="peak memory bandwidth in TB/s for the lower bound (default: H100 3.35)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    p.add_argument("--out", default="reports/bench/kernels.json", help="JSON report path (written atomically)")
    p.add_argument("--end-to-end", action="store_true",
                   help="also time the whole pixel decoder (fwd+bwd) and a training step (fwd+loss+bwd) of "
                        "--preset at --size and --batch, once per model backend (--model-backends)")
    p.add_argument("--preset", default="r50_coco_panoptic", help="model preset for --end-to-end")
    p.add_argument("--model-backends", default=None,
                   help="pixel_decoder.deform_attn_backend values compared by --end-to-end, the first is the "
                        "baseline (default: reference,triton on CUDA; reference,reference_recompute on CPU)")


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Validate and complete the parsed arguments (``p.error`` on bad ones)."""
    try:
        args.strides = [int(s) for s in args.strides.split(",") if s]
    except ValueError:
        p.error(f"--strides must be comma-separated integers, got {args.strides!r}")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.backends = [b for b in args.backends.split(",") if b]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; valid: {sorted(DTYPES)}")
    for b in args.backends:
        if b not in ("reference", "triton"):
            p.error(f"--backends: unknown backend {b!r}; valid: ['reference', 'triton']")
    if args.channels % args.heads:
        p.error(f"--channels {args.channels} is not divisible by --heads {args.heads}")
    for name in ("batch", "channels", "heads", "points", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not args.strides or min(args.strides) < 1:
        p.error("--strides must list positive integers")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.size is None:
        args.size = 1024 if args.device.startswith("cuda") else 256
    if args.size < max(args.strides):
        p.error(f"--size {args.size} is smaller than the largest stride {max(args.strides)}")
    if args.model_backends is None:
        args.model_backends = "reference,triton" if args.device.startswith("cuda") else "reference,reference_recompute"
    args.model_backends = [b for b in args.model_backends.split(",") if b]
    valid = ("reference", "reference_recompute", "triton", "auto")
    for b in args.model_backends:
        if b not in valid:
            p.error(f"--model-backends: unknown backend {b!r}; valid: {list(valid)}")
    return args


def environment(device: str) -> Dict[str, Any]:
    """:func:`m2f.provenance.environment` plus the Triton version, the GPU's SM count and a timestamp."""
    from m2f.provenance import environment as _environment

    env = _environment(device)
    env["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["device"] = props.name
        env["multiprocessors"] = props.multi_processor_count
    return env


def bandwidth_bound(B: int, S: int, Q: int, nH: int, Dh: int, L: int, P: int, elt: int, tbs: float) -> Dict[str, Any]:
    """Compulsory bytes of forward / backward and their time at ``tbs`` TB/s.

    forward reads value, locations, weights and writes the output; backward reads value, locations,
    weights, grad_out and writes the three gradients (all in the input dtype, ``elt`` bytes each).
    """
    value = B * S * nH * Dh * elt
    rows = B * Q * nH * L * P * elt  # attention weights; locations are twice this
    out = B * Q * nH * Dh * elt
    fwd = value + 3 * rows + out
    bwd = (value + 3 * rows + out) + (value + 3 * rows)
    bw = tbs * 1e12
    return {"peak_bandwidth_tbs": tbs, "forward_bytes": fwd, "backward_bytes": bwd,
            "forward_seconds": fwd / bw, "backward_seconds": bwd / bw,
            "forward_backward_seconds": (fwd + bwd) / bw}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], Any], device: str, iters: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronising around each call on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(fn: Callable[[], Any], device: str) -> Optional[float]:
    """Peak CUDA memory allocated by ``fn`` above what was live before it (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _inputs(B, S, Q, nH, Dh, L, P, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(B, S, nH, Dh, generator=g).to(device, dtype)
    loc = (torch.rand(B, Q, nH, L, P, 2, generator=g) * 1.2 - 0.1).to(device, dtype)
    attn = torch.rand(B, Q, nH, L * P, generator=g).softmax(-1).view(B, Q, nH, L, P).to(device, dtype)
    grad_out = torch.randn(B, Q, nH * Dh, generator=g).to(device, dtype)
    return value, loc, attn, grad_out


def _triton_skip_reason(device: str) -> Optional[str]:
    from m2f_kernels.ms_deform_attn import triton_available

    if not device.startswith("cuda"):
        return "triton backend is timed on CUDA only (the CPU interpreter is for correctness tests)"
    if not triton_available():
        return "triton not available"
    return None


def _bench_backend(fn, value, shapes, loc, attn, grad_out, bound, device, iters, warmup) -> Dict[str, Any]:
    """Forward (no grad) and forward+backward timings, peak memory and the fraction of the bound."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]

    def forward():
        with torch.no_grad():
            return fn(value, shapes, loc, attn)

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(leaves[0], shapes, leaves[1], leaves[2]).backward(grad_out)

    row: Dict[str, Any] = {"forward_ms": _time_ms(forward, device, iters, warmup),
                           "forward_backward_ms": _time_ms(forward_backward, device, iters, warmup),
                           "peak_memory_mib": _peak_mib(forward_backward, device)}
    row["fraction_of_bound"] = {
        "forward": bound["forward_seconds"] * 1e3 / row["forward_ms"],
        "forward_backward": bound["forward_backward_seconds"] * 1e3 / row["forward_backward_ms"]}
    return row


def run(args: argparse.Namespace) -> Dict[str, Any]:
    B, nH, P = args.batch, args.heads, args.points
    Dh = args.channels // nH
    shapes = [(math.ceil(args.size / s), math.ceil(args.size / s)) for s in args.strides]
    L = len(shapes)
    S = Q = sum(h * w for h, w in shapes)
    device = args.device
    report: Dict[str, Any] = {
        "kind": "kernels",
        "config": {"size": args.size, "batch": B, "channels": args.channels, "heads": nH, "head_dim": Dh,
                   "points": P, "strides": args.strides, "spatial_shapes": [list(s) for s in shapes],
                   "num_keys": S, "num_queries": Q, "iters": args.iters, "warmup": args.warmup,
                   "device": device, "timing": "median wall ms, synchronised"},
        "environment": environment(device),
        "bandwidth_bound": dict(bandwidth_bound(B, S, Q, nH, Dh, L, P, 4, args.bandwidth_tbs), dtype="float32"),
        "bandwidth_bound_by_dtype": {},
        "results": [],
    }
    fns = {"reference": ms_deform_attn_reference}
    skip = _triton_skip_reason(device) if "triton" in args.backends else None
    if "triton" in args.backends and skip is None:
        from m2f_kernels.ms_deform_attn import ms_deform_attn_triton

        fns["triton"] = ms_deform_attn_triton
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        elt = torch.empty((), dtype=dtype).element_size()
        bound = bandwidth_bound(B, S, Q, nH, Dh, L, P, elt, args.bandwidth_tbs)
        report["bandwidth_bound_by_dtype"][dname] = bound
        value, loc, attn, grad_out = _inputs(B, S, Q, nH, Dh, L, P, dtype, device, args.seed)
        outputs = {}
        for backend in args.backends:
            row: Dict[str, Any] = {"backend": backend, "dtype": dname}
            if backend not in fns:
                row["skipped"] = skip
                report["results"].append(row)
                continue
            with torch.no_grad():
                outputs[backend] = fns[backend](value, shapes, loc, attn).float()
            row.update(_bench_backend(fns[backend], value, shapes, loc, attn, grad_out, bound, device,
                                      args.iters, args.warmup))
            report["results"].append(row)
        if "reference" in outputs and "triton" in outputs:
            ref = outputs["reference"]
            err = ((outputs["triton"] - ref).abs().max() / ref.abs().max()).item()
            report.setdefault("parity_max_rel_error", {})[dname] = err
        del value, loc, attn, grad_out, outputs
    return report


def end_to_end(preset: str, size: int, batch: int, backends: Sequence[str], device: str, iters: int, warmup: int,
               seed: int = 0, num_masks: int = 20) -> Dict[str, Any]:
    """The pixel decoder's forward+backward and a training step (forward under the trainer's autocast,
    loss, backward; no optimiser) of ``preset`` with each deformable-attention backend; one model per
    backend, built from the config with the same weights loaded, and the same inputs.  Speed-ups are relative to
    ``backends[0]``; ``train_loss`` (one step, same point samples) checks the backends agree end to end."""
    from m2f.bench.common import synthetic_targets
    from m2f.config import get_preset
    from m2f.loss import build_criterion
    from m2f.models.build import build_model
    from m2f.train import amp_context

    cfg = get_preset(preset)
    amp = amp_context(cfg.solver, torch.device(device).type)
    torch.manual_seed(seed)
    first = build_model(cfg).to(device).train()
    models = {}
    for name in backends:  # the same weights in every backend's model
        m = build_model(get_preset(preset, [f"pixel_decoder.deform_attn_backend={name}"])).to(device).train()
        m.load_state_dict(first.state_dict())
        models[name] = m
    model = first
    criterion = build_criterion(cfg.loss, cfg.num_classes).to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    targets = [synthetic_targets(num_masks, cfg.num_classes, size, size, device, seed=seed + i) for i in range(batch)]
    with torch.no_grad(), amp():
        feats = {k: v.detach() for k, v in model.backbone(x).items()}

    def pixel_decoder_step():
        with amp():
            mask_features, multi_scale = model.pixel_decoder(feats)
        (mask_features.float().square().mean() + sum(f.float().square().mean() for f in multi_scale)).backward()

    def train_step():
        with amp():
            out = model(x)
        loss = sum(criterion(out, targets).values())
        loss.backward()
        return loss.detach()

    rows: Dict[str, Any] = {}
    for name in backends:
        model = models[name]
        torch.manual_seed(seed)  # the same point samples for every backend: the losses must agree
        row = {"train_loss": float(train_step())}
        for key, fn in (("pixel_decoder_fwd_bwd", pixel_decoder_step), ("train_step", train_step)):
            model.zero_grad(set_to_none=True)
            row[f"{key}_ms"] = _time_ms(fn, device, iters, warmup)
            row[f"{key}_peak_memory_mib"] = _peak_mib(fn, device)
        rows[name] = row
    base = backends[0]
    for name, row in rows.items():
        row["speedup_vs_" + base] = {k: rows[base][f"{k}_ms"] / row[f"{k}_ms"]
                                     for k in ("pixel_decoder_fwd_bwd", "train_step")}
    return {"preset": preset, "size": size, "batch": batch, "num_masks": num_masks,
            "amp": "bf16" if amp is not nullcontext else None, "baseline": base, "backends": rows}


def _print_end_to_end(e: Dict[str, Any]) -> None:
    print(f"end to end: {e['preset']} {e['size']}px batch {e['batch']} amp={e['amp']} (speed-up vs {e['baseline']})")
    for name, r in e["backends"].items():
        s = r["speedup_vs_" + e["baseline"]]
        print(f"  {name:<20} pixel decoder fwd+bwd {r['pixel_decoder_fwd_bwd_ms']:9.1f} ms "
              f"({s['pixel_decoder_fwd_bwd']:.2f}x)   train step {r['train_step_ms']:9.1f} ms ({s['train_step']:.2f}x)")


def _print_table(report: Dict[str, Any]) -> None:
    c = report["config"]
    print(f"ms_deform_attn  B={c['batch']} levels={c['spatial_shapes']} Q=S={c['num_queries']} "
          f"C={c['channels']} heads={c['heads']} points={c['points']}  on {report['environment']['device']}")
    print(f"{'backend':<10} {'dtype':<9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9} {'bound fwd+bwd':>14}")
    for r in report["results"]:
        if "skipped" in r:
            print(f"{r['backend']:<10} {r['dtype']:<9} skipped: {r['skipped']}")
            continue
        peak = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        bound_ms = report["bandwidth_bound_by_dtype"][r["dtype"]]["forward_backward_seconds"] * 1e3
        print(f"{r['backend']:<10} {r['dtype']:<9} {r['forward_ms']:>9.3f} {r['forward_backward_ms']:>11.3f} "
              f"{peak:>9} {bound_ms:>10.3f} ms ({100 * r['fraction_of_bound']['forward_backward']:.1f}%)")


def run_cli(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    report = run(args)
    if args.end_to_end:
        report["end_to_end"] = end_to_end(args.preset, args.size, args.batch, args.model_backends, args.device,
                                          args.iters, args.warmup, args.seed)
    from m2f.bench.report import write_result_path

    write_result_path(Path(args.out), report)  # + the folder's README and the project README's summary
    _print_table(report)
    if "end_to_end" in report:
        _print_end_to_end(report["end_to_end"])
    print(f"wrote {args.out}")
    return 0
