"""Scales an ablation runs at: ``smoke`` | ``cpu`` (default) | ``paper``.  ALL the knobs live here.

- ``smoke``: seconds-to-minutes pipeline check (tiny model, 16 synthetic 64 px images, 10 iterations,
  1 seed).  Numbers mean nothing; it proves the whole path (train -> eval -> record -> table -> plot).
- ``cpu``: the ``tiny`` preset on the embedded synthetic data (128 px), sized so that
  ``nox -s ablation_masked_attention`` (3 rows) finishes within ~20 minutes on a 2-core CPU with
  2 parallel single-thread runs.  See ``CPU_SECONDS_PER_ITER`` for the measurement it is derived from.
- ``paper``: the spec's paper preset with its full schedule on COCO, launched through ``torchrun``
  (``--dry-run`` prints the exact command per run instead of running it).

To retune the CPU scale, change ``CPU_ITERS`` / ``CPU_SEEDS`` / ``CPU_EVAL_PERIOD`` below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from m2f.errors import InputError

# --------------------------------------------------------------------------------------------
# CPU scale budget.
# Measured on the 2-core machine, ONE torch thread per run: the tiny preset (ResNet-18, hidden 128,
# 50 queries, 9 decoder layers, 3 MSDeformAttn encoder layers) at batch 4 x 128 px:
#   - model forward + backward + AdamW, two runs side by side: 0.53 s/iteration;
#   - one full iteration in one process (machine load ~4 from other jobs): data 0.01 + forward 0.17 +
#     set criterion 0.16 + backward 0.28 = 0.62 s;
#   - an evaluation of 100 val images (panoptic + instance + semantic): 8.5 s.
# Two runs under heavy outside load measured 2.0 s/iteration: re-measure on an idle machine from the
# "s/it" the runner logs, and retune CPU_ITERS so that the budget below holds.
# Budget for masked_attention (3 rows x CPU_SEEDS seeds = 6 runs, CPU_JOBS = 2 -> 3 rounds):
#   3 x (CPU_ITERS x 0.75 + (CPU_ITERS / CPU_EVAL_PERIOD) x 10 + ~15 s start-up and FLOPs)
#   = 3 x (300 + 20 + 15) s = 17 min  (<= 20 min)
# --------------------------------------------------------------------------------------------
CPU_SECONDS_PER_ITER = 0.75
CPU_SECONDS_PER_EVAL = 10.0
CPU_ITERS = 400
CPU_SEEDS = 2
CPU_EVAL_PERIOD = 200  # periodic evals for the convergence plot (the last one is the final eval)
CPU_EVAL_LIMIT = 100  # val images per evaluation (the synthetic val split has 100)
CPU_JOBS = 2


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
                   memory_size=64, seconds_per_iter=0.3, seconds_per_eval=3.0),
    "cpu": Scale("cpu", f"tiny preset, embedded synthetic data (128px), {CPU_ITERS} iterations",
                 "tiny", CPU_OVERRIDES, seeds=CPU_SEEDS, jobs=CPU_JOBS, eval_limit=CPU_EVAL_LIMIT,
                 flops_size=(128, 128), memory_size=1024, seconds_per_iter=CPU_SECONDS_PER_ITER,
                 seconds_per_eval=CPU_SECONDS_PER_EVAL),
    "paper": Scale("paper", "the paper preset's full schedule on COCO 2017 panoptic, through torchrun",
                   None, PAPER_OVERRIDES, seeds=1, jobs=1, eval_limit=None, flops_size=(800, 1216), memory_size=1024,
                   launcher="torchrun", seconds_per_iter=0.5, seconds_per_eval=600.0,
                   torchrun_args=("--standalone", "--nproc_per_node=8")),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise InputError(f"--scale {name!r}: valid choices: {sorted(SCALES)}")
    return SCALES[name]
