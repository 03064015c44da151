"""Reading local weight files: torch state dicts and detectron2 ``.pkl`` model-zoo files.

The official Mask2Former configs initialise the backbone from detectron2's pickles
(``R-50.pkl``: torchvision's ImageNet weights renamed to detectron2's ``stem`` / ``res2..res5``
names; ``swin_*.pkl``: the official Swin weights).  Those files are plain pickles of numpy
arrays, often written by Python 2 (hence ``encoding="latin1"``), and ``torch.load`` cannot read
them.  :func:`read_state_dict` reads both kinds; pickles go through a restricted unpickler that
builds numpy arrays and plain containers only, so a weight file cannot run code.

:func:`resnet_keys_from_detectron2` maps detectron2 ResNet names to torchvision's (the layout of
:class:`m2f.models.backbone.ResNetBackbone`); it is the inverse of detectron2's
``convert-torchvision-to-d2`` renaming.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Dict, Mapping

import numpy as np
import torch
from torch import Tensor

from m2f.errors import InputError

# (module, name) pairs a weight pickle may reference: numpy array reconstruction and dtypes.
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
_ALLOWED = {(m, n) for m in _NUMPY_CORE for n in ("_reconstruct", "scalar", "_frombuffer")} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("_codecs", "encode"),  # Python 2 pickles of byte strings under encoding="latin1"
}


class _WeightUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weight file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved numpy.core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _to_tensor(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    if isinstance(v, np.generic):
        return torch.tensor(v.item())
    return v


def _read_pickle(path: str, field: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _WeightUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise InputError(f"{field}: cannot read {path!r} as a detectron2 weight pickle ({e})") from e
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise InputError(f"{field}: cannot read {path!r} as a detectron2 weight pickle "
                         f"({type(e).__name__}: {e})") from e


def read_state_dict(path: str, field: str = "backbone.weights") -> Dict[str, Tensor]:
    """A flat ``{name: Tensor}`` from a torch file (``.pth``/``.pt``/``.bin``) or a detectron2 ``.pkl``.

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}`` and strips a ``module.`` prefix (DDP).
    Errors name ``field`` and the file.
    """
    if not os.path.isfile(path):
        raise InputError(f"{field}: file {path!r} does not exist")
    if path.endswith(".pkl"):
        sd = _read_pickle(path, field)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
            hint = " (a detectron2 pickle must be named *.pkl)" if "pickle" in str(e).lower() else ""
            raise InputError(f"{field}: cannot read {path!r} as a torch state dict ({e}){hint}") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise InputError(f"{field}: {path!r} holds a {type(sd).__name__}, expected a state dict")
    out: Dict[str, Tensor] = {}
    for k, v in sd.items():
        v = _to_tensor(v)
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise InputError(f"{field}: {path!r} entry {k!r} is a {type(v).__name__}, expected an array")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def check_shapes(module: torch.nn.Module, sd: Mapping[str, Tensor], path: str, hint: str,
                 field: str = "backbone.weights") -> None:
    """InputError naming the file and up to four tensors whose shapes differ from ``module``'s."""
    own = module.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        raise InputError(f"{field}: {path!r} has tensors of the wrong shape (check {hint}): {bad[:4]}")


_D2_RESNET_RULES = [
    (re.compile(r"^stem\.conv1\.norm\."), "bn1."),
    (re.compile(r"^stem\.conv1\."), "conv1."),
    (re.compile(r"^stem\.fc\."), "fc."),
    (re.compile(r"^res([2-5])\."), lambda m: f"layer{int(m.group(1)) - 1}."),
    (re.compile(r"\.conv([1-3])\.norm\."), lambda m: f".bn{m.group(1)}."),
    (re.compile(r"\.shortcut\.norm\."), ".downsample.1."),
    (re.compile(r"\.shortcut\."), ".downsample.0."),
]


def is_detectron2_resnet(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("stem.", "backbone.stem.", "backbone.bottom_up.stem.")) for k in sd)


def resnet_keys_from_detectron2(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """detectron2 ResNet names (``stem.conv1.norm.weight``, ``res2.0.shortcut.weight``, ...) ->
    torchvision names (``bn1.weight``, ``layer1.0.downsample.0.weight``, ...).  Keys outside the
    backbone of a full detectron2 model (``sem_seg_head.*``) are dropped."""
    out: Dict[str, Tensor] = {}
    for k, v in sd.items():
        for prefix in ("backbone.bottom_up.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if not k.startswith(("stem.", "res")):
            continue
        for pat, rep in _D2_RESNET_RULES:
            k = pat.sub(rep, k)
        out[k] = v
    return out
