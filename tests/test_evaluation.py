"""Evaluation: hotcoco vs the reference tools (panopticapi, pycocotools) on a small hand-built set,
hand-computed PQ / mIoU, the dataset evaluators, the score CLI and input validation."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from m2f.errors import InputError
from m2f.evaluation import (
    AP_KEYS,
    PQ_KEYS,
    InstanceEvaluator,
    PanopticEvaluator,
    SemanticEvaluator,
    evaluate_instances,
    evaluate_panoptic,
    evaluate_semantic,
    instances_to_coco_results,
    panoptic_to_png,
    proposal_recall,
    rgb2id,
    write_panoptic_predictions,
)
from m2f.evaluation.score import add_score_args, run, score

CATS = [{"id": 1, "name": "cat", "isthing": 1, "color": [220, 20, 60]},
        {"id": 3, "name": "dog", "isthing": 1, "color": [0, 0, 230]},
        {"id": 10, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
        {"id": 12, "name": "grass", "isthing": 0, "color": [0, 200, 0]}]
C2ID = [1, 3, 10, 12]
H, W = 40, 48


@dataclass
class Meta:
    """Stand-in for m2f.data.metadata.DatasetMetadata (duck-typed by the evaluators)."""
    categories: tuple
    contiguous_to_id: tuple
    id_to_contiguous: Dict[int, int]
    is_thing: tuple
    num_classes: int
    class_names: tuple
    ignore_label: int = 255
    panoptic_json: Optional[str] = None
    panoptic_png_dir: Optional[str] = None
    instances_json: Optional[str] = None
    sem_seg_dir: Optional[str] = None
    sem_seg_reduce_zero_label: bool = False
    name: str = "tiny"


def _rle(m):
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def _bbox(m):
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def scene(i: int, pred: bool = False) -> Tuple[np.ndarray, list]:
    """Image i as (segment ids [H, W], segments [(id, category_id, iscrowd)]).  The prediction version
    is the ground truth perturbed: shifted boundaries, a missed object, a false positive, a wrong class,
    different segment ids."""
    seg = np.zeros((H, W), np.int64)
    segs = []
    horizon = 18 + i + (3 if pred and i % 2 else 0)
    off = 50 if pred else 0  # predicted ids differ from the ground truth's
    seg[:horizon] = 1 + off
    seg[horizon:] = 2 + off
    segs += [(1 + off, 10, 0), (2 + off, 12, 0)]
    seg[:2, :] = 0  # void band in the ground truth (and prediction)
    things = [(5, 5, 12, 14, 1), (22 + i, 20, 34, 30 + i, 3), (8, 30, 16, 44, 1 if i != 2 else 3)]
    for j, (y0, x0, y1, x1, c) in enumerate(things):
        if pred:
            if i == 1 and j == 0:
                continue  # missed
            if i == 3 and j == 2:
                c = 3 if c == 1 else 1  # wrong class
            y0, x0 = y0 + (i % 3), x0 + (j % 2) * 2  # shifted
        seg[y0:y1, x0:x1] = 3 + j + off
        segs.append((3 + j + off, c, 0))
    if i == 0 and not pred:  # crowd region of "cat"
        seg[30:38, 2:14] = 9
        segs.append((9, 1, 1))
    if pred and i == 0:  # a predicted cat inside the crowd region (ignored by PQ) ...
        seg[31:37, 3:12] = 9 + off
        segs.append((9 + off, 1, 0))
    if pred and i == 2:  # ... and a false positive dog
        seg[34:38, 40:46] = 11 + off
        segs.append((11 + off, 3, 0))
    present = set(np.unique(seg).tolist())
    return seg, [s for s in segs if s[0] in present]


def write_gt(root: Path, n: int = 4) -> Dict[str, Path]:
    pan_dir, sem_dir = root / "gt_pan", root / "gt_sem"
    pan_dir.mkdir(parents=True)
    sem_dir.mkdir()
    images, anns, inst = [], [], []
    for i in range(n):
        seg, segs = scene(i)
        img_id = 100 + i
        name = f"img{i}"
        Image.fromarray(panoptic_to_png(seg)).save(pan_dir / f"{name}.png")
        sem = np.full((H, W), 255, np.uint8)
        infos = []
        for sid, c, crowd in segs:
            m = seg == sid
            sem[m] = C2ID.index(c)
            infos.append({"id": sid, "category_id": c, "iscrowd": crowd, "area": int(m.sum()), "bbox": _bbox(m)})
            if c in (1, 3):
                inst.append({"id": len(inst) + 1, "image_id": img_id, "category_id": c, "segmentation": _rle(m),
                             "area": int(m.sum()), "bbox": _bbox(m), "iscrowd": crowd})
        Image.fromarray(sem).save(sem_dir / f"{name}.png")
        images.append({"id": img_id, "file_name": f"{name}.jpg", "height": H, "width": W})
        anns.append({"image_id": img_id, "file_name": f"{name}.png", "segments_info": infos})
    pj, ij = root / "gt_panoptic.json", root / "gt_instances.json"
    pj.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    ij.write_text(json.dumps({"images": images, "annotations": inst, "categories": [c for c in CATS if c["isthing"]]}))
    return {"pan_json": pj, "pan_dir": pan_dir, "inst_json": ij, "sem_dir": sem_dir}


def write_pred(root: Path, n: int = 4) -> Dict[str, Path]:
    sem_dir = root / "pred_sem"
    sem_dir.mkdir(parents=True)
    preds, results = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        seg, segs = scene(i, pred=True)
        preds.append({"image_id": 100 + i, "file_name": f"img{i}.png", "panoptic_seg": seg,
                      "segments_info": [{"id": s, "category_id": c} for s, c, _ in segs]})
        sem = np.zeros((H, W), np.uint8)  # void predicted as class 0
        for sid, c, _ in segs:
            sem[seg == sid] = C2ID.index(c)
            if c in (1, 3):
                results.append({"image_id": 100 + i, "category_id": c, "segmentation": _rle(seg == sid),
                                "score": float(rng.uniform(0.3, 1.0))})
        Image.fromarray(sem).save(sem_dir / f"img{i}.png")
        # low-score duplicates / junk
        junk = np.zeros((H, W), bool)
        junk[10 + i:20 + i, 10:25] = True
        results.append({"image_id": 100 + i, "category_id": 3, "segmentation": _rle(junk), "score": 0.05 + 0.01 * i})
    pj, pd = write_panoptic_predictions(preds, root / "pred", json_name="pred_panoptic.json")
    rj = root / "pred_results.json"
    rj.write_text(json.dumps(results))
    return {"pan_json": pj, "pan_dir": pd, "results": rj, "sem_dir": sem_dir, "results_list": results}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    return root, write_gt(root), write_pred(root)


def _close(a, b, tol=1e-9):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= tol


# ----------------------------------------------------------------------------------------------
def test_panoptic_engines_agree(data):
    _, gt, pr = data
    r_h = evaluate_panoptic(gt["pan_json"], gt["pan_dir"], pr["pan_json"], pr["pan_dir"], engine="hotcoco")
    r_r = evaluate_panoptic(gt["pan_json"], gt["pan_dir"], pr["pan_json"], pr["pan_dir"], engine="reference")
    for k in PQ_KEYS:
        assert _close(r_h[k], r_r[k]), (k, r_h[k], r_r[k])
    assert r_h["per_class"].keys() == r_r["per_class"].keys() == {1, 3, 10, 12}
    for cid in r_h["per_class"]:
        for k, v in r_h["per_class"][cid].items():
            assert _close(v, r_r["per_class"][cid][k]), (cid, k)
    assert 20 < r_h["PQ"] < 95 and r_h["n"] == 4 and r_h["n_th"] == 2 and r_h["n_st"] == 2
    # the predicted cat inside the crowd region is not a false positive
    assert r_h["per_class"][1]["FP"] == 0 and r_h["per_class"][1]["FN"] == 2  # missed (img 1), wrong class (img 3)
    assert r_h["per_class"][3]["FP"] == 2  # wrong class (img 3) + false positive (img 2)


def test_panoptic_hand_computed(tmp_path):
    """One image: a thing matched at IoU 0.8 (TP), a stuff segment at IoU 0.4 (FP + FN)."""
    g = np.zeros((10, 20), np.int64)
    g[:, :10] = 1  # thing cat, 100 px
    g[:, 10:] = 2  # stuff sky, 100 px
    p = np.zeros((10, 20), np.int64)
    p[:, 2:10] = 7  # thing: 80 px inside the gt -> IoU 80 / 100 = 0.8
    p[:, :2] = 8  # sky predicted on the left 20 px of the thing
    p[:, 10:14] = 8  # ... and 40 px of the gt sky: IoU 40 / (100 + 60 - 40) = 1/3 -> unmatched
    p[:, 14:] = 9  # grass on the rest of the sky (60 px): false positive, gt sky a false negative
    (tmp_path / "g").mkdir()
    (tmp_path / "p").mkdir()
    Image.fromarray(panoptic_to_png(g)).save(tmp_path / "g" / "a.png")
    Image.fromarray(panoptic_to_png(p)).save(tmp_path / "p" / "a.png")
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 20}], "categories": CATS,
          "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [
              {"id": 1, "category_id": 1, "iscrowd": 0, "area": 100},
              {"id": 2, "category_id": 10, "iscrowd": 0, "area": 100}]}]}
    pred = {"annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [
        {"id": 7, "category_id": 1}, {"id": 8, "category_id": 10}, {"id": 9, "category_id": 12}]}]}
    for engine in ("hotcoco", "reference"):
        r = evaluate_panoptic(gt, tmp_path / "g", pred, tmp_path / "p", engine=engine)
        # cat: TP IoU .8 -> PQ 80; sky: FP 1 FN 1 -> 0; grass: FP 1 -> 0
        assert r["PQ_th"] == pytest.approx(80.0) and r["SQ_th"] == pytest.approx(80.0) and r["RQ_th"] == 100
        assert r["PQ_st"] == 0 and r["RQ_st"] == 0 and r["n_st"] == 2
        assert r["PQ"] == pytest.approx(80.0 / 3) and r["RQ"] == pytest.approx(100.0 / 3)
        assert r["per_class"][10] == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "TP": 0, "FP": 1, "FN": 1}


def test_panoptic_no_stuff_split_is_nan(tmp_path):
    g = np.ones((6, 6), np.int64)
    (tmp_path / "g").mkdir()
    Image.fromarray(panoptic_to_png(g)).save(tmp_path / "g" / "a.png")
    gt = {"categories": CATS[:2], "annotations": [{"image_id": 1, "file_name": "a.png",
                                                   "segments_info": [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 36}]}]}
    for engine in ("hotcoco", "reference"):
        r = evaluate_panoptic(gt, tmp_path / "g", gt, tmp_path / "g", engine=engine)
        assert r["PQ"] == 100 and r["PQ_th"] == 100 and math.isnan(r["PQ_st"]) and r["n_st"] == 0


def test_instance_engines_agree(data):
    _, gt, pr = data
    r_h = evaluate_instances(gt["inst_json"], pr["results"], engine="hotcoco")
    r_r = evaluate_instances(gt["inst_json"], pr["results"], engine="reference")
    for k in AP_KEYS + ("AR1", "AR10", "AR100"):
        assert _close(r_h[k], r_r[k], 1e-6), (k, r_h[k], r_r[k])
    for cid in (1, 3):
        assert _close(r_h["per_class"][cid], r_r["per_class"][cid], 1e-6)
    assert 10 < r_h["AP"] < 90
    # perfect results give AP 100; restricting to some images works
    gtd = json.loads(Path(gt["inst_json"]).read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "score": 1.0} for a in gtd["annotations"] if not a["iscrowd"]]
    for engine in ("hotcoco", "reference"):
        assert evaluate_instances(gtd, perfect, engine=engine)["AP"] == pytest.approx(100.0)
        r1 = evaluate_instances(gtd, [p for p in perfect if p["image_id"] == 101], engine=engine, img_ids=[101])
        assert r1["AP"] == pytest.approx(100.0)
        assert evaluate_instances(gtd, [], engine=engine)["AP"] == 0.0


def test_proposal_recall(data):
    _, gt, pr = data
    gtd = json.loads(Path(gt["inst_json"]).read_text())
    # class-agnostic: the wrong-class prediction still recalls its object
    props = [{**r, "category_id": 1} for r in pr["results_list"]]
    a_h = proposal_recall(gtd, props, engine="hotcoco")
    a_r = proposal_recall(gtd, props, engine="reference")
    assert a_h == pytest.approx(a_r, abs=1e-6) and 30 < a_h < 100
    perfect = [{"image_id": a["image_id"], "segmentation": a["segmentation"], "score": 0.5}
               for a in gtd["annotations"] if not a["iscrowd"]]
    assert proposal_recall(gtd, perfect) == pytest.approx(100.0)
    half = [p for k, p in enumerate(perfect) if k % 2 == 0]
    exp = 100.0 * len(half) / len(perfect)  # every image has its results: missing objects recall 0
    assert proposal_recall(gtd, half, img_ids=[100, 101, 102, 103]) == pytest.approx(exp)
    img0 = [p for p in perfect if p["image_id"] == 100]  # 3 objects (+ a crowd region)
    for engine in ("hotcoco", "reference"):
        assert proposal_recall(gtd, img0, max_dets=1, engine=engine) == pytest.approx(100.0 / 3)
        assert proposal_recall(gtd, img0, max_dets=100, engine=engine) == pytest.approx(100.0)


def test_semantic_hand_computed():
    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 2], [255, 255, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 1, 1], [3, 3, 2, 2]])
    # ignore pixels dropped. class 0: gt 3 px, tp 2, pred 2 -> IoU 2/3; class 1: gt 3, tp 3, pred 5 -> 3/5;
    # class 2: gt 3, tp 2, pred 2 -> 2/4 = 1/2... pred 2 at (1,1) is ignored -> pred 2 count = 2 -> 2/3
    # class 3: never in the gt (only predicted on ignored pixels) -> excluded (NaN)
    for engine in ("hotcoco", "reference"):
        r = evaluate_semantic([gt], [pred], num_classes=4, engine=engine, class_names=["a", "b", "c", "d"])
        iou = [2 / 3, 3 / 5, 2 / 3]
        assert r["IoU"]["a"] == pytest.approx(100 * iou[0]) and r["IoU"]["b"] == pytest.approx(100 * iou[1])
        assert r["IoU"]["c"] == pytest.approx(100 * iou[2]) and math.isnan(r["IoU"]["d"])
        assert r["mIoU"] == pytest.approx(100 * np.mean(iou))
        assert r["pACC"] == pytest.approx(100 * 7 / 9)
        assert r["mACC"] == pytest.approx(100 * np.mean([2 / 3, 1, 2 / 3]))
        assert r["fwIoU"] == pytest.approx(100 * np.mean(iou))  # equal gt frequencies


def test_semantic_engines_agree_and_reduce_zero(data):
    _, gt, pr = data
    r_h = evaluate_semantic(gt["sem_dir"], pr["sem_dir"], num_classes=4, engine="hotcoco")
    r_r = evaluate_semantic(gt["sem_dir"], pr["sem_dir"], num_classes=4, engine="reference")
    for k in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert r_h[k] == pytest.approx(r_r[k], abs=1e-9)
    assert 50 < r_h["mIoU"] < 100 and r_h["num_images"] == 4
    g = np.array([[0, 1, 2], [3, 255, 1]])  # ADE20K style: 0 = other (ignored), v -> v - 1
    p = np.array([[2, 0, 1], [2, 0, 1]])  # last pixel wrong
    r = evaluate_semantic([g], [p], num_classes=3, reduce_zero_label=True, engine="reference")
    assert r["pACC"] == pytest.approx(100 * 3 / 4)


# ----------------------------------------------------------------------------------------------
def _meta(gt) -> Meta:
    return Meta(categories=tuple(CATS), contiguous_to_id=tuple(C2ID), id_to_contiguous={c: k for k, c in enumerate(C2ID)},
                is_thing=(True, True, False, False), num_classes=4, class_names=tuple(c["name"] for c in CATS),
                panoptic_json=str(gt["pan_json"]), panoptic_png_dir=str(gt["pan_dir"]),
                instances_json=str(gt["inst_json"]), sem_seg_dir=str(gt["sem_dir"]))


def _result_from(seg: np.ndarray, segs, score_rng) -> dict:
    """A postprocess-like result dict built from a (perturbed) segment map."""
    info, masks, labels = [], [], []
    out = torch.zeros(seg.shape, dtype=torch.int32)
    sem = torch.zeros((4, *seg.shape))
    for k, (sid, c, _) in enumerate(segs):
        m = torch.from_numpy(seg == sid)
        out[m] = k + 1
        info.append({"id": k + 1, "category_id": C2ID.index(c), "isthing": c in (1, 3), "score": 0.9, "area": int(m.sum())})
        sem[C2ID.index(c)][m] = 1.0
        if c in (1, 3):
            masks.append(m)
            labels.append(C2ID.index(c))
    inst = {"masks": torch.stack(masks) if masks else torch.zeros(0, *seg.shape, dtype=torch.bool),
            "scores": torch.tensor(score_rng.uniform(0.3, 1.0, len(masks)), dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.long)}
    return {"panoptic_seg": (out, info), "instances": inst, "sem_seg": sem}


def test_dataset_evaluators(data):
    _, gt, _ = data
    md = _meta(gt)
    # perfect predictions (ground truth, crowd removed) -> 100 everywhere
    evs = [PanopticEvaluator(md), InstanceEvaluator(md), SemanticEvaluator(md)]
    rng = np.random.default_rng(0)
    for i in range(4):
        seg, segs = scene(i)
        segs = [s for s in segs if not s[2]]
        seg = np.where(np.isin(seg, [s[0] for s in segs]), seg, 0)
        r = _result_from(seg, segs, rng)
        for ev in evs:
            ev.process({"image_id": 100 + i, "file_name": f"img{i}.jpg", "orig_size": (H, W)}, r)
    for engine in ("hotcoco", "reference"):
        pq, ap, sem = (ev.evaluate(engine=engine) for ev in evs)
        assert pq["PQ"] == pytest.approx(100.0) and ap["AP"] == pytest.approx(100.0)
        assert sem["mIoU"] == pytest.approx(100.0)  # void gt pixels are ignored
    # imperfect predictions on a subset of the images: the evaluators score only what they saw
    evs = [PanopticEvaluator(md), InstanceEvaluator(md)]
    for i in (1, 2):
        r = _result_from(*scene(i, pred=True), rng)
        for ev in evs:
            ev.process({"image_id": 100 + i, "file_name": f"img{i}.jpg", "orig_size": (H, W)}, r)
    a, b = evs[0].evaluate("hotcoco"), evs[0].evaluate("reference")
    assert all(_close(a[k], b[k]) for k in PQ_KEYS) and a["PQ"] < 100
    a, b = evs[1].evaluate("hotcoco"), evs[1].evaluate("reference")
    assert all(_close(a[k], b[k], 1e-6) for k in AP_KEYS) and a["AP"] < 100
    with pytest.raises(InputError, match="twice"):
        evs[0].process({"image_id": 101, "file_name": "img1.jpg", "orig_size": (H, W)}, r)
    no_gt = Meta(**{**md.__dict__, "instances_json": None})
    with pytest.raises(InputError, match="no instance ground truth"):
        InstanceEvaluator(no_gt).evaluate()


def test_instances_to_coco_results():
    inst = {"masks": torch.zeros(2, 5, 6, dtype=torch.bool), "scores": torch.tensor([0.5, 0.25]),
            "labels": torch.tensor([2, 0])}
    inst["masks"][0, 1:3, 2:5] = True
    out = instances_to_coco_results(inst, 7, C2ID)
    assert [o["category_id"] for o in out] == [10, 1] and out[0]["image_id"] == 7
    assert np.array_equal(mask_util.decode(out[0]["segmentation"]), inst["masks"][0].numpy().astype(np.uint8))
    assert isinstance(out[0]["segmentation"]["counts"], str) and out[1]["score"] == 0.25


def test_score_cli(data, capsys):
    _, gt, pr = data
    p = argparse.ArgumentParser()
    add_score_args(p)
    args = p.parse_args(["panoptic", "--gt", f"{gt['pan_json']}:{gt['pan_dir']}",
                         "--pred", f"{pr['pan_json']}:{pr['pan_dir']}", "--json", "--engine", "reference"])
    assert run(args) == 0
    out = json.loads(capsys.readouterr().out)
    ref = evaluate_panoptic(gt["pan_json"], gt["pan_dir"], pr["pan_json"], pr["pan_dir"])
    assert out["PQ"] == pytest.approx(ref["PQ"]) and out["task"] == "panoptic"
    assert run(p.parse_args(["instance", "--gt", str(gt["inst_json"]), "--pred", str(pr["results"])])) == 0
    assert "AP50" in capsys.readouterr().out
    r = score("semantic", str(gt["sem_dir"]), str(pr["sem_dir"]), num_classes=4)
    assert r["mIoU"] == pytest.approx(evaluate_semantic(gt["sem_dir"], pr["sem_dir"], 4)["mIoU"])
    with pytest.raises(InputError, match="num-classes"):
        score("semantic", str(gt["sem_dir"]), str(pr["sem_dir"]))
    with pytest.raises(InputError, match="JSON:PNG_DIR"):
        score("panoptic", "nope", "nope")


def test_cli_mount(data, capsys):
    from m2f import cli

    _, gt, pr = data
    rc = cli.main(["score", "semantic", "--gt", str(gt["sem_dir"]), "--pred", str(pr["sem_dir"]),
                   "--num-classes", "4", "--json"])
    assert rc == 0 and "mIoU" in json.loads(capsys.readouterr().out)


def test_score_takes_task_as_eval_and_predict_do(data, capsys):
    """``m2f score --task T`` (the spelling of eval / predict) scores as the positional form does;
    the two forms given with different tasks, or no task, are refused."""
    from m2f import cli

    _, gt, pr = data
    args = ["--gt", f"{gt['pan_json']}:{gt['pan_dir']}", "--pred", f"{pr['pan_json']}:{pr['pan_dir']}", "--json"]
    assert cli.main(["score", "--task", "panoptic", *args]) == 0
    flag = json.loads(capsys.readouterr().out)
    assert cli.main(["score", "panoptic", *args]) == 0
    pos = json.loads(capsys.readouterr().out)
    ref = evaluate_panoptic(gt["pan_json"], gt["pan_dir"], pr["pan_json"], pr["pan_dir"])
    assert flag["task"] == pos["task"] == "panoptic"
    assert flag["PQ"] == pytest.approx(ref["PQ"]) and pos["PQ"] == pytest.approx(ref["PQ"])
    assert cli.main(["score", "semantic", "--task", "panoptic", *args]) == 2
    assert "disagree" in capsys.readouterr().err
    assert cli.main(["score", *args]) == 2
    assert "--task" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# bad inputs: InputError naming the file
def _copy_pred(tmp_path, pr, mutate_json=None, mutate_png=None):
    d = json.loads(Path(pr["pan_json"]).read_text())
    pd = tmp_path / "pp"
    pd.mkdir()
    for f in Path(pr["pan_dir"]).glob("*.png"):
        (pd / f.name).write_bytes(f.read_bytes())
    if mutate_json:
        mutate_json(d)
    if mutate_png:
        mutate_png(pd)
    pj = tmp_path / "pp.json"
    pj.write_text(json.dumps(d))
    return pj, pd


def _drop_first_segment(d):
    d["annotations"][0]["segments_info"].pop(0)


def _add_segment(d):
    d["annotations"][0]["segments_info"].append({"id": 4242, "category_id": 1})


def _bad_category(d):
    d["annotations"][0]["segments_info"][0]["category_id"] = 999


def _bad_image(d):
    d["annotations"][0]["image_id"] = 555


def _missing_key(d):
    del d["annotations"][1]["segments_info"]


def _broken_png(pd):
    (pd / "img2.png").write_bytes(b"not a png at all")


def _missing_png(pd):
    (pd / "img3.png").unlink()


@pytest.mark.parametrize("mj,mp,match,where", [
    (_drop_first_segment, None, "in the PNG but not in segments_info", "pp/img0.png"),
    (_add_segment, None, "not in its PNG", "pp.json"),
    (_bad_category, None, "category_id 999", "pp.json"),
    (_bad_image, None, "image ids not in the ground truth", "pp.json"),
    (_missing_key, None, "missing key", "pp.json"),
    (None, _broken_png, "cannot be read", "img2.png"),
    (None, _missing_png, "not found", "img3.png"),
])
def test_panoptic_bad_inputs(data, tmp_path, mj, mp, match, where):
    _, gt, pr = data
    pj, pd = _copy_pred(tmp_path, pr, mj, mp)
    for engine in ("hotcoco", "reference"):
        with pytest.raises(InputError, match=match) as e:
            evaluate_panoptic(gt["pan_json"], gt["pan_dir"], pj, pd, engine=engine)
        assert where in str(e.value)


def test_panoptic_bad_files(data, tmp_path):
    _, gt, pr = data
    with pytest.raises(InputError, match="nope.json.*not found"):
        evaluate_panoptic(tmp_path / "nope.json", gt["pan_dir"], pr["pan_json"], pr["pan_dir"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json.*not valid JSON"):
        evaluate_panoptic(gt["pan_json"], gt["pan_dir"], tmp_path / "bad.json", pr["pan_dir"])
    with pytest.raises(InputError, match="nodir.*no such directory"):
        evaluate_panoptic(gt["pan_json"], gt["pan_dir"], pr["pan_json"], tmp_path / "nodir")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="list.json"):
        evaluate_panoptic(tmp_path / "list.json", gt["pan_dir"], pr["pan_json"], pr["pan_dir"])
    d = json.loads(Path(pr["pan_json"]).read_text())
    d["annotations"] = d["annotations"][:3]
    (tmp_path / "short.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="short.json: no prediction for ground-truth image ids 103"):
        evaluate_panoptic(gt["pan_json"], gt["pan_dir"], tmp_path / "short.json", pr["pan_dir"])
    with pytest.raises(InputError, match="engine"):
        evaluate_panoptic(gt["pan_json"], gt["pan_dir"], pr["pan_json"], pr["pan_dir"], engine="fast")


def test_instance_bad_inputs(data, tmp_path):
    _, gt, pr = data
    res = json.loads(Path(pr["results"]).read_text())
    cases = [
        (lambda r: r[0].update(category_id=10), "category_id 10"),  # a stuff id is not an instance category
        (lambda r: r[0].update(image_id=7), "image ids not in the ground truth"),
        (lambda r: r[0].pop("score"), "missing key"),
        (lambda r: r[0].update(segmentation=[[1, 2, 3]]), "RLE"),
        (lambda r: r[0]["segmentation"].update(size=[3, 3]), "mask size"),
    ]
    for k, (mut, match) in enumerate(cases):
        r = json.loads(json.dumps(res))
        mut(r)
        f = tmp_path / f"res{k}.json"
        f.write_text(json.dumps(r))
        with pytest.raises(InputError, match=match) as e:
            evaluate_instances(gt["inst_json"], f)
        assert f"res{k}.json" in str(e.value)
    bad_gt = json.loads(Path(gt["inst_json"]).read_text())
    del bad_gt["annotations"][0]["iscrowd"]
    (tmp_path / "bad_gt.json").write_text(json.dumps(bad_gt))
    with pytest.raises(InputError, match="bad_gt.json.*iscrowd"):
        evaluate_instances(tmp_path / "bad_gt.json", pr["results"])
    with pytest.raises(InputError, match="missing.json"):
        evaluate_instances(gt["inst_json"], tmp_path / "missing.json")


def test_semantic_bad_inputs(data, tmp_path):
    _, gt, pr = data
    pd = tmp_path / "ps"
    pd.mkdir()
    for f in Path(pr["sem_dir"]).glob("*.png"):
        (pd / f.name).write_bytes(f.read_bytes())
    bad = np.asarray(Image.open(pd / "img1.png")).copy()
    bad[0, 0] = 7
    Image.fromarray(bad).save(pd / "img1.png")
    with pytest.raises(InputError, match=r"img1.png: label values 7 are out of range"):
        evaluate_semantic(gt["sem_dir"], pd, num_classes=4)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(pd / "img1.png")
    with pytest.raises(InputError, match="img1.png: prediction is 5x5"):
        evaluate_semantic(gt["sem_dir"], pd, num_classes=4)
    (pd / "img1.png").unlink()
    with pytest.raises(InputError, match="no prediction for ground-truth label maps img1.png"):
        evaluate_semantic(gt["sem_dir"], pd, num_classes=4)
    (pd / "img1.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="img1.png.*cannot be read"):
        evaluate_semantic(gt["sem_dir"], pd, num_classes=4)
    (pd / "img1.png").unlink()
    Image.fromarray(np.zeros((H, W), np.uint8)).save(pd / "img1.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(pd / "extra.png")
    with pytest.raises(InputError, match="extra.png.*no ground truth"):
        evaluate_semantic(gt["sem_dir"], pd, num_classes=4)
    # the ground truth, with 3 classes declared, holds label 3
    with pytest.raises(InputError, match="img.\\.png: label values 3"):
        evaluate_semantic(gt["sem_dir"], gt["sem_dir"], num_classes=3)


# ----------------------------------------------------------------------------------------------
def test_synth_engines_agree(tmp_path):
    from m2f.data import synth

    paths = synth.write_synth(tmp_path / "synth", images=1, val_images=6, size=64, seed=3)
    gt = json.loads(Path(paths["val_panoptic_json"]).read_text())
    rng = np.random.default_rng(1)
    preds = []
    for a in gt["annotations"]:
        ids = rgb2id(np.asarray(Image.open(Path(paths["val_panoptic_dir"]) / a["file_name"])))
        ids = np.roll(ids, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))  # shifted boundaries
        segs = [dict(s) for s in a["segments_info"]]
        if len(segs) > 2:  # drop one segment (void there) and flip a class
            drop = segs.pop(int(rng.integers(len(segs))))
            ids[ids == drop["id"]] = 0
            segs[0]["category_id"] = gt["categories"][int(rng.integers(len(gt["categories"])))]["id"]
        present = set(np.unique(ids).tolist())
        segs = [s for s in segs if s["id"] in present]
        preds.append({"image_id": a["image_id"], "file_name": a["file_name"], "panoptic_seg": ids, "segments_info": segs})
    pj, pd = write_panoptic_predictions(preds, tmp_path / "pred")
    r_h = evaluate_panoptic(paths["val_panoptic_json"], paths["val_panoptic_dir"], pj, pd, engine="hotcoco")
    r_r = evaluate_panoptic(paths["val_panoptic_json"], paths["val_panoptic_dir"], pj, pd, engine="reference")
    for k in PQ_KEYS:
        assert _close(r_h[k], r_r[k]), k
    assert 10 < r_h["PQ"] < 100


# ----------------------------------------------------------------------------------------------
def test_overlays():
    from m2f.viz import overlay_instances, overlay_panoptic, overlay_semantic

    md = _meta({"pan_json": None, "pan_dir": None, "inst_json": None, "sem_dir": None})
    md.colors = tuple(tuple(c["color"]) for c in CATS)
    img = np.full((60, 80, 3), 100, np.uint8)
    seg = np.zeros((60, 80), np.int32)
    seg[:20] = 1
    seg[30:58, 5:60] = 2
    info = [{"id": 1, "category_id": 2, "isthing": False}, {"id": 2, "category_id": 0, "isthing": True, "score": 0.87}]
    out = np.asarray(overlay_panoptic(img, torch.from_numpy(seg), info, md))
    k = 9  # 60 px -> drawn at 540 x 720 (the shorter side upscaled to >= 512)
    assert out.shape == (60 * k, 80 * k, 3) and out.dtype == np.uint8

    def px(y, x):  # the drawn pixel at the centre of input pixel (y, x)
        return out[y * k + k // 2, x * k + k // 2]

    sky = np.asarray(CATS[2]["color"], np.float32)
    assert np.allclose(px(5, 2), 0.5 * 100 + 0.5 * sky, atol=1)  # blended stuff colour
    assert (out[20 * k - 1, 40 * k] == 255).all() and (out[30 * k, 30 * k] == 255).all()  # contours
    assert (px(25, 70) == 100).all()  # void untouched
    centre = out[38 * k:50 * k, 15 * k:50 * k]
    assert (centre == 0).all(-1).any() and (centre > 200).all(-1).any()  # black label box with light text
    native = np.asarray(overlay_panoptic(img, torch.from_numpy(seg), info, md, min_side=0))
    assert native.shape == (60, 80, 3) and np.allclose(native[5, 2], 0.5 * 100 + 0.5 * sky, atol=1)
    inst = {"masks": torch.from_numpy(np.stack([seg == 2, seg == 1])), "scores": torch.tensor([0.9, 0.3]),
            "labels": torch.tensor([1, 0])}
    out = np.asarray(overlay_instances(img, inst, md))
    assert (px(5, 2) == 100).all() and not (px(35, 8) == 100).all()  # low score not drawn
    out = np.asarray(overlay_semantic(img, seg.astype(np.int64), md))
    assert not (px(25, 70) == 100).all()  # class 0 region drawn


def test_overlay_of_a_small_image_is_legible():
    """A 128 px prediction is drawn at >= 512 px; each label box is a small fraction of the drawing and
    its text is of a readable height; a 6 x 6 px segment keeps its colour (no label on it)."""
    from m2f.viz import draw_segments, upscale_factor

    img = np.full((128, 128, 3), 90, np.uint8)
    big = np.zeros((128, 128), bool)
    big[10:120, 10:70] = True
    tiny = np.zeros((128, 128), bool)
    tiny[60:66, 90:96] = True
    colors = [(0, 200, 0), (250, 0, 250)]
    out = np.asarray(draw_segments(img, [big, tiny], colors, ["a long class name 0.97", "small thing 0.51"]))
    k = upscale_factor(128, 128)
    assert k == 4 and out.shape == (512, 512, 3)
    # label boxes: pure black rectangles (nothing else in this drawing is black)
    black = (out == 0).all(-1)
    from scipy import ndimage

    lab, n = ndimage.label(ndimage.binary_closing(black, iterations=3))
    assert n == 2
    for i in range(1, n + 1):
        ys, xs = np.nonzero(lab == i)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert 0.001 < h * w / out[..., 0].size < 0.03  # a bounded fraction of the drawing
        assert 10 <= h <= 40  # text height follows the drawing: readable, not the whole picture
    # the small segment's pixels (inside its contour) all keep the segment colour
    inner = tiny.repeat(k, 0).repeat(k, 1)
    for _ in range(2):
        inner = ndimage.binary_erosion(inner)
    want = 0.5 * 90 + 0.5 * np.asarray(colors[1], np.float32)
    assert inner.sum() > 200 and np.allclose(out[inner], want, atol=1)
    # the big segment's label sits inside it, covering at most a quarter of it
    big_up = big.repeat(k, 0).repeat(k, 1)
    on_big = black & big_up
    assert 0 < on_big.sum() <= 0.25 * big_up.sum()


def test_evaluation_batches_only_images_of_one_size_and_scores_as_batch_one():
    """evaluate_model's batches (same_size_batches) keep the dataset's order, never mix image sizes
    (no image is padded for another), and score exactly as one image per forward."""
    from m2f.config import get_preset
    from m2f.evaluate import evaluate_model, same_size_batches
    from m2f.models.build import build_model

    sizes = [(64, 64), (64, 64), (64, 96), (64, 64), (64, 64), (64, 64), (32, 32)]
    ds = [{"image": torch.zeros(3, h, w), "i": i} for i, (h, w) in enumerate(sizes)]
    batches = [[item["i"] for item in b] for b in same_size_batches(ds, 2)]
    assert batches == [[0, 1], [2], [3, 4], [5], [6]]
    assert [[item["i"] for item in b] for b in same_size_batches(ds, 1)] == [[i] for i in range(7)]

    cfg = get_preset("tiny", ["data.synth_images=8", "data.synth_val_images=6", "data.synth_size=64",
                              "data.image_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a few large logits so that some queries pass the score thresholds
        model.transformer_decoder.class_embed.bias.copy_(torch.linspace(-2.0, 4.0, cfg.num_classes + 1))
    one = evaluate_model(model, cfg, batch_size=1)
    four = evaluate_model(model, cfg, batch_size=4)
    for task in ("panoptic", "instance", "semantic"):
        for k, v in one[task].items():
            if isinstance(v, float):
                assert four[task][k] == pytest.approx(v, abs=1e-9, nan_ok=True), (task, k)
    with pytest.raises(InputError, match="batch_size"):
        evaluate_model(model, cfg, batch_size=0)
