"""Where one m2f training step spends its time, part by part."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from m2f.bench.common import environment, sync as _sync, synthetic_targets
from m2f.config import get_preset

def profile_step(model, criterion, x: torch.Tensor, targets, device: str,
                 generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """One training step (no optimizer) with each part timed: the tensors between backbone, pixel
    decoder and transformer decoder are detached and re-joined in backward, so every part's
    forward and backward is measured alone; the parameters end with the usual gradients."""
    t: Dict[str, float] = {}

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        _sync(device)
        t0 = time.perf_counter()
        r = fn()
        _sync(device)
        t[key] = time.perf_counter() - t0
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
    losses = timed("loss", lambda: criterion(out, targets, generator=generator))
    timed("transformer_decoder_and_loss_backward", lambda: sum(losses.values()).backward())
    timed("pixel_decoder_backward", lambda: rejoin([mask_features, *multi_scale], [mf_in, *ms_in]))
    timed("backbone_backward", lambda: rejoin(list(feats.values()), list(f_in.values())))
    return t


def run_profile(preset: str, size: int, device: str, iters: int, num_masks: int, overrides: Sequence[str] = (),
                top: int = 12) -> Dict[str, Any]:
    """Where one m2f training step spends its time (:func:`profile_step`, median over ``iters``
    steps after a warm-up), plus torch.profiler's top ops (self CPU time) of one step."""
    from torch.profiler import profile

    from m2f.loss import build_criterion
    from m2f.models.build import build_model

    cfg = get_preset(preset, list(overrides))
    model = build_model(cfg).to(device).train()
    criterion = build_criterion(cfg.loss, cfg.num_classes).to(device)
    x = torch.randn(1, 3, size, size, device=device)
    tgt = [synthetic_targets(num_masks, cfg.num_classes, size, size, device)]

    def step() -> Dict[str, float]:
        t = profile_step(model, criterion, x, tgt, device)
        model.zero_grad(set_to_none=True)
        return t

    step()  # warm-up
    runs = [step() for _ in range(iters)]
    parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    with profile() as prof:
        step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"kind": "profile", "preset": preset, "overrides": list(overrides), "size": size, "iters": iters,
            "num_masks": num_masks, "environment": environment(device), "parts_median_s": parts,
            "step_total_s": sum(parts.values()),
            "top_ops_self_cpu_ms": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                                    for e in ops]}

