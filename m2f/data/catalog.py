"""Named datasets and path specs -> :class:`SegmentationDataset`.

``get_dataset(spec, split, cfg)`` accepts

- a registered name: ``synth`` (train split of the embedded synthetic dataset, generated once into
  the cache with ``cfg.data.synth_*``), ``synth_val`` (its val split), and the standard datasets in
  detectron2's layout under ``$M2F_DATASETS`` (default ``./datasets``)::

      coco_2017_{train,val}_panoptic   coco/{train,val}2017, coco/panoptic_{train,val}2017,
                                       coco/annotations/panoptic_{train,val}2017.json
      coco_2017_{train,val}            coco/annotations/instances_{train,val}2017.json
      ade20k_sem_seg_{train,val}       ADEChallengeData2016/images/{training,validation},
                                       ADEChallengeData2016/annotations_detectron2/{training,validation}
                                       (labels 0..149, 255 ignore; raw ``annotations/`` with
                                       ``reduce_zero_label`` if the detectron2 copy is absent)

- a path spec (the ``split`` argument then only selects train/test transforms)::

      coco_panoptic:JSON:PNG_DIR:IMAGE_DIR
      coco_instances:ANN.json:IMAGE_DIR
      semantic:IMAGE_DIR:LABEL_DIR:NUM_CLASSES[:reduce_zero_label]

``split == "train"`` applies the training augmentation of ``cfg.data.task`` (and, for COCO instances,
drops images without non-crowd annotations, as detectron2); any other split the test-time resize.  ``register_dataset(name, fn)`` adds a name; ``fn(split, cfg)`` returns the dataset.

``data_tasks(spec)`` names the tasks a dataset can train, its own first (COCO panoptic: panoptic, instance,
semantic; COCO instances: instance; semantic label maps: semantic); ``m2f train`` takes the task from it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from m2f.errors import InputError

__all__ = ["register_dataset", "get_dataset", "list_datasets", "datasets_root", "data_tasks", "SPEC_FORMS"]

SPEC_FORMS = (
    "a registered name ({names})",
    "coco_panoptic:JSON:PNG_DIR:IMAGE_DIR",
    "coco_instances:ANN.json:IMAGE_DIR",
    "semantic:IMAGE_DIR:LABEL_DIR:NUM_CLASSES[:reduce_zero_label]",
)

_REGISTRY: Dict[str, Callable] = {}
# The tasks each kind of ground truth can train, its own task first.
_KIND_TASKS: Dict[str, Tuple[str, ...]] = {
    "coco_panoptic": ("panoptic", "instance", "semantic"),  # things and stuff: every task
    "coco_instances": ("instance",),  # things only
    "semantic": ("semantic",),  # label maps: no instances
}
_TASKS: Dict[str, Tuple[str, ...]] = {}


def register_dataset(name: str, fn: Callable, kind: Optional[str] = None) -> None:
    """Register ``fn(split: str, cfg) -> SegmentationDataset`` under ``name``; ``kind`` (one of
    ``coco_panoptic``, ``coco_instances``, ``semantic``) says what ground truth it has, so that
    :func:`data_tasks` knows the tasks it trains (None: unknown)."""
    if ":" in name:
        raise ValueError(f"dataset name {name!r} must not contain ':'")
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is registered already")
    if kind is not None and kind not in _KIND_TASKS:
        raise ValueError(f"dataset {name!r}: kind {kind!r} is not one of {sorted(_KIND_TASKS)}")
    _REGISTRY[name] = fn
    if kind is not None:
        _TASKS[name] = _KIND_TASKS[kind]


def data_tasks(spec: str) -> Optional[Tuple[str, ...]]:
    """The tasks the dataset ``spec`` can train, its own task first (``coco_instances:...`` ->
    ``("instance",)``); None for a registered name of unknown kind.  Reads no file."""
    if spec in _REGISTRY:
        return _TASKS.get(spec)
    kind = spec.partition(":")[0] if isinstance(spec, str) else None
    if kind in _KIND_TASKS:
        return _KIND_TASKS[kind]
    raise InputError(f"dataset spec {spec!r} not understood; accepted forms: {_forms()}")


def list_datasets() -> List[str]:
    return sorted(_REGISTRY)


def datasets_root() -> Path:
    """``$M2F_DATASETS`` or ``./datasets``."""
    return Path(os.environ.get("M2F_DATASETS") or "datasets")


def _forms() -> str:
    return "; ".join(f.format(names=", ".join(list_datasets())) for f in SPEC_FORMS)


def _transform(cfg, split: str, task: str):
    from m2f.data.transforms import build_transform

    return build_transform(cfg.data, task, train=(split == "train"))


def get_dataset(spec: str, split: str, cfg):
    """Build the dataset named by ``spec`` for ``split`` ("train" | "val" | "test") under ``cfg``."""
    from m2f.data.datasets import CocoInstancesDataset, CocoPanopticDataset, SemanticDataset

    if not isinstance(spec, str) or not spec:
        raise InputError(f"dataset spec {spec!r}: expected one of: {_forms()}")
    task = cfg.data.task
    if spec in _REGISTRY:
        return _REGISTRY[spec](split, cfg)
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    tf = _transform(cfg, split, task)
    if kind == "coco_panoptic" and len(parts) == 3:
        return CocoPanopticDataset(*parts, task=task, transform=tf, name=spec)
    if kind == "coco_instances" and len(parts) == 2:
        return CocoInstancesDataset(*parts, task=task, transform=tf, name=spec, filter_empty=split == "train")
    if kind == "semantic" and len(parts) in (3, 4):
        try:
            k = int(parts[2])
        except ValueError:
            raise InputError(f"dataset spec {spec!r}: NUM_CLASSES {parts[2]!r} is not an integer") from None
        reduce = False
        if len(parts) == 4:
            if parts[3] != "reduce_zero_label":
                raise InputError(f"dataset spec {spec!r}: unknown option {parts[3]!r} (expected 'reduce_zero_label')")
            reduce = True
        return SemanticDataset(parts[0], parts[1], k, reduce_zero_label=reduce, task=task, transform=tf, name=spec)
    raise InputError(f"dataset spec {spec!r} not understood; accepted forms: {_forms()}")


# ---------------------------------------------------------------------------------------------
# Built-in names
# ---------------------------------------------------------------------------------------------
def _synth(which: str):
    def fn(split: str, cfg):
        from m2f.data.datasets import CocoInstancesDataset, CocoPanopticDataset
        from m2f.data.synth import ensure_synth

        d = cfg.data
        root = ensure_synth(d.synth_size, d.synth_images, d.synth_val_images, d.synth_seed) / which
        tf = _transform(cfg, split, d.task)
        name = "synth" if which == "train" else "synth_val"
        if d.task == "instance":  # thing classes only (6), as a COCO instance model
            return CocoInstancesDataset(root / "instances.json", root / "images", task="instance", transform=tf,
                                        name=name, filter_empty=split == "train")
        return CocoPanopticDataset(root / "panoptic.json", root / "panoptic", root / "images", task=d.task,
                                   transform=tf, name=name, sem_seg_dir=root / "semantic",
                                   instances_json=root / "instances.json")

    return fn


def _coco_panoptic(s: str):
    def fn(split: str, cfg):
        from m2f.data.datasets import CocoPanopticDataset

        c = datasets_root() / "coco"
        semseg = c / f"panoptic_semseg_{s}2017"
        inst = c / "annotations" / f"instances_{s}2017.json"
        return CocoPanopticDataset(c / "annotations" / f"panoptic_{s}2017.json", c / f"panoptic_{s}2017",
                                   c / f"{s}2017", task=cfg.data.task, transform=_transform(cfg, split, cfg.data.task),
                                   name=f"coco_2017_{s}_panoptic", sem_seg_dir=semseg if semseg.is_dir() else None,
                                   instances_json=inst if inst.is_file() else None)

    return fn


def _coco_instances(s: str):
    def fn(split: str, cfg):
        from m2f.data.datasets import CocoInstancesDataset

        c = datasets_root() / "coco"
        return CocoInstancesDataset(c / "annotations" / f"instances_{s}2017.json", c / f"{s}2017", task="instance",
                                    transform=_transform(cfg, split, "instance"), name=f"coco_2017_{s}",
                                    filter_empty=split == "train")

    return fn


def _ade(s: str):
    def fn(split: str, cfg):
        from m2f.data.datasets import SemanticDataset

        a = datasets_root() / "ADEChallengeData2016"
        d2 = a / "annotations_detectron2" / s
        reduce = not d2.is_dir()
        labels = a / "annotations" / s if reduce else d2
        return SemanticDataset(a / "images" / s, labels, 150, reduce_zero_label=reduce, task="semantic",
                               transform=_transform(cfg, split, "semantic"), name=f"ade20k_sem_seg_{s}")

    return fn


register_dataset("synth", _synth("train"), kind="coco_panoptic")
register_dataset("synth_val", _synth("val"), kind="coco_panoptic")
for _s in ("train", "val"):
    register_dataset(f"coco_2017_{_s}_panoptic", _coco_panoptic(_s), kind="coco_panoptic")
    register_dataset(f"coco_2017_{_s}", _coco_instances(_s), kind="coco_instances")
register_dataset("ade20k_sem_seg_train", _ade("training"), kind="semantic")
register_dataset("ade20k_sem_seg_val", _ade("validation"), kind="semantic")
