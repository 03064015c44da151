"""The ``m2f`` command line: ``m2f <command> --help`` for each command.

Commands: info, flops, data synth, train, eval, predict, convert, score.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from m2f.errors import M2FError


def _add_preset_args(p: argparse.ArgumentParser, default: str = "tiny") -> None:
    from m2f.config import list_presets

    p.add_argument("--preset", default=default, choices=list_presets(), help="config preset (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="dotted config override, repeatable (e.g. decoder.cross_attention=standard)")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that is not in m2f's weights-only format (an older m2f file, or one that "
                        "needs arbitrary unpickling, which can run code): only for files from a source you trust")


def _config(args):
    from m2f.config import get_preset

    return get_preset(args.preset, args.overrides)


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        for k, v in obj.items():
            print(f"{k}: {v}")


# ---------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from m2f.config import config_hash, diff, to_dict
    from m2f.models.build import build_model

    cfg = _config(args)
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    out = {"preset": args.preset, "params": n, "params_by_part": parts, "config_hash": config_hash(cfg),
           "overrides_vs_default": diff(cfg), "config": to_dict(cfg)}
    if args.json:
        _print(out, True)
    else:
        print(f"preset {args.preset}: {n / 1e6:.2f}M parameters " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in parts.items()))
        print(json.dumps(out["overrides_vs_default"], indent=1))
    return 0


def cmd_flops(args) -> int:
    from m2f.flops import count_flops

    cfg = _config(args)
    try:
        h, w = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        raise M2FError(f"--size {args.size!r}: expected HxW, e.g. 800x1216") from None
    res = count_flops(cfg, h, w)
    _print(res, args.json) if args.json else print(f"{res['gflops']:.1f} GFLOPs at {h}x{w} ({res['params'] / 1e6:.2f}M params)")
    return 0


def cmd_data_synth(args) -> int:
    from m2f.data.synth import write_synth

    paths = write_synth(args.out, images=args.images, val_images=args.val_images, size=args.size, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in dict(paths).items()}, indent=2))
    return 0


def cmd_train(args) -> int:
    from m2f.config import apply_overrides, parse_override_strings
    from m2f.train import DATA_PROPERTIES, train

    cfg = _config(args)
    explicit = set(parse_override_strings(args.overrides))

    extra = {}
    if args.data:
        extra["data.train"] = args.data
        extra["data.val"] = args.val_data or args.data
    elif args.val_data:
        extra["data.val"] = args.val_data
    if args.iters is not None:
        extra["solver.max_iters"] = args.iters
    if extra:
        cfg = apply_overrides(cfg, extra)
    res = train(cfg, args.out, resume=args.resume, device=args.device, progress=not args.no_progress,
                evaluate_at_end=not args.no_eval, trust_checkpoint=args.trust_checkpoint,
                from_data=[p for p in DATA_PROPERTIES if p not in explicit])
    if args.json:
        _print(res, True)
    return 0


def cmd_eval(args) -> int:
    from m2f.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(args.ckpt, data=args.data, task=args.task, engine=args.engine, device=args.device,
                              overrides=args.overrides, limit=args.limit, trust=args.trust_checkpoint)
    _print(res, args.json) if args.json else print(json.dumps(res, indent=2))
    return 0


def cmd_predict(args) -> int:
    from m2f.evaluate import predict_images

    res = predict_images(args.ckpt, args.images, args.out, device=args.device, task=args.task,
                         trust=args.trust_checkpoint)
    print(json.dumps(res, indent=2))
    return 0


def _rewrite_m2f_checkpoint(args):
    """An m2f checkpoint in an older or unsafe format -> (model, cfg, extra entries to keep), or None when
    ``args.weights`` is not an m2f checkpoint (then it is converted as detectron2 weights)."""
    from pathlib import Path

    from m2f.checkpoint import load_checkpoint, load_model_weights, to_weights_only
    from m2f.config import from_dict
    from m2f.errors import InputError
    from m2f.models.build import build_model

    if Path(args.weights).suffix == ".pkl":
        return None
    try:
        ckpt = load_checkpoint(args.weights, trust=args.trust_checkpoint, require_format=False)
    except InputError as e:
        if "not an m2f checkpoint" in str(e) or "cannot be read" in str(e):
            return None
        raise
    cfg = from_dict(ckpt["config"])
    model = build_model(cfg)
    load_model_weights(model, ckpt["model"], str(args.weights), "the checkpoint's own config")
    keep = {k: to_weights_only(ckpt[k]) for k in ("optimizer", "iter", "config_hash", "data", "git", "time")
            if k in ckpt}
    return model, cfg, {**keep, "source": {"rewritten_from": str(args.weights)}}


def cmd_convert(args) -> int:
    from m2f.checkpoint import save_checkpoint
    from m2f.config import config_hash, diff, to_dict
    from m2f.convert import from_detectron2

    rewritten = _rewrite_m2f_checkpoint(args)
    if rewritten is not None:
        model, cfg, extra = rewritten
    else:
        model, cfg = from_detectron2(args.weights, base=args.preset, overrides=args.overrides)
        extra = {"iter": None, "source": {"detectron2_checkpoint": str(args.weights)}}
    n = sum(p.numel() for p in model.parameters())
    save_checkpoint({**extra, "model": model.state_dict(), "config": to_dict(cfg)}, args.out)
    out = {"out": str(args.out), "params": n, "config_hash": config_hash(cfg), "overrides_vs_default": diff(cfg)}
    _print(out, True) if args.json else print(f"wrote {args.out}: {n / 1e6:.2f}M parameters, "
                                               f"{cfg.backbone.kind}, {cfg.num_classes} classes, "
                                               f"{cfg.decoder.num_queries} queries")
    return 0


def cmd_score(args) -> int:
    from m2f.evaluation.score import run

    return run(args) or 0


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2f", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="build a model and print its parameter count and resolved config")
    _add_preset_args(s, default="r50_coco_panoptic")
    s.add_argument("--json", action="store_true", help="print everything (parameters per part, config) as JSON")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("flops", help="count FLOPs with fvcore (the paper's tool) at an input size")
    _add_preset_args(s, default="r50_coco_panoptic")
    s.add_argument("--size", default="800x1216", help="HxW (default %(default)s)")
    s.add_argument("--json", action="store_true", help="print the count as JSON")
    s.set_defaults(fn=cmd_flops)

    s = sub.add_parser("data", help="datasets")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("synth", help="write the embedded synthetic dataset (COCO panoptic/instances + semantic PNGs)")
    d.add_argument("--out", required=True, help="folder to write (train/ and val/, each with images, COCO JSONs, PNGs)")
    d.add_argument("--images", type=int, default=400, help="train images (default %(default)s)")
    d.add_argument("--val-images", type=int, default=100, help="validation images (default %(default)s)")
    d.add_argument("--size", type=int, default=128, help="image side in pixels (default %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="generator seed (default %(default)s)")
    d.set_defaults(fn=cmd_data_synth)

    s = sub.add_parser("train", help="train a model (single process, or under torchrun for DDP)",
                       description="Train a model.  The training data sets the task (COCO instances -> instance, "
                       "COCO panoptic -> panoptic or the preset's task, label maps -> semantic), num_classes and the "
                       "thing / stuff split unless --set names them; a --set that disagrees with the data is an "
                       "error.  The checkpoint records them, so eval and predict need no flags.")
    _add_preset_args(s)
    s.add_argument("--data", help="train dataset: registered name or path spec "
                   "(coco_panoptic:JSON:PNG_DIR:IMAGE_DIR, coco_instances:JSON:IMAGE_DIR, semantic:IMAGE_DIR:LABEL_DIR:K)")
    s.add_argument("--val-data", help="validation dataset (default: the synthetic val split, or --data)")
    s.add_argument("--iters", type=int, help="override solver.max_iters")
    s.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    s.add_argument("--resume", action="store_true", help="continue from OUT/last.pth if it exists")
    _add_trust_arg(s)
    s.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    s.add_argument("--json", action="store_true", help="print the final result as JSON")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="evaluate a checkpoint (PQ / AP / mIoU)")
    s.add_argument("--ckpt", required=True, help="an m2f checkpoint (e.g. runs/tiny/last.pth); its config gives the "
                   "model, classes and task")
    s.add_argument("--data", help="dataset (default: the checkpoint's validation set)")
    s.add_argument("--task", default="all", choices=["panoptic", "instance", "semantic", "all"],
                   help="what to score (default all: every task the model and the data allow; a panoptic model "
                        "is scored as panoptic, instance and semantic)")
    s.add_argument("--engine", default="hotcoco", choices=["hotcoco", "reference"],
                   help="hotcoco (fast, default) or reference (panopticapi / pycocotools)")
    s.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    s.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    _add_trust_arg(s)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="inference overrides, e.g. inference.object_mask_threshold=0.5")
    s.add_argument("--json", action="store_true", help="print the metrics as JSON")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("predict", help="write COCO-format predictions and overlay PNGs for images")
    s.add_argument("--ckpt", required=True, help="an m2f checkpoint (e.g. runs/tiny/last.pth); its config and "
                   "recorded classes are all predict needs")
    s.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...) to predict")
    s.add_argument("--out", required=True, help="folder for the predictions (COCO panoptic / results JSON, PNGs) "
                   "and one IMAGE_overlay.png per image")
    s.add_argument("--task", default=None, choices=["panoptic", "instance", "semantic"],
                   help="what to predict (default: the task the checkpoint was trained for)")
    s.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    _add_trust_arg(s)
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("convert", help="an official (detectron2) Mask2Former checkpoint -> an m2f checkpoint "
                       "for m2f eval / predict")
    s.add_argument("weights", help="model_final_*.pkl from the official model zoo, a .pth state dict, or an older "
                   "m2f checkpoint to rewrite in the weights-only format")
    _add_preset_args(s, default="r50_coco_panoptic")
    s.add_argument("--out", required=True, help="the m2f checkpoint to write (e.g. r50_official.pth)")
    _add_trust_arg(s)
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("score", help="score prediction files against ground truth (no model)")
    try:
        from m2f.evaluation.score import add_score_args

        add_score_args(s)
    except ImportError:  # pragma: no cover
        pass
    s.set_defaults(fn=cmd_score)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except M2FError as e:
        print(f"m2f {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as e:
        from m2f.config import ConfigError

        if isinstance(e, (ConfigError, KeyError)):
            print(f"m2f {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
