"""The house rules of the layout: m2f_kernels/ is a leaf, no import cycles, the library does not import its
tooling, execution-only fields are marked once, and one provenance module."""
from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

from m2f import provenance
from m2f.config import EXECUTION_ONLY, KERNEL_FIELDS, Config, apply_overrides, config_hash, get_preset

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("m2f", "ablations", "m2f_kernels")


def _modules() -> dict:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = f
    return mods


def _graph() -> dict:
    """module -> the project modules it imports, anywhere in the file (function-level imports too)."""
    mods = _modules()
    graph = {}
    for name, f in mods.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        deps = set()
        for m in found:
            while m and m not in mods:
                m = m.rpartition(".")[0]
            if m and m != name:
                deps.add(m)
        graph[name] = deps
    return graph


def test_kernels_is_a_leaf_package():
    bad = {m: sorted(d for d in deps if not d.startswith("m2f_kernels"))
           for m, deps in _graph().items() if m.startswith("m2f_kernels")}
    assert not any(bad.values()), bad


def test_no_import_cycles_between_project_modules():
    graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []
    assert "ablations.runner" not in graph["ablations.render"] and "ablations.render" not in graph["ablations.records"]


def test_the_library_does_not_import_its_tooling():
    """Model, loss, data, training, inference and evaluation never import the benchmarks, the
    ablation suite or the CLI (they sit on top)."""
    tooling = ("m2f.bench", "ablations", "m2f.cli")
    bad = {m: sorted(d for d in deps if d.startswith(tooling)) for m, deps in _graph().items()
           if m.startswith(("m2f.models", "m2f.loss", "m2f.data", "m2f.train", "m2f.inference", "m2f.evaluat",
                            "m2f.config", "m2f.checkpoint", "m2f.provenance"))}
    assert not any(bad.values()), bad


def test_execution_only_fields_are_read_from_one_mark():
    import typing

    marked = []

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
            elif f.metadata.get("execution_only"):
                marked.append(prefix + f.name)

    walk(Config)
    assert tuple(marked) == EXECUTION_ONLY
    assert set(KERNEL_FIELDS) == {"gemm_backend", "decoder.attention_backend", "pixel_decoder.deform_attn_backend",
                                  "solver.optimizer_impl", "solver.cpu_allocator"}
    assert set(KERNEL_FIELDS) <= set(EXECUTION_ONLY)
    cfg = get_preset("tiny")
    switched = apply_overrides(cfg, {"gemm_backend": "reference", "decoder.attention_backend": "reference",
                                     "backbone.activation_checkpointing": True,
                                     "pixel_decoder.deform_attn_backend": "reference_recompute"})
    assert config_hash(switched) == config_hash(cfg)  # a run's identity ignores every marked field
    assert config_hash(switched, execution=True) != config_hash(cfg, execution=True)
    assert config_hash(apply_overrides(cfg, {"decoder.num_queries": 7})) != config_hash(cfg)
    # the benchmarks and the recorded kernels read the same mark
    from m2f.bench import speed
    from m2f.train import kernels_used

    assert "EXECUTION_ONLY" in Path(speed.__file__).read_text()
    assert set(kernels_used(cfg, "cpu")) == set(KERNEL_FIELDS)


def test_environment_names_the_cpu_and_its_isa():
    env = provenance.environment("cpu")
    cpu = env["cpu"]
    assert cpu["model"] and cpu["cores"] >= 1 and cpu["isa_class"] in ("avx512", "avx2", "neon", "other")
    if Path("/proc/cpuinfo").exists() and "avx2" in Path("/proc/cpuinfo").read_text():
        assert "avx2" in cpu["isa"]
    assert cpu["model"] in env["device"] and cpu["isa_class"] in env["device"]
    assert env["torch"] and env["python"] and "threads" in env


def test_code_fingerprint_ignores_docs_and_follows_code(tmp_path):
    """The fingerprint hashes the result-relevant sources without docstrings and comments."""
    for entries in provenance.FINGERPRINT_PARTS.values():
        for entry in entries:
            src = ROOT / entry
            dst = tmp_path / entry
            if src.is_dir():
                for f in src.rglob("*.py"):
                    (tmp_path / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
                    (tmp_path / f.relative_to(ROOT)).write_text(f.read_text())
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text(src.read_text())
    base = provenance.code_fingerprint_parts(tmp_path)
    assert base == provenance.code_fingerprint_parts(ROOT)
    loss = tmp_path / "m2f/loss/criterion.py"
    text = loss.read_text()
    loss.write_text(text.replace('"""Mask2Former\'s set criterion.', '"""Mask2Former\'s set criterion (reworded).', 1)
                    + "\n# a comment\n")
    assert provenance.code_fingerprint_parts(tmp_path) == base  # docs and comments: same code
    loss.write_text(text.replace("return n.clamp(min=1.0)", "return n.clamp(min=2.0)"))
    changed = provenance.code_fingerprint_parts(tmp_path)
    assert changed["loss"] != base["loss"] and {k: v for k, v in changed.items() if k != "loss"} == {
        k: v for k, v in base.items() if k != "loss"}
    # benchmarks, rendering and the runner are not part of it
    covered = [e for entries in provenance.FINGERPRINT_PARTS.values() for e in entries]
    assert not any(e.startswith(("m2f/bench", "ablations", "m2f/cli")) for e in covered)


def test_git_commit_outside_a_checkout_is_none(tmp_path):
    assert provenance.git_commit(tmp_path) is None


@pytest.mark.parametrize("doc", ["docs/DESIGN.md"])
def test_design_map_names_files_that_exist(doc):
    """docs/DESIGN.md's map points at real files: every `path.py` / `folder/` it names exists."""
    import re

    text = (ROOT / doc).read_text()
    paths = set(re.findall(r"`((?:m2f|ablations|m2f_kernels|tests|benchmarks|reports|docs)/[\w./-]*)`", text))
    assert len(paths) >= 15, paths
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert missing == []
