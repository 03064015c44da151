"""Training memory per image: one forward + loss + backward at batch 1, each configuration in a FRESH
process.

CUDA: ``torch.cuda.max_memory_allocated`` (+ NVML process memory when nvidia-ml-py is installed).
CPU (a measured stand-in, not the paper's GPU number): the peak of live tensor bytes of the step
from torch.profiler's allocation records, with peak RSS beside it.  ``run_memory`` measures the four
paper Table 5 variants (``loss.matching`` x ``loss.loss`` in {mask, point}); ``probe_memory`` one
config (the ablation runner's Table 5 column).
"""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from m2f.bench.common import environment, sync as _sync, synthetic_targets
from m2f.config import Config, apply_overrides, get_preset, to_dict

VARIANTS: List[Tuple[str, str]] = [("mask", "mask"), ("mask", "point"), ("point", "mask"), ("point", "point")]


PAPER_MEMORY_GB = {("mask", "mask"): 18, ("mask", "point"): 6, ("point", "mask"): 18, ("point", "point"): 6}



def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cpu_allocator_peak(fn: Callable[[], Any]) -> Tuple[Any, int]:
    """``(fn(), peak bytes)``: the peak of live CPU tensor memory while ``fn`` runs, above what was
    live before it, from the allocation/free records of torch.profiler (profile_memory=True).  The
    CPU counterpart of ``torch.cuda.max_memory_allocated() - memory_allocated()``: tensor memory
    only, without the C library's caching that peak RSS also counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in events:  # allocations positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return result, peak


def _nvml_process_bytes() -> Optional[int]:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        idx = torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == os.getpid():
                return int(p.usedGpuMemory or 0)
    except Exception:  # noqa: BLE001 - NVML is optional; report nothing rather than fail
        return None
    return None


def memory_worker(preset: Optional[str], size: int, matching: Optional[str], loss: Optional[str], device: str,
                  num_masks: int, overrides: Sequence[str] = (), threads: int = 0,
                  config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One variant, measured in THIS process (call it in a fresh one): peak training memory of one
    forward + loss + backward at batch 1.  Returns a dict of measured bytes.  ``config`` (a
    :func:`m2f.config.to_dict` dict) replaces ``preset`` + ``overrides``; ``matching`` / ``loss``
    None keep the config's."""
    from m2f.config import from_dict
    from m2f.loss import build_criterion
    from m2f.models.build import build_model
    from m2f.train import amp_context

    if threads:
        torch.set_num_threads(threads)
    cfg = from_dict(config) if config is not None else get_preset(preset, list(overrides))
    cfg = apply_overrides(cfg, {k: v for k, v in (("loss.matching", matching), ("loss.loss", loss)) if v})
    matching, loss = cfg.loss.matching, cfg.loss.loss
    amp = amp_context(cfg.solver, torch.device(device).type)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    criterion = build_criterion(cfg.loss, cfg.num_classes).to(device)
    x = torch.randn(1, 3, size, size, device=device)
    targets = [synthetic_targets(num_masks, cfg.num_classes, size, size, device)]
    gc.collect()
    out: Dict[str, Any] = {"matching": matching, "loss": loss, "size": size, "num_masks": num_masks}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    def step():
        with amp():  # as the trainer: bf16 autocast of the forward (solver.amp on CUDA; CPU: solver.amp_on_cpu)
            output = model(x)
        total = sum(criterion(output, targets).values())
        total.backward()
        _sync(device)
        return total

    t0 = time.perf_counter()
    if device.startswith("cuda"):
        total = step()
    else:
        total, allocator_peak = cpu_allocator_peak(step)
    out["step_s"] = time.perf_counter() - t0
    out["loss"] = loss
    out["total_loss"] = float(total.detach())
    out["amp"] = "bf16" if amp is not nullcontext else None
    if device.startswith("cuda"):
        out["method"] = "cuda max_memory_allocated - allocated before the step"
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        nv = _nvml_process_bytes()
        if nv is not None:
            out["nvml_process_bytes"] = nv
    else:
        out["method"] = "cpu stand-in: peak live tensor bytes of the step (torch.profiler memory records)"
        out["peak_bytes"] = allocator_peak
        out["rss_peak_bytes"] = _maxrss_bytes() - base  # peak RSS - RSS before the step (adds libc caching)
        out["rss_before_bytes"] = base
    return out


def _run_worker(args: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "m2f.bench", "_memory_worker", json.dumps(args)]
    root = str(Path(__file__).resolve().parents[2])  # the project root, which holds the m2f package
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"memory worker {args} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def probe_memory(cfg: Config, size: int, device: str = "cpu", num_masks: int = 20, fresh_process: bool = True,
                 timeout: float = 3600.0) -> Dict[str, Any]:
    """Training memory per image of ``cfg`` (one step at ``size`` x ``size``, batch 1, ``num_masks``
    synthetic target masks): :func:`memory_worker` in a fresh process (or in this one, e.g. in
    tests: the CPU figure is the allocator peak, which a used process measures as well)."""
    args = {"preset": None, "size": int(size), "matching": None, "loss": None, "device": device,
            "num_masks": int(num_masks), "config": to_dict(cfg)}
    return _run_worker(args, timeout) if fresh_process else memory_worker(**args)


def memory_ratios(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """full-mask / point ratios from the measured ``peak_bytes`` of one size's four variants."""
    by = {(r["matching"], r["loss"]): r["peak_bytes"] for r in rows}
    out: Dict[str, float] = {}
    if ("mask", "mask") in by and ("point", "point") in by:
        out["mask_mask_over_point_point"] = by[("mask", "mask")] / max(by[("point", "point")], 1)
    if ("point", "mask") in by and ("point", "point") in by:
        out["loss_mask_over_point@point_matching"] = by[("point", "mask")] / max(by[("point", "point")], 1)
    if ("mask", "mask") in by and ("mask", "point") in by:
        out["loss_mask_over_point@mask_matching"] = by[("mask", "mask")] / max(by[("mask", "point")], 1)
    return out


def run_memory(preset: str, sizes: Sequence[int], device: str, num_masks: int, overrides: Sequence[str] = (),
               threads: int = 0, timeout: float = 3600.0) -> Dict[str, Any]:
    results: Dict[str, Any] = {"kind": "memory", "preset": preset, "overrides": list(overrides),
                               "num_masks": num_masks, "sizes": {}, "environment": environment(device)}
    for size in sizes:
        rows = []
        for matching, loss in VARIANTS:
            r = _run_worker({"preset": preset, "size": size, "matching": matching, "loss": loss, "device": device,
                             "num_masks": num_masks, "overrides": list(overrides), "threads": threads}, timeout)
            r["paper_gb"] = PAPER_MEMORY_GB[(matching, loss)]
            rows.append(r)
            print(f"memory {size}px matching={matching} loss={loss}: {r['peak_bytes'] / 2**30:.3f} GiB "
                  f"({r['step_s']:.1f} s)", flush=True)
        results["sizes"][str(size)] = {"variants": rows, "ratios": memory_ratios(rows)}
    return results

