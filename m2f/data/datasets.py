"""Dataset loaders: COCO panoptic, COCO instances and semantic label maps, all producing one item format.

An item (after augmentation)::

    image     uint8 [3, H, W]
    labels    int64 [N]        contiguous ids (metadata.contiguous_to_id maps back)
    masks     bool  [N, H, W]
    is_thing  bool  [N]
    sem_seg   int64 [H, W]     contiguous ids, 255 = ignore
    image_id  int
    file_name str              the image path
    orig_size (h, w)           before any resize
    (+ "pan_seg_file_name" / "sem_seg_file_name" when the dataset has such ground truth)

Targets depend on ``task``: ``"panoptic"`` = every non-crowd segment (things and stuff);
``"instance"`` = non-crowd thing segments only; ``"semantic"`` = one mask per class present in
``sem_seg`` (as the official semantic mapper).  Crowd regions never become targets.

Augmentation randomness: ``ds[i]`` draws a seed from torch's global RNG (which the trainer seeds per
item); ``ds[(i, seed)]`` or ``ds.get(i, seed)`` uses ``seed`` explicitly.

Bad input raises :class:`m2f.errors.InputError` naming the file and the problem.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from m2f.data.metadata import DatasetMetadata
from m2f.errors import InputError

__all__ = [
    "SegmentationDataset", "CocoPanopticDataset", "CocoInstancesDataset", "SemanticDataset",
    "read_image", "read_label_png", "IMAGE_EXTENSIONS",
]

IGNORE = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TASKS = ("panoptic", "instance", "semantic")


# ---------------------------------------------------------------------------------------------
# File helpers
# ---------------------------------------------------------------------------------------------
def read_image(path) -> np.ndarray:
    """RGB image as uint8 ``[H, W, 3]``; InputError for a missing or unreadable file."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: image file not found")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB")).copy()
    except Exception as e:  # noqa: BLE001 (PIL raises many types for corrupt files)
        raise InputError(f"{p}: cannot be read as an image ({type(e).__name__}: {e})") from None


def read_label_png(path, what: str = "label map") -> np.ndarray:
    """A PNG read without colour conversion: ``[H, W]`` (L / P / I modes) or ``[H, W, 3]`` (RGB)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {what} file not found")
    try:
        with Image.open(p) as im:
            if im.mode not in ("L", "P", "I", "I;16", "RGB", "RGBA"):
                im = im.convert("RGB")
            arr = np.asarray(im).copy()
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{p}: cannot be read as a {what} ({type(e).__name__}: {e})") from None
    if arr.ndim == 3:
        arr = arr[..., :3]
    return arr


def _load_json(path, what: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {what} JSON file not found")
    try:
        with open(p) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot be parsed as JSON ({e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{p}: expected a JSON object with 'images', 'annotations', 'categories'")
    for k in ("images", "annotations", "categories"):
        if k not in d or not isinstance(d[k], list):
            raise InputError(f"{p}: missing list {k!r} (expected COCO {what} format)")
    return d


def _check_categories(path, cats: List[Dict]) -> None:
    seen = set()
    for c in cats:
        if "id" not in c:
            raise InputError(f"{path}: a category has no 'id' ({c})")
        if c["id"] in seen:
            raise InputError(f"{path}: category id {c['id']} appears twice")
        seen.add(c["id"])
    if not seen:
        raise InputError(f"{path}: 'categories' is empty")


def _check_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: {what} directory not found")
    return p


def _semantic_targets(sem: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One mask per class present in ``sem`` [H, W]: (labels [K], masks [K, H, W])."""
    classes = np.unique(sem)
    classes = classes[classes != IGNORE]
    masks = sem[None] == classes[:, None, None] if classes.size else np.zeros((0,) + sem.shape, bool)
    return classes.astype(np.int64), masks


# ---------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------
class SegmentationDataset(torch.utils.data.Dataset):
    """Records + a per-format loader + a transform.

    Subclasses implement :meth:`_load_targets(record, image_hw)` returning
    ``(labels int64 [N], masks bool [N,H,W], is_thing bool [N], sem_seg int64 [H,W])`` as numpy
    arrays for the *panoptic* target set (non-crowd segments); the task filtering is done here."""

    def __init__(self, records: List[Dict[str, Any]], metadata: DatasetMetadata, task: str = "panoptic",
                 transform: Optional[Callable] = None, name: str = ""):
        if task not in TASKS:
            raise InputError(f"task {task!r}: expected one of {list(TASKS)}")
        self.records = records
        self.metadata = metadata
        self.task = task
        self.transform = transform
        self.name = name or metadata.name

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={self.metadata.num_classes}, "
                f"task={self.task!r})")

    # -- subclass hook -------------------------------------------------------------------------
    def _load_targets(self, rec: Dict[str, Any], hw: Tuple[int, int]):
        raise NotImplementedError

    # -- items ---------------------------------------------------------------------------------
    def load(self, idx: int) -> Dict[str, Any]:
        """The item before any transform (torch tensors)."""
        rec = self.records[idx]
        img = read_image(rec["file_name"])  # [H, W, 3]
        H, W = img.shape[:2]
        if rec.get("height") and rec.get("width") and (rec["height"], rec["width"]) != (H, W):
            raise InputError(f"{rec['file_name']}: image is {H}x{W} but the annotation file "
                             f"({rec.get('ann_file')}) says {rec['height']}x{rec['width']}")
        labels, masks, is_thing, sem = self._load_targets(rec, (H, W))
        if self.task == "instance":
            labels, masks, is_thing = labels[is_thing], masks[is_thing], is_thing[is_thing]
        elif self.task == "semantic":
            labels, masks = _semantic_targets(sem)
            is_thing = np.array([self.metadata.is_thing[k] for k in labels], bool)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),  # [3, H, W]
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),  # [N]
            "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)).reshape(-1, H, W),  # [N, H, W]
            "is_thing": torch.as_tensor(is_thing, dtype=torch.bool).reshape(-1),  # [N]
            "sem_seg": torch.from_numpy(sem.astype(np.int64)),  # [H, W]
            "image_id": rec["image_id"],
            "file_name": str(rec["file_name"]),
            "orig_size": (H, W),
        }
        for k in ("pan_seg_file_name", "sem_seg_file_name"):
            if rec.get(k) is not None:
                item[k] = str(rec[k])
        return item

    def get(self, idx: int, seed: Optional[int] = None) -> Dict[str, Any]:
        """Item ``idx`` with augmentation seeded by ``seed`` (None: a seed drawn from torch's global RNG)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} items")
        item = self.load(idx)
        if self.transform is not None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()))
            g = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
            item = self.transform(item, g)
        return item

    def __getitem__(self, key):
        if isinstance(key, tuple):
            idx, seed = key
            return self.get(int(idx), seed)
        return self.get(int(key))


# ---------------------------------------------------------------------------------------------
# COCO panoptic
# ---------------------------------------------------------------------------------------------
class CocoPanopticDataset(SegmentationDataset):
    """COCO panoptic: ``json_file`` (images, annotations with segments_info, categories),
    ``png_dir`` (segment-id PNGs, id = R + 256 G + 256^2 B) and ``image_dir``."""

    def __init__(self, json_file, png_dir, image_dir, task: str = "panoptic", transform=None, name: str = "",
                 sem_seg_dir=None, instances_json=None):
        jf = Path(json_file)
        d = _load_json(jf, "panoptic")
        png_dir, image_dir = _check_dir(png_dir, "panoptic PNG"), _check_dir(image_dir, "image")
        _check_categories(jf, d["categories"])
        md = DatasetMetadata.from_categories(
            d["categories"], name=name or f"coco_panoptic:{jf}", panoptic_json=str(jf), panoptic_png_dir=str(png_dir),
            image_dir=str(image_dir), sem_seg_dir=str(sem_seg_dir) if sem_seg_dir else None,
            instances_json=str(instances_json) if instances_json else None)
        images = {}
        for im in d["images"]:
            if "id" not in im or "file_name" not in im:
                raise InputError(f"{jf}: an image entry lacks 'id' or 'file_name' ({im})")
            images[im["id"]] = im
        records = []
        for ann in d["annotations"]:
            iid = ann.get("image_id")
            if iid not in images:
                raise InputError(f"{jf}: annotation {ann.get('file_name')!r} refers to image_id {iid} "
                                 f"which is not in 'images'")
            segs = ann.get("segments_info")
            if not isinstance(segs, list) or "file_name" not in ann:
                raise InputError(f"{jf}: annotation of image_id {iid} lacks 'file_name' or 'segments_info'")
            for s in segs:
                if s.get("category_id") not in md.id_to_contiguous:
                    raise InputError(f"{jf}: segment {s.get('id')} of {ann['file_name']} has category_id "
                                     f"{s.get('category_id')} which is not in 'categories' "
                                     f"(known ids: {list(md.contiguous_to_id)})")
            im = images[iid]
            stem = Path(ann["file_name"]).stem
            records.append({
                "image_id": iid, "file_name": str(image_dir / im["file_name"]),
                "height": im.get("height"), "width": im.get("width"), "ann_file": str(jf),
                "pan_seg_file_name": str(png_dir / ann["file_name"]), "segments_info": segs,
                "sem_seg_file_name": str(Path(sem_seg_dir) / f"{stem}.png") if sem_seg_dir else None,
            })
        super().__init__(records, md, task, transform, md.name)

    def _load_targets(self, rec, hw):
        png = rec["pan_seg_file_name"]
        rgb = read_label_png(png, "panoptic PNG")
        if rgb.ndim != 3:
            raise InputError(f"{png}: expected an RGB panoptic PNG, got a single-channel image")
        if rgb.shape[:2] != hw:
            raise InputError(f"{png}: panoptic PNG is {rgb.shape[0]}x{rgb.shape[1]} but its image "
                             f"{rec['file_name']} is {hw[0]}x{hw[1]}")
        rgb = rgb.astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]  # [H, W]
        present = set(np.unique(ids).tolist()) - {0}
        listed = [s["id"] for s in rec["segments_info"]]
        missing = [i for i in listed if i not in present]
        extra = sorted(present - set(listed))
        if missing or extra:
            raise InputError(f"{png}: segment ids do not match segments_info in {rec['ann_file']} "
                             f"(listed but absent from the PNG: {missing[:10]}; in the PNG but not listed: {extra[:10]})")
        md = self.metadata
        sem = np.full(hw, IGNORE, np.int64)
        labels, masks, is_thing = [], [], []
        for s in rec["segments_info"]:
            k = md.id_to_contiguous[s["category_id"]]
            m = ids == s["id"]
            sem[m] = k
            if s.get("iscrowd", 0):
                continue
            labels.append(k)
            masks.append(m)
            is_thing.append(md.is_thing[k])
        masks = np.stack(masks) if masks else np.zeros((0,) + hw, bool)
        return np.array(labels, np.int64), masks, np.array(is_thing, bool), sem


# ---------------------------------------------------------------------------------------------
# COCO instances
# ---------------------------------------------------------------------------------------------
class CocoInstancesDataset(SegmentationDataset):
    """COCO instances JSON (polygon or RLE segmentations) + image dir.  Every category is a thing;
    crowd annotations are excluded from the targets (their pixels are 255 in ``sem_seg``).
    ``filter_empty`` drops images without a non-crowd annotation (used for training splits).
    ``sem_seg`` holds the thing classes painted in annotation order, 255 elsewhere."""

    def __init__(self, json_file, image_dir, task: str = "instance", transform=None, name: str = "",
                 filter_empty: bool = False):
        jf = Path(json_file)
        d = _load_json(jf, "instances")
        image_dir = _check_dir(image_dir, "image")
        _check_categories(jf, d["categories"])
        cats = [dict(c, isthing=1) for c in d["categories"]]
        md = DatasetMetadata.from_categories(cats, name=name or f"coco_instances:{jf}", instances_json=str(jf),
                                             image_dir=str(image_dir))
        per_image: Dict[Any, List[Dict]] = {}
        images = {}
        for im in d["images"]:
            if "id" not in im or "file_name" not in im:
                raise InputError(f"{jf}: an image entry lacks 'id' or 'file_name' ({im})")
            images[im["id"]] = im
            per_image[im["id"]] = []
        for ann in d["annotations"]:
            if ann.get("image_id") not in images:
                raise InputError(f"{jf}: annotation {ann.get('id')} refers to image_id {ann.get('image_id')} "
                                 f"which is not in 'images'")
            if ann.get("category_id") not in md.id_to_contiguous:
                raise InputError(f"{jf}: annotation {ann.get('id')} has category_id {ann.get('category_id')} "
                                 f"which is not in 'categories' (known ids: {list(md.contiguous_to_id)})")
            if "segmentation" not in ann:
                raise InputError(f"{jf}: annotation {ann.get('id')} has no 'segmentation'")
            per_image[ann["image_id"]].append(ann)
        records = [{"image_id": iid, "file_name": str(image_dir / im["file_name"]), "height": im.get("height"),
                    "width": im.get("width"), "ann_file": str(jf), "annotations": per_image[iid]}
                   for iid, im in images.items()]
        if filter_empty:  # detectron2's FILTER_EMPTY_ANNOTATIONS for training: drop crowd-only / empty images
            records = [r for r in records if any(not a.get("iscrowd", 0) for a in r["annotations"])]
            if not records:
                raise InputError(f"{jf}: no image has a non-crowd annotation")
        super().__init__(records, md, task, transform, md.name)

    def _decode(self, rec, ann, hw) -> np.ndarray:
        from pycocotools import mask as mask_util

        h, w = hw
        seg = ann["segmentation"]
        where = f"{rec['ann_file']}: annotation {ann.get('id')} of {rec['file_name']}"
        try:
            if isinstance(seg, list):  # polygons
                polys = [p for p in seg if len(p) >= 6]
                if not polys:
                    return np.zeros(hw, bool)
                rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
            elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
                if list(seg["size"]) != [h, w]:
                    raise InputError(f"{where}: segmentation size {list(seg['size'])} does not match the image "
                                     f"size [{h}, {w}]")
                rle = mask_util.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else dict(
                    seg, counts=seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"])
            else:
                raise InputError(f"{where}: 'segmentation' is neither polygons nor RLE")
            m = mask_util.decode(rle)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{where}: cannot decode the segmentation ({type(e).__name__}: {e})") from None
        if m.shape[:2] != (h, w):
            raise InputError(f"{where}: decoded mask is {m.shape[0]}x{m.shape[1]}, image is {h}x{w}")
        return m.astype(bool)

    def _load_targets(self, rec, hw):
        md = self.metadata
        sem = np.full(hw, IGNORE, np.int64)
        labels, masks = [], []
        crowd = np.zeros(hw, bool)
        for ann in rec["annotations"]:
            m = self._decode(rec, ann, hw)
            if ann.get("iscrowd", 0):
                crowd |= m
                continue
            if not m.any():
                continue
            k = md.id_to_contiguous[ann["category_id"]]
            sem[m] = k
            labels.append(k)
            masks.append(m)
        sem[crowd] = IGNORE
        masks = np.stack(masks) if masks else np.zeros((0,) + hw, bool)
        return np.array(labels, np.int64), masks, np.ones(len(labels), bool), sem


# ---------------------------------------------------------------------------------------------
# Semantic label maps
# ---------------------------------------------------------------------------------------------
class SemanticDataset(SegmentationDataset):
    """Images in ``image_dir`` and single-channel PNG label maps in ``label_dir`` with the same stems.

    Labels are contiguous class ids ``0..num_classes-1`` with 255 = ignore, or with
    ``reduce_zero_label`` ADE20K's raw convention (0 = void, ``k + 1`` = class ``k``).  Every class is
    stuff (``is_thing`` False); targets are one mask per class present."""

    def __init__(self, image_dir, label_dir, num_classes: int, reduce_zero_label: bool = False,
                 class_names: Optional[Sequence[str]] = None, task: str = "semantic", transform=None, name: str = ""):
        image_dir, label_dir = _check_dir(image_dir, "image"), _check_dir(label_dir, "label")
        if num_classes < 1 or num_classes > 255:
            raise InputError(f"semantic dataset {label_dir}: NUM_CLASSES={num_classes} must be in 1..255")
        if class_names is not None and len(class_names) != num_classes:
            raise InputError(f"semantic dataset {label_dir}: {len(class_names)} class names for {num_classes} classes")
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        cats = [{"id": i, "name": n, "isthing": 0} for i, n in enumerate(names)]
        md = DatasetMetadata.from_categories(cats, name=name or f"semantic:{image_dir}", sem_seg_dir=str(label_dir),
                                             sem_seg_reduce_zero_label=reduce_zero_label, image_dir=str(image_dir))
        files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not files:
            raise InputError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        records = []
        for i, f in enumerate(files):
            lab = label_dir / (Path(f).stem + ".png")
            if not lab.is_file():
                raise InputError(f"{lab}: label map for image {image_dir / f} not found")
            records.append({"image_id": i, "file_name": str(image_dir / f), "sem_seg_file_name": str(lab),
                            "ann_file": str(lab)})
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        super().__init__(records, md, task, transform, md.name)

    def _load_targets(self, rec, hw):
        path = rec["sem_seg_file_name"]
        lab = read_label_png(path, "label map")
        if lab.ndim != 2:
            raise InputError(f"{path}: expected a single-channel label PNG, got {lab.shape[2]} channels")
        if lab.shape != hw:
            raise InputError(f"{path}: label map is {lab.shape[0]}x{lab.shape[1]} but its image "
                             f"{rec['file_name']} is {hw[0]}x{hw[1]}")
        sem = lab.astype(np.int64)
        if self.reduce_zero_label:
            sem = np.where((sem == 0) | (sem == IGNORE), IGNORE, sem - 1)
        bad = (sem != IGNORE) & ((sem < 0) | (sem >= self.num_classes))
        if bad.any():
            vals = np.unique(lab[bad])[:10].tolist()
            raise InputError(f"{path}: label values {vals} are outside 0..{self.num_classes - 1} (and not 255)"
                             + (" after reduce_zero_label" if self.reduce_zero_label else ""))
        labels, masks = _semantic_targets(sem)
        return labels, masks, np.zeros(len(labels), bool), sem
