"""Dataset metadata: categories, the dataset id <-> contiguous id mapping, and ground-truth files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["DatasetMetadata", "default_color"]


def default_color(i: int) -> Tuple[int, int, int]:
    """A deterministic, well-spread colour for class ``i`` (golden-ratio hues)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * ((i * 7) % 3) / 2, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass(frozen=True)
class DatasetMetadata:
    """What a model, the evaluators and the visualisers need to know about a dataset.

    ``categories`` are COCO category dicts (``id, name, isthing, color``) in contiguous order:
    contiguous id ``k`` (the model's class ``k``, ``0 <= k < num_classes``) is ``categories[k]``.
    ``thing_classes`` / ``stuff_classes`` are the names of the thing / stuff categories only
    (NB: detectron2's panoptic ``stuff_classes`` lists all classes; use ``class_names`` for that).

    Ground-truth files (``None`` when the dataset has no such ground truth):
    ``panoptic_json`` + ``panoptic_png_dir`` (COCO panoptic), ``instances_json`` (COCO instances,
    dataset category ids), ``sem_seg_dir`` (PNG label maps named ``<image stem>.png``; contiguous ids
    with 255 = ignore, or 0 = void and ``k + 1`` = class ``k`` when ``sem_seg_reduce_zero_label``),
    ``image_dir``.
    """

    categories: Tuple[Dict, ...]
    id_to_contiguous: Dict[int, int]
    contiguous_to_id: Tuple[int, ...]
    class_names: Tuple[str, ...]
    thing_classes: Tuple[str, ...]
    stuff_classes: Tuple[str, ...]
    is_thing: Tuple[bool, ...]
    colors: Tuple[Tuple[int, int, int], ...]
    num_classes: int
    ignore_label: int = 255
    name: str = ""
    panoptic_json: Optional[str] = None
    panoptic_png_dir: Optional[str] = None
    instances_json: Optional[str] = None
    sem_seg_dir: Optional[str] = None
    sem_seg_reduce_zero_label: bool = False
    image_dir: Optional[str] = None
    extra: Dict = field(default_factory=dict)

    @classmethod
    def from_categories(cls, categories: Sequence[Dict], *, sort_by_id: bool = True, **kwargs) -> "DatasetMetadata":
        """Build the metadata from COCO category dicts.  Contiguous ids follow the sorted dataset
        ids (detectron2's convention) unless ``sort_by_id=False`` (then the given order).
        Missing ``isthing`` defaults to 1 and a missing ``color`` to :func:`default_color`."""
        cats = sorted(categories, key=lambda c: int(c["id"])) if sort_by_id else list(categories)
        norm = []
        for i, c in enumerate(cats):
            col = c.get("color")
            norm.append({"id": int(c["id"]), "name": str(c.get("name", f"class_{c['id']}")),
                         "isthing": int(c.get("isthing", 1)),
                         "color": [int(x) for x in col] if col is not None else list(default_color(i)),
                         **({"supercategory": c["supercategory"]} if "supercategory" in c else {})})
        ids = [c["id"] for c in norm]
        return cls(
            categories=tuple(norm),
            id_to_contiguous={cid: k for k, cid in enumerate(ids)},
            contiguous_to_id=tuple(ids),
            class_names=tuple(c["name"] for c in norm),
            thing_classes=tuple(c["name"] for c in norm if c["isthing"]),
            stuff_classes=tuple(c["name"] for c in norm if not c["isthing"]),
            is_thing=tuple(bool(c["isthing"]) for c in norm),
            colors=tuple(tuple(c["color"]) for c in norm),
            num_classes=len(norm),
            **kwargs,
        )

    @property
    def thing_ids(self) -> List[int]:
        """Contiguous ids of the thing classes."""
        return [k for k, t in enumerate(self.is_thing) if t]

    @property
    def stuff_ids(self) -> List[int]:
        """Contiguous ids of the stuff classes."""
        return [k for k, t in enumerate(self.is_thing) if not t]
