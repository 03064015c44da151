"""Ablation records: one JSON line per finished run in ``reports/<ablation>/runs.jsonl``.

- Paths: :func:`runs_path` (the records file), :class:`RunPlan` (one (row, seed) at a scale and its run
  directory ``runs/ablations/<ablation>/<scale>/<row slug>/seed<k>_<config hash>_<code fingerprint>/``),
  :data:`RESULT_NAME`.  A run is identified by (row, seed, scale, config hash, code fingerprint): a
  change to the sources behind a result (m2f.provenance.code_fingerprint) makes a new run, never a
  resume of the old one.
- :func:`build_record`: the line a finished run appends (config and its hash, seed, code version,
  environment, metrics over training, final evaluation, FLOPs, memory, throughput).
- Metric extraction: :func:`eval_metric` (one named metric from an evaluation) and :func:`flat_metrics`
  (every reportable number of a record).

The runner writes records, the renderer reads them; both import this module and not each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ablations.scales import Scale, is_proxy
from ablations.spec import EVAL_METRICS, AblationSpec, Row
from m2f.checkpoint import read_jsonl
from m2f.config import Config, to_dict

RESULT_NAME = "ablation_result.json"


@dataclass
class RunPlan:
    ablation: str
    row: Row
    seed: int
    scale: str
    cfg: Config
    config_hash: str
    run_dir: Path
    fingerprint: Optional[str] = None  # m2f.provenance.code_fingerprint() when planned

    @property
    def key(self) -> tuple:
        return (self.row.name, self.seed, self.scale, self.config_hash, self.fingerprint)

    @property
    def label(self) -> str:
        return f"{self.row.name} / seed {self.seed}"


def runs_path(out: Path | str, ablation: str) -> Path:
    return Path(out) / ablation / "runs.jsonl"


def _num(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def eval_metric(ev: Dict[str, Any], name: str) -> Optional[float]:
    """One named metric from an evaluation dict ``{task: {key: value}}`` (None if absent)."""
    if not isinstance(ev, dict):
        return None
    v = None
    if name in EVAL_METRICS:
        task, key = EVAL_METRICS[name]
        v = _num((ev.get(task) or {}).get(key))
    elif name.startswith("AR@"):
        v = _num((ev.get("proposals") or {}).get(name))
    # Metrics are on the 0-100 scale; COCOeval marks "undefined" as -1 (-100 scaled), NaN elsewhere.
    return v if v is not None and v >= 0 else None


def flat_metrics(record: Dict[str, Any], memory_probe: bool = True) -> Dict[str, float]:
    """Every reportable number of a run record: eval metrics, FLOPs, memory, throughput.

    memory_GB: the record's ``memory_probe`` (training memory per image at the scale's probe size) when
    it has one and ``memory_probe`` is true, else the run's own peak.  A table whose records do not all
    carry a probe passes ``memory_probe=False``, so one column never mixes the two quantities."""
    out: Dict[str, float] = {}
    ev = record.get("eval") or {}
    for name in EVAL_METRICS:
        v = eval_metric(ev, name)
        if v is not None:
            out[name] = v
    for k in (ev.get("proposals") or {}):
        v = eval_metric(ev, k)
        if v is not None:
            out[k] = v
    flops = record.get("flops") or {}
    if _num(flops.get("gflops")) is not None:
        out["FLOPs_G"] = _num(flops["gflops"])
    probe = (record.get("memory_probe") or {}) if memory_probe else {}
    mem = probe.get("peak_bytes") or record.get("peak_memory_bytes") or record.get("peak_rss_bytes")
    if _num(mem) is not None:
        out["memory_GB"] = _num(mem) / 1e9  # per image (probe) when measured, else the run's peak
    for src, dst in (("train_images_per_s", "train_images_per_s"), ("train_seconds", "train_seconds")):
        if _num(record.get(src)) is not None:
            out[dst] = _num(record[src])
    if _num(record.get("params")) is not None:
        out["params_M"] = _num(record["params"]) / 1e6
    return out


def build_record(spec: AblationSpec, plan: RunPlan, scale: Scale, result: Dict[str, Any],
                 flops: Optional[Dict[str, Any]], git: Optional[str]) -> Dict[str, Any]:
    """The ONE line a finished run appends to runs.jsonl."""
    s = result.get("summary") or {}
    cfg = plan.cfg
    rec = {
        "ablation": spec.name, "table": spec.table, "row": plan.row.name,
        "overrides": plan.row.overrides_at(proxy=is_proxy(scale)),
        "scale": plan.scale, "seed": plan.seed, "config": to_dict(cfg), "config_hash": plan.config_hash,
        "git_commit": result.get("git_commit") or git, "code_fingerprint": result.get("code_fingerprint") or plan.fingerprint,
        "environment": result.get("environment"),
        "data": {"train": cfg.data.train, "val": cfg.data.val, "task": cfg.data.task,
                 "image_size": cfg.data.image_size, "eval_limit": scale.eval_limit},
        "iters": s.get("iter"), "max_iters": cfg.solver.max_iters, "batch_size": cfg.solver.batch_size,
        "thresholds": {"object_mask_threshold": cfg.inference.object_mask_threshold,
                       "overlap_threshold": cfg.inference.overlap_threshold,
                       "mask_threshold": cfg.decoder.mask_threshold},
        "metrics_over_training": read_jsonl(plan.run_dir / "metrics.jsonl"),
        "eval": s.get("eval") or {}, "final_loss": s.get("final_loss"),
        "peak_memory_bytes": s.get("peak_memory_bytes"), "peak_rss_bytes": result.get("peak_rss_bytes"),
        "memory_kind": ("cuda_max_allocated" if s.get("peak_memory_bytes") else
                        "process_peak_rss" if result.get("peak_rss_bytes") else None),
        "train_images_per_s": s.get("train_images_per_s"), "train_seconds": s.get("train_seconds"),
        "params": s.get("params"), "flops": flops, "wall_seconds": result.get("wall_seconds"),
        "kernels": s.get("kernels"),
        "run_dir": str(plan.run_dir), "shared_from": result.get("shared_from"),
        "shared_from_record": result.get("shared_from_record"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if result.get("carried_from"):  # shared from a carried record (ablations carry)
        rec["carried_from"] = result["carried_from"]
    rec["metrics"] = flat_metrics(rec)
    return rec


def compare_versions(records, fp_a: str, fp_b: str):
    """Runs recorded by two code versions for the same (row, seed, scale, config hash): whether version
    ``fp_b`` reproduced ``fp_a``.  Returns one dict per pair: row, seed, scale, ``eval_identical``
    (final evaluation equal, every number), ``curve_identical`` (every logged loss and intermediate
    evaluation equal) and ``max_abs_diff`` (the largest |difference| of the final PQ / AP / mIoU
    family of metrics, :data:`EVAL_METRICS`); timings and machine are not compared."""
    def key(r):
        return (r.get("row"), r.get("seed"), r.get("scale"), r.get("config_hash"))

    a = {key(r): r for r in records if r.get("code_fingerprint") == fp_a and not r.get("carried_from")}
    pairs = []
    for r in records:
        if r.get("code_fingerprint") != fp_b or key(r) not in a or r.get("carried_from"):
            continue  # a carried record is a copy of its source: comparing them proves nothing
        o = a[key(r)]
        ma, mb = ({m: eval_metric(x.get("eval") or {}, m) for m in EVAL_METRICS} for x in (o, r))
        diffs = [abs(ma[m] - mb[m]) for m in EVAL_METRICS if ma[m] is not None and mb[m] is not None]
        pairs.append({"row": r.get("row"), "seed": r.get("seed"), "scale": r.get("scale"),
                      "eval_identical": o.get("eval") == r.get("eval"),
                      "curve_identical": o.get("metrics_over_training") == r.get("metrics_over_training"),
                      "max_abs_diff": max(diffs) if diffs else None,
                      "same_computation": same_computation(o, r),
                      "devices": sorted({str((x.get("environment") or {}).get("device")) for x in (o, r)})})
    return pairs


def _curve_entries(record: Dict[str, Any]) -> Dict[tuple, Any]:
    """{(iteration, "loss" | "eval"): logged entry} of a record's metrics over training."""
    out = {}
    for e in record.get("metrics_over_training") or []:
        out[(e.get("iter"), "eval" if "eval" in e else "loss")] = e
    return out


def machine_of(record: Dict[str, Any]) -> str:
    """What a run's bits depend on besides its config, seed and code: the CPU (model and ISA class) or
    device, the GEMM backend ``auto`` resolved to, and the threads per run.  Runs that differ here
    compute the same function but not the same bits (ablations/README.md, "Machines")."""
    env = record.get("environment") or {}
    cpu = env.get("cpu") if isinstance(env.get("cpu"), dict) else None
    where = (f"{cpu.get('model')} ({cpu.get('isa_class')})" if cpu else str(env.get("device") or "unknown machine"))
    gemm = (record.get("kernels") or {}).get("gemm_backend")
    return where + (f", gemm {gemm}" if gemm else "") + (f", {env['threads']} thread(s)" if env.get("threads") else "")


def same_computation(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[str]:
    """None when two records of one (row, seed, config) computed the same: final evaluation equal in
    every number, and every loss and evaluation logged by both at the same iteration equal, over at
    least 90% of the shorter curve (a run resumed between sessions logs an extra line, see
    docs/pending); else the reason they differ."""
    if a.get("config_hash") != b.get("config_hash"):
        return "different configs"
    if not a.get("eval") or a.get("eval") != b.get("eval"):
        return "final evaluation differs" + _machines_differ(a, b)
    ca, cb = _curve_entries(a), _curve_entries(b)
    common = set(ca) & set(cb)
    if len(common) < 0.9 * min(len(ca), len(cb)) or not common:
        return f"too few logged iterations in common ({len(common)} of {min(len(ca), len(cb))})"
    bad = sorted((k for k in common if ca[k] != cb[k]), key=str)
    if bad:
        return f"logged values differ at iteration {bad[0][0]} ({bad[0][1]})" + _machines_differ(a, b)
    return None


def _machines_differ(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    ma, mb = machine_of(a), machine_of(b)
    return ("" if ma == mb else f"; they ran on different machines ({ma} vs {mb}), which do not reproduce each "
            f"other's bits: retrain on the first")


def carry_records(records: List[Dict[str, Any]], spec: AblationSpec, scale: str, fp_old: str, fp_new: str,
                  min_verified: int = 1) -> Tuple[List[Dict[str, Any]], Dict[str, str]]:
    """Records of code version ``fp_old`` to count for ``fp_new`` without retraining them, row by row:
    a row's record carries when ``fp_new`` has retrained, on the machine kind that trained it
    (:func:`machine_of`: other machines never reproduce its bits), at least ``min_verified`` of the
    row's (seed, config) runs, and no same-machine pair of the row differs (:func:`same_computation`).  The copies get ``fp_new``'s
    fingerprint and ``carried_from`` = {"code_fingerprint": fp_old, "verified_seeds": [...], "carried_at"};
    their training provenance (git commit, machine, run directory, curves) is the source's, their
    memory probe is dropped (the current code measures it again) and their FLOPs are the source's until
    :func:`ablations.runner.recount_flops` counts them.  Returns (new records, {row: why it does or
    does not carry}).  ``records``: one table's records at ``scale`` (the latest per row and seed count)."""
    from ablations.scales import recipe_scale

    def latest(fp):
        out = {}
        for r in records:
            if r.get("code_fingerprint") == fp and recipe_scale(r) == scale:
                out[(r.get("row"), r.get("seed"))] = r
        return out

    old, new = latest(fp_old), latest(fp_new)
    carried, why = [], {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for row in spec.rows:
        olds = {seed: r for (name, seed), r in old.items() if name == row.name}
        if not olds:
            continue
        pairs = {seed: (r, new[(row.name, seed)]) for seed, r in olds.items()
                 if (row.name, seed) in new and not new[(row.name, seed)].get("carried_from")}
        # a pair is evidence only when both ran on one machine kind: elsewhere every run differs
        same_machine = {seed: ab for seed, ab in pairs.items() if machine_of(ab[0]) == machine_of(ab[1])}
        diffs = {seed: same_computation(a, b) for seed, (a, b) in same_machine.items()}
        diffs = {seed: d for seed, d in diffs.items() if d}
        todo = sorted(seed for seed in olds if (row.name, seed) not in new)
        if diffs:
            seed, d = sorted(diffs.items())[0]
            why[row.name] = f"not carried: seed {seed} {d} between {fp_old} and {fp_new}"
            continue
        # a record carries when this code reproduced, on its machine, at least min_verified runs
        verified_on: Dict[str, List[int]] = {}
        for seed, (a, _) in same_machine.items():
            verified_on.setdefault(machine_of(a), []).append(seed)
        go = [seed for seed in todo if len(verified_on.get(machine_of(olds[seed]), [])) >= min_verified]
        left = [seed for seed in todo if seed not in go]
        cross = sorted(set(pairs) - set(same_machine))
        for seed in go:
            verified = sorted(verified_on[machine_of(olds[seed])])
            rec = {k: v for k, v in olds[seed].items() if k != "memory_probe"}
            rec["code_fingerprint"] = fp_new
            rec["carried_from"] = {"code_fingerprint": fp_old, "verified_seeds": verified, "carried_at": now}
            rec["metrics"] = flat_metrics(rec)
            carried.append(rec)
        parts = []
        if go:
            parts.append(f"{len(go)} record(s) carried; " + "; ".join(
                f"on {m}: seed(s) {', '.join(map(str, sorted(v)))} retrained by {fp_new} computed the same"
                for m, v in verified_on.items() if any(machine_of(olds[s]) == m for s in go)))
        if left:
            ms = sorted({machine_of(olds[seed]) for seed in left})
            parts.append(f"not carried: seed(s) {', '.join(map(str, left))}, trained on {' / '.join(ms)}, where "
                         f"{fp_new} has retrained {'fewer than ' + str(min_verified) if min_verified > 1 else 'none'} "
                         f"of the row's runs (`python -m ablations run {spec.name} --row \"{row.name}\" --seeds 1` "
                         f"on that machine retrains seed 0)")
        if cross:
            parts.append(f"seed(s) {', '.join(map(str, cross))} retrained on another machine than {fp_old}'s run "
                         f"(not evidence either way)")
        why[row.name] = "; ".join(parts) if parts else "nothing to carry (every seed retrained)"
    return carried, why
