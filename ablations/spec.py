"""Ablation specs: one declarative TOML file per paper table in ``ablations/specs/``.

A spec is data (see ``specs/masked_attention.toml``)::

    name = "masked_attention"          # CLI / nox name and reports/<name>/
    table = "4a"                       # the paper's table id
    title = "..."
    paper_preset = "r50_coco_panoptic" # base preset at the paper's scale
    base_row = "full model"            # the reference row deltas are taken against
    tasks = ["panoptic", "instance", "semantic"]
    primary_metric = "PQ"              # plotted over training
    metrics = ["PQ", "AP", "mIoU", "FLOPs_G"]   # columns ("AR@100_layer*" expands)
    seeds = [0, 1, 2]                  # seed values; a scale / --seeds picks how many
    [[rows]]
    name = "- masked attention"
    overrides = { "decoder.cross_attention" = "standard" }
    paper = { AP = 37.8, PQ = 47.1, mIoU = 45.5, FLOPs_G = 213 }   # the paper's numbers
    # optional: proxy_overrides = { ... }, applied after `overrides` at the tiny proxy scales only
    # (Table 5's points: the paper's share of the mask logits; see Row.proxy_overrides)

Loading validates every override path and value against :mod:`m2f.config` (applied on the paper
preset and on the ``tiny`` preset), so a typo fails here, not after an hour of training.
"""
from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from m2f.config import ConfigError, get_preset, list_presets
from m2f.errors import InputError

SPEC_DIR = Path(__file__).resolve().parent / "specs"

# Metric name -> (eval task, key in that task's metrics dict).  Other names are run-level
# quantities (FLOPs, memory, throughput) filled in by the runner; see ``ablations.runner.flat_metrics``.
EVAL_METRICS: Dict[str, Tuple[str, str]] = {
    "PQ": ("panoptic", "PQ"), "PQ_th": ("panoptic", "PQ_th"), "PQ_st": ("panoptic", "PQ_st"),
    "SQ": ("panoptic", "SQ"), "RQ": ("panoptic", "RQ"),
    "AP": ("instance", "AP"), "AP50": ("instance", "AP50"), "AP75": ("instance", "AP75"),
    "mIoU": ("semantic", "mIoU"),
}
RUN_METRICS = ("FLOPs_G", "memory_GB", "train_images_per_s", "params_M", "train_seconds")
PAPER_COLUMNS = ("AP", "PQ", "mIoU", "FLOPs_G", "memory_GB")
PROPOSAL_PATTERN = "AR@100_layer*"
VALID_TASKS = ("panoptic", "instance", "semantic", "proposals")
VALID_PLOTS = ("memory", "proposals")


def is_known_metric(name: str) -> bool:
    return name in EVAL_METRICS or name in RUN_METRICS or fnmatch.fnmatch(name, PROPOSAL_PATTERN)


@dataclass(frozen=True)
class Row:
    """One row of a paper table: a config variant (dotted overrides) and the paper's numbers."""

    name: str
    overrides: Dict[str, Any]
    paper: Dict[str, float] = field(default_factory=dict)
    paper_label: Optional[str] = None  # the row's label in shared/PAPER.md (for the cross-check test)
    paper_table: Optional[str] = None  # if the paper numbers come from another table (e.g. 4b's full model = 4a)
    run: bool = True  # False: a paper-only reference row we do not train
    # Overrides applied on top of ``overrides`` at the proxy scales only (every scale that starts from
    # the tiny preset, not ``paper``): where the proxy needs another value to ask the paper's question
    # (Table 5: as sparse a point sample of the mask logits as the paper's).  The paper scale runs the
    # paper preset's value.
    proxy_overrides: Dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return slugify(self.name)

    def overrides_at(self, proxy: bool) -> Dict[str, Any]:
        """The row's overrides at a proxy scale (``proxy``) or at the paper scale: what its records
        store as ``overrides`` and what their table matches them against."""
        return {**self.overrides, **self.proxy_overrides} if proxy else dict(self.overrides)

    def defines(self, record: Dict[str, Any], proxy: bool) -> bool:
        """Whether ``record`` (a runs.jsonl line of this row) was trained with the row's current
        definition: its stored overrides equal :meth:`overrides_at` (a redefined row is retrained)."""
        return (record.get("overrides") or {}) == self.overrides_at(proxy)


@dataclass(frozen=True)
class AblationSpec:
    name: str
    table: str
    title: str
    paper_preset: str
    base_row: str
    tasks: Tuple[str, ...]
    primary_metric: str
    metrics: Tuple[str, ...]
    seeds: Tuple[int, ...]
    rows: Tuple[Row, ...]
    layout: str = "rows"  # "rows": a row per config; "metrics": a row per metric (single-config specs)
    evaluate_proposals: bool = False
    plots: Tuple[str, ...] = ()
    path: Optional[str] = None
    # What the synthetic CPU proxy changes about this table's question (rendered below the Honesty line
    # at every scale but ``paper``)
    proxy_note: Optional[str] = None

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"{self.name}: no row {name!r}; rows: {[r.name for r in self.rows]}")

    @property
    def base(self) -> Row:
        return self.row(self.base_row)

    @property
    def trained_rows(self) -> List[Row]:
        return [r for r in self.rows if r.run]

    def seed_values(self, n: int) -> List[int]:
        """The first ``n`` seeds: the spec's list, continued with the next unused integers."""
        out = list(self.seeds)
        k = max(out, default=-1) + 1
        while len(out) < n:
            out.append(k)
            k += 1
        return out[:n]


def slugify(name: str) -> str:
    keep = []
    for ch in name.lower():
        keep.append(ch if ch.isalnum() else "_")
    s = "".join(keep)
    while "__" in s:
        s = s.replace("__", "_")
    return s.strip("_") or "row"


def table_label(spec: "AblationSpec") -> str:
    """"paper Table 4a" / "paper Figure 3"."""
    t = spec.table
    return f"paper Figure {t[3:]}" if t.lower().startswith("fig") else f"paper Table {t}"


def list_specs() -> List[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.toml"))


def _need(d: Dict[str, Any], key: str, typ, where: str):
    if key not in d:
        raise InputError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, typ):
        raise InputError(f"{where}: field {key!r} must be {typ.__name__ if isinstance(typ, type) else typ}, got {v!r}")
    return v


def load_spec(name_or_path: str | Path, validate_presets: Tuple[str, ...] = ("tiny",)) -> AblationSpec:
    """Load and validate a spec by name (``masked_attention``) or path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = SPEC_DIR / f"{name_or_path}.toml"
        if not p.exists():
            raise InputError(f"unknown ablation {str(name_or_path)!r}; valid choices: {list_specs()}")
    where = str(p)
    try:
        with open(p, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{where}: no such spec file") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{where}: not valid TOML ({e})") from None

    rows_raw = _need(d, "rows", list, where)
    if not rows_raw:
        raise InputError(f"{where}: 'rows' is empty")
    rows = []
    for i, r in enumerate(rows_raw):
        rw = f"{where}: rows[{i}]"
        if not isinstance(r, dict):
            raise InputError(f"{rw}: must be a table")
        unknown = set(r) - {"name", "overrides", "proxy_overrides", "paper", "paper_label", "paper_table", "run"}
        if unknown:
            raise InputError(f"{rw}: unknown fields {sorted(unknown)}")
        paper = dict(r.get("paper", {}))
        for k, v in paper.items():
            if k not in PAPER_COLUMNS:
                raise InputError(f"{rw}.paper: unknown column {k!r}; valid choices: {list(PAPER_COLUMNS)}")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise InputError(f"{rw}.paper.{k}: must be a number, got {v!r}")
        for key in ("overrides", "proxy_overrides"):
            if not isinstance(r.get(key, {}), dict):
                raise InputError(f"{rw}.{key}: must be a table of dotted config paths, got {r[key]!r}")
        rows.append(Row(name=_need(r, "name", str, rw), overrides=dict(r.get("overrides", {})),
                        paper={k: float(v) for k, v in paper.items()}, paper_label=r.get("paper_label"),
                        paper_table=r.get("paper_table"), run=bool(r.get("run", True)),
                        proxy_overrides=dict(r.get("proxy_overrides", {}))))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise InputError(f"{where}: duplicate row names {names}")
    slugs = [r.slug for r in rows]
    if len(set(slugs)) != len(slugs):
        raise InputError(f"{where}: row names collide as directory names {slugs}")

    spec = AblationSpec(
        name=_need(d, "name", str, where), table=str(_need(d, "table", (str, int), where)),
        title=_need(d, "title", str, where), paper_preset=_need(d, "paper_preset", str, where),
        base_row=_need(d, "base_row", str, where), tasks=tuple(_need(d, "tasks", list, where)),
        primary_metric=_need(d, "primary_metric", str, where), metrics=tuple(_need(d, "metrics", list, where)),
        seeds=tuple(int(s) for s in _need(d, "seeds", list, where)), rows=tuple(rows),
        layout=d.get("layout", "rows"), evaluate_proposals=bool(d.get("evaluate_proposals", False)),
        plots=tuple(d.get("plots", ())), path=where, proxy_note=d.get("proxy_note"))
    if spec.proxy_note is not None and (not isinstance(spec.proxy_note, str) or not spec.proxy_note.strip()):
        raise InputError(f"{where}: proxy_note must be a non-empty string, got {spec.proxy_note!r}")
    _validate(spec, where, validate_presets)
    return spec


def _validate(spec: AblationSpec, where: str, presets: Tuple[str, ...]) -> None:
    if spec.name != Path(where).stem:
        raise InputError(f"{where}: name {spec.name!r} must equal the file name {Path(where).stem!r}")
    if spec.paper_preset not in list_presets():
        raise InputError(f"{where}: paper_preset {spec.paper_preset!r} unknown; valid choices: {list_presets()}")
    if spec.base_row not in [r.name for r in spec.rows]:
        raise InputError(f"{where}: base_row {spec.base_row!r} is not a row; rows: {[r.name for r in spec.rows]}")
    if not spec.base.run:
        raise InputError(f"{where}: base_row {spec.base_row!r} has run = false")
    for t in spec.tasks:
        if t not in VALID_TASKS:
            raise InputError(f"{where}: unknown task {t!r}; valid choices: {list(VALID_TASKS)}")
    for m in spec.metrics + (spec.primary_metric,):
        if not is_known_metric(m):
            raise InputError(f"{where}: unknown metric {m!r}; valid: {sorted(EVAL_METRICS) + list(RUN_METRICS)} "
                             f"or {PROPOSAL_PATTERN!r}")
    if spec.layout not in ("rows", "metrics"):
        raise InputError(f"{where}: layout must be 'rows' or 'metrics', got {spec.layout!r}")
    for p in spec.plots:
        if p not in VALID_PLOTS:
            raise InputError(f"{where}: unknown plot {p!r}; valid choices: {list(VALID_PLOTS)}")
    if not spec.seeds:
        raise InputError(f"{where}: 'seeds' is empty")
    # Every override path and value resolves on the paper preset and on the CPU preset(s); the proxy
    # overrides on the CPU preset(s), where they apply.
    for row in spec.rows:
        for preset in (spec.paper_preset,) + tuple(presets):
            try:
                get_preset(preset, row.overrides_at(proxy=preset != spec.paper_preset))
            except ConfigError as e:
                what = "proxy_overrides" if preset != spec.paper_preset and row.proxy_overrides else "overrides"
                raise InputError(f"{where}: row {row.name!r} ({what}, preset {preset!r}): {e}") from None


def load_all() -> List[AblationSpec]:
    return [load_spec(n) for n in list_specs()]


def expand_metrics(spec: AblationSpec, available: List[str]) -> List[str]:
    """The spec's metric list with glob patterns (``AR@100_layer*``) expanded against ``available``
    (layers sorted numerically)."""
    out: List[str] = []
    for m in spec.metrics:
        if any(ch in m for ch in "*?["):
            hits = [a for a in available if fnmatch.fnmatch(a, m)]
            hits.sort(key=lambda s: (len(s), s))
            out.extend(h for h in hits if h not in out)
        elif m not in out:
            out.append(m)
    return out
