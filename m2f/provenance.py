"""Where a result came from: the machine, the code version and the code fingerprint.

One module for every record the project writes (training summaries, ablation records, benchmark
results):

- :func:`environment`: torch / Python / CUDA versions, threads, the CPU model and its ISA (the
  avx2 / avx512 flags the kernel reports, and the capability ATen dispatches to), the GPU if used,
  the host, and the git commit.
- :func:`git_commit`: ``HEAD``'s sha, ``-dirty`` when tracked files differ (None outside a checkout).
- :func:`code_fingerprint`: a hash of the sources that can change a result -- model, loss, data,
  training, inference, evaluation, kernels and the config -- and nothing else (benchmarks, docs,
  rendering, the CLI and the ablation runner are not part of it).  Each file is parsed and hashed
  without its docstrings and comments, so rewording documentation leaves the fingerprint alone while
  any code change moves it.  Works without git (an installed copy, a tarball).  Ablation tables render
  the records of one fingerprint.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent

# The sources behind a result, by part (paths relative to the repository / install root).
FINGERPRINT_PARTS: Dict[str, List[str]] = {
    "config": ["m2f/config.py"],
    "model": ["m2f/models", "m2f_kernels", "m2f/registry.py"],
    "loss": ["m2f/loss"],
    "data": ["m2f/data"],
    "training": ["m2f/train.py"],
    "inference": ["m2f/inference.py"],
    "evaluation": ["m2f/evaluate.py", "m2f/evaluation"],
}


# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
              "amx_bf16", "asimd", "sve")


@functools.lru_cache(maxsize=None)
def cpu_info() -> Dict[str, Any]:
    """{"model": "AMD EPYC ...", "isa": ["avx2", "avx512f", ...] (flags present), "isa_class":
    "avx512" | "avx2" | ..., "aten_capability": what ATen dispatches to (honours ATEN_CPU_CAPABILITY)}."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            model = m.group(1).strip()
        f = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        if f:
            flags = set(f.group(1).split())
    except OSError:
        pass
    isa = [x for x in _ISA_FLAGS if x in flags]
    isa_class = ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else
                 "neon" if "asimd" in flags else "other")
    info: Dict[str, Any] = {"model": model, "isa": isa, "isa_class": isa_class, "cores": os.cpu_count(),
                            "machine": platform.machine()}
    try:
        import torch

        info["aten_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - informational
        pass
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        if os.environ.get(var):
            info.setdefault("isa_caps", {})[var] = os.environ[var]
    return info


def cpu_label(info: Optional[Dict[str, Any]] = None) -> str:
    """One line for tables: "AMD EPYC (avx512, 2 cores)", with any ISA cap in force."""
    info = info or cpu_info()
    caps = info.get("isa_caps")
    cap = f", capped: {', '.join(f'{k}={v}' for k, v in caps.items())}" if caps else ""
    return f"{info.get('model')} ({info.get('isa_class')}, {info.get('cores')} cores{cap})"


def environment(device: Optional[str] = None) -> Dict[str, Any]:
    """The machine and software a result was measured with (``device``: "cpu", "cuda", "cuda:1" or None
    = CUDA when available)."""
    import torch

    env: Dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count(), "platform": platform.platform(), "hostname": platform.node(),
                           "cpu": cpu_info()}
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["device"] = env["gpu"]
    else:
        env["device"] = f"cpu ({cpu_label()})"
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    commit = git_commit()
    if commit:
        env["git_commit"] = commit
    return env


# ---------------------------------------------------------------------------------------------
# Code version
# ---------------------------------------------------------------------------------------------
def git_commit(root: Path = ROOT) -> Optional[str]:
    """``HEAD``'s sha, with ``-dirty`` when tracked files differ; None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return None


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        body = getattr(node, "body", None)
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


def source_hash(path: Path) -> str:
    """sha256 of a Python file's syntax tree without docstrings (comments and layout never reach the
    tree); other files hash their bytes."""
    data = Path(path).read_bytes()
    if Path(path).suffix == ".py":
        tree = _StripDocstrings().visit(ast.parse(data))
        data = ast.dump(tree, annotate_fields=True, include_attributes=False).encode()
    return hashlib.sha256(data).hexdigest()


def _files(entry: str, root: Path) -> List[Path]:
    p = root / entry
    if p.is_dir():
        return sorted(q for q in p.rglob("*.py") if "__pycache__" not in q.parts)
    return [p] if p.is_file() else []


def code_fingerprint_parts(root: Path = ROOT) -> Dict[str, str]:
    """Per part of :data:`FINGERPRINT_PARTS`, a 12-hex hash of its files (relative path + source hash)."""
    out = {}
    for part, entries in FINGERPRINT_PARTS.items():
        h = hashlib.sha256()
        for entry in entries:
            for f in _files(entry, root):
                h.update(f.relative_to(root).as_posix().encode() + b"\0" + source_hash(f).encode() + b"\n")
        out[part] = h.hexdigest()[:12]
    return out


@functools.lru_cache(maxsize=None)
def _cached_fingerprint(root: str) -> str:
    parts = code_fingerprint_parts(Path(root))
    return hashlib.sha256("".join(f"{k}={v};" for k, v in sorted(parts.items())).encode()).hexdigest()[:12]


def code_fingerprint(root: Path = ROOT) -> str:
    """12-hex fingerprint of every source that can change a result (module docstring)."""
    return _cached_fingerprint(str(Path(root).resolve()))
