"""Semantic segmentation metrics from a confusion matrix, with detectron2's SemSegEvaluator definitions:

- pixels whose ground truth is ``ignore_label`` are left out on both sides;
- per class ``c``: ``IoU = tp / (gt + pred - tp)``, ``Acc = tp / gt``, defined only when class ``c``
  occurs in the ground truth (``gt > 0``); otherwise NaN and left out of every mean (so a class only
  predicted, never in the ground truth, is excluded; its false positives still lower the IoU of the
  true classes of those pixels).  mmsegmentation / hotcoco's own mIoU would count such a class as 0;
- ``mIoU`` / ``mACC`` = mean over defined classes, ``fwIoU`` = sum of IoU weighted by gt frequency,
  ``pACC`` = total tp / labelled pixels.  All on the 0-100 scale.

Engines: ``"hotcoco"`` accumulates the confusion matrix with hotcoco.semantic.SemanticEval (Rust);
``"reference"`` with numpy ``bincount``; both feed the same formulas above.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from m2f.errors import InputError
from m2f.evaluation._io import PathLike, read_image_array, require_dir, short_list, write_png
from m2f.evaluation.panoptic import check_engine

__all__ = ["evaluate_semantic", "confusion_matrix", "metrics_from_confusion", "label_pairs", "write_semantic_png",
           "ConfusionAccumulator"]


def _label_array(arr: np.ndarray, name: str, num_classes: int, ignore_label: int, is_gt: bool) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        raise InputError(f"{name}: a label map must be single-channel (class ids), got an RGB image {a.shape}")
    if a.ndim != 2:
        raise InputError(f"{name}: a label map must be 2-D [H, W], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.mod(a, 1) == 0):
            a = a.astype(np.int64)
        else:
            raise InputError(f"{name}: label map must hold integer class ids, got dtype {a.dtype}")
    a = a.astype(np.int64)
    bad = (a < 0) | ((a >= num_classes) & (a != ignore_label))
    if bad.any():
        vals = np.unique(a[bad])
        raise InputError(f"{name}: label values {short_list(vals.tolist())} are out of range: expected 0..{num_classes - 1}"
                         + (f" or {ignore_label} (ignore)" if is_gt else " (a prediction may use "
                            f"{ignore_label} = no prediction, counted as wrong)"))
    return a


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    """Confusion matrix ``[K, K]`` int64, rows = ground truth, cols = prediction; ignored gt pixels are
    dropped.  A prediction of ``ignore_label`` (no prediction) counts as wrong: it adds to the ground
    truth's row total but to no column."""
    valid = gt != ignore_label
    g = gt[valid]
    p = pred[valid]
    ok = p < num_classes
    cm = np.bincount(g[ok] * num_classes + p[ok], minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    missed = np.bincount(g[~ok], minlength=num_classes)  # gt pixels with no prediction
    return cm, missed


class ConfusionAccumulator:
    """Accumulates the confusion matrix image by image with the chosen engine."""

    def __init__(self, num_classes: int, ignore_label: int = 255, engine: str = "hotcoco"):
        self.num_classes, self.ignore_label, self.engine = num_classes, ignore_label, check_engine(engine)
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.missed = np.zeros(num_classes, dtype=np.int64)
        self._hc = None
        if engine == "hotcoco":
            from hotcoco import semantic as hs

            # hotcoco needs every label < classes: the ignore label is made a (discarded) extra class
            self._hc = hs.SemanticEval(num_classes + 1, ignore_index=None)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """gt, pred: validated int64 [H, W]."""
        if self._hc is not None:
            K = self.num_classes
            g = np.where(gt == self.ignore_label, K, gt)
            p = np.where(pred >= K, K, pred)
            self._hc.update(g.astype(np.int32), p.astype(np.int32))
        else:
            cm, missed = confusion_matrix(gt, pred, self.num_classes, self.ignore_label)
            self.cm += cm
            self.missed += missed

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._hc is not None:
            K = self.num_classes
            full = np.asarray(self._hc.confusion(), dtype=np.int64)  # [K+1, K+1], rows = gt
            return full[:K, :K].copy(), full[:K, K].copy()
        return self.cm, self.missed


def metrics_from_confusion(cm: np.ndarray, missed: Optional[np.ndarray] = None,
                           class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """detectron2 SemSegEvaluator metrics from ``cm [K, K]`` (rows = gt) and ``missed [K]`` (gt pixels
    with no prediction).  Returns ``mIoU, fwIoU, mACC, pACC`` and ``IoU`` / ``ACC`` per class (NaN
    where the class is absent from the ground truth) on the 0-100 scale."""
    cm = cm.astype(np.float64)
    K = cm.shape[0]
    missed = np.zeros(K) if missed is None else missed.astype(np.float64)
    tp = np.diag(cm)
    pos_gt = cm.sum(1) + missed
    pos_pred = cm.sum(0)
    iou = np.full(K, np.nan)
    acc = np.full(K, np.nan)
    valid = pos_gt > 0
    union = pos_gt + pos_pred - tp
    acc[valid] = tp[valid] / pos_gt[valid]
    iou_valid = valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total = pos_gt.sum()
    weights = pos_gt / total if total > 0 else np.zeros(K)
    names = list(class_names) if class_names is not None else [str(k) for k in range(K)]
    return {
        "mIoU": 100 * float(np.nanmean(iou)) if iou_valid.any() else float("nan"),
        "fwIoU": 100 * float(np.sum(iou[iou_valid] * weights[iou_valid])) if iou_valid.any() else float("nan"),
        "mACC": 100 * float(np.nanmean(acc)) if valid.any() else float("nan"),
        "pACC": 100 * float(tp.sum() / total) if total > 0 else float("nan"),
        "IoU": {n: 100 * float(v) for n, v in zip(names, iou)},
        "ACC": {n: 100 * float(v) for n, v in zip(names, acc)},
    }


def label_pairs(gt_dir: PathLike, pred_dir: PathLike) -> List[Tuple[Path, Path]]:
    """Pair ``*.png`` label maps of two folders by file name; InputError on a missing or extra file."""
    gd = require_dir(gt_dir, "ground-truth label folder")
    pd = require_dir(pred_dir, "prediction label folder")
    gt_files = {p.name: p for p in sorted(gd.glob("*.png"))}
    pred_files = {p.name: p for p in sorted(pd.glob("*.png"))}
    if not gt_files:
        raise InputError(f"{gd}: ground-truth label folder has no .png files")
    missing = sorted(set(gt_files) - set(pred_files))
    if missing:
        raise InputError(f"{pd}: no prediction for ground-truth label maps {short_list(missing)} of {gd}")
    extra = sorted(set(pred_files) - set(gt_files))
    if extra:
        raise InputError(f"{pd}: prediction files {short_list(extra)} have no ground truth in {gd}")
    return [(gt_files[n], pred_files[n]) for n in sorted(gt_files)]


def evaluate_semantic(gt, pred, num_classes: int, ignore_label: int = 255, engine: str = "hotcoco",
                      reduce_zero_label: bool = False, class_names: Optional[Sequence[str]] = None
                      ) -> Dict[str, Any]:
    """mIoU, fwIoU, mACC, pACC and per-class IoU/ACC (0-100).

    gt / pred: two folders of PNG label maps paired by file name, or two equal-length sequences of
    ``[H, W]`` integer arrays or PNG paths.  Ground-truth values: ``0..num_classes-1`` or
    ``ignore_label``; with ``reduce_zero_label`` (ADE20K files) gt ``0`` is ignored and ``v`` -> ``v-1``.
    """
    check_engine(engine)
    if num_classes is None or int(num_classes) < 1:
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    if isinstance(gt, (str, os.PathLike)) or isinstance(pred, (str, os.PathLike)):
        if not (isinstance(gt, (str, os.PathLike)) and isinstance(pred, (str, os.PathLike))):
            raise InputError("evaluate_semantic: gt and pred must both be folders or both be sequences")
        pairs: Sequence = label_pairs(gt, pred)
    else:
        gt, pred = list(gt), list(pred)
        if len(gt) != len(pred):
            raise InputError(f"evaluate_semantic: {len(gt)} ground-truth maps but {len(pred)} predictions")
        pairs = list(zip(gt, pred))
    acc = ConfusionAccumulator(num_classes, ignore_label, engine)
    for i, (g, p) in enumerate(pairs):
        gname = str(g) if isinstance(g, (str, os.PathLike)) else f"ground-truth map [{i}]"
        pname = str(p) if isinstance(p, (str, os.PathLike)) else f"prediction map [{i}]"
        garr = read_image_array(g, "ground-truth label PNG") if isinstance(g, (str, os.PathLike)) else np.asarray(g)
        parr = read_image_array(p, "prediction label PNG") if isinstance(p, (str, os.PathLike)) else np.asarray(p)
        if reduce_zero_label:
            garr = np.asarray(garr).astype(np.int64)
            garr = np.where(garr == 0, ignore_label, garr - 1)
            garr = np.where(garr == ignore_label - 1, ignore_label, garr)
        garr = _label_array(garr, gname, num_classes, ignore_label, is_gt=True)
        parr = _label_array(parr, pname, num_classes, ignore_label, is_gt=False)
        if garr.shape != parr.shape:
            raise InputError(f"{pname}: prediction is {parr.shape[0]}x{parr.shape[1]} but the ground truth {gname} "
                             f"is {garr.shape[0]}x{garr.shape[1]}")
        acc.update(garr, parr)
    cm, missed = acc.result()
    out = metrics_from_confusion(cm, missed, class_names)
    out["num_images"] = len(pairs)
    return out


def write_semantic_png(path: PathLike, labels: np.ndarray) -> None:
    """Write a label map (contiguous ids) as a PNG: 8-bit if all values < 256, else 16-bit."""
    a = labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels)
    a = a.astype(np.uint8) if a.max(initial=0) < 256 else a.astype(np.uint16)
    write_png(path, a)
