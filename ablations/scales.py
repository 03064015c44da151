"""Scales an ablation runs at: ``smoke`` | ``quick`` | ``cpu`` (default) | ``paper``.  ALL the knobs live here.

- ``smoke``: seconds-to-minutes pipeline check (tiny model, 16 synthetic 64 px images, 10 iterations,
  1 seed).  Numbers mean nothing; it proves the whole path (train -> eval -> record -> table -> plot).
- ``quick``: a first look, the former cpu scale: the ``tiny`` preset on the embedded synthetic data
  (128 px), 400 iterations, 2 seeds.  Objects are barely learned at 400 iterations (PQ_th 0-19 over
  the 84 records of the earlier tables), so its verdicts measure how early thing detection starts.
- ``cpu``: the calibrated CPU proxy (:data:`CPU_OVERRIDES`): the ``tiny`` preset, 2000 iterations,
  1024 points per mask in the matcher and the loss, an evaluation every 250 iterations (8 points on
  the convergence plot), :data:`CPU_SEEDS` = 5 paired seeds.  Until 2026-12-03 it was 1000 iterations
  with an evaluation every 125: those records are ``cpu-1000it`` records now
  (:func:`recipe_scale`), rendered and labelled as such, never mixed into a 2000-iteration table.
- ``paper``: the spec's paper preset with its full schedule on COCO, launched through ``torchrun``
  (``--dry-run`` prints the exact command per run instead of running it).

How the cpu recipe was chosen (``python -m ablations calibrate [--iters N]`` regenerates the evidence:
reports/calibration/README.md for the recipe itself, reports/calibration/cpu-<N>it/README.md for each
candidate schedule, each with its table, plot, machine and command):
- Iterations: 2000, the tiny preset's own schedule (lr steps at 0.9 and 0.95 of it).  Calibrated on
  Table 4a's three rows with 3 seeds, evaluated every 250 iterations (cpu-2000it,
  reports/calibration/cpu-2000it/README.md), then with Table 4a's 5 seeds at the cpu scale
  (reports/calibration/README.md, both from ``python -m ablations calibrate``; Intel Xeon, fingerprint
  73adc66183c0): the base model ends at PQ_th 41.05 (target 40: met; seed std 0.69 over 5 seeds, where
  1000 iterations gave 3.45) and mask AP 24.77 ± 1.06 (target 25: just missed over 5 seeds, met over
  the first 3), and both Table 4a variants are below it at every evaluation from 500 iterations on,
  with intervals that exclude zero at 2000.
- 1000 iterations (cpu-1000it, the recipe before; 5 seeds, reports/calibration/cpu-1000it/README.md)
  misses both targets, and its base-model seed spread of PQ_th at the end is several times the
  2000-iteration one.  Both schedules show most of the late gain in the ~100-200 iterations after
  the first lr step (0.9 of the schedule), so a schedule with earlier steps might reach the targets
  sooner; not yet tried (each candidate costs about an hour of the 2-core machine).
- Cost: 2000 iterations double a table's time; the flagship's time against its goal is stated in
  README.md (``python -m ablations calibrate`` writes that line from the measured runs).
- The same runs serve the calibration and Table 4a: a run's identity is its config hash, seed,
  code fingerprint and val images per evaluation, not the scale's name, so ``python -m ablations run
  masked_attention --reuse-records`` records the calibration's cpu-2000it runs instead of
  retraining them.
- Points: 1024 per mask (loss.num_points) instead of the preset's 3136.  Mask logits are 32 x 32 at
  128 px, so 1024 points already cover as many positions as the logits have (the paper's 12544 points
  are 19% of its 256 x 256 mask logits); the matcher and the point loss are the step's largest
  parts at this size (python -m m2f.bench profile), and the step runs about 1.2x faster
  (python -m m2f.bench trees --base . --set loss.num_points=1024).  Table 5, whose question is the
  point loss itself, samples 196 points (the paper's 19%) in its point rows (the rows'
  ``proxy_overrides``, ablations/specs/point_loss.toml).
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

import functools
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Sequence, Tuple

from m2f.errors import InputError

# Seconds per iteration / per evaluation used for the ETA printed BEFORE the first run finishes (the
# runner then extrapolates from the runs' own progress).  Measured (training seconds / iterations of
# the cpu-scale records, evaluations included, two runs side by side, one thread each, on 2-core
# machines): AMD EPYC with AVX-512, 0.83 s/it median over 15 runs (14.2 min per run); Intel Xeon with
# AVX-512 + AMX, 0.72 s/it over 7 runs on 2026-12-03 (11-15 min per run) but 1.16 s/it over 18 runs on
# 2026-12-02 (a busier host with the same CPU name).  The AVX2-only EPYC has no cpu-scale record; the
# trees benchmark projects it at 1.76x the AMD figure.  At the 2000-iteration recipe: Intel Xeon, 0.60
# s/it over Table 4a's 15 runs on 2026-12-03 (20.1 min per run); after the 2026-12-05 speed work
# (code fingerprint fe5233d89935), Intel Xeon with AVX-512 + AMX: 0.49 s/it median (0.47-0.52) over
# Table 4a's 15 runs on 2026-12-05 (16.3 min per run with its 8 evaluations; reports/calibration/
# README.md), and about 3.0x that (1.5 s/it) projected on the AVX2-only EPYC from the commit before the
# speed work measured on both (2.0 s/it there, 0.665 here side by side: trees_tiny_1ed9e8d_xeon.json).
CPU_SECONDS_PER_ITER = 0.5
CPU_SECONDS_PER_EVAL = 9.0
CPU_ITERS = 2000
EARLIER_CPU_ITERS = 1000  # the cpu recipe until 2026-12-03 (its records are cpu-1000it records)
CPU_SEEDS = 5
CPU_EVAL_PERIOD = 250  # 8 evaluations per run (the last one is the final eval)
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
    "solver.checkpoint_period": CPU_EVAL_PERIOD,
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


def cpu_candidate(iters: int, steps: Optional[Sequence[float]] = None) -> Scale:
    """The cpu recipe with another schedule length, for calibration (``python -m ablations calibrate
    --iters N``): scale ``cpu-<N>it``, everything else the cpu scale's, an evaluation every N/8
    iterations rounded up to a multiple of 125 (at least 6 points, at most 250 iterations apart
    up to N = 2000).  Its records are kept apart from the tables' (reports/calibration/cpu-<N>it/).
    ``steps`` (``--steps 0.6,0.8``): the lr steps as fractions of N instead of the preset's; scale
    ``cpu-<N>it-steps0.6-0.8``."""
    import math

    if iters < 125:
        raise InputError(f"--iters {iters}: expected at least 125 iterations")
    base = SCALES["cpu"]
    period = 125 * math.ceil(iters / 8 / 125)
    ov = {**base.overrides, "solver.max_iters": iters, "solver.eval_period": period, "solver.checkpoint_period": period}
    name, what = f"cpu-{iters}it", ("the cpu scale's recipe until 2026-12-03, whose base model misses the "
                                     "calibration targets" if iters == EARLIER_CPU_ITERS else "a calibration candidate")
    if steps is not None:
        steps = tuple(float(x) for x in steps)
        text = ",".join(f"{x:g}" for x in steps)
        if not steps or any(not 0.0 < x < 1.0 for x in steps) or list(steps) != sorted(set(steps)):
            raise InputError(f"--steps {text}: expected increasing fractions of the schedule in (0, 1), e.g. 0.6,0.8")
        ov["solver.steps"] = steps
        name, what = name + "-steps" + text.replace(",", "-"), f"lr steps at {text} of them; a calibration candidate"
    return replace(base, name=name, overrides=ov,
                   description=f"the cpu recipe at {iters} iterations, an evaluation every {period} ({what})")


def describe(name: str) -> Optional[str]:
    """A scale's description, or None for a name that is no scale (e.g. ``cpu (earlier recipe)``)."""
    try:
        return get_scale(name).description
    except InputError:
        return None


def _dotted(cfg: Any, key: str) -> Tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return False, None
        cfg = cfg[part]
    return True, cfg


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


# The dataset is chosen per run (--data / --val-data), not by the recipe.
_NOT_RECIPE = ("data.train", "data.val")


def trained_at(record: Dict[str, Any], scale: Scale) -> bool:
    """Whether ``record`` was trained with ``scale``'s CURRENT recipe: every override of the scale
    that the record's row does not override itself has the same value in the record's config.
    Records without a config (older than configs in records) count as trained at it."""
    cfg = record.get("config")
    if not isinstance(cfg, dict):
        return True
    row = record.get("overrides") or {}
    for k, v in scale.overrides.items():
        if k in row or k in _NOT_RECIPE:
            continue
        found, have = _dotted(cfg, k)
        if found and not _same(have, v):
            return False
    return True


def recipe_scale(record: Dict[str, Any]) -> Optional[str]:
    """The scale a record counts for.  A scale's recipe can change (the cpu scale moved from 1000 to
    2000 iterations on 2026-12-03), so the name a record was written with is not enough: a record
    trained with the scale's current recipe counts for it; a cpu or cpu-<N>it record trained with
    another schedule length counts for the candidate ``cpu-<its iterations>it`` when it matches that
    recipe (the earlier 1000-iteration cpu tables are ``cpu-1000it`` tables, labelled as such);
    anything else is ``<name> (earlier recipe)``, which no table renders unless asked for by name."""
    name = record.get("scale")
    if name is None:
        return None
    try:
        sc = get_scale(name)
    except InputError:
        return name
    if trained_at(record, sc):
        return name
    if name == "cpu" or re.fullmatch(CANDIDATE_RE, name):
        iters = record.get("max_iters")
        if isinstance(iters, int) and iters >= 125:
            for cand in (_candidate_with_steps(record, iters), cpu_candidate(iters)):
                if cand is not None and trained_at(record, cand):
                    return cand.name
    return f"{name} (earlier recipe)"


@functools.lru_cache(maxsize=None)
def _preset_steps(preset: str) -> Tuple[float, ...]:
    from m2f.config import get_preset

    return tuple(get_preset(preset).solver.steps)


def _candidate_with_steps(record: Dict[str, Any], iters: int) -> Optional[Scale]:
    """The candidate with the record's lr steps, when they are not the cpu preset's own."""
    found, steps = _dotted(record.get("config"), "solver.steps")
    if not found or not steps or _same(steps, _preset_steps(SCALES["cpu"].preset)):
        return None
    try:
        return cpu_candidate(iters, steps)
    except InputError:
        return None


def is_proxy(scale: "Scale | str | None") -> bool:
    """Whether ``scale`` (a :class:`Scale`, or a scale name as records and tables carry it) is a proxy
    scale: one that starts from its own preset (the tiny one), where a row's ``proxy_overrides``
    apply.  The paper scale (``preset`` None: the spec's paper preset) is not.  The one rule that the
    runner, the records, the renderer and ``list`` share.  A name no scale answers to (e.g. ``cpu
    (earlier recipe)``) is judged by its scale part; an unknown one counts as a proxy unless it is
    "paper"."""
    if isinstance(scale, Scale):
        return scale.preset is not None
    name = str(scale or "").split(" (")[0]
    try:
        return get_scale(name).preset is not None
    except InputError:
        return name != "paper"


def scale_rank(name: Optional[str]) -> float:
    """Fidelity order for picking a table's default scale: paper > cpu > cpu-<N>it > quick > smoke."""
    rank = {"smoke": 0, "quick": 1, "cpu": 2, "paper": 3}
    if name in rank:
        return rank[name]
    if name and re.fullmatch(CANDIDATE_RE, name):
        return 1.5
    return -1


CANDIDATE_RE = r"cpu-(\d+)it(?:-steps(\d*\.?\d+(?:-\d*\.?\d+)*))?"


def get_scale(name: str) -> Scale:
    m = re.fullmatch(CANDIDATE_RE, name)
    if m:
        steps = [float(x) for x in m.group(2).split("-")] if m.group(2) else None
        return cpu_candidate(int(m.group(1)), steps)
    if name not in SCALES:
        raise InputError(f"--scale {name!r}: valid choices: {sorted(SCALES)} (or cpu-<N>it, a calibration candidate)")
    return SCALES[name]
