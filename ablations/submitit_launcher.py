"""``python -m ablations run NAME --launcher submitit``: every pending (row, seed) of a table as its own
job through submitit (Slurm on a cluster; submitit's local executor for tests), with the same run
directories, records and resume as the local launcher.

- Resources per job come from the scale (:data:`ablations.scales.Scale.slurm`: nodes, GPUs per node,
  time, CPUs, memory), overridden by flags; partition and account from ``--partition`` /
  ``--account`` or the environment (``M2F_SLURM_PARTITION``, ``M2F_SLURM_ACCOUNT``).
- A job is :class:`AblationJob`, a ``submitit.helpers.Checkpointable``: when Slurm preempts it or its
  time runs out, submitit requeues it and the run resumes from its last checkpoint (the trainer's
  ``resume=True``), which continues the identical loss curve.  With several tasks (GPUs) per job,
  submitit's environment is exported as torch.distributed's (``MASTER_ADDR``, ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``), which ``m2f.train`` reads as under torchrun.
- The parent never trains: it submits, and gathers finished runs into ``runs.jsonl`` with
  :func:`collect` (``python -m ablations collect NAME``, or ``run`` again, or ``--wait``), exactly once
  per run: under a file lock, a run already recorded is skipped, so a restarted parent or two
  collectors at once append nothing twice.  Runs already queued or running (``submitit.jsonl`` in
  the reports folder lists the jobs) are not submitted again.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ablations.records import RESULT_NAME, RunPlan, build_record, runs_path
from ablations.scales import Scale, get_scale
from ablations.spec import load_spec, table_label
from m2f.checkpoint import append_jsonl, read_jsonl
from m2f.errors import InputError

try:  # the job class is Checkpointable where submitit is installed; the module imports without it
    from submitit.helpers import Checkpointable as _JobBase
except ImportError:  # pragma: no cover
    _JobBase = object

JOBS_FILE = "submitit.jsonl"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


def _submitit():
    try:
        import submitit
    except ImportError:
        raise InputError("--launcher submitit needs the submitit package: pip install -e \".[cluster]\" "
                         "(or pip install submitit)") from None
    return submitit


class AblationJob(_JobBase):
    """One (row, seed) run as a submitit job (picklable, Checkpointable: requeued on preemption)."""

    def __call__(self, job: Dict[str, Any]) -> Dict[str, Any]:
        from ablations.runner import execute_run

        submitit = _submitit()
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # several GPUs / nodes: torch.distributed's env:// from submitit's
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        run_dir = Path(job["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        if env.global_rank == 0:  # provenance of restarts (preemption, timeout): one line per start
            append_jsonl(run_dir / "starts.jsonl", {"job_id": str(env.job_id), "tasks": env.num_tasks,
                                                   "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return execute_run(job)

    def checkpoint(self, job: Dict[str, Any]):
        """Called by submitit on preemption / timeout: requeue the same call; the run resumes from
        its last checkpoint."""
        return _submitit().helpers.DelayedSubmission(AblationJob(), job)


def resources(scale: Scale, nodes: Optional[int] = None, gpus_per_node: Optional[int] = None,
              time_min: Optional[int] = None, cpus_per_task: Optional[int] = None, mem_gb: Optional[int] = None,
              partition: Optional[str] = None, account: Optional[str] = None) -> Dict[str, Any]:
    """submitit parameters for one job of ``scale`` (flags override the scale's; partition and account
    from the flags or M2F_SLURM_PARTITION / M2F_SLURM_ACCOUNT)."""
    r = dict(scale.slurm)
    for k, v in (("nodes", nodes), ("gpus_per_node", gpus_per_node), ("timeout_min", time_min),
                 ("cpus_per_task", cpus_per_task), ("mem_gb", mem_gb)):
        if v is not None:
            if v < 0 or (k in ("nodes", "timeout_min", "cpus_per_task") and v < 1):
                raise InputError(f"--{k.replace('_', '-').replace('timeout-min', 'time')} {v}: expected a positive number")
            r[k] = v
    r["tasks_per_node"] = max(1, r.get("gpus_per_node") or 0)
    partition = partition or os.environ.get("M2F_SLURM_PARTITION")
    account = account or os.environ.get("M2F_SLURM_ACCOUNT")
    if partition:
        r["slurm_partition"] = partition
    if account:
        r["slurm_account"] = account
    return r


@contextmanager
def _lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def collect(name: str, scale: str = "cpu", seeds: Optional[int] = None, data: Optional[str] = None,
            val_data: Optional[str] = None, out: Path | str = "reports", runs_root: Path | str = "runs/ablations",
            rows: Optional[List[str]] = None, render: bool = True,
            print_fn: Callable[[str], None] = print) -> Dict[str, Any]:
    """Append a record for every planned run that has finished (its ablation_result.json, of this
    config and code fingerprint) and is not recorded yet; exactly once per run, under a lock."""
    from ablations.runner import _load_result, finished_keys, flops_key, plan_runs
    from m2f.provenance import git_commit

    spec = load_spec(name)
    sc = get_scale(scale)
    out = Path(out)
    plans = plan_runs(spec, sc, seeds, data, val_data, runs_root, rows)
    rpath = runs_path(out, spec.name)
    added, waiting = 0, []
    with _lock(out / spec.name / ".collect.lock"):
        done = finished_keys(rpath)
        git = git_commit()
        from ablations.runner import FLOPS_CACHE, _load_flops_cache
        from m2f.checkpoint import atomic_write_json

        results = {}
        cache = _load_flops_cache(out)
        for p in plans:
            if p.key in done:
                continue
            r = _load_result(p)
            if r is None:
                waiting.append(p)
                continue
            results[id(p)] = r
            f = r.get("flops")
            if f and "error" not in f:  # one job per config counts FLOPs; the others share it
                cache[flops_key(p.cfg, sc.flops_size, p.fingerprint)] = f
        if results:
            atomic_write_json(out / FLOPS_CACHE, cache)
        for p in plans:
            r = results.get(id(p))
            if r is None:
                continue
            flops = r.get("flops") or cache.get(flops_key(p.cfg, sc.flops_size, p.fingerprint))
            append_jsonl(rpath, build_record(spec, p, sc, r, flops, git))
            added += 1
            print_fn(f"recorded {p.label} from {p.run_dir / RESULT_NAME}")
    print_fn(f"collect {spec.name} ({table_label(spec)}) at scale {sc.name}: {added} recorded now, "
             f"{len(plans) - added - len(waiting)} recorded before, {len(waiting)} not finished")
    res: Dict[str, Any] = {"planned": len(plans), "added": added, "waiting": [p.label for p in waiting], "table": None}
    if render and added:
        from ablations.render import render_ablation, render_readme

        r = render_ablation(spec, out)
        render_readme(out)
        res["table"] = r.get("table") if r else None
    return res


def _active_jobs(out: Path, name: str) -> Dict[str, Dict[str, Any]]:
    """run_dir -> the latest job submitted for it, if submitit still reports it queued or running."""
    submitit = _submitit()
    latest: Dict[str, Dict[str, Any]] = {}
    for r in read_jsonl(out / name / JOBS_FILE):
        latest[r["run_dir"]] = r
    active = {}
    for run_dir, r in latest.items():
        if (Path(run_dir) / RESULT_NAME).is_file():
            continue
        state = "UNKNOWN"
        if r.get("cluster") == "slurm":
            try:
                state = submitit.SlurmJob(folder=r["folder"], job_id=r["job_id"]).state
            except Exception:  # noqa: BLE001 -- sacct unavailable: assume it may still run
                state = "UNKNOWN"
        elif r.get("cluster") in ("local", "debug"):
            state = "FINISHED"  # a local job's id is its controller's pid: running while that process lives
            try:
                os.kill(int(r["job_id"]), 0)
                with open(f"/proc/{int(r['job_id'])}/stat") as f:
                    state = "FINISHED" if f.read().split()[2] == "Z" else "RUNNING"
            except (OSError, ValueError):
                pass
        if state.split()[0] in ACTIVE_STATES:
            active[run_dir] = {**r, "state": state}
    return active


def submit_ablation(name: str, scale: str = "cpu", seeds: Optional[int] = None, data: Optional[str] = None,
                    val_data: Optional[str] = None, device: Optional[str] = None, out: Path | str = "reports",
                    runs_root: Path | str = "runs/ablations", rows: Optional[List[str]] = None,
                    dry_run: bool = False, wait: bool = False, cluster: Optional[str] = None,
                    folder: Optional[Path | str] = None, print_fn: Callable[[str], None] = print,
                    on_submit: Optional[Callable[[Any, RunPlan], None]] = None, reuse_records: bool = False,
                    **res_flags: Any) -> Dict[str, Any]:
    """Submit every pending (row, seed) of ``name`` at ``scale`` as a submitit job.

    ``cluster``: None = submitit's choice (Slurm where available, else local), "slurm", "local" or
    "debug".  ``wait``: block until the jobs end, then :func:`collect`.  ``on_submit(job, plan)``: a
    hook for tests (e.g. to interrupt a job).  ``reuse_records``: committed records of the current
    code count as finished (as ``run --reuse-records``).  Returns {"planned", "submitted", "skipped", "active",
    "jobs": [(label, job_id)], "failed", "plan": [printable lines]}."""
    from ablations.runner import _job, finished_keys, plan_runs

    spec = load_spec(name)
    sc = get_scale(scale)
    out = Path(out)
    res = resources(sc, **res_flags)
    plans = plan_runs(spec, sc, seeds, data, val_data, runs_root, rows)
    summary: Dict[str, Any] = {"planned": len(plans), "submitted": 0, "skipped": 0, "active": 0, "jobs": [],
                               "failed": [], "plan": [], "resources": res}
    if not dry_run:
        collect(name, scale, seeds, data, val_data, out, runs_root, rows, render=False, print_fn=print_fn)
    done = finished_keys(runs_path(out, spec.name), reuse_records)
    active = {} if dry_run else _active_jobs(out, spec.name)
    pending = []
    for p in plans:
        if p.key in done:
            summary["skipped"] += 1
        elif str(p.run_dir) in active:
            summary["active"] += 1
            print_fn(f"{p.label}: job {active[str(p.run_dir)]['job_id']} is {active[str(p.run_dir)]['state']}; "
                     f"not submitted again")
        else:
            pending.append(p)
    res_txt = ", ".join(f"{k}={v}" for k, v in res.items())
    print_fn(f"ablation {spec.name} ({table_label(spec)}) at scale {sc.name} through submitit: {len(plans)} runs, "
             f"{summary['skipped']} recorded, {summary['active']} queued or running, {len(pending)} to submit; "
             f"per job: {res_txt}")
    for i, p in enumerate(pending, 1):
        line = f"[{i}/{len(pending)}] {p.label}: job into {p.run_dir} ({p.cfg.solver.max_iters} iterations, " \
               f"config {p.config_hash}, code {p.fingerprint})"
        summary["plan"].append(line)
        if dry_run:
            print_fn(line)
    if dry_run or not pending:
        if not dry_run and wait:
            return {**summary, **collect(name, scale, seeds, data, val_data, out, runs_root, rows, print_fn=print_fn)}
        return summary
    submitit = _submitit()
    folder = Path(folder or Path(runs_root) / "submitit" / spec.name / sc.name)
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    ex.update_parameters(name=f"m2f-{spec.name}", **res)
    kind = ex.cluster
    threads = int(res.get("cpus_per_task") or 1)
    jobs = []
    for p in pending:
        # every job counts its FLOPs (seconds): jobs finish and are collected in any order
        job = _job(p, sc, device, threads, need_flops=True, proposals=spec.evaluate_proposals, isolated=True)
        j = ex.submit(AblationJob(), job)
        jobs.append((p, j))
        append_jsonl(out / spec.name / JOBS_FILE, {
            "run_dir": str(p.run_dir), "row": p.row.name, "seed": p.seed, "scale": sc.name,
            "config_hash": p.config_hash, "code_fingerprint": p.fingerprint, "job_id": str(j.job_id),
            "cluster": kind, "folder": str(folder), "parent_pid": os.getpid(),
            "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        summary["jobs"].append((p.label, str(j.job_id)))
        summary["submitted"] += 1
        print_fn(f"submitted {p.label} as {kind} job {j.job_id}")
        if on_submit is not None:
            on_submit(j, p)
    if not wait:
        print_fn(f"{len(jobs)} job(s) submitted (logs in {folder}); when they finish: "
                 f"python -m ablations collect {spec.name} --scale {sc.name}" + (f" --seeds {seeds}" if seeds else ""))
        return summary
    for p, j in jobs:
        try:
            j.result()
        except Exception as e:  # noqa: BLE001 -- a failed job is reported, not recorded
            summary["failed"].append((p.label, f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"))
            append_jsonl(out / spec.name / "failures.jsonl", {
                "row": p.row.name, "seed": p.seed, "scale": p.scale, "config_hash": p.config_hash,
                "job_id": str(j.job_id), "error": f"{type(e).__name__}: {e}"[:2000],
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            print_fn(f"FAILED {p.label} (job {j.job_id}): {summary['failed'][-1][1]}")
    got = collect(name, scale, seeds, data, val_data, out, runs_root, rows, print_fn=print_fn)
    summary.update({k: got[k] for k in ("added", "waiting", "table")})
    return summary
