"""Official (detectron2) Mask2Former checkpoints -> m2f: ``m2f.convert.from_detectron2``.

No official weights can be downloaded here, so the official-layout state dicts are built from HF
transformers models with random weights, renamed by the table HF's own conversion script
(``convert_mask2former_original_pytorch_checkpoint_to_pytorch.py``) uses between the official
names and HF's, written out here in the other direction (HF -> official).  The converted m2f
model must then equal ``from_hf`` of the same HF model tensor for tensor, and HF's predictions.
"""
from __future__ import annotations

import os
import pickle
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402,F401  (a test dependency: a missing one fails, never skips)

from m2f.convert import _apply_rules, _resnet_key, from_detectron2, from_hf  # noqa: E402
from m2f.errors import InputError  # noqa: E402
from test_parity_hf import TOL, _hf_model, _hf_swin_model  # noqa: E402
from test_weights import _torchvision_to_d2  # noqa: E402

_PIXEL = [  # HF (below model.pixel_level_module.decoder.) -> official (below sem_seg_head.pixel_decoder.)
    (r"adapter_(\d+)\.0\.(\w+)", r"adapter_\1.\2"),
    (r"adapter_(\d+)\.1\.(\w+)", r"adapter_\1.norm.\2"),
    (r"layer_(\d+)\.0\.(\w+)", r"layer_\1.\2"),
    (r"layer_(\d+)\.1\.(\w+)", r"layer_\1.norm.\2"),
    (r"input_projections\.(.+)", r"input_proj.\1"),
    (r"level_embed", r"transformer.level_embed"),
    (r"encoder\.layers\.(\d+)\.fc1\.(\w+)", r"transformer.encoder.layers.\1.linear1.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(\w+)", r"transformer.encoder.layers.\1.linear2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"transformer.encoder.layers.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(.+)", r"transformer.encoder.layers.\1.self_attn.\2"),
    (r"mask_projection\.(\w+)", r"mask_features.\1"),
]
_DECODER = [  # HF (below model.transformer_module.) -> official (below sem_seg_head.predictor.)
    (r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)", r"transformer_self_attention_layers.\1.self_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"transformer_self_attention_layers.\1.norm.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(in_proj_\w+)", r"transformer_cross_attention_layers.\1.multihead_attn.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(\w+)",
     r"transformer_cross_attention_layers.\1.multihead_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(\w+)", r"transformer_cross_attention_layers.\1.norm.\2"),
    (r"decoder\.layers\.(\d+)\.fc1\.(\w+)", r"transformer_ffn_layers.\1.linear1.\2"),
    (r"decoder\.layers\.(\d+)\.fc2\.(\w+)", r"transformer_ffn_layers.\1.linear2.\2"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"transformer_ffn_layers.\1.norm.\2"),
    (r"decoder\.layernorm\.(\w+)", r"decoder_norm.\1"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(\w+)", r"mask_embed.layers.\1.\2"),
    (r"queries_embedder\.weight", r"query_embed.weight"),
    (r"queries_features\.weight", r"query_feat.weight"),
    (r"level_embed\.weight", r"level_embed.weight"),
    (r"input_projections\.(.+)", r"input_proj.\1"),
]



def official_state_dict(hf) -> dict:
    """An official-layout (detectron2) state dict holding the HF model's weights."""
    hf_sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    out = {}
    qkv = {}
    swin = getattr(hf.config.backbone_config, "model_type", None) == "swin"
    for k, v in hf_sd.items():
        if k.startswith("model.pixel_level_module.encoder."):
            if not swin:
                tv = _resnet_key(k[len("model.pixel_level_module.encoder."):])
                if tv:
                    out["backbone." + _torchvision_to_d2(tv)] = v
        elif k.startswith("model.pixel_level_module.decoder."):
            out["sem_seg_head.pixel_decoder." + _apply_rules(k[len("model.pixel_level_module.decoder."):], _PIXEL)] = v
        elif k.startswith("model.transformer_module."):
            rest = k[len("model.transformer_module."):]
            m = re.fullmatch(r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)", rest)
            if m:
                qkv[(m.group(1), m.group(3), m.group(2))] = v
            else:
                out["sem_seg_head.predictor." + _apply_rules(rest, _DECODER)] = v
        elif k.startswith("class_predictor."):
            out["sem_seg_head.predictor.class_embed." + k[len("class_predictor."):]] = v
        elif k.startswith("criterion."):
            out[k] = v
        else:
            raise KeyError(k)
    for (i, p, _) in {(i, p, None) for (i, p, _) in qkv}:
        out[f"sem_seg_head.predictor.transformer_self_attention_layers.{i}.self_attn.in_proj_{p}"] = torch.cat(
            [qkv[(i, p, c)] for c in "qkv"], dim=0)
    if swin:
        from m2f.models.swin import swin_state_dict_from_hf

        for k, v in swin_state_dict_from_hf(hf.model.pixel_level_module.encoder).items():
            parts = k.split(".")
            if k.startswith("layers.") and parts[2] == "downsample":  # official: merging ends stage i
                k = ".".join(["layers", str(int(parts[1]) - 1)] + parts[2:])
            elif k.startswith("out_norms."):
                k = f"norm{int(parts[1][3]) - 2}.{parts[2]}"
            out["backbone." + k] = v
            if k.endswith("relative_position_bias_table"):  # buffers the official file also holds
                out["backbone." + k.replace("relative_position_bias_table", "relative_position_index")] = \
                    torch.zeros(49, 49, dtype=torch.long)
    return out


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _dump_pkl(sd, path):
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "test"}, f)


def test_official_resnet_checkpoint_equals_from_hf(tmp_path):
    hf = _hf_model("tiny", num_labels=7)
    d2 = official_state_dict(hf)
    assert "sem_seg_head.predictor.transformer_self_attention_layers.8.self_attn.in_proj_weight" in d2
    assert "backbone.res5.1.conv2.norm.running_var" in d2 and "criterion.empty_weight" in d2
    path = tmp_path / "model_final.pkl"
    _dump_pkl(d2, path)
    # base preset differs from the checkpoint in every shape-given field: they come from the weights
    model, cfg = from_detectron2(str(path), base="r50_coco_panoptic")
    ref, ref_cfg = from_hf(hf)
    assert (cfg.backbone.kind, cfg.num_classes, cfg.decoder.num_queries, cfg.decoder.hidden_dim) == \
        ("resnet18", 7, 50, 128)
    assert (cfg.decoder.num_layers, cfg.pixel_decoder.num_encoder_layers, cfg.decoder.ffn_dim) == \
        (ref_cfg.decoder.num_layers, ref_cfg.pixel_decoder.num_encoder_layers, ref_cfg.decoder.ffn_dim)
    _assert_same_model(model, ref)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = hf(pixel_values=x)
        ours = model(x)
    assert (ours.class_logits - out.class_queries_logits).abs().max() < TOL
    assert (ours.mask_logits - out.masks_queries_logits).abs().max() < TOL


def test_official_swin_checkpoint_equals_from_hf():
    hf = _hf_swin_model()
    d2 = official_state_dict(hf.eval())
    model, m2f_cfg = from_detectron2(d2, base="swin_l_coco_panoptic")  # window 12, 200 queries in the base
    assert (m2f_cfg.backbone.kind, m2f_cfg.backbone.window_size, m2f_cfg.decoder.num_queries) == ("swin_t", 7, 20)
    _assert_same_model(model, from_hf(hf)[0])


def test_conversion_is_discriminative_and_errors_name_the_keys(tmp_path):
    hf = _hf_model("tiny", num_labels=7)
    d2 = official_state_dict(hf)
    # swapping q and k inside a packed projection must change the model
    k = "sem_seg_head.predictor.transformer_cross_attention_layers.3.multihead_attn.in_proj_weight"
    q_, k_, v_ = d2[k].chunk(3)
    swapped = dict(d2, **{k: torch.cat([k_, q_, v_])})
    a, _ = from_detectron2(d2, base="tiny")
    b, _ = from_detectron2(swapped, base="tiny")
    assert not torch.equal(a.transformer_decoder.layers[3].cross_attn.q_proj.weight,
                           b.transformer_decoder.layers[3].cross_attn.q_proj.weight)
    extra = dict(d2, **{"sem_seg_head.predictor.something_new.weight": torch.zeros(3)})
    with pytest.raises(InputError, match="something_new"):
        from_detectron2(extra, base="tiny")
    missing = {k: v for k, v in d2.items() if "transformer_ffn_layers.2.norm" not in k}
    with pytest.raises(InputError, match=r"missing .*layers\.2\.ffn_norm"):
        from_detectron2(missing, base="tiny")
    with pytest.raises(InputError, match="query_feat"):
        from_detectron2({k: v for k, v in d2.items() if "query_feat" not in k}, base="tiny")


def test_convert_cli_writes_an_m2f_checkpoint(tmp_path, capsys):
    from m2f.cli import main
    from m2f.evaluate import load_model_from_checkpoint

    hf = _hf_model("tiny", num_labels=7)
    path = tmp_path / "model_final_abc.pkl"
    _dump_pkl(official_state_dict(hf), path)
    out = tmp_path / "official.pth"
    assert main(["convert", str(path), "--preset", "tiny", "--out", str(out), "--json"]) == 0
    assert '"params"' in capsys.readouterr().out
    model, cfg = load_model_from_checkpoint(str(out), device="cpu")
    assert cfg.num_classes == 7 and cfg.backbone.kind == "resnet18"
    _assert_same_model(model, from_hf(hf)[0])
    assert main(["convert", str(tmp_path / "nope.pkl"), "--out", str(out)]) != 0
    assert "nope.pkl" in capsys.readouterr().err
