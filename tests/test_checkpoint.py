"""Checkpoints never run code: weights-only files, refused crafted / legacy files, one-line load errors."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from m2f.checkpoint import (CHECKPOINT_FORMAT, check_weights_only, load_checkpoint, load_model_weights,
                            save_checkpoint)
from m2f.cli import main
from m2f.config import get_preset, to_dict
from m2f.errors import InputError
from m2f.models.build import build_model

SMALL = ["data.synth_images=8", "data.synth_val_images=3", "data.synth_size=64", "data.image_size=64",
         "solver.batch_size=2", "solver.max_iters=2", "loss.num_points=256", "decoder.num_layers=3",
         "pixel_decoder.num_encoder_layers=1", "inference.object_mask_threshold=0.0"]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


class _Payload:
    """Unpickling this object calls exec(), which creates ``marker``: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _evil_checkpoint(path: Path, marker: Path, cfg) -> Path:
    torch.save({"model": {"x": _Payload(marker)}, "config": to_dict(cfg), "iter": 1, "optimizer": {}}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--preset", "tiny", *_sets(SMALL), "--out", str(out), "--no-progress", "--no-eval"]) == 0
    return out


def test_written_checkpoints_load_weights_only_and_carry_the_format(trained):
    ck = torch.load(trained / "last.pth", weights_only=True)
    assert ck["format"] == CHECKPOINT_FORMAT and ck["iter"] == 2
    assert isinstance(ck["config"], dict) and ck["config"]["decoder"]["num_layers"] == 3
    assert torch.is_tensor(next(iter(ck["model"].values())))
    check_weights_only(ck)  # the tree itself is plain


def test_save_refuses_objects_that_need_unpickling(tmp_path):
    cfg = get_preset("tiny")
    with pytest.raises(TypeError, match=r"checkpoint\['config'\].*Config is not weights-only safe"):
        save_checkpoint({"model": {}, "config": cfg}, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("command", ["eval", "predict", "train --resume"])
def test_a_malicious_pickle_is_refused_and_never_runs(command, trained, tmp_path, capsys):
    cfg = get_preset("tiny", SMALL)
    marker = tmp_path / "pwned"
    if command == "train --resume":
        run = tmp_path / "run"
        run.mkdir()
        _evil_checkpoint(run / "last.pth", marker, cfg)
        argv = ["train", "--preset", "tiny", *_sets(SMALL), "--out", str(run), "--resume", "--no-progress",
                "--no-eval"]
        ck = run / "last.pth"
    else:
        ck = _evil_checkpoint(tmp_path / "evil.pth", marker, cfg)
        argv = ["eval", "--ckpt", str(ck)] if command == "eval" else [
            "predict", "--ckpt", str(ck), str(trained / "config.json"), "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's code ran"
    assert len(err.strip().splitlines()) == 1, err
    assert str(ck) in err and "refused" in err and "arbitrary unpickling" in err and "--trust-checkpoint" in err
    assert "exec" in err  # names what the file asked for


def test_legacy_checkpoint_needs_the_opt_in_and_convert_rewrites_it(trained, tmp_path, capsys):
    ck = torch.load(trained / "last.pth", weights_only=True)
    legacy = {k: v for k, v in ck.items() if k != "format"}  # what m2f wrote before the format mark
    torch.save(legacy, tmp_path / "old.pth")
    assert main(["eval", "--ckpt", str(tmp_path / "old.pth"), "--limit", "1", "--json"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "old.pth" in err and "written before" in err
    with pytest.warns(UserWarning, match="older m2f checkpoint format"):
        assert main(["eval", "--ckpt", str(tmp_path / "old.pth"), "--limit", "1", "--json",
                     "--trust-checkpoint"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 <= res["panoptic"]["PQ"] <= 100
    # m2f convert rewrites it once; the new file loads without the opt-in.
    assert main(["convert", str(tmp_path / "old.pth"), "--out", str(tmp_path / "new.pth"), "--json"]) == 0
    capsys.readouterr()
    new = load_checkpoint(tmp_path / "new.pth")
    assert new["format"] == CHECKPOINT_FORMAT and new["iter"] == 2
    assert all(torch.equal(new["model"][k], ck["model"][k]) for k in ck["model"])
    assert new["optimizer"]["state"].keys() == ck["optimizer"]["state"].keys()


def test_a_checkpoint_needing_unpickling_loads_only_with_trust(trained, tmp_path):
    ck = torch.load(trained / "last.pth", weights_only=True)
    unsafe = {**ck, "config": get_preset("tiny", SMALL)}  # a dataclass object: needs arbitrary unpickling
    torch.save(unsafe, tmp_path / "unsafe.pth")
    with pytest.raises(InputError, match="arbitrary unpickling"):
        load_checkpoint(tmp_path / "unsafe.pth")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loaded = load_checkpoint(tmp_path / "unsafe.pth", trust=True)
    assert any("runs any code" in str(x.message) for x in w)
    assert loaded["config"]["decoder"]["num_layers"] == 3  # converted to a plain dict
    check_weights_only(loaded)


def test_mismatched_weights_give_one_line_with_counts_and_the_cause(tmp_path):
    model = build_model(get_preset("tiny"))
    other = build_model(get_preset("tiny", ["decoder.num_queries=100", "num_classes=133"])).state_dict()
    del other["transformer_decoder.decoder_norm.weight"]
    other["extra.thing"] = torch.zeros(1)
    with pytest.raises(InputError) as e:
        load_model_weights(model, other, "ckpt.pth", "preset tiny", report_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 1000
    assert "1 missing (transformer_decoder.decoder_norm.weight)" in msg
    assert "1 unexpected (extra.thing)" in msg
    assert "4 wrong-shape" in msg  # query_pos, query_feat, class_embed weight and bias
    assert "built for preset tiny: 50 queries / 9 classes" in msg and "100 queries / 133 classes" in msg
    report = (tmp_path / "m2f-weights-mismatch-ckpt.txt").read_text().splitlines()
    assert len(report) == 6 and str(tmp_path) in msg
    # A file without any Mask2Former tensor says so.
    with pytest.raises(InputError, match="holds no Mask2Former weights"):
        load_model_weights(model, {"x": torch.zeros(1)}, "evil.pth", report_dir=tmp_path)
