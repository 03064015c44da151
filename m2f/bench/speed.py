"""Speed side by side with HF transformers: m2f and HF's ``Mask2FormerForUniversalSegmentation``
built with the same config, HF's random weights converted with :func:`m2f.convert.from_hf` (both
compute the same function), timed in ONE process, interleaved (A, B, A, B, ...; median and min):
training iterations/s (forward + own loss + backward + AdamW step) and inference images/s (batch 1,
eval, panoptic post-processing included as the paper's fps).  FLOPs with fvcore (the paper's
convention); the training step's FLOP floor counted (:mod:`m2f.bench.floor`).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Dict, Sequence

import torch

from m2f.bench.common import environment, interleaved, synthetic_targets
from m2f.config import EXECUTION_ONLY, Config, apply_overrides, get_path, get_preset, to_dict
from m2f.errors import InputError

_HF_RESNETS = {
    "resnet18": ([2, 2, 2, 2], [64, 128, 256, 512], "basic"),
    "resnet34": ([3, 4, 6, 3], [64, 128, 256, 512], "basic"),
    "resnet50": ([3, 4, 6, 3], [256, 512, 1024, 2048], "bottleneck"),
    "resnet101": ([3, 4, 23, 3], [256, 512, 1024, 2048], "bottleneck"),
}



def hf_model_for(cfg: Config):
    """HF Mask2FormerForUniversalSegmentation with ``cfg``'s architecture (random weights, offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    if cfg.backbone.kind not in _HF_RESNETS:
        raise InputError(f"bench speed: backbone.kind={cfg.backbone.kind!r}; the HF comparison supports "
                         f"{sorted(_HF_RESNETS)}")
    depths, widths, layer_type = _HF_RESNETS[cfg.backbone.kind]
    bc = ResNetConfig(depths=depths, hidden_sizes=widths, layer_type=layer_type,
                      out_features=["stage1", "stage2", "stage3", "stage4"],
                      downsample_in_bottleneck=not cfg.backbone.stride_in_3x3)
    d, p, l = cfg.decoder, cfg.pixel_decoder, cfg.loss
    hcfg = Mask2FormerConfig(
        backbone_config=bc, num_labels=cfg.num_classes, use_pretrained_backbone=False, feature_size=p.conv_dim,
        mask_feature_size=p.mask_dim, hidden_dim=d.hidden_dim, encoder_layers=p.num_encoder_layers,
        encoder_feedforward_dim=p.ffn_dim, dim_feedforward=d.ffn_dim, num_queries=d.num_queries,
        decoder_layers=d.num_layers + 1, num_attention_heads=d.num_heads, dropout=0.0, pre_norm=d.pre_norm,
        train_num_points=l.num_points, oversample_ratio=l.oversample_ratio,
        importance_sample_ratio=l.importance_sample_ratio, class_weight=l.class_weight, mask_weight=l.mask_weight,
        dice_weight=l.dice_weight, no_object_weight=l.no_object_weight)
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(hcfg)


def _freeze_hf_batchnorm(hf) -> None:
    """Frozen BN as the official / m2f backbone: BN modules in eval mode, affine not trained."""
    for m in hf.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            for prm in m.parameters():
                prm.requires_grad_(False)



def run_speed(preset: str, size: int, device: str, iters: int, num_masks: int, overrides: Sequence[str] = (),
              flops: bool = True, train: bool = True, infer: bool = True, amp: bool = False,
              batch: int = 1) -> Dict[str, Any]:
    """m2f vs HF transformers (the same weights), interleaved.  ``amp``: both models' forwards under
    bf16 autocast (as training runs on GPUs; the losses stay fp32), else both in fp32.  ``batch``
    images per step (training; inference stays one image).  With ``flops``: the FLOP floor of the
    training step: its counted FLOPs at the best measured GEMM rate (:mod:`m2f.bench.floor`)."""
    from m2f.convert import from_hf
    from m2f.loss import build_criterion
    from m2f.models.build import build_model

    cfg0 = get_preset(preset, list(overrides))
    hf = hf_model_for(cfg0)
    converted, cfg = from_hf(hf)
    # from_hf fixes the architecture and the weights; the preset's execution switches (kernel backends,
    # activation checkpointing) are applied by building the model from the merged config.
    cfg = apply_overrides(cfg, {p: get_path(cfg0, p) for p in EXECUTION_ONLY})
    model = build_model(cfg)
    model.load_state_dict(converted.state_dict())
    hf, model = hf.to(device), model.to(device)
    x = torch.randn(1, 3, size, size, device=device, generator=None)
    tgt = synthetic_targets(num_masks, cfg.num_classes, size, size, device)
    xb = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    tgts = [synthetic_targets(num_masks, cfg.num_classes, size, size, device, seed=i) for i in range(batch)]
    dev_type = torch.device(device).type
    ac = (lambda: torch.autocast(device_type=dev_type, dtype=torch.bfloat16)) if amp else nullcontext
    res: Dict[str, Any] = {"kind": "speed", "preset": preset, "overrides": list(overrides), "size": size,
                           "iters": iters, "num_masks": num_masks, "batch": batch, "amp": "bf16" if amp else None,
                           "environment": environment(device),
                           "m2f_config": to_dict(cfg)}
    # Same function check (eval, the final prediction).
    model.eval(), hf.eval()
    with torch.no_grad():
        diff = (model(x).mask_logits - hf(pixel_values=x).masks_queries_logits).abs().max()
    res["max_abs_diff_mask_logits"] = float(diff)

    if infer:
        from m2f.inference import postprocess
        from transformers import Mask2FormerImageProcessor

        n_thing = max(1, int(round(cfg.num_classes * 80 / 133)))  # COCO's thing share
        is_thing = torch.arange(cfg.num_classes) < n_thing
        stuff = set(range(n_thing, cfg.num_classes))
        proc = Mask2FormerImageProcessor()
        ic = cfg.inference
        kept: Dict[str, int] = {}

        def m2f_infer():
            with torch.no_grad():
                with ac():
                    out = model(x)
                r = postprocess(out, [(size, size)], [(size, size)], ic, is_thing, tasks=("panoptic",))
            kept["m2f"] = len(r[0]["panoptic_seg"][1])

        def hf_infer():
            with torch.no_grad():
                with ac():
                    out = hf(pixel_values=x)
                r = proc.post_process_panoptic_segmentation(
                    out, threshold=ic.object_mask_threshold, mask_threshold=0.5,
                    overlap_mask_area_threshold=ic.overlap_threshold, label_ids_to_fuse=stuff,
                    target_sizes=[(size, size)])
            kept["hf"] = len(r[0]["segments_info"])

        t = interleaved({"m2f": m2f_infer, "hf": hf_infer}, iters, device)
        res["inference"] = {
            **{k: {**v, "images_per_s": 1.0 / v["median_s"]} for k, v in t.items()},
            "ratio_m2f_over_hf": t["hf"]["median_s"] / t["m2f"]["median_s"],
            "ratio_min_m2f_over_hf": t["hf"]["min_s"] / t["m2f"]["min_s"],
            "segments_kept": kept,
            "postprocess": "m2f.inference.postprocess(panoptic) / HF post_process_panoptic_segmentation",
        }
        print(f"inference {size}px: m2f {t['m2f']['median_s']:.3f} s, HF {t['hf']['median_s']:.3f} s "
              f"-> m2f/HF speed {res['inference']['ratio_m2f_over_hf']:.2f}x", flush=True)

    if train:
        criterion = build_criterion(cfg.loss, cfg.num_classes).to(device)
        model.train(), hf.train()
        _freeze_hf_batchnorm(hf)
        opt_m = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
        opt_h = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

        def m2f_step():
            with ac():
                out = model(xb)
            losses = criterion(out, tgts)
            sum(losses.values()).backward()
            opt_m.step()
            opt_m.zero_grad(set_to_none=True)

        def hf_step():
            with ac():  # HF computes its loss inside the forward: under autocast too
                out = hf(pixel_values=xb, mask_labels=[t["masks"].float() for t in tgts],
                         class_labels=[t["labels"] for t in tgts])
            out.loss.backward()
            opt_h.step()
            opt_h.zero_grad(set_to_none=True)

        t = interleaved({"m2f": m2f_step, "hf": hf_step}, iters, device)
        res["train"] = {
            **{k: {**v, "iters_per_s": 1.0 / v["median_s"]} for k, v in t.items()},
            "ratio_m2f_over_hf": t["hf"]["median_s"] / t["m2f"]["median_s"],
            "ratio_min_m2f_over_hf": t["hf"]["min_s"] / t["m2f"]["min_s"],
            "step": "forward + own loss + backward + AdamW step (HF: its loss via mask_labels/class_labels)",
        }
        print(f"train step {batch}x{size}px: m2f {t['m2f']['median_s']:.3f} s, HF {t['hf']['median_s']:.3f} s "
              f"-> m2f/HF speed {res['train']['ratio_m2f_over_hf']:.2f}x", flush=True)

    if flops:
        from m2f.flops import count_flops

        f = count_flops(cfg, size, size)
        res["flops"] = {"gflops": f["gflops"], "params": f["params"], "gflops_by_part": f["gflops_by_part"],
                        "skipped_ops": f["skipped_ops"]}
        if train:
            from m2f.bench.floor import floor_summary, peak_gemm_rate
            from m2f.bench.profile import count_step_flops

            counted = count_step_flops(cfg, xb, tgts, device)
            steps = {k: v["median_s"] for k, v in res["train"].items() if k in ("m2f", "hf")}
            fl = floor_summary(counted, peak_gemm_rate(device), steps)
            res["flop_floor"] = {**fl, "fvcore_forward_gmacs_x_batch": f["gflops"] * batch}
            if amp:  # the rate is of float32 products; the steps ran their products in bf16
                res["flop_floor"]["note"] = ("the GEMM rate is float32's and these steps ran under bf16 autocast: "
                                             "the shares of that rate are not comparable with fp32 steps'")
            print(f"FLOP floor: {fl['train_step_gflop']:.1f} GFLOP (counted, forward + loss + backward) at "
                  f"{fl['gemm_gflops_per_s']:.0f} GFLOP/s = {fl['floor_s']:.3f} s per step; "
                  + ", ".join(f"{k} step at {100 * v:.0f}% of that rate" for k, v in fl["share_of_peak"].items()), flush=True)
    return res

