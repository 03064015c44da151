"""Training speed of this tree against another commit's, side by side on one machine:
``python -m m2f.bench trees --base DIR`` (DIR: a git worktree of the commit to compare with, e.g.
``git worktree add --detach ../m2f-base 1ed9e8d``).

Each run is a real ``m2f.train.train`` of the preset (data loading, matcher, loss, backward,
optimizer, logging) in its own process, with that tree on PYTHONPATH (benchmarks/train_worker.py),
one thread.  Two arrangements, ``--rounds`` times each, alternating which tree starts:
- ``alone``: one run at a time, base then this tree (or the reverse);
- ``side_by_side``: the two trees at once, one per core, as the ablation runner runs two runs.
Per run: the median seconds per iteration after ``--warmup`` iterations.  Also recorded: the loss of
every iteration of both trees, their largest relative difference, and at ``--iters`` (the check
that the function is unchanged), and the process's user/system CPU time.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence

from m2f.errors import InputError
from m2f.provenance import environment, git_commit

WORKER = Path(__file__).resolve().parents[2] / "benchmarks" / "train_worker.py"


def add_args(p) -> None:
    p.add_argument("--base", required=True, help="folder of the other tree (a git worktree of the base commit)")
    p.add_argument("--preset", default="tiny", help="config preset (default tiny)")
    p.add_argument("--iters", type=int, default=50, help="training iterations per run (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="iterations left out of the timing (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="repetitions of each arrangement (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="config override for this tree's runs only (repeatable)")
    p.add_argument("--base-set", dest="base_overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="config override for the base tree's runs only (repeatable)")
    p.add_argument("--out", default="reports/bench", help="output folder (JSON + README.md)")
    p.add_argument("--name", default=None, help="result file stem (default trees_<preset>_<base commit>)")
    p.add_argument("--env", dest="env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for both trees' processes (repeatable), e.g. ATEN_CPU_CAPABILITY=avx2")


def _start(tree: Path, spec: Dict[str, Any], env_extra: Dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env_extra}
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps({**spec, "tree": str(tree)})], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tree))


def _finish(p: subprocess.Popen, label: str, warmup: int) -> Dict[str, Any]:
    out, err = p.communicate()
    if p.returncode:
        raise RuntimeError(f"{label} run failed (exit {p.returncode}): {err.strip()[-800:]}")
    r = json.loads(out.strip().splitlines()[-1])
    t = [s[0] for s in r["stamps"]]
    dts = [b - a for a, b in zip(t, t[1:])][warmup:]
    return {"s_per_iter": statistics.median(dts), "losses": [s[2] for s in r["stamps"]],
            "iters": [s[1] for s in r["stamps"]], "user_s": r["user_s"], "system_s": r["system_s"],
            "wall_s": r["wall_s"]}


def run_trees(base: Path, preset: str, iters: int, warmup: int, rounds: int, overrides: Sequence[str] = (),
              base_overrides: Sequence[str] = (), env_extra: Dict[str, str] | None = None) -> Dict[str, Any]:
    here = Path(__file__).resolve().parents[2]
    base = base.resolve()
    if not (base / "m2f" / "train.py").is_file():
        raise InputError(f"--base {base}: expected a tree of this project (no m2f/train.py there)")
    if iters <= warmup + 2:
        raise InputError(f"--iters {iters}: expected more than --warmup + 2 = {warmup + 2}")
    env_extra = dict(env_extra or {})
    trees = {"base": (base, list(base_overrides)), "this": (here, list(overrides))}
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {"alone": {"base": [], "this": []},
                                                        "side_by_side": {"base": [], "this": []}}
    with tempfile.TemporaryDirectory() as tmp:
        k = 0

        def spec(label):
            nonlocal k
            k += 1
            tree, ov = trees[label]
            return tree, {"preset": preset, "iters": iters, "overrides": ov, "out": f"{tmp}/run{k}"}

        for r in range(rounds):
            order = ["base", "this"] if r % 2 == 0 else ["this", "base"]
            for label in order:
                tree, s = spec(label)
                runs["alone"][label].append(_finish(_start(tree, s, env_extra), label, warmup))
                print(f"round {r + 1} alone {label}: {runs['alone'][label][-1]['s_per_iter']:.3f} s/it", flush=True)
            procs = {label: _start(*spec(label), env_extra) for label in order}
            for label, p in procs.items():
                runs["side_by_side"][label].append(_finish(p, label, warmup))
            print(f"round {r + 1} side by side: base {runs['side_by_side']['base'][-1]['s_per_iter']:.3f}, "
                  f"this {runs['side_by_side']['this'][-1]['s_per_iter']:.3f} s/it", flush=True)
    summary = {}
    for arr, by in runs.items():
        b = statistics.median(x["s_per_iter"] for x in by["base"])
        t = statistics.median(x["s_per_iter"] for x in by["this"])
        summary[arr] = {"base_s_per_iter": b, "this_s_per_iter": t, "speedup": b / t}
    lb, lt = runs["alone"]["base"][0]["losses"], runs["alone"]["this"][0]["losses"]
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(lb, lt)]
    res = {"kind": "trees", "preset": preset, "iters": iters, "warmup": warmup, "rounds": rounds,
           "overrides": list(overrides), "base_overrides": list(base_overrides), "env_extra": env_extra,
           "base": {"path": str(base), "commit": git_commit(base)}, "this": {"commit": git_commit(here)},
           "environment": environment("cpu"), "threads_per_run": 1, "summary": summary,
           "loss_check": {"loss_at_last_iter": {"base": lb[-1], "this": lt[-1]},
                          "rel_diff_at_last_iter": rel[-1], "max_rel_diff": max(rel),
                          "bit_identical": lb == lt,
                          "deterministic_within_tree": all(x["losses"] == lt for arr in runs.values()
                                                           for x in arr["this"])},
           "cpu_time_s": {label: {"user": statistics.median(x["user_s"] for x in runs["alone"][label]),
                                  "system": statistics.median(x["system_s"] for x in runs["alone"][label])}
                          for label in trees},
           "runs": {arr: {label: [{k: v for k, v in x.items() if k not in ("losses", "iters")} for x in xs]
                          for label, xs in by.items()} for arr, by in runs.items()},
           "losses": {"base": lb, "this": lt}}
    for arr, s in summary.items():
        print(f"{arr}: base {s['base_s_per_iter']:.3f} s/it, this {s['this_s_per_iter']:.3f} s/it -> "
              f"{s['speedup']:.2f}x", flush=True)
    print(f"loss at iteration {iters}: base {lb[-1]:.6f}, this {lt[-1]:.6f} (rel diff {rel[-1]:.1e})", flush=True)
    return res
