"""Plan, run, resume and record the runs of an ablation.

One run = (row, seed) of a spec at a scale.  Its directory is
``runs/ablations/<ablation>/<scale>/<row slug>/seed<k>_<config hash>/`` (the trainer's checkpoint,
``metrics.jsonl`` and ``ablation_result.json``).  Every finished run appends ONE JSON line to
``reports/<ablation>/runs.jsonl`` (written by the parent process only); a run whose
(row, seed, scale, config hash) is already there is skipped, an unfinished one resumes from its
checkpoint, so an interrupted session continues where it stopped.

Local runs go to a pool of ``--jobs`` fresh processes (spawned, one run each, so the peak RSS a
process reports is that run's), each with ``cpu_count // jobs`` torch threads.  Paper-scale runs are
``torchrun ... -m m2f train`` commands, printed instead of run with ``--dry-run``.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ablations.records import RESULT_NAME, RunPlan, build_record, eval_metric, flat_metrics, runs_path
# imported with the runner, not when the table is rendered: a runner started before an edit of
# ablations/ renders with the code it planned with (a late import mixed a new render.py with the
# runner's older spec classes once, and the final render failed after the records were written)
from ablations.render import render_ablation, render_readme
from ablations.scales import Scale, get_scale, is_proxy, recipe_scale
from ablations.spec import AblationSpec, Row, load_spec, table_label
from m2f.checkpoint import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from m2f.config import Config, ConfigError, apply_overrides, config_hash, from_dict, get_preset, to_dict
from m2f.errors import InputError


def say(msg: str) -> None:
    """The runner's default ``print_fn``: print and flush, so progress reaches a log file as it happens
    (``nohup python -m ablations run ... > log``: a redirected stdout is block-buffered)."""
    print(msg, flush=True)

FLOPS_CACHE = ".flops_cache.json"
MEMORY_CACHE = ".memory_cache.json"
MEMORY_PROBE_MASKS = 20  # synthetic target masks per image in the memory probe




# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------
def resolve_config(spec: AblationSpec, row: Row, scale: Scale, seed: int, data: Optional[str] = None,
                   val_data: Optional[str] = None) -> Config:
    """preset (scale's, or the spec's paper preset) <- scale overrides <- row overrides (with the row's
    proxy_overrides at a scale that starts from its own preset: the tiny proxies) <- data <- seed."""
    cfg = get_preset(scale.preset or spec.paper_preset, scale.overrides)
    cfg = apply_overrides(cfg, row.overrides_at(proxy=is_proxy(scale)))
    extra: Dict[str, Any] = {"solver.seed": seed}
    if data:
        extra["data.train"] = data
        extra["data.val"] = val_data or data
    elif val_data:
        extra["data.val"] = val_data
    cfg = apply_overrides(cfg, extra)
    if "data.task" in row.overrides and "num_classes" not in row.overrides:
        # A row that trains one task of a panoptic dataset (Table 7's instance model: the synthetic data's
        # 6 thing classes of 9) takes that task's class count from the data, as `m2f train` does.  Data
        # not readable here (paper-scale plans without COCO): the torchrun command leaves it to m2f train.
        from m2f.data.catalog import get_dataset
        from m2f.train import classes_from_data

        try:
            cfg = classes_from_data(cfg, get_dataset(cfg.data.train, "train", cfg).metadata, ("num_classes",))
        except (InputError, OSError):
            pass
    return cfg


def plan_runs(spec: AblationSpec, scale: Scale, seeds: Optional[int] = None, data: Optional[str] = None,
              val_data: Optional[str] = None, runs_root: Path | str = "runs/ablations",
              rows: Optional[List[str]] = None) -> List[RunPlan]:
    n = seeds if seeds is not None else (scale.seeds or len(spec.seeds))
    if n < 1:
        raise InputError(f"--seeds {n}: must be >= 1")
    wanted = spec.trained_rows
    if rows:
        known = {r.name: r for r in spec.trained_rows}
        bad = [r for r in rows if r not in known]
        if bad:
            raise InputError(f"--row {bad}: not a trained row of {spec.name}; valid choices: {list(known)}")
        wanted = [known[r] for r in rows]
    from m2f.provenance import code_fingerprint

    fp = code_fingerprint()
    plans = []
    for row in wanted:  # row-major: the first seed of every row before the second seed of any
        for seed in spec.seed_values(n):
            cfg = resolve_config(spec, row, scale, seed, data, val_data)
            h = config_hash(cfg)
            run_dir = Path(runs_root) / spec.name / scale.name / row.slug / f"seed{seed}_{h}_{fp}"
            plans.append(RunPlan(spec.name, row, seed, scale.name, cfg, h, run_dir, fp))
    plans.sort(key=lambda p: (spec.seed_values(n).index(p.seed), [r.name for r in wanted].index(p.row.name)))
    return plans




def _on_this_machine(r: Dict[str, Any]) -> bool:
    run_dir = r.get("run_dir")
    return bool(run_dir) and (Path(run_dir) / RESULT_NAME).is_file()


def finished_keys(path: Path, reuse_records: bool = False) -> set:
    """(row, seed, scale, config hash, code fingerprint) of the finished runs in runs.jsonl.

    By default only runs finished ON THIS MACHINE count (their run directory still holds its
    result): records that came with a clone (committed reports) do not, so the main job on a fresh
    machine trains every run and reproduces the table.  ``reuse_records=True`` (``run
    --reuse-records``) counts every record: a table being filled over several machines or sessions
    continues where its committed records stop (the key includes the code fingerprint, so records
    of other code never count)."""
    keys = set()
    for r in read_jsonl(path):
        if reuse_records or _on_this_machine(r):
            # the scale whose current recipe trained it: cpu records of the 1000-iteration recipe are cpu-1000it's
            keys.add((r.get("row"), r.get("seed"), recipe_scale(r), r.get("config_hash"), r.get("code_fingerprint")))
    return keys


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------






# ---------------------------------------------------------------------------------------------
# One run (executed in a worker process, or inline)
# ---------------------------------------------------------------------------------------------
def exit_with_parent(period: float = 2.0) -> None:
    """In a run's worker process: exit as soon as the runner that started it is gone (killed, even with
    SIGKILL), so that no orphaned run goes on training and appending to a run directory that the next
    ``run`` resumes (its checkpoints are atomic: the next runner resumes from the last one)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(period)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def execute_run(job: Dict[str, Any]) -> Dict[str, Any]:
    """Train one run (resuming from its checkpoint), evaluate, count FLOPs.  ``job`` is a plain,
    picklable dict (see :func:`_job`).  Returns the run's result dict (also written atomically to
    ``RUN_DIR/ablation_result.json``)."""
    import resource

    import torch

    if job.get("exit_with_parent"):  # a worker of the local runner's process pool (not a submitit job)
        exit_with_parent()
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from m2f import evaluate as m2f_evaluate
    from m2f import train as m2f_train
    from m2f.provenance import code_fingerprint, environment

    fp = code_fingerprint()
    if job.get("fingerprint") and fp != job["fingerprint"]:
        raise RuntimeError(f"{job['run_dir']}: the sources changed since this run was planned (code fingerprint "
                           f"{fp}, planned {job['fingerprint']}); re-run the command to plan it with this code")
    cfg = from_dict(job["config"])
    run_dir = Path(job["run_dir"])
    label, max_iters = job["label"], cfg.solver.max_iters
    t0 = time.perf_counter()
    state = {"t": t0, "it": None}

    def log(rec: Dict[str, Any]) -> None:
        it = rec.get("iter")
        if "eval" in rec:
            ev = rec["eval"]
            shown = {m: eval_metric(ev, m) for m in ("PQ", "AP", "mIoU")}
            txt = " ".join(f"{k} {v:.2f}" for k, v in shown.items() if v is not None)
            print(f"  [{label}] eval at iter {it}: {txt}", flush=True)
            return
        now = time.perf_counter()
        rate = ""
        if state["it"] is not None and it is not None and it > state["it"]:
            spi = (now - state["t"]) / (it - state["it"])
            rate = f", {spi:.2f} s/it, run ETA {_fmt_s(spi * (max_iters - it))}"
        state["t"], state["it"] = now, it
        print(f"  [{label}] iter {it}/{max_iters} loss {rec.get('loss', float('nan')):.3f}{rate}", flush=True)

    evaluate_at_end = not job["proposals"]
    summary = m2f_train.train(cfg, run_dir, resume=True, device=job.get("device"), progress=job.get("progress", False),
                              evaluate_at_end=evaluate_at_end, eval_limit=job.get("eval_limit"), log_fn=log)
    if int(os.environ.get("RANK", "0")) != 0:  # a distributed job (submitit): rank 0 evaluates and records
        return {"summary": summary, "config_hash": job["config_hash"], "code_fingerprint": fp, "rank": os.environ["RANK"]}
    if job["proposals"]:
        # Per-layer class-agnostic proposals (paper Fig 3) need the model itself: reload the final checkpoint.
        model, _ = m2f_evaluate.load_model_from_checkpoint(run_dir / m2f_train.CKPT_NAME, device=job.get("device"))
        summary["eval"] = m2f_evaluate.evaluate_model(model, cfg, limit=job.get("eval_limit"), proposals=True)
        append_jsonl(run_dir / "metrics.jsonl", {"iter": summary.get("iter"), "eval": summary["eval"]})
    flops = model_flops(cfg, job["flops_size"], fp) if job.get("need_flops") else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result = {"summary": summary, "flops": flops, "peak_rss_bytes": rss if job.get("isolated") else None,
              "wall_seconds": time.perf_counter() - t0, "environment": environment(job.get("device")),
              "config_hash": job["config_hash"], "code_fingerprint": fp}
    atomic_write_json(run_dir / RESULT_NAME, result)
    return result


def _job(plan: RunPlan, scale: Scale, device: Optional[str], threads: int, need_flops: bool, proposals: bool,
         isolated: bool) -> Dict[str, Any]:
    return {"config": to_dict(plan.cfg), "config_hash": plan.config_hash, "run_dir": str(plan.run_dir),
            "fingerprint": plan.fingerprint,
            "label": plan.label, "device": device, "threads": threads, "eval_limit": scale.eval_limit,
            "flops_size": list(scale.flops_size), "need_flops": need_flops, "proposals": proposals,
            "isolated": isolated, "progress": False}




# ---------------------------------------------------------------------------------------------
# FLOPs cache (per config hash with the seed normalised away, and input size)
# ---------------------------------------------------------------------------------------------
def flops_key(cfg: Config, size, fingerprint: Optional[str] = None) -> str:
    """The cache key of a model's FLOPs: its config without the seed, the input size and the code
    fingerprint (default: the checkout's).  The fingerprint is part of it because the same config can
    be a different model under other code: until 2026-12-06 it was not, and Table 4c's SMCA records of
    1ebb60d016cf carried the FLOPs of fe5233d89935's SMCA (``python -m ablations recount-flops``)."""
    if fingerprint is None:
        from m2f.provenance import code_fingerprint

        fingerprint = code_fingerprint()
    return f"{config_hash(apply_overrides(cfg, {'solver.seed': 0}))}@{size[0]}x{size[1]}/{fingerprint}"


def _load_flops_cache(out: Path) -> Dict[str, Any]:
    p = Path(out) / FLOPS_CACHE
    if p.exists():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def model_flops(cfg: Config, size, fingerprint: str) -> Dict[str, Any]:
    """fvcore FLOPs of one ``size`` (H, W) image of ``cfg``'s model, marked with the ``fingerprint`` of
    the code that counted them; {"error": ...} when counting fails (FLOPs are a report column, not worth
    losing a run over)."""
    import warnings

    from m2f import flops as m2f_flops

    try:
        with warnings.catch_warnings():  # fvcore's torch.jit deprecation noise
            warnings.simplefilter("ignore", FutureWarning)
            return {**m2f_flops.count_flops(cfg, int(size[0]), int(size[1])), "code_fingerprint": fingerprint}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def recount_flops(names: List[str], out: Path | str = "reports",
                  print_fn: Callable[[str], None] = say) -> Dict[str, int]:
    """Count again, with this checkout's code, the FLOPs of every record of its code fingerprint in
    ``out/NAME/runs.jsonl`` (one fvcore count per config and size), and write the count into the
    records that carry another one (their ``metrics`` too; atomic rewrite).  Every recounted record
    gets ``flops.code_fingerprint``.  Records of other code versions are left alone: this code cannot
    count them.  Returns {name: records whose FLOPs or params changed}."""
    from m2f.checkpoint import rewrite_jsonl
    from m2f.provenance import code_fingerprint

    fp = code_fingerprint()
    out = Path(out)
    cache = _load_flops_cache(out)
    counted: Dict[str, Dict[str, Any]] = {}
    changed: Dict[str, int] = {}
    for name in names:
        path = runs_path(out, name)
        records = read_jsonl(path) if path.exists() else []
        n_changed, touched = 0, False
        for rec in records:
            if rec.get("code_fingerprint") != fp or not rec.get("config"):
                continue
            cfg = from_dict(rec["config"])
            if config_hash(cfg) != rec.get("config_hash"):
                print_fn(f"{name}: {rec.get('row')} seed {rec.get('seed')}: its config does not hash to its "
                         f"config_hash {rec.get('config_hash')} with this code; left alone")
                continue
            old = rec.get("flops") or {}
            try:
                size = old.get("size") or list(get_scale(rec.get("scale")).flops_size)
            except InputError:
                continue
            key = flops_key(cfg, size, fp)
            if key not in counted:
                counted[key] = model_flops(cfg, size, fp)
                if "error" not in counted[key]:
                    cache[key] = counted[key]
            new = counted[key]
            if old == new or "error" in new:  # a failed count never replaces a count
                if "error" in new:
                    print_fn(f"{name}: {rec.get('row')} seed {rec.get('seed')}: FLOPs not counted ({new['error']})")
                continue
            if old.get("gflops") != new["gflops"] or old.get("params") != new["params"]:
                n_changed += 1
                print_fn(f"{name}: {rec.get('row')} seed {rec.get('seed')}: FLOPs {old.get('gflops')} G -> "
                         f"{new['gflops']} G, params {old.get('params')} -> {new['params']}")
            rec["flops"] = new
            rec["metrics"] = flat_metrics(rec)
            touched = True
        if touched:
            rewrite_jsonl(path, records)
        changed[name] = n_changed
    if counted:
        atomic_write_json(out / FLOPS_CACHE, cache)
    return changed


# ---------------------------------------------------------------------------------------------
# Memory per image (paper Table 5's column): one probe per config, attached to its records
# ---------------------------------------------------------------------------------------------
def memory_key(cfg: Config, size: int, fingerprint: Optional[str] = None) -> str:
    """The probe's identity: the config without its seed -- execution-only fields included
    (activation checkpointing changes memory, not results) -- size, mask count and the code
    fingerprint (default: the checkout's; other code may allocate differently)."""
    if fingerprint is None:
        from m2f.provenance import code_fingerprint

        fingerprint = code_fingerprint()
    h = config_hash(apply_overrides(cfg, {"solver.seed": 0}), execution=True)
    return f"{h}@{size}x{size}/{MEMORY_PROBE_MASKS}masks/{fingerprint}"


def fill_missing_flops(spec: AblationSpec, plans: List[RunPlan], sc: Scale, out: Path) -> int:
    """Give the records of ``plans`` that have no FLOPs the count of their config (from the FLOPs cache,
    or from another seed's record of the config).

    One run per config counts FLOPs (the others take the cached count when they finish); when seeds
    of a new config run at once and one without the count finishes first, its record is written
    without FLOPs.  This pass, after the runs, fills it in (atomic rewrite).  Returns how many."""
    cache = _load_flops_cache(out)
    keys = {(p.config_hash, p.fingerprint): flops_key(p.cfg, sc.flops_size, p.fingerprint) for p in plans}
    path = runs_path(out, spec.name)
    if not path.exists():
        return 0
    records = read_jsonl(path)
    for rec in records:  # a count another seed's record carries is its config's count (a lost cache file)
        k = keys.get((rec.get("config_hash"), rec.get("code_fingerprint")))
        if k and rec.get("flops") and "error" not in rec["flops"] and rec.get("scale") == sc.name:
            cache.setdefault(k, rec["flops"])

    def count(rec):
        got = cache.get(keys.get((rec.get("config_hash"), rec.get("code_fingerprint"))) or "")
        return got if got and "error" not in got and not rec.get("flops") else None

    return _set_in_records(path, records, sc, "flops", count)


def _set_in_records(path: Path, records: List[Dict[str, Any]], sc: Scale, field: str,
                    value_for: Callable[[Dict[str, Any]], Any]) -> int:
    """Set ``field`` of each record of scale ``sc`` to ``value_for(record)`` where that is not None, with
    the record's ``metrics`` recomputed; rewrite ``path`` atomically when one changed.  Returns how many."""
    from m2f.checkpoint import rewrite_jsonl

    changed = 0
    for rec in records:
        v = value_for(rec) if rec.get("scale") == sc.name else None
        if v is not None:
            rec[field] = v
            rec["metrics"] = flat_metrics(rec)
            changed += 1
    if changed:
        rewrite_jsonl(path, records)
    return changed


def attach_memory_probes(spec: AblationSpec, plans: List[RunPlan], sc: Scale, out: Path, device: Optional[str],
                         fresh_process: bool = True, print_fn: Callable[[str], None] = say) -> int:
    """Measure training memory per image (``m2f.bench.memory.probe_memory`` at ``sc.memory_size``) for each
    distinct config of ``plans`` (cached in ``out/.memory_cache.json``: the figure depends on the
    config, not on the seed or the trained weights) and write it into the matching records of
    ``runs.jsonl`` as ``memory_probe`` (atomic rewrite).  A probe some record already carries counts as
    cached (a lost cache file re-measures nothing), and a record keeps a probe of the same key.
    Returns how many records were updated."""
    from m2f.bench.memory import probe_memory

    size = sc.memory_size
    if not size or "memory_GB" not in spec.metrics:
        return 0
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_path = Path(out) / MEMORY_CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    path = runs_path(out, spec.name)
    for rec in read_jsonl(path):  # a probe already in the records is the measurement of its key: not re-measured
        probe = rec.get("memory_probe") or {}
        if probe.get("key") and probe["key"] not in cache:
            cache[probe["key"]] = {k: v for k, v in probe.items() if k != "key"}
    probes: Dict[str, Dict[str, Any]] = {}
    for p in plans:
        key = memory_key(p.cfg, size, p.fingerprint)
        if key not in cache:
            print_fn(f"memory probe {p.row.name}: one training step at {size}x{size}, batch 1, "
                     f"{MEMORY_PROBE_MASKS} masks, on {device}")
            try:
                r = probe_memory(p.cfg, size, device, MEMORY_PROBE_MASKS, fresh_process=fresh_process)
            except Exception as e:  # noqa: BLE001 - a report column, not worth losing the ablation over
                print_fn(f"memory probe {p.row.name} failed ({type(e).__name__}: {str(e)[-300:]}); "
                         "its records keep the run's own peak")
                continue
            cache[key] = {k: r.get(k) for k in ("size", "num_masks", "peak_bytes", "method", "amp", "rss_peak_bytes")}
            atomic_write_json(cache_path, cache)
        if key in cache:
            probes[(p.config_hash, p.fingerprint)] = {**cache[key], "key": key}
    def probe_of(rec):  # only the records of the code that was probed; a record's own probe of the key stays
        probe = probes.get((rec.get("config_hash"), rec.get("code_fingerprint")))
        return probe if probe and (rec.get("memory_probe") or {}).get("key") != probe["key"] else None

    return _set_in_records(path, read_jsonl(path), sc, "memory_probe", probe_of)


# ---------------------------------------------------------------------------------------------
# Paper scale: torchrun commands
# ---------------------------------------------------------------------------------------------
def _override_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def torchrun_command(spec: AblationSpec, plan: RunPlan, scale: Scale) -> List[str]:
    """The exact command that trains ``plan`` at paper scale (run from the repository root)."""
    overrides = {**scale.overrides, **plan.row.overrides_at(proxy=is_proxy(scale)), "solver.seed": plan.seed}
    if plan.cfg.data.train != scale.overrides.get("data.train"):
        overrides["data.train"] = plan.cfg.data.train
    if plan.cfg.data.val != scale.overrides.get("data.val"):
        overrides["data.val"] = plan.cfg.data.val
    cmd = ["torchrun", *scale.torchrun_args, "-m", "m2f", "train", "--preset", scale.preset or spec.paper_preset]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={_override_str(v)}"]
    cmd += ["--out", str(plan.run_dir), "--resume", "--no-progress"]
    return cmd


def _run_torchrun(spec: AblationSpec, plan: RunPlan, scale: Scale) -> Dict[str, Any]:
    cmd = torchrun_command(spec, plan, scale)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    final = plan.run_dir / "final.json"
    if not final.exists():
        raise RuntimeError(f"{plan.label}: torchrun finished but {final} is missing")
    from m2f.provenance import environment

    summary = json.loads(final.read_text())
    if spec.evaluate_proposals:  # m2f train does not score per-layer proposals: do it here, on one device
        from m2f.evaluate import evaluate_model, load_model_from_checkpoint
        from m2f.train import CKPT_NAME

        model, _ = load_model_from_checkpoint(plan.run_dir / CKPT_NAME)
        summary["eval"] = evaluate_model(model, plan.cfg, limit=scale.eval_limit, proposals=True)
    result = {"summary": summary, "flops": None, "peak_rss_bytes": None,
              "wall_seconds": time.perf_counter() - t0, "environment": environment("cuda"),
              "config_hash": plan.config_hash, "code_fingerprint": plan.fingerprint}
    atomic_write_json(plan.run_dir / RESULT_NAME, result)
    return result


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def replay_record(record: Dict[str, Any], iters: int = 20, work_dir: Optional[Path] = None,
                  gemm_backend: Optional[str] = None) -> Dict[str, Any]:
    """Retrain the first ``iters`` iterations of a recorded CPU run here and compare every logged loss
    with the record's: does this machine reproduce the record's bits?  The record's config, seed,
    threads per run and resolved GEMM backend are used (``gemm_backend`` overrides the backend).  Used
    before :func:`ablations.records.carry_records`, whose check needs a retrain that reproduces the
    source's bits, which only the machine kind that trained it can.  Returns {"here", "recorded" (the
    two machines), "compared": [(iter, loss here, loss recorded)], "first_difference": iter or None}."""
    import tempfile

    import torch

    from ablations.records import machine_of
    from m2f import train as m2f_train
    from m2f.provenance import code_fingerprint, environment

    fp = code_fingerprint()
    if record.get("code_fingerprint") != fp:
        raise InputError(f"replay: the record ({record.get('row')}, seed {record.get('seed')}) was trained by code "
                         f"{record.get('code_fingerprint')}, this checkout computes {fp}: a difference would say "
                         f"nothing about the machine")
    if record.get("carried_from"):
        raise InputError(f"replay: the record ({record.get('row')}, seed {record.get('seed')}) is a carried copy; "
                         f"replay its source")
    env = record.get("environment") or {}
    d = dict(record["config"])
    d["gemm_backend"] = gemm_backend or (record.get("kernels") or {}).get("gemm_backend") or d.get("gemm_backend")
    cfg = from_dict(d)
    logged = [e for e in record.get("metrics_over_training") or [] if "loss" in e and e.get("iter") is not None]
    if not logged or min(e["iter"] for e in logged) > iters:
        raise InputError(f"replay: the record logs no loss within the first {iters} iterations")
    threads_before = torch.get_num_threads()
    if env.get("threads"):
        torch.set_num_threads(int(env["threads"]))
    try:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            m2f_train.train(cfg, Path(tmp) / "replay", resume=False, device="cpu", progress=False,
                            evaluate_at_end=False, stop_after=iters)
            here = {int(e["iter"]): e for e in read_jsonl(Path(tmp) / "replay" / "metrics.jsonl")
                    if "loss" in e and e.get("iter") is not None}
            kernels = m2f_train.kernels_used(cfg, "cpu")
    finally:
        torch.set_num_threads(threads_before)
    compared, first = [], None
    for e in logged:
        it = int(e["iter"])
        if it > iters or it not in here:
            continue
        same = all(here[it].get(k) == v for k, v in e.items())
        compared.append((it, here[it].get("loss"), e.get("loss")))
        if not same and first is None:
            first = it
    mine = {"environment": {**environment("cpu"), "threads": env.get("threads")}, "kernels": kernels}
    return {"here": machine_of(mine), "recorded": machine_of(record), "compared": compared,
            "first_difference": first}


def device_slots(device: Optional[str], jobs_per_device: Optional[int]) -> List[str]:
    """``jobs_per_device`` = K: K slots per visible GPU (["cuda:0", "cuda:0", "cuda:1", ...]); [] without it."""
    if not jobs_per_device:
        return []
    if jobs_per_device < 1:
        raise InputError(f"--jobs-per-device {jobs_per_device}: expected >= 1")
    if not (device or "").startswith("cuda"):
        raise InputError(f"--jobs-per-device needs --device cuda (got --device {device}); on CPU use --jobs")
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise InputError("--jobs-per-device: --device cuda but no CUDA device is visible")
    ids = [int(device.split(":")[1])] if ":" in device else list(range(n))
    return [f"cuda:{i}" for i in ids for _ in range(jobs_per_device)]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def rate_key(config: Any) -> Optional[str]:
    """What a run's speed depends on: its config (a :class:`Config` or a record's ``config`` dict) with
    the seed normalised away, execution-only fields kept (as :func:`memory_key`). Rows of one table
    differ in speed (Table 4e's FaPN takes well over twice its base row's s/it), so the ETA keeps one
    rate per key. None for a config this code cannot read."""
    try:
        cfg = config if isinstance(config, Config) else from_dict(config)
    except (ConfigError, TypeError, AttributeError, ValueError):
        return None
    return config_hash(apply_overrides(cfg, {"solver.seed": 0}), execution=True)


def _iters_timed(r: Dict[str, Any]) -> int:
    """The iterations a record's ``train_seconds`` timed: a run resumed from a checkpoint times only
    the iterations after it (m2f.train: ``train_images_per_s`` = images of this invocation /
    ``train_seconds``), so it is ``train_seconds x train_images_per_s / batch_size`` where the record
    has them, else all ``iters``."""
    iters = int(r["iters"])
    try:
        n = round(float(r["train_seconds"]) * float(r["train_images_per_s"]) / float(r["batch_size"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return iters
    return min(iters, n) if n >= 1 else iters


def recorded_seconds_per_iter(out: Path | str, scale: Scale, threads: int, fingerprint: Optional[str],
                              cpu: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The training seconds per iteration this machine kind took at ``scale`` with the code of
    ``fingerprint``, from the records of every table under ``out``: the median over the CPU runs of the
    same CPU model, ISA class and threads per run, each run counted once (shared records name their
    source), over the iterations its ``train_seconds`` timed (a resumed run: those after its
    checkpoint, :func:`_iters_timed`), periodic evaluations taken out at the scale's ``seconds_per_eval``.
    ``{"seconds_per_iter", "runs", "machine", "by_config"}`` (``by_config``: the median per
    :func:`rate_key`), or None without such a record (a new machine kind: the ETA starts from the
    scale's figure)."""
    from m2f.provenance import cpu_info

    cpu = cpu or cpu_info()
    rates: Dict[str, float] = {}
    keys: Dict[str, Optional[str]] = {}
    for path in sorted(Path(out).glob("*/runs.jsonl")):
        for r in read_jsonl(path):
            env = r.get("environment") or {}
            c = env.get("cpu") if isinstance(env.get("cpu"), dict) else {}
            cfg = (r.get("config") or {}).get("solver") or {}
            if (r.get("scale") != scale.name or r.get("code_fingerprint") != fingerprint or env.get("gpu")
                    or c.get("model") != cpu.get("model") or c.get("isa_class") != cpu.get("isa_class")
                    or env.get("threads") != threads
                    or not r.get("train_seconds") or not r.get("iters") or r.get("carried_from")):
                continue
            iters = int(r["iters"])
            trained = _iters_timed(r)
            period = cfg.get("eval_period") or 0
            # periodic evaluations inside the timed iterations (iters - trained, iters)
            evals = ((iters - 1) // period - (iters - trained) // period) if period else 0
            sec = float(r["train_seconds"]) - evals * scale.seconds_per_eval
            if sec > 0:
                run = str(r.get("shared_from") or r.get("run_dir"))
                rates[run] = sec / trained
                keys[run] = rate_key(r.get("config"))
    if not rates:
        return None
    per: Dict[str, List[float]] = {}
    for run, k in keys.items():
        if k is not None:
            per.setdefault(k, []).append(rates[run])
    return {"seconds_per_iter": statistics.median(rates.values()), "runs": len(rates),
            "machine": f"{cpu.get('model')} ({cpu.get('isa_class')}), {threads} thread(s) per run",
            "by_config": {k: statistics.median(v) for k, v in per.items()}}


class Progress:
    """The whole ablation's ETA: each running run's iterations left (from its metrics.jsonl) and each
    queued run's in full, x its own seconds per iteration, plus their evaluations, scheduled over the
    parallel jobs as the pool runs them (queued runs in order, each on the first slot to free).

    A run's seconds per iteration is, first found: the rate measured in this session for runs of its
    config (:func:`rate_key`: the same row, any seed), the rate recorded for its config on this machine
    kind (``prior_by_config``, from :func:`recorded_seconds_per_iter`), the median of every rate
    measured in this session, this machine kind's recorded median (``prior_seconds_per_iter``), the
    scale's figure. One rate for all would hold a slow row (Table 4e's FaPN) to the fast rows' pace."""

    def __init__(self, scale: Scale, prior_seconds_per_iter: Optional[float] = None,
                 prior_by_config: Optional[Dict[str, float]] = None):
        self.scale = scale
        self.prior = prior_seconds_per_iter  # this machine kind's recorded rate, if any
        self.prior_by_config: Dict[str, float] = dict(prior_by_config or {})
        self.queued: Dict[str, RunPlan] = {}
        self.running: Dict[str, Dict[str, Any]] = {}
        self.rates: Dict[Optional[str], List[float]] = {}  # measured, per rate_key
        self._keys: Dict[str, Optional[str]] = {}

    def _key(self, p: RunPlan) -> Optional[str]:
        d = str(p.run_dir)
        if d not in self._keys:
            self._keys[d] = rate_key(p.cfg) if isinstance(p.cfg, Config) else None
        return self._keys[d]

    def queue(self, plans: List[RunPlan]) -> None:
        self.queued.update({str(p.run_dir): p for p in plans})

    def start(self, p: RunPlan) -> None:
        self.queued.pop(str(p.run_dir), None)
        self.running[str(p.run_dir)] = {"plan": p, "t0": time.perf_counter(), "it0": None}

    def done(self, p: RunPlan) -> None:
        st = self.running.pop(str(p.run_dir), None)
        self.queued.pop(str(p.run_dir), None)
        if st:
            self._rate(st)

    @staticmethod
    def _last_iter(p: RunPlan) -> Optional[int]:
        last = None
        for rec in read_jsonl(p.run_dir / "metrics.jsonl"):
            if "loss" in rec and rec.get("iter") is not None:
                last = int(rec["iter"])
        return last

    def _rate(self, st: Dict[str, Any]) -> Optional[float]:
        """The run's seconds per iteration since it was first seen running (its latest measurement
        replaces its earlier one: one figure per run, not per progress line)."""
        it = self._last_iter(st["plan"])
        if it is None:
            return None
        if st["it0"] is None:
            st["it0"], st["t_it0"] = it, time.perf_counter()
            return None
        if it > st["it0"]:
            r = (time.perf_counter() - st["t_it0"]) / (it - st["it0"])
            runs = self.rates.setdefault(self._key(st["plan"]), [])
            if st.get("slot") is None:
                st["slot"] = len(runs)
                runs.append(r)
            else:
                runs[st["slot"]] = r
            return r
        return None

    def seconds_per_iter(self, plan: Optional[RunPlan] = None) -> float:
        """``plan``'s rate (see the class); without one, the rate for a run of no known config."""
        k = self._key(plan) if plan is not None else None
        if k is not None and self.rates.get(k):
            return statistics.median(self.rates[k])
        if k is not None and k in self.prior_by_config:
            return self.prior_by_config[k]
        measured = [r for v in self.rates.values() for r in v]
        return statistics.median(measured) if measured else (self.prior or self.scale.seconds_per_iter)

    def eta(self, n_jobs: int) -> float:
        """Seconds until the last run finishes: the running runs' remaining time, then the queued runs
        in queue order, each on the slot that frees first (the pool's own order), so that a last run
        left alone counts in full, not divided by the parallel jobs."""
        slots = []
        for st in self.running.values():
            self._rate(st)
        for st in self.running.values():
            p = st["plan"]
            it = self._last_iter(p) or 0
            ep = p.cfg.solver.eval_period
            evals = ((p.cfg.solver.max_iters - it) // ep if ep else 0) + 1
            slots.append(max(0, p.cfg.solver.max_iters - it) * self.seconds_per_iter(p)
                         + evals * self.scale.seconds_per_eval)
        n = max(1, n_jobs)
        slots = sorted(slots)[-n:] if len(slots) > n else slots
        slots += [0.0] * (n - len(slots))
        for p in self.queued.values():
            ep = p.cfg.solver.eval_period
            evals = (p.cfg.solver.max_iters - 1) // ep + 1 if ep else 1
            i = min(range(n), key=slots.__getitem__)
            slots[i] += p.cfg.solver.max_iters * self.seconds_per_iter(p) + evals * self.scale.seconds_per_eval
        return max(slots)

    def line(self, n_jobs: int, finished: int, total: int, elapsed: float) -> str:
        eta = self.eta(n_jobs)
        runs = ", ".join(f"{st['plan'].label} {self._last_iter(st['plan']) or 0}/{st['plan'].cfg.solver.max_iters} "
                         f"({self.seconds_per_iter(st['plan']):.2f} s/it)" for st in self.running.values())
        return (f"progress: {finished}/{total} finished, running {runs or '-'}; "
                f"elapsed {_fmt_s(elapsed)}, whole ablation ETA {_fmt_s(eta)}")


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _load_result(plan: RunPlan) -> Optional[Dict[str, Any]]:
    """A run that finished but whose record was not appended (killed in between)."""
    p = plan.run_dir / RESULT_NAME
    if not p.exists():
        return None
    try:
        r = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    ok = r.get("config_hash") == plan.config_hash and r.get("code_fingerprint", plan.fingerprint) == plan.fingerprint
    return r if ok else None


def share_key(seed: Any, config_hash: Optional[str], fingerprint: Optional[str], eval_limit: Optional[int]) -> tuple:
    """What makes two runs the same computation: seed, config hash (the whole training config),
    code fingerprint and the number of val images each evaluation scores.  The scale's NAME is not
    part of it: Table 4a's cpu runs and the calibration candidate cpu-2000it's are the same runs."""
    return (seed, config_hash, fingerprint, eval_limit)


def shared_runs(out: Path, ablation: str, reuse_records: bool = False) -> Dict[tuple, Dict[str, Any]]:
    """:func:`share_key` -> the record of every run another ablation, or a calibration candidate
    (reports/calibration/cpu-<N>it/), finished: runs the same computation can be recorded from
    instead of retrained (within one code version only).  As in :func:`finished_keys`, by default only runs finished on this machine are
    sources (a fresh clone reproduces every table rather than copying committed records into
    another); ``reuse_records=True`` makes every committed record a source: records are
    self-contained, so this works with no run directories.  Read once per ``run_ablation`` call."""
    index: Dict[tuple, Dict[str, Any]] = {}
    own = (Path(out) / ablation / "runs.jsonl").resolve()
    paths = sorted(Path(out).glob("*/runs.jsonl")) + sorted(Path(out).glob("calibration/cpu-*it/*/runs.jsonl"))
    for path in paths:
        if path.resolve() == own:
            continue
        for r in read_jsonl(path):
            if not (reuse_records or _on_this_machine(r)):
                continue
            key = share_key(r.get("seed"), r.get("config_hash"), r.get("code_fingerprint"),
                            (r.get("data") or {}).get("eval_limit"))
            if key[1] is not None and key[2] is not None and key not in index:
                index[key] = {**r, "_records_file": str(path)}
    return index


def source_label(rec: Dict[str, Any]) -> str:
    """How a sharing source is named in messages and records."""
    return f"{rec['_records_file']} ({rec.get('row')}, seed {rec.get('seed')})"


def share_run(plan: RunPlan, rec: Dict[str, Any], proposals: bool, device: Optional[str] = None,
              eval_limit: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Record another table's identical run ``rec`` (same config hash, seed, scale and code
    fingerprint) as ``plan``'s: the result :func:`build_record` reads and the metrics over training
    are written into ``plan.run_dir`` with ``shared_from`` (the run that trained) set; nothing is
    retrained.  Metrics the source did not compute (per-layer proposals, paper Fig 3) are evaluated
    from its final checkpoint; None if that checkpoint is not on this machine."""
    if rec.get("config_hash") != plan.config_hash or rec.get("code_fingerprint") != plan.fingerprint:
        return None
    origin = rec.get("shared_from") or rec.get("run_dir")
    ev = dict(rec.get("eval") or {})
    if proposals and "proposals" not in ev:
        from m2f import evaluate as m2f_evaluate
        from m2f import train as m2f_train

        ckpt = Path(origin or "") / m2f_train.CKPT_NAME
        if not ckpt.is_file():
            return None
        model, _ = m2f_evaluate.load_model_from_checkpoint(ckpt, device=device)
        ev = m2f_evaluate.evaluate_model(model, plan.cfg, limit=eval_limit, proposals=True)
    summary = {"eval": ev, "final_loss": rec.get("final_loss"), "iter": rec.get("iters"),
               "peak_memory_bytes": rec.get("peak_memory_bytes"), "train_images_per_s": rec.get("train_images_per_s"),
               "train_seconds": rec.get("train_seconds"), "params": rec.get("params"), "kernels": rec.get("kernels")}
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.run_dir / "metrics.jsonl",
                      "".join(json.dumps(m) + "\n" for m in rec.get("metrics_over_training") or []))
    result = {"summary": summary, "environment": rec.get("environment"), "peak_rss_bytes": rec.get("peak_rss_bytes"),
              "wall_seconds": rec.get("wall_seconds"), "code_fingerprint": rec.get("code_fingerprint"),
              "config_hash": rec.get("config_hash"), "flops": rec.get("flops"), "git_commit": rec.get("git_commit"),
              "shared_from": origin, "shared_from_record": source_label(rec)}
    if rec.get("carried_from"):  # a carried record shared on stays marked as carried
        result["carried_from"] = rec["carried_from"]
    atomic_write_json(plan.run_dir / RESULT_NAME, result)
    return result


def run_ablation(name: str, scale: str = "cpu", seeds: Optional[int] = None, data: Optional[str] = None,
                 val_data: Optional[str] = None, device: Optional[str] = None, jobs: Optional[int] = None,
                 out: Path | str = "reports", runs_root: Path | str = "runs/ablations", dry_run: bool = False,
                 inline: bool = False, render: bool = True, rows: Optional[List[str]] = None,
                 share: bool = True, print_fn: Callable[[str], None] = say, jobs_per_device: Optional[int] = None,
                 allow_stale: bool = False, progress_period: float = 60.0,
                 reuse_records: bool = False, threads: Optional[int] = None) -> Dict[str, Any]:
    """Run (or resume) every (row, seed) of ablation ``name`` at ``scale``, append records, render.

    Returns ``{"planned", "skipped", "ran", "failed": [(label, error)], "table": path or None}``.
    ``inline=True`` runs in this process one at a time (tests); otherwise a spawned process pool.
    ``share=True``: a run identical to one another ablation finished on this machine (same config
    hash, seed, code and val images, typically the base model) is recorded from it instead of retrained.
    ``reuse_records=True``: committed records of the current code count as finished (this table's)
    and as sharing sources (other tables'), not only runs finished on this machine.
    ``jobs_per_device=K`` with a CUDA ``device``: K runs at once on each visible GPU (round robin).
    Every ``progress_period`` seconds (and after each run) a progress line gives the ETA of the whole
    ablation, from the running runs' measured seconds per iteration and the iterations left.
    ``threads``: torch threads per local run (default: cores // parallel runs).
    """
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: expected >= 1")
    spec = load_spec(name)
    sc = get_scale(scale)
    out = Path(out)
    devices = device_slots(device, jobs_per_device)
    if devices:
        jobs = len(devices)
    plans = plan_runs(spec, sc, seeds, data, val_data, runs_root, rows)
    rpath = runs_path(out, spec.name)
    done = finished_keys(rpath, reuse_records)
    todo = [p for p in plans if p.key not in done]
    skipped = len(plans) - len(todo)
    print_fn(f"ablation {spec.name} ({table_label(spec)}: {spec.title}) at scale {sc.name}: "
             f"{len(plans)} runs ({len({p.row.name for p in plans})} rows x {len({p.seed for p in plans})} seeds), "
             f"{skipped} already finished, {len(todo)} to run")
    summary: Dict[str, Any] = {"planned": len(plans), "skipped": skipped, "ran": 0, "shared": 0, "failed": [],
                               "table": None, "commands": []}
    shared = shared_runs(out, spec.name, reuse_records) if share and sc.launcher != "torchrun" else {}
    if dry_run:
        for i, p in enumerate(todo, 1):
            if sc.launcher == "torchrun":
                cmd = shlex.join(torchrun_command(spec, p, sc))
                summary["commands"].append(cmd)
                print_fn(f"[{i}/{len(todo)}] {p.label}:\n  {cmd}")
            else:
                src = shared.get(share_key(p.seed, p.config_hash, p.fingerprint, sc.eval_limit))
                print_fn(f"[{i}/{len(todo)}] {p.label}: " + (
                    f"shared from the identical run {source_label(src)} (config {p.config_hash})" if src is not None else
                    f"{sc.name} run into {p.run_dir} ({p.cfg.solver.max_iters} iterations, config {p.config_hash})"))
        return summary

    from m2f.provenance import git_commit

    git = git_commit()
    flops_cache = _load_flops_cache(out)
    total = len(todo)
    counter = {"n": 0}
    t_start = time.perf_counter()
    progress = Progress(sc)

    def finish(plan: RunPlan, result: Dict[str, Any]) -> None:
        fk = flops_key(plan.cfg, sc.flops_size, plan.fingerprint)
        flops = result.get("flops") or flops_cache.get(fk)
        if result.get("flops") and "error" not in result["flops"]:
            flops_cache[fk] = result["flops"]
            atomic_write_json(out / FLOPS_CACHE, flops_cache)
        rec = build_record(spec, plan, sc, result, flops, git)
        append_jsonl(rpath, rec)
        counter["n"] += 1
        m = rec["metrics"]
        shown = " ".join(f"{k} {m[k]:.2f}" for k in dict.fromkeys((spec.primary_metric, "PQ", "AP", "mIoU")) if k in m)
        progress.done(plan)
        left = total - counter["n"]
        how = (f"recorded {plan.label} from its identical run (trained in {_fmt_s(result.get('wall_seconds') or 0)})"
               if result.get("shared_from") else f"finished {plan.label} in {_fmt_s(result.get('wall_seconds') or 0)}")
        print_fn(f"[{counter['n']}/{total}] {how}: "
                 f"{shown or '(no metrics)'}; elapsed {_fmt_s(time.perf_counter() - t_start)}"
                 + (f", whole ablation ETA {_fmt_s(progress.eta(n_jobs))}" if left else ""))

    def fail(plan: RunPlan, err: BaseException) -> None:
        summary["failed"].append((plan.label, f"{type(err).__name__}: {err}"))
        append_jsonl(out / spec.name / "failures.jsonl", {
            "row": plan.row.name, "seed": plan.seed, "scale": plan.scale, "config_hash": plan.config_hash,
            "error": f"{type(err).__name__}: {err}", "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        print_fn(f"FAILED {plan.label}: {type(err).__name__}: {err}")

    n_jobs = max(1, jobs or sc.jobs)
    # Runs that finished training but lost their record: record them without training.
    progress.queue(todo)  # the ETA printed after each recorded run counts the runs still to train
    pending = []
    for p in todo:
        r = _load_result(p)
        if r is not None:
            print_fn(f"recovering the finished run {p.label} from {p.run_dir / RESULT_NAME}")
            finish(p, r)
            continue
        src = shared.get(share_key(p.seed, p.config_hash, p.fingerprint, sc.eval_limit))
        r = share_run(p, src, spec.evaluate_proposals, device, sc.eval_limit) if src is not None else None
        if r is not None:
            print_fn(f"sharing {p.label}: the identical run {source_label(src)} (same config {p.config_hash}, seed, "
                     f"code and val images) is recorded instead of retrained")
            finish(p, r)
            summary["shared"] += 1
        else:
            pending.append(p)

    n_jobs = max(1, min(jobs or sc.jobs, len(pending) or 1))
    if sc.launcher == "torchrun" and pending:
        for i, p in enumerate(pending, 1):
            print_fn(f"[{counter['n'] + 1}/{total}] starting {p.label}: {shlex.join(torchrun_command(spec, p, sc))}")
            try:
                res = _run_torchrun(spec, p, sc)
                if flops_key(p.cfg, sc.flops_size, p.fingerprint) not in flops_cache:
                    res["flops"] = model_flops(p.cfg, sc.flops_size, p.fingerprint)
                finish(p, res)
                summary["ran"] += 1
            except Exception as e:  # noqa: BLE001
                fail(p, e)
    elif pending:
        threads = threads or max(1, (os.cpu_count() or 1) // n_jobs)
        on_cpu = not (device or "").startswith("cuda") and not (device is None and _cuda_available())
        prior = recorded_seconds_per_iter(out, sc, threads, pending[0].fingerprint) if on_cpu else None
        spi = prior["seconds_per_iter"] if prior else sc.seconds_per_iter
        progress.prior = prior["seconds_per_iter"] if prior else None
        progress.prior_by_config = prior["by_config"] if prior else {}
        est = progress.eta(n_jobs)  # queued = pending (todo, less the runs recorded above); each at its config's recorded rate
        own = sum(1 for p in pending if progress._key(p) in progress.prior_by_config)
        source = (f"{spi:.2f} s/iteration: the median of {prior['runs']} recorded {sc.name} run(s) on "
                  f"{prior['machine']}; {own} of the {len(pending)} runs at their own row's recorded rate"
                  if prior else f"the scale's {sc.seconds_per_iter} s/iteration; no "
                  f"{sc.name} record of this machine kind yet")
        print_fn(f"running {len(pending)} runs, {n_jobs} at a time with {threads} thread(s) each; estimated "
                 f"{_fmt_s(est)} (from {source}; {sc.seconds_per_eval} s/evaluation)")
        jobs_of = {}
        seen_flops = set(flops_cache)
        for p in pending:
            fk = flops_key(p.cfg, sc.flops_size, p.fingerprint)
            jobs_of[id(p)] = _job(p, sc, device, threads, need_flops=fk not in seen_flops,
                                  proposals=spec.evaluate_proposals, isolated=not inline)
            seen_flops.add(fk)
        started = {"n": counter["n"]}

        def announce(p: RunPlan) -> None:
            started["n"] += 1
            progress.start(p)
            print_fn(f"[{started['n']}/{total}] starting {p.label} ({p.cfg.solver.max_iters} iterations) "
                     f"-> {p.run_dir}")

        if inline:
            for p in pending:
                announce(p)
                try:
                    finish(p, execute_run(jobs_of[id(p)]))
                    summary["ran"] += 1
                except Exception as e:  # noqa: BLE001
                    fail(p, e)
        else:
            import multiprocessing as mp

            import signal
            import threading

            def _interrupt(signum, frame):  # `kill PID`: stop like Ctrl-C, workers included
                raise KeyboardInterrupt

            main_thread = threading.current_thread() is threading.main_thread()
            old_term = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
                queue = list(pending)
                running = {}
                try:
                    while queue or running:
                        while queue and len(running) < n_jobs:
                            p = queue.pop(0)
                            announce(p)
                            job = jobs_of[id(p)]
                            if devices:  # the free slot's device
                                busy = [jobs_of[id(q)]["device"] for q in running.values()]
                                job["device"] = next(d for d in devices if busy.count(d) < devices.count(d))
                            running[pool.submit(execute_run, {**job, "exit_with_parent": True})] = p
                        done_f, _ = wait(list(running), return_when=FIRST_COMPLETED, timeout=progress_period)
                        if not done_f:
                            print_fn(progress.line(n_jobs, counter["n"], total, time.perf_counter() - t_start))
                        for f in done_f:
                            p = running.pop(f)
                            try:
                                finish(p, f.result())
                                summary["ran"] += 1
                            except Exception as e:  # noqa: BLE001
                                fail(p, e)
                except KeyboardInterrupt:
                    for proc in list((getattr(pool, "_processes", None) or {}).values()):
                        proc.terminate()  # runs in progress stop; each resumes from its last checkpoint
                    pool.shutdown(wait=False, cancel_futures=True)
                    print_fn("interrupted: finished runs are recorded; run the same command again to resume")
                    raise
                finally:
                    if main_thread:
                        signal.signal(signal.SIGTERM, old_term)
    n_filled = fill_missing_flops(spec, plans, sc, out)
    if n_filled:
        print_fn(f"FLOPs of {n_filled} record(s) filled in from the count of their config")
    n_probed = attach_memory_probes(spec, plans, sc, out, device, fresh_process=not inline, print_fn=print_fn)
    if n_probed:
        print_fn(f"training memory per image ({sc.memory_size}x{sc.memory_size}) recorded in {n_probed} record(s)")
    if render:
        res = render_ablation(spec, out, allow_stale=allow_stale)  # the highest-fidelity scale recorded
        render_readme(out)
        summary["table"] = res.get("table") if res else None
        if summary["table"]:
            print_fn(f"wrote {summary['table']} (scale {res.get('scale')})"
                     + ("" if res.get("scale") == sc.name else
                        f"; the {sc.name} records: python -m ablations report {spec.name} --scale {sc.name}"))
    print_fn(f"done: {summary['ran']} ran, {summary['shared']} shared, {skipped} skipped, {len(summary['failed'])} failed "
             f"in {_fmt_s(time.perf_counter() - t_start)}")
    return summary
