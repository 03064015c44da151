"""Overlay rendering for predictions: coloured segments blended over the image, white contours, and
a "class score" label at each segment (PIL ImageDraw default font).

``metadata`` is duck-typed: ``class_names`` (or ``categories[k]["name"]``) and ``colors`` (or
``categories[k]["color"]``), indexed by contiguous class id.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple

import numpy as np

__all__ = ["overlay_panoptic", "overlay_instances", "overlay_semantic", "draw_segments"]


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


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` [H, W] bool with a 4-neighbour outside it."""
    m = np.pad(mask, 1, constant_values=False)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _label_point(mask: np.ndarray) -> Tuple[int, int]:
    """A point inside the mask near its centre: the mask pixel closest to the centroid, (x, y)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[i]), int(ys[i])


def draw_segments(image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[Tuple[int, int, int]],
                  labels: Sequence[str], alpha: float = 0.5):
    """Blend ``masks`` (bool [H, W] each, drawn in order, later on top) with ``colors`` over ``image``
    (uint8 [H, W, 3]), draw their contours, and write ``labels`` at each segment.  Returns a PIL.Image."""
    from PIL import Image, ImageDraw, ImageFont

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"overlay: image must be uint8 [H, W, 3], got shape {img.shape}")
    out = img[..., :3].astype(np.float32).copy()
    edges = np.zeros(out.shape[:2], bool)
    for m, c in zip(masks, colors):
        if m.shape != out.shape[:2]:
            raise ValueError(f"overlay: mask shape {m.shape} differs from the image's {out.shape[:2]}")
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(c, np.float32)
        edges |= _boundary(m)
    out[edges] = 255.0
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    for m, c, text in zip(masks, colors, labels):
        if not text or not m.any():
            continue
        x, y = _label_point(m)
        l, t, r, b = draw.textbbox((x, y), text, font=font, anchor="mm")
        draw.rectangle((l - 1, t - 1, r + 1, b + 1), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor="mm")
    return pil


def overlay_panoptic(image: np.ndarray, panoptic_seg, segments_info: Sequence[Mapping], metadata, alpha: float = 0.5):
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
    return draw_segments(image, masks, colors, labels, alpha)


def overlay_instances(image: np.ndarray, instances: Mapping, metadata, score_threshold: float = 0.5,
                      max_instances: int = 100, alpha: float = 0.5):
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
    return draw_segments(image, ms, cs, ts, alpha)


def overlay_semantic(image: np.ndarray, sem_seg, metadata, ignore_label: int = 255, alpha: float = 0.5):
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
    return draw_segments(image, masks, colors, labels, alpha)
