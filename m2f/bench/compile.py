"""Does ``torch.compile`` pay off for the training step?  ``python -m m2f.bench compile``.

One process, one preset: the eager training step (forward, the m2f criterion, backward, AdamW) with
each GEMM backend, then the same step with the model wrapped in ``torch.compile`` (default
inductor): the first compiled step's wall time (compilation included), the next one, and the
steady compiled step (median of ``--iters``), with inductor's caches disabled (a cold compile, as on
a fresh machine; a warm cache cut it from ~100 s to ~8 s here).  The criterion stays eager (the matcher's Hungarian
assignment is data-dependent host code).  From those: the compile cost and the run length at
which compiling pays off, ``compile_s / (eager_s - compiled_s)`` iterations, or "never" when the
compiled step is not faster.  A backend that cannot be compiled (oneDNN's linear op wants its
weight as a graph constant under inductor) is recorded with its error instead of a time.

Numbers depend on the machine and its load: run it alone (not beside training), one thread.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, Sequence


def add_args(p) -> None:
    p.add_argument("--preset", default="tiny", help="config preset (default tiny)")
    p.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--size", type=int, default=128, help="square image size (default 128)")
    p.add_argument("--iters", type=int, default=5, help="timed steps per variant (median; default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--backends", default="reference,auto", help="gemm backends to compare (default reference,auto)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="config override (repeatable), e.g. loss.num_points=1024")
    p.add_argument("--out", default="reports/bench", help="output folder (JSON + README.md)")
    p.add_argument("--name", default=None, help="result file stem (default compile_<preset>_cpu_<size>)")


def _median_step(step, iters: int) -> float:
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_compile(preset: str, batch: int, size: int, iters: int, backends: Sequence[str],
                overrides: Sequence[str] = ()) -> Dict[str, Any]:
    import torch
    import torch._inductor.config as inductor_config

    from m2f.bench.common import environment, synthetic_targets

    # a cold compile, as a fresh machine pays it: no FX graph / autotuning cache from an earlier run
    inductor_config.force_disable_caches = True
    from m2f.config import get_preset
    from m2f.loss import build_criterion
    from m2f.models.build import build_model

    res: Dict[str, Any] = {"kind": "compile", "preset": preset, "batch": batch, "size": size, "iters": iters,
                           "overrides": list(overrides), "environment": environment("cpu"), "variants": {},
                           "step": "forward + m2f criterion + backward + AdamW step (model compiled, criterion eager)",
                           "compile_cache": "disabled (torch._inductor.config.force_disable_caches): a cold compile"}
    for backend in backends:
        cfg = get_preset(preset, [*overrides, f"gemm_backend={backend}"])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        crit = build_criterion(cfg.loss, cfg.num_classes)
        xb = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        tg = [synthetic_targets(20, cfg.num_classes, size, size, "cpu", seed=i) for i in range(batch)]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(m):
            torch.manual_seed(0)  # the same point draws every step
            loss = sum(crit(m(xb), tg).values())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        step(model)
        eager = _median_step(lambda: step(model), iters)
        v: Dict[str, Any] = {"eager_s": eager}
        torch._dynamo.reset()
        compiled = torch.compile(model)
        try:
            t0 = time.perf_counter()
            step(compiled)
            v["first_compiled_step_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            step(compiled)
            v["second_compiled_step_s"] = time.perf_counter() - t0
            v["compiled_s"] = _median_step(lambda: step(compiled), iters)
            v["compile_s"] = v["first_compiled_step_s"] - v["compiled_s"]
            gain = eager - v["compiled_s"]
            v["speedup"] = eager / v["compiled_s"]
            v["break_even_iters"] = v["compile_s"] / gain if gain > 0 else None
        except Exception as e:  # noqa: BLE001 - recorded: this backend does not compile here
            v["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        torch._dynamo.reset()
        res["variants"][backend] = v
        msg = (f"gemm_backend={backend}: eager {eager:.3f} s/step; " +
               (f"compiled: error {v['error']}" if "error" in v else
                f"compiled {v['compiled_s']:.3f} s/step ({v['speedup']:.2f}x), compile {v['compile_s']:.0f} s, pays off "
                + (f"after {v['break_even_iters']:.0f} iterations" if v["break_even_iters"] else "never")))
        print(msg, flush=True)
    return res
