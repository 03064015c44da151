"""Shared pieces of the benchmarks: synthetic targets, device checks, interleaved timing."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import torch

from m2f.errors import InputError
from m2f.provenance import environment as _environment


def environment(device: str) -> Dict[str, Any]:
    """:func:`m2f.provenance.environment` with the benchmarked ``device`` named."""
    env = _environment(device)
    env["device"] = device  # what was benchmarked; the CPU model and ISA are in env["cpu"]
    return env


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_targets(num_masks: int, num_classes: int, height: int, width: int, device: str,
                      seed: int = 0) -> Dict[str, torch.Tensor]:
    """One image's targets: ``num_masks`` random ellipses (labels [N] int64, masks bool [N, H, W])."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    masks = []
    for _ in range(num_masks):
        cy, cx = torch.rand(2, generator=g) * torch.tensor([height, width])
        ry, rx = (0.05 + 0.3 * torch.rand(2, generator=g)) * torch.tensor([height, width])
        masks.append(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0)
    masks_t = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)
    labels = torch.randint(0, num_classes, (num_masks,), generator=g)
    return {"labels": labels.to(device), "masks": masks_t.to(device)}


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"--device: expected cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here")
    return device


def parse_sizes(text: str) -> List[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 32 or s % 32 for s in sizes):
        raise InputError(f"--sizes: expected positive multiples of 32, got {text!r}")
    return sizes


def _time(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: Dict[str, Callable[[], Any]], iters: int, device: str, warmup: int = 1) -> Dict[str, Dict]:
    """Time each callable ``iters`` times, interleaved (A, B, A, B; the starting one alternates so
    neither always runs first).  Returns per name {median_s, min_s, times_s}."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            _time(fns[n], device)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(iters):
        for n in (names if i % 2 == 0 else names[::-1]):
            times[n].append(_time(fns[n], device))
    return {n: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v} for n, v in times.items()}


def gib(b: float) -> str:
    return f"{b / 2**30:.3f}"

