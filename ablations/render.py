"""Render an ablation's stored records (``reports/<ablation>/runs.jsonl``) into
``table.md``, ``table.csv``, ``convergence.png`` (+ ``memory.png`` / ``proposals.png`` where the spec
asks) and the combined ``reports/README-tables.md``.  No training; re-run at any time.

Table cells: ours = mean ± std over seeds (n); Δ = the mean of per-seed differences row - base row
over the seeds both ran, with its 95% interval [low, high] and the number of pairs (ablations/stats.py);
the paper's value and Δ beside; verdict: ``agrees`` / ``contradicts`` (the interval excludes 0 with
the paper's / the opposite sign), ``inconclusive``, ``no paper value``, ``base``.

One code version per table: a table renders the records of ONE code fingerprint
(:func:`m2f.provenance.code_fingerprint`, over the sources that can change a result) and names it;
by default the current code's.  Records of other fingerprints are stale: ``allow_stale=True``
(``--allow-stale``) renders the most recent stale fingerprint's records with STALE in the header.

The scoreboard (:func:`scoreboard`) counts, per table and in total, the verdicts of every paper row
and metric (PQ, AP, mIoU) with |paper Δ| >= :data:`SCOREBOARD_MIN_PAPER_DELTA`.
"""
from __future__ import annotations

import os

import csv
import io
import math
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ablations.records import eval_metric, flat_metrics, runs_path
from ablations.scales import describe, get_scale, is_proxy, recipe_scale, scale_rank
from ablations.stats import (CONFIDENCE, paired_delta, second_look_confidence, second_look_error, signed_rank_p,
                             seeds_for_half_width, verdict)
from ablations.spec import EVAL_METRICS, PROPOSAL_PATTERN, AblationSpec, expand_metrics, list_specs, load_spec, table_label
from m2f.checkpoint import atomic_write_text, read_jsonl
from m2f.errors import InputError

README_TABLES = "README-tables.md"
# Elementwise / trivial ops fvcore does not count (also not counted by the paper's fvcore numbers);
# other uncounted ops (attention, grid_sample) are named in the table header.
_TRIVIAL_OPS = {"add", "add_", "all", "any", "cos", "sin", "div", "lt", "gt", "le", "ge", "eq", "ne", "max_pool2d",
                "meshgrid", "mul", "mul_", "pow", "sigmoid", "softmax", "sub", "rsub", "sum", "mean", "exp", "log",
                "neg", "clamp", "clamp_", "cumsum", "sqrt", "rsqrt", "where", "fill_", "masked_fill", "masked_fill_",
                "ones_like", "zeros_like", "arange", "floor", "abs", "max", "min", "relu_", "div_", "sub_", "stack"}

PAPER_SOURCES = ("AP: COCO instance models; PQ: COCO panoptic models; mIoU: ADE20K semantic models "
                 "(R50, full schedules; FLOPs with fvcore over COCO val images)")


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------
def record_fingerprint(r: Dict[str, Any]) -> Optional[str]:
    """The code fingerprint a record was computed with (None for records written before it was kept)."""
    return r.get("code_fingerprint")


def current_fingerprint() -> str:
    from m2f.provenance import code_fingerprint

    return code_fingerprint()


def select_records(records: List[Dict[str, Any]], scale: Optional[str] = None, fingerprint: Optional[str] = None,
                   allow_stale: bool = False, spec: Optional[AblationSpec] = None
                   ) -> Tuple[str, List[Dict[str, Any]], Dict[str, Any]]:
    """Records of one scale and ONE code fingerprint, the latest per (row, seed).

    Default scale: the highest-fidelity one recorded (paper > cpu > cpu-<N>it > quick > smoke), so a
    smoke pipeline check never replaces a measured table.  A record's scale is the one whose current
    recipe it was trained with (:func:`ablations.scales.recipe_scale`): cpu records of the earlier
    1000-iteration recipe are ``cpu-1000it`` records, never mixed into a 2000-iteration cpu table.  Fingerprint: ``fingerprint`` (default: the
    current code's); without records of it, the most recent other fingerprint's when
    ``allow_stale``, else none.  Returns (scale, records, info) with info = {"fingerprint",
    "current" (the checkout's), "stale": bool (the records are not the checkout's code), "stale_records":
    count of the scale's records of other fingerprints than the one asked for}.  An explicit
    ``fingerprint`` other than the checkout's renders that code version's records, marked stale.

    With ``spec``, a record counts only while its ``overrides`` are its row's current ones at that
    scale (:meth:`Row.overrides_at`): a row whose definition changed (Table 5's sparse points at the
    proxy scales) never mixes records of its old and new configs; info["redefined_records"] counts the
    ones left out.  info["other_scales"]: {scale: records} of the other scales in the file (kept as
    provenance, never shown with this one)."""
    current = current_fingerprint()
    want = fingerprint or current
    info: Dict[str, Any] = {"fingerprint": None, "current": current, "stale": False, "stale_records": 0,
                            "redefined_records": 0, "other_scales": {}}
    if not records:
        return scale or "", [], info
    scales = [recipe_scale(r) for r in records]
    if scale is None:
        order = {sc: i for i, sc in enumerate(scales)}  # most recent position per scale
        scale = max(order, key=lambda sc: (scale_rank(sc), order[sc]))
    for sc in scales:
        if sc != scale:
            info["other_scales"][sc] = info["other_scales"].get(sc, 0) + 1
    of_scale = [r for r, sc in zip(records, scales) if sc == scale]
    chosen = want
    if not any(record_fingerprint(r) == want for r in of_scale):
        info["stale_records"] = len(of_scale)
        if not allow_stale or not of_scale:
            return scale, [], info
        chosen = record_fingerprint(of_scale[-1])  # the most recent stale code version
        info["stale"] = True
    else:
        info["stale_records"] = sum(record_fingerprint(r) != want for r in of_scale)
    info["fingerprint"] = chosen
    info["stale"] = chosen != current
    chosen_records = [r for r in of_scale if record_fingerprint(r) == chosen]
    if spec is not None:
        rows, proxy = {row.name: row for row in spec.rows}, is_proxy(scale)
        kept = [r for r in chosen_records if r.get("row") not in rows or rows[r["row"]].defines(r, proxy=proxy)]
        info["redefined_records"] = len(chosen_records) - len(kept)
        chosen_records = kept
    latest: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for r in chosen_records:
        latest[(r.get("row"), r.get("seed"))] = r
    return scale, list(latest.values()), info


def stats(values: List[float]) -> Dict[str, Any]:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "values": [], "by_seed": {}}
    return {"n": n, "mean": statistics.fmean(values), "std": statistics.stdev(values) if n > 1 else None,
            "values": list(values)}


def aggregate(spec: AblationSpec, records: List[Dict[str, Any]]) -> Tuple[List[str], Dict[str, Dict[str, Dict]]]:
    """(metric names, {row name: {metric: stats with "by_seed" {seed: value}}}) for the spec's rows."""
    per_row: Dict[str, List[Tuple[int, Dict[str, float]]]] = {r.name: [] for r in spec.rows}
    available: List[str] = []
    from ablations.records import machine_of

    machines: Dict[str, Dict[Any, str]] = {row: {} for row in per_row}
    # memory_GB is the probe's per-image figure only when every record has one (the header says which)
    probed = all(r.get("memory_probe") for r in records if r.get("row") in per_row)
    for rec in records:
        if rec.get("row") in per_row:
            m = flat_metrics(rec, memory_probe=probed)
            per_row[rec["row"]].append((rec.get("seed"), m))
            machines[rec["row"]][rec.get("seed")] = machine_of(rec)
            available.extend(k for k in m if k not in available)
    metrics = expand_metrics(spec, available)
    out: Dict[str, Dict[str, Dict]] = {}
    for row, ms in per_row.items():
        out[row] = {}
        for m in metrics:
            st = stats([x[m] for _, x in ms if m in x])
            st["by_seed"] = {seed: x[m] for seed, x in ms if m in x}
            st["machine_by_seed"] = {seed: machines[row].get(seed) for seed in st["by_seed"]}
            out[row][m] = st
    return metrics, out


TIMING_METRICS = ("train_images_per_s", "train_seconds")  # measured, not computed: one machine per pair


def _pairable(base: Dict[str, Any], row: Dict[str, Any], metric: str) -> Tuple[Dict, Dict, int]:
    """(base values by seed, row values by seed, pairs left out) for a paired Δ: a timing metric pairs
    only seeds whose row and base row ran on the same machine (a speed ratio across CPUs measures the
    CPUs); every other metric pairs every seed both ran."""
    bs, rs = base.get("by_seed", {}), row.get("by_seed", {})
    if metric not in TIMING_METRICS:
        return bs, rs, 0
    bm, rm = base.get("machine_by_seed", {}), row.get("machine_by_seed", {})
    cross = {seed for seed in set(bs) & set(rs) if bm.get(seed) != rm.get(seed)}
    return ({k: v for k, v in bs.items() if k not in cross}, {k: v for k, v in rs.items() if k not in cross},
            len(cross))


def scale_seeds(scale: Optional[str]) -> Optional[int]:
    """The number of seeds a table at ``scale`` runs per row by default (None: unknown scale / all)."""
    try:
        return get_scale(scale).seeds if scale else None
    except InputError:
        return None


def extra_seed_rows(rows: List[Dict[str, Any]], table_seeds: Optional[int]) -> Tuple[Dict[str, int], int]:
    """Rows given seeds that the other rows did not run (``run NAME --seeds 8 --row ROW --row BASE``):
    ({row: pairs}, the other rows' number), for the rows paired on more seeds than both the scale's
    ``table_seeds`` and the fewest pairs of any run row ({} when every row ran as many, e.g. a whole
    table at ``--seeds 8``)."""
    pairs: Dict[str, int] = {}
    for r in rows:
        if not r["is_base"] and r["pairs"]:
            pairs[r["row"]] = max(pairs.get(r["row"], 0), r["pairs"])
    if not table_seeds or not pairs:
        return {}, table_seeds or 0
    ref = max(table_seeds, min(pairs.values()))
    return {row: n for row, n in pairs.items() if n > ref}, ref


def table_rows(spec: AblationSpec, metrics: List[str], agg: Dict[str, Dict[str, Dict]],
               table_seeds: Optional[int] = None) -> List[Dict[str, Any]]:
    """One dict per (row, metric): n, mean, std, delta (paired: mean of per-seed differences), low,
    high (its 95% interval), pairs (seeds both rows ran), paper, paper_delta, verdict.  A row paired
    on fewer seeds than its base row ran (a table still being run) gets no verdict: ``incomplete
    (k/N seeds)``; every row runs the base row's seeds.  ``table_seeds`` (the scale's number of
    seeds): a row paired on all of them is complete even when its base row ran more seeds, for
    another row that was given extra seeds (:func:`extra_seed_rows`)."""
    base = spec.base
    out = []
    for row in spec.rows:
        for m in metrics:
            s = agg[row.name][m]
            b = agg[base.name][m]
            is_base = row.name == base.name
            bs, rs, cross = _pairable(b, s, m)
            d = None if is_base else paired_delta(bs, rs)
            paper = row.paper.get(m)
            pb = base.paper.get(m)
            paper_delta = (paper - pb) if (paper is not None and pb is not None and not is_base) else None
            v = "base" if is_base else ("not run" if not row.run else verdict(d, paper_delta))
            trained = row.overrides.get("data.task")
            if trained and trained != "panoptic" and EVAL_METRICS.get(m, (trained,))[0] != trained:
                v = f"n/a ({trained} model)"  # Table 7: an instance model has no PQ or mIoU
            need = (b["n"] if table_seeds is None else min(b["n"], table_seeds)) - cross
            if d and d["n"] < need and v not in ("base", "not run"):
                v = f"incomplete ({d['n']}/{need} seeds)"
            if cross and not is_base and row.run and (not d or d["n"] == 0):
                v = "not comparable (row and base ran on different machines)"
            out.append({"row": row.name, "metric": m, "is_base": is_base, "run": row.run, "n": s["n"],
                        "mean": s["mean"], "std": s["std"], "delta": d["delta"] if d else None,
                        "low": d["low"] if d else None, "high": d["high"] if d else None,
                        "pairs": d["n"] if d else 0, "paper": paper, "paper_delta": paper_delta, "verdict": v,
                        "sd": d.get("sd") if d else None})
    # Rows given extra seeds (a second look): their interval at the two-look design's confidence
    extra, ref = extra_seed_rows(out, table_seeds)
    for r in out:
        if r["row"] in extra and r["pairs"] > ref:
            c = second_look_confidence(ref, r["pairs"])
            bs, rs, _ = _pairable(agg[base.name][r["metric"]], agg[r["row"]][r["metric"]], r["metric"])
            d = paired_delta(bs, rs, confidence=c)
            r.update(low=d["low"], high=d["high"], confidence=c, verdict=verdict(d, r["paper_delta"]))
    return out


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def _digits(metric: str) -> int:
    return {"train_images_per_s": 1, "params_M": 1, "train_seconds": 0, "FLOPs_G": 3}.get(metric, 2)


def fmt_paper(v: Optional[float], signed: bool = False) -> str:
    """The paper's numbers as the paper prints them (51.9, 226), deltas likewise (-4.8)."""
    if v is None:
        return "—"
    return f"{round(v, 2):+g}" if signed else f"{round(v, 2):g}"


def fmt(v: Optional[float], metric: str, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    d = _digits(metric)
    return f"{v:+.{d}f}" if signed else f"{v:.{d}f}"


def fmt_delta(r: Dict[str, Any], metric: str) -> str:
    """Δ [low, high] (n pairs); Δ (n=1) without an interval."""
    if r.get("delta") is None:
        return "—"
    if r.get("low") is None:
        return f"{fmt(r['delta'], metric, signed=True)} (n={r['pairs']})"
    level = f", {100 * r['confidence']:.1f}%" if r.get("confidence") else ""
    return (f"{fmt(r['delta'], metric, signed=True)} [{fmt(r['low'], metric, signed=True)}, "
            f"{fmt(r['high'], metric, signed=True)}] (n={r['pairs']}{level})")


def fmt_ours(n: int, mean, std, metric: str) -> str:
    if not n:
        return "—"
    if std is None:
        return f"{fmt(mean, metric)} (n={n})"
    return f"{fmt(mean, metric)} ± {fmt(std, metric)} (n={n})"


def _distinct(records, fn) -> List[Any]:
    out = []
    for r in records:
        v = fn(r)
        if v not in out:
            out.append(v)
    return out


def _source_ablation(run_dir: Optional[str]) -> str:
    """The ablation a run directory belongs to (``<runs root>/<ablation>/<scale>/<row>/<seed_hash>``)."""
    parts = Path(run_dir or "").parts
    if len(parts) < 4:
        return str(run_dir)
    # a calibration candidate's run (<ablation>/cpu-<N>it/...) is named with its scale
    return parts[-4] + (f"` at `{parts[-3]}" if parts[-3].startswith("cpu-") else "")


def _machines_lines(spec: AblationSpec, records: List[Dict[str, Any]]) -> List[str]:
    """A header line when a table's records come from more than one machine (CPU, GEMM backend, threads):
    how many ran on each, and which (row, seed) pairs were trained on different machines."""
    from ablations.records import machine_of

    latest: Dict[tuple, Dict[str, Any]] = {}
    for r in records:
        latest[(r.get("row"), r.get("seed"))] = r
    machines = _distinct(latest.values(), machine_of)
    if len(machines) < 2:
        return []
    counts = {m: sum(1 for r in latest.values() if machine_of(r) == m) for m in machines}
    across = sorted(((row, seed) for (row, seed), r in latest.items()
                     if row != spec.base_row and (spec.base_row, seed) in latest
                     and machine_of(latest[(spec.base_row, seed)]) != machine_of(r)), key=str)
    return [f"- **Machines:** " + "; ".join(f"{n} run(s) on {m}" for m, n in counts.items())
            + ". One config and seed computes the same function on each, but not the same bits (the kernels' "
              "summation order differs), and training amplifies the difference like another draw of seed noise: "
              "data order, augmentation and initialisation stay matched (ablations/README.md, \"Machines\"). "
            + (f"Pairs whose row and base row ran on different machines: "
               + ", ".join(f"{row} seed {seed}" for row, seed in across) + "." if across
               else "Every pair's row and base row ran on the same machine.")
            + " Timings (" + ", ".join(TIMING_METRICS) + ") pair only runs of one machine."]


def _header(spec: AblationSpec, scale: str, records: List[Dict[str, Any]], metrics: List[str],
            info: Optional[Dict[str, Any]] = None) -> List[str]:
    description = describe(scale)
    first = records[0] if records else {}
    data = _distinct(records, lambda r: f"train `{(r.get('data') or {}).get('train')}`, val "
                                        f"`{(r.get('data') or {}).get('val')}` ({(r.get('data') or {}).get('image_size')} px"
                                        f", eval on {(r.get('data') or {}).get('eval_limit') or 'all'} val images)")
    iters = _distinct(records, lambda r: r.get("max_iters"))
    batch = _distinct(records, lambda r: r.get("batch_size"))
    seeds = sorted(_distinct(records, lambda r: r.get("seed")), key=lambda x: (x is None, x))
    thr = _distinct(records, lambda r: tuple(sorted((r.get("thresholds") or {}).items())))
    dates = sorted(r.get("finished_at", "") for r in records if r.get("finished_at"))
    commits = _distinct(records, lambda r: r.get("git_commit"))
    devices = _distinct(records, lambda r: (r.get("environment") or {}).get("device"))
    mem = _distinct(records, lambda r: r.get("memory_kind"))
    info = info or {}
    fp = info.get("fingerprint")
    title = f"# {table_label(spec)[0].upper() + table_label(spec)[1:]}: {spec.title}"
    if info.get("stale"):
        title += " (STALE)"
    lines = [title, "",
             f"Ablation `{spec.name}`; base row: **{spec.base_row}**; primary metric: {spec.primary_metric}.", "",
             f"- **Scale:** `{scale}`" + (f": {description}" if description else ""),
             f"- **Data:** {'; '.join(data) if data else '—'}",
             f"- **Iterations:** {', '.join(map(str, iters))} (batch {', '.join(map(str, batch))}); "
             f"**seeds:** {', '.join(map(str, seeds))}",
             "- **Thresholds:** " + "; ".join(", ".join(f"{k} {v}" for k, v in t) for t in thr),
             f"- **Measured:** {dates[0][:10] if dates else '—'} to {dates[-1][:10] if dates else '—'}; rendered "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}; commit(s) {', '.join(str(c)[:12] for c in commits)}; "
             f"device(s): {', '.join(map(str, devices))}",
             f"- **Code:** fingerprint `{fp or 'unknown (records older than fingerprints)'}`"
             + (f" — **STALE**: the current code's fingerprint is `{info.get('current')}`, so these numbers may "
                f"not be what this checkout computes (rendered with --allow-stale or --fingerprint; `python -m "
                f"ablations run {spec.name}` retrains)" if info.get("stale") else " (the current code)")
             + (f"; {info['stale_records']} record(s) of other code versions left out" if info.get("stale_records")
                and not info.get("stale") else "")]
    if info.get("redefined_records") or info.get("other_scales"):
        kept = []
        if info.get("redefined_records"):
            kept.append(f"{info['redefined_records']} `{scale}` record(s) of an earlier definition of their row (other "
                        f"overrides than the spec's now), left out")
        if info.get("other_scales"):
            kept.append("records of other scales or recipes, never mixed with these: "
                        + ", ".join(f"{n} `{sc}`" for sc, n in sorted(info["other_scales"].items())))
        lines.append("- **Also in runs.jsonl** (kept as provenance, not in this table): " + "; ".join(kept))
    lines += _machines_lines(spec, records)
    if "memory_GB" in metrics:
        if all(r.get("memory_probe") for r in records):
            probes = _distinct(records, lambda r: tuple(r["memory_probe"].get(k) for k in
                                                        ("size", "num_masks", "method", "amp")))
            desc = "; ".join(f"{s}x{s}, {n} synthetic target masks, {m}, autocast {a or 'off (fp32)'}"
                             for s, n, m, a in probes)
            lines.append(f"- **Memory:** ours = training memory per image: one training step (forward, loss, backward) "
                         f"of the row's model at batch 1 in a fresh process ({desc}); the paper's = training memory "
                         f"per image (GPU, 1024x1024 crops, AMP). Whole-run peaks stay in runs.jsonl.")
        else:
            lines.append(f"- **Memory:** ours = peak of the whole training run ({', '.join(map(str, mem))}; batch "
                         f"{', '.join(map(str, batch))}); the paper's = training memory per image (GPU)")
    if "FLOPs_G" in metrics:
        sizes = _distinct(records, lambda r: "x".join(map(str, (r.get("flops") or {}).get("size") or [])) or None)
        skipped = sorted({k for r in records for k in ((r.get("flops") or {}).get("skipped_ops") or {})
                          if k.split("::")[-1] not in _TRIVIAL_OPS})
        lines.append(f"- **FLOPs:** ours = fvcore, one image of {', '.join(str(x) for x in sizes if x) or '?'} px"
                     + (f" (ops fvcore does not count: {', '.join(skipped)})" if skipped else "")
                     + "; the paper's = fvcore averaged over COCO val images")
    row_tasks: Dict[str, str] = {}
    for r in records:
        row_tasks.setdefault(r.get("row"), (r.get("data") or {}).get("task") or "panoptic")
    kinds = sorted(set(row_tasks.values()))
    tasks = kinds[0] if len(kinds) == 1 else (None if kinds else "panoptic")
    if tasks is None:  # rows trained for different tasks (Table 7's task-specific models)
        lines.append("- **Honesty:** every number of ours comes from ONE model per row, trained for the row's task ("
                     + "; ".join(f"{row}: {t}" for row, t in row_tasks.items())
                     + "); a panoptic model is scored as panoptic (PQ), instance (AP) and semantic (mIoU), an "
                     f"instance or semantic model only on its own task, at {scale} scale"
                     + (" on synthetic data" if is_proxy(scale) else "")
                     + f"; the paper's columns come from task-specific models at full scale ({PAPER_SOURCES})."
                     + (" Compare directions (signs of Δ), not magnitudes." if is_proxy(scale) else ""))
    elif is_proxy(scale):
        lines.append(f"- **Honesty:** every number of ours comes from ONE {tasks}-trained model per "
                     f"row, scored as panoptic (PQ), instance (AP) and semantic (mIoU), at {scale} scale on "
                     f"synthetic data; the paper's columns come from task-specific models at full scale "
                     f"({PAPER_SOURCES}). Compare directions (signs of Δ), not magnitudes.")
    else:
        lines.append(f"- **Honesty:** ours: one {tasks}-trained model per row scored on every task; "
                     f"paper: {PAPER_SOURCES}.")
    if spec.proxy_note and is_proxy(scale):
        lines.append(f"- **Proxy:** {' '.join(spec.proxy_note.split())}")
    proxied = [r for r in spec.rows if r.proxy_overrides]
    if proxied and is_proxy(scale):
        groups: Dict[str, List[str]] = {}
        for r in proxied:
            groups.setdefault(", ".join(f"`{k}` = {v}" for k, v in r.proxy_overrides.items()), []).append(r.name)
        lines.append("- **Proxy overrides** (on top of the scale's recipe, this scale only): "
                     + "; ".join(f"{what} in {', '.join(rows)}" for what, rows in groups.items()))
    carried = [r for r in records if r.get("carried_from")]
    if carried:
        by_row: Dict[str, Dict[str, Any]] = {}
        for r in carried:
            c = r["carried_from"]
            e = by_row.setdefault(r.get("row"), {"fp": c.get("code_fingerprint"), "seeds": [],
                                                 "verified": c.get("verified_seeds") or []})
            e["seeds"].append(r.get("seed"))
        lines.append(f"- **Carried records:** {len(carried)} of the {len(records)} records were trained by an earlier "
                     f"code version and carried to this one (`python -m ablations carry`), because the runs this "
                     f"code retrained computed the same (final evaluation and every logged loss and evaluation "
                     f"equal): " + "; ".join(
                         f"{row}: seed(s) {', '.join(map(str, sorted(e['seeds'])))} from `{e['fp']}`, verified on "
                         f"seed(s) {', '.join(map(str, e['verified']))}" for row, e in sorted(by_row.items()))
                     + ". Their FLOPs are counted by this code; a fresh clone retrains every run, carried or not.")
    shared = sorted({(r.get("row"), _source_ablation(r.get("shared_from"))) for r in records if r.get("shared_from")})
    if shared:
        lines.append("- **Shared runs:** " + "; ".join(f"{row} = the identical run of `{src}`" for row, src in shared)
                     + " (same config hash, seed, code fingerprint and val images: recorded from it, not retrained)")
    extra = info.get("extra_seeds") or {}
    if extra:
        n0 = info.get("table_seeds")
        lines.append("- **Extra seeds:** " + "; ".join(f"`{row}` is paired on {n} seeds" for row, n in extra.items())
                     + f", more than the {n0} of the other rows: these seeds were run for this row and its base "
                     f"row only (`python -m ablations run {spec.name} --seeds N --row ROW --row \"{spec.base_row}\"`); every "
                     f"other row is paired on the seeds it shares with the base row. Seeds added because a row's "
                     f"first {n0} were inconclusive make a second look at the data: at 95% both times, with no "
                     f"true effect, one of the two intervals would exclude 0 in "
                     + ", ".join(f"{100 * second_look_error(n0, n):.1f}% of tables at {n} seeds"
                                 for n in sorted(set(extra.values())))
                     + f", not {100 * (1 - CONFIDENCE):.0f}%. So such a row's interval is shown at the confidence "
                     f"of a two-look design that errs in {100 * (1 - CONFIDENCE):.0f}% ("
                     + ", ".join(f"{100 * second_look_confidence(n0, n):.1f}% at {n} seeds"
                                 for n in sorted(set(extra.values())))
                     + f"; `ablations.stats.second_look_confidence({n0}, n)`, a simulation), and its verdict "
                     f"comes from that interval. ablations/README.md gives the reason for each addition.")
    if len(seeds) < 2:
        lines.append("- With one seed there is no interval: every verdict is `inconclusive`.")
    lines += ["", f"Δ = mean over seeds of (row − base row) for the seeds both ran, [95% interval] (Student t over "
              f"the n pairs; ablations/stats.py). Verdict: `agrees` / `contradicts` = the interval excludes 0 with "
              f"the paper's / the opposite sign; `inconclusive` = it contains 0 (or n < 2); `no paper value` = the "
              f"paper gives no number for the row or its base.", ""]
    return lines


def render_markdown(spec: AblationSpec, scale: str, records: List[Dict[str, Any]], metrics: List[str],
                    rows: List[Dict[str, Any]], agg, info: Optional[Dict[str, Any]] = None) -> str:
    lines = _header(spec, scale, records, metrics, info)
    if spec.layout == "metrics":
        trained = [r for r in spec.rows if r.run]
        head = ["metric"] + [f"ours: {r.name}" for r in trained] + ["paper"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m in metrics:
            cells = [m] + [fmt_ours(agg[r.name][m]["n"], agg[r.name][m]["mean"], agg[r.name][m]["std"], m)
                           for r in trained]
            cells.append(fmt_paper(spec.base.paper.get(m)) if spec.base.paper.get(m) is not None else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    else:
        head = ["row"]
        for m in metrics:
            head += [f"{m} ours", "Δ [95%] (n)", f"{m} paper", "Δ paper", "verdict"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        by = {(r["row"], r["metric"]): r for r in rows}
        for row in spec.rows:
            name = f"**{row.name}**" if row.name == spec.base_row else row.name
            if not row.run:
                name += " (paper only, not run)"
            cells = [name]
            for m in metrics:
                r = by[(row.name, m)]
                cells += [fmt_ours(r["n"], r["mean"], r["std"], m), fmt_delta(r, m),
                          fmt_paper(r["paper"]), fmt_paper(r["paper_delta"], signed=True), r["verdict"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines += _inconclusive_lines(rows)
        lines += _extra_seed_lines(spec, rows, agg)
        lines += _over_training_lines(spec, records, rows)
    lines.append("")
    return "\n".join(lines)


FINDING_VERDICTS = ("agrees", "contradicts", "inconclusive")


def is_finding(r: Dict[str, Any]) -> bool:
    """Whether a (row, metric) of :func:`table_rows` is a paper finding: PQ / AP / mIoU with |paper Δ| >=
    the scoreboard's threshold."""
    pd = r.get("paper_delta")
    return r["metric"] in SCOREBOARD_METRICS and pd is not None and abs(pd) >= SCOREBOARD_MIN_PAPER_DELTA


def findings_over_training(spec: AblationSpec, records: List[Dict[str, Any]], rows: List[Dict[str, Any]]
                           ) -> Tuple[List[int], List[Dict[str, Any]]]:
    """(evaluation iterations, one dict per finding) for the table's findings (PQ / AP / mIoU, |paper Δ|
    >= the scoreboard's 0.5, with a verdict): the finding's paired Δ (:func:`ablations.stats.paired_delta`)
    at every evaluation iteration, over the seeds that evaluated the row and its base row there.  Each
    dict: row, metric, paper_delta, by_iter {iteration: paired_delta's dict}.  Whether an effect is stable
    over the schedule or appears only at its end is part of the evidence."""
    def by_seed(row: str, metric: str) -> Dict[int, Dict[Any, float]]:
        out: Dict[int, Dict[Any, float]] = {}
        for rec in records:
            if rec.get("row") == row:
                for it, v in _series(rec, metric):
                    out.setdefault(it, {})[rec.get("seed")] = v
        return out

    findings, iters = [], set()
    for r in rows:
        if r["is_base"] or r["verdict"] not in FINDING_VERDICTS or not is_finding(r):
            continue
        pd = r["paper_delta"]
        base, row = by_seed(spec.base_row, r["metric"]), by_seed(r["row"], r["metric"])
        by_iter = {}
        for it in sorted(set(base) & set(row)):
            d = paired_delta(base[it], row[it])
            if d is not None:
                by_iter[it] = d
        if by_iter:
            iters.update(by_iter)
            findings.append({"row": r["row"], "metric": r["metric"], "paper_delta": pd, "by_iter": by_iter})
    return sorted(iters), findings


def _over_training_lines(spec: AblationSpec, records: List[Dict[str, Any]], rows: List[Dict[str, Any]]
                         ) -> List[str]:
    iters, findings = findings_over_training(spec, records, rows)
    if len(iters) < 2:
        return []

    def cell(d: Optional[Dict[str, Any]]) -> str:
        if d is None:
            return "—"
        if d["low"] is None:
            return f"{d['delta']:+.1f} (n={d['n']})"
        txt = f"{d['delta']:+.1f} ± {(d['high'] - d['low']) / 2:.1f}"
        return f"**{txt}**" if d["low"] > 0 or d["high"] < 0 else txt

    out = ["", "**Findings over training**: each finding's paired Δ (row − base row) at every evaluation, mean ± "
               "the half-width of its 95% interval over the seeds both rows evaluated there; **bold**: the "
               "interval excludes 0. Whether an effect holds through the schedule or appears only at its end. The "
               "verdicts use the last evaluation alone: each interval here misses by chance 5% of the time, so "
               "one bold cell among a finding's evaluations is weak evidence on its own.", "",
           "| row | metric | paper Δ | " + " | ".join(f"it {i}" for i in iters) + " |",
           "|" + "---|" * (3 + len(iters))]
    for f in findings:
        out.append(f"| {f['row']} | {f['metric']} | {f['paper_delta']:+.1f} | "
                   + " | ".join(cell(f["by_iter"].get(i)) for i in iters) + " |")
    return out


def _extra_seed_lines(spec: AblationSpec, rows: List[Dict[str, Any]], agg) -> List[str]:
    """For each finding of a row given extra seeds: its per-seed differences and Wilcoxon's signed-rank
    p (:func:`ablations.stats.signed_rank_p`) beside the two-look level, so a verdict resting on one or
    two far seeds shows as such."""
    out = []
    for r in rows:
        if not r.get("confidence") or not is_finding(r) or r.get("low") is None:
            continue
        bs, rs, _ = _pairable(agg[spec.base_row][r["metric"]], agg[r["row"]][r["metric"]], r["metric"])
        seeds = sorted(set(bs) & set(rs))
        d = [rs[s] - bs[s] for s in seeds]
        p = signed_rank_p(d)
        alpha = 1 - r["confidence"]
        neg = sum(x < 0 for x in d)
        out.append(f"- `{r['row']}` {r['metric']} (n={len(d)}): "
                   + ", ".join(f"seed {s} {x:+.2f}" for s, x in zip(seeds, d))
                   + f"; {neg} of {len(d)} below 0, median {statistics.median(d):+.2f}; signed-rank p "
                   + (f"{p:.3f} ({'below' if p < alpha else 'not below'} the two-look level {alpha:.3f})"
                      if p is not None else "—") + ".")
    if not out:
        return []
    return ["", "**Rows with extra seeds, seed by seed** (row − base row per seed; Wilcoxon's signed-rank "
                "test, two-sided, `ablations.stats.signed_rank_p`: a check of the t interval that does not "
                "assume normal differences; the verdict is the interval's):", ""] + out


def _inconclusive_lines(rows: List[Dict[str, Any]]) -> List[str]:
    """For each inconclusive finding (PQ / AP / mIoU, |paper Δ| >= the scoreboard's 0.5): its interval's
    half-width, and about how many paired seeds would bring the half-width below the paper's |Δ| and
    below our own |Δ| at the measured spread (:func:`ablations.stats.seeds_for_half_width`)."""
    def seeds(target: float, sd: Optional[float]) -> str:
        n = seeds_for_half_width(sd, target)
        return "—" if n is None else "more than 200" if n > 200 else f"about {n}"

    out = []
    for r in rows:
        if r["verdict"] != "inconclusive" or not is_finding(r) or r.get("low") is None:
            continue
        pd = r["paper_delta"]
        half = (r["high"] - r["low"]) / 2
        out.append(f"- `{r['row']}` {r['metric']}: Δ {r['delta']:+.2f} ± {half:.2f} (n={r['pairs']}), paper "
                   f"{pd:+.1f}; sd of the per-seed differences {r['sd']:.2f}. Seeds for a half-width below the "
                   f"paper's |Δ|: {seeds(abs(pd), r['sd'])}; below ours: {seeds(abs(r['delta']), r['sd'])}.")
    if not out:
        return []
    return ["", "**Inconclusive findings** (|paper Δ| ≥ 0.5): each interval's half-width, and the paired "
                "seeds that would make it smaller than the paper's |Δ| and than ours, at the spread measured "
                "here (`ablations.stats.seeds_for_half_width`, 95%). These are planning figures: the spread is "
                "itself estimated from these seeds, and a smaller interval does not promise agreement.", ""] + out


def render_csv(spec: AblationSpec, scale: str, rows: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["row", "metric", "is_base", "run", "n", "mean", "std", "delta", "low", "high", "confidence", "pairs",
            "paper", "paper_delta", "verdict"]
    w.writerow(["ablation", "table", "scale"] + cols)
    for r in rows:
        r = {**r, "confidence": r.get("confidence") or (CONFIDENCE if r.get("low") is not None else None)}
        w.writerow([spec.name, spec.table, scale] + ["" if r[c] is None else r[c] for c in cols])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(record: Dict[str, Any], metric: Optional[str]) -> List[Tuple[int, float]]:
    out = []
    for m in record.get("metrics_over_training") or []:
        it = m.get("iter")
        if it is None:
            continue
        if metric is None:
            if "loss" in m and m["loss"] is not None and "eval" not in m:
                out.append((int(it), float(m["loss"])))
        elif "eval" in m:
            v = eval_metric(m["eval"], metric)
            if v is not None:
                out.append((int(it), v))
    return sorted(dict(out).items())


def _band(series_list: List[List[Tuple[int, float]]]):
    by_iter: Dict[int, List[float]] = {}
    for s in series_list:
        for it, v in s:
            by_iter.setdefault(it, []).append(v)
    """Per iteration: mean over seeds and the half-width of its 95% interval (Student t; 0 for n = 1)."""
    from ablations.stats import t_quantile

    its = sorted(by_iter)
    mean = [statistics.fmean(by_iter[i]) for i in its]
    half = [t_quantile(len(by_iter[i]) - 1) * statistics.stdev(by_iter[i]) / math.sqrt(len(by_iter[i]))
            if len(by_iter[i]) > 1 else 0.0 for i in its]
    return its, mean, half


def plot_convergence(spec: AblationSpec, records: List[Dict[str, Any]], path: Path) -> str:
    """Primary metric vs iteration per row (mean line + 95% interval band over seeds) beside the training loss,
    plus a panel for each task-specific row's own metric (Table 7: AP, mIoU).  Falls back to PQ, then to
    the loss alone, when the primary metric has fewer than 2 eval points.  Returns the metrics plotted."""
    plt = _plt()
    rows = [r for r in spec.rows if r.run]
    recs = {r.name: [x for x in records if x.get("row") == r.name] for r in rows}
    metric, extra = None, []
    for cand in (spec.primary_metric, "PQ"):
        if any(len(_series(x, cand)) >= 2 for rs in recs.values() for x in rs):
            metric = cand
            break
    for row in rows:  # Table 7: a task-specific row's own metric (AP, mIoU) beside the primary one
        task = row.overrides.get("data.task")
        own = next((m for m in spec.metrics if EVAL_METRICS.get(m, ("",))[0] == task), None) if task else None
        if (own and metric and own != metric and own not in extra
                and any(len(_series(x, own)) >= 2 for x in recs[row.name])):
            extra.append(own)
    panels = ([metric] if metric else []) + extra + [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, m in zip(axes[0], panels):
        for row in rows:
            series = [_series(x, m) for x in recs[row.name]]
            series = [s for s in series if s]
            if not series:
                continue
            its, mean, std = _band(series)
            style = "-" if row.name == spec.base_row else "--"
            (line,) = ax.plot(its, mean, style, marker="o" if m else None, ms=3,
                              label=f"{row.name} (n={len(series)})")
            ax.fill_between(its, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel(m or "training loss (total, weighted)")
        ax.set_title(f"{m} on val vs iteration" if m else "training loss")
        ax.grid(alpha=0.3)
        if m is None:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{table_label(spec)}: {spec.title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ", ".join([metric] + extra) if metric else "loss"


def plot_memory(spec: AblationSpec, agg, path: Path) -> None:
    """Bar chart of peak training memory and throughput per row (mean ± std), paper memory in the labels."""
    plt = _plt()
    rows = [r for r in spec.rows if r.run]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, m, lab in ((axes[0], "memory_GB", "peak training memory (GB)"),
                       (axes[1], "train_images_per_s", "training throughput (images/s)")):
        means = [agg[r.name].get(m, {}).get("mean") or 0.0 for r in rows]
        stds = [agg[r.name].get(m, {}).get("std") or 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=3,
               color=["tab:blue" if r.name == spec.base_row else "tab:gray" for r in rows])
        labels = [r.name + (f"\n(paper {r.paper['memory_GB']:g} GB/img)" if m == "memory_GB" and "memory_GB" in r.paper
                            else "") for r in rows]
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel(lab)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{table_label(spec)}: memory and throughput (ours)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_proposals(spec: AblationSpec, metrics: List[str], agg, path: Path) -> None:
    import fnmatch

    plt = _plt()
    layers = [m for m in metrics if fnmatch.fnmatch(m, PROPOSAL_PATTERN)]
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r in spec.rows if r.run]
    width = 0.8 / max(1, len(rows))
    for k, r in enumerate(rows):
        means = [agg[r.name][m]["mean"] or 0.0 for m in layers]
        stds = [agg[r.name][m]["std"] or 0.0 for m in layers]
        ax.bar([i + k * width for i in range(len(layers))], means, width, yerr=stds, capsize=2, label=r.name)
    ax.set_xticks(range(len(layers)), [m.rsplit("layer", 1)[-1] for m in layers])
    ax.set_xlabel("prediction (0 = query features alone, L = after decoder layer L)")
    ax.set_ylabel("AR@100 (class-agnostic)")
    ax.set_title(f"{table_label(spec)}: proposals per decoder layer (ours)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
def render_ablation(spec: AblationSpec | str, out: Path | str = "reports", scale: Optional[str] = None,
                    allow_stale: bool = False, fingerprint: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Write table.md / table.csv / plots for one ablation from its runs.jsonl: the records of one code
    fingerprint (:func:`select_records`).  None if there are none to render; when all of the scale's
    records are stale (and not ``allow_stale``), table.md says so instead of showing them."""
    if isinstance(spec, str):
        spec = load_spec(spec)
    out = Path(out)
    scale, records, info = select_records(read_jsonl(runs_path(out, spec.name)), scale, fingerprint, allow_stale,
                                          spec=spec)
    d = out / spec.name
    if not records:
        if info["redefined_records"] and not info["stale"]:
            atomic_write_text(d / "table.md", "\n".join([
                f"# {table_label(spec)[0].upper() + table_label(spec)[1:]}: {spec.title} (not run as defined now)", "",
                f"Ablation `{spec.name}`: the {info['redefined_records']} `{scale}` record(s) of the current code in "
                f"runs.jsonl were trained with other overrides than their rows' in {spec.path or 'the spec'}, so they "
                f"are not shown. `python -m ablations run {spec.name}` trains the rows as defined now.", ""]))
            return {"scale": scale, "records": 0, "stale": False, "rows": [], "table": str(d / "table.md"),
                    "fingerprint": info["fingerprint"]}
        if info["stale_records"]:
            atomic_write_text(d / "table.md", "\n".join([
                f"# {table_label(spec)[0].upper() + table_label(spec)[1:]}: {spec.title} (not run with this code)", "",
                f"Ablation `{spec.name}`: the {info['stale_records']} `{scale}` record(s) in runs.jsonl were computed "
                f"by other code versions than the current one (fingerprint `{info['current']}`), so they are not "
                f"shown. `python -m ablations run {spec.name}` retrains them; `python -m ablations report "
                f"{spec.name} --allow-stale` renders the old records, marked stale.", ""]))
            return {"scale": scale, "records": 0, "stale": True, "rows": [], "table": str(d / "table.md"),
                    "fingerprint": None}
        return None
    metrics, agg = aggregate(spec, records)
    n0 = scale_seeds(scale)
    rows = table_rows(spec, metrics, agg, n0)
    extra, ref = extra_seed_rows(rows, n0)
    info = {**info, "table_seeds": ref, "extra_seeds": extra}
    md = render_markdown(spec, scale, records, metrics, rows, agg, info)
    files = {"table": d / "table.md", "csv": d / "table.csv", "convergence": d / "convergence.png"}
    plotted = plot_convergence(spec, records, files["convergence"])
    md += f"\n![convergence](convergence.png)  \n_{'training loss' if plotted == 'loss' else plotted} vs iteration " \
          f"(mean over seeds, band = 95% interval of the mean, Student t)._\n"
    if "memory" in spec.plots:
        files["memory"] = d / "memory.png"
        plot_memory(spec, agg, files["memory"])
        md += "\n![memory and throughput](memory.png)\n"
    if "proposals" in spec.plots:
        files["proposals"] = d / "proposals.png"
        plot_proposals(spec, metrics, agg, files["proposals"])
        md += "\n![proposals](proposals.png)\n"
    atomic_write_text(files["table"], md)
    atomic_write_text(files["csv"], render_csv(spec, scale, rows))
    return {"scale": scale, "records": len(records), "metrics": metrics, "rows": rows, "stale": info["stale"],
            "fingerprint": info["fingerprint"], **{k: str(v) for k, v in files.items()}}


SCOREBOARD_MIN_PAPER_DELTA = 0.5
SCOREBOARD_METRICS = ("PQ", "AP", "mIoU")
SCOREBOARD_BEGIN = "<!-- scoreboard:begin (generated by `python -m ablations report`; do not edit) -->"
SCOREBOARD_END = "<!-- scoreboard:end -->"


def scoreboard_cells(spec: AblationSpec, out: Path | str = "reports", fingerprint: Optional[str] = None
                     ) -> List[Dict[str, Any]]:
    """Every (paper row, metric in PQ/AP/mIoU) of ``spec`` with |paper Δ| >= 0.5 and its verdict at
    the highest scale recorded with the current code (``not run`` when there is none)."""
    scale, records, info = select_records(read_jsonl(runs_path(out, spec.name)), None, fingerprint, spec=spec)
    carried = sorted({r["carried_from"].get("code_fingerprint") for r in records if r.get("carried_from")})
    n_carried = sum(1 for r in records if r.get("carried_from"))
    rows = []
    if records:
        metrics, agg = aggregate(spec, records)
        rows = table_rows(spec, [m for m in SCOREBOARD_METRICS if m in metrics], agg, scale_seeds(scale))
    by = {(r["row"], r["metric"]): r for r in rows}
    cells = []
    base = spec.base
    for row in spec.rows:
        if row.name == base.name:
            continue
        for m in SCOREBOARD_METRICS:
            p, pb = row.paper.get(m), base.paper.get(m)
            if p is None or pb is None or abs(p - pb) < SCOREBOARD_MIN_PAPER_DELTA:
                continue
            r = by.get((row.name, m))
            v = r["verdict"] if r and r["pairs"] and not r["verdict"].startswith("incomplete") else "not run"
            cells.append({"table": spec.table, "ablation": spec.name, "row": row.name, "metric": m,
                          "paper_delta": p - pb, "verdict": v, "scale": scale if v != "not run" else None,
                          "delta": r["delta"] if r else None, "low": r["low"] if r else None,
                          "high": r["high"] if r else None, "pairs": r["pairs"] if r else 0,
                          "confidence": r.get("confidence") if r else None,
                          "carried": n_carried, "carried_from": carried})
    return cells


def render_scoreboard(out: Path | str = "reports", fingerprint: Optional[str] = None) -> str:
    """The scoreboard (markdown): per table and in total, how many of the paper's findings (row x
    metric with |paper Δ| >= 0.5 in PQ, AP or mIoU) agree, contradict, are inconclusive or were not
    run with the current code (or with the code version ``fingerprint``, marked STALE when that is
    not the checkout's), from the records alone."""
    current = current_fingerprint()
    fp = fingerprint or current
    kinds = ("agrees", "contradicts", "inconclusive", "not run")
    stale = "" if fp == current else (
        f" — **STALE: these are the records of code version `{fp}`, not of this checkout (`{current}`)**; "
        f"`python -m ablations report` without --fingerprint counts the current code's")
    lines = [f"**Scoreboard** (generated by `python -m ablations report{'' if fp == current else ' --fingerprint ' + fp}` "
             f"from reports/*/runs.jsonl; code fingerprint `{fp}`{stale}): each paper finding = a row and metric (PQ, AP, mIoU) whose paper Δ is at least "
             f"{SCOREBOARD_MIN_PAPER_DELTA:g}; verdict from our paired 95% interval at the scale named "
             f"(ablations/stats.py; a row given extra seeds after its first look: at the two-look design's "
             f"confidence, named beside its n). `not run` = no records of this code version, or a row paired on fewer seeds "
             f"than its base row ran, up to the scale's number (a table still being run).", "",
             "| table | ablation | scale (seeds) | " + " | ".join(kinds) + " | findings |",
             "|---|---|---|" + "---|" * (len(kinds) + 1)]
    total = {k: 0 for k in kinds}
    unrun: List[AblationSpec] = []  # tables with no finding of the code version counted
    other_scales: set = set()
    all_cells: List[Dict[str, Any]] = []
    for name in sorted(list_specs(), key=_paper_order):
        spec = load_spec(name)
        cells = scoreboard_cells(spec, out, fp)
        all_cells += cells
        if not cells:
            continue
        if all(c["verdict"] == "not run" for c in cells):
            unrun.append(spec)
        counts = {k: sum(c["verdict"] == k for c in cells) for k in kinds}
        for k in kinds:
            total[k] += counts[k]
        scales = sorted({f"{c['scale']} (n={c['pairs']}{_level(c)})" for c in cells if c["scale"]})
        if cells[0].get("carried"):
            scales.append(f"{cells[0]['carried']} records carried from "
                          + ", ".join(f"`{fp}`" for fp in cells[0]["carried_from"]))
        other_scales.update(c["scale"] for c in cells if c["scale"] and c["scale"] not in ("cpu", "paper"))
        lines.append(f"| {spec.table} | [{name}](reports/{name}/table.md) | {', '.join(scales) or '—'} | "
                     + " | ".join(str(counts[k]) for k in kinds) + f" | {len(cells)} |")
    lines.append("| **total** | | | " + " | ".join(f"**{total[k]}**" for k in kinds) + f" | **{sum(total.values())}** |")
    lines += ["", _goal_line(all_cells)]
    if fingerprint is None:  # the default board; a named version renders only its own records
        lines += _earlier_versions_board(out, current, kinds, unrun)
    if other_scales:
        lines.append("")
        lines += [f"- `{sc}`" + (f": {describe(sc)}." if describe(sc) else ".") for sc in sorted(other_scales)]
    return "\n".join(lines) + "\n"


GOAL_MIN_PAPER_DELTA_PQ = 1.0


def _level(cell: Dict[str, Any]) -> str:
    """", 97.2%" for a cell read at another confidence than the default 95% (a row with extra seeds)."""
    c = cell.get("confidence")
    return f", {100 * c:.1f}%" if c and abs(c - CONFIDENCE) > 1e-9 else ""


def _goal_line(cells: List[Dict[str, Any]]) -> str:
    """The suite's bar for a table of evidence (issue #17): every PQ finding with |paper Δ| >= 1.0
    agrees at 95% and no finding contradicts. Where it stands, naming each finding that misses it with
    its Δ [95% interval] (n pairs)."""
    def name(c: Dict[str, Any]) -> str:
        got = (f" {c['delta']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] (n={c['pairs']}{_level(c)})"
               if c.get("delta") is not None and c.get("low") is not None else "")
        return f"{c['table']} `{c['row']}` {c['metric']}{got}"

    big = [c for c in cells if c["metric"] == "PQ" and abs(c["paper_delta"]) >= GOAL_MIN_PAPER_DELTA_PQ]
    agree = [c for c in big if c["verdict"] == "agrees"]
    short = [c for c in big if c["verdict"] == "inconclusive"]
    unrun = [c for c in big if c["verdict"] == "not run"]
    contra = [c for c in cells if c["verdict"] == "contradicts"]
    met = len(agree) == len(big) and not contra
    out = [f"**Goal** (every PQ finding with |paper Δ| ≥ {GOAL_MIN_PAPER_DELTA_PQ:.1f} agrees at 95%, no finding "
           f"contradicts): {'met' if met else 'not met'}. {len(agree)} of the {len(big)} such PQ findings agree."]
    if short:
        out.append("Inconclusive: " + "; ".join(name(c) for c in short) + ".")
    if unrun:
        out.append("Not run: " + "; ".join(f"{c['table']} `{c['row']}`" for c in unrun) + ".")
    out.append("Contradicting (any metric): " + ("; ".join(name(c) for c in contra) if contra else "none") + ".")
    return " ".join(out)


def _earlier_versions_board(out: Path | str, current: str, kinds: Tuple[str, ...],
                            unrun: List[AblationSpec]) -> List[str]:
    """While tables are retrained at a new code version: for every table of ``unrun`` (no finding of
    the current code yet), the counts of its most recent earlier code version, one version per row,
    kept out of the total above and marked STALE ([] when there is none)."""
    lines: List[str] = []
    for spec in unrun:
        name = spec.name
        # the most recent earlier version, even when the current code has records (shared runs) already
        earlier = [record_fingerprint(r) for r in read_jsonl(runs_path(out, name))]
        earlier = [f for f in earlier if f and f != current]
        if not earlier:
            continue  # nothing earlier, or only records older than fingerprints
        # the most recent earlier version that has findings (an older recipe's records may come later)
        for fp_old in dict.fromkeys(reversed(earlier)):
            cells = scoreboard_cells(spec, out, fp_old)
            if any(c["verdict"] != "not run" for c in cells):
                break
        else:
            continue
        counts = {k: sum(c["verdict"] == k for c in cells) for k in kinds}
        scales = sorted({f"{c['scale']} (n={c['pairs']}{_level(c)})" for c in cells if c["scale"]})
        lines.append(f"| {spec.table} | [{name}](reports/{name}/table.md) | `{fp_old}` | "
                     f"{', '.join(scales) or '—'} | " + " | ".join(str(counts[k]) for k in kinds) + f" | {len(cells)} |")
    if not lines:
        return []
    return ["", f"**Not yet retrained at this code (`{current}`)**: these tables' most recent records are of an "
                "earlier code version, named per row. **STALE**: kept out of the total above, and not what this "
                "checkout may compute; `python -m ablations report --fingerprint FP` renders them, "
                "`python -m ablations run NAME` retrains them.", "",
            "| table | ablation | code version | scale (seeds) | " + " | ".join(kinds) + " | findings |",
            "|---|---|---|---|" + "---|" * (len(kinds) + 1)] + lines


def _splice(text: str, begin: str, end: str, inner: str) -> Optional[str]:
    if begin not in text or end not in text:
        return None
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n\n" + inner + "\n" + end + tail


def _paper_order(name: str) -> Tuple[int, int, str]:
    """Tables in the paper's order (4a .. 4e, 5, 7, 11a, 11b), figures after them."""
    import re

    t = load_spec(name).table.lower()
    m = re.fullmatch(r"(fig)?\s*(\d+)([a-z]?)", t)
    return (1 if m and m.group(1) else 0, int(m.group(2)) if m else 999, m.group(3) if m else t)


def render_readme(out: Path | str = "reports", fingerprint: Optional[str] = None) -> Path:
    """``reports/README-tables.md``: every current table (in paper order) with the scale it was measured at."""
    out = Path(out)
    parts = ["# Ablation tables", "",
             "Generated by `python -m ablations report` from `reports/<ablation>/runs.jsonl`; do not edit by hand. "
             "Each table states the scale, data, iterations and seeds it was measured at; the paper's numbers are "
             "shown beside ours, never in place of them.", ""]
    board = render_scoreboard(out, fingerprint)
    parts += [board.replace("](reports/", "]("), ""]
    found = 0
    for name in sorted(list_specs(), key=_paper_order):
        p = out / name / "table.md"
        if not p.exists():
            continue
        found += 1
        body = p.read_text()
        body = body.replace("](convergence.png)", f"]({name}/convergence.png)")
        body = body.replace("](memory.png)", f"]({name}/memory.png)").replace("](proposals.png)", f"]({name}/proposals.png)")
        parts.append("#" + body.strip())  # demote the table's heading one level
        parts.append("")
    if not found:
        parts.append("_No ablation has been run yet: `nox -s ablation_masked_attention`._")
    path = out / README_TABLES
    atomic_write_text(path, "\n".join(parts) + "\n")
    splice_into_readme(out, fingerprint=fingerprint)
    return path


README_BEGIN = "<!-- ablation-tables:begin (generated by `python -m ablations report`; do not edit) -->"
README_END = "<!-- ablation-tables:end -->"


def splice_into_readme(out: Path | str = "reports", readme: Path | str | None = None,
                       fingerprint: Optional[str] = None) -> Optional[Path]:
    """Copy every current table (generated, never typed by hand) into the project README between
    the ``ablation-tables`` markers, with image links relative to the README.  No-op without markers."""
    out = Path(out)
    readme = Path(readme) if readme is not None else out.resolve().parent / "README.md"
    if not readme.exists():
        return None
    text = readme.read_text()
    rel_board = os.path.relpath(out.resolve(), readme.resolve().parent)
    board = _splice(text, SCOREBOARD_BEGIN, SCOREBOARD_END,
                    render_scoreboard(out, fingerprint).replace("](reports/", f"]({rel_board}/"))
    if board is not None:
        text = board
        atomic_write_text(readme, text)
    if README_BEGIN not in text or README_END not in text:
        return None
    rel = os.path.relpath(out.resolve(), readme.resolve().parent)
    blocks = []
    for name in sorted(list_specs(), key=_paper_order):
        p = out / name / "table.md"
        if not p.exists():
            continue
        body = p.read_text().strip()
        for img in ("convergence.png", "memory.png", "proposals.png"):
            body = body.replace(f"]({img})", f"]({rel}/{name}/{img})")
        blocks.append("### " + body.lstrip("# ").strip())
    inner = "\n\n".join(blocks) if blocks else "_No ablation has been run yet: `nox -s ablation_masked_attention`._"
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    atomic_write_text(readme, head + README_BEGIN + "\n\n" + inner + "\n\n" + README_END + tail)
    return readme
