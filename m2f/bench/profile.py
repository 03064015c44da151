"""Where one m2f training step spends its time, part by part."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from m2f.bench.common import environment, sync as _sync, synthetic_targets
from m2f.config import get_preset

def profile_step(model, criterion, x: torch.Tensor, targets, device: str,
                 generator: Optional[torch.Generator] = None,
                 flops: Optional[Dict[str, int]] = None) -> Dict[str, float]:
    """One training step (no optimizer) with each part timed: the tensors between backbone, pixel
    decoder and transformer decoder are detached and re-joined in backward, so every part's
    forward and backward is measured alone; the parameters end with the usual gradients.  With a
    ``flops`` dict, each part also runs under a FLOP counter and its count is stored under the part's
    key (:mod:`m2f.bench.floor`; the times of such a step include the counter's overhead)."""
    from m2f.bench.floor import flop_counter

    t: Dict[str, float] = {}

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        _sync(device)
        t0 = time.perf_counter()
        with flop_counter(flops is not None) as fc:
            r = fn()
        _sync(device)
        t[key] = time.perf_counter() - t0
        if flops is not None:
            flops[key] = fc.get_total_flops()
        return r

    def cut(v: torch.Tensor) -> torch.Tensor:
        return v.detach().requires_grad_()

    def rejoin(outs: Sequence[torch.Tensor], ins: Sequence[torch.Tensor]) -> None:
        pairs = [(o, i.grad) for o, i in zip(outs, ins) if i.grad is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    feats = timed("backbone_forward", lambda: model.backbone(x))
    f_in = {k: cut(v) for k, v in feats.items()}
    mask_features, multi_scale = timed("pixel_decoder_forward", lambda: model.pixel_decoder(f_in))
    mf_in, ms_in = cut(mask_features), [cut(m) for m in multi_scale]
    out = timed("transformer_decoder_forward", lambda: model.transformer_decoder(ms_in, mf_in))
    def loss():
        with torch.profiler.record_function("m2f.loss"):  # the matcher / point-sampling shares are of this scope
            return criterion(out, targets, generator=generator)

    losses = timed("loss", loss)
    timed("transformer_decoder_and_loss_backward", lambda: sum(losses.values()).backward())
    timed("pixel_decoder_backward", lambda: rejoin([mask_features, *multi_scale], [mf_in, *ms_in]))
    timed("backbone_backward", lambda: rejoin(list(feats.values()), list(f_in.values())))
    return t


def count_step_flops(cfg, x: torch.Tensor, targets, device: str) -> Dict[str, int]:
    """FLOPs of each part of one training step of ``cfg``'s model on ``x`` / ``targets`` (the keys of
    :func:`profile_step`: ``backbone_forward`` ... ``backbone_backward``), counted
    with the reference kernels (:data:`m2f.bench.floor.REFERENCE_KERNELS`).  The model is built fresh (random
    weights and loss points from a fixed seed: a few products of the backward have shapes that
    depend on the predictions, about 0.1% of the step's FLOPs)."""
    from m2f.bench.floor import REFERENCE_KERNELS
    from m2f.config import apply_overrides
    from m2f.loss import build_criterion
    from m2f.models.build import build_model

    ref = apply_overrides(cfg, REFERENCE_KERNELS)
    flops: Dict[str, int] = {}
    with torch.random.fork_rng(devices=[]):  # the same weights and loss points on every call
        torch.manual_seed(0)
        model = build_model(ref).to(device).train()
        criterion = build_criterion(ref.loss, ref.num_classes).to(device)
        profile_step(model, criterion, x, targets, device, flops=flops)
    return flops


def _data_time(cfg, batch: int, reps: int = 3) -> Dict[str, Any]:
    """Seconds to load and collate one training batch of the preset's data (median), as the trainer
    does it in its own process (num_workers=0); None with the reason when the data is not at hand."""
    from functools import partial

    from m2f.data.catalog import get_dataset
    from m2f.data.collate import collate

    try:
        ds = get_dataset(cfg.data.train, "train", cfg)
    except Exception as e:  # noqa: BLE001 -- a benchmark of the step must not need the dataset
        return {"s": None, "why": f"{cfg.data.train!r} not available: {str(e).splitlines()[0][:120]}"}
    col = partial(collate, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
                  size_divisibility=cfg.data.size_divisibility)
    times = []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        col([ds[(r * batch + i) % len(ds)] for i in range(batch)])
        times.append(time.perf_counter() - t0)
    return {"s": statistics.median(times[1:]), "dataset": cfg.data.train}


def _headroom(parts: Dict[str, float], flops: Dict[str, int]) -> Dict[str, Any]:
    """The step if every counted part ran at the rate the backbone reached (forward and backward
    together: large convolutions, the best-shaped work of the step) and did nothing but its counted
    FLOPs; data and optimizer as measured.  What an implementation of the same function could
    reach with this CPU's kernels: a target for speed work, not a promise."""
    bb = ("backbone_forward", "backbone_backward")
    if not all(parts.get(k) for k in bb):
        return {}
    rate = sum(flops[k] for k in bb) / 1e9 / sum(parts[k] for k in bb)
    step = sum(parts[k] for k in bb) + sum(parts.get(k, 0.0) for k in ("data", "optimizer_step")) \
        + sum(v / 1e9 / rate for k, v in flops.items() if k not in bb)
    return {"backbone_gflops_per_s": rate, "step_s": step,
            "rule": "every counted part at the backbone's measured GFLOP/s; data and optimizer as measured"}


def run_profile(preset: str, size: int, device: str, iters: int, num_masks: int, overrides: Sequence[str] = (),
                top: int = 12, batch: int = 1) -> Dict[str, Any]:
    """Where one m2f training step spends its time (:func:`profile_step`, median over ``iters``
    steps after a warm-up; ``batch`` images of ``size``), with the optimizer step (the trainer's AdamW
    and parameter groups), the data (one batch of the preset's dataset) and, from torch.profiler on
    one more step, the loss's matcher and point-sampling shares, the Python/framework overhead (wall
    time not inside any operator) and the top ops (self CPU time)."""
    from torch.profiler import profile

    from m2f.loss import build_criterion
    from m2f.models.build import build_model
    from m2f.train import param_groups, resolve_optimizer_impl

    cfg = get_preset(preset, list(overrides))
    model = build_model(cfg).to(device).train()
    criterion = build_criterion(cfg.loss, cfg.num_classes).to(device)
    impl = resolve_optimizer_impl(cfg.solver.optimizer_impl, device)
    opt = torch.optim.AdamW(param_groups(model, cfg.solver), lr=cfg.solver.lr, weight_decay=cfg.solver.weight_decay,
                            **{impl: True})
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    tgt = [synthetic_targets(num_masks, cfg.num_classes, size, size, device, seed=i) for i in range(batch)]

    def step() -> Dict[str, float]:
        t = profile_step(model, criterion, x, tgt, device)
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        t["optimizer_step"] = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return t

    step()  # warm-up
    runs = [step() for _ in range(iters)]
    parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    from m2f.bench.floor import floor_summary, peak_gemm_rate

    counted = count_step_flops(cfg, x, tgt, device)
    rate = peak_gemm_rate(device)
    # each timed part against its own counted FLOPs: which parts run near the GEMM rate and which
    # are bound by something else (small ops, memory, Python)
    gflops_per_s = {k: counted[k] / 1e9 / parts[k] for k in counted if parts.get(k)}
    data = _data_time(cfg, batch)
    if data["s"] is not None:
        parts["data"] = data["s"]
    total = sum(parts.values())
    with profile() as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    scope = {e.key: e.cpu_time_total for e in events if e.key.startswith("m2f.")}
    op_self = sum(e.self_cpu_time_total for e in events if not e.key.startswith(("m2f.", "ProfilerStep")))
    loss_split = {}
    # matcher and point sampling (nested in the loss, disjoint) as shares of the profiled step's loss,
    # applied to the unprofiled loss time: their sum stays below it, however loaded the machine is
    prof_total_us = wall * 1e6
    for key in ("m2f.matcher", "m2f.point_sampling"):
        if key in scope and scope.get("m2f.loss"):
            loss_split[key.split(".", 1)[1]] = scope[key] / scope["m2f.loss"] * parts["loss"]
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"kind": "profile", "preset": preset, "overrides": list(overrides), "size": size, "batch": batch,
            "iters": iters, "num_masks": num_masks, "environment": environment(device), "parts_median_s": parts,
            "step_total_s": total, "optimizer_impl": impl, "data": data,
            "loss_split_s": loss_split,
            "flop_floor": {**floor_summary(counted, rate, {"m2f": total}),
                           "part_gflops_per_s": gflops_per_s, "headroom": _headroom(parts, counted)},
            "python_overhead_share": max(0.0, 1 - op_self / prof_total_us),
            "profiled_step_s": wall,
            "top_ops_self_cpu_ms": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                                    for e in ops]}
