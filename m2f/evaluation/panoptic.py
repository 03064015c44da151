"""Panoptic quality (PQ, SQ, RQ; all / things / stuff; per class) on COCO panoptic files.

Engines: ``"hotcoco"`` (hotcoco.panoptic.PanopticEval, Rust, default) and ``"reference"``
(panopticapi's own per-image matcher ``pq_compute_multi_core`` and ``PQStat.pq_average``).
Numbers are on detectron2's 0-100 scale.  A split with no category to average (e.g. no stuff class
in the data) is NaN (panopticapi would divide by zero).  Inputs are validated first so that a bad
file gives an :class:`~m2f.errors.InputError` naming it, not a deep library traceback.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from m2f.errors import InputError
from m2f.evaluation._io import (
    PathLike,
    check_keys,
    image_size,
    load_json,
    panoptic_to_png,
    quiet,
    read_panoptic_png,
    require_dir,
    short_list,
    write_png,
)

__all__ = ["evaluate_panoptic", "validate_panoptic", "write_panoptic_predictions", "PQ_KEYS", "ENGINES"]

ENGINES = ("hotcoco", "reference")
PQ_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise InputError(f"engine {engine!r}: expected one of {list(ENGINES)}")
    return engine


def _as_dict(obj: Union[PathLike, Mapping, list], what: str) -> Tuple[Any, str]:
    if isinstance(obj, (Mapping, list)):
        return obj, f"<{what} in memory>"
    return load_json(obj, what), str(obj)


def validate_panoptic(gt_json, gt_png_dir: PathLike, pred_json, pred_png_dir: PathLike,
                      check_gt_pngs: bool = False) -> Tuple[Dict, Dict]:
    """Load and check a ground-truth / prediction pair of COCO panoptic files.

    gt_json / pred_json: a path or an already loaded dict (``pred_json`` may also be a bare list of
    annotations).  Checks: files and folders exist; JSON has ``annotations`` (+ ``categories`` for
    the ground truth) with ``image_id``, ``file_name``, ``segments_info`` (``id``, ``category_id``);
    category ids are known; every ground-truth image has exactly one prediction and no prediction
    names an unknown image; each predicted PNG is readable, has the ground truth's size and holds
    exactly the segment ids of its ``segments_info`` (the ground-truth PNGs too with ``check_gt_pngs``).
    Returns ``(gt, pred)`` dicts.
    """
    gt, gt_name = _as_dict(gt_json, "ground-truth panoptic JSON")
    pred, pred_name = _as_dict(pred_json, "prediction panoptic JSON")
    gt_dir = require_dir(gt_png_dir, "ground-truth panoptic PNG folder")
    pred_dir = require_dir(pred_png_dir, "prediction panoptic PNG folder")
    check_keys(gt, ("annotations", "categories"), "the top level", gt_name)
    if isinstance(pred, list):
        pred = {"annotations": pred}
    check_keys(pred, ("annotations",), "the top level", pred_name)
    for name, d in ((gt_name, gt), (pred_name, pred)):
        if not isinstance(d["annotations"], list):
            raise InputError(f"{name}: 'annotations' must be a list")
    cats = gt["categories"]
    if not isinstance(cats, list) or not cats:
        raise InputError(f"{gt_name}: 'categories' must be a non-empty list")
    for i, c in enumerate(cats):
        check_keys(c, ("id", "isthing"), f"categories[{i}]", gt_name)
    cat_ids = {int(c["id"]) for c in cats}

    def check_anns(d, name, seg_keys):
        by_img: Dict[int, Dict] = {}
        for i, a in enumerate(d["annotations"]):
            check_keys(a, ("image_id", "file_name", "segments_info"), f"annotations[{i}]", name)
            if not isinstance(a["segments_info"], list):
                raise InputError(f"{name}: annotations[{i}].segments_info must be a list")
            seen = set()
            for j, s in enumerate(a["segments_info"]):
                check_keys(s, seg_keys, f"annotations[{i}].segments_info[{j}]", name)
                if int(s["category_id"]) not in cat_ids:
                    raise InputError(f"{name}: annotations[{i}] (image_id {a['image_id']}) segment {s['id']} has "
                                     f"category_id {s['category_id']}, not in the ground-truth categories "
                                     f"{short_list(sorted(cat_ids), 10)}")
                if int(s["id"]) in seen:
                    raise InputError(f"{name}: annotations[{i}] (image_id {a['image_id']}) repeats segment id {s['id']}")
                seen.add(int(s["id"]))
            if a["image_id"] in by_img:
                raise InputError(f"{name}: image_id {a['image_id']} has more than one annotation")
            by_img[a["image_id"]] = a
        return by_img

    gt_by = check_anns(gt, gt_name, ("id", "category_id", "iscrowd", "area"))  # panopticapi reads both
    pred_by = check_anns(pred, pred_name, ("id", "category_id"))
    extra = sorted(set(pred_by) - set(gt_by), key=str)
    if extra:
        raise InputError(f"{pred_name}: predictions for image ids not in the ground truth {gt_name}: {short_list(extra)}")
    missing = sorted(set(gt_by) - set(pred_by), key=str)
    if missing:
        raise InputError(f"{pred_name}: no prediction for ground-truth image ids {short_list(missing)}")

    for img_id, g in gt_by.items():
        p = pred_by[img_id]
        gpath = gt_dir / g["file_name"]
        ppath = pred_dir / p["file_name"]
        if check_gt_pngs:
            gids = read_panoptic_png(gpath, "ground-truth panoptic PNG")
            gshape = gids.shape
            _check_ids(gids, g, gpath, gt_name)
        else:
            gshape = image_size(gpath, "ground-truth panoptic PNG")
        pids = read_panoptic_png(ppath, "prediction panoptic PNG")
        if pids.shape != tuple(gshape):
            raise InputError(f"{ppath}: prediction PNG is {pids.shape[0]}x{pids.shape[1]} but the ground truth "
                             f"{gpath} is {gshape[0]}x{gshape[1]} (image_id {img_id})")
        _check_ids(pids, p, ppath, pred_name)
    return gt, pred


def _check_ids(ids: np.ndarray, ann: Mapping, png_path: Path, json_name: str) -> None:
    in_png = set(np.unique(ids).tolist()) - {0}
    in_json = {int(s["id"]) for s in ann["segments_info"]}
    if in_png - in_json:
        raise InputError(f"{png_path}: segment ids {short_list(sorted(in_png - in_json))} are in the PNG but not in "
                         f"segments_info of image_id {ann['image_id']} in {json_name}")
    if in_json - in_png:
        raise InputError(f"{json_name}: segments_info of image_id {ann['image_id']} lists segment ids "
                         f"{short_list(sorted(in_json - in_png))} that are not in its PNG {png_path}")


# ----------------------------------------------------------------------------------------------
def _package(splits: Dict[str, Tuple[float, float, float, int]], per_class: Dict[int, Dict[str, float]]) -> Dict:
    out: Dict[str, Any] = {}
    for suffix, key in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
        pq, sq, rq, n = splits[key]
        for name, v in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            out[name + suffix] = 100.0 * v if n > 0 else float("nan")
        out["n" + suffix] = n
    out["per_class"] = per_class
    return out


def _engine_hotcoco(gt: Dict, pred: Dict, gt_dir: str, pred_dir: str) -> Dict:
    from hotcoco import panoptic as hp

    ev = hp.PanopticEval(gt, pred, gt_folder=str(gt_dir), pred_folder=str(pred_dir))
    try:
        ev.evaluate()
    except ValueError as e:
        raise InputError(f"panoptic evaluation of {pred_dir} against {gt_dir} failed: {e}") from None
    r = ev.results()
    splits = {k: (r[k]["pq"], r[k]["sq"], r[k]["rq"], int(r[k]["n"])) for k in ("All", "Things", "Stuff")}
    per_class = {}
    for cid, c in r["per_class"].items():
        if c["tp"] + c["fp"] + c["fn"] == 0:
            continue
        per_class[int(cid)] = {"PQ": 100 * c["pq"], "SQ": 100 * c["sq"], "RQ": 100 * c["rq"],
                               "TP": int(c["tp"]), "FP": int(c["fp"]), "FN": int(c["fn"])}
    return _package(splits, per_class)


def _engine_reference(gt: Dict, pred: Dict, gt_dir: str, pred_dir: str) -> Dict:
    from panopticapi.evaluation import PQStat, pq_compute_single_core

    categories = {int(c["id"]): c for c in gt["categories"]}
    pred_by = {a["image_id"]: a for a in pred["annotations"]}
    matched = [(g, pred_by[g["image_id"]]) for g in gt["annotations"]]
    # panopticapi's own per-image matcher; chunks over a process pool like its pq_compute_multi_core,
    # but the pool is closed afterwards (theirs is left open) and small sets stay in-process.
    n_proc = min(os.cpu_count() or 1, max(1, len(matched) // 64))
    chunks = [matched[i::n_proc] for i in range(n_proc)]
    try:
        with quiet():
            if n_proc == 1:
                stat = pq_compute_single_core(0, matched, str(gt_dir), str(pred_dir), categories)
            else:
                with multiprocessing.get_context("fork").Pool(n_proc) as pool:
                    parts = pool.starmap(pq_compute_single_core,
                                         [(i, c, str(gt_dir), str(pred_dir), categories) for i, c in enumerate(chunks)])
                stat = PQStat()
                for part in parts:
                    stat += part
    except Exception as e:  # noqa: BLE001 - panopticapi raises bare Exception/KeyError
        raise InputError(f"panoptic evaluation of {pred_dir} against {gt_dir} failed: {e}") from None
    splits = {}
    for key, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        cats = {cid: c for cid, c in categories.items() if isthing is None or bool(c["isthing"]) == isthing}
        n = sum(1 for cid in cats if stat.pq_per_cat[cid].tp + stat.pq_per_cat[cid].fp + stat.pq_per_cat[cid].fn > 0)
        if n == 0:  # panopticapi divides by zero here
            splits[key] = (float("nan"),) * 3 + (0,)
            continue
        res, _ = stat.pq_average(cats, isthing=isthing)
        splits[key] = (res["pq"], res["sq"], res["rq"], int(res["n"]))
    per_class = {}
    _, pc = stat.pq_average(categories, isthing=None)
    for cid in categories:
        s = stat.pq_per_cat[cid]
        if s.tp + s.fp + s.fn == 0:
            continue
        per_class[cid] = {"PQ": 100 * pc[cid]["pq"], "SQ": 100 * pc[cid]["sq"], "RQ": 100 * pc[cid]["rq"],
                          "TP": int(s.tp), "FP": int(s.fp), "FN": int(s.fn)}
    return _package(splits, per_class)


def evaluate_panoptic(gt_json, gt_png_dir: PathLike, pred_json, pred_png_dir: PathLike,
                      engine: str = "hotcoco", validate: bool = True) -> Dict[str, Any]:
    """Score COCO panoptic predictions.

    gt_json / pred_json: paths or loaded dicts; *_png_dir: folders with the PNGs named by each
    annotation's ``file_name``.  Returns ``{"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"}`` (0-100),
    ``n``, ``n_th``, ``n_st`` (categories averaged) and ``per_class`` ``{category_id: {"PQ", "SQ",
    "RQ", "TP", "FP", "FN"}}`` for categories present in the ground truth or the predictions.
    """
    check_engine(engine)
    if validate:
        gt, pred = validate_panoptic(gt_json, gt_png_dir, pred_json, pred_png_dir)
    else:
        gt, _ = _as_dict(gt_json, "ground-truth panoptic JSON")
        pred, _ = _as_dict(pred_json, "prediction panoptic JSON")
        pred = {"annotations": pred} if isinstance(pred, list) else pred
    fn = _engine_hotcoco if engine == "hotcoco" else _engine_reference
    return fn(gt, pred, str(gt_png_dir), str(pred_png_dir))


# ----------------------------------------------------------------------------------------------
def write_panoptic_predictions(predictions: Sequence[Mapping], out_dir: PathLike,
                               contiguous_to_id: Optional[Sequence[int]] = None,
                               json_name: str = "predictions.json") -> Tuple[Path, Path]:
    """Write COCO panoptic prediction files.

    predictions: dicts ``{"image_id", "file_name" (PNG name), "panoptic_seg" (int [H, W] array or
    tensor, 0 = void), "segments_info" (dicts with "id", "category_id", optional "isthing", "score",
    "area")}``; ``category_id`` is contiguous when ``contiguous_to_id`` is given (mapped to dataset
    ids), else already a dataset id.  Writes ``out_dir/<json_name>`` and PNGs under ``out_dir/panoptic``.
    Returns ``(json_path, png_dir)``.
    """
    out = Path(out_dir)
    png_dir = out / "panoptic"
    png_dir.mkdir(parents=True, exist_ok=True)
    anns = []
    for p in predictions:
        seg = p["panoptic_seg"]
        seg = seg.cpu().numpy() if hasattr(seg, "cpu") else np.asarray(seg)
        write_png(png_dir / p["file_name"], panoptic_to_png(seg))
        segs = []
        for s in p["segments_info"]:
            d = {k: v for k, v in s.items() if k in ("id", "category_id", "isthing", "score", "area")}
            d["id"] = int(d["id"])
            cid = int(s["category_id"])
            d["category_id"] = int(contiguous_to_id[cid]) if contiguous_to_id is not None else cid
            segs.append(d)
        anns.append({"image_id": p["image_id"], "file_name": p["file_name"], "segments_info": segs})
    json_path = out / json_name
    with open(json_path, "w") as f:
        json.dump({"annotations": anns}, f)
    return json_path, png_dir
