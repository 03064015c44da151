"""Benchmarks: training memory per image and speed / FLOPs side by side with HF transformers.

    python -m m2f.bench memory --sizes 512,1024 --device cpu --out reports/bench
    python -m m2f.bench speed --preset r50_coco_panoptic --size 512 --iters 5 --out reports/bench

``memory``: peak training memory (forward + loss + backward, batch 1, ``--num-masks`` target
masks) for each paper Table 5 variant (``loss.matching`` x ``loss.loss`` in {mask, point}), each
variant in a FRESH subprocess.  CUDA: ``torch.cuda.max_memory_allocated`` (+ NVML process memory
when nvidia-ml-py is installed).  CPU (a measured stand-in, not the paper's GPU number): peak RSS
of the worker (``ru_maxrss``) minus its resident set just before the step.  Ratios
full-mask / point are computed from those measured values.

``speed``: m2f and HF's ``Mask2FormerForUniversalSegmentation`` built with the same config, HF's
random weights converted with :func:`m2f.convert.from_hf` (both compute the same function), timed
in ONE process, interleaved (A, B, A, B, ...; median and min): training iterations/s
(forward + own loss + backward + AdamW step) and inference images/s (batch 1, eval, panoptic
post-processing included as the paper's fps: :func:`m2f.inference.postprocess` / HF's
``post_process_panoptic_segmentation``).  FLOPs with fvcore (:func:`m2f.flops.count_flops`).

Results: ``<out>/<name>.json`` (atomic) with the environment, and ``<out>/README.md`` re-rendered
from every JSON there (the profile notes in ``<out>/NOTES.md`` are kept above the tables).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from m2f.checkpoint import atomic_write_json, atomic_write_text
from m2f.config import EXECUTION_ONLY, Config, apply_overrides, get_preset, list_presets, to_dict
from m2f.errors import InputError

VARIANTS: List[Tuple[str, str]] = [("mask", "mask"), ("mask", "point"), ("point", "mask"), ("point", "point")]
PAPER_MEMORY_GB = {("mask", "mask"): 18, ("mask", "point"): 6, ("point", "mask"): 18, ("point", "point"): 6}


# ----------------------------------------------------------------------------------------------
# Environment, inputs
# ----------------------------------------------------------------------------------------------
def environment(device: str) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).resolve().parent.parent, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return env


def _sync(device: str) -> None:
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


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"--device: expected cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here")
    return device


def _parse_sizes(text: str) -> List[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 32 or s % 32 for s in sizes):
        raise InputError(f"--sizes: expected positive multiples of 32, got {text!r}")
    return sizes


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
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
    root = str(Path(__file__).resolve().parent.parent)
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


# ----------------------------------------------------------------------------------------------
# Speed (m2f vs HF)
# ----------------------------------------------------------------------------------------------
_HF_RESNETS = {
    "resnet18": ([2, 2, 2, 2], [64, 128, 256, 512], "basic"),
    "resnet34": ([3, 4, 6, 3], [64, 128, 256, 512], "basic"),
    "resnet50": ([3, 4, 6, 3], [256, 512, 1024, 2048], "bottleneck"),
    "resnet101": ([3, 4, 23, 3], [256, 512, 1024, 2048], "bottleneck"),
}


def hf_model_for(cfg: Config):
    """HF Mask2FormerForUniversalSegmentation with ``cfg``'s architecture (random weights, offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    if cfg.backbone.kind not in _HF_RESNETS:
        raise InputError(f"bench speed: backbone.kind={cfg.backbone.kind!r}; the HF comparison supports "
                         f"{sorted(_HF_RESNETS)}")
    depths, widths, layer_type = _HF_RESNETS[cfg.backbone.kind]
    bc = ResNetConfig(depths=depths, hidden_sizes=widths, layer_type=layer_type,
                      out_features=["stage1", "stage2", "stage3", "stage4"],
                      downsample_in_bottleneck=not cfg.backbone.stride_in_3x3)
    d, p, l = cfg.decoder, cfg.pixel_decoder, cfg.loss
    hcfg = Mask2FormerConfig(
        backbone_config=bc, num_labels=cfg.num_classes, use_pretrained_backbone=False, feature_size=p.conv_dim,
        mask_feature_size=p.mask_dim, hidden_dim=d.hidden_dim, encoder_layers=p.num_encoder_layers,
        encoder_feedforward_dim=p.ffn_dim, dim_feedforward=d.ffn_dim, num_queries=d.num_queries,
        decoder_layers=d.num_layers + 1, num_attention_heads=d.num_heads, dropout=0.0, pre_norm=d.pre_norm,
        train_num_points=l.num_points, oversample_ratio=l.oversample_ratio,
        importance_sample_ratio=l.importance_sample_ratio, class_weight=l.class_weight, mask_weight=l.mask_weight,
        dice_weight=l.dice_weight, no_object_weight=l.no_object_weight)
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(hcfg)


def _freeze_hf_batchnorm(hf) -> None:
    """Frozen BN as the official / m2f backbone: BN modules in eval mode, affine not trained."""
    for m in hf.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            for prm in m.parameters():
                prm.requires_grad_(False)


def _time(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
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


# Config fields that change how m2f computes, not what: carried from the preset into the model
# converted from HF (whose conversion fixes everything else).
EXECUTION_SWITCHES = ("decoder.attention_backend", "pixel_decoder.deform_attn_backend", *EXECUTION_ONLY)


def _get(cfg: Config, path: str) -> Any:
    for k in path.split("."):
        cfg = getattr(cfg, k)
    return cfg


def run_speed(preset: str, size: int, device: str, iters: int, num_masks: int, overrides: Sequence[str] = (),
              flops: bool = True, train: bool = True, infer: bool = True, amp: bool = False) -> Dict[str, Any]:
    """m2f vs HF transformers (the same weights), interleaved.  ``amp``: both models' forwards under
    bf16 autocast (as training runs on GPUs; the losses stay fp32), else both in fp32."""
    from m2f.convert import from_hf
    from m2f.loss import build_criterion
    from m2f.models.build import build_model

    cfg0 = get_preset(preset, list(overrides))
    hf = hf_model_for(cfg0)
    converted, cfg = from_hf(hf)
    # from_hf fixes the architecture and the weights; the preset's execution switches (kernel backends,
    # activation checkpointing) are applied by building the model from the merged config.
    cfg = apply_overrides(cfg, {p: _get(cfg0, p) for p in EXECUTION_SWITCHES})
    model = build_model(cfg)
    model.load_state_dict(converted.state_dict())
    hf, model = hf.to(device), model.to(device)
    x = torch.randn(1, 3, size, size, device=device, generator=None)
    tgt = synthetic_targets(num_masks, cfg.num_classes, size, size, device)
    dev_type = torch.device(device).type
    ac = (lambda: torch.autocast(device_type=dev_type, dtype=torch.bfloat16)) if amp else nullcontext
    res: Dict[str, Any] = {"kind": "speed", "preset": preset, "overrides": list(overrides), "size": size,
                           "iters": iters, "num_masks": num_masks, "amp": "bf16" if amp else None,
                           "environment": environment(device),
                           "m2f_config": to_dict(cfg)}
    # Same function check (eval, the final prediction).
    model.eval(), hf.eval()
    with torch.no_grad():
        diff = (model(x).mask_logits - hf(pixel_values=x).masks_queries_logits).abs().max()
    res["max_abs_diff_mask_logits"] = float(diff)

    if infer:
        from m2f.inference import postprocess
        from transformers import Mask2FormerImageProcessor

        n_thing = max(1, int(round(cfg.num_classes * 80 / 133)))  # COCO's thing share
        is_thing = torch.arange(cfg.num_classes) < n_thing
        stuff = set(range(n_thing, cfg.num_classes))
        proc = Mask2FormerImageProcessor()
        ic = cfg.inference
        kept: Dict[str, int] = {}

        def m2f_infer():
            with torch.no_grad():
                with ac():
                    out = model(x)
                r = postprocess(out, [(size, size)], [(size, size)], ic, is_thing, tasks=("panoptic",))
            kept["m2f"] = len(r[0]["panoptic_seg"][1])

        def hf_infer():
            with torch.no_grad():
                with ac():
                    out = hf(pixel_values=x)
                r = proc.post_process_panoptic_segmentation(
                    out, threshold=ic.object_mask_threshold, mask_threshold=0.5,
                    overlap_mask_area_threshold=ic.overlap_threshold, label_ids_to_fuse=stuff,
                    target_sizes=[(size, size)])
            kept["hf"] = len(r[0]["segments_info"])

        t = interleaved({"m2f": m2f_infer, "hf": hf_infer}, iters, device)
        res["inference"] = {
            **{k: {**v, "images_per_s": 1.0 / v["median_s"]} for k, v in t.items()},
            "ratio_m2f_over_hf": t["hf"]["median_s"] / t["m2f"]["median_s"],
            "ratio_min_m2f_over_hf": t["hf"]["min_s"] / t["m2f"]["min_s"],
            "segments_kept": kept,
            "postprocess": "m2f.inference.postprocess(panoptic) / HF post_process_panoptic_segmentation",
        }
        print(f"inference {size}px: m2f {t['m2f']['median_s']:.3f} s, HF {t['hf']['median_s']:.3f} s "
              f"-> m2f/HF speed {res['inference']['ratio_m2f_over_hf']:.2f}x", flush=True)

    if train:
        criterion = build_criterion(cfg.loss, cfg.num_classes).to(device)
        model.train(), hf.train()
        _freeze_hf_batchnorm(hf)
        opt_m = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
        opt_h = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

        def m2f_step():
            with ac():
                out = model(x)
            losses = criterion(out, [tgt])
            sum(losses.values()).backward()
            opt_m.step()
            opt_m.zero_grad(set_to_none=True)

        def hf_step():
            with ac():  # HF computes its loss inside the forward: under autocast too
                out = hf(pixel_values=x, mask_labels=[tgt["masks"].float()], class_labels=[tgt["labels"]])
            out.loss.backward()
            opt_h.step()
            opt_h.zero_grad(set_to_none=True)

        t = interleaved({"m2f": m2f_step, "hf": hf_step}, iters, device)
        res["train"] = {
            **{k: {**v, "iters_per_s": 1.0 / v["median_s"]} for k, v in t.items()},
            "ratio_m2f_over_hf": t["hf"]["median_s"] / t["m2f"]["median_s"],
            "ratio_min_m2f_over_hf": t["hf"]["min_s"] / t["m2f"]["min_s"],
            "step": "forward + own loss + backward + AdamW step (HF: its loss via mask_labels/class_labels)",
        }
        print(f"train step {size}px: m2f {t['m2f']['median_s']:.3f} s, HF {t['hf']['median_s']:.3f} s "
              f"-> m2f/HF speed {res['train']['ratio_m2f_over_hf']:.2f}x", flush=True)

    if flops:
        from m2f.flops import count_flops

        f = count_flops(cfg, size, size)
        res["flops"] = {"gflops": f["gflops"], "params": f["params"], "gflops_by_part": f["gflops_by_part"],
                        "skipped_ops": f["skipped_ops"]}
    return res


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


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _gib(b: float) -> str:
    return f"{b / 2**30:.3f}"


def render_readme(out_dir: Path) -> str:
    """Markdown from every result JSON in ``out_dir`` (NOTES.md, if present, goes first)."""
    out_dir = Path(out_dir)
    parts = ["# Benchmarks (generated by `python -m m2f.bench`; do not edit, edit NOTES.md)\n"]
    notes = out_dir / "NOTES.md"
    if notes.exists():
        parts.append(notes.read_text().rstrip() + "\n")
    for path in sorted(out_dir.glob("*.json")):
        r = json.loads(path.read_text())
        env = r.get("environment", {})
        envs = (f"device {env.get('device')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
                f"threads {env.get('threads')}, transformers {env.get('transformers')}, commit "
                f"{str(env.get('git_commit', ''))[:10]}")
        if r.get("kind") == "speed":
            parts.append(f"## Speed `{path.name}`: {r['preset']} {r['size']}x{r['size']}, "
                         f"{r['iters']} interleaved reps, {'bf16 autocast' if r.get('amp') else 'fp32'}\n\n"
                         f"{envs}; max |m2f - HF| mask logit "
                         f"{r.get('max_abs_diff_mask_logits', float('nan')):.1e}\n")
            parts.append("| measure | m2f median (min) s | HF median (min) s | m2f / HF speed (median; min) |")
            parts.append("|---|---|---|---|")
            for key, unit in (("inference", "images/s"), ("train", "iters/s")):
                if key in r:
                    m, h = r[key]["m2f"], r[key]["hf"]
                    parts.append(f"| {key} ({unit}: m2f {1 / m['median_s']:.3f}, HF {1 / h['median_s']:.3f}) | "
                                 f"{m['median_s']:.3f} ({m['min_s']:.3f}) | {h['median_s']:.3f} ({h['min_s']:.3f}) | "
                                 f"**{r[key]['ratio_m2f_over_hf']:.2f}x**; {r[key]['ratio_min_m2f_over_hf']:.2f}x |")
            if "flops" in r:
                f = r["flops"]
                parts.append(f"\nFLOPs (fvcore, m2f): {f['gflops']:.1f} G, params {f['params'] / 1e6:.1f} M; by part "
                             + ", ".join(f"{k} {v:.1f}G" for k, v in f["gflops_by_part"].items())
                             + f"; not counted: {sorted(f['skipped_ops'])}")
            parts.append("")
        elif r.get("kind") == "memory":
            parts.append(f"## Training memory `{path.name}`: {r['preset']}, batch 1, {r['num_masks']} target "
                         f"masks\n\n{envs}\n")
            amp = {v.get("amp") for s in r["sizes"].values() for v in s["variants"]}
            if r.get("overrides"):
                parts.append("Overrides: " + ", ".join(f"`{o}`" for o in r["overrides"]) + "\n")
            parts.append(f"Autocast: {', '.join(str(a) for a in sorted(amp, key=str))}\n")
            parts.append("| size | matching -> loss | measured GiB | peak RSS GiB (CPU) | method | paper (V100, per image) |")
            parts.append("|---|---|---|---|---|---|")
            for size, s in r["sizes"].items():
                for v in s["variants"]:
                    rss = _gib(v["rss_peak_bytes"]) if "rss_peak_bytes" in v else "-"
                    parts.append(f"| {size} | {v['matching']} -> {v['loss']} | {_gib(v['peak_bytes'])} | {rss} | "
                                 f"{v['method']} | {v['paper_gb']} GB |")
            for size, s in r["sizes"].items():
                rs = ", ".join(f"{k} = {v:.2f}" for k, v in s["ratios"].items())
                parts.append(f"\n{size}px ratios (full-mask / point, paper 3.0): {rs}")
            parts.append("")
        elif "bandwidth_bound" in r and "results" in r:  # python -m kernels.bench
            c = r.get("config") or {}
            parts.append(f"## Deformable attention kernels `{path.name}`: batch {c.get('batch')}, {c.get('size')}px, "
                         f"levels {c.get('spatial_shapes')}, {c.get('channels')} channels, {c.get('heads')} heads, "
                         f"{c.get('points')} points\n\n{envs}\n")
            parts.append("| backend | dtype | fwd ms | fwd+bwd ms | peak MiB | fwd+bwd share of the bandwidth bound |")
            parts.append("|---|---|---|---|---|---|")
            for x in r["results"]:
                if "skipped" in x:
                    parts.append(f"| {x['backend']} | {x['dtype']} | skipped: {x['skipped']} | | | |")
                    continue
                peak = "-" if x.get("peak_memory_mib") is None else f"{x['peak_memory_mib']:.0f}"
                parts.append(f"| {x['backend']} | {x['dtype']} | {x['forward_ms']:.3f} | {x['forward_backward_ms']:.3f} | "
                             f"{peak} | {100 * x['fraction_of_bound']['forward_backward']:.1f}% |")
            e = r.get("end_to_end")
            if e:
                parts.append(f"\nEnd to end ({e['preset']} {e['size']}px batch {e['batch']}, autocast {e['amp']}; "
                             f"speed-up vs {e['baseline']}): " + "; ".join(
                                 f"{n}: pixel decoder fwd+bwd {b['pixel_decoder_fwd_bwd_ms']:.1f} ms "
                                 f"({b['speedup_vs_' + e['baseline']]['pixel_decoder_fwd_bwd']:.2f}x), training step "
                                 f"{b['train_step_ms']:.1f} ms ({b['speedup_vs_' + e['baseline']]['train_step']:.2f}x), "
                                 f"loss {b['train_loss']:.4f}" for n, b in e["backends"].items()))
            parts.append("")
        elif r.get("kind") == "profile":
            parts.append(f"## Training-step profile `{path.name}`: {r['preset']} {r['size']}x{r['size']}, median of "
                         f"{r['iters']} steps\n\n{envs}\n")
            parts.append("| part | s | share |")
            parts.append("|---|---|---|")
            order = ["backbone_forward", "pixel_decoder_forward", "transformer_decoder_forward", "loss",
                     "transformer_decoder_and_loss_backward", "pixel_decoder_backward", "backbone_backward"]
            for k, v in sorted(r["parts_median_s"].items(), key=lambda kv: (order + [kv[0]]).index(kv[0])):
                parts.append(f"| {k} | {v:.3f} | {100 * v / r['step_total_s']:.0f}% |")
            parts.append("\nTop ops of one step (self CPU): " + ", ".join(
                f"{o['op']} {o['self_cpu_ms']:.0f} ms ({o['calls']})" for o in r["top_ops_self_cpu_ms"]))
            parts.append("")
        elif r.get("kind") == "gemm":  # python -m kernels.bench_gemm
            parts.append(f"## float32 GEMMs `{path.name}`: {r.get('blas')} vs oneDNN, {r.get('threads')} thread(s)\n\n"
                         f"cpu {r.get('cpu')}, torch {r.get('torch')}; best of the timed repetitions\n")
            parts.append("| M | K | N | product | BLAS GFLOP/s | oneDNN GFLOP/s | speed-up | max rel. error vs float64 "
                         "BLAS / oneDNN |")
            parts.append("|---|---|---|---|---|---|---|---|")
            for x in r.get("rows", []):
                err = (f"{x['blas_rel_err']:.1e} / {x['onednn_rel_err']:.1e}" if "blas_rel_err" in x else "—")
                parts.append(f"| {x['M']} | {x['K']} | {x['N']} | {x['op']} | {x['blas_gflops']:.0f} | "
                             f"{x['onednn_gflops']:.0f} | {x['onednn_speedup']:.2f}x | {err} |")
            st = r.get("step")
            if st:
                parts.append(f"\nTraining step ({st['preset']} {st['size']}px, forward + loss + backward, median): "
                             f"gemm_backend reference {st['reference_s']:.2f} s, auto {st['auto_s']:.2f} s "
                             f"({st['speedup']:.2f}x)")
            parts.append("")
    return "\n".join(parts) + "\n"


# Goals of the benchmark issue, as m2f / reference ratios (speed: HF time / m2f time; memory:
# full-mask / point-sampled loss).
SPEED_GOALS = {("cpu", "inference"): 1.5, ("cpu", "train"): 1.3, ("cuda", "inference"): 2.0, ("cuda", "train"): 2.0}
MEMORY_GOAL = 3.0
SUMMARY_BEGIN = "<!-- bench-summary:begin (generated by `python -m m2f.bench`; do not edit) -->"
SUMMARY_END = "<!-- bench-summary:end -->"


def _overrides_label(r: Dict[str, Any]) -> str:
    return ", ".join(f"`{o}`" for o in r.get("overrides") or []) or "defaults"


def render_summary(out_dir: Path) -> str:
    """One table of every result in ``out_dir`` against its goal (for the project README)."""
    rows = ["| benchmark | device | setting | m2f | reference | ratio | goal |", "|---|---|---|---|---|---|---|"]
    paths = sorted(Path(out_dir).glob("*.json")) + sorted(Path(out_dir).glob("*/*.json"))  # e.g. gpu/
    results = [(p, json.loads(p.read_text())) for p in paths]
    results.sort(key=lambda pr: (pr[1].get("kind") != "speed", pr[0].name))  # speed first
    for path, r in results:
        if "bandwidth_bound" in r and "results" in r:  # python -m kernels.bench
            rows.extend(_kernel_summary_rows(path, r))
            continue
        if r.get("kind") == "gemm":  # python -m kernels.bench_gemm
            rows.extend(_gemm_summary_rows(path, r))
            continue
        env = r.get("environment") or {}
        dev = "cuda" if str(env.get("device", "")).startswith("cuda") else "cpu"
        n = env.get("threads")
        dev_label = env.get("gpu") or f"cpu, {n} thread{'' if n == 1 else 's'}"
        if r.get("kind") == "speed":
            prec = "bf16 autocast" if r.get("amp") else "fp32"
            for key, unit in (("inference", "images/s"), ("train", "iterations/s")):
                if key not in r:
                    continue
                m, h = r[key]["m2f"], r[key]["hf"]
                ratio = r[key]["ratio_m2f_over_hf"]
                goal = SPEED_GOALS.get((dev, key))
                verdict = "—" if goal is None else f">= {goal}x: {'met' if ratio >= goal else 'NOT met'}"
                rows.append(f"| {key} speed (`{path.name}`) | {dev_label} | {r['preset']} {r['size']}px, {prec}, "
                            f"{_overrides_label(r)} | {1 / m['median_s']:.3f} {unit} | HF {1 / h['median_s']:.3f} "
                            f"{unit} | **{ratio:.2f}x** | {verdict} |")
        elif r.get("kind") == "memory":
            for size, s in r["sizes"].items():
                by = {(v["matching"], v["loss"]): v for v in s["variants"]}
                if ("mask", "mask") not in by or ("point", "point") not in by:
                    continue
                full, point = by[("mask", "mask")], by[("point", "point")]
                ratio = s["ratios"]["mask_mask_over_point_point"]
                amp = {v.get("amp") for v in s["variants"]} - {None}
                rows.append(f"| training memory per image (`{path.name}`) | {dev_label} | {r['preset']} {size}px, "
                            f"{'bf16 autocast' if amp else 'fp32'}, {_overrides_label(r)} | point->point "
                            f"{_gib(point['peak_bytes'])} GiB | mask->mask {_gib(full['peak_bytes'])} GiB | "
                            f"**{ratio:.2f}x** | >= {MEMORY_GOAL}x: {'met' if ratio >= MEMORY_GOAL else 'not met'} |")
    return "\n".join(rows) + "\n"


KERNEL_GOAL = 3.0  # Triton deformable attention fwd+bwd vs the reference path (H100)


def _gemm_summary_rows(path: Path, r: Dict[str, Any]) -> List[str]:
    dev = f"cpu, {r.get('threads')} thread{'' if r.get('threads') == 1 else 's'}"
    sp = sorted(x["onednn_speedup"] for x in r.get("rows", []))
    rows = []
    if sp:
        med = statistics.median(sp)
        rows.append(f"| float32 GEMMs, oneDNN vs BLAS (`{path.name}`) | {dev} | {len(sp) // 3} model shapes x "
                    f"(forward, input grad, weight grad) | median {statistics.median(x['onednn_gflops'] for x in r['rows']):.0f}"
                    f" GFLOP/s | {statistics.median(x['blas_gflops'] for x in r['rows']):.0f} GFLOP/s | "
                    f"**{med:.2f}x** ({sp[0]:.2f}-{sp[-1]:.2f}) | — |")
    st = r.get("step")
    if st:
        rows.append(f"| training step, gemm_backend auto vs reference (`{path.name}`) | {dev} | {st['preset']} "
                    f"{st['size']}px, fp32 | {st['auto_s']:.2f} s | {st['reference_s']:.2f} s | "
                    f"**{st['speedup']:.2f}x** | — |")
    return rows


def _kernel_summary_rows(path: Path, r: Dict[str, Any]) -> List[str]:
    env, c = r.get("environment") or {}, r.get("config") or {}
    by = {(x["backend"], x["dtype"]): x for x in r["results"] if "skipped" not in x}
    rows = []
    for (backend, dtype), x in sorted(by.items()):
        ref = by.get(("reference", dtype))
        if backend != "triton" or ref is None:
            continue
        ratio = ref["forward_backward_ms"] / x["forward_backward_ms"]
        rows.append(f"| deformable attention fwd+bwd (`{path.name}`) | {env.get('device')} | batch {c.get('batch')}, "
                    f"{c.get('size')}px, {dtype} | {x['forward_backward_ms']:.2f} ms | reference "
                    f"{ref['forward_backward_ms']:.2f} ms | **{ratio:.2f}x** | >= {KERNEL_GOAL}x: "
                    f"{'met' if ratio >= KERNEL_GOAL else 'NOT met'} |")
    for name, e in ((r.get("end_to_end") or {}).get("backends") or {}).items():
        base = r["end_to_end"]["baseline"]
        if name == base:
            continue
        s = e["speedup_vs_" + base]
        rows.append(f"| training step, {name} vs {base} (`{path.name}`) | {env.get('device')} | "
                    f"{r['end_to_end']['preset']} {r['end_to_end']['size']}px batch {r['end_to_end']['batch']} | "
                    f"{e['train_step_ms']:.1f} ms | {r['end_to_end']['backends'][base]['train_step_ms']:.1f} ms | "
                    f"**{s['train_step']:.2f}x** (pixel decoder {s['pixel_decoder_fwd_bwd']:.2f}x) | — |")
    return rows


def splice_summary(out_dir: Path, readme: Optional[Path] = None) -> Optional[Path]:
    """Write :func:`render_summary` between the bench-summary markers of the project README (the
    README beside ``out_dir``'s ``reports/``); no-op without markers."""
    out_dir = Path(out_dir)
    readme = Path(readme) if readme is not None else out_dir.resolve().parent.parent / "README.md"
    if not readme.exists():
        return None
    text = readme.read_text()
    if SUMMARY_BEGIN not in text or SUMMARY_END not in text:
        return None
    head, rest = text.split(SUMMARY_BEGIN, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    atomic_write_text(readme, head + SUMMARY_BEGIN + "\n\n" + render_summary(out_dir) + "\n" + SUMMARY_END + tail)
    return readme


def refresh_reports(out_dir: Path) -> None:
    """Re-render ``out_dir/README.md``; for the project's own ``reports/bench`` (or a folder in it,
    e.g. ``gpu/``) also the summary table in the project README."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "README.md", render_readme(out_dir))
    project = Path(__file__).resolve().parent.parent / "reports" / "bench"
    if out_dir.resolve() == project or project in out_dir.resolve().parents:
        splice_summary(project)


def write_result(out_dir: Path, name: str, result: Dict[str, Any]) -> Path:
    path = Path(out_dir) / f"{name}.json"
    atomic_write_json(path, result)
    refresh_reports(Path(out_dir))
    return path


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_memory_worker"]:  # internal: one memory variant in a fresh process
        a = json.loads(argv[1])
        print(json.dumps(memory_worker(**a)))
        return 0
    if argv[:1] == ["render"]:  # re-render the READMEs from the JSONs (e.g. after copying GPU results in)
        pr = argparse.ArgumentParser(prog="python -m m2f.bench render")
        pr.add_argument("--out", default="reports/bench", help="folder of result JSONs")
        a = pr.parse_args(argv[1:])
        refresh_reports(Path(a.out))
        print(f"rendered {Path(a.out) / 'README.md'}")
        return 0
    ap = argparse.ArgumentParser(prog="python -m m2f.bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("memory", "speed", "profile"):
        p = sub.add_parser(name, help=f"{name} benchmark")
        p.add_argument("--preset", default="r50_coco_panoptic", help=f"one of {list_presets()}")
        p.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
        p.add_argument("--out", default="reports/bench", help="output folder (JSON + README.md)")
        p.add_argument("--name", default=None, help="result file stem (default: kind_preset_device[_size])")
        p.add_argument("--num-masks", type=int, default=20, help="target masks per image (default 20)")
        p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                       help="config override (repeatable)")
    pm = sub.choices["memory"]
    pm.add_argument("--sizes", default="512,1024", help="comma-separated square sizes (default 512,1024)")
    pm.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant")
    ps = sub.choices["speed"]
    ps.add_argument("--size", type=int, default=512)
    ps.add_argument("--iters", type=int, default=5, help="interleaved repetitions (after 1 warm-up)")
    ps.add_argument("--no-flops", action="store_true")
    ps.add_argument("--no-train", action="store_true")
    ps.add_argument("--no-inference", action="store_true")
    ps.add_argument("--amp", action="store_true", help="both models' forwards under bf16 autocast (default fp32)")
    pp = sub.choices["profile"]
    pp.add_argument("--size", type=int, default=512)
    pp.add_argument("--iters", type=int, default=3, help="profiled steps (after 1 warm-up; median)")
    args = ap.parse_args(argv)
    device = _check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_masks < 0:
        raise InputError(f"--num-masks: expected >= 0, got {args.num_masks}")
    get_preset(args.preset, args.overrides)  # validate early
    if args.cmd == "memory":
        sizes = _parse_sizes(args.sizes)
        res = run_memory(args.preset, sizes, device, args.num_masks, args.overrides, args.threads, args.timeout)
        name = args.name or f"memory_{args.preset}_{device.replace(':', '')}"
    elif args.cmd == "profile":
        if args.iters < 1:
            raise InputError(f"--iters: expected >= 1, got {args.iters}")
        res = run_profile(args.preset, args.size, device, args.iters, args.num_masks, args.overrides)
        name = args.name or f"profile_{args.preset}_{device.replace(':', '')}_{args.size}"
    else:
        if args.size < 32 or args.size % 32:
            raise InputError(f"--size: expected a positive multiple of 32, got {args.size}")
        if args.iters < 1:
            raise InputError(f"--iters: expected >= 1, got {args.iters}")
        res = run_speed(args.preset, args.size, device, args.iters, args.num_masks, args.overrides,
                        flops=not args.no_flops, train=not args.no_train, infer=not args.no_inference,
                        amp=args.amp)
        name = args.name or f"speed_{args.preset}_{device.replace(':', '')}_{args.size}" + ("_amp" if args.amp else "")
    path = write_result(Path(args.out), name, res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
