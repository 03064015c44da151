"""Tests of m2f.data: synthetic dataset, loaders, transforms, collate and the resumable sampler."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from m2f.config import get_preset
from m2f.data.catalog import get_dataset, list_datasets
from m2f.data.collate import TrainingSampler, build_loader, collate
from m2f.data.datasets import CocoInstancesDataset, CocoPanopticDataset, SemanticDataset
from m2f.data.synth import CATEGORIES, ensure_synth, synth_cache_dir, write_synth
from m2f.data.transforms import LargeScaleJitter, ResizeShortestEdgeCrop, TestResize, crop, drop_empty
from m2f.errors import InputError

SIZE = 64
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2


def _files(root: Path):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, images=10, val_images=4, size=SIZE, seed=0)
    return root


@pytest.fixture
def copy(synth, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may corrupt."""
    dst = tmp_path / "s"
    shutil.copytree(synth, dst)
    return dst


def _cfg(task="panoptic", **kw):
    ov = {"data.task": task, "data.image_size": SIZE, **kw}
    return get_preset("tiny", [f"{k}={v}" for k, v in ov.items()])


def _pan_ids(path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


# ---------------------------------------------------------------------------------------------
# Synthetic dataset
# ---------------------------------------------------------------------------------------------
def test_synth_deterministic(synth, tmp_path):
    again = tmp_path / "again"
    write_synth(again, images=10, val_images=4, size=SIZE, seed=0)
    files = _files(synth)
    assert files == _files(again)
    assert len([f for f in files if f.parts[:2] == ("train", "images")]) == 10
    for f in files:
        assert (synth / f).read_bytes() == (again / f).read_bytes(), f
    other = tmp_path / "other"
    write_synth(other, images=10, val_images=4, size=SIZE, seed=1)
    differ = [f for f in files if f.suffix == ".png" and (synth / f).read_bytes() != (other / f).read_bytes()]
    assert len(differ) >= 0.9 * len([f for f in files if f.suffix == ".png"])
    assert (synth / "done").exists()


def test_synth_formats_consistent(synth):
    for split, n in (("train", 10), ("val", 4)):
        d = synth / split
        pan = json.loads((d / "panoptic.json").read_text())
        inst = json.loads((d / "instances.json").read_text())
        cats = {c["id"]: c for c in pan["categories"]}
        assert sorted(cats) == [1, 2, 3, 5, 7, 9, 20, 21, 22]
        contig = {cid: k for k, cid in enumerate(sorted(cats))}
        assert len(pan["images"]) == len(pan["annotations"]) == n
        inst_by_image = {}
        for a in inst["annotations"]:
            inst_by_image.setdefault(a["image_id"], []).append(a)
        n_things = 0
        for ann in pan["annotations"]:
            ids = _pan_ids(d / "panoptic" / ann["file_name"])
            image = np.asarray(Image.open(d / "images" / ann["file_name"]))
            assert image.shape == (SIZE, SIZE, 3) and ids.shape == (SIZE, SIZE)
            sem = np.asarray(Image.open(d / "semantic" / ann["file_name"]))
            assert sem.dtype == np.uint8
            expect_sem = np.full(ids.shape, 255, np.uint8)
            assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
            things = []
            for s in ann["segments_info"]:
                m = ids == s["id"]
                assert s["area"] == int(m.sum()) > 0
                ys, xs = np.nonzero(m)
                assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                expect_sem[m] = contig[s["category_id"]]
                if cats[s["category_id"]]["isthing"]:
                    things.append(m)
            np.testing.assert_array_equal(sem, expect_sem)
            rles = inst_by_image.get(ann["image_id"], [])
            assert len(rles) == len(things)
            for a, m in zip(rles, things):
                dec = mask_util.decode(dict(a["segmentation"], counts=a["segmentation"]["counts"].encode()))
                np.testing.assert_array_equal(dec.astype(bool), m)
                assert a["area"] == int(m.sum())
            n_things += len(things)
        assert n_things >= n  # several objects per image on average


def test_synth_has_small_objects_and_all_classes():
    from m2f.data.synth import render_scene

    cats, areas, n = set(), [], 0
    for i in range(40):
        _, _, segs = render_scene(np.random.default_rng([5, 0, i]), 128)
        for s in segs:
            cats.add(s["category_id"])
            if s["category_id"] < 20:
                areas.append(s["area"])
                n += 1
    assert cats == {c["id"] for c in CATEGORIES}
    assert min(areas) < 40 and max(areas) > 1000
    assert n / 40 >= 3


def test_ensure_synth_cache_and_race(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = synth_cache_dir(32, 2, 1, 3)
    assert str(d).startswith(str(tmp_path / "cache" / "m2f"))
    results = []
    ts = [threading.Thread(target=lambda: results.append(ensure_synth(32, 2, 1, 3))) for _ in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert results == [d, d]
    assert (d / "done").exists() and len(list((d / "train" / "images").iterdir())) == 2
    assert [p.name for p in d.parent.iterdir()] == [d.name]  # no temp folders left
    mtime = (d / "done").stat().st_mtime_ns
    assert ensure_synth(32, 2, 1, 3) == d and (d / "done").stat().st_mtime_ns == mtime  # not regenerated


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------
def test_loaders_all_formats(synth):
    tr = synth / "train"
    pan = json.loads((tr / "panoptic.json").read_text())
    cfg = _cfg("panoptic")
    ds = get_dataset(f"coco_panoptic:{tr}/panoptic.json:{tr}/panoptic:{tr}/images", "val", cfg)
    md = ds.metadata
    assert md.num_classes == 9 and list(md.contiguous_to_id) == [1, 2, 3, 5, 7, 9, 20, 21, 22]
    assert md.id_to_contiguous[20] == 6 and md.is_thing == (True,) * 6 + (False,) * 3
    assert md.thing_classes == ("square", "disc", "triangle", "ring", "cross", "star")
    assert md.stuff_classes == ("sky", "grass", "water") and md.panoptic_json.endswith("panoptic.json")
    inst = get_dataset(f"coco_instances:{tr}/instances.json:{tr}/images", "val", _cfg("instance"))
    sem = get_dataset(f"semantic:{tr}/images:{tr}/semantic:9", "val", _cfg("semantic"))
    assert len(ds) == len(inst) == len(sem) == 10
    assert inst.metadata.num_classes == 6 and sem.metadata.num_classes == 9
    for i, ann in enumerate(pan["annotations"]):
        it = ds[i]
        segs = ann["segments_info"]
        assert it["image"].shape == (3, SIZE, SIZE) and it["image"].dtype == torch.uint8
        assert it["masks"].shape == (len(segs), SIZE, SIZE) and it["masks"].dtype == torch.bool
        assert it["labels"].tolist() == [md.id_to_contiguous[s["category_id"]] for s in segs]
        assert it["is_thing"].tolist() == [s["category_id"] < 20 for s in segs]
        assert it["image_id"] == ann["image_id"] and it["orig_size"] == (SIZE, SIZE)
        assert it["masks"].sum((1, 2)).tolist() == [s["area"] for s in segs]
        # instances: the thing masks, labels in the 6-class contiguous space (same ids as the panoptic)
        ii = inst[i]
        assert ii["masks"].shape[0] == sum(s["category_id"] < 20 for s in segs)
        torch.testing.assert_close(ii["masks"], it["masks"][it["is_thing"]])
        torch.testing.assert_close(ii["labels"], it["labels"][it["is_thing"]])
        # semantic: one mask per class present, matching the panoptic sem_seg
        si = sem[i]
        classes = sorted(set(it["labels"].tolist()))
        assert si["labels"].tolist() == classes and not si["is_thing"].any()
        torch.testing.assert_close(si["sem_seg"], it["sem_seg"])
        for k, m in zip(si["labels"], si["masks"]):
            torch.testing.assert_close(m, it["masks"][it["labels"] == k].any(0))


def test_registered_synth_and_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ov = {"data.synth_images": 3, "data.synth_val_images": 2, "data.synth_size": 32, "data.image_size": 32}
    assert {"synth", "synth_val", "coco_2017_train_panoptic", "ade20k_sem_seg_val"} <= set(list_datasets())
    tr = get_dataset("synth", "train", _cfg(**ov))
    va = get_dataset("synth_val", "val", _cfg(**ov))
    assert len(tr) == 3 and len(va) == 2 and tr.metadata.sem_seg_dir and va.metadata.instances_json
    inst = get_dataset("synth", "train", _cfg("instance", **ov))
    assert inst.metadata.num_classes == 6 and all(bool(inst[(i, 0)]["is_thing"].all()) for i in range(len(inst)))
    sem = get_dataset("synth_val", "val", _cfg("semantic", **ov))
    for i in range(2):
        x = sem[i]
        assert x["labels"].tolist() == sorted(set(x["sem_seg"].unique().tolist()) - {255})


def test_instances_polygons_and_crowd(copy):
    tr = copy / "train"
    d = json.loads((tr / "instances.json").read_text())
    first = d["annotations"][0]
    img = next(im for im in d["images"] if im["id"] == first["image_id"])
    idx = d["images"].index(img)
    n0 = sum(a["image_id"] == img["id"] for a in d["annotations"])
    first["iscrowd"] = 1  # excluded from the targets, ignored in sem_seg
    d["annotations"].append({"id": 10**6, "image_id": img["id"], "category_id": 7, "iscrowd": 0, "area": 100,
                             "bbox": [2, 2, 10, 10], "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})
    (tr / "instances.json").write_text(json.dumps(d))
    ds = CocoInstancesDataset(tr / "instances.json", tr / "images")
    it = ds[idx]
    assert it["masks"].shape[0] == n0  # -1 crowd, +1 polygon
    assert it["labels"][-1] == ds.metadata.id_to_contiguous[7] == 4
    poly = it["masks"][-1]
    assert poly[3:12, 3:12].all() and not poly[14:].any() and not poly[:, 14:].any()
    # training split drops images without a non-crowd annotation
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != d["images"][0]["id"]]
    (tr / "instances.json").write_text(json.dumps(d))
    assert len(CocoInstancesDataset(tr / "instances.json", tr / "images", filter_empty=True)) == 9
    assert len(get_dataset(f"coco_instances:{tr}/instances.json:{tr}/images", "val", _cfg("instance"))) == 10
    crowd = mask_util.decode(dict(first["segmentation"], counts=first["segmentation"]["counts"].encode())).astype(bool)
    assert (it["sem_seg"][torch.from_numpy(crowd) & ~poly] == 255).all()


def test_reduce_zero_label(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "im" / "a.jpg")
    lab = np.zeros((8, 8), np.uint8)
    lab[:4] = 1
    lab[4:, :4] = 3
    Image.fromarray(lab).save(tmp_path / "lb" / "a.png")
    cfg = _cfg("semantic")
    ds = get_dataset(f"semantic:{tmp_path}/im:{tmp_path}/lb:3:reduce_zero_label", "val", cfg)
    x = ds[0]
    assert x["labels"].tolist() == [0, 2] and (x["sem_seg"][4:, 4:] == 255).all() and (x["sem_seg"][:4] == 0).all()
    with pytest.raises(InputError, match=r"a\.png.*outside 0\.\.1"):
        get_dataset(f"semantic:{tmp_path}/im:{tmp_path}/lb:2", "val", cfg)[0]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _pan_ds(root, task="panoptic"):
    tr = root / "train"
    return CocoPanopticDataset(tr / "panoptic.json", tr / "panoptic", tr / "images", task=task)


def test_error_corrupt_and_missing_image(copy):
    bad = copy / "train" / "images" / "000002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = _pan_ds(copy)
    with pytest.raises(InputError, match="000002.png.*cannot be read"):
        ds[1]
    (copy / "train" / "images" / "000003.png").unlink()
    with pytest.raises(InputError, match="000003.png.*not found"):
        ds[2]
    ds[0]  # others still load


def test_error_wrong_size_annotation(copy):
    p = copy / "train" / "panoptic" / "000001.png"
    Image.open(p).resize((SIZE, SIZE + 2), Image.NEAREST).save(p)
    with pytest.raises(InputError, match=r"panoptic/000001\.png.*66x64.*64x64"):
        _pan_ds(copy)[0]
    s = copy / "train" / "semantic" / "000001.png"
    Image.open(s).resize((10, 10), Image.NEAREST).save(s)
    tr = copy / "train"
    with pytest.raises(InputError, match=r"semantic/000001\.png.*10x10"):
        SemanticDataset(tr / "images", tr / "semantic", 9)[0]
    d = json.loads((tr / "instances.json").read_text())
    d["annotations"][0]["segmentation"]["size"] = [5, 5]
    (tr / "instances.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"instances\.json: annotation 1 .*size \[5, 5\]"):
        CocoInstancesDataset(tr / "instances.json", tr / "images")[0]


def test_error_unknown_category(copy):
    tr = copy / "train"
    d = json.loads((tr / "panoptic.json").read_text())
    d["annotations"][0]["segments_info"][0]["category_id"] = 4
    (tr / "panoptic.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"panoptic\.json.*category_id 4 which is not in 'categories'"):
        _pan_ds(copy)
    d = json.loads((tr / "instances.json").read_text())
    d["annotations"][0]["category_id"] = 20  # a stuff id is not an instances category
    (tr / "instances.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"instances\.json.*category_id 20"):
        CocoInstancesDataset(tr / "instances.json", tr / "images")


def test_error_segment_id_mismatch(copy):
    tr = copy / "train"
    d = json.loads((tr / "panoptic.json").read_text())
    seg = d["annotations"][1]["segments_info"][0]
    seg["id"] = 4242
    (tr / "panoptic.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"000002\.png: segment ids do not match.*\[4242\]"):
        _pan_ds(copy)[1]


def test_error_bad_specs(synth):
    cfg = _cfg()
    for spec in ("nope", "coco_panoptic:a:b", "semantic:a:b:x", "semantic:a:b:3:bogus", ""):
        with pytest.raises(InputError) as e:
            get_dataset(spec, "train", cfg)
        assert "coco_panoptic:JSON:PNG_DIR:IMAGE_DIR" in str(e.value) or "NUM_CLASSES" in str(e.value) \
            or "reduce_zero_label" in str(e.value)
    with pytest.raises(InputError, match="missing.json.*not found"):
        get_dataset(f"coco_instances:{synth}/missing.json:{synth}/train/images", "train", cfg)
    with pytest.raises(InputError, match="nodir.*directory not found"):
        get_dataset(f"semantic:{synth}/nodir:{synth}/train/semantic:9", "train", cfg)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------
def _painted(H=48, W=80):
    """An image whose red channel is 250 exactly on the mask of object 0 (and sem_seg class 3 there)."""
    img = torch.zeros(3, H, W, dtype=torch.uint8)
    m = torch.zeros(2, H, W, dtype=torch.bool)
    m[0, 10:30, 20:50] = True
    m[1, 35:45, 60:75] = True
    img[0][m[0]] = 250
    img[1][m[1]] = 250
    sem = torch.full((H, W), 255, dtype=torch.int64)
    sem[m[0]] = 3
    sem[m[1]] = 1
    return {"image": img, "masks": m, "labels": torch.tensor([3, 1]), "is_thing": torch.tensor([True, False]),
            "sem_seg": sem, "image_id": 7}


def _check_aligned(out):
    img, masks, sem = out["image"], out["masks"], out["sem_seg"]
    for k, lab in enumerate(out["labels"].tolist()):
        ch = 0 if lab == 3 else 1
        inside = img[ch][masks[k]].float()
        assert inside.mean() > 200, (inside.mean(), k)
        assert (sem[masks[k]] == lab).all()
    red = img[0] > 200
    if 3 in out["labels"].tolist():
        m0 = masks[out["labels"].tolist().index(3)]
        disagree = (red ^ m0).sum().item()
        assert disagree <= 0.25 * m0.sum().item() + 4  # only boundary pixels may differ
    else:
        assert red.sum() <= 8  # object gone from the crop: at most a few boundary pixels


@pytest.mark.parametrize("seed", range(12))
def test_lsj_sizes_and_alignment(seed):
    t = LargeScaleJitter(64, 0.3, 2.0, flip=True)
    out = t(_painted(), torch.Generator().manual_seed(seed))
    assert out["image"].shape == (3, 64, 64) and out["sem_seg"].shape == (64, 64)
    assert out["masks"].shape[1:] == (64, 64) and out["masks"].shape[0] == out["labels"].shape[0] == out["is_thing"].shape[0]
    assert out["image_id"] == 7
    _check_aligned(out)
    again = t(_painted(), torch.Generator().manual_seed(seed))
    assert torch.equal(out["image"], again["image"]) and torch.equal(out["masks"], again["masks"])


def test_lsj_padding_and_flip():
    s = _painted(32, 32)
    out = LargeScaleJitter(64, 1.0, 1.0, flip=False)(s, torch.Generator().manual_seed(0))
    # 32x32 -> 64x64 exactly (scale 1 of 64): no padding needed.
    assert out["image"].shape == (3, 64, 64) and (out["sem_seg"] != 255).any()
    out = LargeScaleJitter(64, 0.5, 0.5, flip=False)(s, torch.Generator().manual_seed(0))
    assert (out["image"][:, 32:, :] == 128).all() and (out["sem_seg"][:, 32:] == 255).all()
    assert not out["masks"][:, 32:].any() and not out["masks"][:, :, 32:].any()
    flips = {bool(LargeScaleJitter(64, 1, 1)(s, torch.Generator().manual_seed(k))["masks"][0, 20:60, 40:].any())
             for k in range(16)}
    assert flips == {True, False}  # object 0 (x 20..50 at 48x80 scale x2) lands left or right


def test_all_objects_cropped_away():
    s = _painted(48, 80)
    out = drop_empty(crop(s, 0, 0, 8, 8))
    assert out["masks"].shape == (0, 8, 8) and out["labels"].shape == (0,) and out["is_thing"].shape == (0,)
    # Through LSJ: a big zoom with a tiny object leaves some crops empty.
    s["masks"] = s["masks"][:1].clone().zero_()
    s["masks"][0, 0:3, 0:3] = True
    s["labels"], s["is_thing"] = s["labels"][:1], s["is_thing"][:1]
    ns = [LargeScaleJitter(32, 3.0, 3.0, flip=False)(s, torch.Generator().manual_seed(k))["masks"].shape[0]
          for k in range(8)]
    assert 0 in ns
    empty = next(LargeScaleJitter(32, 3.0, 3.0, flip=False)(s, torch.Generator().manual_seed(k))
                 for k in range(8) if ns[k] == 0)
    b = collate([empty, empty], (0, 0, 0), (1, 1, 1), 32)
    assert b["targets"][0]["masks"].shape == (0, 32, 32) and b["targets"][0]["labels"].dtype == torch.int64


@pytest.mark.parametrize("seed", range(6))
def test_semantic_transform(seed):
    t = ResizeShortestEdgeCrop(32, 0.5, 2.0, flip=True, cat_max_ratio=0.9, color_aug=False)
    out = t(_painted(), torch.Generator().manual_seed(seed))
    assert out["image"].shape == (3, 32, 32) and out["sem_seg"].shape == (32, 32)
    _check_aligned(out)
    out2 = ResizeShortestEdgeCrop(32, color_aug=True)(_painted(), torch.Generator().manual_seed(seed))
    assert out2["image"].shape == (3, 32, 32) and out2["image"].dtype == torch.uint8


def test_semantic_short_side_choice():
    t = ResizeShortestEdgeCrop(40, 0.5, 2.0, flip=False)
    s = _painted(48, 80)
    seen = set()
    for k in range(40):
        g = torch.Generator().manual_seed(k)
        x = int(torch.randint(5, 21, (), generator=g))
        out = t(s, torch.Generator().manual_seed(k))
        short = int(x * 0.1 * 40)
        seen.add(short)
        valid = (out["image"] != 128).any(0)  # the crop of the resized image; 128 = padding
        h = int(valid.any(1).nonzero().max()) + 1
        assert h == min(short, 40) and out["image"].shape == (3, 40, 40)
    assert seen <= {int(x * 0.1 * 40) for x in range(5, 21)} and len(seen) > 5


def test_test_resize():
    s = _painted(48, 80)
    assert TestResize(0, 0)(s)["image"].shape == (3, 48, 80)
    out = TestResize(24, 0)(s)
    assert out["image"].shape == (3, 24, 40) and out["masks"].shape == (2, 24, 40)
    assert TestResize(96, 100)(s)["image"].shape == (3, 60, 100)
    _check_aligned(TestResize(24, 0)(s))


def test_dataset_item_seeded(synth):
    tr = synth / "train"
    cfg = _cfg(**{"data.min_scale": 0.5, "data.max_scale": 1.5})
    ds = get_dataset(f"coco_panoptic:{tr}/panoptic.json:{tr}/panoptic:{tr}/images", "train", cfg)
    a, b, c = ds[(3, 11)], ds[(3, 11)], ds[(3, 12)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    assert not torch.equal(a["image"], c["image"])
    torch.manual_seed(5)
    d = ds[3]
    torch.manual_seed(5)
    assert torch.equal(d["image"], ds[3]["image"])
    assert a["orig_size"] == (SIZE, SIZE) and a["image"].shape == (3, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------
# Collate and sampler
# ---------------------------------------------------------------------------------------------
def test_collate_normalise_and_pad():
    a = {"image": torch.full((3, 20, 30), 100, dtype=torch.uint8), "labels": torch.tensor([2]),
         "masks": torch.ones(1, 20, 30, dtype=torch.bool), "image_id": 1, "orig_size": (20, 30)}
    b = {"image": torch.full((3, 40, 10), 200, dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 40, 10, dtype=torch.bool), "image_id": 2, "orig_size": (40, 10)}
    out = collate([a, b], (100.0, 50.0, 0.0), (2.0, 2.0, 2.0), size_divisibility=32)
    assert out["images"].shape == (2, 3, 64, 32) and out["image_sizes"] == [(20, 30), (40, 10)]
    assert out["images"][0, :, :20, :30].flatten(1).unique(dim=1).tolist() == [[0.0], [25.0], [50.0]]
    assert (out["images"][0, :, 20:] == 0).all() and (out["images"][1, :, :, 10:] == 0).all()
    assert out["targets"][0]["masks"].shape == (1, 64, 32) and out["targets"][0]["masks"].sum() == 600
    assert out["targets"][1]["masks"].shape == (0, 64, 32)
    assert out["meta"][1] == {"image_id": 2, "orig_size": (40, 10)}


def test_training_sampler_resume_and_ranks():
    full = TrainingSampler(10, 3, seed=4)
    it = iter(full)
    batches = [next(it) for _ in range(12)]
    resumed = iter(TrainingSampler(10, 3, seed=4, start_iter=7))
    assert [next(resumed) for _ in range(5)] == batches[7:]
    # every index once per epoch (3 full epochs = 30 positions = 10 iterations)
    flat = [i for b in batches[:10] for i, _ in b]
    for e in range(3):
        assert sorted(flat[10 * e : 10 * e + 10]) == list(range(10))
    assert len({s for b in batches for _, s in b}) == 36  # distinct item seeds
    assert [i for i, _ in TrainingSampler(10, 3, seed=5).batch_at(0)] != [i for i, _ in batches[0]] or \
        [i for i, _ in TrainingSampler(10, 3, seed=5).batch_at(1)] != [i for i, _ in batches[1]]
    # two ranks split the stream: together they see what one rank with twice the batch sees
    r0, r1 = TrainingSampler(10, 2, seed=4, rank=0, world_size=2), TrainingSampler(10, 2, seed=4, rank=1, world_size=2)
    one = TrainingSampler(10, 4, seed=4)
    for i in range(6):
        assert r0.batch_at(i) + r1.batch_at(i) == one.batch_at(i)


def test_build_loader_resume(synth):
    tr = synth / "train"
    ds = get_dataset(f"coco_panoptic:{tr}/panoptic.json:{tr}/panoptic:{tr}/images", "train", _cfg())
    first = build_loader(ds, 2, seed=1)
    it = iter(first)
    run = [next(it) for _ in range(4)]
    it2 = iter(build_loader(ds, 2, seed=1, start_iter=2))
    for want in run[2:]:
        got = next(it2)
        assert torch.equal(got["images"], want["images"])
        assert [m["image_id"] for m in got["meta"]] == [m["image_id"] for m in want["meta"]]
        for tg, tw in zip(got["targets"], want["targets"]):
            assert torch.equal(tg["masks"], tw["masks"]) and torch.equal(tg["labels"], tw["labels"])
    ev = list(build_loader(ds, 4, train=False))
    assert [m["image_id"] for b in ev for m in b["meta"]] == list(range(1, 11))
