"""``python -m ablations {list,run,report}`` (each with ``--help``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from m2f.errors import M2FError


def cmd_list(args) -> int:
    from ablations.records import runs_path
    from ablations.scales import SCALES
    from ablations.spec import list_specs, load_spec
    from m2f.checkpoint import read_jsonl

    print(f"{'name':20s} {'table':6s} {'rows':>4s}  {'primary':14s} {'runs recorded':14s} title")
    for name in list_specs():
        s = load_spec(name)
        recs = read_jsonl(runs_path(args.out, name))
        by_scale = {}
        for r in recs:
            by_scale[r.get("scale")] = by_scale.get(r.get("scale"), 0) + 1
        done = ", ".join(f"{k}:{v}" for k, v in by_scale.items()) or "-"
        print(f"{name:20s} {s.table:6s} {len(s.trained_rows):4d}  {s.primary_metric:14s} {done:14s} {s.title}")
    print("\nscales: " + "; ".join(f"{k} = {v.description}" for k, v in SCALES.items()))
    return 0


def cmd_run(args) -> int:
    from ablations.runner import run_ablation

    res = run_ablation(args.name, scale=args.scale, seeds=args.seeds, data=args.data, val_data=args.val_data,
                       device=args.device, jobs=args.jobs, out=args.out, runs_root=args.runs,
                       dry_run=args.dry_run, rows=args.row or None, share=not args.no_share)
    return 1 if res["failed"] else 0


def cmd_report(args) -> int:
    from ablations.render import render_ablation, render_readme
    from ablations.spec import list_specs

    names = args.names or list_specs()
    n = 0
    for name in names:
        res = render_ablation(name, args.out, scale=args.scale)
        if res is None:
            if args.names:
                print(f"{name}: no records in {args.out}/{name}/runs.jsonl (run `python -m ablations run {name}`)")
            continue
        n += 1
        print(f"{name}: {res['records']} runs at scale {res['scale']} -> {res['table']}")
    p = render_readme(args.out)
    print(f"wrote {p} ({n} tables)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ablations.scales import SCALES
    from ablations.spec import list_specs

    p = argparse.ArgumentParser(prog="python -m ablations", description=__doc__ + (
        "\nThe paper's ablation tables as runnable specs (ablations/specs/*.toml)."))
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("list", help="list the ablations, their paper tables and the runs recorded")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("run", help="train every (row, seed) of an ablation (resumable), record, render",
                       description="Train every (row, seed) of an ablation at a scale; finished runs are skipped "
                       "and unfinished ones resume from their checkpoints.  Writes reports/NAME/runs.jsonl, "
                       "table.md, table.csv, convergence.png.  With --scale paper --dry-run, prints the torchrun "
                       "command of each run instead of running it.")
    s.add_argument("name", choices=list_specs(), metavar="NAME", help=f"one of: {', '.join(list_specs())}")
    s.add_argument("--scale", default="cpu", choices=sorted(SCALES),
                   help="smoke (minutes, pipeline check) | cpu (default: ~20 min for 3 rows on 2 cores) | "
                        "paper (full COCO schedule via torchrun)")
    s.add_argument("--seeds", type=int, default=None, help="number of seeds per row (default: the scale's)")
    s.add_argument("--data", default=None, help="train dataset spec (registered name or path spec); "
                   "default: the scale's (synthetic at smoke/cpu, coco_2017_train_panoptic at paper)")
    s.add_argument("--val-data", default=None, help="validation dataset spec (default: --data's if given)")
    s.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    s.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: the scale's; threads per "
                   "run = cores // jobs)")
    s.add_argument("--row", action="append", default=[], help="run only this row (repeatable)")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.add_argument("--runs", default="runs/ablations", help="run directories root (default %(default)s)")
    s.add_argument("--dry-run", action="store_true", help="print the plan (paper scale: the torchrun commands)")
    s.add_argument("--no-share", action="store_true", help="train every run, even one identical (same config, "
                   "seed, scale) to a run another ablation finished on this machine (default: record that one)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("report", help="re-render tables and plots from stored runs.jsonl (no training)")
    s.add_argument("names", nargs="*", metavar="NAME", help="ablations to render (default: all with records)")
    s.add_argument("--scale", default=None, choices=sorted(SCALES),
                   help="which scale's records (default: the scale of the latest record)")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.set_defaults(fn=cmd_report)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except M2FError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
