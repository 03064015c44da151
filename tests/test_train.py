"""Trainer: schedules, parameter groups, exact resume (also after kill -9), DDP on gloo, non-finite stop."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2f.checkpoint import read_jsonl
from m2f.config import get_preset
from m2f.errors import InputError, NonFiniteLossError
from m2f.train import lr_factor, param_groups, train

ROOT = Path(__file__).resolve().parents[1]

# A very small run: 48 px crops of a 16-image synthetic set, tiny model, 2 images per step.
SMALL = [
    "data.synth_images=16", "data.synth_val_images=4", "data.synth_size=64", "data.image_size=64",
    "solver.batch_size=2", "solver.max_iters=6", "solver.checkpoint_period=2", "solver.log_period=1",
    "loss.num_points=256", "decoder.num_layers=3", "pixel_decoder.num_encoder_layers=1",
]


def small_cfg(*extra):
    return get_preset("tiny", SMALL + list(extra))


def losses(path: Path):
    return [(r["iter"], r["loss"]) for r in read_jsonl(path / "metrics.jsonl") if "loss" in r]


def test_lr_schedule_step_and_poly():
    s = get_preset("tiny", ["solver.max_iters=100", "solver.warmup_iters=10", "solver.warmup_factor=0.1",
                            "solver.steps=0.5,0.9"]).solver
    assert lr_factor(0, s) == pytest.approx(0.1)
    assert lr_factor(5, s) == pytest.approx(0.55)
    assert lr_factor(10, s) == pytest.approx(1.0)
    assert lr_factor(49, s) == pytest.approx(1.0)
    assert lr_factor(50, s) == pytest.approx(0.1)
    assert lr_factor(95, s) == pytest.approx(0.01)
    p = get_preset("tiny", ["solver.max_iters=100", "solver.warmup_iters=0", "solver.schedule=poly"]).solver
    assert lr_factor(50, p) == pytest.approx(0.5**0.9)
    assert lr_factor(100, p) == pytest.approx(0.0)


def test_param_groups_backbone_lr_and_no_decay_on_norms_and_embeddings():
    from m2f.models.build import build_model

    cfg = get_preset("tiny", ["solver.backbone_lr_multiplier=0.1", "solver.lr=1e-4"])
    model = build_model(cfg)
    groups = param_groups(model, cfg.solver)
    by_param = {}
    for g in groups:
        for p in g["params"]:
            by_param[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len([p for p in named.values() if p.requires_grad])
    for name, p in named.items():
        if not p.requires_grad:
            continue
        lr, wd = by_param[id(p)]
        assert lr == pytest.approx(1e-5 if name.startswith("backbone.") else 1e-4), name
    embeds = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    assert embeds, "the decoder has query embeddings"
    for n in embeds:
        assert by_param[id(named[n + ".weight"])][1] == 0.0
    norms = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    assert norms
    for n in norms:
        assert by_param[id(named[n + ".weight"])][1] == 0.0
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and n.startswith("pixel_decoder")]
    assert by_param[id(named[convs[0] + ".weight"])][1] == pytest.approx(cfg.solver.weight_decay)


def test_grad_accumulation_micro_batches_tile_the_same_stream_as_whole_batches():
    """With grad_accum=2 the trainer steps TrainingSampler per micro-batch; the samples of one
    iteration are those of the same iteration without accumulation (same stream positions)."""
    from m2f.data.collate import TrainingSampler

    whole = TrainingSampler(10, 4, seed=3, start_iter=5).batch_at(5)
    micro = TrainingSampler(10, 2, seed=3, start_iter=10)
    assert micro.batch_at(10) + micro.batch_at(11) == whole


def test_resume_continues_the_identical_loss_curve(tmp_path):
    cfg = small_cfg()
    full = train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
    assert full["iter"] == 6
    train(cfg, tmp_path / "part", progress=False, evaluate_at_end=False, stop_after=3)
    assert torch.load(tmp_path / "part" / "last.pth", weights_only=True)["iter"] == 3
    # The interrupted run left metric lines for iterations 1..3 only; resuming recomputes 4..6.
    train(cfg, tmp_path / "part", resume=True, progress=False, evaluate_at_end=False)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [i for i, _ in a] == [1, 2, 3, 4, 5, 6]
    assert a == b  # bit-identical on CPU
    assert len({round(v, 6) for _, v in a}) > 1  # the loss actually changes
    from m2f_kernels.cpu_gemm import resolve_for_device

    assert full["kernels"] == {"decoder.attention_backend": cfg.decoder.attention_backend,
                               "gemm_backend": resolve_for_device("auto", "cpu"),
                               "pixel_decoder.deform_attn_backend": "reference",
                               "solver.optimizer_impl": "fused", "solver.cpu_allocator": "tuned"}  # what ran, "auto" resolved


def test_optimizer_impls_take_the_same_steps_to_float_tolerance(tmp_path):
    """solver.optimizer_impl is execution-only: fused and foreach AdamW give the same losses up to
    float32 rounding (and the same config hash)."""
    from m2f.config import apply_overrides, config_hash

    cfg = small_cfg()
    fe = apply_overrides(cfg, ["solver.optimizer_impl=foreach", "solver.cpu_allocator=default"])
    assert config_hash(fe) == config_hash(cfg)
    a = train(cfg, tmp_path / "fused", progress=False, evaluate_at_end=False)
    b = train(fe, tmp_path / "foreach", progress=False, evaluate_at_end=False)
    assert a["kernels"]["solver.optimizer_impl"] == "fused" and b["kernels"]["solver.optimizer_impl"] == "foreach"
    la, lb = losses(tmp_path / "fused"), losses(tmp_path / "foreach")
    assert [i for i, _ in la] == [i for i, _ in lb] and la[0] == lb[0]  # the first loss precedes any step
    for (_, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-4)


def test_resume_with_activation_checkpointing_switched_on(tmp_path):
    """Execution-only fields: a run resumes with activation checkpointing switched on (as after running
    out of memory) and continues the identical loss curve."""
    from m2f.config import apply_overrides

    cfg = small_cfg()
    train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
    train(cfg, tmp_path / "part", progress=False, evaluate_at_end=False, stop_after=3)
    lean = apply_overrides(cfg, {"backbone.activation_checkpointing": True,
                                 "pixel_decoder.activation_checkpointing": True})
    train(lean, tmp_path / "part", resume=True, progress=False, evaluate_at_end=False)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_refuses_to_overwrite_a_run_and_a_changed_config(tmp_path):
    cfg = small_cfg("solver.max_iters=2")
    train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    with pytest.raises(InputError, match="--resume"):
        train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    with pytest.raises(InputError, match="different config"):
        train(small_cfg("solver.max_iters=4", "solver.lr=1e-3"), tmp_path / "r", resume=True, progress=False,
              evaluate_at_end=False)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    cfg = small_cfg("solver.lr=1e30", "solver.clip_grad_norm=0", "solver.max_iters=30", "solver.warmup_iters=0")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration"):
        train(cfg, tmp_path / "nan", progress=False, evaluate_at_end=False)


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "m2f", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _sets(extra=()):
    out = []
    for s in SMALL + list(extra):
        out += ["--set", s]
    return out


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    extra = ["solver.max_iters=10", "solver.checkpoint_period=1"]
    ref = _cli(["train", "--preset", "tiny", *_sets(extra), "--out", str(tmp_path / "ref"), "--no-progress",
                "--no-eval"])
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    victim = _cli(["train", "--preset", "tiny", *_sets(extra), "--out", str(tmp_path / "v"), "--no-progress",
                   "--no-eval"])
    ck = tmp_path / "v" / "last.pth"
    deadline = time.time() + 240
    while time.time() < deadline:
        if ck.exists() and torch.load(ck, weights_only=True)["iter"] >= 3:
            break
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    it_killed = torch.load(ck, weights_only=True)["iter"]
    assert 3 <= it_killed < 10, "killed before the run finished"
    res = _cli(["train", "--preset", "tiny", *_sets(extra), "--out", str(tmp_path / "v"), "--resume",
                "--no-progress", "--no-eval"])
    assert res.wait(timeout=300) == 0, res.stdout.read()
    assert losses(tmp_path / "ref") == losses(tmp_path / "v")
    assert [i for i, _ in losses(tmp_path / "v")] == list(range(1, 11))


@pytest.mark.slow
def test_ddp_gloo_two_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "m2f", "train", "--preset", "tiny", *_sets(["solver.max_iters=3"]), "--out", str(out),
                        "--device", "cpu", "--no-progress", "--no-eval"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = losses(out)
    assert [i for i, _ in recs] == [1, 2, 3]
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["iter"] == 3
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_the_task_comes_from_the_kind_of_training_data():
    """instances -> instance, label maps -> semantic, panoptic -> panoptic (or a task the preset names that
    panoptic ground truth can train); a task the user set that the data cannot train is refused."""
    from m2f.data.catalog import data_tasks
    from m2f.train import classes_from_data, task_from_data

    def task(spec, preset="tiny", from_data=("data.task", "num_classes"), *extra):
        return task_from_data(get_preset(preset, [f"data.train={spec}", *extra]), from_data).data.task

    assert data_tasks("coco_instances:a.json:imgs") == ("instance",)
    assert data_tasks("semantic:imgs:labels:3") == ("semantic",)
    assert data_tasks("coco_2017_train") == ("instance",) and data_tasks("ade20k_sem_seg_train") == ("semantic",)
    assert task("coco_instances:a.json:imgs") == "instance"
    assert task("semantic:imgs:labels:3") == "semantic"
    assert task("coco_panoptic:p.json:png:imgs") == "panoptic"
    assert task("coco_panoptic:p.json:png:imgs", "r50_coco_instance") == "instance"
    assert task("synth", "r50_ade20k_semantic") == "semantic"
    with pytest.raises(InputError, match="only train semantic"):
        task("semantic:imgs:labels:3", "tiny", ("num_classes",), "data.task=instance")
    with pytest.raises(InputError, match="not understood"):
        data_tasks("cityscapes:x")

    class Md:
        num_classes = 4

    cfg = small_cfg()
    assert classes_from_data(cfg, Md(), ("num_classes",)).num_classes == 4
    with pytest.raises(InputError, match="num_classes=9 disagrees .* has 4 classes"):
        classes_from_data(cfg, Md(), ())
