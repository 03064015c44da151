"""Dataset evaluators: accumulate per-image results during a pass over a dataset, write them as
COCO-format files in a temporary folder, and score them against the dataset's ground truth.

``metadata`` is duck-typed (:class:`m2f.data.metadata.DatasetMetadata` or a stand-in) with
``contiguous_to_id``, ``num_classes``, ``ignore_label``, ``class_names`` (optional) and the ground
truth ``panoptic_json`` + ``panoptic_png_dir`` / ``instances_json`` / ``sem_seg_dir``
(+ optional ``sem_seg_reduce_zero_label``).

``process(meta, result)``: ``meta = {"image_id", "file_name", "orig_size"}``; ``result`` = one
image's dict from :func:`m2f.inference.postprocess`.  ``evaluate(engine="hotcoco") -> dict``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from m2f.errors import InputError
from m2f.evaluation._io import load_json, panoptic_to_png, short_list, write_png
from m2f.evaluation.instance import evaluate_instances, instances_to_coco_results
from m2f.evaluation.panoptic import evaluate_panoptic
from m2f.evaluation.semantic import evaluate_semantic, write_semantic_png

__all__ = ["PanopticEvaluator", "InstanceEvaluator", "SemanticEvaluator"]


def _need(metadata, attr: str, task: str):
    v = getattr(metadata, attr, None)
    if v is None:
        name = getattr(metadata, "name", "") or "the dataset"
        raise InputError(f"{name} has no {task} ground truth (metadata.{attr} is not set)")
    return v


def _stem(meta: Mapping) -> str:
    return Path(str(meta.get("file_name", meta["image_id"]))).stem


class _Base:
    task = ""

    def __init__(self, metadata, output_dir: Optional[str] = None):
        self.metadata = metadata
        self._own_dir = output_dir is None
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix=f"m2f_{self.task}_"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.reset()

    def reset(self) -> None:
        self._seen: Dict[Any, str] = {}

    def _register(self, meta: Mapping) -> str:
        img_id = meta["image_id"]
        if img_id in self._seen:
            raise InputError(f"{self.task} evaluator: image_id {img_id} processed twice")
        stem = _stem(meta)
        if stem in self._seen.values():
            stem = f"{stem}_{img_id}"
        self._seen[img_id] = stem
        return stem

    def cleanup(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    def __del__(self):  # temp files do not outlive the evaluator
        try:
            self.cleanup()
        except Exception:  # noqa: BLE001, S110 - best effort at interpreter exit
            pass


class PanopticEvaluator(_Base):
    """PQ of panoptic results (``result["panoptic_seg"] = (seg [H, W], segments_info)``)."""

    task = "panoptic"

    def reset(self) -> None:
        super().reset()
        self._anns: List[Dict] = []
        (self.output_dir / "panoptic").mkdir(parents=True, exist_ok=True)

    def process(self, meta: Mapping, result: Mapping) -> None:
        seg, info = result["panoptic_seg"]
        seg = seg.cpu().numpy() if hasattr(seg, "cpu") else np.asarray(seg)
        fname = self._register(meta) + ".png"
        write_png(self.output_dir / "panoptic" / fname, panoptic_to_png(seg))
        c2id = self.metadata.contiguous_to_id
        segs = [{"id": int(s["id"]), "category_id": int(c2id[int(s["category_id"])]),
                 "isthing": int(bool(s.get("isthing", True))), "score": float(s.get("score", 1.0)),
                 "area": int(s.get("area", 0))} for s in info]
        self._anns.append({"image_id": meta["image_id"], "file_name": fname, "segments_info": segs})

    def evaluate(self, engine: str = "hotcoco") -> Dict[str, Any]:
        gt_path = _need(self.metadata, "panoptic_json", "panoptic")
        png_dir = _need(self.metadata, "panoptic_png_dir", "panoptic")
        gt = load_json(gt_path, "ground-truth panoptic JSON")
        if not isinstance(gt, dict) or "annotations" not in gt:
            raise InputError(f"{gt_path}: ground-truth panoptic JSON has no 'annotations'")
        seen = set(self._seen)
        sub = dict(gt)
        sub["annotations"] = [a for a in gt["annotations"] if a.get("image_id") in seen]
        if "images" in gt:
            sub["images"] = [im for im in gt["images"] if im.get("id") in seen]
        unknown = seen - {a.get("image_id") for a in sub["annotations"]}
        if unknown:
            raise InputError(f"{gt_path}: no ground truth for processed image ids {short_list(sorted(unknown, key=str))}")
        pred = {"annotations": self._anns, "categories": gt.get("categories", [])}
        with open(self.output_dir / "predictions.json", "w") as f:
            json.dump(pred, f)
        with open(self.output_dir / "gt_subset.json", "w") as f:
            json.dump(sub, f)
        return evaluate_panoptic(sub, png_dir, pred, self.output_dir / "panoptic", engine=engine)


class InstanceEvaluator(_Base):
    """Mask AP of instance results (``result["instances"] = {"masks", "scores", "labels"}``)."""

    task = "instance"

    def reset(self) -> None:
        super().reset()
        self._results: List[Dict] = []

    def process(self, meta: Mapping, result: Mapping) -> None:
        self._register(meta)
        self._results.extend(instances_to_coco_results(result["instances"], meta["image_id"],
                                                       self.metadata.contiguous_to_id))

    def evaluate(self, engine: str = "hotcoco") -> Dict[str, Any]:
        gt = _need(self.metadata, "instances_json", "instance")
        with open(self.output_dir / "instances_results.json", "w") as f:
            json.dump(self._results, f)
        return evaluate_instances(gt, self._results, engine=engine, img_ids=list(self._seen))


class SemanticEvaluator(_Base):
    """mIoU of semantic results (``result["sem_seg"]`` = scores ``[K, H, W]`` or labels ``[H, W]``);
    the ground truth is ``metadata.sem_seg_dir/<image stem>.png``."""

    task = "semantic"

    def reset(self) -> None:
        super().reset()
        self._pairs: List = []
        (self.output_dir / "semantic").mkdir(parents=True, exist_ok=True)

    def process(self, meta: Mapping, result: Mapping) -> None:
        gt_dir = Path(_need(self.metadata, "sem_seg_dir", "semantic"))
        stem = _stem(meta)
        self._register(meta)
        sem = result["sem_seg"]
        labels = sem.argmax(0) if sem.ndim == 3 else sem
        out = self.output_dir / "semantic" / f"{meta['image_id']}_{stem}.png"
        write_semantic_png(out, labels)
        self._pairs.append((gt_dir / f"{stem}.png", out))

    def evaluate(self, engine: str = "hotcoco") -> Dict[str, Any]:
        md = self.metadata
        if not self._pairs:
            raise InputError("semantic evaluator: no image was processed")
        gts, preds = zip(*self._pairs)
        return evaluate_semantic(list(gts), list(preds), md.num_classes, getattr(md, "ignore_label", 255),
                                 engine=engine, reduce_zero_label=bool(getattr(md, "sem_seg_reduce_zero_label", False)),
                                 class_names=getattr(md, "class_names", None))
