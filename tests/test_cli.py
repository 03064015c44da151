"""The m2f command line end to end: info, data synth, train -> eval -> predict, score, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2f.cli import main

SMALL = ["data.synth_images=8", "data.synth_val_images=3", "data.synth_size=64", "data.image_size=64",
         "solver.batch_size=2", "solver.max_iters=2", "loss.num_points=256", "decoder.num_layers=3",
         "pixel_decoder.num_encoder_layers=1", "inference.object_mask_threshold=0.0"]


def _sets(items):
    out = []
    for s in items:
        out += ["--set", s]
    return out


def test_info_json_reports_params_and_resolved_config(capsys):
    assert main(["info", "--preset", "tiny", "--set", "decoder.cross_attention=standard", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["params"], int) and 10e6 < out["params"] < 20e6
    assert out["config"]["decoder"]["cross_attention"] == "standard"
    assert out["overrides_vs_default"]["decoder.cross_attention"] == "standard"


def test_bad_override_is_rejected_with_path_and_choices(capsys):
    assert main(["info", "--preset", "tiny", "--set", "decoder.cross_attention=sparse"]) == 2
    err = capsys.readouterr().err
    assert "decoder.cross_attention" in err and "masked" in err and "smca" in err
    assert main(["info", "--preset", "tiny", "--set", "decoder.nope=1"]) == 2
    assert "decoder.nope" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--preset", "tiny", *_sets(SMALL), "--out", str(out), "--no-progress", "--no-eval"]) == 0
    return out


def test_train_writes_checkpoint_metrics_and_config(trained):
    assert (trained / "last.pth").is_file() and (trained / "config.json").is_file()
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if "loss" in r] == [1, 2]


def test_eval_checkpoint_all_tasks(trained, capsys):
    assert main(["eval", "--ckpt", str(trained / "last.pth"), "--task", "all", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"panoptic", "instance", "semantic"}
    assert 0 <= res["panoptic"]["PQ"] <= 100 and 0 <= res["semantic"]["mIoU"] <= 100
    assert "AP" in res["instance"]


def test_predict_writes_coco_predictions_and_overlays(trained, tmp_path, capsys):
    imgs = sorted((Path.home() / ".cache").glob("m2f/synth*/val/images/*.png"))[:2]
    if not imgs:  # cache elsewhere (XDG_CACHE_HOME)
        from m2f.data.synth import write_synth

        paths = write_synth(tmp_path / "s", images=2, val_images=2, size=64, seed=0)
        imgs = sorted(Path(paths["val_images"]).glob("*.png"))[:2]
    out = tmp_path / "pred"
    assert main(["predict", "--ckpt", str(trained / "last.pth"), *map(str, imgs), "--out", str(out)]) == 0
    capsys.readouterr()
    pred = json.loads((out / "panoptic_predictions.json").read_text())
    assert len(pred["annotations"]) == 2
    for rec in pred["annotations"]:
        png = np.asarray(Image.open(out / rec["file_name"])).astype(np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        assert set(np.unique(ids)) - {0} == {s["id"] for s in rec["segments_info"]}
    ov = Image.open(out / f"{imgs[0].stem}_overlay.png")
    w, h = Image.open(imgs[0]).size
    k = ov.size[0] // w  # small images are drawn upscaled by an integer factor (m2f.viz.upscale_factor)
    assert ov.size == (k * w, k * h) and min(ov.size) >= 512


def test_predict_missing_image_is_a_clear_error(trained, tmp_path, capsys):
    assert main(["predict", "--ckpt", str(trained / "last.pth"), str(tmp_path / "nope.png"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint_names_the_file(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_train_with_wrong_num_classes_names_the_fix(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", *_sets(SMALL + ["num_classes=5"]), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "num_classes=9" in err


def _arguments(parser, path=()):
    """(command path, action) for every argument of every (sub)command, -h/--help left out."""
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                yield path + (name,), ("subcommand", helps.get(name))
                yield from _arguments(sub, path + (name,))
            continue
        yield path, ("/".join(a.option_strings) or a.dest, a.help)


@pytest.mark.parametrize("prog", ["m2f", "python -m ablations", "python -m m2f.bench"])
def test_every_argument_of_every_command_has_help(prog):
    from ablations.cli import build_parser as ablations_parser
    from m2f.bench.cli import build_parser as bench_parser
    from m2f.cli import build_parser

    parser = {"m2f": build_parser, "python -m ablations": ablations_parser, "python -m m2f.bench": bench_parser}[prog]()
    found = list(_arguments(parser))
    missing = [(" ".join(path), name) for path, (name, text) in found if not (text or "").strip()]
    assert missing == []
    if prog == "m2f":  # the walk reaches every command and their arguments
        commands = {path[0] for path, _ in found if path}
        assert commands == {"info", "flops", "data", "train", "eval", "predict", "convert", "score"}
        assert (("predict",), ("images", "image files (PNG, JPEG, ...) to predict")) in found
        assert len(found) > 60


def _one_class_coco_instances(root: Path, n: int = 4, size: int = 64) -> str:
    """A tiny COCO instances data set on disk: ``n`` noisy images with one or two squares of the single
    category "box" (dataset id 7, so the id mapping is exercised).  Returns its ``coco_instances:`` spec."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for j in range(1 + i % 2):
            x0, y0 = 6 + 30 * j, 8 + 4 * i
            img[y0:y0 + 20, x0:x0 + 20] = (230, 200, 40)
            poly = [x0, y0, x0 + 20, y0, x0 + 20, y0 + 20, x0, y0 + 20]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 7, "segmentation": [poly],
                         "area": 400.0, "bbox": [x0, y0, 20, 20], "iscrowd": 0})
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "height": size, "width": size})
    ann = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "box", "supercategory": "x"}]}
    (root / "instances.json").write_text(json.dumps(ann))
    return f"coco_instances:{root / 'instances.json'}:{root / 'images'}"


def test_one_class_instances_train_eval_predict_without_flags(tmp_path, capsys):
    """A new user's path: train on their own one-class COCO instances data with no --set, then eval and
    predict from the checkpoint alone.  The data sets task and classes; the checkpoint carries them."""
    import torch
    from pycocotools.coco import COCO

    spec = _one_class_coco_instances(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", spec, "--iters", "2", "--out", str(run), "--no-progress",
                 "--no-eval"]) == 0
    err = capsys.readouterr().err
    said = [l for l in err.splitlines() if "from the training data" in l]
    assert len(said) == 1 and "task instance" in said[0] and "num_classes=1 (1 thing, 0 stuff)" in said[0]
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert ckpt["config"]["num_classes"] == 1 and ckpt["config"]["data"]["task"] == "instance"
    assert ckpt["data"]["task"] == "instance" and [(c["id"], c["name"], c["isthing"]) for c in
                                                   ckpt["data"]["categories"]] == [(7, "box", 1)]

    assert main(["eval", "--ckpt", str(run / "last.pth"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"instance"} and 0 <= res["instance"]["AP"] <= 100

    out = tmp_path / "pred"
    imgs = sorted((tmp_path / "data" / "images").glob("*.png"))[:2]
    assert main(["predict", "--ckpt", str(run / "last.pth"), *map(str, imgs), "--out", str(out)]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["predictions"] == str(out / "predictions_coco.json")
    results = json.loads((out / "predictions_coco.json").read_text())
    assert results and {r["image_id"] for r in results} <= {0, 1}
    assert all(r["category_id"] == 7 and set(r) == {"image_id", "category_id", "segmentation", "score"}
               and 0 <= r["score"] <= 1 for r in results)
    gt = COCO(str(out / "predictions_images.json"))
    dt = gt.loadRes(str(out / "predictions_coco.json"))
    assert len(dt.getAnnIds()) == len(results)
    assert all(dt.anns[a]["segmentation"]["size"] == [64, 64] for a in dt.getAnnIds())
    for im in imgs:
        assert (out / f"{im.stem}_overlay.png").is_file()


def test_a_set_that_disagrees_with_the_data_fails_clearly(tmp_path, capsys):
    spec = _one_class_coco_instances(tmp_path / "data", n=2)
    assert main(["train", "--preset", "tiny", "--data", spec, "--set", "num_classes=3", "--iters", "1",
                 "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "num_classes=3" in err and "num_classes=1" in err and "instances.json" in err
    assert main(["train", "--preset", "tiny", "--data", spec, "--set", "data.task=semantic", "--iters", "1",
                 "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.task=semantic" in err and "only train instance" in err
    assert not (tmp_path / "a" / "last.pth").exists() and not (tmp_path / "b" / "last.pth").exists()
