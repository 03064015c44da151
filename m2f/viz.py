"""Overlay rendering for predictions: coloured segments blended over the image, white contours, and
a "class score" label at each segment (PIL's default font, scaled).

Legible at any input size: an image whose shorter side is below ``min_side`` (512 px) is upscaled by an
integer factor (nearest neighbour, so every segment keeps its exact shape) before drawing; the font
size and contour width follow the drawing's size; a label goes inside its segment only where it fits
well inside it (covering at most a quarter of it), else beside it, at the place that covers the fewest
pixels of small segments and of labels already drawn.

``metadata`` is duck-typed: ``class_names`` (or ``categories[k]["name"]``) and ``colors`` (or
``categories[k]["color"]``), indexed by contiguous class id.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple

import numpy as np

__all__ = ["overlay_panoptic", "overlay_instances", "overlay_semantic", "draw_segments", "upscale_factor"]


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _class_name(metadata, k: int) -> str:
    names = getattr(metadata, "class_names", None)
    if names is not None and 0 <= k < len(names):
        return str(names[k])
    cats = getattr(metadata, "categories", None)
    if cats is not None and 0 <= k < len(cats):
        return str(cats[k].get("name", k))
    return str(k)


def _class_color(metadata, k: int) -> Tuple[int, int, int]:
    colors = getattr(metadata, "colors", None)
    if colors is not None and 0 <= k < len(colors):
        return tuple(int(c) for c in colors[k])[:3]
    cats = getattr(metadata, "categories", None)
    if cats is not None and 0 <= k < len(cats) and cats[k].get("color") is not None:
        return tuple(int(c) for c in cats[k]["color"])[:3]
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.7, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _jitter(color: Tuple[int, int, int], i: int) -> Tuple[int, int, int]:
    """A per-instance variation of a class colour (deterministic)."""
    rng = np.random.default_rng(i + 1)
    c = np.clip(np.asarray(color, np.float64) + rng.uniform(-50, 50, 3), 0, 255)
    return tuple(int(v) for v in c)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` [H, W] bool whose 4 neighbours are all inside it."""
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def _boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The band of ``mask`` [H, W] bool within ``width`` pixels of its outside."""
    inner = mask
    for _ in range(width):
        inner = _erode(inner)
    return mask & ~inner


def _label_point(mask: np.ndarray) -> Tuple[int, int]:
    """A point inside the mask near its centre: the mask pixel closest to the centroid, (x, y)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[i]), int(ys[i])


def upscale_factor(h: int, w: int, min_side: int = 512, max_side: int = 4096) -> int:
    """The integer factor that brings the shorter side to at least ``min_side`` (1 when it is already;
    never past ``max_side`` on the longer side)."""
    if min_side <= 0 or min(h, w) >= min_side:
        return 1
    k = -(-min_side // min(h, w))  # ceil
    return max(1, min(k, max_side // max(h, w)))


def _box_area(mask_sum: np.ndarray, box) -> int:
    """Pixels of the mask inside ``box`` = (l, t, r, b) (exclusive r, b), from its summed-area table."""
    l, t, r, b = box
    return int(mask_sum[b, r] - mask_sum[t, r] - mask_sum[b, l] + mask_sum[t, l])


def _sat(mask: np.ndarray) -> np.ndarray:
    """Summed-area table [H+1, W+1] of a bool mask."""
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    out[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    return out


def _place_label(mask: np.ndarray, tw: int, th: int, avoid_sat: np.ndarray, pad: int):
    """Where a ``tw`` x ``th`` label box for segment ``mask`` goes: (l, t, r, b), inside the segment
    when it fits there (at least 90% of the box on it, at most a quarter of it covered), else above,
    below, right or left of it, whichever covers the fewest ``avoid`` pixels (clipped to the image)."""
    H, W = mask.shape
    msat = _sat(mask)
    area = int(msat[-1, -1])

    def clip(l, t):
        l = int(min(max(l, 0), max(W - tw, 0)))
        t = int(min(max(t, 0), max(H - th, 0)))
        return l, t, min(l + tw, W), min(t + th, H)

    x, y = _label_point(mask)
    inside = clip(x - tw // 2, y - th // 2)
    box_px = max(1, (inside[2] - inside[0]) * (inside[3] - inside[1]))
    on = _box_area(msat, inside)
    if on >= 0.9 * box_px and on <= 0.25 * area:
        return inside
    ys, xs = np.nonzero(mask)
    t0, b0, l0, r0 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    cx, cy = (l0 + r0) // 2, (t0 + b0) // 2
    candidates = [clip(cx - tw // 2, t0 - pad - th), clip(cx - tw // 2, b0 + pad),
                  clip(r0 + pad, cy - th // 2), clip(l0 - pad - tw, cy - th // 2)]
    # cost: pixels of this segment hidden (worst), then small segments' and earlier labels' pixels
    return min(candidates, key=lambda bx: (_box_area(msat, bx), _box_area(avoid_sat, bx)))


def draw_segments(image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[Tuple[int, int, int]],
                  labels: Sequence[str], alpha: float = 0.5, min_side: int = 512):
    """Blend ``masks`` (bool [H, W] each, drawn in order, later on top) with ``colors`` over ``image``
    (uint8 [H, W, 3]), draw their contours, and write ``labels`` at each segment.  Returns a PIL.Image
    of ``k`` times the input size, ``k = upscale_factor(H, W, min_side)`` (``min_side=0``: never
    upscale)."""
    from PIL import Image, ImageDraw, ImageFont

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"overlay: image must be uint8 [H, W, 3], got shape {img.shape}")
    for m in masks:
        if m.shape != img.shape[:2]:
            raise ValueError(f"overlay: mask shape {m.shape} differs from the image's {img.shape[:2]}")
    k = upscale_factor(img.shape[0], img.shape[1], min_side)
    if k > 1:  # nearest neighbour: segments keep their exact shapes
        img = img.repeat(k, 0).repeat(k, 1)
        masks = [np.asarray(m).repeat(k, 0).repeat(k, 1) for m in masks]
    H, W = img.shape[:2]
    side = min(H, W)
    line = max(1, round(side / 400))  # contour width
    out = img[..., :3].astype(np.float32).copy()
    edges = np.zeros((H, W), bool)
    for m, c in zip(masks, colors):
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(c, np.float32)
        edges |= _boundary(m, line)
    out[edges] = 255.0
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default(size=max(10, round(side / 40)))
    pad = max(1, round(side / 200))
    todo = [(m, text) for m, text in zip(masks, labels) if text and m.any()]
    small = np.zeros((H, W), bool)  # the segments a label could hide: smaller than ~16 label boxes
    boxes = []
    for m, text in todo:
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 2 * pad, b - t + 2 * pad
        boxes.append((tw, th))
        if m.sum() < 16 * tw * th:
            small |= m
    drawn = np.zeros((H, W), bool)
    for (m, text), (tw, th) in zip(todo, boxes):
        avoid = _sat(small | drawn)
        l, t, r, b = _place_label(m, tw, th, avoid, pad)
        draw.rectangle((l, t, r - 1, b - 1), fill=(0, 0, 0))
        draw.text(((l + r) / 2, (t + b) / 2), text, fill=(255, 255, 255), font=font, anchor="mm")
        drawn[t:b, l:r] = True
    return pil


def overlay_panoptic(image: np.ndarray, panoptic_seg, segments_info: Sequence[Mapping], metadata, alpha: float = 0.5,
                     min_side: int = 512):
    """image uint8 [H, W, 3]; panoptic_seg int [H, W] (0 = void); segments_info dicts with ``id``,
    ``category_id`` (contiguous), optional ``isthing`` / ``score``.  Stuff labels omit the score."""
    seg = _to_numpy(panoptic_seg)
    masks, colors, labels = [], [], []
    # stuff first, things on top
    order = sorted(segments_info, key=lambda s: bool(s.get("isthing", True)))
    for s in order:
        m = seg == int(s["id"])
        if not m.any():
            continue
        k = int(s["category_id"])
        thing = bool(s.get("isthing", True))
        base = _class_color(metadata, k)
        masks.append(m)
        colors.append(_jitter(base, int(s["id"])) if thing else base)
        text = _class_name(metadata, k)
        if thing and "score" in s:
            text += f" {float(s['score']):.2f}"
        labels.append(text)
    return draw_segments(image, masks, colors, labels, alpha, min_side)


def overlay_instances(image: np.ndarray, instances: Mapping, metadata, score_threshold: float = 0.5,
                      max_instances: int = 100, alpha: float = 0.5, min_side: int = 512):
    """image uint8 [H, W, 3]; instances ``{"masks" bool [n, H, W], "scores" [n], "labels" [n]}``
    (contiguous labels).  Draws those with score >= ``score_threshold``, best on top."""
    masks = _to_numpy(instances["masks"]).astype(bool)
    scores = _to_numpy(instances["scores"]).astype(np.float64)
    labels = _to_numpy(instances["labels"]).astype(np.int64)
    keep = np.nonzero(scores >= score_threshold)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")][:max_instances][::-1]  # lowest first, best on top
    ms, cs, ts = [], [], []
    for i in keep:
        if not masks[i].any():
            continue
        k = int(labels[i])
        ms.append(masks[i])
        cs.append(_jitter(_class_color(metadata, k), int(i)))
        ts.append(f"{_class_name(metadata, k)} {scores[i]:.2f}")
    return draw_segments(image, ms, cs, ts, alpha, min_side)


def overlay_semantic(image: np.ndarray, sem_seg, metadata, ignore_label: int = 255, alpha: float = 0.5,
                     min_side: int = 512):
    """image uint8 [H, W, 3]; sem_seg int [H, W] class ids (or scores [K, H, W]); one label per class."""
    sem = _to_numpy(sem_seg)
    if sem.ndim == 3:
        sem = sem.argmax(0)
    masks, colors, labels = [], [], []
    for k in np.unique(sem):
        if int(k) == ignore_label:
            continue
        masks.append(sem == k)
        colors.append(_class_color(metadata, int(k)))
        labels.append(_class_name(metadata, int(k)))
    return draw_segments(image, masks, colors, labels, alpha, min_side)
