"""Backbone weights from detectron2 pickles (the official configs' ``R-50.pkl`` / ``swin_*.pkl``).

The detectron2 files are built here the way detectron2's ``convert-torchvision-to-d2`` and
``convert-pretrained-swin-model-to-d2`` scripts write them: a Python pickle of
``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}`` with the
torchvision names renamed (stem / res2..res5 / convK.norm / shortcut[.norm]).
"""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from m2f.config import BackboneCfg
from m2f.errors import InputError
from m2f.models.backbone import ResNetBackbone
from m2f.models.swin import SwinBackbone
from m2f.models.weights import read_state_dict, resnet_keys_from_detectron2
from m2f.registry import BACKBONES


def _torchvision_to_d2(name: str) -> str:
    """detectron2's published renaming of torchvision ResNet keys, written out independently of
    m2f.models.weights (which implements the inverse)."""
    if "layer" not in name:
        name = "stem." + name
    for t in (1, 2, 3, 4):
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return net.eval()


def _dump_d2(sd, path, prefix=""):
    model = {prefix + k: v.detach().numpy().copy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "torchvision", "matching_heuristics": True}, f)


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_detectron2_resnet_pickle_loads_torchvision_weights(tmp_path, depth):
    tv = _randomised(getattr(torchvision.models, depth)(weights=None))
    d2 = {_torchvision_to_d2(k): v for k, v in tv.state_dict().items()}
    assert "stem.conv1.norm.running_var" in d2 and "res2.0.conv1.weight" in d2 and "stem.fc.weight" in d2
    path = tmp_path / "R-xx.pkl"
    _dump_d2(d2, path)
    bb = ResNetBackbone(depth, norm="frozen_bn", weights=str(path)).eval()
    own = bb.state_dict()
    tvsd = tv.state_dict()
    assert set(own) <= set(tvsd)  # every tensor of ours came from the file
    for k, v in own.items():
        assert torch.equal(v, tvsd[k]), k
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        out = bb(x)["res5"]
    # FrozenBN is folded into the convs (a different fp32 rounding): compare relative to the scale
    assert out.shape == ref.shape and ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_full_detectron2_model_checkpoint_takes_the_backbone(tmp_path):
    """A whole detectron2 Mask2Former checkpoint (``backbone.*`` beside ``sem_seg_head.*``)."""
    tv = _randomised(torchvision.models.resnet18(weights=None))
    d2 = {_torchvision_to_d2(k): v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    d2 = {"backbone." + k: v for k, v in d2.items()}
    d2["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(100, 256)
    remapped = resnet_keys_from_detectron2(d2)
    assert set(remapped) == {k for k in tv.state_dict() if not k.startswith("fc.")}
    path = tmp_path / "model_final.pkl"
    _dump_d2(d2, path)
    bb = ResNetBackbone("resnet18", weights=str(path))
    assert torch.equal(bb.layer3[1].bn2.running_var, tv.layer3[1].bn2.running_var)
    assert torch.equal(bb.layer2[0].downsample[0].weight, tv.layer2[0].downsample[0].weight)


def test_detectron2_swin_pickle(tmp_path):
    small = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}
    src = SwinBackbone(window_size=7, **small)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.02)
    official = {}
    for k, v in src.state_dict().items():  # official layout: patch merging at the end of stage i
        parts = k.split(".")
        if k.startswith("layers.") and parts[2] == "downsample":
            k = ".".join(["layers", str(int(parts[1]) - 1)] + parts[2:])
        elif k.startswith("out_norms."):
            continue  # ImageNet checkpoints have no detectron2 out norms
        official[k] = v
    official["head.weight"] = torch.zeros(1000, 128)
    path = tmp_path / "swin_tiny_patch4_window7_224.pkl"
    _dump_d2(official, path)
    dst = SwinBackbone(window_size=7, weights=str(path), **small)
    for k, v in src.state_dict().items():
        if not k.startswith("out_norms."):
            assert torch.equal(dst.state_dict()[k], v), k


def test_python2_style_pickle_and_numpy_scalars(tmp_path):
    """detectron2's model-zoo pickles were written by Python 2: protocol 2, read with latin1."""
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "old.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"a": arr, "n": np.float64(2.5)}}, f, protocol=2)
    sd = read_state_dict(str(path))
    assert torch.equal(sd["a"], torch.from_numpy(arr)) and sd["n"].item() == 2.5


def test_weight_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"a": Evil()}}, f)
    with pytest.raises(InputError, match=r"backbone\.weights.*evil\.pkl.*not allowed"):
        read_state_dict(str(path))
    assert not (tmp_path / "pwned").exists()


def test_bad_weight_files_name_the_field_and_file(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(InputError, match=r"backbone\.weights.*junk\.pkl"):
        BACKBONES.get("resnet18")(BackboneCfg(kind="resnet18", weights=str(tmp_path / "junk.pkl")))
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(InputError, match="expected a state dict"):
        read_state_dict(str(tmp_path / "list.pkl"))
    tv = torchvision.models.resnet18(weights=None)
    d2 = {_torchvision_to_d2(k): v for k, v in tv.state_dict().items()}
    _dump_d2(d2, tmp_path / "r18.pkl")
    with pytest.raises(InputError, match="wrong shape"):  # basic-block weights into a bottleneck model
        ResNetBackbone("resnet50", weights=str(tmp_path / "r18.pkl"))
