"""COCO mask AP (segm) and class-agnostic proposal recall (AR@100, paper Fig 3).

Engines: ``"hotcoco"`` (hotcoco.COCOeval, default) and ``"reference"`` (pycocotools COCOeval).
Numbers on the 0-100 scale like detectron2.  Inputs are validated first (InputError naming the file).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from m2f.errors import InputError
from m2f.evaluation._io import check_keys, load_json, quiet, short_list
from m2f.evaluation.panoptic import check_engine

__all__ = ["evaluate_instances", "proposal_recall", "instances_to_coco_results", "AP_KEYS"]

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _load_gt(gt_json) -> Tuple[Dict, str]:
    if isinstance(gt_json, Mapping):
        gt, name = gt_json, "<ground-truth instances in memory>"
    else:
        gt, name = load_json(gt_json, "ground-truth instances JSON"), str(gt_json)
    check_keys(gt, ("images", "annotations", "categories"), "the top level", name)
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt[key], list):
            raise InputError(f"{name}: {key!r} must be a list")
    for i, im in enumerate(gt["images"]):
        check_keys(im, ("id", "height", "width"), f"images[{i}]", name)
    for i, c in enumerate(gt["categories"]):
        check_keys(c, ("id",), f"categories[{i}]", name)
    img_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for i, a in enumerate(gt["annotations"]):
        check_keys(a, ("id", "image_id", "category_id", "segmentation", "area", "iscrowd"), f"annotations[{i}]", name)
        if a["image_id"] not in img_ids:
            raise InputError(f"{name}: annotations[{i}] refers to image_id {a['image_id']} not in 'images'")
        if a["category_id"] not in cat_ids:
            raise InputError(f"{name}: annotations[{i}] has category_id {a['category_id']} not in 'categories'")
    return gt, name


def _load_results(results, gt: Mapping, gt_name: str) -> Tuple[List[Dict], str]:
    if isinstance(results, list):
        res, name = results, "<instance results in memory>"
    else:
        res, name = load_json(results, "instance results JSON"), str(results)
        if isinstance(res, Mapping) and "annotations" in res:
            res = res["annotations"]
    if not isinstance(res, list):
        raise InputError(f"{name}: expected a JSON list of results {{image_id, category_id, segmentation, score}}")
    img_size = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    bad_img = set()
    for i, r in enumerate(res):
        check_keys(r, ("image_id", "category_id", "segmentation", "score"), f"result [{i}]", name)
        if r["image_id"] not in img_size:
            bad_img.add(r["image_id"])
            continue
        if r["category_id"] not in cat_ids:
            raise InputError(f"{name}: result [{i}] has category_id {r['category_id']}, not in the categories of "
                             f"{gt_name} ({short_list(sorted(cat_ids), 10)})")
        seg = r["segmentation"]
        if not (isinstance(seg, Mapping) and "size" in seg and "counts" in seg):
            raise InputError(f"{name}: result [{i}] segmentation must be an RLE dict with 'size' and 'counts'")
        if tuple(seg["size"]) != tuple(img_size[r["image_id"]]):
            raise InputError(f"{name}: result [{i}] mask size {list(seg['size'])} differs from image_id "
                             f"{r['image_id']}'s size {list(img_size[r['image_id']])} in {gt_name}")
    if bad_img:
        raise InputError(f"{name}: results for image ids not in the ground truth {gt_name}: {short_list(sorted(bad_img, key=str))}")
    return res, name


def _run_cocoeval(gt: Dict, res: List[Dict], engine: str, img_ids: Optional[Sequence[int]],
                  max_dets: Optional[int] = None) -> Tuple[np.ndarray, Any]:
    """Run segm COCOeval; returns (stats [12], evaluator).  With ``max_dets`` the evaluator keeps
    only ``[max_dets]`` detections per image and is not summarised (stats empty): read ``eval["recall"]``."""
    res = copy.deepcopy(res)  # loadRes adds fields in place
    if engine == "reference":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with quiet():
            cg = COCO()
            cg.dataset = copy.deepcopy(dict(gt))
            cg.createIndex()
            cd = cg.loadRes(res) if res else COCO()
            if not res:
                cd.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]), "annotations": []}
                cd.createIndex()
            ev = COCOeval(cg, cd, "segm")
            if img_ids is not None:
                ev.params.imgIds = sorted(img_ids)
            if max_dets is not None:
                ev.params.maxDets = [max_dets]
            ev.evaluate()
            ev.accumulate()
            if max_dets is None:
                ev.summarize()
        return np.asarray(ev.stats if max_dets is None else [], dtype=float), ev
    import hotcoco

    with quiet():
        cg = hotcoco.COCO(dict(gt))
        cd = cg.load_res(res)
        ev = hotcoco.COCOeval(cg, cd, "segm")
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        if max_dets is not None:
            ev.params.maxDets = [max_dets]
        ev.evaluate()
        ev.accumulate()
        if max_dets is None:
            ev.summarize()
    return np.asarray(ev.stats if max_dets is None else [], dtype=float), ev


def _per_class_ap(ev, gt: Mapping) -> Dict[int, float]:
    """Per-category AP (IoU .50:.95, all areas, maxDets 100) from the accumulated precision array."""
    e = ev.eval
    prec = np.asarray(e["precision"])  # [T, R, K, A, M]
    cat_ids = list(ev.params.catIds)
    out = {}
    for k, cid in enumerate(cat_ids):
        p = prec[:, :, k, 0, -1]
        p = p[p > -1]
        out[int(cid)] = float(100 * p.mean()) if p.size else float("nan")
    return out


def evaluate_instances(gt_json, results, engine: str = "hotcoco",
                       img_ids: Optional[Iterable[int]] = None, per_class: bool = True) -> Dict[str, Any]:
    """Mask AP of COCO instance results.

    gt_json: COCO instances JSON (path or dict); results: a results JSON path or a list of
    ``{"image_id", "category_id" (dataset id), "segmentation" (RLE), "score"}``; img_ids: restrict to
    these images (default: every ground-truth image).  Returns ``{"AP", "AP50", "AP75", "APs", "APm",
    "APl", "AR1", "AR10", "AR100", "per_class": {category_id: AP}}`` (0-100; -100 = undefined, as COCOeval).
    """
    check_engine(engine)
    gt, gt_name = _load_gt(gt_json)
    res, _ = _load_results(results, gt, gt_name)
    ids = None if img_ids is None else sorted(set(img_ids))
    stats, ev = _run_cocoeval(gt, res, engine, ids)
    out: Dict[str, Any] = {k: float(100 * v) for k, v in zip(AP_KEYS + ("AR1", "AR10", "AR100"), stats[:9])}
    if per_class:
        try:
            out["per_class"] = _per_class_ap(ev, gt)
        except (AttributeError, KeyError, TypeError):  # pragma: no cover - engine without eval["precision"]
            out["per_class"] = {}
    return out


def proposal_recall(gt_json, results, max_dets: int = 100, engine: str = "hotcoco",
                    img_ids: Optional[Iterable[int]] = None) -> float:
    """Class-agnostic mask AR@``max_dets`` (0-100) of proposals (paper Fig 3): every ground-truth
    category and every result are merged into one class; crowd regions stay ignored.

    results: list (or JSON path) of ``{"image_id", "segmentation", "score"}`` (``category_id`` ignored);
    img_ids: images to score (default: the images that have results).
    """
    check_engine(engine)
    gt, gt_name = _load_gt(gt_json)
    if not isinstance(results, list):
        results = load_json(results, "proposals JSON")
    agn_gt = {"images": gt["images"], "categories": [{"id": 1, "name": "object"}],
              "annotations": [{**a, "category_id": 1} for a in gt["annotations"]]}
    res = [{**r, "category_id": 1} for r in results]
    res, _ = _load_results(res, agn_gt, gt_name)
    ids = sorted({r["image_id"] for r in res}) if img_ids is None else sorted(set(img_ids))
    if not ids:
        return 0.0
    _, ev = _run_cocoeval(agn_gt, res, engine, ids, max_dets=max_dets)
    recall = np.asarray(ev.eval["recall"])[:, :, 0, -1]  # [T IoU thresholds, 1 class], area "all"
    recall = recall[recall > -1]
    return float(100 * recall.mean()) if recall.size else 0.0


def instances_to_coco_results(instances: Mapping, image_id: int, contiguous_to_id: Optional[Sequence[int]] = None
                              ) -> List[Dict[str, Any]]:
    """One image's ``{"masks" bool [n, H, W], "scores" [n], "labels" [n] (contiguous)}`` -> COCO results
    with RLE ``segmentation`` (``counts`` as str, JSON-ready) and dataset ``category_id``."""
    from pycocotools import mask as mask_util

    masks = instances["masks"]
    masks = masks.cpu().numpy() if hasattr(masks, "cpu") else np.asarray(masks)
    scores = instances["scores"]
    scores = scores.tolist() if hasattr(scores, "tolist") else list(scores)
    labels = instances["labels"]
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    if len(scores) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))  # [H, W, n] -> n RLEs
    out = []
    for rle, s, l in zip(rles, scores, labels):
        rle["counts"] = rle["counts"].decode("ascii")
        cid = int(contiguous_to_id[int(l)]) if contiguous_to_id is not None else int(l)
        out.append({"image_id": image_id, "category_id": cid, "segmentation": rle, "score": float(s)})
    return out
