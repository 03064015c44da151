"""``m2f score``: score prediction files against ground truth, without a model.

    m2f score --task panoptic --gt panoptic_val.json:panoptic_val/ --pred pred.json:pred_png/ [--json]
    m2f score --task instance --gt instances_val.json --pred results.json
    m2f score --task semantic --gt labels/ --pred pred_labels/ --num-classes 150 [--reduce-zero-label]

``--task`` is the spelling ``m2f eval`` and ``m2f predict`` use; ``m2f score panoptic ...`` (the task as
the first argument) also works.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any, Dict, Optional, Tuple

from m2f.errors import InputError
from m2f.evaluation._io import json_safe
from m2f.evaluation.instance import AP_KEYS, evaluate_instances
from m2f.evaluation.panoptic import ENGINES, PQ_KEYS, evaluate_panoptic
from m2f.evaluation.semantic import evaluate_semantic

__all__ = ["score", "add_score_args", "run", "split_json_dir"]

TASKS = ("panoptic", "instance", "semantic")


def split_json_dir(spec: str, flag: str) -> Tuple[str, str]:
    """``"file.json:png_dir"`` -> (json, dir).  Without ``:dir`` the folder is the JSON path without
    ``.json`` (panopticapi's convention)."""
    s = str(spec)
    idx = s.lower().find(".json:")
    if idx >= 0:
        return s[: idx + 5], s[idx + 6 :]
    if s.lower().endswith(".json"):
        return s, s[:-5]
    raise InputError(f"{flag} {spec!r}: expected JSON:PNG_DIR (a COCO panoptic JSON file and its PNG folder)")


def score(task: str, gt, pred, num_classes: Optional[int] = None, engine: str = "hotcoco",
          ignore_label: int = 255, reduce_zero_label: bool = False) -> Dict[str, Any]:
    """Score prediction files.  ``task`` panoptic: gt/pred ``"JSON:PNG_DIR"`` (or ``(json, dir)``);
    instance: gt instances JSON, pred results JSON; semantic: two label folders + ``num_classes``."""
    if task not in TASKS:
        raise InputError(f"task {task!r}: expected one of {list(TASKS)}")
    if task == "panoptic":
        gj, gd = split_json_dir(gt, "--gt") if isinstance(gt, str) else gt
        pj, pd = split_json_dir(pred, "--pred") if isinstance(pred, str) else pred
        return evaluate_panoptic(gj, gd, pj, pd, engine=engine)
    if task == "instance":
        return evaluate_instances(gt, pred, engine=engine)
    if num_classes is None:
        raise InputError("semantic scoring needs --num-classes K (labels 0..K-1, 255 = ignore)")
    return evaluate_semantic(gt, pred, num_classes, ignore_label=ignore_label, engine=engine,
                             reduce_zero_label=reduce_zero_label)


def add_score_args(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--task", choices=TASKS, default=None, help="what to score")
    p.add_argument("task_positional", nargs="?", choices=TASKS, default=None, metavar="TASK",
                   help="the task as the first argument (older spelling of --task)")
    p.add_argument("--gt", required=True, help="ground truth: JSON:PNG_DIR (panoptic), instances JSON (instance), "
                   "label folder (semantic)")
    p.add_argument("--pred", required=True, help="predictions: JSON:PNG_DIR (panoptic), results JSON (instance), "
                   "label folder (semantic)")
    p.add_argument("--num-classes", type=int, default=None, help="semantic: number of classes K")
    p.add_argument("--ignore-label", type=int, default=255, help="semantic: ignored ground-truth label (default 255)")
    p.add_argument("--reduce-zero-label", action="store_true", help="semantic: ground-truth 0 = ignore, v -> v-1 (ADE20K)")
    p.add_argument("--engine", choices=ENGINES, default="hotcoco", help="hotcoco (fast, default) or reference "
                   "(panopticapi / pycocotools)")
    p.add_argument("--per-class", action="store_true", help="also print per-class numbers")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _fmt(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def resolve_task(args) -> str:
    """The task from ``--task`` or the positional form; both given must agree."""
    flag, pos = getattr(args, "task", None), getattr(args, "task_positional", None)
    if flag and pos and flag != pos:
        raise InputError(f"m2f score: --task {flag} and the positional task {pos} disagree; give one")
    task = flag or pos
    if task is None:
        raise InputError(f"m2f score: no task; pass --task one of {list(TASKS)}")
    return task


def run(args) -> int:
    args.task = resolve_task(args)
    t0 = time.perf_counter()
    res = score(args.task, args.gt, args.pred, num_classes=args.num_classes, engine=args.engine,
                ignore_label=args.ignore_label, reduce_zero_label=args.reduce_zero_label)
    dt = time.perf_counter() - t0
    if args.json:
        out = dict(res)
        if not args.per_class:
            out = {k: v for k, v in out.items() if k not in ("per_class", "IoU", "ACC")}
        print(json.dumps(json_safe({"task": args.task, "engine": args.engine, "seconds": round(dt, 3), **out}),
                         indent=2))
        return 0
    keys = {"panoptic": PQ_KEYS, "instance": AP_KEYS, "semantic": ("mIoU", "fwIoU", "mACC", "pACC")}[args.task]
    print(f"{args.task} ({args.engine}, {dt:.2f}s)")
    print(" ".join(f"{k:>7}" for k in keys))
    print(" ".join(f"{_fmt(res[k]):>7}" for k in keys))
    if args.per_class:
        per = res.get("per_class") if args.task != "semantic" else res.get("IoU")
        for k, v in (per or {}).items():
            print(f"  {k}: {v if not isinstance(v, float) else _fmt(v)}")
    return 0
