"""The trainer: ``m2f train`` and ``train(cfg, out_dir)``.

- AdamW with the paper's parameter groups (backbone lr x ``backbone_lr_multiplier``; no weight decay
  on embeddings and normalisation layers), step or poly schedule with linear warmup, full-model
  gradient clipping, autocast (bf16 on CUDA), gradient accumulation.
- Reproducible and resumable: batch composition, augmentation and point sampling of iteration ``i``
  depend only on ``(seed, i, rank)``, so ``--resume`` after a kill (even ``kill -9``) continues the exact
  loss curve of an uninterrupted run on CPU.  Checkpoints and result files are written atomically.
- Multi-GPU / multi-node through ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from m2f.checkpoint import (append_jsonl, atomic_write_json, load_checkpoint, load_model_weights, read_jsonl,
                            rewrite_jsonl, save_checkpoint)
from m2f.config import KERNEL_FIELDS, Config, config_hash, from_dict, get_path, to_dict
from m2f.data.collate import mix_seed
from m2f.errors import InputError, NonFiniteLossError
from m2f.provenance import git_commit

CKPT_NAME = "last.pth"


def amp_context(solver, device_type: str):
    """The model forward's autocast (a context factory): bf16 when ``solver.amp`` on CUDA, on CPU
    only with ``solver.amp_on_cpu``; otherwise none (fp32).  The loss runs outside it, in fp32."""
    if solver.amp and (device_type == "cuda" or solver.amp_on_cpu):
        return partial(torch.autocast, device_type=device_type, dtype=torch.bfloat16)
    return nullcontext


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------

def dist_info() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, or (0, 1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def maybe_init_distributed(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def resolve_device(device: Optional[str]) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


# ---------------------------------------------------------------------------------------------
# Deterministic data order
# ---------------------------------------------------------------------------------------------
# Batches come from m2f.data.collate.TrainingSampler, stepped once per MICRO-batch: micro-step
# ``it * grad_accum + m`` of this rank.  Its stream position, and with it the dataset index and the
# item's augmentation seed, depend only on (seed, iteration, micro-step, rank, world size), so the
# data a run sees does not depend on restarts.  Datasets take ``(index, item_seed)`` keys.


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d,
               nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, solver) -> List[Dict[str, Any]]:
    """AdamW groups as the official code: backbone lr x multiplier; weight decay 0 for norm layers'
    parameters and embeddings (nn.Embedding, level embeddings, Swin position tables)."""
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            lr = solver.lr * (solver.backbone_lr_multiplier if full.startswith("backbone.") else 1.0)
            wd = solver.weight_decay
            is_norm = isinstance(module, _NORM_TYPES) or type(module).__name__.lower().startswith(("frozenbatchnorm", "layernorm"))
            is_embed = isinstance(module, nn.Embedding) or any(
                k in pname for k in ("level_embed", "relative_position_bias_table", "absolute_pos_embed", "pos_embed"))
            if is_norm:
                wd = solver.weight_decay_norm
            elif is_embed:
                wd = solver.weight_decay_embed
            groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def lr_factor(it: int, solver) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based)."""
    if solver.schedule == "poly":
        f = (1.0 - min(it, solver.max_iters) / solver.max_iters) ** solver.poly_power
    else:
        f = solver.gamma ** sum(it >= int(s * solver.max_iters) for s in solver.steps)
    if it < solver.warmup_iters:
        alpha = it / max(1, solver.warmup_iters)
        f *= solver.warmup_factor * (1 - alpha) + alpha
    return f


# ---------------------------------------------------------------------------------------------
def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    out = dict(batch)
    out["images"] = batch["images"].to(device, non_blocking=True)
    out["targets"] = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                      for t in batch["targets"]]
    return out


def resolve_optimizer_impl(impl: str, device) -> str:
    """"auto" -> "fused" where this PyTorch has a fused AdamW for ``device``'s type (CPU since 2.4,
    CUDA), else "foreach"; an explicit choice is kept (an unsupported "fused" fails in AdamW)."""
    if impl != "auto":
        return impl
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = _get_fused_kernels_supported_devices()
    except ImportError:  # an older PyTorch: no fused AdamW on CPU
        supported = ["cuda"]
    return "fused" if torch.device(device).type in supported else "foreach"


_ALLOCATOR_STATE: Dict[str, str] = {}


def tune_cpu_allocator(mode: str) -> str:
    """Apply ``solver.cpu_allocator`` once per process; returns what is in effect ("tuned", "default",
    or "default (not glibc)" where mallopt is unavailable).

    "tuned": glibc's mallopt with a fixed 32 MiB mmap threshold (the step's activations, up to tens
    of MiB, come from the heap instead of fresh zeroed pages on every step), no trimming and a 64 MiB
    top pad (freed memory stays for the next step).  Memory is reused, never leaked: the process's
    peak stays the step's peak."""
    if mode != "tuned":
        return _ALLOCATOR_STATE.get("mode", "default")
    if "mode" in _ALLOCATOR_STATE:
        return _ALLOCATOR_STATE["mode"]
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _ALLOCATOR_STATE["mode"] = "default (not glibc)"
        return _ALLOCATOR_STATE["mode"]
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = all(mallopt(opt, val) == 1 for opt, val in ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 31),
                                                     (M_TOP_PAD, 64 << 20)))
    _ALLOCATOR_STATE["mode"] = "tuned" if ok else "default (mallopt refused)"
    return _ALLOCATOR_STATE["mode"]


def kernels_used(cfg: Config, device) -> Dict[str, str]:
    """The implementations that actually ran: every kernel field of the config (marked
    ``execution_only(..., kernel=True)`` in m2f.config) with "auto" resolved on ``device``, recorded
    with results.  The deformable-attention backend only for the msdeform pixel decoder."""
    from m2f_kernels.cpu_gemm import resolve_for_device
    from m2f_kernels.ms_deform_attn import resolve_backend

    amp = amp_context(cfg.solver, torch.device(device).type) is not nullcontext
    resolvers = {"gemm_backend": lambda v: resolve_for_device(v, device, amp=amp),
                 "pixel_decoder.deform_attn_backend": lambda v: resolve_backend(v, device),
                 "solver.optimizer_impl": lambda v: resolve_optimizer_impl(v, device),
                 "solver.cpu_allocator": lambda v: ("n/a (not CPU)" if torch.device(device).type != "cpu"
                                                    else _ALLOCATOR_STATE.get("mode", "default") if v == "tuned"
                                                    else "default")}
    out = {}
    for path in KERNEL_FIELDS:
        if path.startswith("pixel_decoder.deform") and cfg.pixel_decoder.kind != "msdeform":
            continue
        value = get_path(cfg, path)
        out[path] = resolvers[path](value) if path in resolvers else value
    return out


# ---------------------------------------------------------------------------------------------
# What the training data decides
# ---------------------------------------------------------------------------------------------
DATA_PROPERTIES = ("data.task", "num_classes")  # config fields the training data can set


def task_from_data(cfg: Config, from_data=DATA_PROPERTIES) -> Config:
    """``cfg`` with ``data.task`` one the training data can train.  When ``"data.task"`` is in
    ``from_data`` (the user did not set it): the config's task if the data supports it (a preset's
    instance or semantic task on COCO panoptic data), else the data's own (COCO instances -> instance,
    label maps -> semantic).  A task set by the user that the data cannot train raises InputError."""
    from m2f.config import apply_overrides
    from m2f.data.catalog import data_tasks

    tasks = data_tasks(cfg.data.train)
    if tasks is None or cfg.data.task in tasks:
        return cfg
    if "data.task" in from_data:
        return apply_overrides(cfg, {"data.task": tasks[0]})
    raise InputError(f"data.task={cfg.data.task} disagrees with the training data {cfg.data.train!r}, which can only "
                     f"train {' / '.join(tasks)}; drop --set data.task (m2f train then takes data.task={tasks[0]} "
                     f"from the data)")


def classes_from_data(cfg: Config, metadata, from_data=DATA_PROPERTIES) -> Config:
    """``cfg`` with ``num_classes`` the training data's (``metadata.num_classes``) when ``"num_classes"``
    is in ``from_data``; otherwise a different count raises InputError naming both."""
    from m2f.config import apply_overrides

    n = metadata.num_classes
    if n == cfg.num_classes:
        return cfg
    if "num_classes" in from_data:
        return apply_overrides(cfg, {"num_classes": n})
    raise InputError(f"num_classes={cfg.num_classes} disagrees with the training data {cfg.data.train!r}, which has "
                     f"{n} classes (task {cfg.data.task}); drop --set num_classes (m2f train then takes "
                     f"num_classes={n} from the data)")


def data_record(cfg: Config, metadata) -> Dict[str, Any]:
    """What a checkpoint records of its training data (plain values, weights-only safe): the spec,
    task, number of classes and the categories (``id, name, isthing, color`` in contiguous order), so
    that ``m2f predict`` needs neither flags nor the data set."""
    cats = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()} for c in metadata.categories]
    return {"spec": cfg.data.train, "task": cfg.data.task, "num_classes": metadata.num_classes, "categories": cats}


def describe_data(cfg: Config, metadata) -> str:
    """One line: what the training data set (task, classes, thing / stuff split)."""
    things = sum(bool(t) for t in metadata.is_thing)
    return (f"from the training data {cfg.data.train!r}: task {cfg.data.task}, num_classes={metadata.num_classes} "
            f"({things} thing, {metadata.num_classes - things} stuff)")


def train(cfg: Config, out_dir, resume: bool = False, device: Optional[str] = None, progress: bool = True,
          evaluate_at_end: bool = True, eval_limit: Optional[int] = None, stop_after: Optional[int] = None,
          log_fn=None, trust_checkpoint: bool = False, from_data=()) -> Dict[str, Any]:
    """Train ``cfg`` into ``out_dir``.  Returns a summary dict (final losses and metrics, throughput,
    peak memory).  ``stop_after`` stops (with a checkpoint) after that many iterations of this call
    (for tests and time-sliced jobs).  ``trust_checkpoint``: resume from a checkpoint that is not in the
    weights-only format (see :func:`m2f.checkpoint.load_checkpoint`).  ``from_data``: the fields of
    :data:`DATA_PROPERTIES` the training data sets (``m2f train``: those the user did not ``--set``;
    one line on stderr says what they became); any other that disagrees with the data raises
    InputError.  The resolved config is the run's (its hash, ``config.json``, the checkpoint)."""
    from m2f.data.catalog import get_dataset
    from m2f.data.collate import TrainingSampler, collate
    from m2f.loss import build_criterion
    from m2f.models.build import build_model

    out = Path(out_dir)
    dev = resolve_device(device)
    maybe_init_distributed(dev)
    rank, world, _ = dist_info()
    s = cfg.solver
    if s.batch_size % (world * s.grad_accum):
        raise InputError(f"solver.batch_size={s.batch_size} must be divisible by world_size x solver.grad_accum "
                         f"= {world} x {s.grad_accum}")
    micro = s.batch_size // (world * s.grad_accum)

    cfg = task_from_data(cfg, from_data)
    train_set = get_dataset(cfg.data.train, "train", cfg)
    cfg = classes_from_data(cfg, train_set.metadata, from_data)

    ckpt_path = out / CKPT_NAME
    start_iter = 0
    ckpt = None
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, trust=trust_checkpoint)
        saved = from_dict(ckpt["config"])
        if config_hash(saved) != config_hash(cfg):
            from m2f.config import diff

            raise InputError(f"{ckpt_path}: the checkpoint was made with a different config "
                             f"(differences vs the requested one: {diff(saved, cfg)}); use another --out")
        start_iter = int(ckpt["iter"])
    elif not resume and ckpt_path.exists():
        raise InputError(f"{out}: holds a run already ({ckpt_path}); pass --resume to continue it or choose another --out")

    if from_data and rank == 0:  # after the checks above, so that a refusal stays one line
        import sys

        print(f"m2f train: {describe_data(cfg, train_set.metadata)}", file=sys.stderr, flush=True)
    torch.manual_seed(s.seed)
    model = build_model(cfg).to(dev)
    criterion = build_criterion(cfg.loss, cfg.num_classes).to(dev)
    if dev.type == "cpu":
        tune_cpu_allocator(s.cpu_allocator)
    impl = resolve_optimizer_impl(s.optimizer_impl, dev)
    optimizer = torch.optim.AdamW(param_groups(model, s), lr=s.lr, weight_decay=s.weight_decay,
                                  **{impl: True})
    if ckpt is not None:
        load_model_weights(model, ckpt["model"], str(ckpt_path), f"this run's config ({config_hash(cfg)})")
        optimizer.load_state_dict(ckpt["optimizer"])
    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)

    sampler = TrainingSampler(len(train_set), micro, s.seed, start_iter * s.grad_accum, rank, world)
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=partial(collate, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
                           size_divisibility=cfg.data.size_divisibility),
        persistent_workers=cfg.data.num_workers > 0)
    data_iter = iter(loader)

    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {"config": to_dict(cfg), "config_hash": config_hash(cfg)})
        # Drop metric lines written after the checkpoint we resume from (they will be recomputed).
        rewrite_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r.get("iter", 0) <= start_iter])

    amp_ctx = amp_context(s, dev.type)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def save(it: int) -> None:
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                             "config": to_dict(cfg), "config_hash": config_hash(cfg),
                             "data": data_record(cfg, train_set.metadata),
                             "git": git_commit(), "time": time.time()}, ckpt_path)

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=s.max_iters, initial=start_iter, desc=f"train {out.name}", dynamic_ncols=True,
                   unit="it", smoothing=0.1)
    model.train()
    it = start_iter
    t_start, n_images, last = time.perf_counter(), 0, {}
    steps_done = 0
    while it < s.max_iters:
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(it, s)
        torch.manual_seed(mix_seed(s.seed, it, rank, 3))  # point sampling / dropout of this iteration
        optimizer.zero_grad(set_to_none=True)
        comp_sum: Dict[str, torch.Tensor] = {}
        total_sum = torch.zeros((), device=dev)
        for m in range(s.grad_accum):
            batch = _to_device(next(data_iter), dev)
            sync_ctx = ddp_model.no_sync if (world > 1 and m < s.grad_accum - 1) else nullcontext
            with sync_ctx():
                with amp_ctx():
                    output = ddp_model(batch["images"])
                losses = criterion(output, batch["targets"])
                loss = sum(losses.values()) / s.grad_accum
                loss.backward()
            total_sum = total_sum + loss.detach()
            for k, v in losses.items():
                if "_" in k and k.rsplit("_", 1)[1].isdigit():
                    continue
                comp_sum[k] = comp_sum.get(k, 0) + v.detach() / s.grad_accum
            n_images += len(batch["images"])
        if not bool(torch.isfinite(total_sum)):
            if bar:
                bar.close()
            comps = {k: float(v) for k, v in comp_sum.items()}
            raise NonFiniteLossError(
                f"non-finite loss at iteration {it} ({comps}); stopped. The last good checkpoint is "
                f"{ckpt_path if ckpt_path.exists() else '(none yet)'}; try a lower solver.lr or solver.clip_grad_norm")
        if s.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad_norm)
        optimizer.step()
        it += 1
        steps_done += 1
        if rank == 0 and (it % s.log_period == 0 or it == s.max_iters or it == start_iter + 1):
            rec = {"iter": it, "loss": float(total_sum), "lr": optimizer.param_groups[0]["lr"],
                   **{k: float(v) for k, v in comp_sum.items()}}
            append_jsonl(metrics_path, rec)
            last = rec
            if log_fn:
                log_fn(rec)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{float(total_sum):.3f}")
        if it % s.checkpoint_period == 0 or it == s.max_iters:
            save(it)
        if s.eval_period and it % s.eval_period == 0 and it < s.max_iters:
            _periodic_eval(model, cfg, dev, it, metrics_path, rank, eval_limit, log_fn)
            model.train()
        if stop_after is not None and steps_done >= stop_after:
            save(it)
            break
    if bar:
        bar.close()
    elapsed = time.perf_counter() - t_start
    summary: Dict[str, Any] = {
        "iter": it, "final_loss": last, "train_seconds": elapsed,
        "train_images_per_s": n_images * world / elapsed if elapsed > 0 else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "params": sum(p.numel() for p in model.parameters()), "config_hash": config_hash(cfg),
        "kernels": kernels_used(cfg, dev),
    }
    if evaluate_at_end and it >= s.max_iters:
        summary["eval"] = _periodic_eval(model, cfg, dev, it, metrics_path, rank, eval_limit, log_fn)
    if rank == 0 and it >= s.max_iters:
        atomic_write_json(out / "final.json", summary)
    if world > 1:
        dist.barrier()
    return summary


def _periodic_eval(model, cfg, dev, it, metrics_path, rank, limit, log_fn) -> Dict[str, Any]:
    from m2f.evaluate import evaluate_model

    if rank != 0:
        return {}
    res = evaluate_model(model, cfg, device=dev, limit=limit)
    append_jsonl(metrics_path, {"iter": it, "eval": res})
    if log_fn:
        log_fn({"iter": it, "eval": res})
    return res
