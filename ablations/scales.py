"""Scales an ablation runs at: ``smoke`` | ``quick`` | ``cpu`` (default) | ``paper``.  ALL the knobs live here.

- ``smoke``: seconds-to-minutes pipeline check (tiny model, 16 synthetic 64 px images, 10 iterations,
  1 seed).  Numbers mean nothing; it proves the whole path (train -> eval -> record -> table -> plot).
- ``quick``: a first look, the former cpu scale: the ``tiny`` preset on the embedded synthetic data
  (128 px), 400 iterations, 2 seeds.  Objects are barely learned at 400 iterations (PQ_th 0-19 over
  the 84 records of the earlier tables), so its verdicts measure how early thing detection starts.
- ``cpu``: the calibrated CPU proxy (:data:`CPU_OVERRIDES`): the ``tiny`` preset, 1000 iterations,
  1024 points per mask in the matcher and the loss, an evaluation every 125 iterations (8 points on
  the convergence plot), :data:`CPU_SEEDS` = 5 paired seeds.
- ``paper``: the spec's paper preset with its full schedule on COCO, launched through ``torchrun``
  (``--dry-run`` prints the exact command per run instead of running it).

How the cpu recipe was chosen (``python -m ablations calibrate`` regenerates the evidence:
reports/calibration/README.md, with the table, the plot, the machine and the command):
- Iterations: 1000.  The calibration trains the base model and Table 4a's two variants with 3 seeds
  up to that schedule and evaluates every 125 iterations; the figures it reports (PQ_th, AP and the
  seed spread against iterations) are in reports/calibration/README.md.  At 1000 iterations the
  targets (base PQ_th >= 40, mask AP >= 25) are NOT reached (stated there, from the records).
- The candidate 2000 iterations (``python -m ablations calibrate --iters 2000``, the tiny preset's own
  schedule; reports/calibration/cpu-2000it/README.md, 3 seeds, an evaluation every 250): how close
  it gets to the targets is stated there.  Both schedules show the same thing: most of the late gain
  comes in the ~100-200 iterations after the first lr step (at 0.9 of the schedule), so a schedule
  with earlier steps may reach the targets in fewer iterations; not yet tried.  The cpu recipe stays
  at 1000 iterations for now: every committed cpu table ran it, and a recipe change retrains them
  all, so it should move together with the next change of the code fingerprint (which retrains
  them anyway) and with the flagship's time budget in view (2000 iterations double it).
- Points: 1024 per mask (loss.num_points) instead of the preset's 3136.  Mask logits are 32 x 32 at
  128 px, so 1024 points already cover as many positions as the logits have (the paper's 12544 points
  are 19% of its 256 x 256 mask logits); the matcher and the point loss are the step's largest
  parts at this size (python -m m2f.bench profile), and the step runs about 1.2x faster
  (python -m m2f.bench trees --base . --set loss.num_points=1024).
- lr 3e-4, warmup 50, batch 4, 128 px, 50 queries, the 400 + 100 synthetic images: the tiny preset's,
  unchanged (no budget to calibrate them; small objects stay in the data, which Table 4a's
  high-resolution row depends on).
- Seeds: 5, paired (each row runs the base row's seeds: same data order, augmentation and
  initialisation of the shared parts), so a Δ has a Student-t interval with 4 degrees of freedom.

Time: the per-iteration cost is measured, not assumed: the runner prints s/it and an ETA for the
whole ablation; reports/bench/ holds ``python -m m2f.bench trees`` (this code vs the commit before
the speed work, on the machine named there).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

from m2f.errors import InputError

# Seconds per iteration / per evaluation used for the ETA printed BEFORE the first run finishes (the
# runner then extrapolates from the runs' own progress).  Measured (training seconds / iterations of
# the cpu-scale records, evaluations included, two runs side by side, one thread each, on 2-core
# machines): AMD EPYC with AVX-512, 0.83 s/it median over 15 runs (14.2 min per run); Intel Xeon with
# AVX-512 + AMX, 0.72 s/it over 7 runs on 2026-12-03 (11-15 min per run) but 1.16 s/it over 18 runs on
# 2026-12-02 (a busier host with the same CPU name).  The AVX2-only EPYC has no cpu-scale record; the
# trees benchmark projects it at 1.76x the AMD figure (reports/calibration/README.md).
CPU_SECONDS_PER_ITER = 0.8
CPU_SECONDS_PER_EVAL = 9.0
CPU_ITERS = 1000
CPU_SEEDS = 5
CPU_EVAL_PERIOD = 125  # 8 evaluations per run (the last one is the final eval)
CPU_EVAL_LIMIT = 100  # val images per evaluation (the synthetic val split has 100)
CPU_JOBS = 2
CPU_NUM_POINTS = 1024
CALIBRATION_SEEDS = 3

QUICK_ITERS = 400
QUICK_SEEDS = 2
QUICK_EVAL_PERIOD = 200


@dataclass(frozen=True)
class Scale:
    name: str
    description: str
    # Preset to start from; None = the spec's paper_preset.
    preset: Optional[str]
    # Dotted overrides applied after the preset and BEFORE the row's overrides (a row wins).
    overrides: Dict[str, Any]
    seeds: Optional[int]  # default number of seeds; None = all of the spec's seeds
    jobs: int  # runs in parallel (local launcher)
    eval_limit: Optional[int]  # val images per evaluation; None = all
    flops_size: Tuple[int, int]  # H, W at which FLOPs are counted
    launcher: str = "local"  # "local" (process pool) or "torchrun"
    # Side of the square image at which specs with a memory_GB column measure training memory per
    # image (m2f.bench.memory.probe_memory: one step, batch 1, in a fresh process); None = no probe.
    memory_size: Optional[int] = None
    seconds_per_iter: float = 1.0  # ETA before the first run finishes
    seconds_per_eval: float = 10.0
    torchrun_args: Tuple[str, ...] = field(default=())
    # Per-job resources under --launcher submitit (ablations/submitit_launcher.py): nodes,
    # gpus_per_node (one task per GPU), timeout_min, cpus_per_task, mem_gb.
    slurm: Dict[str, Any] = field(default_factory=dict)


SMOKE_OVERRIDES: Dict[str, Any] = {
    "data.synth_images": 16,
    "data.synth_val_images": 8,
    "data.synth_size": 64,
    "data.image_size": 64,
    "loss.num_points": 1024,
    "solver.max_iters": 10,
    "solver.batch_size": 2,
    "solver.warmup_iters": 2,
    "solver.eval_period": 5,
    "solver.checkpoint_period": 5,
    "solver.log_period": 1,
}

CPU_OVERRIDES: Dict[str, Any] = {
    "solver.max_iters": CPU_ITERS,
    "solver.eval_period": CPU_EVAL_PERIOD,
    "loss.num_points": CPU_NUM_POINTS,
    "solver.checkpoint_period": 125,
    "solver.log_period": 10,
}

QUICK_OVERRIDES: Dict[str, Any] = {
    "solver.max_iters": QUICK_ITERS,
    "solver.eval_period": QUICK_EVAL_PERIOD,
    "solver.checkpoint_period": 100,
    "solver.log_period": 10,
}

# COCO panoptic (registered dataset names of m2f.data.catalog); full schedule of the paper preset.
PAPER_OVERRIDES: Dict[str, Any] = {
    "data.train": "coco_2017_train_panoptic",
    "data.val": "coco_2017_val_panoptic",
}

SCALES: Dict[str, Scale] = {
    "smoke": Scale("smoke", "tiny preset, 16 synthetic 64px images, 10 iterations (pipeline check only)",
                   "tiny", SMOKE_OVERRIDES, seeds=1, jobs=2, eval_limit=8, flops_size=(64, 64),
                   memory_size=64, seconds_per_iter=0.3, seconds_per_eval=3.0,
                   slurm={"nodes": 1, "gpus_per_node": 0, "timeout_min": 15, "cpus_per_task": 1, "mem_gb": 8}),
    "quick": Scale("quick", f"tiny preset, embedded synthetic data (128px), {QUICK_ITERS} iterations, "
                   f"{QUICK_SEEDS} seeds (a first look)", "tiny", QUICK_OVERRIDES, seeds=QUICK_SEEDS, jobs=CPU_JOBS,
                   eval_limit=CPU_EVAL_LIMIT, flops_size=(128, 128), memory_size=1024, seconds_per_iter=1.0,
                   seconds_per_eval=CPU_SECONDS_PER_EVAL,
                   slurm={"nodes": 1, "gpus_per_node": 0, "timeout_min": 60, "cpus_per_task": 1, "mem_gb": 8}),
    "cpu": Scale("cpu", f"tiny preset, embedded synthetic data (128px), {CPU_ITERS} iterations, "
                 f"{CPU_NUM_POINTS} points per mask, {CPU_SEEDS} paired seeds (the calibrated CPU proxy)",
                 "tiny", CPU_OVERRIDES, seeds=CPU_SEEDS, jobs=CPU_JOBS, eval_limit=CPU_EVAL_LIMIT,
                 flops_size=(128, 128), memory_size=1024, seconds_per_iter=CPU_SECONDS_PER_ITER,
                 seconds_per_eval=CPU_SECONDS_PER_EVAL,
                 slurm={"nodes": 1, "gpus_per_node": 0, "timeout_min": 60, "cpus_per_task": 1, "mem_gb": 8}),
    "paper": Scale("paper", "the paper preset's full schedule on COCO 2017 panoptic, through torchrun",
                   None, PAPER_OVERRIDES, seeds=1, jobs=1, eval_limit=None, flops_size=(800, 1216), memory_size=1024,
                   launcher="torchrun", seconds_per_iter=0.5, seconds_per_eval=600.0,
                   torchrun_args=("--standalone", "--nproc_per_node=8"),
                   # the official schedule: about 2-3 days on 8 V100s per run; Slurm requeues a job past
                   # its limit and the run resumes from its checkpoint
                   slurm={"nodes": 1, "gpus_per_node": 8, "timeout_min": 72 * 60, "cpus_per_task": 10,
                          "mem_gb": 480}),
}


def cpu_candidate(iters: int) -> Scale:
    """The cpu recipe with another schedule length, for calibration (``python -m ablations calibrate
    --iters N``): scale ``cpu-<N>it``, everything else the cpu scale's, an evaluation every N/8
    iterations rounded up to a multiple of 125 (at least 6 points, at most 250 iterations apart
    up to N = 2000).  Its records are kept apart from the tables' (reports/calibration/cpu-<N>it/)."""
    import math

    if iters < 125:
        raise InputError(f"--iters {iters}: expected at least 125 iterations")
    base = SCALES["cpu"]
    period = 125 * math.ceil(iters / 8 / 125)
    ov = {**base.overrides, "solver.max_iters": iters, "solver.eval_period": period, "solver.checkpoint_period": period}
    return replace(base, name=f"cpu-{iters}it", overrides=ov,
                   description=f"the cpu recipe at {iters} iterations (a calibration candidate)")


def get_scale(name: str) -> Scale:
    m = re.fullmatch(r"cpu-(\d+)it", name)
    if m:
        return cpu_candidate(int(m.group(1)))
    if name not in SCALES:
        raise InputError(f"--scale {name!r}: valid choices: {sorted(SCALES)} (or cpu-<N>it, a calibration candidate)")
    return SCALES[name]
