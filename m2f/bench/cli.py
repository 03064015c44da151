"""``python -m m2f.bench {speed,memory,profile,kernels,gemm,trees,compile,render}`` (each with ``--help``).

    python -m m2f.bench speed --preset r50_coco_panoptic --size 512 --iters 5 --out reports/bench
    python -m m2f.bench speed --preset tiny --batch 4 --size 128 --threads 1 --side-by-side
    python -m m2f.bench memory --sizes 512,1024 --device cpu --out reports/bench
    python -m m2f.bench profile --preset tiny --batch 4 --size 128
    python -m m2f.bench kernels --end-to-end
    python -m m2f.bench gemm --threads 1 --step --out reports/bench/gemm_cpu.json
    python -m m2f.bench trees --base ../m2f-base --preset tiny --iters 50
    python -m m2f.bench compile --preset tiny --batch 4 --size 128 --set loss.num_points=1024
    python -m m2f.bench render --out reports/bench

Results: ``<out>/<name>.json`` (atomic, with a ``kind`` and the environment), and ``<out>/README.md``
re-rendered from every JSON there (:mod:`m2f.bench.report`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from m2f.config import get_preset, list_presets
from m2f.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    from m2f.bench import gemm, kernels

    ap = argparse.ArgumentParser(prog="python -m m2f.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, text in (("memory", "training memory per image, paper Table 5's four loss variants"),
                       ("speed", "m2f vs HF transformers: training step and inference, interleaved"),
                       ("profile", "where one m2f training step spends its time")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--preset", default="r50_coco_panoptic", help=f"one of {list_presets()}")
        p.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
        p.add_argument("--out", default="reports/bench", help="output folder (JSON + README.md)")
        p.add_argument("--name", default=None, help="result file stem (default: kind_preset_device[_size])")
        p.add_argument("--num-masks", type=int, default=20, help="target masks per image (default 20)")
        p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                       help="config override (repeatable)")
    pm = sub.choices["memory"]
    pm.add_argument("--sizes", default="512,1024", help="comma-separated square sizes (default 512,1024)")
    pm.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant")
    ps = sub.choices["speed"]
    ps.add_argument("--size", type=int, default=512, help="square input size in pixels")
    ps.add_argument("--iters", type=int, default=5, help="interleaved repetitions (after 1 warm-up)")
    ps.add_argument("--no-flops", action="store_true", help="skip the fvcore FLOP count")
    ps.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    ps.add_argument("--no-inference", action="store_true", help="skip the inference comparison")
    ps.add_argument("--amp", action="store_true", help="both models' forwards under bf16 autocast (default fp32)")
    ps.add_argument("--side-by-side", action="store_true",
                    help="also run the training comparison as two processes at once, one thread each (as the "
                         "ablation runner runs two runs on two cores), and record both")
    for p in (ps, sub.choices["profile"]):
        p.add_argument("--batch", type=int, default=1, help="images per training step (default 1)")
    pp = sub.choices["profile"]
    pp.add_argument("--size", type=int, default=512, help="square input size in pixels")
    pp.add_argument("--iters", type=int, default=3, help="profiled steps (after 1 warm-up; median)")

    pk = sub.add_parser("kernels", help="deformable attention kernels: reference vs Triton, beside a bandwidth bound",
                        description=kernels.__doc__.split("\n\n")[0])
    kernels.add_args(pk)
    pg = sub.add_parser("gemm", help="float32 CPU GEMMs: BLAS vs oneDNN on the model's shapes",
                        description=gemm.__doc__.split("\n\n")[0])
    gemm.add_args(pg)
    from m2f.bench import trees

    pt = sub.add_parser("trees", help="training speed of this tree vs another commit's worktree, side by side",
                        description=trees.__doc__.split("\n\n")[0])
    trees.add_args(pt)
    from m2f.bench import compile as bench_compile

    pc = sub.add_parser("compile", help="torch.compile vs eager training step: compile time, run length to pay off",
                        description=bench_compile.__doc__.split("\n\n")[0])
    bench_compile.add_args(pc)
    pr = sub.add_parser("render", help="re-render the READMEs from the result JSONs (e.g. after copying GPU results in)")
    pr.add_argument("--out", default="reports/bench", help="folder of result JSONs")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_memory_worker"]:  # internal: one memory variant in a fresh process
        from m2f.bench.memory import memory_worker

        print(json.dumps(memory_worker(**json.loads(argv[1]))))
        return 0
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "render":
        from m2f.bench.report import refresh_reports

        refresh_reports(Path(args.out))
        print(f"rendered {Path(args.out) / 'README.md'}")
        return 0
    if args.cmd == "kernels":
        from m2f.bench import kernels

        return kernels.run_cli(kernels.finish_args(ap, args))
    if args.cmd == "trees":
        from m2f.bench.report import write_result
        from m2f.bench.trees import run_trees

        env = {}
        for kv in args.env:
            if "=" not in kv:
                raise InputError(f"--env {kv!r}: expected NAME=VALUE")
            env[kv.split("=", 1)[0]] = kv.split("=", 1)[1]
        res = run_trees(Path(args.base), args.preset, args.iters, args.warmup, args.rounds, args.overrides,
                        args.base_overrides, env)
        base = (res["base"]["commit"] or "base")[:7]
        path = write_result(Path(args.out), args.name or f"trees_{args.preset}_{base}", res)
        print(f"wrote {path}")
        return 0
    if args.cmd == "compile":
        from m2f.bench.compile import run_compile
        from m2f.bench.report import write_result

        torch.set_num_threads(args.threads)
        res = run_compile(args.preset, args.batch, args.size, args.iters,
                          [b.strip() for b in args.backends.split(",") if b.strip()], args.overrides)
        path = write_result(Path(args.out), args.name or f"compile_{args.preset}_cpu_{args.size}", res)
        print(f"wrote {path}")
        return 0
    if args.cmd == "gemm":
        from m2f.bench import gemm

        return gemm.run_cli(args)
    from m2f.bench.common import check_device, parse_sizes
    from m2f.bench.report import write_result

    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_masks < 0:
        raise InputError(f"--num-masks: expected >= 0, got {args.num_masks}")
    get_preset(args.preset, args.overrides)  # validate early
    if args.cmd == "memory":
        from m2f.bench.memory import run_memory

        res = run_memory(args.preset, parse_sizes(args.sizes), device, args.num_masks, args.overrides, args.threads,
                         args.timeout)
        name = args.name or f"memory_{args.preset}_{device.replace(':', '')}"
    elif args.cmd == "profile":
        from m2f.bench.profile import run_profile

        if args.iters < 1:
            raise InputError(f"--iters: expected >= 1, got {args.iters}")
        res = run_profile(args.preset, args.size, device, args.iters, args.num_masks, args.overrides,
                          batch=args.batch)
        name = args.name or f"profile_{args.preset}_{device.replace(':', '')}_{args.size}"
    else:
        from m2f.bench.speed import run_speed

        if args.size < 32 or args.size % 32:
            raise InputError(f"--size: expected a positive multiple of 32, got {args.size}")
        if args.iters < 1:
            raise InputError(f"--iters: expected >= 1, got {args.iters}")
        res = run_speed(args.preset, args.size, device, args.iters, args.num_masks, args.overrides,
                        flops=not args.no_flops, train=not args.no_train, infer=not args.no_inference,
                        amp=args.amp, batch=args.batch)
        if args.side_by_side and not args.no_train:
            res["train_side_by_side"] = side_by_side(argv, args)
        name = args.name or (f"speed_{args.preset}_{device.replace(':', '')}_{args.size}"
                             + (f"_b{args.batch}" if args.batch != 1 else "") + ("_amp" if args.amp else ""))
    path = write_result(Path(args.out), name, res)
    print(f"wrote {path}")
    return 0


def side_by_side(argv: Sequence[str], args) -> List[dict]:
    """The training comparison of this command run as two processes at the same time, one thread each:
    per process, m2f's and HF's median step and their ratio."""
    import os
    import subprocess
    import tempfile

    drop = {"--side-by-side", "--no-inference", "--no-flops"}
    base, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--name", "--threads"):
            skip = True
            continue
        if a in drop or a.startswith(("--out=", "--name=", "--threads=")):
            continue
        base.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-m", "m2f.bench", *base, "--no-inference", "--no-flops",
                                   "--threads", "1", "--out", tmp, "--name", f"sbs{i}"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
        out = []
        for i, p in enumerate(procs):
            _, err = p.communicate()
            if p.returncode:
                raise RuntimeError(f"side-by-side process {i} failed: {err.strip().splitlines()[-1:]}")
            r = json.loads((Path(tmp) / f"sbs{i}.json").read_text())["train"]
            out.append({"m2f_median_s": r["m2f"]["median_s"], "hf_median_s": r["hf"]["median_s"],
                        "ratio_m2f_over_hf": r["ratio_m2f_over_hf"]})
    for i, r in enumerate(out):
        print(f"side by side, process {i}: m2f {r['m2f_median_s']:.3f} s, HF {r['hf_median_s']:.3f} s "
              f"-> {r['ratio_m2f_over_hf']:.2f}x", flush=True)
    return out


def run(argv: Optional[List[str]] = None) -> int:
    """``main`` with user errors printed on one line (exit code 2)."""
    try:
        return main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
