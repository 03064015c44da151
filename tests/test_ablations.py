"""The ablation suite: specs, paper numbers, rendering, resume/skip logic, and one real smoke run."""
from __future__ import annotations

import csv
import json
import math
import re
import time
from pathlib import Path

import pytest

from ablations import runner as ab_runner
from ablations.render import render_ablation, render_readme
from ablations.scales import get_scale
from ablations.spec import PAPER_COLUMNS, list_specs, load_spec
from m2f.checkpoint import append_jsonl, read_jsonl
from m2f.config import all_paths, apply_overrides, config_hash, get_preset, to_dict
from m2f.errors import InputError

PAPER_MD = Path("/work/shared/PAPER.md")
if not PAPER_MD.exists():  # a copy beside the repo in other checkouts
    PAPER_MD = Path(__file__).resolve().parents[2] / "shared" / "PAPER.md"

ALL_SPECS = list_specs()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
def test_every_paper_ablation_has_a_spec():
    assert set(ALL_SPECS) >= {"masked_attention", "optimization", "cross_attention", "feature_resolution",
                              "pixel_decoder", "point_loss", "queries", "query_init", "proposals", "task_transfer"}


@pytest.mark.parametrize("name", ALL_SPECS)
def test_spec_loads_and_every_override_resolves(name):
    spec = load_spec(name)
    assert spec.name == name
    assert spec.base.name == spec.base_row and spec.base.run
    paths = set(all_paths())
    for row in spec.rows:
        for path, value in row.overrides.items():
            assert path in paths, f"{name}/{row.name}: {path}"
            for preset in (spec.paper_preset, "tiny"):
                cfg = get_preset(preset, row.overrides)
                obj = cfg
                for part in path.split("."):
                    obj = getattr(obj, part)
                assert obj == value, f"{name}/{row.name}: {path} = {obj!r}, expected {value!r}"
        for col in row.paper:
            assert col in PAPER_COLUMNS
    # rows differ from one another (else the ablation compares nothing)
    cfgs = {config_hash(get_preset("tiny", r.overrides)) for r in spec.trained_rows}
    assert len(cfgs) == len(spec.trained_rows)


def test_bad_override_path_fails_at_load(tmp_path):
    text = (Path(ab_runner.__file__).parent / "specs" / "masked_attention.toml").read_text()
    bad = tmp_path / "masked_attention.toml"
    bad.write_text(text.replace('"decoder.cross_attention" = "standard"', '"decoder.cross_atention" = "standard"'))
    with pytest.raises(InputError, match="cross_atention"):
        load_spec(bad)
    bad.write_text(text.replace('"decoder.cross_attention" = "standard"', '"decoder.cross_attention" = "sparse"'))
    with pytest.raises(InputError, match="sparse"):
        load_spec(bad)
    bad.write_text(text.replace('base_row = "full model"', 'base_row = "nope"'))
    with pytest.raises(InputError, match="base_row"):
        load_spec(bad)
    with pytest.raises(InputError, match="unknown ablation"):
        load_spec("no_such_ablation")


# ---------------------------------------------------------------------------------------------
# Paper numbers: every paper value in a spec equals shared/PAPER.md's text
# ---------------------------------------------------------------------------------------------
_SEG = re.compile(r"^(?P<label>.*?)\s+(?P<a>\d+(?:\.\d+)?)\s*/\s*(?P<b>\d+(?:\.\d+)?)\s*/\s*(?P<c>\d+(?:\.\d+)?)"
                  r"(?:\s*/\s*(?P<d>\d+(?:\.\d+)?)G)?\s*$")


def parse_paper_ablations(text: str) -> dict:
    """{table id: {label: {AP, PQ, mIoU, FLOPs_G | memory_GB}}} from PAPER.md's Ablations section."""
    section = text.split("## Ablations", 1)[1].split("\n## ", 1)[0]
    tables, cur = {}, None
    for line in section.splitlines()[1:]:
        m = re.match(r"^(4[a-e]|5|11[ab])\s+(.*)$", line)
        if m:
            cur = m.group(1)
            tables[cur] = m.group(2)
        elif line.startswith(" ") and cur:
            tables[cur] += " " + line.strip()
        else:
            cur = None
    out = {}
    for tid, body in tables.items():
        rows = {}
        for seg in body.split(";"):
            seg = seg.strip()
            m = _SEG.match(seg)
            if not m:
                continue
            vals = {"AP": float(m["a"]), "PQ": float(m["b"]), "mIoU": float(m["c"])}
            if m["d"] is not None:
                vals["memory_GB" if tid == "5" else "FLOPs_G"] = float(m["d"])
            rows[m["label"].strip()] = vals
        out[tid] = rows
    return out


def _lookup(parsed_table: dict, label: str) -> dict:
    hits = [v for k, v in parsed_table.items() if k == label or k.endswith(" " + label)]
    assert len(hits) == 1, f"label {label!r} found {len(hits)} times in {list(parsed_table)}"
    return hits[0]


def test_paper_parser_reads_table_4a():
    parsed = parse_paper_ablations(PAPER_MD.read_text())
    assert parsed["4a"]["full model"] == {"AP": 43.7, "PQ": 51.9, "mIoU": 47.2, "FLOPs_G": 226.0}
    assert parsed["4a"]["- masked attention"]["PQ"] == 47.1
    assert _lookup(parsed["5"], "mask->mask")["memory_GB"] == 18.0


@pytest.mark.parametrize("name", [n for n in ALL_SPECS if n not in ("proposals", "task_transfer")])
def test_spec_paper_numbers_equal_paper_md(name):
    parsed = parse_paper_ablations(PAPER_MD.read_text())
    spec = load_spec(name)
    checked = 0
    for row in spec.rows:
        if not row.paper:
            continue
        assert row.paper_label, f"{name}/{row.name}: paper numbers without a paper_label to check them against"
        expected = _lookup(parsed[row.paper_table or spec.table], row.paper_label)
        if row.paper_table:  # 4b's full model is 4a's; 4b gives no FLOPs
            expected = {k: v for k, v in expected.items() if k in row.paper}
        assert row.paper == expected, f"{name}/{row.name}"
        checked += 1
    assert checked == len(spec.rows)


def test_task_transfer_and_proposals_paper_numbers():
    text = PAPER_MD.read_text()
    m = re.search(r"R50 ([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+) /", text)
    pq, ap, miou = float(m[1]), float(m[4]), float(m[5])
    t = re.search(r"COCO: ([\d.]+) AP vs ([\d.]+); ([\d.]+) mIoU vs ([\d.]+)", text)
    spec = load_spec("task_transfer")
    assert spec.base.paper == {"PQ": pq, "AP": ap, "mIoU": miou}
    assert float(t[1]) == ap and float(t[3]) == miou
    assert spec.row("instance model").paper == {"AP": float(t[2])}
    assert spec.row("semantic model").paper == {"mIoU": float(t[4])}
    assert spec.row("instance model").overrides == {"data.task": "instance"}
    assert spec.row("semantic model").overrides == {"data.task": "semantic"}
    assert load_spec("proposals").base.paper == {}  # Fig 3 has no numbers, only bars


# ---------------------------------------------------------------------------------------------
# Rendering from a synthetic runs.jsonl
# ---------------------------------------------------------------------------------------------
def _fp():
    from m2f.provenance import code_fingerprint

    return code_fingerprint()


def _row_overrides(row, scale="cpu"):
    """The overrides the runner records for the row of that name (row names mean the same config in
    every spec), at ``scale``; {} for a name no spec has."""
    for name in ALL_SPECS:
        for r in load_spec(name).rows:
            if r.name == row:
                return r.overrides_at(proxy=scale != "paper")
    return {}


def _record(row, seed, pq, ap, miou, gflops=2.0, scale="cpu", n_evals=3, fingerprint=None, overrides=None):
    over = [{"iter": i * 10, "loss": 10.0 / (i + 1)} for i in range(1, 6)]
    over += [{"iter": k * 20, "eval": {"panoptic": {"PQ": pq * k / n_evals}}} for k in range(1, n_evals + 1)]
    overrides = _row_overrides(row, scale) if overrides is None else overrides
    return {"ablation": "masked_attention", "table": "4a", "row": row, "overrides": overrides, "scale": scale, "seed": seed,
            "config_hash": f"h{row[:3]}{seed}", "git_commit": "abc", "environment": {"device": "cpu (test)"},
            "code_fingerprint": fingerprint or _fp(),
            "data": {"train": "synth", "val": "synth_val", "task": "panoptic", "image_size": 128, "eval_limit": 100},
            "max_iters": 60, "iters": 60, "batch_size": 4,
            "thresholds": {"object_mask_threshold": 0.5, "overlap_threshold": 0.8, "mask_threshold": 0.5},
            "metrics_over_training": over,
            "eval": {"panoptic": {"PQ": pq, "PQ_th": pq / 2, "PQ_st": pq * 1.5}, "instance": {"AP": ap},
                     "semantic": {"mIoU": miou}},
            "flops": {"gflops": gflops}, "peak_memory_bytes": None, "peak_rss_bytes": 1.5e9,
            "memory_kind": "process_peak_rss", "train_images_per_s": 5.0, "params": 1e6,
            "finished_at": "2026-01-01T00:00:00+00:00"}


def test_paired_delta_and_verdicts():
    from scipy import stats as sst

    from ablations.stats import paired_delta, verdict

    base = {0: 50.0, 1: 52.0, 2: 47.0, 3: 49.0}
    row = {0: 46.0, 1: 47.5, 2: 43.5, 3: 44.0, 9: 10.0}  # seed 9 has no partner: left out
    d = paired_delta(base, row)
    diffs = [-4.0, -4.5, -3.5, -5.0]
    assert d["n"] == 4 and d["seeds"] == [0, 1, 2, 3] and d["delta"] == pytest.approx(-4.25)
    half = sst.t.ppf(0.975, 3) * sst.tstd(diffs) / 2  # t_{0.975,3} * sd / sqrt(4)
    assert d["low"] == pytest.approx(-4.25 - half) and d["high"] == pytest.approx(-4.25 + half)
    ref = sst.ttest_rel(list(row.values())[:4], list(base.values())).confidence_interval(0.95)
    assert (d["low"], d["high"]) == pytest.approx((ref.low, ref.high))
    assert verdict(d, -4.8) == "agrees" and verdict(d, +1.0) == "contradicts"
    assert verdict(paired_delta(base, {0: 51.0, 1: 51.0, 2: 48.0, 3: 48.0}), -4.8) == "inconclusive"  # spans 0
    assert verdict(paired_delta({0: 1.0}, {0: 0.0}), -4.8) == "inconclusive"  # one pair: no interval
    assert paired_delta({0: 1.0}, {1: 0.0}) is None and verdict(None, -4.8) == "not run"
    assert verdict(d, None) == "no paper value"


def test_tables_render_one_code_version_and_mark_stale(tmp_path):
    """Records of another code fingerprint are left out; with only those, the table says it is not run
    with this code unless --allow-stale, which renders them marked STALE."""
    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    for seed in (0, 1):
        append_jsonl(runs, _record("full model", seed, 50 + seed, 40.0, 45.0, fingerprint="0ldc0de00000"))
        append_jsonl(runs, _record("- masked attention", seed, 40 + seed, 40.0, 45.0, fingerprint="0ldc0de00000"))
    res = render_ablation("masked_attention", out)
    md = Path(res["table"]).read_text()
    assert res["stale"] and res["records"] == 0 and "not run with this code" in md and "--allow-stale" in md
    res = render_ablation("masked_attention", out, allow_stale=True)
    md = Path(res["table"]).read_text()
    assert "(STALE)" in md.splitlines()[0] and "0ldc0de00000" in md and res["records"] == 4
    # a current record is rendered alone, and the old ones are counted as left out
    append_jsonl(runs, _record("full model", 0, 60.0, 40.0, 45.0))
    res = render_ablation("masked_attention", out)
    md = Path(res["table"]).read_text()
    assert not res["stale"] and res["records"] == 1 and "60.00 (n=1)" in md and "STALE" not in md
    assert "4 record(s) of other code versions left out" in md and _fp() in md
    from ablations.cli import main

    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["list", "--out", str(out)]) == 0
    line = next(l for l in buf.getvalue().splitlines() if l.startswith("masked_attention"))
    # current code, not STALE; one seed of the scale's five, so INCOMPLETE
    assert line.split()[4] == "INCOMPLETE" and "STALE" not in line and "cpu:1/5" in line


def test_proxy_overrides_apply_at_the_proxy_scales_only(tmp_path):
    """Table 5's point rows sample 196 points (the paper's 19% of the mask logits) at the tiny proxy
    scales and the paper preset's 12544 at paper scale; the mask -> mask row keeps the cpu recipe's
    config (its runs stay the same), and records store the overrides the run used."""
    from ablations.records import build_record

    spec = load_spec("point_loss")
    cpu, paper = get_scale("cpu"), get_scale("paper")
    pts = {r.name: ab_runner.resolve_config(spec, r, cpu, 0).loss.num_points for r in spec.rows}
    assert pts == {"mask -> mask": cpu.overrides["loss.num_points"], "mask -> point": 196, "point -> mask": 196,
                   "point -> point": 196}
    assert {ab_runner.resolve_config(spec, r, paper, 0).loss.num_points for r in spec.rows} == {12544}
    mm = spec.row("mask -> mask")  # samples no points: the same runs as before the proxy points
    assert not mm.proxy_overrides and mm.overrides_at(proxy=True) == mm.overrides == mm.overrides_at(proxy=False)
    plan = ab_runner.plan_runs(spec, cpu, seeds=1, rows=["point -> point"])[0]
    rec = build_record(spec, plan, cpu, {"summary": {}}, None, "abc")
    assert rec["overrides"] == {"loss.matching": "point", "loss.loss": "point", "loss.num_points": 196}
    assert rec["config"]["loss"]["num_points"] == 196
    cmd = ab_runner.torchrun_command(spec, ab_runner.plan_runs(spec, paper, seeds=1, rows=["point -> point"])[0],
                                     paper)
    assert not any("num_points" in c for c in cmd)
    # a proxy override that does not resolve fails at load, naming the field
    text = (Path(ab_runner.__file__).parent / "specs" / "point_loss.toml").read_text()
    bad = tmp_path / "point_loss.toml"
    bad.write_text(text.replace('proxy_overrides = { "loss.num_points" = 196 }',
                                'proxy_overrides = { "loss.num_pointz" = 196 }', 1))
    with pytest.raises(InputError, match="proxy_overrides.*num_pointz"):
        load_spec(bad)
    bad.write_text(text.replace('proxy_overrides = { "loss.num_points" = 196 }', 'proxy_overrides = 196', 1))
    with pytest.raises(InputError, match=r"rows\[1\]\.proxy_overrides: must be a table"):
        load_spec(bad)


def test_one_proxy_rule_for_runner_records_and_tables(monkeypatch):
    """ablations.scales.is_proxy decides everywhere whether a row's proxy_overrides apply: a scale
    that starts from the spec's paper preset (preset None) is no proxy whatever its name, so its
    runs, its records and its table all use the rows' plain overrides (before, the runner asked
    for the preset and the table for the name "paper": a "paper_short" scale's records would
    have been left out of its own table as redefined)."""
    import dataclasses

    from ablations import scales
    from ablations.records import build_record
    from ablations.render import select_records

    short = dataclasses.replace(scales.SCALES["paper"], name="paper_short")
    monkeypatch.setitem(scales.SCALES, "paper_short", short)
    assert not scales.is_proxy(short) and not scales.is_proxy("paper_short") and not scales.is_proxy("paper")
    assert all(scales.is_proxy(n) for n in ("cpu", "quick", "smoke", "cpu-1000it", "cpu (earlier recipe)"))
    assert scales.is_proxy(get_scale("cpu")) and not scales.is_proxy("paper (earlier recipe)")
    spec = load_spec("point_loss")
    row = spec.row("point -> point")
    assert ab_runner.resolve_config(spec, row, short, 0).loss.num_points == 12544  # the paper preset's
    plan = ab_runner.plan_runs(spec, short, seeds=1, rows=["point -> point"])[0]
    rec = build_record(spec, plan, short, {"summary": {}}, None, "abc")
    assert rec["scale"] == "paper_short" and rec["overrides"] == row.overrides_at(proxy=False) == row.overrides
    rec.update(code_fingerprint=_fp(), eval={"panoptic": {"PQ": 50.0}})
    scale, kept, info = select_records([rec], "paper_short", spec=spec)
    assert scale == "paper_short" and kept == [rec] and info["redefined_records"] == 0


def test_a_redefined_row_never_mixes_its_old_and_new_records(tmp_path):
    """Records whose overrides are not their row's current ones (Table 5's point rows before they
    sampled 196 points) are left out of the table, the scoreboard and `list`'s seed count, and the
    header says so; records of other recipes are named there too."""
    from ablations.cli import main
    from ablations.render import scoreboard_cells

    out = tmp_path / "reports"
    runs = out / "point_loss" / "runs.jsonl"
    dense = {"loss.matching": "point", "loss.loss": "point"}
    for seed in range(5):
        append_jsonl(runs, _record("mask -> mask", seed, 50.0 + seed, 40.0, 45.0))
        append_jsonl(runs, _record("point -> point", seed, 10.0, 10.0, 10.0, overrides=dense))  # 1024 points
        if seed < 3:
            append_jsonl(runs, _record("point -> point", seed, 52.0 + seed, 41.0, 46.0))  # 196 points
    append_jsonl(runs, {**_record("point -> point", 0, 1.0, 1.0, 1.0), "max_iters": 400,
                        "config": {"solver": {"max_iters": 400}}})  # another recipe
    res = render_ablation("point_loss", out)
    md = Path(res["table"]).read_text()
    base = next(l for l in md.splitlines() if l.startswith("| **point -> point**"))
    assert "53.00 ± 1.00 (n=3)" in base and res["records"] == 8
    assert "5 `cpu` record(s) of an earlier definition of their row" in md
    assert ("**Proxy overrides** (on top of the scale's recipe, this scale only): `loss.num_points` = 196 in "
            "mask -> point, point -> mask, point -> point") in md
    assert "1 `cpu-400it`" in md
    cell = next(c for c in scoreboard_cells(load_spec("point_loss"), out)
                if c["row"] == "mask -> mask" and c["metric"] == "PQ")
    assert cell["pairs"] == 3 and cell["delta"] == pytest.approx(-2.0)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["list", "--out", str(out)]) == 0
    assert "point_loss (cpu, 5 seeds per row): 'mask -> point' 0, 'point -> mask' 0, 'point -> point' 3" \
        in buf.getvalue()
    # only records of the old definition: the table says so instead of rendering them
    only_old = tmp_path / "old" / "point_loss" / "runs.jsonl"
    append_jsonl(only_old, _record("point -> point", 0, 10.0, 10.0, 10.0, overrides=dense))
    res = render_ablation("point_loss", tmp_path / "old")
    md = Path(res["table"]).read_text()
    assert res["records"] == 0 and "(not run as defined now)" in md.splitlines()[0] and "1 `cpu` record(s)" in md


def test_scoreboard_counts_verdicts_of_paper_findings(tmp_path):
    from ablations.render import render_scoreboard, scoreboard_cells

    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    for seed, (a, b, c) in enumerate([(50, 46, 51.5), (52, 46.5, 50.5), (51, 45, 52.0)]):
        append_jsonl(runs, _record("full model", seed, a, 40.0, 45.0))
        append_jsonl(runs, _record("- masked attention", seed, b, 38.0 - seed * 0.1, 44.0 + seed))
        append_jsonl(runs, _record("- high-resolution features", seed, c, 39.0, 44.5))
    cells = {(c["row"], c["metric"]): c for c in scoreboard_cells(load_spec("masked_attention"), out)}
    # paper Table 4a: -masked attention PQ -4.8, AP -5.9, mIoU -3.6; -high-res PQ -1.7, AP -1.1, mIoU -1.3
    assert set(cells) == {(r, m) for r in ("- masked attention", "- high-resolution features")
                          for m in ("PQ", "AP", "mIoU")}
    assert cells[("- masked attention", "PQ")]["verdict"] == "agrees"
    assert cells[("- masked attention", "AP")]["verdict"] == "agrees"
    assert cells[("- masked attention", "mIoU")]["verdict"] == "inconclusive"  # -1, 0, +1
    assert cells[("- high-resolution features", "PQ")]["verdict"] == "inconclusive"
    # AP 39 vs 40 and mIoU 44.5 vs 45 on every seed: zero-width intervals below 0, as the paper's
    assert cells[("- high-resolution features", "AP")]["verdict"] == "agrees"
    assert cells[("- high-resolution features", "mIoU")]["verdict"] == "agrees"
    board = render_scoreboard(out)
    row = next(l for l in board.splitlines() if l.startswith("| 4a |"))
    assert [c.strip() for c in row.strip("|").split("|")][3:] == ["4", "0", "2", "0", "6"]
    assert "| 4c |" in board and "not run" in board  # other tables: every finding not run
    total = next(l for l in board.splitlines() if l.startswith("| **total**"))
    assert "| **4** | **0** |" in total
    # the suite's bar (#17): PQ findings with |paper Δ| >= 1.0 must agree, nothing may contradict
    goal = next(l for l in board.splitlines() if l.startswith("**Goal**"))
    from ablations.render import GOAL_MIN_PAPER_DELTA_PQ, scoreboard_cells as sc_cells

    big = [c for n in list_specs() for c in sc_cells(load_spec(n), out)
           if c["metric"] == "PQ" and abs(c["paper_delta"]) >= GOAL_MIN_PAPER_DELTA_PQ]
    assert f": not met. 1 of the {len(big)} such PQ findings agree." in goal
    hr = cells[("- high-resolution features", "PQ")]
    assert (f"Inconclusive: 4a `- high-resolution features` PQ {hr['delta']:+.2f} [{hr['low']:+.2f}, "
            f"{hr['high']:+.2f}] (n=3).") in goal
    assert "Not run: 4b `- all three`;" in goal and goal.endswith("Contradicting (any metric): none.")


def test_task_specific_rows_take_the_class_count_of_their_task():
    """Table 7's instance model trains the synthetic data's 6 thing classes (m2f train refuses a preset's 9
    for task instance); the semantic model keeps all 9; the other rows keep the preset's."""
    from ablations.runner import resolve_config

    spec, sc = load_spec("task_transfer"), get_scale("smoke")
    cfgs = {r.name: resolve_config(spec, r, sc, seed=0) for r in spec.rows}
    assert (cfgs["instance model"].data.task, cfgs["instance model"].num_classes) == ("instance", 6)
    assert (cfgs["semantic model"].data.task, cfgs["semantic model"].num_classes) == ("semantic", 9)
    assert (cfgs["panoptic model"].data.task, cfgs["panoptic model"].num_classes) == ("panoptic", 9)


def test_task_specific_models_pair_on_their_own_task(tmp_path):
    """Table 7: the instance model (scored as instance only) pairs with the panoptic model on AP, the
    semantic model on mIoU; the table says which task each row's model was trained for, and the scoreboard
    counts the instance model's AP (+2 in the paper) as a finding."""
    from ablations.render import render_scoreboard, scoreboard_cells

    out = tmp_path / "reports"
    runs = out / "task_transfer" / "runs.jsonl"
    for seed in range(3):
        pan = _record("panoptic model", seed, 50.0 + seed, 30.0 + seed, 60.0)
        ins = _record("instance model", seed, 0, 0, 0)
        ins["eval"] = {"instance": {"AP": 33.0 + seed + 0.1 * seed}}
        ins["data"] = {**ins["data"], "task": "instance"}
        ins["metrics_over_training"] = [m for m in ins["metrics_over_training"] if "eval" not in m]
        sem = _record("semantic model", seed, 0, 0, 0)
        sem["eval"] = {"semantic": {"mIoU": 60.5 - 0.2 * seed}}
        sem["data"] = {**sem["data"], "task": "semantic"}
        sem["metrics_over_training"] = [m for m in sem["metrics_over_training"] if "eval" not in m]
        for r in (pan, ins, sem):
            append_jsonl(runs, {**r, "ablation": "task_transfer", "table": "7"})
    cells = {(c["row"], c["metric"]): c for c in scoreboard_cells(load_spec("task_transfer"), out)}
    assert set(cells) == {("instance model", "AP")}  # the semantic model's -0.2 is below 0.5
    assert cells[("instance model", "AP")]["verdict"] == "agrees"  # +3.0, +3.1, +3.2
    res = render_ablation("task_transfer", out)
    md = Path(res["table"]).read_text()
    row = next(l for l in md.splitlines() if l.startswith("| instance model"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[1] == "—" and cols[5] == "n/a (instance model)" and cols[6].startswith("34.") and cols[7].startswith("+3.10") and cols[10] == "agrees"
    sem_row = next(l for l in md.splitlines() if l.startswith("| semantic model"))
    assert [c.strip() for c in sem_row.strip("|").split("|")][12].startswith("+0.30 [")  # mIoU Δ: +0.5, +0.3, +0.1
    assert ("ONE model per row, trained for the row's task (panoptic model: panoptic; instance model: instance; "
            "semantic model: semantic)") in md
    board = render_scoreboard(out)
    line = next(l for l in board.splitlines() if l.startswith("| 7 |"))
    assert [c.strip() for c in line.strip("|").split("|")][3:] == ["1", "0", "0", "0", "1"]


def test_goal_line_names_each_contradiction_with_its_interval(tmp_path):
    """A finding that contradicts the paper, in any metric, fails the suite's bar and is named on the
    scoreboard's goal line with its Δ [95% interval] and pairs (Table 7's instance model, AP lower)."""
    from ablations.render import render_scoreboard

    out = tmp_path / "reports"
    runs = out / "task_transfer" / "runs.jsonl"
    for seed in range(3):
        pan = _record("panoptic model", seed, 50.0, 30.0 + seed, 60.0)
        ins = _record("instance model", seed, 0, 0, 0)
        ins["eval"] = {"instance": {"AP": 26.0 + seed + 0.5 * seed}}  # -4.0, -3.5, -3.0
        ins["data"] = {**ins["data"], "task": "instance"}
        ins["metrics_over_training"] = [m for m in ins["metrics_over_training"] if "eval" not in m]
        for r in (pan, ins):
            append_jsonl(runs, {**r, "ablation": "task_transfer", "table": "7"})
    goal = next(l for l in render_scoreboard(out).splitlines() if l.startswith("**Goal**"))
    assert ": not met." in goal
    assert goal.endswith("Contradicting (any metric): 7 `instance model` AP -3.50 [-4.74, -2.26] (n=3).")


def test_findings_over_training_pair_each_evaluation_and_task_rows_get_their_own_panel(tmp_path):
    """The table gives each finding's paired Δ at every evaluation (mean ± 95% half-width; bold when the
    interval excludes 0), the convergence plot gets a panel for the instance model's own metric (AP),
    and the spec's proxy note is rendered at a cpu scale."""
    from ablations.render import findings_over_training, plot_convergence, select_records

    out = tmp_path / "reports"
    runs = out / "task_transfer" / "runs.jsonl"
    for seed in range(3):
        pan = _record("panoptic model", seed, 50.0, 30.0 + seed, 60.0)
        for k, m in enumerate(e for e in pan["metrics_over_training"] if "eval" in e):
            m["eval"]["instance"] = {"AP": 10.0 * (k + 1) + seed}
        ins = _record("instance model", seed, 0, 0, 0)
        ins["data"] = {**ins["data"], "task": "instance"}
        ins["metrics_over_training"] = [m for m in ins["metrics_over_training"] if "eval" not in m] + [
            {"iter": 20 * (k + 1), "eval": {"instance": {"AP": 10.0 * (k + 1) + seed - k * (1 + 0.1 * seed)}}}
            for k in range(3)]
        ins["eval"] = {"instance": {"AP": ins["metrics_over_training"][-1]["eval"]["instance"]["AP"]}}
        for r in (pan, ins):
            append_jsonl(runs, {**r, "ablation": "task_transfer", "table": "7"})
    res = render_ablation("task_transfer", out)
    md = Path(res["table"]).read_text()
    spec = load_spec("task_transfer")
    _, records, _ = select_records(read_jsonl(runs))
    iters, findings = findings_over_training(spec, records, res["rows"])
    assert iters == [20, 40, 60] and [(f["row"], f["metric"]) for f in findings] == [("instance model", "AP")]
    by = findings[0]["by_iter"]
    assert by[20]["delta"] == 0.0 and by[20]["n"] == 3
    assert abs(by[40]["delta"] + 1.1) < 1e-9 and abs(by[60]["delta"] + 2.2) < 1e-9 and by[60]["high"] < 0
    line = next(l for l in md.splitlines() if l.startswith("| instance model | AP |"))
    assert [c.strip() for c in line.strip("|").split("|")][2:] == ["+2.0", "+0.0 ± 0.0", "**-1.1 ± 0.2**",
                                                                    "**-2.2 ± 0.5**"]
    assert "**Proxy:** The synthetic data's instance ground truth is its panoptic thing segments" in md
    assert plot_convergence(spec, records, tmp_path / "c.png") == "PQ, AP"
    assert "_PQ, AP vs iteration" in md


def test_the_point_loss_proxy_note_states_the_configs_it_compares():
    """Table 5's proxy note quotes sizes and point counts: they must be the cpu recipe's and the paper
    preset's, and the proxy's point rows must sample the paper's share of the mask logits (a recipe
    change that would make the note wrong fails here)."""
    from ablations.runner import plan_runs

    spec = load_spec("point_loss")
    note = " ".join(spec.proxy_note.split())
    plans = {p.row.name: p.cfg for p in plan_runs(spec, get_scale("cpu"), seeds=1)}
    cfg, paper = plans["point -> point"], get_preset("r50_coco_panoptic")
    for c in (cfg, paper):
        side = c.data.image_size // 4  # mask logits at stride 4
        assert f"{side}x{side} logits ({c.data.image_size}-px crops" in note
        assert round(100 * c.loss.num_points / side ** 2) == 19 and "19%" in note  # the same share
        root = math.isqrt(c.loss.num_points)
        assert root * root == c.loss.num_points and f"({root}x{root}" in note
    assert f"{paper.loss.num_points} points" in note and f"loss.num_points = {cfg.loss.num_points}" in note
    assert all(plans[r].loss.num_points == cfg.loss.num_points for r in ("mask -> point", "point -> mask"))
    dense = get_scale("cpu").overrides["loss.num_points"]
    assert dense == 32 * 32 and f"every row sampled {dense} points, as many as there are logits" in note
    assert plans["mask -> mask"].loss.num_points == dense  # the tiny default's run, unchanged


def test_the_queries_proxy_note_states_the_synthetic_data_it_describes():
    """Table 11a's proxy note quotes the segments per synthetic training image: they must be the data's."""
    import json
    import statistics

    from ablations.runner import plan_runs
    from m2f.data.synth import ensure_synth

    note = " ".join(load_spec("queries").proxy_note.split())
    cfg = plan_runs(load_spec("queries"), get_scale("cpu"))[0].cfg
    d = cfg.data
    assert d.train == "synth"
    ann = json.loads((ensure_synth(d.synth_size, d.synth_images, d.synth_val_images, d.synth_seed) / "train"
                      / "panoptic.json").read_text())["annotations"]
    n = [len(a["segments_info"]) for a in ann]
    assert (f"hold {min(n)} to {max(n)} segments each (mean {statistics.fmean(n):.1f} over the {len(n)} images"
            in note)
    fewest = min(r.overrides["decoder.num_queries"] for r in load_spec("queries").rows)
    assert f"the {fewest}-query row" in note and fewest / max(n) > 4  # "more than four queries per segment"


def test_a_proxy_note_must_be_text(tmp_path):
    from ablations.spec import SPEC_DIR

    src = (SPEC_DIR / "task_transfer.toml").read_text()
    bad = tmp_path / "task_transfer.toml"
    bad.write_text(src.replace('proxy_note = """', 'proxy_note_x = """').replace("seeds = [0, 1, 2]",
                                                                               "seeds = [0, 1, 2]\nproxy_note = 3"))
    with pytest.raises(InputError, match="proxy_note must be a non-empty string"):
        load_spec(bad)


def test_rows_paired_on_fewer_seeds_than_the_base_get_no_verdict(tmp_path):
    """A table still being run (the base row shared with all its seeds, a row with 2 so far) renders
    the row as incomplete, and the scoreboard counts its findings as not run."""
    from ablations.render import render_scoreboard, scoreboard_cells

    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    for seed in range(3):
        append_jsonl(runs, _record("full model", seed, 50.0 + seed, 40.0, 45.0))
        append_jsonl(runs, _record("- high-resolution features", seed, 45.0 + seed, 35.0, 40.0))
        if seed < 2:
            append_jsonl(runs, _record("- masked attention", seed, 40.0 + seed, 30.0 - seed, 35.0 + seed))
    cells = {(c["row"], c["metric"]): c for c in scoreboard_cells(load_spec("masked_attention"), out)}
    assert {cells[("- masked attention", m)]["verdict"] for m in ("PQ", "AP", "mIoU")} == {"not run"}
    assert cells[("- high-resolution features", "PQ")]["verdict"] == "agrees"  # -5 on all 3 seeds
    row = next(l for l in render_scoreboard(out).splitlines() if l.startswith("| 4a |"))
    assert [c.strip() for c in row.strip("|").split("|")][2:] == ["cpu (n=3)", "3", "0", "0", "3", "6"]
    md = Path(render_ablation("masked_attention", out)["table"]).read_text()
    line = next(l for l in md.splitlines() if l.startswith("| - masked attention"))
    assert line.count("incomplete (2/3 seeds)") == 4 and "agrees" not in line  # PQ, AP, mIoU, FLOPs


def test_second_look_error_is_the_nominal_rate_without_added_seeds_and_higher_with_them():
    from ablations.stats import second_look_error

    assert second_look_error(5, 5) == pytest.approx(0.05, abs=0.002)  # one look: the t interval's own 5%
    assert second_look_error(3, 3) == pytest.approx(0.05, abs=0.002)
    e8, e12 = second_look_error(5, 8), second_look_error(5, 12)
    assert 0.075 < e8 < 0.09 and e8 < e12 < 0.1  # a second look adds false verdicts, more the later it comes
    from ablations.stats import second_look_confidence

    c = second_look_confidence(5, 8)
    assert 0.965 < c < 0.975 and second_look_error(5, 8, confidence=c) == pytest.approx(0.05, abs=0.001)
    assert second_look_confidence(5, 5) == pytest.approx(0.95)
    assert second_look_error(1, 2) == pytest.approx(0.05, abs=0.002)  # one seed first: no first interval
    with pytest.raises(ValueError):
        second_look_error(5, 4)


def test_seeds_for_half_width():
    from ablations.stats import seeds_for_half_width, t_quantile

    n = seeds_for_half_width(1.0, 1.0)  # t_{n-1} / sqrt(n) < 1 from n = 7 on
    assert n == 7 and t_quantile(5) / 6 ** 0.5 >= 1.0 > t_quantile(6) / 7 ** 0.5
    assert seeds_for_half_width(None, 1.0) is None and seeds_for_half_width(1.0, 0.0) is None
    assert seeds_for_half_width(100.0, 0.1) == 201  # beyond the cap


def test_signed_rank_p_is_wilcoxons_exact_two_sided_p():
    from ablations.stats import signed_rank_p

    assert signed_rank_p([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(2 / 2 ** 5)  # all 5 one side
    assert signed_rank_p([1.0, -2.0, -3.0, 4.0]) == pytest.approx(1.0)  # rank sums 5 and 5: balanced
    assert signed_rank_p([1.0]) is None and signed_rank_p([0.0, 0.0]) is None


def test_extra_seeds_for_one_row_keep_the_other_rows_complete_and_are_disclosed(tmp_path):
    """`run NAME --seeds 8 --row ROW --row BASE` gives one row and its base row more seeds than the
    scale's 5 (cpu): the other rows, paired on the 5, keep their verdicts; a row with fewer than 5 pairs
    is still incomplete; the table names the row with extra seeds and warns about a second look."""
    from ablations.render import render_scoreboard, scoreboard_cells

    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    for seed in range(8):
        append_jsonl(runs, _record("full model", seed, 50.0 + seed, 40.0, 45.0))
        append_jsonl(runs, _record("- masked attention", seed, 48.0 + seed + (seed % 2) * 0.5, 38.0, 44.0))
        if seed < 5:
            append_jsonl(runs, _record("- high-resolution features", seed, 45.0 + seed, 35.0, 40.0))
    cells = {(c["row"], c["metric"]): c for c in scoreboard_cells(load_spec("masked_attention"), out)}
    assert cells[("- masked attention", "PQ")]["pairs"] == 8
    assert cells[("- masked attention", "PQ")]["verdict"] == "agrees"  # -2 / -1.5 alternating
    assert cells[("- masked attention", "PQ")]["low"] < -1.75 - 2.365 * 0.267 / 8 ** 0.5  # wider than 95%
    assert cells[("- high-resolution features", "PQ")]["pairs"] == 5
    assert cells[("- high-resolution features", "PQ")]["verdict"] == "agrees"  # -5 on all 5: not incomplete
    row = next(l for l in render_scoreboard(out).splitlines() if l.startswith("| 4a |"))
    assert [c.strip() for c in row.strip("|").split("|")][2:] == ["cpu (n=5), cpu (n=8, 97.1%)", "6", "0", "0", "0",
                                                                 "6"]  # the extended row's confidence named
    assert "a row given extra seeds after its first look: at the two-look design's confidence" in render_scoreboard(out)
    md = Path(render_ablation("masked_attention", out)["table"]).read_text()
    assert "**Extra seeds:** `- masked attention` is paired on 8 seeds, more than the 5 of the other rows" in md
    assert "second look" in md and "exclude 0 in 8.2% of tables at 8 seeds, not 5%" in md
    assert "two-look design that errs in 5% (97.1% at 8 seeds" in md
    line = next(l for l in md.splitlines() if l.startswith("| - masked attention"))
    assert "(n=8, 97.1%)" in line and "(n=5)" not in line
    assert "(n=5)" in next(l for l in md.splitlines() if l.startswith("| - high-resolution"))
    assert "incomplete" not in md
    # the extended row seed by seed, with a rank test beside the interval (exact: 2 / 2**8 when all 8 agree)
    line = next(l for l in md.splitlines() if l.startswith("- `- masked attention` PQ (n=8): "))
    assert line.startswith("- `- masked attention` PQ (n=8): seed 0 -2.00, seed 1 -1.50, seed 2 -2.00")
    assert line.endswith("8 of 8 below 0, median -1.75; signed-rank p 0.008 (below the two-look level 0.029).")
    assert not any(l.startswith("- `- high-resolution features` PQ (n=") for l in md.splitlines())
    # a row paired on 4 of the scale's 5 seeds is still a table being run
    runs.write_text("".join(l for l in runs.read_text().splitlines(keepends=True)
                            if not ('"- high-resolution features"' in l and '"seed": 4,' in l)))
    md = Path(render_ablation("masked_attention", out)["table"]).read_text()
    line = next(l for l in md.splitlines() if l.startswith("| - high-resolution features"))
    assert "incomplete (4/5 seeds)" in line and "agrees" not in line
    # a whole table at 8 seeds: no row has extra seeds
    for seed in range(4, 8):
        append_jsonl(runs, _record("- high-resolution features", seed, 45.0 + seed, 35.0, 40.0))
    md = Path(render_ablation("masked_attention", out)["table"]).read_text()
    assert "Extra seeds" not in md and "incomplete" not in md


def test_render_table_csv_and_plot(tmp_path):
    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    # full model: PQ 50, 52 (mean 51, std 1.414); - masked attention: PQ 46, 46 (paired diffs -4, -6: -5
    # [-17.7, +7.7]: inconclusive with 2 seeds); - high-res: PQ 51.5, 50.5 (diffs +1.5, -1.5: inconclusive)
    for seed, (a, b, c) in enumerate([(50, 46, 51.5), (52, 46, 50.5)]):
        append_jsonl(runs, _record("full model", seed, a, 40.0, 45.0, gflops=2.0))
        append_jsonl(runs, _record("- masked attention", seed, b, 41.0 + seed, 44.0, gflops=1.8))
        append_jsonl(runs, _record("- high-resolution features", seed, c, 39.0, 44.5, gflops=1.9))
    append_jsonl(runs, _record("full model", 0, 1.0, 1.0, 1.0, scale="smoke"))  # other scale: not in the cpu table
    res = render_ablation("masked_attention", out, scale="cpu")
    md = Path(res["table"]).read_text()
    assert "51.00 ± 1.41 (n=2)" in md  # base PQ
    assert "46.00 ± 0.00 (n=2)" in md
    assert "-5.00 [-17.71, +7.71] (n=2)" in md and "-4.8" in md  # our paired delta [95%] and the paper's
    assert "Scale:** `cpu`" in md and "object_mask_threshold 0.5" in md and "seeds:** 0, 1" in md
    assert "panoptic-trained model" in md  # honesty label
    table, over = md.split("**Findings over training**")
    lines = [l for l in table.splitlines() if l.startswith("| - masked attention")]
    assert len(lines) == 1
    # the same finding at each of the 3 evaluations (PQ x 1/3, 2/3, 1 in _record): Δ -5 x k/3
    assert "| - masked attention | PQ | -4.8 | -1.7 ± 4.2 | -3.3 ± 8.5 | -5.0 ± 12.7 |" in over.splitlines()
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    # columns: row, then per metric (PQ, AP, mIoU, FLOPs_G): ours, delta [95%] (n), paper, delta paper, verdict
    assert cells[1:6] == ["46.00 ± 0.00 (n=2)", "-5.00 [-17.71, +7.71] (n=2)", "47.1", "-4.8", "inconclusive"]
    # AP: diffs +1, +2 -> +1.5 [-4.85, +7.85]
    assert cells[6:11] == ["41.50 ± 0.71 (n=2)", "+1.50 [-4.85, +7.85] (n=2)", "37.8", "-5.9", "inconclusive"]
    # FLOPs are the same every seed: a zero-width interval below 0 agrees
    assert cells[16:21] == ["1.800 ± 0.000 (n=2)", "-0.200 [-0.200, -0.200] (n=2)", "213", "-13", "agrees"]
    # inconclusive findings with the seeds a useful interval would take (sd 1.41: t_2 * 1.41 / sqrt(3) = 3.5)
    assert ("- `- masked attention` PQ: Δ -5.00 ± 12.71 (n=2), paper -4.8; sd of the per-seed differences 1.41. "
            "Seeds for a half-width below the paper's |Δ|: about 3; below ours: about 3.") in md
    assert "- `- masked attention` AP:" in md and "FLOPs_G: Δ" not in md  # FLOPs are not findings

    rows = list(csv.DictReader(open(res["csv"])))
    by = {(r["row"], r["metric"]): r for r in rows}
    assert by[("- high-resolution features", "PQ")]["verdict"] == "inconclusive"
    assert by[("full model", "PQ")]["verdict"] == "base"
    assert float(by[("- masked attention", "PQ")]["low"]) == pytest.approx(-17.706, abs=1e-3)
    assert float(by[("full model", "PQ")]["mean"]) == pytest.approx(51.0)
    assert by[("full model", "PQ")]["n"] == "2"
    png = Path(res["convergence"]).read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    readme = render_readme(out).read_text()
    assert "Table 4a" in readme and "masked_attention/convergence.png" in readme


def test_render_point_loss_memory_chart(tmp_path):
    out = tmp_path / "reports"
    spec = load_spec("point_loss")
    for r in spec.rows:
        rec = _record(r.name, 0, 40.0, 30.0, 35.0, n_evals=0)
        rec.update(ablation="point_loss", table="5",
                   peak_rss_bytes=(2.0e9 if r.overrides["loss.loss"] == "mask" else 1.0e9))
        append_jsonl(out / "point_loss" / "runs.jsonl", rec)
    res = render_ablation("point_loss", out)
    md = Path(res["table"]).read_text()
    row = [l for l in md.splitlines() if l.startswith("| mask -> mask")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    i = 1 + 5 * res["metrics"].index("memory_GB")
    assert cells[i:i + 5] == ["2.00 (n=1)", "+1.00 (n=1)", "18", "+12", "inconclusive"]  # one seed: no interval
    assert Path(res["memory"]).read_bytes()[:8] == PNG_MAGIC
    assert Path(res["convergence"]).read_bytes()[:8] == PNG_MAGIC  # loss fallback (no periodic evals)


def test_memory_column_is_per_image_when_probed(tmp_path):
    """Records carrying a memory probe report it (memory per image, the paper's quantity) instead of
    the whole run's peak, and the header says so."""
    out = tmp_path / "reports"
    spec = load_spec("point_loss")
    for r in spec.rows:
        rec = _record(r.name, 0, 40.0, 30.0, 35.0, n_evals=0)
        full = r.overrides["loss.loss"] == "mask"
        rec.update(ablation="point_loss", table="5", peak_rss_bytes=1.5e9,
                   memory_probe={"size": 1024, "num_masks": 20, "peak_bytes": 3.0e9 if full else 1.0e9,
                                 "method": "cpu stand-in: peak live tensor bytes", "amp": None})
        append_jsonl(out / "point_loss" / "runs.jsonl", rec)
    res = render_ablation("point_loss", out)
    md = Path(res["table"]).read_text()
    assert "training memory per image" in md and "1024x1024, 20 synthetic target masks" in md
    row = [l for l in md.splitlines() if l.startswith("| mask -> mask")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    i = 1 + 5 * res["metrics"].index("memory_GB")
    assert cells[i:i + 5] == ["3.00 (n=1)", "+2.00 (n=1)", "18", "+12", "inconclusive"]  # one seed: no interval


def test_attach_memory_probes(tmp_path, monkeypatch):
    """One probe per distinct config (seeds share it), written into the matching records of runs.jsonl,
    cached: a second call measures nothing and changes nothing."""
    import m2f.bench.memory
    from ablations.runner import attach_memory_probes, plan_runs

    spec = load_spec("point_loss")
    sc = get_scale("smoke")
    out = tmp_path / "reports"
    plans = plan_runs(spec, sc, seeds=2, runs_root=tmp_path / "runs")
    assert len(plans) == 8
    for p in plans:
        rec = _record(p.row.name, p.seed, 40.0, 30.0, 35.0, scale="smoke")
        rec.update(ablation="point_loss", config_hash=p.config_hash)
        append_jsonl(out / "point_loss" / "runs.jsonl", rec)
    calls = []

    def fake_probe(cfg, size, device="cpu", num_masks=20, fresh_process=True, timeout=0):
        calls.append((cfg.loss.matching, cfg.loss.loss, size, num_masks))
        return {"size": size, "num_masks": num_masks, "peak_bytes": 2e9 if cfg.loss.loss == "mask" else 1e9,
                "method": "test", "amp": None, "rss_peak_bytes": 3e9}

    monkeypatch.setattr(m2f.bench.memory, "probe_memory", fake_probe)
    assert attach_memory_probes(spec, plans, sc, out, "cpu", fresh_process=False) == 8
    assert sorted(calls) == sorted({(m, l, 64, 20) for m in ("mask", "point") for l in ("mask", "point")})
    recs = list(read_jsonl(out / "point_loss" / "runs.jsonl"))
    assert len(recs) == 8
    for rec in recs:
        want = 2.0 if rec["row"].endswith("-> mask") else 1.0
        assert rec["memory_probe"]["peak_bytes"] == want * 1e9 and rec["metrics"]["memory_GB"] == want
    calls.clear()
    assert attach_memory_probes(spec, plans, sc, out, "cpu", fresh_process=False) == 0 and calls == []


def test_a_record_written_without_flops_gets_its_configs_count(tmp_path):
    """Two seeds of a new config run at once and only one counts FLOPs: when the other finishes first,
    its record has none.  The runner's pass after the runs fills it from the FLOPs cache or, without
    one (a fresh clone), from another seed's record of the config; records of another scale or code
    are left alone."""
    from ablations.runner import FLOPS_CACHE, fill_missing_flops, flops_key, plan_runs

    spec = load_spec("point_loss")
    sc = get_scale("smoke")
    out = tmp_path / "reports"
    plans = plan_runs(spec, sc, seeds=2, runs_root=tmp_path / "runs")
    counts = {}
    for p in plans:
        rec = _record(p.row.name, p.seed, 40.0, 30.0, 35.0, scale="smoke")
        rec.update(ablation="point_loss", config_hash=p.config_hash, code_fingerprint=p.fingerprint)
        counts.setdefault(p.row.name, {"gflops": 1.0 + len(counts), "params": 10})
        rec["flops"] = counts[p.row.name] if p.seed == 0 else None
        append_jsonl(out / "point_loss" / "runs.jsonl", rec)
    other = _record("mask -> mask", 1, 40.0, 30.0, 35.0, scale="smoke")
    other.update(ablation="point_loss", config_hash="x", code_fingerprint="0" * 12, flops=None)
    append_jsonl(out / "point_loss" / "runs.jsonl", other)
    assert not (out / FLOPS_CACHE).exists()
    assert fill_missing_flops(spec, plans, sc, out) == 4
    recs = list(read_jsonl(out / "point_loss" / "runs.jsonl"))
    for rec in recs[:-1]:
        assert rec["flops"] == counts[rec["row"]]
        if rec["seed"] == 1:  # filled: its metrics too
            assert rec["metrics"]["FLOPs_G"] == counts[rec["row"]]["gflops"]
    assert recs[-1]["flops"] is None
    assert fill_missing_flops(spec, plans, sc, out) == 0  # nothing left to fill
    # from the cache when no sibling has the count
    recs[1]["flops"] = recs[5]["flops"] = None
    p1 = next(p for p in plans if p.row.name == recs[1]["row"])
    (out / FLOPS_CACHE).write_text(json.dumps({flops_key(p1.cfg, sc.flops_size, p1.fingerprint):
                                               {"gflops": 7.0, "params": 1}}))
    (out / "point_loss" / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert fill_missing_flops(spec, plans, sc, out) == 2  # both seeds of mask -> point
    recs = list(read_jsonl(out / "point_loss" / "runs.jsonl"))
    assert recs[1]["row"] == recs[5]["row"] == "mask -> point"
    assert recs[1]["flops"] == recs[5]["flops"] == {"gflops": 7.0, "params": 1}


def test_memory_probes_in_the_records_survive_a_lost_cache(tmp_path, monkeypatch):
    """The probe cache file is a local convenience (not committed): on a fresh machine the records'
    own probes count as measured.  A new seed's record gets its config's probe from its sibling
    records; no probe is run and no other record is rewritten (a re-measured rss would churn them)."""
    import m2f.bench.memory
    from ablations.runner import MEMORY_CACHE, attach_memory_probes, plan_runs

    spec = load_spec("point_loss")
    sc = get_scale("smoke")
    out = tmp_path / "reports"
    plans = plan_runs(spec, sc, seeds=2, runs_root=tmp_path / "runs")
    n = 0

    def fake_probe(cfg, size, device="cpu", num_masks=20, fresh_process=True, timeout=0):
        nonlocal n
        n += 1
        return {"size": size, "num_masks": num_masks, "peak_bytes": 1e9, "method": "test", "amp": None,
                "rss_peak_bytes": 3e9 + n}  # rss differs on every measurement, as it does for real

    monkeypatch.setattr(m2f.bench.memory, "probe_memory", fake_probe)
    seed0 = [p for p in plans if p.seed == 0]
    for p in seed0:
        rec = _record(p.row.name, p.seed, 40.0, 30.0, 35.0, scale="smoke")
        rec.update(ablation="point_loss", config_hash=p.config_hash)
        append_jsonl(out / "point_loss" / "runs.jsonl", rec)
    assert attach_memory_probes(spec, seed0, sc, out, "cpu", fresh_process=False) == 4 and n == 4
    before = list(read_jsonl(out / "point_loss" / "runs.jsonl"))
    (out / MEMORY_CACHE).unlink()  # a fresh checkout of the committed records
    for p in plans:
        if p.seed == 1:
            rec = _record(p.row.name, p.seed, 40.0, 30.0, 35.0, scale="smoke")
            rec.update(ablation="point_loss", config_hash=p.config_hash)
            append_jsonl(out / "point_loss" / "runs.jsonl", rec)
    assert attach_memory_probes(spec, plans, sc, out, "cpu", fresh_process=False) == 4 and n == 4
    after = list(read_jsonl(out / "point_loss" / "runs.jsonl"))
    assert after[:4] == before
    for rec in after[4:]:
        sib = next(r for r in before if r["row"] == rec["row"])
        assert rec["memory_probe"] == sib["memory_probe"]


def test_a_table_never_mixes_probed_and_run_peak_memory(tmp_path):
    """While some records of a table lack a memory probe (extra seeds whose runner has not probed yet),
    the memory column shows every record's run peak, as its header says, never per-image probes for
    some seeds and whole-run peaks for others."""
    out = tmp_path / "reports"
    spec = load_spec("point_loss")
    for seed in (0, 1):
        for r in spec.rows:
            rec = _record(r.name, seed, 40.0, 30.0, 35.0, n_evals=0)
            rec.update(ablation="point_loss", table="5", peak_rss_bytes=1.5e9 + seed * 1e8)
            if seed == 0:
                rec["memory_probe"] = {"size": 1024, "num_masks": 20, "peak_bytes": 3.0e9, "method": "test",
                                       "amp": None}
            append_jsonl(out / "point_loss" / "runs.jsonl", rec)
    res = render_ablation("point_loss", out)
    md = Path(res["table"]).read_text()
    assert "ours = peak of the whole training run" in md and "ours = training memory per image" not in md
    row = [l for l in md.splitlines() if l.startswith("| mask -> mask")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    i = 1 + 5 * res["metrics"].index("memory_GB")
    assert cells[i] == "1.55 ± 0.07 (n=2)"  # the run peaks 1.5 and 1.6 GB, not the probe's 3.0


def test_probe_memory_measures_the_given_config():
    """m2f.bench.probe_memory (the ablation memory column) runs the config it is given: its own
    matching/loss switches, at the requested size."""
    from m2f.bench.memory import probe_memory

    cfg = get_preset("tiny", ["loss.matching=mask", "loss.loss=mask", "loss.num_points=256"])
    r = probe_memory(cfg, 64, "cpu", num_masks=3, fresh_process=False)
    assert (r["matching"], r["loss"], r["size"], r["num_masks"]) == ("mask", "mask", 64, 3)
    assert r["peak_bytes"] > 1e6


# ---------------------------------------------------------------------------------------------
# Runner: skip / resume logic with a fake trainer (no model needed)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_train(monkeypatch):
    import m2f.flops
    import m2f.train

    calls = []

    def train(cfg, out_dir, resume=False, device=None, progress=True, evaluate_at_end=True, eval_limit=None,
              stop_after=None, log_fn=None):
        calls.append((str(out_dir), resume, cfg.solver.seed, cfg.decoder.cross_attention))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pq = 40.0 + cfg.solver.seed + (5.0 if cfg.decoder.cross_attention == "masked" else 0.0)
        for it in range(1, cfg.solver.max_iters + 1):
            append_jsonl(out / "metrics.jsonl", {"iter": it, "loss": 5.0 / it})
        ev = {"panoptic": {"PQ": pq}, "instance": {"AP": pq / 2}, "semantic": {"mIoU": pq + 1}}
        if evaluate_at_end:
            append_jsonl(out / "metrics.jsonl", {"iter": cfg.solver.max_iters, "eval": ev})
        return {"iter": cfg.solver.max_iters, "final_loss": {"loss": 1.0}, "train_seconds": 0.1,
                "train_images_per_s": 10.0, "peak_memory_bytes": None, "params": 1234, "config_hash": "x",
                **({"eval": ev} if evaluate_at_end else {})}

    flops_calls = []

    def count_flops(cfg, h, w, model=None):
        flops_calls.append((h, w))
        return {"gflops": 1.5, "size": [h, w]}

    monkeypatch.setattr(m2f.train, "train", train)
    monkeypatch.setattr(m2f.flops, "count_flops", count_flops)
    return calls, flops_calls


def test_threads_per_run_can_be_set_apart_from_the_jobs(tmp_path, fake_train):
    """--threads: one run beside another runner on 2 cores keeps the recorded 1 thread (--jobs 1 alone
    would give it every core); 0 is refused."""
    import os

    import torch

    before = torch.get_num_threads()
    msgs = []
    try:
        ab_runner.run_ablation("masked_attention", scale="smoke", seeds=1, out=tmp_path / "r",
                               runs_root=tmp_path / "runs", inline=True, jobs=1, threads=1, rows=["full model"],
                               print_fn=msgs.append)
        assert torch.get_num_threads() == 1  # the inline run set it
        assert any("1 at a time with 1 thread(s) each" in m for m in msgs)
        msgs.clear()
        ab_runner.run_ablation("masked_attention", scale="smoke", seeds=1, out=tmp_path / "r2",
                               runs_root=tmp_path / "runs2", inline=True, jobs=1, rows=["full model"],
                               print_fn=msgs.append)
        assert any(f"1 at a time with {os.cpu_count()} thread(s) each" in m for m in msgs)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(InputError, match="--threads 0: expected >= 1"):
        ab_runner.run_ablation("masked_attention", scale="smoke", out=tmp_path / "r3", threads=0, inline=True)


def test_runner_records_skips_finished_and_recovers(tmp_path, fake_train):
    calls, flops_calls = fake_train
    out, runs = tmp_path / "reports", tmp_path / "runs"
    msgs = []
    s = ab_runner.run_ablation("masked_attention", scale="smoke", seeds=2, out=out, runs_root=runs, inline=True,
                               print_fn=msgs.append)
    assert s["planned"] == 6 and s["ran"] == 6 and s["skipped"] == 0 and not s["failed"]
    assert len(calls) == 6 and all(resume for _, resume, _, _ in calls)
    assert len(flops_calls) == 3  # FLOPs once per config (seed normalised away), at the smoke image size
    assert flops_calls[0] == (64, 64)
    recs = read_jsonl(out / "masked_attention" / "runs.jsonl")
    assert len(recs) == 6
    r = recs[0]
    for key in ("row", "overrides", "scale", "config", "config_hash", "git_commit", "seed", "environment",
                "metrics_over_training", "eval", "metrics", "peak_rss_bytes", "train_images_per_s", "flops",
                "params", "wall_seconds"):
        assert key in r, key
    assert r["config"]["data"]["image_size"] == 64 and r["config"]["solver"]["max_iters"] == 10
    assert all(x["flops"]["gflops"] == 1.5 for x in recs)
    assert len(r["metrics_over_training"]) == 11
    assert any("[6/6]" in m for m in msgs) and any("ETA" in m for m in msgs)
    md = (out / "masked_attention" / "table.md").read_text()
    assert "45.50 ± 0.71 (n=2)" in md  # full model PQ over seeds 0, 1

    # Re-run: everything finished -> nothing trains.
    s2 = ab_runner.run_ablation("masked_attention", scale="smoke", seeds=2, out=out, runs_root=runs, inline=True,
                                print_fn=msgs.append)
    assert s2["skipped"] == 6 and s2["ran"] == 0 and len(calls) == 6
    # More seeds: only the new seed trains.
    s3 = ab_runner.run_ablation("masked_attention", scale="smoke", seeds=3, out=out, runs_root=runs, inline=True,
                                print_fn=msgs.append)
    assert s3["ran"] == 3 and len(calls) == 9 and {c[2] for c in calls[6:]} == {2}
    # A run that finished training but lost its record (killed before the append) is recorded, not retrained.
    lines = (out / "masked_attention" / "runs.jsonl").read_text().splitlines()
    (out / "masked_attention" / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    s4 = ab_runner.run_ablation("masked_attention", scale="smoke", seeds=3, out=out, runs_root=runs, inline=True,
                                print_fn=msgs.append)
    assert s4["ran"] == 0 and len(calls) == 9
    assert len(read_jsonl(out / "masked_attention" / "runs.jsonl")) == 9


def test_runner_failure_is_reported_not_recorded(tmp_path, monkeypatch):
    import m2f.train

    def boom(cfg, out_dir, **kw):
        raise FloatingPointError("nan loss")

    monkeypatch.setattr(m2f.train, "train", boom)
    s = ab_runner.run_ablation("query_init", scale="smoke", out=tmp_path / "r", runs_root=tmp_path / "runs",
                               inline=True, rows=["zero"], print_fn=lambda m: None)
    assert len(s["failed"]) == 1 and "nan loss" in s["failed"][0][1]
    assert read_jsonl(tmp_path / "r" / "query_init" / "runs.jsonl") == []
    assert len(read_jsonl(tmp_path / "r" / "query_init" / "failures.jsonl")) == 1


def test_proposals_ablation_with_mocked_evaluation(tmp_path, fake_train, monkeypatch):
    import m2f.evaluate

    monkeypatch.setattr(m2f.evaluate, "load_model_from_checkpoint", lambda path, device=None: (object(), None))
    ev = {"panoptic": {"PQ": 30.0}, "proposals": {f"AR@100_layer{l}": 20.0 + l for l in range(10)}}
    monkeypatch.setattr(m2f.evaluate, "evaluate_model", lambda model, cfg, **kw: ev if kw.get("proposals") else {})
    out = tmp_path / "reports"
    s = ab_runner.run_ablation("proposals", scale="smoke", out=out, runs_root=tmp_path / "runs", inline=True,
                               print_fn=lambda m: None)
    assert s["ran"] == 1
    res = render_ablation("proposals", out)
    assert res["metrics"][:10] == [f"AR@100_layer{l}" for l in range(10)]  # numeric order (layer10 after layer9)
    md = Path(res["table"]).read_text()
    assert "| AR@100_layer9 | 29.00 (n=1) | n/a |" in md
    assert "| PQ | 30.00 (n=1) | n/a |" in md
    assert Path(res["proposals"]).read_bytes()[:8] == PNG_MAGIC


def test_paper_scale_dry_run_prints_torchrun_commands(tmp_path):
    s = ab_runner.run_ablation("masked_attention", scale="paper", dry_run=True, out=tmp_path, print_fn=lambda m: None)
    assert len(s["commands"]) == 3
    cmd = s["commands"][1]
    assert cmd.startswith("torchrun ") and "-m m2f train --preset r50_coco_panoptic" in cmd
    assert "--set decoder.cross_attention=standard" in cmd and "--set data.train=coco_2017_train_panoptic" in cmd
    assert "--resume" in cmd and not (tmp_path / "masked_attention" / "runs.jsonl").exists()


def test_cli_help_and_list(capsys):
    from ablations.cli import main

    for argv in (["--help"], ["run", "--help"], ["report", "--help"], ["list", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert main(["list", "--out", "/nonexistent"]) == 0
    assert "masked_attention" in capsys.readouterr().out


def test_list_names_incomplete_tables_and_their_short_rows(tmp_path, capsys):
    """A current table with a trained row below the scale's seeds is INCOMPLETE, and list names the row
    and its seeds; a table with every row at the scale's seeds stays current."""
    from ablations.cli import main

    out = tmp_path / "reports"
    for seed in range(5):
        for row in ("full model", "- high-resolution features") + (("- masked attention",) if seed < 2 else ()):
            append_jsonl(out / "masked_attention" / "runs.jsonl", _record(row, seed, 50.0, 40.0, 45.0))
        append_jsonl(out / "query_init" / "runs.jsonl", {**_record("zero", seed, 50.0, 40.0, 45.0),
                                                          "ablation": "query_init"})
        for row in ("learnable, unsupervised", "learnable + supervised"):
            append_jsonl(out / "query_init" / "runs.jsonl", {**_record(row, seed, 50.0, 40.0, 45.0),
                                                              "ablation": "query_init"})
    assert main(["list", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    line = {l.split()[0]: l.split()[4] for l in text.splitlines() if l.split() and l.split()[0] in list_specs()
            and not l.startswith(" ")}
    assert line["masked_attention"] == "INCOMPLETE" and line["query_init"] == "current"
    assert "1 table(s) INCOMPLETE" in text
    assert "  masked_attention (cpu, 5 seeds per row): '- masked attention' 2" in text.splitlines()


# ---------------------------------------------------------------------------------------------
# One real smoke-scale run (needs the model, data, loss and evaluation modules)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smoke_run_produces_table_and_plot(tmp_path):
    from ablations.cli import main

    t0 = time.perf_counter()
    out, runs = tmp_path / "reports", tmp_path / "runs"
    argv = ["run", "masked_attention", "--scale", "smoke", "--out", str(out), "--runs", str(runs), "--jobs", "2",
            "--row", "full model", "--row", "- masked attention"]
    assert main(argv) == 0
    recs = read_jsonl(out / "masked_attention" / "runs.jsonl")
    assert len(recs) == 2
    for r in recs:
        assert r["iters"] == 10 and r["config"]["data"]["image_size"] == 64
        assert r["metrics"]["FLOPs_G"] > 0 and r["params"] > 0 and r["peak_rss_bytes"] > 0
        assert "PQ" in r["metrics"] and 0 <= r["metrics"]["PQ"] <= 100
        assert any("eval" in m for m in r["metrics_over_training"])
    md = (out / "masked_attention" / "table.md").read_text()
    assert "| **full model** |" in md and "(n=1)" in md
    assert (out / "masked_attention" / "convergence.png").read_bytes()[:8] == PNG_MAGIC
    # resume: a second invocation trains nothing
    assert main(argv) == 0
    assert len(read_jsonl(out / "masked_attention" / "runs.jsonl")) == 2
    print(f"smoke run wall time: {time.perf_counter() - t0:.1f}s")


def test_splice_into_readme_copies_generated_tables_between_markers(tmp_path):
    from ablations.render import README_BEGIN, README_END, splice_into_readme

    out = tmp_path / "reports"
    (out / "masked_attention").mkdir(parents=True)
    (out / "masked_attention" / "table.md").write_text("# Paper Table 4a: X\n\n| a |\n|---|\n\n![convergence](convergence.png)\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nstale\n{README_END}\noutro\n")
    assert splice_into_readme(out, readme) == readme
    text = readme.read_text()
    assert "stale" not in text and "### Paper Table 4a: X" in text
    assert "](reports/masked_attention/convergence.png)" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    no_markers = tmp_path / "OTHER.md"
    no_markers.write_text("nothing")
    assert splice_into_readme(out, no_markers) is None and no_markers.read_text() == "nothing"


def test_records_from_another_machine_do_not_count_as_finished(tmp_path):
    """A fresh clone carries reports/<ablation>/runs.jsonl: the main job must still train there."""
    from ablations.runner import RESULT_NAME, finished_keys

    here = tmp_path / "runs" / "a" / "seed0_h"
    here.mkdir(parents=True)
    (here / RESULT_NAME).write_text("{}")
    path = tmp_path / "runs.jsonl"
    recs = [{"row": "full model", "seed": 0, "scale": "cpu", "config_hash": "h", "run_dir": str(here)},
            {"row": "full model", "seed": 1, "scale": "cpu", "config_hash": "h2",
             "run_dir": str(tmp_path / "elsewhere" / "seed1_h2")}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert finished_keys(path) == {("full model", 0, "cpu", "h", None)}  # + the code fingerprint (none in this record)


def test_identical_runs_are_shared_across_ablations(tmp_path, fake_train, monkeypatch):
    """The base model most tables share (same config hash, seed, scale) trains once on a machine."""
    import m2f.evaluate

    calls, _ = fake_train
    out, runs = tmp_path / "reports", tmp_path / "runs"
    s = ab_runner.run_ablation("masked_attention", scale="smoke", out=out, runs_root=runs, inline=True,
                               print_fn=lambda m: None)
    assert s["ran"] == 3 and s["shared"] == 0 and len(calls) == 3
    src = [r for r in read_jsonl(out / "masked_attention" / "runs.jsonl") if r["row"] == "full model"][0]
    msgs = []
    s2 = ab_runner.run_ablation("query_init", scale="smoke", out=out, runs_root=runs, inline=True,
                                print_fn=msgs.append)
    assert s2["shared"] == 1 and s2["ran"] == 2 and len(calls) == 5
    assert any("sharing learnable + supervised" in m for m in msgs)
    rec = [r for r in read_jsonl(out / "query_init" / "runs.jsonl") if r["row"] == "learnable + supervised"][0]
    assert rec["shared_from"] == src["run_dir"] and rec["run_dir"] != src["run_dir"]
    assert rec["metrics"]["PQ"] == src["metrics"]["PQ"] == 45.0
    assert rec["metrics_over_training"] == src["metrics_over_training"] and rec["config_hash"] == src["config_hash"]
    md = (out / "query_init" / "table.md").read_text()
    assert "**Shared runs:** learnable + supervised = the identical run of `masked_attention`" in md
    # optimization's "- learnable query features" is query_init's "zero": shared from a shared table too
    s3 = ab_runner.run_ablation("optimization", scale="smoke", out=out, runs_root=runs, inline=True,
                                print_fn=lambda m: None)
    assert s3["shared"] == 2 and s3["ran"] == 3 and len(calls) == 8
    # a re-run skips (no second share); --no-share trains
    s4 = ab_runner.run_ablation("query_init", scale="smoke", out=out, runs_root=runs, inline=True,
                                print_fn=lambda m: None)
    assert s4["skipped"] == 3 and s4["shared"] == 0 and s4["ran"] == 0
    s5 = ab_runner.run_ablation("task_transfer", scale="smoke", out=out, runs_root=runs, inline=True, share=False,
                                print_fn=lambda m: None)
    assert s5["ran"] == 3 and s5["shared"] == 0 and len(calls) == 11  # panoptic, instance and semantic models
    # proposals need per-layer AR the source did not compute: evaluated from its final checkpoint
    (Path(src["run_dir"]) / "last.pth").write_bytes(b"stand-in")
    seen = []
    monkeypatch.setattr(m2f.evaluate, "load_model_from_checkpoint",
                        lambda path, device=None: (seen.append(str(path)) or object(), None))
    ev = {"panoptic": {"PQ": 45.0}, "proposals": {f"AR@100_layer{l}": 20.0 + l for l in range(10)}}
    monkeypatch.setattr(m2f.evaluate, "evaluate_model", lambda model, cfg, **kw: ev if kw.get("proposals") else {})
    s6 = ab_runner.run_ablation("proposals", scale="smoke", out=out, runs_root=runs, inline=True,
                                print_fn=lambda m: None)
    assert s6["shared"] == 1 and s6["ran"] == 0 and len(calls) == 11
    assert seen and Path(seen[0]).parent == Path(src["run_dir"])
    prec = read_jsonl(out / "proposals" / "runs.jsonl")[0]
    assert prec["metrics"]["AR@100_layer9"] == 29.0
    # the source's own result file is untouched
    assert "proposals" not in json.loads((Path(src["run_dir"]) / ab_runner.RESULT_NAME).read_text())["summary"]["eval"]


def test_runs_are_shared_from_committed_records_on_a_fresh_clone(tmp_path, fake_train):
    """A fresh clone has reports/*/runs.jsonl but no run directories.  By default it reproduces:
    nothing is copied from the committed records.  With ``reuse_records`` (continuing tables on
    another machine) the identical run is recorded from the committed record (self-contained)
    instead of retrained, the table's own committed records count as finished, and proposals,
    which need the checkpoint, still train."""
    import shutil

    calls, _ = fake_train
    out, runs = tmp_path / "reports", tmp_path / "runs"
    ab_runner.run_ablation("masked_attention", scale="smoke", out=out, runs_root=runs, inline=True,
                           print_fn=lambda m: None)
    assert len(calls) == 3
    src = [r for r in read_jsonl(out / "masked_attention" / "runs.jsonl") if r["row"] == "full model"][0]
    shutil.rmtree(runs)  # the clone: records only
    clone = tmp_path / "clone_reports"
    shutil.copytree(out, clone)
    d = ab_runner.run_ablation("query_init", scale="smoke", out=clone, runs_root=tmp_path / "clone_runs",
                               inline=True, print_fn=lambda m: None)
    assert d["shared"] == 0 and d["ran"] == 3 and len(calls) == 6  # reproduced, not copied
    d2 = ab_runner.run_ablation("masked_attention", scale="smoke", out=clone, runs_root=tmp_path / "clone2_runs",
                                inline=True, print_fn=lambda m: None)
    # the flagship retrains on a clone, sharing only the base run query_init just trained here
    assert d2["skipped"] == 0 and d2["shared"] == 1 and d2["ran"] == 2 and len(calls) == 8
    # continuing: the table's own committed records are finished (not retrained, not appended again)
    n_before = len(read_jsonl(out / "masked_attention" / "runs.jsonl"))
    c = ab_runner.run_ablation("masked_attention", scale="smoke", out=out, runs_root=runs, inline=True,
                               print_fn=lambda m: None, reuse_records=True)
    assert c["skipped"] == 3 and c["ran"] == 0 and c["shared"] == 0 and len(calls) == 8
    assert len(read_jsonl(out / "masked_attention" / "runs.jsonl")) == n_before
    msgs = []
    s = ab_runner.run_ablation("query_init", scale="smoke", out=out, runs_root=runs, inline=True, print_fn=msgs.append,
                               reuse_records=True)
    assert s["shared"] == 1 and s["ran"] == 2 and len(calls) == 10
    assert any("sharing learnable + supervised" in m and "masked_attention/runs.jsonl" in m for m in msgs)
    done = [m for m in msgs if "recorded learnable + supervised / seed 0 from its identical run" in m]
    assert len(done) == 1 and "whole ablation ETA" in done[0] and "ETA 0m00s" not in done[0]  # 2 runs still to train
    rec = [r for r in read_jsonl(out / "query_init" / "runs.jsonl") if r["row"] == "learnable + supervised"][0]
    assert rec["shared_from"] == src["run_dir"] and "masked_attention/runs.jsonl (full model, seed 0)" in rec["shared_from_record"]
    assert rec["metrics"] == src["metrics"] and rec["metrics_over_training"] == src["metrics_over_training"]
    assert rec["eval"] == src["eval"] and rec["git_commit"] == src["git_commit"]
    assert (rec["config_hash"], rec["code_fingerprint"]) == (src["config_hash"], src["code_fingerprint"])
    # the resumed table skips it; proposals need the checkpoint, which the clone lacks: trained
    s2 = ab_runner.run_ablation("query_init", scale="smoke", out=out, runs_root=runs, inline=True, print_fn=lambda m: None)
    assert s2["skipped"] == 3 and s2["ran"] == 0 and s2["shared"] == 0
    s3 = ab_runner.run_ablation("proposals", scale="smoke", out=out, runs_root=runs, inline=True, print_fn=lambda m: None,
                                reuse_records=True)
    assert s3["shared"] == 0 and len(calls) == 11, s3  # trained (the fake writes no checkpoint to evaluate)


def test_tables_are_listed_in_paper_order():
    from ablations.render import _paper_order
    from ablations.spec import list_specs

    order = [load_spec(n).table for n in sorted(list_specs(), key=_paper_order)]
    assert order == ["4a", "4b", "4c", "4d", "4e", "5", "7", "11a", "11b", "fig3"]


def test_default_scale_is_the_highest_fidelity_recorded():
    """A smoke pipeline check run after a cpu-scale table does not replace it."""
    from ablations.render import select_records

    fp = _fp()
    recs = [{"scale": "cpu", "row": "a", "seed": 0, "v": 1}, {"scale": "smoke", "row": "a", "seed": 0, "v": 2},
            {"scale": "cpu", "row": "a", "seed": 0, "v": 3}, {"scale": "smoke", "row": "a", "seed": 1, "v": 4},
            {"scale": "quick", "row": "a", "seed": 0, "v": 6}]
    recs = [{**r, "code_fingerprint": fp} for r in recs]
    scale, sel, info = select_records(recs)
    assert scale == "cpu" and [r["v"] for r in sel] == [3] and info["fingerprint"] == fp and not info["stale"]
    assert select_records(recs, "smoke")[0] == "smoke" and len(select_records(recs, "smoke")[1]) == 2
    assert select_records(recs + [{"scale": "paper", "row": "a", "seed": 0, "v": 5}])[0] == "paper"
    assert select_records([{"scale": "smoke", "row": "a", "seed": 0}])[0] == "smoke"


def test_flops_are_counted_again_under_new_code_not_taken_from_the_cache(tmp_path, fake_train, monkeypatch):
    """The FLOPs cache is keyed by the code fingerprint too: the same config under other code can be
    another model (Table 4c's SMCA records of 1ebb60d016cf carried fe5233d89935's SMCA count)."""
    import m2f.provenance

    calls, flops_calls = fake_train
    out, runs = tmp_path / "reports", tmp_path / "runs"
    fp0 = m2f.provenance.code_fingerprint()
    ab_runner.run_ablation("masked_attention", scale="smoke", seeds=1, out=out, runs_root=runs, inline=True,
                           print_fn=lambda m: None)
    assert len(flops_calls) == 3
    monkeypatch.setattr(m2f.provenance, "code_fingerprint", lambda root=None: "0123456789ab")
    s = ab_runner.run_ablation("masked_attention", scale="smoke", seeds=1, out=out, runs_root=runs, inline=True,
                               print_fn=lambda m: None)
    assert s["ran"] == 3 and len(flops_calls) == 6  # counted again, once per config
    recs = read_jsonl(out / "masked_attention" / "runs.jsonl")
    assert sorted(r["flops"]["code_fingerprint"] for r in recs) == sorted([fp0] * 3 + ["0123456789ab"] * 3)
    assert all(r["flops"]["code_fingerprint"] == r["code_fingerprint"] for r in recs)


def test_carry_counts_an_earlier_versions_records_only_for_rows_retrained_identically(tmp_path, capsys):
    """`carry --from OLD`: a row whose runs retrained by the current code computed exactly what OLD's
    did gets OLD's other seeds as current records (marked, FLOPs recounted by the CLI); a row that
    differs, or was not retrained, does not; the table header names what was carried."""
    from ablations.records import carry_records, compare_versions, same_computation

    old, cur = "0123456789ab", _fp()
    spec = load_spec("masked_attention")
    recs = []
    for seed in range(3):
        for row, pq in (("full model", 50.0), ("- masked attention", 45.0), ("- high-resolution features", 47.0)):
            r = _record(row, seed, pq + seed, 30.0, 40.0, fingerprint=old)
            r["memory_probe"] = {"peak_bytes": 1}
            recs.append(r)
        recs.append(_record("full model", seed, 50.0 + seed, 30.0, 40.0))  # the base row: retrained (shared)
    recs.append(_record("- masked attention", 0, 45.0, 30.0, 40.0))  # retrained: the same computation
    recs.append(_record("- high-resolution features", 0, 47.5, 30.0, 40.0))  # retrained: differs
    carried, why = carry_records(recs, spec, "cpu", old, cur)
    assert sorted((r["row"], r["seed"]) for r in carried) == [("- masked attention", 1), ("- masked attention", 2)]
    assert why["- high-resolution features"].startswith("not carried: seed 0 final evaluation differs")
    assert why["full model"] == "nothing to carry (every seed retrained)"
    for r in carried:
        assert r["code_fingerprint"] == cur and "memory_probe" not in r
        assert r["carried_from"]["code_fingerprint"] == old and r["carried_from"]["verified_seeds"] == [0]
        assert r["eval"] == next(x for x in recs if x["code_fingerprint"] == old and x["row"] == r["row"]
                                 and x["seed"] == r["seed"])["eval"]
    # a row nobody retrained does not carry
    only_old = [r for r in recs if r["code_fingerprint"] == old]
    assert carry_records(only_old, spec, "cpu", old, cur)[0] == []
    # rendered: the carried seeds complete the row; the header says where they come from
    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    for r in recs + carried:
        append_jsonl(runs, r)
    md = Path(render_ablation("masked_attention", out)["table"]).read_text()
    assert ("**Carried records:** 2 of the 7 records were trained by an earlier code version" in md
            and f"- masked attention: seed(s) 1, 2 from `{old}`, verified on seed(s) 0" in md)
    line = next(l for l in md.splitlines() if l.startswith("| - masked attention"))
    assert "-5.00 [-5.00, -5.00] (n=3)" in line
    from ablations.render import render_scoreboard

    board = next(l for l in render_scoreboard(out).splitlines() if l.startswith("| 4a |"))
    assert f"2 records carried from `{old}`" in board
    from ablations.cli import main

    capsys.readouterr()
    assert main(["list", "--out", str(out)]) == 0
    assert "cpu:7/16 (2 carried)" in next(l for l in capsys.readouterr().out.splitlines()
                                          if l.startswith("masked_attention"))
    assert "incomplete (1/3 seeds)" in next(l for l in md.splitlines() if l.startswith("| - high-resolution"))
    # compare pairs only runs both versions trained, never a carried copy with its source
    assert len(compare_versions(recs + carried, old, cur)) == 5
    # another table sharing a carried run records it as carried too
    from ablations.records import RunPlan, build_record

    src = {**carried[0], "_records_file": "reports/masked_attention/runs.jsonl", "run_dir": str(tmp_path / "src")}
    plan = RunPlan("cross_attention", load_spec("cross_attention").base, 1, "cpu", get_preset("tiny"),
                   src["config_hash"], tmp_path / "runs" / "x", cur)
    res = ab_runner.share_run(plan, src, proposals=False)
    rec = build_record(load_spec("cross_attention"), plan, get_scale("cpu"), res, res["flops"], "abc")
    assert rec["carried_from"] == carried[0]["carried_from"] and rec["shared_from"] == str(tmp_path / "src")
    # curves: an extra line from a resume is tolerated, a different logged value is not
    a, b = _record("x", 0, 1.0, 1.0, 1.0), _record("x", 0, 1.0, 1.0, 1.0)
    b["metrics_over_training"] = b["metrics_over_training"] + [{"iter": 21, "loss": 0.1}]
    assert same_computation(a, b) is None
    b["metrics_over_training"][0] = {**b["metrics_over_training"][0], "loss": 9.0}
    assert same_computation(a, b) == "logged values differ at iteration 10 (loss)"
    # across machines the bits differ for every run: the reason says so, and which machine to retrain on
    xeon = {"cpu": {"model": "Intel(R) Xeon(R) Processor", "isa_class": "avx512"}, "threads": 1}
    epyc = {"cpu": {"model": "AMD EPYC", "isa_class": "avx512"}, "threads": 1}
    a = {**a, "environment": xeon, "kernels": {"gemm_backend": "reference"}}
    b = {**b, "environment": epyc, "kernels": {"gemm_backend": "onednn"}}
    assert same_computation(a, b) == (
        "logged values differ at iteration 10 (loss); they ran on different machines (Intel(R) Xeon(R) Processor "
        "(avx512), gemm reference, 1 thread(s) vs AMD EPYC (avx512), gemm onednn, 1 thread(s)), which do not "
        "reproduce each other's bits: retrain on the first")


def test_carry_check_on_the_committed_records_passes_reproduced_runs_and_fails_the_changed_function():
    """On real records: every run of Tables 4a and 4c that both fe5233d89935 and 1ebb60d016cf trained
    computed the same (two of them resumed between sessions, with the logging artifacts of docs/pending
    0002), except SMCA, whose function 1ebb60d016cf changed."""
    from ablations.records import same_computation

    root = Path(__file__).resolve().parents[1] / "reports"
    verdicts = {}
    for name in ("masked_attention", "cross_attention"):
        recs = read_jsonl(root / name / "runs.jsonl")
        old = {(r["row"], r["seed"], r["config_hash"]): r for r in recs
               if r.get("code_fingerprint") == "fe5233d89935"}
        for r in recs:
            k = (r["row"], r["seed"], r["config_hash"])
            if r.get("code_fingerprint") == "1ebb60d016cf" and k in old and not r.get("carried_from"):
                verdicts[(name,) + k[:2]] = same_computation(old[k], r)
    assert len(verdicts) == 35
    assert {k for k, v in verdicts.items() if v} == {("cross_attention", "SMCA", s) for s in range(5)}
    assert all(v == "final evaluation differs" for v in verdicts.values() if v)


def test_committed_records_count_flops_of_the_model_they_trained():
    """Every committed record's FLOPs come from the model it trained: the FLOPs count's params equal
    the run's own, and a count marked with a code fingerprint is that record's.  (The SMCA records of
    1ebb60d016cf once carried another model's count from the cache.)"""
    root = Path(__file__).resolve().parents[1] / "reports"
    paths = sorted(root.glob("*/runs.jsonl")) + sorted(root.glob("calibration/*/runs.jsonl"))
    assert paths
    checked = 0
    for path in paths:
        for r in read_jsonl(path):
            f = r.get("flops") or {}
            if r.get("params") is not None and f.get("params") is not None:
                assert f["params"] == r["params"], (path, r.get("row"), r.get("seed"), r.get("code_fingerprint"))
                checked += 1
            if f.get("code_fingerprint") is not None:
                assert f["code_fingerprint"] == r.get("code_fingerprint"), (path, r.get("row"), r.get("seed"))
    assert checked > 100


def test_recount_flops_fixes_the_current_codes_records_and_leaves_other_versions_alone(tmp_path):
    from ablations.runner import recount_flops
    from m2f.config import to_dict
    from m2f.flops import count_flops

    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    cfg = get_preset("tiny", ["data.image_size=64", "decoder.cross_attention=smca"])
    stale = {"gflops": 9.5, "params": 1, "size": [64, 64]}  # another model's count
    for seed, fp in ((0, _fp()), (1, _fp()), (0, "0123456789ab")):
        rec = _record("- masked attention", seed, 40.0, 30.0, 35.0, scale="smoke", fingerprint=fp)
        rec.update(config=to_dict(cfg), config_hash=config_hash(cfg), flops=dict(stale))
        rec["metrics"] = {"FLOPs_G": 9.5}
        append_jsonl(runs, rec)
    assert recount_flops(["masked_attention"], out, print_fn=lambda m: None) == {"masked_attention": 2}
    want = count_flops(cfg, 64, 64)
    recs = read_jsonl(runs)
    for r in recs[:2]:
        assert r["flops"] == {**want, "code_fingerprint": _fp()}
        assert r["metrics"]["FLOPs_G"] == pytest.approx(want["gflops"]) and r["metrics"]["FLOPs_G"] != 9.5
    assert recs[2]["flops"] == stale and recs[2]["metrics"] == {"FLOPs_G": 9.5}  # other code: not ours to count
    before = runs.read_text()
    assert recount_flops(["masked_attention"], out, print_fn=lambda m: None) == {"masked_attention": 0}
    assert runs.read_text() == before


def test_memory_probe_identity_includes_execution_only_fields():
    """Activation checkpointing leaves a run's identity alone but changes its memory: the probe cache
    must not mix the two."""
    from ablations.runner import memory_key

    base = get_preset("tiny")
    ckpt = get_preset("tiny", ["backbone.activation_checkpointing=true"])
    assert config_hash(base) == config_hash(ckpt)
    assert memory_key(base, 64) != memory_key(ckpt, 64)
    assert memory_key(base, 64) == memory_key(get_preset("tiny", ["solver.seed=3"]), 64)  # seeds share a probe
    assert memory_key(base, 64) != memory_key(base, 128)


def test_failed_memory_probe_keeps_the_run_peak(tmp_path, monkeypatch):
    import m2f.bench.memory
    from ablations.runner import attach_memory_probes, plan_runs

    spec, sc, out = load_spec("point_loss"), get_scale("smoke"), tmp_path / "reports"
    plans = plan_runs(spec, sc, seeds=1, runs_root=tmp_path / "runs")
    for p in plans:
        rec = _record(p.row.name, p.seed, 40.0, 30.0, 35.0, scale="smoke")
        rec.update(ablation="point_loss", config_hash=p.config_hash)
        append_jsonl(out / "point_loss" / "runs.jsonl", rec)

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(m2f.bench.memory, "probe_memory", boom)
    msgs = []
    assert attach_memory_probes(spec, plans, sc, out, "cpu", print_fn=msgs.append) == 0
    failed = [m for m in msgs if "failed (RuntimeError: out of memory)" in m]
    assert len(failed) == 4, msgs
    assert all("memory_probe" not in r for r in read_jsonl(out / "point_loss" / "runs.jsonl"))


def test_calibration_candidate_schedule_is_recorded_apart_from_the_tables(tmp_path, fake_train):
    """`calibrate --iters N`: Table 4a's rows at the cpu recipe with N iterations (scale cpu-<N>it),
    recorded and rendered under reports/calibration/cpu-<N>it/, never in Table 4a's records."""
    from ablations.calibration import calibrate
    from ablations.scales import cpu_candidate, get_scale

    sc = get_scale("cpu-2000it")
    assert sc.overrides["solver.max_iters"] == 2000 and sc.overrides["solver.eval_period"] == 250
    assert sc.overrides["loss.num_points"] == get_scale("cpu").overrides["loss.num_points"]
    assert cpu_candidate(1500).overrides["solver.eval_period"] == 250  # <= 250 apart, >= 6 points
    with pytest.raises(InputError, match="at least 125"):
        get_scale("cpu-100it")
    calls, _ = fake_train
    out = tmp_path / "reports"
    res = calibrate(out, tmp_path / "runs", seeds=2, iters=250, inline=True)
    assert res["ran"] == 6 and len(calls) == 6 and not res["failed"]
    recs = read_jsonl(out / "calibration" / "cpu-250it" / "masked_attention" / "runs.jsonl")
    assert len(recs) == 6 and {r["scale"] for r in recs} == {"cpu-250it"}
    assert {r["config"]["solver"]["max_iters"] for r in recs} == {250}
    assert not (out / "masked_attention" / "runs.jsonl").exists()
    text = (out / "calibration" / "cpu-250it" / "README.md").read_text()
    assert "python -m ablations calibrate --iters 250" in text and "cpu-250it" in text
    # the fake's base model (masked attention) scores PQ 45 + seed; the variant without it 40 + seed
    assert "| full model | 250 | 45.50 ± 0.71 (2) |" in text
    assert "| - masked attention | 250 | -5.00 [-5.00, -5.00] (2) |" in text
    assert not (out / "calibration" / "README.md").exists()  # the cpu recipe's calibration is untouched


def test_a_changed_recipe_is_never_mixed_into_the_scale_s_tables():
    """The cpu scale moved from 1000 to 2000 iterations: records written as `cpu` with the earlier
    schedule count for the candidate scale cpu-1000it (rendered and labelled as such), never for a
    cpu table; a changed recipe that is no candidate's is `(earlier recipe)`."""
    from ablations.render import select_records
    from ablations.scales import get_scale, recipe_scale

    fp = _fp()
    cpu = get_scale("cpu")

    def rec(v, iters, eval_period, points=cpu.overrides["loss.num_points"], scale="cpu", row_over=None):
        cfg = {"solver": {"max_iters": iters, "eval_period": eval_period, "checkpoint_period": eval_period,
                          "log_period": 10}, "loss": {"num_points": points}}
        return {"scale": scale, "row": "a", "seed": 0, "v": v, "code_fingerprint": fp, "max_iters": iters,
                "config": cfg, "overrides": row_over or {}}

    now = cpu.overrides["solver.max_iters"]
    old = rec(1, 1000, 125)
    cur = rec(2, now, cpu.overrides["solver.eval_period"])
    assert now == 2000 and recipe_scale(cur) == "cpu" and recipe_scale(old) == "cpu-1000it"
    assert recipe_scale(rec(3, 1000, 125, points=3136)) == "cpu (earlier recipe)"
    # a row overriding a recipe knob itself is still the scale's
    assert recipe_scale(rec(4, 1000, 125, points=3136, row_over={"loss.num_points": 3136,
                                                                  "solver.max_iters": 1000,
                                                                  "solver.eval_period": 125,
                                                                  "solver.checkpoint_period": 125})) == "cpu"
    assert recipe_scale({"scale": "cpu", "row": "a"}) == "cpu"  # no config kept: cannot tell
    scale, sel, _ = select_records([old, cur])
    assert scale == "cpu" and [r["v"] for r in sel] == [2]
    scale, sel, _ = select_records([old])  # only the earlier recipe: its own scale, not `cpu`
    assert scale == "cpu-1000it" and [r["v"] for r in sel] == [1]
    assert select_records([old], "cpu")[1] == []
    assert select_records([old, rec(5, 400, 200, scale="quick")])[0] == "cpu-1000it"  # above quick


def test_table_runs_are_shared_from_the_identical_calibration_runs(tmp_path, fake_train, monkeypatch):
    """A calibration candidate whose schedule becomes the cpu recipe has trained the table's runs:
    same config hash, seed, code and val images, so they are recorded, not retrained (the scale's
    name is not part of a run's identity)."""
    from dataclasses import replace

    from ablations import scales
    from ablations.calibration import calibrate

    calls, _ = fake_train
    out, runs = tmp_path / "reports", tmp_path / "runs"
    calibrate(out, runs, seeds=2, iters=250, inline=True)
    assert len(calls) == 6
    monkeypatch.setitem(scales.SCALES, "cpu", replace(scales.cpu_candidate(250), name="cpu"))
    msgs = []
    res = ab_runner.run_ablation("masked_attention", scale="cpu", seeds=3, out=out, runs_root=runs, inline=True,
                                 print_fn=msgs.append)
    assert res["shared"] == 6 and res["ran"] == 3 and len(calls) == 9  # seed 2 is new
    recs = read_jsonl(out / "masked_attention" / "runs.jsonl")
    assert {r["scale"] for r in recs} == {"cpu"} and len(recs) == 9
    shared = [r for r in recs if r["shared_from"]]
    assert len(shared) == 6 and all("calibration/cpu-250it/masked_attention/runs.jsonl" in r["shared_from_record"]
                                    for r in shared)
    # a different number of val images per evaluation is another computation: not shared
    monkeypatch.setitem(scales.SCALES, "cpu", replace(scales.cpu_candidate(250), name="cpu", eval_limit=7))
    res = ab_runner.run_ablation("query_init", scale="cpu", seeds=1, out=out, runs_root=runs, inline=True,
                                 print_fn=lambda m: None)
    assert res["shared"] == 0


def test_calibration_candidates_with_earlier_lr_steps(tmp_path, fake_train):
    """`calibrate --iters N --steps A,B`: the cpu recipe with its lr steps moved, recorded and
    rendered apart as cpu-<N>it-steps<A>-<B>; bad steps are refused with the flag named."""
    from ablations.calibration import calibrate
    from ablations.scales import get_scale, recipe_scale

    sc = get_scale("cpu-500it-steps0.6-0.8")
    assert sc.overrides["solver.steps"] == (0.6, 0.8) and sc.overrides["solver.max_iters"] == 500
    for bad in ("cpu-500it-steps0.8-0.6", "cpu-500it-steps1.5"):
        with pytest.raises(InputError, match="--steps"):
            get_scale(bad)
    calls, _ = fake_train
    out = tmp_path / "reports"
    res = calibrate(out, tmp_path / "runs", seeds=2, iters=250, steps=[0.5, 0.75], inline=True)
    assert res["ran"] == 6 and not res["failed"]
    d = out / "calibration" / "cpu-250it-steps0.5-0.75"
    recs = read_jsonl(d / "masked_attention" / "runs.jsonl")
    assert {tuple(r["config"]["solver"]["steps"]) for r in recs} == {(0.5, 0.75)}
    assert {recipe_scale(r) for r in recs} == {"cpu-250it-steps0.5-0.75"}
    assert "calibrate --iters 250 --steps 0.5,0.75" in (d / "README.md").read_text()
    # a cpu record with moved steps counts for that candidate, not for `cpu`
    moved = {**recs[0], "scale": "cpu"}
    assert recipe_scale(moved) == "cpu-250it-steps0.5-0.75"
    with pytest.raises(InputError, match="--iters"):
        calibrate(out, tmp_path / "runs", steps=[0.5], inline=True)


def test_flagship_time_projects_to_the_avx2_machine_only_from_the_same_cpu(tmp_path):
    """The AVX2 projection is (1ed9e8d's s/it there) / (1ed9e8d's s/it here): 'here' must be the CPU
    the runs ran on, else no projection is made."""
    from ablations.calibration import AVX2_BASE_S_PER_ITER, flagship_time
    from ablations.scales import CPU_JOBS, CPU_SEEDS

    cpu = {"model": "Intel(R) Xeon(R) Processor", "isa_class": "avx512"}
    recs = [{"wall_seconds": 600.0 + i, "environment": {"cpu": cpu}} for i in range(3)]
    (tmp_path / "bench").mkdir()
    t = tmp_path / "bench" / "trees_tiny_1ed9e8d.json"
    t.write_text(json.dumps({"environment": {"cpu": {"model": "AMD EPYC", "isa_class": "avx512"}},
                             "summary": {"side_by_side": {"base_s_per_iter": 1.0}}}))
    ft = flagship_time(recs, tmp_path)
    rounds = -(-3 * CPU_SEEDS // CPU_JOBS)
    assert ft["projected_s"] == pytest.approx(rounds * 601.0) and "projected_avx2_s" not in ft
    assert ft["trees_cpu"] == "AMD EPYC (avx512)"
    # one trees file per CPU: the one measured on the runs' CPU is picked, whatever its suffix
    (tmp_path / "bench" / "trees_tiny_1ed9e8d_xeon.json").write_text(json.dumps(
        {"environment": {"cpu": cpu}, "summary": {"side_by_side": {"base_s_per_iter": 0.9}}}))
    ft = flagship_time(recs, tmp_path)
    assert ft["trees_file"] == "trees_tiny_1ed9e8d_xeon.json" and "trees_cpu" not in ft
    assert ft["avx2_factor"] == pytest.approx(AVX2_BASE_S_PER_ITER / 0.9)
    assert ft["projected_avx2_s"] == pytest.approx(rounds * 601.0 * AVX2_BASE_S_PER_ITER / 0.9)


def test_committed_records_of_the_earlier_recipe_count_as_finished_for_cpu_1000it(tmp_path):
    """`run NAME --scale cpu-1000it --reuse-records` continues the earlier recipe's tables: records
    written as `cpu` with 1000 iterations are finished cpu-1000it runs, never cpu runs."""
    fp = _fp()
    cfg = {"solver": {"max_iters": 1000, "eval_period": 125, "checkpoint_period": 125, "log_period": 10},
           "loss": {"num_points": 1024}}
    path = tmp_path / "runs.jsonl"
    append_jsonl(path, {"row": "full model", "seed": 0, "scale": "cpu", "config_hash": "abc", "code_fingerprint": fp,
                        "max_iters": 1000, "config": cfg, "overrides": {}})
    keys = ab_runner.finished_keys(path, reuse_records=True)
    assert keys == {("full model", 0, "cpu-1000it", "abc", fp)}
    assert ab_runner.finished_keys(path) == set()  # not finished on this machine


def test_report_renders_a_named_code_version_marked_stale(tmp_path):
    """`report --fingerprint FP` renders the tables and the scoreboard of code version FP's records
    (the last complete ones while the current code's tables are retrained), marked STALE and naming
    both versions; without it only the current code's records count."""
    from ablations.render import render_scoreboard
    from ablations.cli import main

    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    old = "0ldc0de00000"
    for seed, (a, b, c) in enumerate([(50, 46, 51.5), (52, 46.5, 50.5), (51, 45, 52.0)]):
        append_jsonl(runs, _record("full model", seed, a, 40.0, 45.0, fingerprint=old))
        append_jsonl(runs, _record("- masked attention", seed, b, 38.0 - seed * 0.1, 44.0 + seed, fingerprint=old))
        append_jsonl(runs, _record("- high-resolution features", seed, c, 39.0, 44.5, fingerprint=old))
    append_jsonl(runs, _record("full model", 0, 70.0, 40.0, 45.0))  # one record of the current code
    row = lambda board: [c.strip() for c in next(l for l in board.splitlines()
                                                 if l.startswith("| 4a |")).strip("|").split("|")][3:]
    assert row(render_scoreboard(out)) == ["0", "0", "0", "6", "6"]
    board = render_scoreboard(out, old)
    assert row(board) == ["4", "0", "2", "0", "6"] and "STALE" in board and old in board and _fp() in board
    assert "STALE" not in render_scoreboard(out, _fp())
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- scoreboard:begin (generated by `python -m ablations report`; do not edit) -->\n"
                      "x\n<!-- scoreboard:end -->\nend\n")
    assert main(["report", "--out", str(out), "--fingerprint", old]) == 0
    md = (out / "masked_attention" / "table.md").read_text()
    assert "(STALE)" in md.splitlines()[0] and old in md and "51.00 ± 1.00 (n=3)" in md and "70.00" not in md
    text = readme.read_text()
    assert f"--fingerprint {old}" in text and "| 4a |" in text and text.startswith("top\n") and text.endswith("end\n")
    assert main(["report", "--out", str(out)]) == 0
    md = (out / "masked_attention" / "table.md").read_text()
    assert "STALE" not in md and "70.00 (n=1)" in md


def test_scoreboard_lists_tables_not_yet_retrained_with_their_earlier_version(tmp_path):
    """While tables are retrained at a new code version, the current scoreboard counts only the current
    code's findings; a table with none of them shows its most recent earlier version's counts in a
    separate STALE block naming that version, kept out of the total.  A table with current findings
    is not listed there, and a board rendered for a named version has no such block."""
    from ablations.render import render_scoreboard

    out = tmp_path / "reports"
    old = "0ldc0de00000"
    runs = out / "masked_attention" / "runs.jsonl"
    for seed, (a, b, c) in enumerate([(50, 46, 51.5), (52, 46.5, 50.5), (51, 45, 52.0)]):
        append_jsonl(runs, _record("full model", seed, a, 40.0, 45.0, fingerprint=old))
        append_jsonl(runs, _record("- masked attention", seed, b, 38.0 - seed * 0.1, 44.0 + seed, fingerprint=old))
        append_jsonl(runs, _record("- high-resolution features", seed, c, 39.0, 44.5, fingerprint=old))
    board = render_scoreboard(out)
    main_rows, _, earlier = board.partition("Not yet retrained at this code")
    cells = lambda text, t: [c.strip() for c in next(l for l in text.splitlines()
                                                     if l.startswith(f"| {t} |")).strip("|").split("|")]
    assert cells(main_rows, "4a")[3:] == ["0", "0", "0", "6", "6"]
    assert "| **0** | **0** | **0** |" in main_rows  # the old version's verdicts are not in the total
    assert earlier and "STALE" in earlier and _fp() in earlier
    assert cells(earlier, "4a")[2:] == [f"`{old}`", "cpu (n=3)", "4", "0", "2", "0", "6"]
    assert "| 4c |" not in earlier  # no records at all: not listed
    assert "Not yet retrained" not in render_scoreboard(out, old)
    # a first current record (e.g. a shared run) gives no finding yet: the earlier version stays listed
    append_jsonl(runs, _record("full model", 0, 50, 40.0, 45.0))
    assert cells(render_scoreboard(out).partition("Not yet retrained")[2], "4a")[2] == f"`{old}`"
    # once the current code has findings of its own, the table leaves the earlier-version block
    for seed, (a, b, c) in enumerate([(50, 46, 51.5), (52, 46.5, 50.5), (51, 45, 52.0)]):
        append_jsonl(runs, _record("full model", seed, a, 40.0, 45.0))
        append_jsonl(runs, _record("- masked attention", seed, b, 38.0 - seed * 0.1, 44.0 + seed))
        append_jsonl(runs, _record("- high-resolution features", seed, c, 39.0, 44.5))
    board = render_scoreboard(out)
    assert "Not yet retrained" not in board and cells(board, "4a")[3:] == ["4", "0", "2", "0", "6"]


def test_compare_reports_whether_a_code_version_reproduced_another(tmp_path, capsys):
    """`ablations compare --old A --new B`: per run both versions recorded (same row, seed, scale,
    config hash), whether the final evaluation and the logged curve are identical, and the largest
    metric difference; runs only one version recorded are not paired."""
    from ablations.cli import main
    from ablations.records import compare_versions

    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    a, b = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
    append_jsonl(runs, _record("full model", 0, 50.0, 40.0, 45.0, fingerprint=a))
    append_jsonl(runs, _record("full model", 0, 50.0, 40.0, 45.0, fingerprint=b))  # reproduced
    append_jsonl(runs, _record("full model", 1, 51.0, 40.0, 45.0, fingerprint=a))
    append_jsonl(runs, _record("full model", 1, 51.0, 40.5, 45.0, fingerprint=b))  # AP differs by 0.5
    append_jsonl(runs, _record("full model", 2, 52.0, 40.0, 45.0, fingerprint=b))  # only B: not paired
    pairs = compare_versions(read_jsonl(runs), a, b)
    assert [(p["seed"], p["eval_identical"], p["curve_identical"]) for p in pairs] == [(0, True, True), (1, False, True)]
    assert pairs[0]["max_abs_diff"] == 0 and pairs[1]["max_abs_diff"] == pytest.approx(0.5)
    assert main(["compare", "masked_attention", "--old", a, "--new", b, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 of 2 run(s) recorded by both" in text and "DIFFERS" in text
    md = tmp_path / "repro.md"
    assert main(["compare", "masked_attention", "--old", a, "--new", b, "--out", str(out), "--write", str(md)]) == 0
    lines = md.read_text().splitlines()
    assert f"`python -m ablations compare masked_attention --old {a} --new {b} --write {md}`" in lines[2]
    assert "cpu (test)" in lines[2] and "**1 of 2 run(s) recorded by both" in md.read_text()
    assert "| masked_attention | cpu | full model | 0 | identical | identical | 0 | yes |" in lines
    assert ("| masked_attention | cpu | full model | 1 | **differs** | identical | 0.5 | no: final evaluation "
            "differs |") in lines


def test_first_eta_uses_this_machine_kinds_recorded_rate(tmp_path):
    """Before a run has progressed, the ETA uses the seconds per iteration recorded by runs of the same
    CPU model, ISA class, threads and code (shared copies counted once, periodic evaluations taken
    out); another machine kind, thread count or code version has no say."""
    from types import SimpleNamespace

    from ablations.runner import Progress, recorded_seconds_per_iter

    sc = get_scale("cpu")
    xeon = {"model": "Intel(R) Xeon(R) Processor", "isa_class": "avx512"}
    epyc = {"model": "AMD EPYC", "isa_class": "avx2"}
    out = tmp_path / "reports"

    def rec(table, cpu, threads, train_seconds, run_dir, fp="cur", shared=None):
        append_jsonl(out / table / "runs.jsonl", {
            "scale": "cpu", "code_fingerprint": fp, "iters": 2000, "train_seconds": train_seconds,
            "config": {"solver": {"eval_period": 250}}, "run_dir": run_dir, "shared_from": shared,
            "environment": {"cpu": cpu, "threads": threads}})

    periodic = 7 * sc.seconds_per_eval  # 7 evaluations before iteration 2000
    rec("a", xeon, 1, 1000 + periodic, "x0")
    rec("a", xeon, 1, 1200 + periodic, "x1")
    rec("b", xeon, 1, 1200 + periodic, "b/x1", shared="x1")  # the same run, shared into table b
    rec("b", xeon, 1, 1400 + periodic, "x2")
    rec("a", xeon, 2, 200 + periodic, "x3")  # 2 threads per run: another machine kind
    rec("a", xeon, 1, 9000, "x4", fp="old")  # other code
    rec("a", epyc, 1, 3000 + periodic, "e0")
    got = recorded_seconds_per_iter(out, sc, 1, "cur", xeon)
    assert got["runs"] == 3 and got["seconds_per_iter"] == pytest.approx(0.6)  # median of 0.5, 0.6, 0.7
    assert "Intel(R) Xeon(R) Processor (avx512), 1 thread(s) per run" == got["machine"]
    assert recorded_seconds_per_iter(out, sc, 1, "cur", epyc)["seconds_per_iter"] == pytest.approx(1.5)
    assert recorded_seconds_per_iter(out, sc, 1, "cur", {"model": "other", "isa_class": "avx2"}) is None
    pr = Progress(SimpleNamespace(seconds_per_iter=0.5, seconds_per_eval=0.0), prior_seconds_per_iter=1.5)
    d = tmp_path / "r"
    d.mkdir()
    pr.queue([SimpleNamespace(run_dir=d, label="r", cfg=SimpleNamespace(solver=SimpleNamespace(max_iters=100,
                                                                                              eval_period=0)))])
    assert pr.eta(1) == pytest.approx(150.0)


def test_whole_ablation_eta_schedules_runs_over_the_jobs(tmp_path):
    """3 equal runs on 2 jobs take two runs' time (the last one runs alone), not 1.5 runs'; a running
    run counts its iterations left, read from its metrics.jsonl."""
    from types import SimpleNamespace

    sc = SimpleNamespace(seconds_per_iter=1.0, seconds_per_eval=0.0)

    def plan(name, iters=100):
        d = tmp_path / name
        d.mkdir()
        return SimpleNamespace(run_dir=d, label=name,
                               cfg=SimpleNamespace(solver=SimpleNamespace(max_iters=iters, eval_period=0)))

    pr = ab_runner.Progress(sc)
    plans = [plan(f"r{i}") for i in range(3)]
    pr.queue(plans)
    assert pr.eta(2) == pytest.approx(200.0)
    assert pr.eta(1) == pytest.approx(300.0) and pr.eta(3) == pytest.approx(100.0)
    pr.start(plans[0])
    append_jsonl(plans[0].run_dir / "metrics.jsonl", {"iter": 60, "loss": 1.0})
    # r0 has 40 left; r1 takes the other slot (100), r2 follows r0 (40 + 100)
    assert pr.eta(2) == pytest.approx(140.0)
    pr.start(plans[1])
    append_jsonl(plans[1].run_dir / "metrics.jsonl", {"iter": 10, "loss": 1.0})
    assert pr.eta(2) == pytest.approx(max(40 + 100, 90))


def test_eta_keeps_one_rate_per_row(tmp_path):
    """A slow row (Table 4e's FaPN: about 3x its base row's s/it) is timed at its own rate: measured in
    this session for any seed of its config, else recorded for its config on this machine kind; a row
    with neither takes the median of the rates measured so far. The rate key ignores the seed only."""
    from types import SimpleNamespace

    from ablations.runner import Progress, rate_key, recorded_seconds_per_iter

    base = apply_overrides(get_preset("tiny"), {"solver.max_iters": 100, "solver.eval_period": 0})
    slow = apply_overrides(base, {"decoder.num_queries": 200})
    assert rate_key(apply_overrides(base, {"solver.seed": 3})) == rate_key(base) != rate_key(slow)
    assert rate_key(to_dict(base)) == rate_key(base) and rate_key({"solver": 1}) is None

    sc = SimpleNamespace(name="cpu", seconds_per_iter=9.0, seconds_per_eval=0.0)
    xeon = {"model": "Intel(R) Xeon(R) Processor", "isa_class": "avx512"}
    out = tmp_path / "reports"
    for i, (cfg, sec) in enumerate([(base, 100.0), (base, 120.0), (slow, 300.0)]):
        append_jsonl(out / "t" / "runs.jsonl", {
            "scale": "cpu", "code_fingerprint": "cur", "iters": 100, "train_seconds": sec, "config": to_dict(cfg),
            "run_dir": f"r{i}", "environment": {"cpu": xeon, "threads": 1}})
    got = recorded_seconds_per_iter(out, sc, 1, "cur", xeon)
    assert got["seconds_per_iter"] == pytest.approx(1.2)
    assert got["by_config"] == {rate_key(base): pytest.approx(1.1), rate_key(slow): pytest.approx(3.0)}

    def plan(name, cfg):
        d = tmp_path / name
        d.mkdir()
        return SimpleNamespace(run_dir=d, label=name, cfg=cfg)

    other = apply_overrides(base, {"decoder.num_queries": 77})
    pr = Progress(sc, prior_seconds_per_iter=got["seconds_per_iter"], prior_by_config=got["by_config"])
    a, b, c = plan("a2", base), plan("b2", slow), plan("c", other)
    assert pr.seconds_per_iter(a) == pytest.approx(1.1) and pr.seconds_per_iter(b) == pytest.approx(3.0)
    assert pr.seconds_per_iter(c) == pytest.approx(1.2)  # no rate of its own: the recorded median
    pr.queue([a, b])
    assert pr.eta(2) == pytest.approx(300.0)  # the slow row sets the end, not 2 x the median
    # measured in this session: the slow row's own measurement wins over its record
    pr.start(b)
    append_jsonl(b.run_dir / "metrics.jsonl", {"iter": 10, "loss": 1.0})
    pr.eta(2)
    st = pr.running[str(b.run_dir)]
    st["t_it0"] -= 4000.0  # 4000 s for the next 10 iterations: 400 s/it (the test's own time is noise)
    append_jsonl(b.run_dir / "metrics.jsonl", {"iter": 20, "loss": 1.0})
    assert pr.eta(2) == pytest.approx(80 * 400.0, rel=0.001)
    assert pr.seconds_per_iter(b) == pytest.approx(400.0, rel=0.001)
    assert pr.seconds_per_iter(plan("b3", slow)) == pytest.approx(400.0, rel=0.001)  # another seed of the row
    assert pr.seconds_per_iter(a) == pytest.approx(1.1)  # the base row keeps its recorded rate
    assert pr.seconds_per_iter(c) == pytest.approx(400.0, rel=0.001)  # no rate of its own: the measured median
    assert re.search(r"b2 20/100 \(400\.\d\d s/it\)", pr.line(2, 0, 2, 0.0))

    # a run resumed from its checkpoint at iteration 60 timed only its last 40 iterations
    # (train_images_per_s = images of that invocation / train_seconds), not all 100
    from ablations.runner import _iters_timed

    resumed = {"iters": 100, "train_seconds": 80.0, "train_images_per_s": 2.0, "batch_size": 4}
    assert _iters_timed(resumed) == 40 and _iters_timed({"iters": 100, "train_seconds": 80.0}) == 100
    append_jsonl(out / "t" / "runs.jsonl", {
        "scale": "cpu", "code_fingerprint": "cur", "config": to_dict(other), "run_dir": "r9",
        "environment": {"cpu": xeon, "threads": 1}, **resumed})
    assert recorded_seconds_per_iter(out, sc, 1, "cur", xeon)["by_config"][rate_key(other)] == pytest.approx(2.0)


def test_runner_progress_is_flushed_to_a_redirected_stdout(monkeypatch):
    """`nohup python -m ablations run ... > log`: the runner's lines must reach the file as they happen."""
    import inspect
    import io
    import sys

    class Buffered(io.StringIO):
        flushed = ""

        def flush(self):
            self.flushed = self.getvalue()

    out = Buffered()
    monkeypatch.setattr(sys, "stdout", out)
    assert inspect.signature(ab_runner.run_ablation).parameters["print_fn"].default is ab_runner.say
    ab_runner.say("progress: 0/3 finished")
    assert out.flushed == "progress: 0/3 finished\n"


def test_table_header_names_its_machines_and_the_pairs_trained_across_them(tmp_path):
    """Records from two machines: the header counts the runs per machine and lists the (row, seed)
    pairs whose row and base row ran on different ones; records of one machine add no such line."""
    out = tmp_path / "reports"
    runs = out / "masked_attention" / "runs.jsonl"
    xeon = {"device": "cpu (x)", "cpu": {"model": "Intel(R) Xeon(R) Processor", "isa_class": "avx512"}, "threads": 1}
    epyc = {"device": "cpu (e)", "cpu": {"model": "AMD EPYC", "isa_class": "avx512"}, "threads": 1}
    for seed in (0, 1, 2):
        append_jsonl(runs, {**_record("full model", seed, 50.0 + seed, 40.0, 45.0), "environment": xeon,
                            "kernels": {"gemm_backend": "reference"}})
    for seed in (0, 1):
        append_jsonl(runs, {**_record("- masked attention", seed, 40.0 + seed, 40.0, 45.0), "environment": xeon,
                            "kernels": {"gemm_backend": "reference"}})
    md = Path(render_ablation("masked_attention", out)["table"]).read_text()
    assert "**Machines:**" not in md
    append_jsonl(runs, {**_record("- masked attention", 2, 41.0, 40.0, 45.0), "environment": epyc,
                        "kernels": {"gemm_backend": "onednn"}})
    md = Path(render_ablation("masked_attention", out)["table"]).read_text()
    line = next(x for x in md.splitlines() if x.startswith("- **Machines:**"))
    assert ("5 run(s) on Intel(R) Xeon(R) Processor (avx512), gemm reference, 1 thread(s); "
            "1 run(s) on AMD EPYC (avx512), gemm onednn, 1 thread(s).") in line
    assert "Pairs whose row and base row ran on different machines: - masked attention seed 2." in line
    assert line.endswith("Timings (train_images_per_s, train_seconds) pair only runs of one machine.")


def test_replay_reproduces_a_run_of_this_machine_bit_for_bit_and_names_a_difference(tmp_path):
    """`ablations replay`: the first iterations of a run recorded here are reproduced exactly (equal
    logged losses); a record whose logged loss differs is reported at that iteration; a record of
    other code is refused (a difference would say nothing about the machine)."""
    out, runs = tmp_path / "reports", tmp_path / "runs"
    ab_runner.run_ablation("masked_attention", scale="smoke", out=out, runs_root=runs, inline=True,
                           rows=["full model"], print_fn=lambda m: None)
    rec = read_jsonl(out / "masked_attention" / "runs.jsonl")[0]
    res = ab_runner.replay_record(rec, iters=10, work_dir=tmp_path)
    assert res["first_difference"] is None and res["here"] == res["recorded"]
    assert [it for it, _, _ in res["compared"]] == [e["iter"] for e in rec["metrics_over_training"]
                                                    if "loss" in e and e["iter"] <= 10]
    assert all(a == b for _, a, b in res["compared"]) and len(res["compared"]) >= 2
    bent = json.loads(json.dumps(rec))
    last = [e for e in bent["metrics_over_training"] if "loss" in e][-1]
    last["loss"] += 1e-6
    res = ab_runner.replay_record(bent, iters=10, work_dir=tmp_path)
    assert res["first_difference"] == last["iter"]
    with pytest.raises(InputError, match="trained by code 0ldc0de00000"):
        ab_runner.replay_record({**rec, "code_fingerprint": "0ldc0de00000"}, iters=10)


def test_timing_columns_pair_only_runs_of_one_machine():
    """A throughput Δ across two CPUs would measure the CPUs: timing metrics pair only seeds whose row
    and base row ran on one machine (and such a row is not 'incomplete' for it); PQ pairs every seed."""
    from ablations.render import aggregate, table_rows

    spec = load_spec("point_loss")
    xeon = {"cpu": {"model": "Intel(R) Xeon(R) Processor", "isa_class": "avx512"}, "threads": 1}
    epyc = {"cpu": {"model": "AMD EPYC", "isa_class": "avx512"}, "threads": 1}
    recs = []
    for seed in range(5):
        recs.append({**_record("point -> point", seed, 50.0 + seed, 30.0, 40.0), "ablation": "point_loss",
                     "environment": xeon, "train_images_per_s": 10.0})
        env = xeon if seed < 3 else epyc
        recs.append({**_record("mask -> point", seed, 49.0 + seed + 0.1 * seed, 30.0, 40.0),
                     "ablation": "point_loss", "environment": env,
                     "train_images_per_s": 8.0 if seed < 3 else 30.0})
    metrics, agg = aggregate(spec, recs)
    rows = {(r["row"], r["metric"]): r for r in table_rows(spec, metrics, agg, table_seeds=5)}
    t = rows[("mask -> point", "train_images_per_s")]
    assert t["pairs"] == 3 and t["delta"] == pytest.approx(-2.0) and not t["verdict"].startswith("incomplete")
    pq = rows[("mask -> point", "PQ")]
    assert pq["pairs"] == 5 and pq["delta"] == pytest.approx(-1.0 + 0.1 * 2)
    # every pair across machines: no timing Δ, and the verdict says why
    for r in recs:
        if r["row"] == "mask -> point":
            r["environment"] = epyc
    metrics, agg = aggregate(spec, recs)
    rows = {(r["row"], r["metric"]): r for r in table_rows(spec, metrics, agg, table_seeds=5)}
    t = rows[("mask -> point", "train_images_per_s")]
    assert t["pairs"] == 0 and t["verdict"] == "not comparable (row and base ran on different machines)"
    assert rows[("mask -> point", "PQ")]["pairs"] == 5


def test_carry_verifies_each_machine_kind_on_its_own():
    """Records trained on two CPUs: a retrain on the Xeon that reproduces the Xeon's run carries the
    Xeon's other records only; the EPYC's wait for a retrain on an EPYC (a code change can alter one
    CPU's bits and not the other's, e.g. the GEMM backend `auto` picks per vendor); a retrain on
    another machine than its source is no evidence either way, and a same-machine pair that differs
    stops the row."""
    from ablations.records import carry_records

    old, cur = "0123456789ab", _fp()
    spec = load_spec("masked_attention")
    xeon = {"cpu": {"model": "Intel(R) Xeon(R) Processor", "isa_class": "avx512"}, "threads": 1}
    epyc = {"cpu": {"model": "AMD EPYC", "isa_class": "avx512"}, "threads": 1}

    def rec(seed, fp, env, pq=45.0):
        return {**_record("- masked attention", seed, pq + seed, 30.0, 40.0, fingerprint=fp), "environment": env}

    recs = [rec(s, old, xeon) for s in (0, 1)] + [rec(s, old, epyc) for s in (2, 3)]
    recs += [rec(0, cur, xeon), {**rec(2, cur, xeon), "eval": {"panoptic": {"PQ": 1.0}}}]  # seed 2: other machine
    carried, why = carry_records(recs, spec, "cpu", old, cur)
    assert [r["seed"] for r in carried] == [1] and carried[0]["carried_from"]["verified_seeds"] == [0]
    w = why["- masked attention"]
    assert w.startswith("1 record(s) carried; on Intel(R) Xeon(R) Processor (avx512), 1 thread(s): seed(s) 0")
    assert "not carried: seed(s) 3, trained on AMD EPYC (avx512), 1 thread(s)" in w
    assert "seed(s) 2 retrained on another machine" in w
    # retrained on the EPYC too: its records carry, each verified on its own machine
    carried, why = carry_records(recs + [rec(3, cur, epyc)], spec, "cpu", old, cur)
    assert sorted(r["seed"] for r in carried) == [1]  # seed 3 is retrained now; 2 was retrained on the Xeon
    carried, why = carry_records(recs[:4] + [rec(0, cur, xeon), rec(2, cur, epyc)], spec, "cpu", old, cur)
    assert {r["seed"]: r["carried_from"]["verified_seeds"] for r in carried} == {1: [0], 3: [2]}
    # a same-machine pair that differs stops the row, whatever the other machine shows
    bad = {**rec(2, cur, epyc), "eval": {"panoptic": {"PQ": 1.0}}}
    carried, why = carry_records(recs[:4] + [rec(0, cur, xeon), bad], spec, "cpu", old, cur)
    assert carried == [] and why["- masked attention"].startswith("not carried: seed 2 final evaluation differs")


def test_a_run_worker_exits_when_its_runner_is_killed(tmp_path):
    """A runner killed with SIGKILL (no handler runs) must not leave its training worker orphaned: the
    orphan would go on appending to the run directory that the next ``run`` resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    script = (
        "import multiprocessing as mp, os, sys, time\n"
        "from ablations.runner import exit_with_parent\n"
        "def child(path):\n"
        "    exit_with_parent(period=0.2)\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    p = mp.get_context('fork').Process(target=child, args=(sys.argv[1],))\n"
        "    p.start(); p.join()\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(pid_file)], cwd=Path(__file__).parents[1])
    try:
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(child, 0)  # alive while its parent is
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)

        def alive(pid):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return False
            return state != "Z"

        deadline = time.time() + 30
        while alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the worker outlived its killed runner"
    finally:
        if parent.poll() is None:
            parent.kill()
