"""The submitit launcher (ablations/submitit_launcher.py) with submitit's local executor, at smoke
scale: jobs per (row, seed), a job interrupted mid-run and requeued resumes, records equal to the
local launcher's, collect exactly once, the dry-run plan and per-scale resources."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import submitit

from ablations import runner as ab_runner
from ablations.scales import get_scale
from ablations.submitit_launcher import AblationJob, collect, resources, submit_ablation
from m2f.checkpoint import read_jsonl
from m2f.errors import InputError

ROWS = ["full model", "- masked attention"]
# numbers that depend on the machine's speed or the process, not on what was computed
VOLATILE = {"train_images_per_s", "train_seconds", "memory_GB"}


def _by_key(records):
    return {(r["row"], r["seed"]): r for r in records}


def _submitit_tasks(pid: int) -> list:
    """The submitit task processes (``python -m submitit.core._submit``) below process ``pid`` (a
    local job's id is its controller's pid), read from /proc."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            except (OSError, ValueError, IndexError):
                continue  # the process ended while we read
            children.setdefault(ppid, []).append((int(d.name), cmd))
    found, todo = [], [pid]
    while todo:
        for child, cmd in children.get(todo.pop(), []):
            todo.append(child)
            if b"submitit.core._submit" in cmd:
                found.append(child)
    return found


def test_submitit_jobs_resume_after_interruption_and_record_as_the_local_launcher(tmp_path):
    out_l, runs_l = tmp_path / "local" / "reports", tmp_path / "local" / "runs"
    out_s, runs_s = tmp_path / "sub" / "reports", tmp_path / "sub" / "runs"
    ab_runner.run_ablation("masked_attention", scale="smoke", seeds=2, rows=ROWS, out=out_l, runs_root=runs_l,
                           inline=True, render=False, print_fn=lambda s: None)
    interrupted = {}

    def kill_first(job, plan):
        if interrupted:
            return
        ckpt = plan.run_dir / "last.pth"  # written at iteration 5 of 10 (smoke checkpoint_period)
        t0 = time.time()
        while not ckpt.exists() and time.time() - t0 < 300:
            time.sleep(0.005)
        assert ckpt.exists(), f"job {job.job_id} wrote no checkpoint: {job.stderr()}"
        # Killed mid-run, as a node failure would: the task is frozen (SIGSTOP) at once, then killed
        # (SIGKILL).  Not job.cancel(): submitit's local cancel sends SIGINT to its controller, which a
        # process started in the background of a non-interactive shell (nohup, `cmd &`) inherits as
        # ignored, and under load the 5 iterations left and the evaluation could end before it acted;
        # either way the job then did not fail (this test failed so when run from such a shell).
        tasks = _submitit_tasks(int(job.job_id))
        assert tasks, f"job {job.job_id}: no submitit task process found under it"
        for pid in tasks:
            os.kill(pid, signal.SIGSTOP)
        assert not (plan.run_dir / "ablation_result.json").exists()
        for pid in tasks:
            os.kill(pid, signal.SIGKILL)
        interrupted["plan"] = plan

    lines = []
    res = submit_ablation("masked_attention", scale="smoke", seeds=2, rows=ROWS, out=out_s, runs_root=runs_s,
                          cluster="local", wait=True, on_submit=kill_first, print_fn=lines.append)
    killed = interrupted["plan"]
    assert res["submitted"] == 4 and [f[0] for f in res["failed"]] == [killed.label] and res["added"] == 3, lines
    # the parent again (a restart): the killed run is submitted again and resumes from its checkpoint
    res2 = submit_ablation("masked_attention", scale="smoke", seeds=2, rows=ROWS, out=out_s, runs_root=runs_s,
                           cluster="local", wait=True, print_fn=lines.append)
    assert res2["submitted"] == 1 and res2["skipped"] == 3 and not res2["failed"] and res2["added"] == 1, lines
    starts = {p: len(read_jsonl(p / "starts.jsonl")) for p in (runs_s / "masked_attention" / "smoke").glob("*/*")}
    assert starts[killed.run_dir] == 2 and sorted(starts.values()) == [1, 1, 1, 2]
    resumed = [m for m in read_jsonl(killed.run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["iter"] for m in resumed] == list(range(1, 11))  # iterations after the checkpoint recomputed once
    local, sub = (_by_key(read_jsonl(o / "masked_attention" / "runs.jsonl")) for o in (out_l, out_s))
    assert set(local) == set(sub) == {(r, s) for r in ROWS for s in (0, 1)}
    for k in local:
        a, b = local[k], sub[k]
        assert a["config_hash"] == b["config_hash"] and a["code_fingerprint"] == b["code_fingerprint"]
        assert {m: v for m, v in a["metrics"].items() if m not in VOLATILE} == \
               {m: v for m, v in b["metrics"].items() if m not in VOLATILE}
        loss = [(m["iter"], m["loss"]) for m in a["metrics_over_training"] if "loss" in m]
        assert loss == [(m["iter"], m["loss"]) for m in b["metrics_over_training"] if "loss" in m]
        assert len(loss) == 10  # every iteration once, the resumed one included
    # exactly once: collecting again, or re-running the parent, records nothing more
    assert collect("masked_attention", "smoke", 2, out=out_s, runs_root=runs_s, rows=ROWS, render=False,
                   print_fn=lambda s: None)["added"] == 0
    again = submit_ablation("masked_attention", scale="smoke", seeds=2, rows=ROWS, out=out_s, runs_root=runs_s,
                            cluster="local", wait=True, print_fn=lambda s: None)
    assert again["submitted"] == 0 and again["skipped"] == 4
    assert len(read_jsonl(out_s / "masked_attention" / "runs.jsonl")) == 4
    assert (out_s / "masked_attention" / "table.md").exists()


def test_a_preempted_job_requeues_the_same_call():
    """submitit calls checkpoint() on preemption / timeout: the job is requeued with the same
    arguments (the run then resumes from its checkpoint, as above)."""
    job = {"run_dir": "/x", "config_hash": "h"}
    d = AblationJob().checkpoint(job)
    assert isinstance(d, submitit.helpers.DelayedSubmission) and d.args == (job,) and isinstance(d.function, AblationJob)


def test_dry_run_prints_the_plan_and_the_resources_per_scale(tmp_path, monkeypatch):
    lines = []
    res = submit_ablation("masked_attention", scale="paper", seeds=1, out=tmp_path, runs_root=tmp_path / "runs",
                          dry_run=True, partition="gpu", account="proj", print_fn=lines.append)
    assert res["submitted"] == 0 and len(res["plan"]) == 3
    assert res["resources"] == {"nodes": 1, "gpus_per_node": 8, "tasks_per_node": 8, "timeout_min": 4320,
                                "cpus_per_task": 10, "mem_gb": 480, "slurm_partition": "gpu", "slurm_account": "proj"}
    assert "gpus_per_node=8" in lines[0] and "368750 iterations" in lines[1]
    monkeypatch.setenv("M2F_SLURM_PARTITION", "batch")
    r = resources(get_scale("cpu"), nodes=2, gpus_per_node=4, time_min=30)
    assert r["nodes"] == 2 and r["tasks_per_node"] == 4 and r["timeout_min"] == 30 and r["slurm_partition"] == "batch"
    with pytest.raises(InputError, match="--time"):
        resources(get_scale("cpu"), time_min=0)
    assert issubclass(AblationJob, submitit.helpers.Checkpointable)


def test_cli_collect_and_launcher_flags_parse():
    from ablations.cli import build_parser

    a = build_parser().parse_args(["run", "masked_attention", "--launcher", "submitit", "--partition", "p",
                                   "--gpus-per-node", "8", "--time", "600", "--wait"])
    assert a.launcher == "submitit" and a.gpus_per_node == 8 and a.time == 600 and a.wait
    c = build_parser().parse_args(["collect", "masked_attention", "--scale", "paper"])
    assert c.fn.__name__ == "cmd_collect" and c.scale == "paper"
