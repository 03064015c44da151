"""Augmentations applied consistently to an image and its targets.

A *sample* is a dict::

    image    uint8 [3, H, W]
    masks    bool  [N, H, W]
    labels   int64 [N]        contiguous class ids
    is_thing bool  [N]
    sem_seg  int64 [H, W]     255 = ignore

(other keys pass through untouched).  Every transform is a callable ``t(sample, generator)`` whose
randomness comes only from the given ``torch.Generator``, so an item is a function of its seed
(reproducible training and resume).  Images are resized bilinearly (antialiased when shrinking),
masks and label maps with nearest neighbour.

Recipes (official Mask2Former, shared/PAPER.md):
- :class:`LargeScaleJitter` (COCO instance / panoptic): flip, resize so the image fits in
  ``image_size * s`` with ``s ~ U[min_scale, max_scale]``, random crop to at most
  ``image_size x image_size`` and pad to exactly that (image 128, masks False, sem_seg 255).
- :class:`ResizeShortestEdgeCrop` (ADE20K semantic): resize the short side to
  ``image_size * s`` with ``s`` one of ``min_scale, min_scale + 0.1, ..., max_scale`` (official
  "choice" sampling; uniform when the bounds are not multiples of 0.1; long side capped at
  ``4 * image_size``), random crop ``image_size`` (optionally
  re-drawn while one class covers more than ``cat_max_ratio`` of it), optional SSD colour
  jitter, flip, pad to ``image_size``.
- :class:`TestResize`: resize the short side to ``min_size`` and cap the long side at ``max_size``
  (0 = keep).
Instances left without pixels after a crop are dropped (``N = 0`` is allowed).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "resize", "crop", "pad", "hflip", "drop_empty", "LargeScaleJitter", "ResizeShortestEdgeCrop",
    "TestResize", "Compose", "build_transform",
]

Sample = Dict[str, Any]
IGNORE = 255
PAD_VALUE = 128  # official FixedSizeCrop / semantic mapper pad value for images


def _rand(g: Optional[torch.Generator]) -> float:
    return float(torch.rand((), generator=g))


def _uniform(g: Optional[torch.Generator], lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(g)


# ---------------------------------------------------------------------------------------------
# Deterministic primitives
# ---------------------------------------------------------------------------------------------
def resize(sample: Sample, h: int, w: int) -> Sample:
    """Resize everything to ``h x w``."""
    img = sample["image"]
    H, W = img.shape[-2:]
    if (H, W) == (h, w):
        return sample
    out = dict(sample)
    shrink = h < H or w < W
    x = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    out["image"] = x[0].round_().clamp_(0, 255).to(torch.uint8)  # [3, h, w]
    masks = sample["masks"]
    if masks.shape[0]:
        out["masks"] = F.interpolate(masks[None].to(torch.uint8), size=(h, w), mode="nearest")[0].bool()
    else:
        out["masks"] = masks.new_zeros((0, h, w))
    if sample.get("sem_seg") is not None:
        sem = sample["sem_seg"].to(torch.uint8)[None, None]  # labels <= 255
        out["sem_seg"] = F.interpolate(sem, size=(h, w), mode="nearest")[0, 0].long()
    return out


def crop(sample: Sample, y0: int, x0: int, h: int, w: int) -> Sample:
    """Crop the window ``[y0:y0+h, x0:x0+w]``."""
    out = dict(sample)
    out["image"] = sample["image"][:, y0 : y0 + h, x0 : x0 + w]
    out["masks"] = sample["masks"][:, y0 : y0 + h, x0 : x0 + w]
    if sample.get("sem_seg") is not None:
        out["sem_seg"] = sample["sem_seg"][y0 : y0 + h, x0 : x0 + w]
    return out


def pad(sample: Sample, h: int, w: int, image_value: int = PAD_VALUE) -> Sample:
    """Pad bottom/right to ``h x w`` (image ``image_value``, masks False, sem_seg 255)."""
    H, W = sample["image"].shape[-2:]
    ph, pw = max(0, h - H), max(0, w - W)
    if ph == 0 and pw == 0:
        return sample
    out = dict(sample)
    out["image"] = F.pad(sample["image"], (0, pw, 0, ph), value=image_value)
    out["masks"] = F.pad(sample["masks"], (0, pw, 0, ph), value=False)
    if sample.get("sem_seg") is not None:
        out["sem_seg"] = F.pad(sample["sem_seg"], (0, pw, 0, ph), value=IGNORE)
    return out


def hflip(sample: Sample) -> Sample:
    out = dict(sample)
    out["image"] = sample["image"].flip(-1)
    out["masks"] = sample["masks"].flip(-1)
    if sample.get("sem_seg") is not None:
        out["sem_seg"] = sample["sem_seg"].flip(-1)
    return out


def drop_empty(sample: Sample) -> Sample:
    """Remove instances without any pixel left."""
    masks = sample["masks"]
    if masks.shape[0] == 0:
        return sample
    keep = masks.flatten(1).any(1)  # [N]
    if bool(keep.all()):
        return sample
    out = dict(sample)
    out["masks"] = masks[keep]
    out["labels"] = sample["labels"][keep]
    if sample.get("is_thing") is not None:
        out["is_thing"] = sample["is_thing"][keep]
    return out


def color_aug_ssd(image: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
    """SSD-style photometric distortion (brightness, contrast, saturation, hue), each with p=0.5.
    ``image`` uint8 [3, H, W] -> uint8 [3, H, W]."""
    import torchvision.transforms.functional as TF

    x = image.float()
    if _rand(g) < 0.5:
        x = x + _uniform(g, -32, 32)
    contrast_first = _rand(g) < 0.5

    def contrast(x):
        return x * _uniform(g, 0.5, 1.5) if _rand(g) < 0.5 else x

    if contrast_first:
        x = contrast(x)
    x = x.clamp(0, 255)
    if _rand(g) < 0.5:
        x = TF.adjust_saturation(x / 255.0, _uniform(g, 0.5, 1.5)) * 255.0
    if _rand(g) < 0.5:
        x = TF.adjust_hue(x / 255.0, _uniform(g, -18, 18) / 360.0) * 255.0
    if not contrast_first:
        x = contrast(x)
    return x.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------
class Compose:
    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, sample: Sample, g: Optional[torch.Generator] = None) -> Sample:
        for t in self.transforms:
            sample = t(sample, g)
        return sample


class LargeScaleJitter:
    """Flip + resize into ``image_size * U[min_scale, max_scale]`` + crop/pad to ``image_size`` square."""

    def __init__(self, image_size: int, min_scale: float = 0.1, max_scale: float = 2.0, flip: bool = True,
                 pad_value: int = PAD_VALUE):
        self.size, self.min_scale, self.max_scale, self.flip, self.pad_value = image_size, min_scale, max_scale, flip, pad_value

    def __call__(self, sample: Sample, g: Optional[torch.Generator] = None) -> Sample:
        S = self.size
        if self.flip and _rand(g) < 0.5:
            sample = hflip(sample)
        H, W = sample["image"].shape[-2:]
        s = _uniform(g, self.min_scale, self.max_scale)
        sc = min(S * s / H, S * s / W)
        h, w = max(1, int(H * sc + 0.5)), max(1, int(W * sc + 0.5))
        sample = resize(sample, h, w)
        # Fixed-size crop: random offset where the image is larger than S.
        y0 = int(round((h - S) * _rand(g))) if h > S else 0
        x0 = int(round((w - S) * _rand(g))) if w > S else 0
        sample = crop(sample, y0, x0, min(S, h), min(S, w))
        sample = pad(sample, S, S, self.pad_value)
        return drop_empty(sample)


class ResizeShortestEdgeCrop:
    """Semantic recipe: short side to ``image_size * s`` (``s`` from the 0.1-step grid of
    ``[min_scale, max_scale]``, see the module docstring; long side at most
    ``max_size_factor * image_size``), random ``image_size`` crop (re-drawn up to 10 times while one
    class covers more than ``cat_max_ratio`` of the labelled crop pixels), optional SSD colour
    jitter, flip, pad to ``image_size``."""

    def __init__(self, image_size: int, min_scale: float = 0.5, max_scale: float = 2.0, flip: bool = True,
                 cat_max_ratio: float = 1.0, color_aug: bool = False, max_size_factor: float = 4.0,
                 pad_value: int = PAD_VALUE):
        self.size, self.min_scale, self.max_scale, self.flip = image_size, min_scale, max_scale, flip
        self.cat_max_ratio, self.color_aug, self.max_size, self.pad_value = (
            cat_max_ratio, color_aug, int(max_size_factor * image_size), pad_value)

    def __call__(self, sample: Sample, g: Optional[torch.Generator] = None) -> Sample:
        S = self.size
        H, W = sample["image"].shape[-2:]
        lo, hi = self.min_scale * 10, self.max_scale * 10
        if abs(lo - round(lo)) < 1e-6 and abs(hi - round(hi)) < 1e-6 and hi >= lo:
            # Official: short side chosen from [int(x * 0.1 * S) for x in range(5, 21)] ("choice").
            x = int(torch.randint(int(round(lo)), int(round(hi)) + 1, (), generator=g))
            short = int(x * 0.1 * S)
        else:
            short = S * _uniform(g, self.min_scale, self.max_scale)
        sc = short / min(H, W)
        if max(H, W) * sc > self.max_size:
            sc = self.max_size / max(H, W)
        h, w = max(1, int(H * sc + 0.5)), max(1, int(W * sc + 0.5))
        sample = resize(sample, h, w)
        ch, cw = min(S, h), min(S, w)
        y0 = x0 = 0
        for _ in range(10):
            y0 = int(torch.randint(0, h - ch + 1, (), generator=g))
            x0 = int(torch.randint(0, w - cw + 1, (), generator=g))
            if self.cat_max_ratio >= 1.0 or sample.get("sem_seg") is None:
                break
            win = sample["sem_seg"][y0 : y0 + ch, x0 : x0 + cw]
            cnt = torch.bincount(win[win != IGNORE].flatten(), minlength=1)
            cnt = cnt[cnt > 0]
            if cnt.numel() > 1 and float(cnt.max()) / float(cnt.sum()) < self.cat_max_ratio:
                break
        sample = crop(sample, y0, x0, ch, cw)
        if self.color_aug:
            sample = dict(sample, image=color_aug_ssd(sample["image"], g))
        if self.flip and _rand(g) < 0.5:
            sample = hflip(sample)
        sample = pad(sample, S, S, self.pad_value)
        return drop_empty(sample)


class TestResize:
    """Resize the short side to ``min_size`` and cap the long side at ``max_size`` (0 = no limit)."""

    __test__ = False  # not a pytest class despite the name

    def __init__(self, min_size: int = 0, max_size: int = 0):
        self.min_size, self.max_size = min_size, max_size

    @staticmethod
    def output_size(H: int, W: int, min_size: int, max_size: int) -> Tuple[int, int]:
        sc = min_size / min(H, W) if min_size > 0 else 1.0
        if max_size > 0 and max(H, W) * sc > max_size:
            sc = max_size / max(H, W)
        return max(1, int(H * sc + 0.5)), max(1, int(W * sc + 0.5))

    def __call__(self, sample: Sample, g: Optional[torch.Generator] = None) -> Sample:
        H, W = sample["image"].shape[-2:]
        h, w = self.output_size(H, W, self.min_size, self.max_size)
        return drop_empty(resize(sample, h, w))


def build_transform(data_cfg, task: str, train: bool):
    """The transform of ``cfg.data`` for ``task`` ("panoptic" | "instance" | "semantic")."""
    if not train:
        return TestResize(data_cfg.test_min_size, data_cfg.test_max_size)
    if task == "semantic":
        # Official ADE20K recipe: SSD colour jitter on, single-category crop constraint off (1.0).
        return ResizeShortestEdgeCrop(data_cfg.image_size, data_cfg.min_scale, data_cfg.max_scale, data_cfg.flip,
                                      cat_max_ratio=1.0, color_aug=True)
    return LargeScaleJitter(data_cfg.image_size, data_cfg.min_scale, data_cfg.max_scale, data_cfg.flip)
