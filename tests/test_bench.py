"""Benchmark CLI smoke tests (tiny preset, 64 px) and the fast deformable-attention paths' parity."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from m2f_kernels.ms_deform_attn import ms_deform_attn_reference  # noqa: E402
from m2f.bench import cli, common, memory, profile, report  # noqa: E402
from m2f.errors import InputError  # noqa: E402
from m2f_kernels.ms_deform_attn import (  # noqa: E402
    ms_deform_attn_gather,
    ms_deform_attn_levels,
    ms_deform_attn_recompute,
)


def _deform_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5, 2), (2, 3)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(2, S, 2, 3, generator=g, dtype=dtype)
    loc = torch.rand(2, 7, 2, 3, 2, 2, generator=g, dtype=dtype) * 1.4 - 0.2  # some samples outside the maps
    attn = torch.rand(2, 7, 2, 3, 2, generator=g, dtype=dtype)
    return shapes, value, loc, attn


@pytest.mark.parametrize("impl", [ms_deform_attn_gather, ms_deform_attn_levels, ms_deform_attn_recompute],
                         ids=["gather", "levels", "recompute"])
def test_fast_deform_attn_matches_reference_and_gradcheck(impl):
    shapes, value, loc, attn = _deform_inputs()
    ref = ms_deform_attn_reference(value, shapes, loc, attn)
    out = impl(value, shapes, loc, attn)
    assert out.shape == ref.shape == (2, 7, 6)
    assert ref.abs().max() > 0.1 and (out - ref).abs().max() < 1e-12
    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(lambda v, l, a: impl(v, shapes, l, a), inputs, atol=1e-7)
    # gradients equal the reference's
    g_ref = torch.autograd.grad(ms_deform_attn_reference(inputs[0], shapes, *inputs[1:]).sum(), inputs)
    g_out = torch.autograd.grad(impl(inputs[0], shapes, *inputs[1:]).sum(), inputs)
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() < 1e-10


def test_levels_double_backward_and_mixed_dtypes():
    """The levels path's custom weighted sum stays twice differentiable, and under autocast-like
    mixed inputs (bfloat16 weights, float32 samples) returns each gradient in its input's dtype."""
    shapes, value, loc, attn = _deform_inputs()
    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradgradcheck(lambda v, l, a: ms_deform_attn_levels(v, shapes, l, a), inputs, atol=1e-6)
    shapes, value, loc, attn = _deform_inputs(torch.float32)
    a = attn.to(torch.bfloat16).requires_grad_()
    v = value.clone().requires_grad_()
    out = ms_deform_attn_levels(v, shapes, loc, a)
    ga, gv = torch.autograd.grad(out.square().sum(), (a, v))
    assert ga.dtype == torch.bfloat16 and gv.dtype == torch.float32
    ref_a = attn.to(torch.bfloat16).float().requires_grad_()
    ref_v = value.clone().requires_grad_()
    gra, grv = torch.autograd.grad(ms_deform_attn_reference(ref_v, shapes, loc, ref_a).square().sum(), (ref_a, ref_v))
    assert (gv - grv).abs().max() < 1e-4 and (ga.float() - gra).abs().max() < 0.05 * gra.abs().max()


def test_levels_batch1_retain_graph_and_partial_grads():
    """Batch 1 (the reshapes to [B*nH, L, P, Q] are views there, made contiguous), a second backward
    through a retained graph (the CPU scratch buffer for the samples' gradient is reused, not
    saved state), and inputs without gradient: all equal the grid_sample reference."""
    shapes, value, loc, attn = _deform_inputs()
    value, loc, attn = value[:1], loc[:1], attn[:1]
    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, attn))
    out = ms_deform_attn_levels(inputs[0], shapes, *inputs[1:])
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    first = torch.autograd.grad(out, inputs, w, retain_graph=True)
    second = torch.autograd.grad(out, inputs, w)
    ref = torch.autograd.grad(ms_deform_attn_reference(inputs[0], shapes, *inputs[1:]), inputs, w)
    for a, b, r in zip(first, second, ref):
        assert torch.equal(a, b) and (a - r).abs().max() < 1e-10
    v = value.clone().requires_grad_()
    (gv,) = torch.autograd.grad(ms_deform_attn_levels(v, shapes, loc, attn), v, w)  # locations, weights fixed
    assert (gv - ref[0]).abs().max() < 1e-10


def test_recompute_mixed_dtypes_and_partial_grads():
    """Autocast-style inputs (bfloat16 value, float32 locations) are computed in float32 and each
    gradient comes back in its input's dtype; inputs that need no gradient get none."""
    shapes, value, loc, attn = _deform_inputs(torch.float32)
    v = value.to(torch.bfloat16).requires_grad_()
    l, a = loc.clone().requires_grad_(), attn.clone()
    out = ms_deform_attn_recompute(v, shapes, l, a)
    ref = ms_deform_attn_reference(v.detach().float(), shapes, loc, attn)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 1e-5
    gv, gl = torch.autograd.grad(out.square().sum(), (v, l))
    assert gv.dtype == torch.bfloat16 and gl.dtype == torch.float32
    lr = loc.clone().requires_grad_()
    (gl_ref,) = torch.autograd.grad(ms_deform_attn_reference(v.detach().float(), shapes, lr, attn).square().sum(), lr)
    assert gl.abs().max() > 0.1 and (gl - gl_ref).abs().max() < 1e-4


def test_gather_zero_outside():
    shapes, value, loc, attn = _deform_inputs()
    assert ms_deform_attn_gather(value, shapes, loc + 2.0, attn).abs().max() == 0.0
    assert ms_deform_attn_gather(value, shapes, loc - 2.0, attn).abs().max() == 0.0


def test_gather_borders_and_float32_at_encoder_shapes():
    """Samples exactly on pixel centres, map edges and half a pixel beyond them (where the padded
    map's border takes over), and float32 at the R50 512 px encoder's level shapes."""
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 6), (3, 3)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(1, S, 2, 4, generator=g, dtype=torch.float64)
    # x, y in pixels of a 6-wide / 4-high map: -1 .. size (every boundary case), as fractions
    px = torch.tensor([-1.5, -1.0, -0.5, -0.25, 0.0, 0.5, 2.0, 5.5, 5.75, 6.0, 6.5, 7.0], dtype=torch.float64)
    loc = torch.zeros(1, px.numel(), 2, 2, 1, 2, dtype=torch.float64)
    loc[..., 0] = (px / 6.0).view(1, -1, 1, 1, 1)
    loc[..., 1] = (px.flip(0) / 6.0).view(1, -1, 1, 1, 1)
    attn = torch.rand(1, px.numel(), 2, 2, 1, generator=g, dtype=torch.float64)
    ref = ms_deform_attn_reference(value, shapes, loc, attn)
    assert (ms_deform_attn_gather(value, shapes, loc, attn) - ref).abs().max() < 1e-12

    shapes = [(16, 16), (32, 32), (64, 64)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(1, S, 8, 32, generator=g)
    loc = torch.rand(1, S, 8, 3, 4, 2, generator=g) * 1.2 - 0.1
    attn = torch.rand(1, S, 8, 3, 4, generator=g).softmax(-1)
    with torch.no_grad():
        ref = ms_deform_attn_reference(value, shapes, loc, attn)
        out = ms_deform_attn_gather(value, shapes, loc, attn)
    assert ref.abs().max() > 0.5 and (out - ref).abs().max() < 2e-5


def test_memory_ratios_from_measured_values():
    rows = [{"matching": m, "loss": l, "peak_bytes": b}
            for (m, l), b in zip(memory.VARIANTS, [900, 400, 600, 300])]
    r = memory.memory_ratios(rows)
    assert r["mask_mask_over_point_point"] == pytest.approx(3.0)
    assert r["loss_mask_over_point@point_matching"] == pytest.approx(2.0)
    assert r["loss_mask_over_point@mask_matching"] == pytest.approx(2.25)


def test_synthetic_targets():
    t = common.synthetic_targets(5, 9, 32, 48, "cpu")
    assert t["masks"].shape == (5, 32, 48) and t["masks"].dtype == torch.bool
    assert t["labels"].shape == (5,) and int(t["labels"].max()) < 9
    assert (t["masks"].flatten(1).sum(1) > 0).all()


def test_cli_rejects_bad_input(tmp_path):
    with pytest.raises(InputError, match="--sizes"):
        cli.main(["memory", "--preset", "tiny", "--sizes", "50", "--out", str(tmp_path)])
    with pytest.raises(InputError, match="--device"):
        cli.main(["speed", "--preset", "tiny", "--device", "tpu", "--out", str(tmp_path)])


def test_memory_cli_tiny(tmp_path):
    assert cli.main(["memory", "--preset", "tiny", "--sizes", "64", "--num-masks", "3", "--threads", "1",
                       "--out", str(tmp_path), "--name", "mem"]) == 0
    r = json.loads((tmp_path / "mem.json").read_text())
    assert r["kind"] == "memory" and r["environment"]["device"] == "cpu"
    rows = r["sizes"]["64"]["variants"]
    assert [(v["matching"], v["loss"]) for v in rows] == memory.VARIANTS
    for v in rows:
        assert v["peak_bytes"] > 0 and v["step_s"] > 0 and v["size"] == 64
        assert v["method"].startswith("cpu stand-in: peak live tensor bytes") and v["amp"] is None
        assert v["rss_peak_bytes"] > 0
    ratios = r["sizes"]["64"]["ratios"]
    assert ratios == pytest.approx(memory.memory_ratios(rows))  # computed from the measured values
    assert ratios["mask_mask_over_point_point"] > 0
    assert "Training memory" in (tmp_path / "README.md").read_text()


def test_speed_cli_tiny(tmp_path):
    assert cli.main(["speed", "--preset", "tiny", "--size", "64", "--iters", "1", "--num-masks", "3",
                       "--threads", "1", "--out", str(tmp_path), "--name", "spd"]) == 0
    r = json.loads((tmp_path / "spd.json").read_text())
    assert r["kind"] == "speed" and r["size"] == 64
    assert r["max_abs_diff_mask_logits"] < 1e-3  # converted weights: the same function
    for key, rate in (("inference", "images_per_s"), ("train", "iters_per_s")):
        for impl in ("m2f", "hf"):
            assert r[key][impl]["median_s"] > 0 and r[key][impl][rate] > 0
        assert r[key]["ratio_m2f_over_hf"] == pytest.approx(r[key]["hf"]["median_s"] / r[key]["m2f"]["median_s"])
    assert r["flops"]["gflops"] > 0 and r["flops"]["params"] > 0
    for k in ("device", "torch", "cuda", "threads"):
        assert k in r["environment"]
    md = (tmp_path / "README.md").read_text()
    assert "| inference" in md and "| train" in md


def test_flop_count_sees_every_op_it_counts():
    """fvcore traces the model: no custom autograd function may hide a counted op from it (a
    ``prim::PythonOp`` is skipped silently), and the oneDNN GEMMs are traced as F.linear."""
    from m2f.config import apply_overrides, get_preset
    from m2f.flops import count_flops
    from m2f.models.build import build_model

    cfg = get_preset("tiny")
    f = count_flops(cfg, 64, 96)
    assert not [k for k in f["skipped_ops"] if "PythonOp" in k or "mkldnn" in k], f["skipped_ops"]
    # the mask head product alone: Q x C x (H/4 x W/4) multiply-adds per prediction (fvcore counts MACs)
    model = build_model(apply_overrides(cfg, {"decoder.attention_backend": "reference"}))  # as count_flops builds
    head = cfg.decoder.num_queries * cfg.pixel_decoder.mask_dim * 16 * 24 * (cfg.decoder.num_layers + 1) / 1e9
    assert f["gflops_by_part"]["transformer_decoder"] > head
    assert count_flops(cfg, 64, 96, model=model)["gflops"] == pytest.approx(f["gflops"])
    assert all(getattr(m, "gemm_backend", "auto") == "auto" for m in model.modules())  # restored


def test_profile_cli_tiny(tmp_path):
    """The per-part split of a training step: every part measured, the parts add up to the total,
    every parameter received its gradient (the parts were cut apart and re-joined correctly)."""
    assert cli.main(["profile", "--preset", "tiny", "--size", "64", "--iters", "1", "--num-masks", "3",
                       "--threads", "1", "--out", str(tmp_path), "--name", "prof"]) == 0
    r = json.loads((tmp_path / "prof.json").read_text())
    parts = r["parts_median_s"]
    assert set(parts) == {"backbone_forward", "pixel_decoder_forward", "transformer_decoder_forward", "loss",
                          "transformer_decoder_and_loss_backward", "pixel_decoder_backward", "backbone_backward",
                          "optimizer_step", "data"}
    assert all(v > 0 for v in parts.values()) and r["step_total_s"] == pytest.approx(sum(parts.values()))
    assert r["data"]["dataset"] == "synth" and r["optimizer_impl"] == "fused"
    # the loss's parts from the profiler: positive, and together less than the loss itself
    assert set(r["loss_split_s"]) == {"matcher", "point_sampling"} and all(v > 0 for v in r["loss_split_s"].values())
    assert sum(r["loss_split_s"].values()) < parts["loss"] and 0 <= r["python_overhead_share"] < 1
    assert r["top_ops_self_cpu_ms"] and all(o["self_cpu_ms"] >= 0 for o in r["top_ops_self_cpu_ms"])
    md = (tmp_path / "README.md").read_text()
    assert "Training-step profile `prof.json`" in md and "| pixel_decoder_backward |" in md
    assert "of which matcher" in md and "Python and framework overhead" in md
    f = r["flop_floor"]  # counted per part, each part's rate = its FLOPs / its time
    assert set(f["gflop_by_part"]) == set(parts) - {"data", "optimizer_step"}
    assert all(f["part_gflops_per_s"][k] == pytest.approx(g / parts[k]) for k, g in f["gflop_by_part"].items())
    assert f["floor_s"] == pytest.approx(sum(f["gflop_by_part"].values()) / f["gemm_gflops_per_s"])
    assert "Counted FLOPs and the rate each part reached" in md
    h = f["headroom"]  # every part at the backbone's rate: the backbone's own time is unchanged
    bb = ("backbone_forward", "backbone_backward")
    assert h["backbone_gflops_per_s"] == pytest.approx(sum(f["gflop_by_part"][k] for k in bb) / sum(parts[k] for k in bb))
    assert h["step_s"] == pytest.approx(sum(parts[k] for k in (*bb, "data", "optimizer_step")) + sum(
        g / h["backbone_gflops_per_s"] for k, g in f["gflop_by_part"].items() if k not in bb))
    assert "Headroom: with every counted part" in md
    from m2f.bench.report import render_summary

    row = [l for l in render_summary(tmp_path).splitlines() if "training step vs its FLOP floor (`prof.json`)" in l]
    assert len(row) == 1 and f"**{100 * f['floor_s'] / r['step_total_s']:.0f}% of the GEMM rate**" in row[0]


def test_speed_cli_batch_side_by_side_and_flop_floor(tmp_path):
    assert cli.main(["speed", "--preset", "tiny", "--size", "64", "--iters", "1", "--num-masks", "2", "--batch", "2",
                     "--threads", "1", "--no-inference", "--side-by-side", "--out", str(tmp_path),
                     "--name", "sbs"]) == 0
    r = json.loads((tmp_path / "sbs.json").read_text())
    assert r["batch"] == 2 and "inference" not in r
    assert len(r["train_side_by_side"]) == 2
    for p in r["train_side_by_side"]:
        assert p["m2f_median_s"] > 0 and p["ratio_m2f_over_hf"] == pytest.approx(p["hf_median_s"] / p["m2f_median_s"])
    f = r["flop_floor"]
    # counted at 2 FLOPs per multiply-add: the forward parts are twice fvcore's multiply-adds (x batch),
    # within fvcore's extra norm / upsampling counts; backward about twice the forward
    parts = f["gflop_by_part"]
    fwd = sum(v for k, v in parts.items() if k.endswith("_forward"))
    bwd = sum(v for k, v in parts.items() if k.endswith("_backward"))
    assert fwd == pytest.approx(2 * 2 * r["flops"]["gflops"], rel=0.02)
    assert 1.6 < bwd / fwd < 2.1 and parts["loss"] > 0
    assert f["train_step_gflop"] == pytest.approx(sum(parts.values()))
    # about twice what the old rule took as the step's work (3 x fvcore's forward multiply-adds x batch)
    assert f["train_step_gflop"] > 1.8 * 3 * 2 * r["flops"]["gflops"]
    assert f["gemm_gflops_per_s"] == max(f["gemm_by_impl"].values()) and f["floor_s"] > 0
    assert f["floor_s"] == pytest.approx(f["train_step_gflop"] / f["gemm_gflops_per_s"])
    assert f["share_of_peak"]["m2f"] == pytest.approx(f["floor_s"] / r["train"]["m2f"]["median_s"])
    md = (tmp_path / "README.md").read_text()
    assert "FLOP floor of the training step" in md and "Two processes side by side" in md
    assert "about half the true one" not in md


def test_trees_rows_name_the_runs_thread_count_not_the_parents():
    """A trees result's runs are one-thread workers: the README row says 1 thread even when the
    parent process that launched them had 2 (the environment recorded with the result)."""
    from m2f.bench.report import _trees_summary_rows

    r = {"kind": "trees", "preset": "tiny", "overrides": [], "base": {"commit": "1ed9e8d284"},
         "environment": {"device": "cpu", "threads": 2, "cpu": {"model": "AMD EPYC", "isa_class": "avx512"}},
         "summary": {"alone": {"base_s_per_iter": 0.9, "this_s_per_iter": 0.7, "speedup": 0.9 / 0.7}}}
    from pathlib import Path

    (row,) = _trees_summary_rows(Path("t.json"), r)
    assert "| cpu AMD EPYC, avx512, 1 thread |" in row and "2 threads" not in row


def test_an_old_flop_floor_renders_with_its_correction(tmp_path):
    """Results written before the floor was counted (3 x fvcore forward multiply-adds x batch over a
    GEMM rate in FLOPs) say that their floor is about half the true one."""
    from m2f.bench.report import _floor_line

    old = {"train_step_gflop": 13.9, "gemm_gflops_per_s": 176.0, "floor_s": 0.079,
           "rule": "3 x fvcore forward GFLOPs x batch / measured 1024^3 float32 GEMM rate"}
    line = _floor_line(old, {"m2f": 1.21, "hf": None})
    assert "about half the true one" in line and "m2f runs at 15.3x the floor (7% of the GEMM rate)" in line
    new = {**old, "rule": "counted step FLOPs / best measured 1024^3-2048^3 float32 GEMM rate"}
    assert "about half" not in _floor_line(new, {"m2f": 1.21})
    assert _floor_line({**new, "note": "bf16 steps"}, {"m2f": 1.21}).endswith("(bf16 steps)")


def test_step_flops_are_counted_per_part_with_the_reference_kernels():
    """count_step_flops: the same counts whatever kernels the config names (it counts the reference
    ones), every part counted, and the backbone's forward equals the convolutions' multiply-adds x 2."""
    from m2f.bench.floor import peak_gemm_rate
    from m2f.bench.profile import count_step_flops
    from m2f.config import get_preset

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tgt = [common.synthetic_targets(3, 10, 64, 64, "cpu", seed=i) for i in range(2)]
    a = count_step_flops(get_preset("tiny", ["num_classes=10"]), x, tgt, "cpu")
    b = count_step_flops(get_preset("tiny", ["num_classes=10", "gemm_backend=onednn",
                                             "decoder.attention_backend=sdpa"]), x, tgt, "cpu")
    assert a == b and all(v > 0 for v in a.values())
    # ResNet-18's convolutions at 64 px (stride 2 stem and max-pool: 16x16 after them), by hand
    convs = [(3, 64, 7, 32)] + [(64, 64, 3, 16)] * 4 \
        + [(64, 128, 3, 8), (128, 128, 3, 8), (64, 128, 1, 8), (128, 128, 3, 8), (128, 128, 3, 8)] \
        + [(128, 256, 3, 4), (256, 256, 3, 4), (128, 256, 1, 4), (256, 256, 3, 4), (256, 256, 3, 4)] \
        + [(256, 512, 3, 2), (512, 512, 3, 2), (256, 512, 1, 2), (512, 512, 3, 2), (512, 512, 3, 2)]
    macs = sum(ci * co * k * k * s * s for ci, co, k, s in convs)
    assert a["backbone_forward"] == 2 * 2 * macs
    rate = peak_gemm_rate("cpu", sizes=(256,), reps=1)
    assert rate["gflops_per_s"] == max(rate["by_impl"].values()) > 0 and "mm_256" in rate["by_impl"]


def test_trees_compares_two_checkouts_with_real_training_runs(tmp_path):
    """python -m m2f.bench trees against this same tree: the two trees' loss curves are bit-identical,
    the speed-up is a ratio of measured medians, and the result renders with its goal."""
    from pathlib import Path

    import m2f

    here = Path(m2f.__file__).resolve().parents[1]
    small = ["solver.batch_size=1", "data.image_size=64"]
    args = ["trees", "--base", str(here), "--iters", "6", "--warmup", "2", "--rounds", "1", "--out", str(tmp_path),
            "--name", "tr"]
    for o in small:
        args += ["--set", o, "--base-set", o]
    assert cli.main(args) == 0
    r = json.loads((tmp_path / "tr.json").read_text())
    assert r["kind"] == "trees" and r["loss_check"]["bit_identical"] and r["loss_check"]["max_rel_diff"] == 0
    assert r["loss_check"]["deterministic_within_tree"] and len(r["losses"]["this"]) == 6
    for arr in ("alone", "side_by_side"):
        s = r["summary"][arr]
        assert s["speedup"] == pytest.approx(s["base_s_per_iter"] / s["this_s_per_iter"])
    assert r["environment"]["cpu"]["isa_class"] in ("avx512", "avx2", "other")
    md = (tmp_path / "README.md").read_text()
    assert "Training speed vs commit" in md
    assert "training speed vs" in report.render_summary(tmp_path) and ">= 2.5x" in report.render_summary(tmp_path)
    with pytest.raises(InputError, match="no m2f/train.py"):
        cli.main(["trees", "--base", str(tmp_path), "--out", str(tmp_path)])


def test_profile_backward_reaches_every_parameter():
    """profile_step's cut-and-rejoin backward gives the same gradients as one plain backward."""
    from m2f.config import get_preset
    from m2f.loss import build_criterion
    from m2f.models.build import build_model

    cfg = get_preset("tiny", ["backbone.norm=frozen_bn"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    crit = build_criterion(cfg.loss, cfg.num_classes)
    x = torch.randn(1, 3, 64, 64)
    tgt = common.synthetic_targets(3, cfg.num_classes, 64, 64, "cpu")
    g = torch.Generator().manual_seed(0)
    sum(crit(model(x), [tgt], generator=g).values()).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    t = profile.profile_step(model, crit, x, [tgt], "cpu", generator=torch.Generator().manual_seed(0))
    assert len(t) == 7 and all(v > 0 for v in t.values())
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(ref) and len(ref) > 50
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-5, rtol=1e-4), n


def test_msdeform_module_recompute_backend_same_gradients():
    """backend="reference_recompute" trains the same function as "reference": equal outputs and
    parameter gradients (float64)."""
    from m2f.models.pixel_decoders.msdeform import MSDeformAttn

    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    S = sum(h * w for h, w in shapes)
    mods = []
    for backend in ("reference", "reference_recompute"):
        torch.manual_seed(0)
        m = MSDeformAttn(16, 2, 2, 3, backend=backend).double()
        torch.nn.init.normal_(m.sampling_offsets.weight, std=0.5)
        torch.nn.init.normal_(m.attention_weights.weight, std=0.5)
        mods.append(m)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, S, 16, generator=g, dtype=torch.float64)
    ref_pts = torch.rand(2, S, 2, 2, generator=g, dtype=torch.float64)
    outs, grads = [], []
    for m in mods:
        out = m(x, ref_pts, x, shapes)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert (outs[0] - outs[1]).abs().max() < 1e-12
    assert grads[0]["sampling_offsets.weight"].abs().max() > 1e-3
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() < 1e-10, name


def test_cpu_allocator_peak_counts_live_tensor_bytes():
    """The CPU memory stand-in: the peak of live tensor bytes while the function runs (12 MiB here: 4
    and 8 MiB live together, then the 4 MiB freed), not what was live before it."""
    before = torch.ones(2**22)  # 16 MiB live before: not counted

    def fn():
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**21)  # 8 MiB
        del a
        c = torch.ones(2**19)  # 2 MiB, after a was freed: the peak stays 12 MiB
        return b, c

    (b, c), peak = memory.cpu_allocator_peak(fn)
    assert 12 * 2**20 <= peak < 12 * 2**20 + 2**16, peak
    assert before.numel() == 2**22 and b.numel() == 2**21


def test_memory_worker_follows_the_trainers_autocast():
    """solver.amp_on_cpu: the measured step's forward runs under bf16 autocast, as in training."""
    r = memory.memory_worker("tiny", 64, "point", "point", "cpu", 2, ["solver.amp_on_cpu=true"])
    assert r["amp"] == "bf16" and r["peak_bytes"] > 0 and math.isfinite(r["total_loss"])
    r = memory.memory_worker("tiny", 64, "point", "point", "cpu", 2, [])
    assert r["amp"] is None


def test_speed_cli_amp(tmp_path):
    """--amp: both models under bf16 autocast, recorded in the result and its file name; execution
    switches given with --set reach the m2f model converted from HF (same function)."""
    assert cli.main(["speed", "--preset", "tiny", "--size", "64", "--iters", "1", "--num-masks", "2", "--threads",
                       "1", "--no-flops", "--no-inference", "--amp", "--out", str(tmp_path),
                       "--set", "backbone.activation_checkpointing=true",
                       "--set", "pixel_decoder.deform_attn_backend=reference_recompute"]) == 0
    r = json.loads((tmp_path / "speed_tiny_cpu_64_amp.json").read_text())
    assert r["amp"] == "bf16" and r["train"]["m2f"]["median_s"] > 0 and r["train"]["hf"]["median_s"] > 0
    assert r["m2f_config"]["backbone"]["activation_checkpointing"] is True
    assert r["m2f_config"]["pixel_decoder"]["deform_attn_backend"] == "reference_recompute"
    assert r["max_abs_diff_mask_logits"] < 1e-3
    assert "bf16 autocast" in (tmp_path / "README.md").read_text()


def test_summary_table_against_goals(tmp_path):
    """The README summary: one row per measured ratio with its goal verdict, from the JSONs alone
    (GPU results in a subfolder included); only the text between the markers is replaced."""
    out = tmp_path / "bench"
    (out / "gpu").mkdir(parents=True)
    env = {"device": "cpu", "threads": 1}

    def speed(ratio_inf, ratio_train, device_env):
        t = {"m2f": {"median_s": 1.0}, "hf": {"median_s": ratio_inf}}
        s = {"m2f": {"median_s": 1.0}, "hf": {"median_s": ratio_train}}
        return {"kind": "speed", "preset": "r50_coco_panoptic", "size": 512, "overrides": [], "amp": None,
                "environment": device_env, "inference": {**t, "ratio_m2f_over_hf": ratio_inf},
                "train": {**s, "ratio_m2f_over_hf": ratio_train}}

    (out / "speed_cpu.json").write_text(json.dumps(speed(1.6, 1.2, env)))
    (out / "gpu" / "speed_gpu.json").write_text(json.dumps(speed(2.5, 1.9, {"device": "cuda", "gpu": "NVIDIA H200",
                                                                            "threads": 16})))
    variants = [{"matching": m, "loss": l, "peak_bytes": b, "amp": "bf16"}
                for (m, l), b in zip(memory.VARIANTS, [3.3 * 2**30, 2 * 2**30, 3 * 2**30, 2**30])]
    (out / "memory_cpu.json").write_text(json.dumps({
        "kind": "memory", "preset": "r50_coco_panoptic", "overrides": ["solver.amp_on_cpu=true"], "environment": env,
        "sizes": {"1024": {"variants": variants, "ratios": memory.memory_ratios(variants)}}}))
    (out / "gpu" / "kernels.json").write_text(json.dumps({
        "kind": "kernels", "config": {"batch": 2, "size": 1024}, "environment": {"device": "NVIDIA H200"}, "bandwidth_bound": {},
        "results": [{"backend": "reference", "dtype": "float32", "forward_backward_ms": 40.0},
                    {"backend": "triton", "dtype": "float32", "forward_backward_ms": 10.0},
                    {"backend": "reference", "dtype": "bfloat16", "forward_backward_ms": 30.0},
                    {"backend": "triton", "dtype": "bfloat16", "forward_backward_ms": 15.0}]}))
    rows = report.render_summary(out).splitlines()
    def row(*words):
        hits = [r for r in rows if all(w in r for w in words)]
        assert len(hits) == 1, (words, rows)
        return hits[0]
    assert "**1.60x** | >= 1.5x: met" in row("inference", "speed_cpu")
    assert "**1.20x** | >= 1.3x: NOT met" in row("train speed", "speed_cpu")
    assert "**2.50x** | >= 2.0x: met" in row("inference", "speed_gpu", "NVIDIA H200")
    assert "**1.90x** | >= 2.0x: NOT met" in row("train speed", "speed_gpu")
    assert "**3.30x** | >= 3.0x: met" in row("memory", "bf16 autocast", "`solver.amp_on_cpu=true`")
    assert "**4.00x** | >= 3.0x: met" in row("deformable", "float32")
    assert "**2.00x** | >= 3.0x: NOT met" in row("deformable", "bfloat16")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.SUMMARY_BEGIN}\nold\n{report.SUMMARY_END}\noutro\n")
    report.splice_summary(out, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.SUMMARY_END}\noutro\n") and "old" not in text
    assert "**1.60x**" in text


def test_gemm_report_rows(tmp_path):
    """m2f.bench gemm's JSON lands in the README summary: median speed-up and the training step."""
    from m2f.bench import gemm as bench_gemm
    from m2f_kernels.cpu_gemm import onednn_available

    if not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear op")
    rows = bench_gemm.gemm_table(iters=1, shapes=[(64, 32, 16)])
    assert [r["op"] for r in rows] == ["forward x W^T", "input grad g W", "weight grad g^T x"]
    assert all(r["blas_gflops"] > 0 and r["onednn_gflops"] > 0 for r in rows)
    assert all(0 <= r["blas_rel_err"] < 1e-5 and 0 <= r["onednn_rel_err"] < 1e-5 for r in rows)  # float32, not bf16
    fake = {"kind": "gemm", "threads": 1, "rows": [{"onednn_speedup": s, "onednn_gflops": 2.0 * s, "blas_gflops": 2.0}
                                                   for s in (1.5, 2.0, 2.5)],
            "step": {"preset": "r50_coco_panoptic", "size": 512, "reference_s": 5.0, "auto_s": 4.0, "speedup": 1.25}}
    (tmp_path / "gemm_cpu.json").write_text(json.dumps(fake))
    text = report.render_summary(tmp_path)
    assert "**2.00x** (1.50-2.50)" in text and "| 4.00 s | 5.00 s | **1.25x** |" in text
    fake["rows"] = [dict(r, M=64, K=32, N=16, op="forward x W^T") for r in fake["rows"]]
    (tmp_path / "gemm_cpu.json").write_text(json.dumps(fake))
    page = report.render_readme(tmp_path)
    assert "## float32 GEMMs `gemm_cpu.json`" in page and "| 64 | 32 | 16 | forward x W^T | 2 | 5 | 2.50x | — |" in page


def test_compile_result_renders_its_verdict(tmp_path):
    """`python -m m2f.bench compile` results: eager vs compiled per gemm backend, the compile cost, the
    run length at which compiling pays off, or 'never' / the error when it does not."""
    from m2f.bench.compile import run_compile  # noqa: F401 - the module the CLI runs
    from m2f.bench.report import write_result

    res = {"kind": "compile", "preset": "tiny", "batch": 4, "size": 128, "iters": 5, "overrides": ["loss.num_points=1024"],
           "environment": {"device": "cpu", "cpu": {"model": "Test CPU", "isa_class": "avx2", "isa": ["avx2"]}},
           "variants": {"reference": {"eager_s": 0.5, "compiled_s": 0.4, "compile_s": 60.0, "speedup": 1.25,
                                      "break_even_iters": 600.0},
                        "slow": {"eager_s": 0.5, "compiled_s": 0.6, "compile_s": 60.0, "speedup": 0.83,
                                 "break_even_iters": None},
                        "auto": {"eager_s": 0.45, "error": "InductorError: weight must be a graph constant"}}}
    write_result(tmp_path, "compile_tiny_cpu_128", res)
    text = (tmp_path / "README.md").read_text()
    assert "| reference | 0.500 | 0.400 | 1.25x | 60 | 600 iterations |" in text
    assert "| slow | 0.500 | 0.600 | 0.83x | 60 | never (not faster) |" in text
    assert "| auto | 0.450 | does not compile: InductorError: weight must be a graph constant" in text
    assert "--set loss.num_points=1024" in text and "Test CPU (avx2" in text


def test_speed_summary_applies_the_tiny_goal_and_names_the_cpu(tmp_path):
    """The tiny preset's training step is judged against its own goal (2x HF), R50 against 1.3x; each
    row names the CPU it ran on."""
    def result(preset, ratio):
        env = {"device": "cpu", "threads": 1, "cpu": {"model": "Intel(R) Xeon(R) Processor", "isa_class": "avx512"}}
        step = {"m2f": {"median_s": 1.0}, "hf": {"median_s": ratio}, "ratio_m2f_over_hf": ratio}
        return {"kind": "speed", "preset": preset, "size": 128, "overrides": [], "environment": env, "train": step}

    (tmp_path / "a.json").write_text(json.dumps(result("tiny", 1.5)))
    (tmp_path / "b.json").write_text(json.dumps(result("r50_coco_panoptic", 1.5)))
    rows = [r for r in report.render_summary(tmp_path).splitlines() if "train speed" in r]
    tiny = next(r for r in rows if "`a.json`" in r)
    r50 = next(r for r in rows if "`b.json`" in r)
    assert ">= 2.0x: NOT met" in tiny and ">= 1.3x: met" in r50
    assert "cpu Intel Xeon, avx512, 1 thread" in tiny


def test_summary_marks_an_isa_capped_run_as_such(tmp_path):
    """A run with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS set emulates a lower
    ISA on a bigger CPU: its row says so rather than passing for the CPU's own figure."""
    cpu = {"model": "Intel(R) Xeon(R) Processor", "isa_class": "avx512", "aten_capability": "AVX2",
           "isa_caps": {"ATEN_CPU_CAPABILITY": "avx2"}}
    env = {"device": "cpu", "threads": 1, "cpu": cpu}
    step = {"m2f": {"median_s": 1.0}, "hf": {"median_s": 1.5}, "ratio_m2f_over_hf": 1.5}
    (tmp_path / "c.json").write_text(json.dumps({"kind": "speed", "preset": "r50_coco_panoptic", "size": 512,
                                                 "overrides": [], "environment": env, "train": step}))
    row = next(r for r in report.render_summary(tmp_path).splitlines() if "`c.json`" in r)
    assert "cpu Intel Xeon, avx512 capped to avx2, 1 thread" in row
