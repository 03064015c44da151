"""``python -m ablations {list,run,collect,report,compare,calibrate,carry,replay,recount-flops}`` (each with ``--help``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from m2f.errors import InputError, M2FError


def cmd_list(args) -> int:
    """Every ablation with its records per scale, and whether its table is current: records of the
    current code fingerprint (``current``; ``INCOMPLETE`` when a trained row has fewer seeds of it at
    the table's scale than the scale runs), only of other code versions (``STALE``), or none."""
    from ablations.records import runs_path
    from ablations.scales import SCALES, is_proxy, recipe_scale, scale_rank
    from ablations.spec import list_specs, load_spec
    from m2f.checkpoint import read_jsonl
    from m2f.provenance import code_fingerprint

    fp = code_fingerprint()
    print(f"current code fingerprint: {fp}\n")
    print(f"{'name':20s} {'table':6s} {'rows':>4s}  {'primary':14s} {'status':10s} "
          f"{'runs (current/all) per scale':30s} title")
    n_stale = n_recipe = 0
    short: List[str] = []
    for name in list_specs():
        s = load_spec(name)
        recs = read_jsonl(runs_path(args.out, name))
        by_scale: dict = {}
        for r in recs:
            sc = recipe_scale(r)  # the scale whose current recipe trained it (cpu-1000it: the earlier cpu recipe)
            cur, tot = by_scale.get(sc, (0, 0))
            by_scale[sc] = (cur + (r.get("code_fingerprint") == fp), tot + 1)
        done = ", ".join(f"{k}:{c}/{t}" for k, (c, t) in by_scale.items()) or "-"
        carried = sum(1 for r in recs if r.get("code_fingerprint") == fp and r.get("carried_from"))
        if carried:
            done += f" ({carried} carried)"
        status = "-" if not recs else ("current" if any(c for k, (c, _) in by_scale.items() if k in SCALES) else
                                       "RECIPE" if any(c for c, _ in by_scale.values()) else "STALE")
        if status == "current":
            top = max((k for k, (c, _) in by_scale.items() if c and k in SCALES), key=scale_rank)
            seeds: dict = {r.name: set() for r in s.trained_rows}
            # a record counts for its row while its overrides are the row's current ones (a row
            # redefined in its spec, e.g. Table 5's proxy points, is retrained: its old records are not shown)
            rows, proxy = {r.name: r for r in s.trained_rows}, is_proxy(top)
            for r in recs:
                if (r.get("code_fingerprint") == fp and recipe_scale(r) == top and r.get("row") in seeds
                        and rows[r["row"]].defines(r, proxy=proxy)):
                    seeds[r["row"]].add(r.get("seed"))
            few = {row: len(v) for row, v in seeds.items() if len(v) < SCALES[top].seeds}
            if few:
                status = "INCOMPLETE"
                short.append(f"  {name} ({top}, {SCALES[top].seeds} seeds per row): "
                             + ", ".join(f"{row!r} {n}" for row, n in few.items()))
        n_stale += status == "STALE"
        n_recipe += status == "RECIPE"
        print(f"{name:20s} {s.table:6s} {len(s.trained_rows):4d}  {s.primary_metric:14s} {status:10s} {done:30s} "
              f"{s.title}")
    if short:
        print(f"\n{len(short)} table(s) INCOMPLETE: current code, but rows with fewer seeds than their scale runs "
              f"(their findings count as not run); `python -m ablations run NAME --reuse-records` trains the rest:")
        print("\n".join(short))
    if n_stale:
        print(f"\n{n_stale} table(s) STALE: their records come from other code versions; `python -m ablations run NAME` "
              f"retrains them, `python -m ablations report NAME --allow-stale` renders the old records, marked stale")
    if n_recipe:
        print(f"\n{n_recipe} table(s) RECIPE: current code, but only at an earlier recipe of a scale (cpu-1000it: "
              f"the cpu scale before it moved to {SCALES['cpu'].overrides['solver.max_iters']} iterations); their "
              f"tables are rendered and labelled with that scale; `python -m ablations run NAME` trains the current one")
    print("\nscales: " + "; ".join(f"{k} = {v.description}" for k, v in SCALES.items()))
    return 0


def cmd_compare(args) -> int:
    """Whether one code version reproduced another's runs (same row, seed, scale and config)."""
    from ablations.records import compare_versions, runs_path
    from ablations.spec import list_specs
    from m2f.checkpoint import read_jsonl
    from m2f.provenance import code_fingerprint

    fp_b = args.new or code_fingerprint()
    total = same = 0
    rows: List[str] = []
    devices: set = set()
    for name in args.names or list_specs():
        pairs = compare_versions(read_jsonl(runs_path(args.out, name)), args.old, fp_b)
        for p in pairs:
            total += 1
            same += p["eval_identical"] and p["curve_identical"]
            diff = "-" if p["max_abs_diff"] is None else f"{p['max_abs_diff']:.4g}"
            print(f"{name:20s} {p['scale']:6s} {p['row']:30s} seed {p['seed']}: final evaluation "
                  f"{'identical' if p['eval_identical'] else 'DIFFERS'}, logged curve "
                  f"{'identical' if p['curve_identical'] else 'DIFFERS'}, max |diff| of PQ/AP/mIoU metrics {diff}")
            rows.append(f"| {name} | {p['scale']} | {p['row']} | {p['seed']} | "
                        f"{'identical' if p['eval_identical'] else '**differs**'} | "
                        f"{'identical' if p['curve_identical'] else '**differs**'} | {diff} | "
                        f"{'yes' if p['same_computation'] is None else 'no: ' + p['same_computation']} |")
            devices.update(p["devices"])
    summary = (f"{same} of {total} run(s) recorded by both {args.old} and {fp_b} are identical "
               f"(final evaluation and every logged loss and evaluation)")
    print(f"\n{summary}")
    if args.write:
        from pathlib import Path

        from m2f.checkpoint import atomic_write_text

        cmd = " ".join(["python -m ablations compare", *args.names, "--old", args.old]
                       + (["--new", args.new] if args.new else []) + ["--write", args.write])
        atomic_write_text(Path(args.write), "\n".join([
            f"# Did code {fp_b} reproduce code {args.old}'s runs?", "",
            f"Generated by `{cmd}` from the committed records (reports/*/runs.jsonl); do not edit. Pairs: the "
            f"same table, row, seed, scale and config hash trained by both code versions (carried records are "
            f"copies, never paired). Timings are not compared. Machines of the compared runs: "
            f"{', '.join(sorted(devices)) or '—'}. *Same computation* is the check `python -m ablations carry` "
            f"applies: final evaluation equal, and every loss and evaluation both runs logged equal (a run resumed "
            f"between sessions logs an extra loss line, docs/pending/README.md, so its curve differs while its "
            f"computation does not).", "", f"**{summary}.**", "",
            "| table | scale | row | seed | final evaluation | logged curve | max abs diff (PQ/AP/mIoU) | same "
            "computation |", "|---|---|---|---|---|---|---|---|", *rows, ""]))
        print(f"wrote {args.write}")
    return 0


def cmd_run(args) -> int:
    from ablations.runner import run_ablation

    if args.launcher == "submitit":
        from ablations.submitit_launcher import submit_ablation

        res = submit_ablation(args.name, scale=args.scale, seeds=args.seeds, data=args.data, val_data=args.val_data,
                              device=args.device, out=args.out, runs_root=args.runs, rows=args.row or None,
                              dry_run=args.dry_run, wait=args.wait, cluster=args.cluster, folder=args.slurm_folder,
                              nodes=args.nodes, gpus_per_node=args.gpus_per_node, time_min=args.time,
                              cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, partition=args.partition,
                              account=args.account, reuse_records=args.reuse_records)
        return 1 if res["failed"] else 0

    res = run_ablation(args.name, scale=args.scale, seeds=args.seeds, data=args.data, val_data=args.val_data,
                       device=args.device, jobs=args.jobs, out=args.out, runs_root=args.runs,
                       dry_run=args.dry_run, rows=args.row or None, share=not args.no_share, reuse_records=args.reuse_records,
                       jobs_per_device=args.jobs_per_device, allow_stale=args.allow_stale, threads=args.threads)
    return 1 if res["failed"] else 0


def cmd_collect(args) -> int:
    from ablations.submitit_launcher import collect

    collect(args.name, scale=args.scale, seeds=args.seeds, data=args.data, val_data=args.val_data, out=args.out,
            runs_root=args.runs, rows=args.row or None)
    return 0


def cmd_calibrate(args) -> int:
    from ablations.calibration import calibrate

    res = calibrate(args.out, args.runs, seeds=args.seeds, jobs=args.jobs, device=args.device, dry_run=args.dry_run,
                    iters=args.iters, reuse_records=args.reuse_records, steps=args.steps)
    return 1 if res["failed"] else 0


def cmd_report(args) -> int:
    from ablations.render import render_ablation, render_readme
    from ablations.spec import list_specs

    names = args.names or list_specs()
    n = 0
    for name in names:
        res = render_ablation(name, args.out, scale=args.scale, allow_stale=args.allow_stale,
                              fingerprint=args.fingerprint)
        if res is None:
            if args.names:
                print(f"{name}: no records in {args.out}/{name}/runs.jsonl (run `python -m ablations run {name}`)")
            continue
        n += 1
        what = ("no records of the current code (stale; --allow-stale renders them)" if res.get("stale") and
                not res["records"] else f"{res['records']} runs at scale {res['scale']}" +
                (" (STALE records)" if res.get("stale") else ""))
        print(f"{name}: {what} -> {res['table']}")
    p = render_readme(args.out, fingerprint=args.fingerprint)
    print(f"wrote {p} ({n} tables)")
    return 0


def cmd_carry(args) -> int:
    """Count an earlier code version's records for the current code, row by row, where the current code
    retrained some of the row's runs and computed the same."""
    from ablations.records import carry_records, runs_path
    from ablations.render import render_ablation, render_readme
    from ablations.runner import recount_flops
    from ablations.spec import load_spec
    from m2f.checkpoint import append_jsonl, read_jsonl
    from m2f.provenance import code_fingerprint

    fp_new = code_fingerprint()
    if args.old == fp_new:
        raise InputError(f"carry --from {args.old}: that is the current code's fingerprint")
    total = 0
    for name in args.names:
        spec = load_spec(name)
        path = runs_path(args.out, name)
        records = read_jsonl(path) if path.exists() else []
        carried, why = carry_records(records, spec, args.scale, args.old, fp_new, args.min_verified)
        for row, w in why.items():
            print(f"{name}: {row}: {w}")
        if not why:
            print(f"{name}: no {args.scale} records of {args.old}")
        if args.dry_run or not carried:
            continue
        for rec in carried:
            append_jsonl(path, rec)
        total += len(carried)
        recount_flops([name], args.out, print_fn=print)
        render_ablation(name, args.out)
    if total:
        render_readme(args.out)
    print(f"carry: {total} record(s) carried from {args.old} to {fp_new}" + (" (dry run)" if args.dry_run else ""))
    return 0


def cmd_replay(args) -> int:
    """Retrain the first iterations of one recorded run here and compare the logged losses bit for bit."""
    from ablations.records import runs_path
    from ablations.runner import replay_record
    from ablations.scales import recipe_scale
    from m2f.checkpoint import read_jsonl
    from m2f.provenance import code_fingerprint

    fp = code_fingerprint()
    path = runs_path(args.out, args.name)
    recs = [r for r in (read_jsonl(path) if path.exists() else [])
            if r.get("row") == args.row and r.get("seed") == args.seed and recipe_scale(r) == args.scale
            and r.get("code_fingerprint") == fp and not r.get("carried_from")]
    if not recs:
        raise InputError(f"{path}: no {args.scale} record of row {args.row!r}, seed {args.seed} trained by the "
                         f"current code ({fp})")
    res = replay_record(recs[-1], args.iters, gemm_backend=args.gemm_backend)
    print(f"record: {args.name} / {args.row} / seed {args.seed}, trained on {res['recorded']}")
    print(f"here:   {res['here']}")
    for it, a, b in res["compared"]:
        print(f"  iter {it:5d}: loss here {a!r:>22s}  recorded {b!r:>22s}  {'equal' if a == b else 'DIFFERENT'}")
    if res["first_difference"] is None:
        print(f"replay: this machine reproduced the record's bits at every logged iteration up to {args.iters}")
        return 0
    print(f"replay: the logged values differ from iteration {res['first_difference']}: this machine does not "
          f"reproduce the record's bits, so a retrain here cannot verify a carry of records trained there "
          f"(ablations/README.md, \"Machines\")")
    return 1


def cmd_recount_flops(args) -> int:
    from ablations.render import render_ablation, render_readme
    from ablations.runner import recount_flops
    from ablations.spec import list_specs

    names = args.names or list_specs()
    changed = recount_flops(names, args.out)
    for name, n in changed.items():
        if n:
            render_ablation(name, args.out)
    if any(changed.values()):
        render_readme(args.out)
    print("recount-flops: " + ", ".join(f"{k} {v} record(s) changed" for k, v in changed.items() if v)
          if any(changed.values()) else "recount-flops: every record of this code already carries this code's count")
    return 0


def _fractions(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated fractions, e.g. 0.6,0.8") from None


def _scale_name(name: str) -> str:
    from ablations.scales import get_scale
    from m2f.errors import InputError

    try:
        return get_scale(name).name
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    s.add_argument("--scale", default="cpu", type=_scale_name, metavar="{" + ",".join(sorted(SCALES)) + ",cpu-<N>it}",
                   help="smoke (minutes, pipeline check) | quick (400 iterations x 2 seeds, a first look) | cpu "
                        "(default: the calibrated proxy, 2000 iterations x 5 paired seeds) | cpu-<N>it (the cpu "
                        "recipe at N iterations; cpu-1000it: the cpu recipe before 2026-12-03) | paper (full COCO "
                        "schedule via torchrun)")
    s.add_argument("--seeds", type=int, default=None, help="number of seeds per row (default: the scale's)")
    s.add_argument("--data", default=None, help="train dataset spec (registered name or path spec); "
                   "default: the scale's (synthetic at smoke/cpu, coco_2017_train_panoptic at paper)")
    s.add_argument("--val-data", default=None, help="validation dataset spec (default: --data's if given)")
    s.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    s.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: the scale's; threads per "
                   "run = cores // jobs)")
    s.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores // jobs). "
                   "Records name their threads: a run at another thread count computes the same function but not "
                   "the same bits, so e.g. one run beside another runner on 2 cores takes --jobs 1 --threads 1")
    s.add_argument("--row", action="append", default=[], help="run only this row (repeatable)")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.add_argument("--runs", default="runs/ablations", help="run directories root (default %(default)s)")
    s.add_argument("--dry-run", action="store_true", help="print the plan (paper scale: the torchrun commands)")
    s.add_argument("--no-share", action="store_true", help="train every run, even one identical (same config, "
                   "seed, scale) to a run another ablation finished on this machine (default: record that one)")
    s.add_argument("--reuse-records", action="store_true",
                   help="count committed records of the current code as finished (this table's) and as runs to "
                        "share (other tables'), to continue a table on another machine; by default only runs "
                        "finished on this machine count, so a fresh clone reproduces every run")
    s.add_argument("--jobs-per-device", type=int, default=None, metavar="K",
                   help="with --device cuda: K runs at once on every visible GPU (cuda:0..G-1, round robin; "
                        "jobs = K x G); the cpu recipe's tiny runs leave a GPU mostly idle one at a time")
    s.add_argument("--allow-stale", action="store_true",
                   help="render the table from older code versions' records when there are none of the current code")
    g = s.add_argument_group("submitit (Slurm) launcher", "each pending (row, seed) as its own job; see ablations/README.md")
    g.add_argument("--launcher", default="local", choices=["local", "submitit"],
                   help="local: a process pool here (default); submitit: one job per run through submitit")
    g.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit's executor (default: Slurm where sbatch exists, else local)")
    g.add_argument("--partition", default=None, help="Slurm partition (default: $M2F_SLURM_PARTITION)")
    g.add_argument("--account", default=None, help="Slurm account (default: $M2F_SLURM_ACCOUNT)")
    g.add_argument("--nodes", type=int, default=None, help="nodes per job (default: the scale's)")
    g.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node, one task each (default: the scale's)")
    g.add_argument("--time", type=int, default=None, metavar="MIN", help="time limit per job in minutes "
                   "(default: the scale's; a job past it is requeued and resumes)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default: the scale's)")
    g.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB (default: the scale's)")
    g.add_argument("--slurm-folder", default=None, help="submitit's log folder (default RUNS/submitit/NAME/SCALE)")
    g.add_argument("--wait", action="store_true", help="wait for the jobs, then collect their records")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("collect", help="record every finished run of an ablation (submitit jobs) into runs.jsonl, "
                       "exactly once, and render", description="Gather runs that finished (their run directory holds "
                       "ablation_result.json) into reports/NAME/runs.jsonl; runs already recorded are skipped, so it "
                       "can be re-run at any time.")
    s.add_argument("name", choices=list_specs(), metavar="NAME", help=f"one of: {', '.join(list_specs())}")
    s.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="the scale the jobs ran at (default cpu)")
    s.add_argument("--seeds", type=int, default=None, help="number of seeds per row, as submitted")
    s.add_argument("--data", default=None, help="train dataset spec, as submitted")
    s.add_argument("--val-data", default=None, help="validation dataset spec, as submitted")
    s.add_argument("--row", action="append", default=[], help="only this row (repeatable), as submitted")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.add_argument("--runs", default="runs/ablations", help="run directories root (default %(default)s)")
    s.set_defaults(fn=cmd_collect)

    s = sub.add_parser("calibrate", help="the cpu recipe's evidence: Table 4a's rows, 3 seeds, dense evaluations "
                       "-> reports/calibration/",
                       description="Train (or resume) Table 4a's three rows at the cpu scale with 3 seeds (they are "
                       "Table 4a's own runs) and write reports/calibration/README.md, calibration.png and "
                       "calibration.json: metrics and seed spread against iterations, paired deltas with 95% "
                       "intervals, the base model against the targets.")
    s.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3)")
    s.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: the cpu scale's)")
    s.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.add_argument("--runs", default="runs/ablations", help="run directories root (default %(default)s)")
    s.add_argument("--dry-run", action="store_true", help="print the plan")
    s.add_argument("--iters", type=int, default=None, metavar="N",
                   help="a candidate schedule: the cpu recipe with N iterations (scale cpu-<N>it, an evaluation every "
                        "N/8 rounded up to 125), recorded and rendered in reports/calibration/cpu-<N>it/")
    s.add_argument("--steps", default=None, type=_fractions, metavar="A,B",
                   help="with --iters: the lr steps as fractions of the schedule (e.g. 0.6,0.8; default the "
                        "preset's 0.9,0.95): scale cpu-<N>it-steps<A>-<B>")
    s.add_argument("--reuse-records", action="store_true",
                   help="count committed records of the current code as finished (continue on another machine)")
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("compare", help="did one code version reproduce another's runs? (same row, seed, scale, "
                                       "config; final evaluation and logged curves compared exactly)")
    s.add_argument("names", nargs="*", metavar="NAME", help="ablations (default: all)")
    s.add_argument("--old", required=True, metavar="FP", help="the code fingerprint of the earlier records")
    s.add_argument("--new", default=None, metavar="FP", help="the other fingerprint (default: the current code's)")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.add_argument("--write", default=None, metavar="MD", help="also write the comparison as a markdown report, "
                   "e.g. reports/reproduction/fe5233d89935_vs_1ebb60d016cf.md")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("report", help="re-render tables and plots from stored runs.jsonl (no training)")
    s.add_argument("names", nargs="*", metavar="NAME", help="ablations to render (default: all with records)")
    s.add_argument("--scale", default=None, type=_scale_name, metavar="{" + ",".join(sorted(SCALES)) + ",cpu-<N>it}",
                   help="which scale's records (default: the highest-fidelity scale recorded; cpu-1000it: the cpu "
                        "records of the earlier 1000-iteration recipe)")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.add_argument("--allow-stale", action="store_true",
                   help="render older code versions' records (marked STALE in the table header) when there are "
                        "none of the current code")
    s.add_argument("--fingerprint", default=None, metavar="FP",
                   help="render the tables and the scoreboard of this code version's records (e.g. the last one "
                        "whose tables were complete, while the current code's are retrained), marked STALE when "
                        "it is not the checkout's")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("carry", help="count an earlier code version's records for the current code, row by row, "
                       "where the current code retrained some of the row's runs and computed the same",
                       description="A change to the sources makes every table stale, although most rows compute "
                       "exactly as before (ablations compare shows it). For each row of NAME, when the current code "
                       "has retrained at least --min-verified of the row's (seed, config) runs of code --from, and "
                       "each of them computed the same (final evaluation equal, every loss and evaluation logged "
                       "by both equal), the row's other records of --from are copied as records of the current "
                       "code, marked carried_from (source fingerprint, verified seeds). Their FLOPs are counted "
                       "again and their memory probe is measured again by the next run. The table header says "
                       "which records were carried. A row that differs is not carried: run retrains it.")
    s.add_argument("names", nargs="+", metavar="NAME", help="ablations")
    s.add_argument("--from", dest="old", required=True, metavar="FP", help="the earlier code fingerprint")
    s.add_argument("--scale", default="cpu", type=_scale_name, help="the records' scale (default %(default)s)")
    s.add_argument("--min-verified", type=int, default=1, metavar="K",
                   help="retrained runs per row that must match before its other records carry (default 1)")
    s.add_argument("--dry-run", action="store_true", help="say what would carry, write nothing")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.set_defaults(fn=cmd_carry)

    s = sub.add_parser("replay", help="retrain the first iterations of a recorded run here and compare its logged "
                       "losses bit for bit: does this machine reproduce the record (and so can it verify a carry)?",
                       description="Runs of one config and seed compute the same function on every machine, but "
                       "their bits differ between CPUs and GEMM backends, and training amplifies the difference. "
                       "`carry` needs a retrain that reproduces the source's bits. This retrains the first --iters "
                       "iterations of one record of the current code (its config, seed, threads and resolved GEMM "
                       "backend) and compares every logged loss. Exit status 0: reproduced; 1: it differs.")
    s.add_argument("name", metavar="NAME", help="ablation")
    s.add_argument("--row", required=True, help="the record's row")
    s.add_argument("--seed", type=int, default=0, help="the record's seed (default %(default)s)")
    s.add_argument("--iters", type=int, default=20, help="iterations to retrain (default %(default)s)")
    s.add_argument("--scale", default="cpu", type=_scale_name, help="the record's scale (default %(default)s)")
    s.add_argument("--gemm-backend", choices=("onednn", "reference"), default=None,
                   help="run this GEMM backend instead of the one the record resolved")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.set_defaults(fn=cmd_replay)

    s = sub.add_parser("recount-flops", help="count the FLOPs of the current code's records again and fix the ones "
                       "that carry another count (then re-render)",
                       description="FLOPs are counted once per config and cached. Until 2026-12-06 the cache key "
                       "left out the code fingerprint, so a config whose model changed with the code (Table 4c's "
                       "SMCA at 1ebb60d016cf) was recorded with the old model's count. This counts every record of "
                       "the current code fingerprint again (fvcore, one count per config) and rewrites the ones "
                       "that differ; records of other code versions are left alone.")
    s.add_argument("names", nargs="*", metavar="NAME", help="ablations (default: all)")
    s.add_argument("--out", default="reports", help="reports directory (default %(default)s)")
    s.set_defaults(fn=cmd_recount_flops)
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
