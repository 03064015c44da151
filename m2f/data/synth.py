"""The embedded synthetic dataset: deterministic procedural scenes in the COCO layouts.

``write_synth(out_dir)`` writes, for each split ``train`` and ``val``::

    out/{split}/images/000001.png        RGB image
    out/{split}/panoptic/000001.png      COCO panoptic PNG (segment id = R + 256 G + 256^2 B, 0 = void)
    out/{split}/panoptic.json            COCO panoptic JSON (images, annotations/segments_info, categories)
    out/{split}/instances.json           COCO instances JSON (thing categories only, RLE segmentations)
    out/{split}/semantic/000001.png      uint8 contiguous class ids, 255 = void
    out/done                             written last

Scenes: 2-3 stuff regions (sky / grass / water, each with its own texture, irregular boundaries) and
2-8 thing objects of 6 classes (square, disc, triangle, ring, cross, star) of sizes from ~6 px up to
about half the image, painted in order so later objects occlude earlier ones.  Each thing class has
a colour family and a texture (checker, radial gradient, stripes, ...) with jitter and noise; in 15% of
objects the colour is random so that the shape still matters.  Thing segments smaller than a few
pixels after occlusion are dropped (their pixels become void).

Category ids are non-contiguous like COCO (things 1, 2, 3, 5, 7, 9; stuff 20, 21, 22) so the
dataset id <-> contiguous id mapping is exercised; contiguous ids follow the sorted category ids
(things 0..5, stuff 6..8).

Every image is drawn from its own ``numpy.random.Generator`` seeded with ``(seed, split, index)``:
the same seed gives byte-identical files (for a given zlib), independently of ordering.
"""
from __future__ import annotations

import colorsys
import io
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["CATEGORIES", "write_synth", "synth_cache_dir", "ensure_synth", "render_scene"]

# COCO-like categories: non-contiguous ids on purpose.
CATEGORIES: List[Dict] = [
    {"id": 1, "name": "square", "isthing": 1, "color": [220, 20, 60], "supercategory": "shape"},
    {"id": 2, "name": "disc", "isthing": 1, "color": [250, 220, 0], "supercategory": "shape"},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [200, 0, 200], "supercategory": "shape"},
    {"id": 5, "name": "ring", "isthing": 1, "color": [230, 230, 230], "supercategory": "shape"},
    {"id": 7, "name": "cross", "isthing": 1, "color": [0, 200, 200], "supercategory": "shape"},
    {"id": 9, "name": "star", "isthing": 1, "color": [120, 40, 200], "supercategory": "shape"},
    {"id": 20, "name": "sky", "isthing": 0, "color": [120, 170, 250], "supercategory": "background"},
    {"id": 21, "name": "grass", "isthing": 0, "color": [40, 160, 40], "supercategory": "background"},
    {"id": 22, "name": "water", "isthing": 0, "color": [20, 60, 140], "supercategory": "background"},
]
_THINGS = ["square", "disc", "triangle", "ring", "cross", "star"]
_ID = {c["name"]: c["id"] for c in CATEGORIES}
_CONTIG = {c["id"]: i for i, c in enumerate(sorted(CATEGORIES, key=lambda c: c["id"]))}

# Colour family of each thing class: (hue, saturation range, value range).
_THING_STYLE = {
    "square": (0.00, (0.65, 0.95), (0.55, 0.95)),    # red, checkerboard
    "disc": (0.15, (0.70, 1.00), (0.75, 1.00)),      # yellow, radial gradient
    "triangle": (0.86, (0.55, 0.90), (0.55, 0.95)),  # magenta, diagonal stripes
    "ring": (0.10, (0.00, 0.15), (0.75, 1.00)),      # white/grey, flat + noise
    "cross": (0.50, (0.60, 0.95), (0.55, 0.90)),     # cyan, dots
    "star": (0.75, (0.50, 0.85), (0.45, 0.85)),      # purple, speckle
}
_RANDOM_COLOUR_PROB = 0.15
_SPLITS = (("train", 0), ("val", 1))


# ---------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise ``[h, w]`` in about [-1, 1]: a (cells+1)^2 normal grid, bilinearly upsampled."""
    grid = rng.normal(size=(cells + 1, cells + 1))
    ys = np.linspace(0, cells, h, endpoint=False) + cells / (2 * h)
    xs = np.linspace(0, cells, w, endpoint=False) + cells / (2 * w)
    y0 = np.minimum(ys.astype(np.int64), cells - 1)
    x0 = np.minimum(xs.astype(np.int64), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    out = (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy
    return out / 1.5


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))) * 255.0


def _stuff_layer(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stuff label map ``[S, S]`` (category id, 0 where none) and the textured image ``[S, S, 3]``."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    labels = np.zeros((s, s), np.int64)
    # Sky above a wavy horizon (sometimes no sky at all).
    has_sky = rng.random() < 0.85
    horizon = s * rng.uniform(0.2, 0.6) + s * 0.07 * _smooth_noise(rng, 1, s, 4)[0]
    sky = (yy < horizon[None, :]) if has_sky else np.zeros((s, s), bool)
    # Ground: grass / water split by an irregular blob boundary.
    mode = rng.random()
    field = _smooth_noise(rng, s, s, 3) + 0.25 * _smooth_noise(rng, s, s, 9)
    if mode < 0.2:
        water = np.zeros((s, s), bool)
    elif mode < 0.35:
        water = np.ones((s, s), bool)
    else:
        water = field < np.quantile(field, rng.uniform(0.25, 0.75))
    labels[:] = _ID["grass"]
    labels[water] = _ID["water"]
    labels[sky] = _ID["sky"]

    img = np.zeros((s, s, 3), np.float64)
    # Sky: light blue (sometimes grey, overcast) vertical gradient + soft clouds.
    overcast = rng.random() < 0.3
    c_top = _hsv(rng.uniform(0.52, 0.64), rng.uniform(0.0, 0.15) if overcast else rng.uniform(0.3, 0.6),
                 rng.uniform(0.6, 1.0))
    c_bot = _hsv(rng.uniform(0.50, 0.62), rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0))
    t = (yy / s)[..., None]
    clouds = np.clip(_smooth_noise(rng, s, s, 5), 0, None)[..., None]
    sky_img = c_top * (1 - t) + c_bot * t + 60.0 * clouds
    # Grass: green with vertical streaks (high-frequency in x, stretched in y).
    # (grass and water colours overlap in the teal range: texture then tells them apart)
    c_grass = _hsv(rng.uniform(0.2, 0.45), rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.7))
    streak = rng.normal(size=(1, s)).repeat(s, 0) * 0.5 + rng.normal(size=(s, s)) * 0.5
    grass_img = c_grass * (1.0 + rng.uniform(0.12, 0.3) * streak[..., None])
    # Water: dark blue/teal with horizontal waves.
    c_water = _hsv(rng.uniform(0.42, 0.64), rng.uniform(0.45, 0.95), rng.uniform(0.3, 0.6))
    freq = rng.uniform(0.5, 1.2)
    waves = np.sin(yy * freq + 2.0 * _smooth_noise(rng, s, s, 4) + rng.uniform(0, 2 * np.pi))
    water_img = c_water * (1.0 + rng.uniform(0.1, 0.3) * waves[..., None])
    img = np.where((labels == _ID["sky"])[..., None], sky_img,
                   np.where((labels == _ID["water"])[..., None], water_img, grass_img))
    return labels, img


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a shape of radius ``r`` in rotated local coordinates ``u, v`` (pixels)."""
    if kind == "square":
        a = rng.uniform(0.85, 1.18)
        return (np.abs(u) <= 0.8 * r * a) & (np.abs(v) <= 0.8 * r / a)
    if kind == "disc":
        a = rng.uniform(0.85, 1.15)
        return (u / a) ** 2 + (v * a) ** 2 <= r * r
    if kind == "triangle":
        m = None
        for k in range(3):
            phi = 2 * np.pi * k / 3 + np.pi / 2
            h = u * math.cos(phi) + v * math.sin(phi) <= r * 0.5
            m = h if m is None else (m & h)
        return m
    if kind == "ring":
        rho = np.hypot(u, v)
        return (rho <= r) & (rho >= r * rng.uniform(0.45, 0.62))
    if kind == "cross":
        w = r * rng.uniform(0.28, 0.4)
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if kind == "star":
        rin = r * rng.uniform(0.38, 0.5)
        phi = np.arctan2(v, u)
        frac = (phi * 5 / (2 * np.pi)) % 1.0
        rb = rin + (r - rin) * np.abs(frac - 0.5) * 2
        return np.hypot(u, v) <= rb
    raise ValueError(kind)


def _thing_texture(kind: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Texture colours ``[h, w, 3]`` of one object in its local coordinates."""
    hue, (s0, s1), (v0, v1) = _THING_STYLE[kind]
    if rng.random() < _RANDOM_COLOUR_PROB:  # appearance cue off: the shape must decide
        base = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.4, 1.0))
    else:
        base = _hsv(hue + rng.uniform(-0.04, 0.04), rng.uniform(s0, s1), rng.uniform(v0, v1))
    if kind == "square":  # checkerboard
        p = rng.uniform(2.5, 6.0)
        t = ((np.floor(u / p) + np.floor(v / p)) % 2) * 2 - 1
        amp = 0.25
    elif kind == "disc":  # bright centre
        t = 1.0 - 2.0 * np.clip(np.hypot(u, v) / max(r, 1e-6), 0, 1)
        amp = 0.3
    elif kind == "triangle":  # diagonal stripes
        p = rng.uniform(3.0, 6.0)
        t = np.sin((u + v) * np.pi / p)
        amp = 0.3
    elif kind == "ring":  # flat
        t = np.zeros_like(u)
        amp = 0.0
    elif kind == "cross":  # dots
        p = rng.uniform(3.0, 5.0)
        t = np.cos(u * 2 * np.pi / p) * np.cos(v * 2 * np.pi / p)
        amp = 0.3
    else:  # star: speckle
        t = rng.uniform(-1, 1, size=u.shape)
        amp = 0.35
    return base * (1.0 + amp * t[..., None])


def render_scene(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Draw one scene.

    Returns ``image`` uint8 ``[S, S, 3]``, ``seg`` int64 ``[S, S]`` (segment ids, 0 = void) and
    ``segments``: ``[{"id", "category_id", "area", "bbox", "iscrowd"}]`` (things in painting order,
    then stuff), with areas equal to the pixel counts of ``seg``.
    """
    s = size
    scale = s / 128.0
    stuff_labels, img = _stuff_layer(rng, s)
    seg = np.zeros((s, s), np.int64)
    cat_of: Dict[int, int] = {}
    # Stuff segments get ids 1..3 in category order (deterministic), things follow.
    next_id = 1
    for name in ("sky", "grass", "water"):
        m = stuff_labels == _ID[name]
        if m.any():
            seg[m] = next_id
            cat_of[next_id] = _ID[name]
            next_id += 1
    stuff_ids = list(cat_of)

    # Things: a few "dominant" classes per image so that one class appears several times.
    n_obj = int(rng.integers(2, 9))
    dominant = rng.choice(len(_THINGS), size=int(rng.integers(1, 4)), replace=False)
    thing_ids = []
    dmin, dmax = 6.0 * scale, 0.5 * s
    for _ in range(n_obj):
        k = int(rng.choice(dominant)) if rng.random() < 0.7 else int(rng.integers(len(_THINGS)))
        kind = _THINGS[k]
        d = math.exp(rng.uniform(math.log(dmin), math.log(dmax)))
        r = d / 2
        cy, cx = rng.uniform(-0.1 * s, 1.1 * s, size=2)
        theta = rng.uniform(0, 2 * np.pi)
        y0, y1 = max(0, int(math.floor(cy - r - 1))), min(s, int(math.ceil(cy + r + 1)) + 1)
        x0, x1 = max(0, int(math.floor(cx - r - 1))), min(s, int(math.ceil(cx + r + 1)) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        m = _shape_mask(kind, u, v, r, rng)
        tex = _thing_texture(kind, u, v, r, rng)
        if not m.any():
            continue
        seg[y0:y1, x0:x1][m] = next_id
        img[y0:y1, x0:x1][m] = tex[m]
        cat_of[next_id] = _ID[kind]
        thing_ids.append(next_id)
        next_id += 1

    # Global photometric noise.
    img = img * rng.uniform(0.85, 1.1) + rng.normal(0.0, rng.uniform(3.0, 10.0), size=img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    # Drop segments that ended up tiny (occluded or cut by the border): their pixels become void.
    areas = np.bincount(seg.ravel(), minlength=next_id)
    min_thing, min_stuff = max(4, int(round(10 * scale * scale))), int(round(64 * scale * scale))
    segments = []
    for sid in thing_ids + stuff_ids:
        limit = min_thing if sid in thing_ids else min_stuff
        if areas[sid] < limit:
            seg[seg == sid] = 0
            continue
        ys, xs = np.nonzero(seg == sid)
        x, y = int(xs.min()), int(ys.min())
        segments.append({"id": int(sid), "category_id": int(cat_of[sid]), "area": int(areas[sid]),
                         "bbox": [x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1], "iscrowd": 0})
    return image, seg, segments


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes) -> None:
    """Atomic write: a temp file beside ``path`` then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def id_to_rgb(seg: np.ndarray) -> np.ndarray:
    """Segment ids ``[H, W]`` -> COCO panoptic colours ``[H, W, 3]`` uint8 (id = R + 256 G + 256^2 B)."""
    return np.stack([seg % 256, (seg // 256) % 256, (seg // 65536) % 256], -1).astype(np.uint8)


def _write_split(root: Path, split: str, split_code: int, n: int, size: int, seed: int) -> Dict[str, Path]:
    from pycocotools import mask as mask_util

    d = root / split
    dirs = {k: d / k for k in ("images", "panoptic", "semantic")}
    for p in dirs.values():
        p.mkdir(parents=True, exist_ok=True)
    images, pan_anns, inst_anns = [], [], []
    ann_id = 1
    for i in range(n):
        rng = np.random.default_rng([seed, split_code, i])
        image, seg, segments = render_scene(rng, size)
        image_id = i + 1
        stem = f"{image_id:06d}"
        _write_bytes(dirs["images"] / f"{stem}.png", _png_bytes(image))
        _write_bytes(dirs["panoptic"] / f"{stem}.png", _png_bytes(id_to_rgb(seg)))
        sem = np.full(seg.shape, 255, np.uint8)
        for sgm in segments:
            sem[seg == sgm["id"]] = _CONTIG[sgm["category_id"]]
        _write_bytes(dirs["semantic"] / f"{stem}.png", _png_bytes(sem))
        images.append({"id": image_id, "file_name": f"{stem}.png", "height": size, "width": size})
        pan_anns.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments})
        for sgm in segments:
            if _CONTIG[sgm["category_id"]] >= len(_THINGS):
                continue
            rle = mask_util.encode(np.asfortranarray((seg == sgm["id"]).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            inst_anns.append({"id": ann_id, "image_id": image_id, "category_id": sgm["category_id"],
                              "segmentation": rle, "area": int(sgm["area"]), "bbox": [float(b) for b in sgm["bbox"]],
                              "iscrowd": 0})
            ann_id += 1
    info = {"description": f"m2f synthetic shapes ({split}, size {size}, seed {seed})", "version": "1"}
    pan = {"info": info, "images": images, "annotations": pan_anns, "categories": CATEGORIES}
    inst = {"info": info, "images": images, "annotations": inst_anns,
            "categories": [c for c in CATEGORIES if c["isthing"]]}
    _write_bytes(d / "panoptic.json", json.dumps(pan, separators=(",", ":")).encode())
    _write_bytes(d / "instances.json", json.dumps(inst, separators=(",", ":")).encode())
    return {f"{split}_images": dirs["images"], f"{split}_panoptic_dir": dirs["panoptic"],
            f"{split}_panoptic_json": d / "panoptic.json", f"{split}_instances_json": d / "instances.json",
            f"{split}_semantic_dir": dirs["semantic"]}


def write_synth(out_dir, images: int = 400, val_images: int = 100, size: int = 128, seed: int = 0) -> Dict[str, Path]:
    """Write the synthetic dataset to ``out_dir`` (train and val splits, see the module docstring).

    Returns ``{"root", "train_images", "train_panoptic_dir", "train_panoptic_json",
    "train_instances_json", "train_semantic_dir", "val_..." (same), "done"}`` as Paths.
    """
    from m2f.errors import InputError

    if images < 1 or val_images < 1:
        raise InputError(f"synthetic dataset: images={images} and val_images={val_images} must be >= 1")
    if size < 32:
        raise InputError(f"synthetic dataset: size={size} must be >= 32")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    done = root / "done"
    if done.exists():
        done.unlink()
    paths: Dict[str, Path] = {"root": root}
    for (split, code), n in zip(_SPLITS, (images, val_images)):
        paths.update(_write_split(root, split, code, n, size, seed))
    spec = {"images": images, "val_images": val_images, "size": size, "seed": seed}
    _write_bytes(done, (json.dumps(spec, sort_keys=True) + "\n").encode())
    paths["done"] = done
    return paths


def synth_cache_dir(size: int = 128, images: int = 400, val_images: int = 100, seed: int = 0) -> Path:
    """Cache folder of one synthetic dataset: ``$XDG_CACHE_HOME/m2f/`` (default ``~/.cache/m2f/``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "m2f" / f"synth_s{size}_n{images}_v{val_images}_seed{seed}"


def ensure_synth(size: int = 128, images: int = 400, val_images: int = 100, seed: int = 0,
                 cache_dir: Optional[Path] = None) -> Path:
    """Generate the synthetic dataset once into its cache folder and return that folder.

    Safe when several processes race: each writes into its own temporary folder and renames it into
    place; the loser discards its copy."""
    final = Path(cache_dir) if cache_dir is not None else synth_cache_dir(size, images, val_images, seed)
    if (final / "done").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_synth(tmp, images=images, val_images=val_images, size=size, seed=seed)
        if final.exists() and not (final / "done").exists():
            # A crashed earlier attempt left an incomplete folder (never the case with rename, but be safe).
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "done").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
