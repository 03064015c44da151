"""One timed training run of the tree on PYTHONPATH (used by ``python -m m2f.bench trees``).

    PYTHONPATH=TREE python benchmarks/train_worker.py '{"preset": "tiny", "iters": 50, "overrides": [], "out": "DIR"}'

Imports only ``m2f.config.get_preset`` and ``m2f.train.train``, which every commit being compared
has, trains ``iters`` iterations with a log line per iteration, and prints one JSON line: the time
stamp and loss of every iteration, and which m2f was imported.
"""
import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    import m2f
    from m2f.config import get_preset
    from m2f.train import train

    tree = os.path.realpath(spec["tree"])
    if not os.path.realpath(m2f.__file__).startswith(tree + os.sep):
        raise SystemExit(f"train_worker: imported m2f from {m2f.__file__}, expected it under {tree}")
    n = int(spec["iters"])
    cfg = get_preset(spec["preset"], list(spec.get("overrides", [])) +
                     ["solver.log_period=1", "solver.eval_period=0", f"solver.checkpoint_period={10 * n}"])
    stamps = []

    def log(rec):
        if "loss" in rec and "iter" in rec:
            stamps.append((time.perf_counter(), int(rec["iter"]), float(rec["loss"])))

    t0 = time.perf_counter()
    train(cfg, spec["out"], progress=False, evaluate_at_end=False, stop_after=n, log_fn=log)
    cpu = os.times()
    print(json.dumps({"t0": t0, "stamps": stamps, "m2f_file": m2f.__file__, "wall_s": time.perf_counter() - t0,
                      "user_s": cpu.user, "system_s": cpu.system}))


if __name__ == "__main__":
    main()
