"""nox sessions: thin wrappers over the CLIs (``python -m ablations ...``, ``python -m m2f.bench ...``).

Every session runs in the CURRENT environment (``venv_backend="none"``): no fresh torch install.
Arguments after ``--`` pass through, e.g.::

    nox -s ablation_masked_attention                       # cpu scale (time: README, Set up)
    nox -s ablation_masked_attention -- --scale smoke      # minutes, pipeline check
    nox -s ablation_point_loss -- --seeds 3 --device cuda
    nox -s ablation_queries -- --scale paper --dry-run     # print the torchrun commands
    nox -s ablation_all                                    # every table (shared base runs train once)
    nox -s ablation_core                                   # Tables 4a, 4c, 4d, 5 (4a first: shared runs)
    nox -s report                                          # re-render every table, no training
"""
import sys

import nox

nox.options.sessions = ["tests"]
PY = sys.executable

ABLATIONS = {
    "ablation_masked_attention": "masked_attention",  # Table 4a
    "ablation_optimization": "optimization",  # Table 4b
    "ablation_cross_attention": "cross_attention",  # Table 4c
    "ablation_feature_resolution": "feature_resolution",  # Table 4d
    "ablation_pixel_decoder": "pixel_decoder",  # Table 4e
    "ablation_point_loss": "point_loss",  # Table 5
    "ablation_queries": "queries",  # Table 11a
    "ablation_query_init": "query_init",  # Table 11b
    "proposals": "proposals",  # Figure 3
    "task_transfer": "task_transfer",  # Table 7
}


def _ablation_session(session_name: str, ablation: str):
    def session(s: nox.Session) -> None:
        s.run(PY, "-m", "ablations", "run", ablation, *s.posargs, external=True)

    session.__doc__ = f"python -m ablations run {ablation} [args after --]"
    session.__name__ = session_name
    return nox.session(name=session_name, venv_backend="none")(session)


for _name, _ablation in ABLATIONS.items():
    globals()[_name] = _ablation_session(_name, _ablation)


@nox.session(name="ablation_all", venv_backend="none")
def ablation_all(s: nox.Session) -> None:
    """Every ablation in turn (args after -- go to each); runs identical across tables train once."""
    for ablation in ABLATIONS.values():
        s.run(PY, "-m", "ablations", "run", ablation, *s.posargs, external=True)


# Tables 4a, 4c, 4d and 5, in the order that trains every shared run once: 4a's rows are 4c's
# cross-attention / masked attention, 4d's 1/32 / efficient multi-scale and 5's point->point.
CORE_TABLES = ("masked_attention", "cross_attention", "feature_resolution", "point_loss")


@nox.session(name="ablation_core", venv_backend="none")
def ablation_core(s: nox.Session) -> None:
    """Tables 4a, 4c, 4d, 5 in turn (args after -- go to each); 4a first, so the others share its runs."""
    for ablation in CORE_TABLES:
        s.run(PY, "-m", "ablations", "run", ablation, *s.posargs, external=True)


@nox.session(venv_backend="none")
def calibrate(s: nox.Session) -> None:
    """The cpu recipe's evidence (python -m ablations calibrate): Table 4a's rows x 3 seeds -> reports/calibration/."""
    s.run(PY, "-m", "ablations", "calibrate", *s.posargs, external=True)


@nox.session(venv_backend="none")
def bench_trees(s: nox.Session) -> None:
    """Training speed of this tree vs another commit's worktree (python -m m2f.bench trees --base DIR)."""
    s.run(PY, "-m", "m2f.bench", "trees", *s.posargs, external=True)


@nox.session(venv_backend="none")
def report(s: nox.Session) -> None:
    """Re-render every ablation table and reports/README-tables.md from stored runs (no training)."""
    s.run(PY, "-m", "ablations", "report", *s.posargs, external=True)


@nox.session(venv_backend="none")
def tests(s: nox.Session) -> None:
    """The test suite (pytest; args after -- go to pytest)."""
    s.run(PY, "-m", "pytest", "-q", *(s.posargs or ["tests"]), external=True)


@nox.session(venv_backend="none")
def bench_memory(s: nox.Session) -> None:
    """Training memory per configuration: python -m m2f.bench memory."""
    s.run(PY, "-m", "m2f.bench", "memory", *s.posargs, external=True)


@nox.session(venv_backend="none")
def bench_speed(s: nox.Session) -> None:
    """Inference / training speed: python -m m2f.bench speed."""
    s.run(PY, "-m", "m2f.bench", "speed", *s.posargs, external=True)


@nox.session(venv_backend="none")
def bench_kernels(s: nox.Session) -> None:
    """Kernel benchmarks (reference vs fast) and the end-to-end pixel decoder / training-step speed-up:
    python -m m2f.bench kernels --end-to-end (args after -- replace the default)."""
    s.run(PY, "-m", "m2f.bench", "kernels", *(s.posargs or ["--end-to-end"]), external=True)


@nox.session(name="bench_gemm", venv_backend="none")
def bench_gemm(s: nox.Session) -> None:
    """float32 CPU GEMMs, BLAS vs oneDNN (m2f_kernels/cpu_gemm.py), and an R50 training step per gemm_backend:
    python -m m2f.bench gemm --threads 1 --step --out reports/bench/gemm_cpu.json (args after -- replace)."""
    s.run(PY, "-m", "m2f.bench", "gemm",
          *(s.posargs or ["--threads", "1", "--step", "--out", "reports/bench/gemm_cpu.json"]), external=True)


@nox.session(name="gpu_check", venv_backend="none")
def gpu_check(s: nox.Session) -> None:
    """Every GPU test and figure in one run: benchmarks/gpu_check.sh [DEST] (default reports/bench/gpu)."""
    s.run("bash", "benchmarks/gpu_check.sh", *s.posargs, external=True)
