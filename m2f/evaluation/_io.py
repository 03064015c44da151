"""File reading/writing helpers shared by the evaluators; every failure is an InputError naming the file."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from m2f.errors import InputError

PathLike = Union[str, os.PathLike]


def require_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {what} not found (no such file)")
    return p


def require_dir(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: {what} not found (no such directory)")
    return p


def load_json(path: PathLike, what: str) -> Any:
    p = require_file(path, what)
    try:
        with open(p, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: {what} is not valid JSON ({e})") from None


def read_image_array(path: PathLike, what: str) -> np.ndarray:
    """Read a PNG (or any PIL image) as a numpy array; InputError if missing or unreadable."""
    from PIL import Image

    p = require_file(path, what)
    try:
        with Image.open(p) as im:
            return np.asarray(im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise InputError(f"{p}: {what} cannot be read as an image ({type(e).__name__}: {e})") from None


def image_size(path: PathLike, what: str) -> tuple:
    """(h, w) from the image header, without decoding the pixels."""
    from PIL import Image

    p = require_file(path, what)
    try:
        with Image.open(p) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{p}: {what} cannot be read as an image ({type(e).__name__}: {e})") from None
    return h, w


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic colour -> segment id: R + 256 G + 256^2 B.  [H, W, 3] uint8 -> [H, W] uint32."""
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_to_png(seg: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] (int) -> COCO panoptic colour image [H, W, 3] uint8 (inverse of rgb2id)."""
    seg = np.asarray(seg).astype(np.int64)
    if seg.min(initial=0) < 0 or seg.max(initial=0) >= 256**3:
        raise InputError(f"panoptic segment ids must be in [0, 256^3), got [{seg.min()}, {seg.max()}]")
    return np.stack([seg % 256, seg // 256 % 256, seg // 65536], axis=-1).astype(np.uint8)


def read_panoptic_png(path: PathLike, what: str) -> np.ndarray:
    """Read a COCO panoptic PNG -> segment ids [H, W] uint32."""
    arr = read_image_array(path, what)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise InputError(f"{path}: {what} must be an RGB image (segment id = R + 256 G + 256^2 B), "
                         f"got array of shape {arr.shape}")
    return rgb2id(arr[..., :3])


def write_png(path: PathLike, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def check_keys(obj: Any, keys: Iterable[str], where: str, path: PathLike) -> None:
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: {where} must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputError(f"{path}: {where} is missing key(s) {missing}")


@contextlib.contextmanager
def quiet():
    """Silence the reference tools' prints (pycocotools, panopticapi)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, dict keys -> str (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def short_list(items: Sequence, n: int = 5) -> str:
    items = list(items)
    s = ", ".join(str(x) for x in items[:n])
    return s + (f", ... ({len(items)} in all)" if len(items) > n else "")
