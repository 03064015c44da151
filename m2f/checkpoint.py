"""Atomic file writes and checkpoints: nothing half-written is ever left under a final name.

Checkpoints are **weights-only**: tensors and plain dicts / lists / tuples / numbers / strings, so
``torch.load(..., weights_only=True)`` reads them and loading one never runs code from the file.
:func:`save_checkpoint` checks the tree before writing and marks it ``"format": CHECKPOINT_FORMAT``;
:func:`load_checkpoint` always loads with ``weights_only=True``.  A file that needs arbitrary
unpickling (a crafted one, or another program's), or one written before the format mark existed, is
refused with a one-line error naming the file and why; ``trust=True`` (the CLI's
``--trust-checkpoint``) loads it after a warning, and ``m2f convert OLD --trust-checkpoint --out NEW``
rewrites it in the safe format.  :func:`load_model_weights` loads a state dict into a model with a
one-line mismatch error (counts, the first few keys, the likely cause).
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch


def _atomic_write(path: Path, write_fn) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def append_jsonl(path, record: Dict[str, Any]) -> None:
    """Append one JSON line (a single write of a whole line, flushed and fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list:
    """Read JSON lines, ignoring a truncated last line (a run killed mid-write)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return out


def rewrite_jsonl(path, records: Iterable[Dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records)
    atomic_write_text(path, text)



# ---------------------------------------------------------------------------------------------
# Weights-only checkpoints
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "m2f-checkpoint/2"  # the value of a checkpoint's "format" key
_PLAIN = (str, int, float, bool, type(None))
TRUST_HINT = ("if you trust the file's source, pass --trust-checkpoint (trust=True), or rewrite it once in the "
              "safe format: m2f convert FILE --trust-checkpoint --out NEW.pth")


def check_weights_only(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first value ``torch.load(weights_only=True)`` would refuse (anything
    but tensors, torch.Size / dtype / device, and plain dicts, lists, tuples, numbers, strings)."""
    if isinstance(obj, _PLAIN) or torch.is_tensor(obj) or isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, _PLAIN):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not weights-only safe")
            check_weights_only(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_weights_only(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not weights-only safe "
                    f"(store tensors and plain dicts/lists/numbers/strings)")


def to_weights_only(obj: Any) -> Any:
    """A copy of ``obj`` in weights-only types: dataclasses -> dicts, numpy arrays / scalars -> tensors /
    numbers, sets -> sorted lists, other mappings -> dicts.  Raises TypeError on anything else."""
    import dataclasses

    import numpy as np

    if isinstance(obj, _PLAIN) or torch.is_tensor(obj) or isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_weights_only(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {k if isinstance(k, _PLAIN) else str(k): to_weights_only(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted(to_weights_only(v) for v in obj)
    if isinstance(obj, tuple):
        return tuple(to_weights_only(v) for v in obj)
    if isinstance(obj, list):
        return [to_weights_only(v) for v in obj]
    raise TypeError(f"a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored weights-only")


def save_checkpoint(ckpt: Dict[str, Any], path) -> None:
    """Write an m2f checkpoint atomically, weights-only safe (checked first), with the format mark."""
    ckpt = {**ckpt, "format": CHECKPOINT_FORMAT}
    check_weights_only(ckpt)
    atomic_torch_save(ckpt, path)


def _first_line(e: BaseException) -> str:
    """The informative line of torch's multi-paragraph weights-only error ("Unsupported global: ...")."""
    text = str(e)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("WeightsUnpickler error:", "Unsupported global", "Unsupported operand")):
            return line.replace("WeightsUnpickler error: ", "")
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def _is_unpickling_refusal(e: BaseException) -> bool:
    return isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "WeightsUnpickler" in str(e)


def load_checkpoint(path, map_location="cpu", trust: bool = False, require_format: bool = True) -> Dict[str, Any]:
    """Read an m2f checkpoint with ``torch.load(weights_only=True)``.

    Refused with a one-line :class:`~m2f.errors.InputError` naming the file and why: a file that needs
    arbitrary unpickling (it could run code), one without the format mark (written before weights-only
    checkpoints; ``require_format=False`` accepts those, e.g. for ``m2f convert``), one that is not an m2f
    checkpoint.  ``trust=True`` loads the first two kinds after a warning (the unsafe one with
    ``weights_only=False``: only for files from a source you trust)."""
    from m2f.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - classified below
        if not _is_unpickling_refusal(e):
            raise InputError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {_first_line(e)})") from None
        if not trust:
            raise InputError(f"checkpoint {path}: refused: loading it needs arbitrary unpickling, which can run code "
                             f"({_first_line(e)}); {TRUST_HINT}") from None
        warnings.warn(f"checkpoint {path}: loading with arbitrary unpickling (--trust-checkpoint): this runs any code "
                      f"the file holds", stacklevel=2)
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e2:  # noqa: BLE001
            raise InputError(f"checkpoint {path}: cannot be read ({type(e2).__name__}: {_first_line(e2)})") from None
        ckpt = to_weights_only(ckpt) if isinstance(ckpt, dict) else ckpt
    else:
        if isinstance(ckpt, dict) and ckpt.get("format") != CHECKPOINT_FORMAT and require_format:
            if not trust:
                raise InputError(f"checkpoint {path}: refused: written before weights-only m2f checkpoints (no "
                                 f"'format': {CHECKPOINT_FORMAT!r} entry); {TRUST_HINT}")
            warnings.warn(f"checkpoint {path}: an older m2f checkpoint format, loaded because of --trust-checkpoint",
                          stacklevel=2)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise InputError(f"checkpoint {path}: not an m2f checkpoint (expected a dict with 'model' and 'config')")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["config"], dict):
        raise InputError(f"checkpoint {path}: 'model' must be a state dict and 'config' a plain dict")
    return ckpt


# ---------------------------------------------------------------------------------------------
# Loading weights into a model: one-line mismatch errors
# ---------------------------------------------------------------------------------------------
_FIRST = 3  # keys named per kind in the one-line message


def _architecture(state: Dict[str, Any]) -> Dict[str, Any]:
    """What a Mask2Former state dict says about its model (queries, classes, hidden size, layers)."""
    out: Dict[str, Any] = {}

    def shape(key):
        v = state.get(key)
        return tuple(v.shape) if torch.is_tensor(v) else None

    qp = shape("transformer_decoder.query_pos.weight")
    if qp:
        out["queries"], out["hidden"] = qp
    ce = shape("transformer_decoder.class_embed.weight")
    if ce:
        out["classes"] = ce[0] - 1
    layers = {k.split(".")[2] for k in state if k.startswith("transformer_decoder.layers.")}
    if layers:
        out["decoder layers"] = len(layers)
    enc = {k.split(".")[2] for k in state if k.startswith("pixel_decoder.layers.")}
    if enc:
        out["encoder layers"] = len(enc)
    blocks = {".".join(k.split(".")[1:3]) for k in state
              if k.startswith("backbone.") and k.split(".")[1].startswith(("res", "layer"))}
    blocks |= {".".join(k.split(".")[1:5]) for k in state if k.startswith("backbone.") and ".blocks." in k}
    if blocks:
        out["backbone blocks"] = len(blocks)
    return out


def _describe_arch(a: Dict[str, Any]) -> str:
    keys = ("queries", "classes", "hidden", "decoder layers", "encoder layers", "backbone blocks")
    return " / ".join(f"{a[k]} {k}" for k in keys if k in a) or "no Mask2Former tensors"


def weights_mismatch(model_state: Dict[str, Any], state: Dict[str, Any]) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, wrong-shape) keys of ``state`` against ``model_state``."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in model_state.items()
             if k in state and torch.is_tensor(state[k]) and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, wrong


def load_model_weights(model, state: Dict[str, Any], source: str, built_for: str = "the model",
                       report_dir: Optional[Path] = None) -> None:
    """``model.load_state_dict(state)`` (strict) with ONE line on a mismatch: the counts of missing,
    unexpected and wrong-shape keys, the first few of each, and the likely cause (what the model was
    built for against what the tensors say).  The full lists go to a file named in the message."""
    from m2f.errors import InputError

    own = model.state_dict()
    missing, unexpected, wrong = weights_mismatch(own, state)
    if not (missing or unexpected or wrong):
        model.load_state_dict(state)
        return

    def first(keys: List[str]) -> str:
        return ", ".join(keys[:_FIRST]) + (", ..." if len(keys) > _FIRST else "")

    parts = [f"{len(missing)} missing" + (f" ({first(missing)})" if missing else ""),
             f"{len(unexpected)} unexpected" + (f" ({first(unexpected)})" if unexpected else ""),
             f"{len(wrong)} wrong-shape" + (f" ({first(wrong)})" if wrong else "")]
    mine, theirs = _architecture(own), _architecture(state)
    if not theirs:
        cause = f"the file holds no Mask2Former weights ({len(state)} entries)"
    elif mine != theirs:
        cause = f"built for {built_for}: {_describe_arch(mine)}; the weights have {_describe_arch(theirs)}"
    else:
        cause = f"same architecture summary ({_describe_arch(mine)}): a different model version or a renamed module"
    report = Path(report_dir or tempfile.gettempdir()) / f"m2f-weights-mismatch-{Path(str(source)).stem}.txt"
    try:
        atomic_write_text(report, "".join(f"{kind}\t{k}\n" for kind, keys in
                                          (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong))
                                          for k in keys))
        where = f"; full lists in {report}"
    except OSError:
        where = ""
    raise InputError(f"{source}: the weights do not fit {built_for}: {'; '.join(parts)}. Likely cause: {cause}{where}")
