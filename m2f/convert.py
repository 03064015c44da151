"""Convert a HF transformers ``Mask2FormerForUniversalSegmentation`` into an m2f model.

    model, cfg = from_hf(hf_model)          # ResNet or Swin backbone
    out = model(pixel_values)               # same normalised input as HF's pixel_values

The m2f model reproduces HF's predictions: ``out.predictions()[i]`` <-> HF's
``auxiliary_logits[i]`` for i < last, and the final one <-> HF's ``class_queries_logits`` /
``masks_queries_logits`` (HF: ``decoder_layers`` counts the query-feature prediction, so
m2f ``num_layers = decoder_layers - 1``).

Mapping notes:
* HF's ResNet (``ResNetBackbone``) -> torchvision layout: ``embedder.embedder`` -> ``conv1/bn1``,
  ``stages.s.layers.b.layer.j`` -> ``layer{s+1}.b.conv{j+1}/bn{j+1}``, ``shortcut`` ->
  ``downsample``; ``downsample_in_bottleneck=True`` means the stride sits in the first 1x1 conv
  (m2f ``stride_in_3x3=False``).  HF BatchNorms become FrozenBN (= BN eval semantics).
* HF's cross-attention is an ``nn.MultiheadAttention`` (packed ``in_proj_weight`` [3C, C], q/k/v
  in that order); its self-attention has separate q/k/v projections, as m2f's ``Attention``.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Tuple

import torch
from torch import Tensor

from m2f.config import Config, apply_overrides
from m2f.errors import InputError

_RESNET_KINDS = {
    ((2, 2, 2, 2), "basic"): "resnet18",
    ((3, 4, 6, 3), "basic"): "resnet34",
    ((3, 4, 6, 3), "bottleneck"): "resnet50",
    ((3, 4, 23, 3), "bottleneck"): "resnet101",
}

_SWIN_KINDS = {
    (96, (2, 2, 6, 2)): "swin_t",
    (96, (2, 2, 18, 2)): "swin_s",
    (128, (2, 2, 18, 2)): "swin_b",
    (192, (2, 2, 18, 2)): "swin_l",
}


def _config_from_hf(hf_config) -> Config:
    """HF Mask2FormerConfig -> m2f Config (raises NotImplementedError for unsupported setups)."""
    c = hf_config
    bc = c.backbone_config
    over: Dict[str, object] = {}
    mtype = getattr(bc, "model_type", None)
    if mtype == "resnet":
        key = (tuple(bc.depths), bc.layer_type)
        if key not in _RESNET_KINDS:
            raise NotImplementedError(f"from_hf: HF ResNet depths/layer_type {key} has no m2f equivalent")
        expected_widths = [64, 128, 256, 512] if bc.layer_type == "basic" else [256, 512, 1024, 2048]
        if list(bc.hidden_sizes) != expected_widths or bc.embedding_size != 64:
            raise NotImplementedError(
                f"from_hf: non-standard ResNet widths {bc.hidden_sizes} / stem {bc.embedding_size}")
        if bc.downsample_in_first_stage or bc.hidden_act != "relu":
            raise NotImplementedError("from_hf: downsample_in_first_stage / non-ReLU ResNets are not supported")
        over.update({"backbone.kind": _RESNET_KINDS[key], "backbone.norm": "frozen_bn", "backbone.freeze_at": 0,
                     "backbone.stride_in_3x3": not bc.downsample_in_bottleneck})
    elif mtype == "swin":
        key = (bc.embed_dim, tuple(bc.depths))
        if key not in _SWIN_KINDS:
            raise NotImplementedError(f"from_hf: HF Swin embed_dim/depths {key} has no m2f equivalent")
        over.update({"backbone.kind": _SWIN_KINDS[key], "backbone.window_size": bc.window_size,
                     "backbone.drop_path_rate": float(bc.drop_path_rate)})
    else:
        raise NotImplementedError(f"from_hf: backbone type {mtype!r} is not supported (resnet, swin)")
    if c.activation_function != "relu":
        raise NotImplementedError(f"from_hf: decoder activation {c.activation_function!r} (only relu)")
    if c.common_stride != 4 or list(c.feature_strides) != [4, 8, 16, 32]:
        raise NotImplementedError("from_hf: only common_stride 4 and feature strides (4, 8, 16, 32) are supported")
    over.update({
        "pixel_decoder.kind": "msdeform",
        "pixel_decoder.conv_dim": c.feature_size,
        "pixel_decoder.mask_dim": c.mask_feature_size,
        "pixel_decoder.norm": "GN",
        "pixel_decoder.num_encoder_layers": c.encoder_layers,
        "pixel_decoder.num_heads": c.num_attention_heads,
        "pixel_decoder.num_points": 4,
        "pixel_decoder.ffn_dim": c.encoder_feedforward_dim,
        "pixel_decoder.dropout": float(c.dropout),
        "decoder.hidden_dim": c.hidden_dim,
        "decoder.num_heads": c.num_attention_heads,
        "decoder.ffn_dim": c.dim_feedforward,
        "decoder.num_queries": c.num_queries,
        "decoder.num_layers": c.decoder_layers - 1,
        "decoder.dropout": float(c.dropout),
        "decoder.pre_norm": bool(c.pre_norm),
        "decoder.enforce_input_projection": bool(c.enforce_input_projection),
        "decoder.cross_attention": "masked",
        "decoder.feature_schedule": "multi_scale",
        "decoder.layer_order": "ca_first",
        "decoder.query_features": "learnable_supervised",
        "decoder.mask_threshold": 0.5,
        "num_classes": c.num_labels,
        "loss.class_weight": float(c.class_weight),
        "loss.mask_weight": float(c.mask_weight),
        "loss.dice_weight": float(c.dice_weight),
        "loss.no_object_weight": float(c.no_object_weight),
        "loss.num_points": int(c.train_num_points),
        "loss.oversample_ratio": float(c.oversample_ratio),
        "loss.importance_sample_ratio": float(c.importance_sample_ratio),
    })
    return apply_overrides(Config(), over)


def _resnet_key(k: str) -> str:
    """HF ResNetBackbone key (below ``encoder.``) -> torchvision key, or '' to drop."""
    if k.endswith("num_batches_tracked"):
        return ""
    m = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", k)
    if m:
        return ("conv1." if m.group(1) == "convolution" else "bn1.") + m.group(2)
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\.(\w+)", k)
    if m:
        s, b, j, kind, p = m.groups()
        return f"layer{int(s) + 1}.{b}.{'conv' if kind == 'convolution' else 'bn'}{int(j) + 1}.{p}"
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(\w+)", k)
    if m:
        s, b, kind, p = m.groups()
        return f"layer{int(s) + 1}.{b}.downsample.{0 if kind == 'convolution' else 1}.{p}"
    raise KeyError(k)


_PIXEL_DECODER_RULES = [
    (r"level_embed", r"level_embed"),
    (r"input_projections\.(\d+)\.(\d+)\.(\w+)", r"input_proj.\1.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(\w+)", r"layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"layers.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(\w+)", r"layers.\1.linear1.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(\w+)", r"layers.\1.linear2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"layers.\1.norm2.\2"),
    (r"mask_projection\.(\w+)", r"mask_features.\1"),
]

_DECODER_RULES = [
    (r"queries_embedder\.weight", r"query_pos.weight"),
    (r"queries_features\.weight", r"query_feat.weight"),
    (r"level_embed\.weight", r"level_embed.weight"),
    (r"input_projections\.(\d+)\.(\w+)", r"input_proj.\1.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(\w+)", r"layers.\1.self_attn.\2.\3"),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"layers.\1.self_norm.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(\w+)", r"layers.\1.cross_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(\w+)", r"layers.\1.cross_norm.\2"),
    (r"decoder\.layers\.(\d+)\.fc1\.(\w+)", r"layers.\1.linear1.\2"),
    (r"decoder\.layers\.(\d+)\.fc2\.(\w+)", r"layers.\1.linear2.\2"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"layers.\1.ffn_norm.\2"),
    (r"decoder\.layernorm\.(\w+)", r"decoder_norm.\1"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(\w+)", r"mask_embed.layers.\1.\2"),
]


def _apply_rules(k: str, rules) -> str:
    for pat, rep in rules:
        if re.fullmatch(pat, k):
            return re.sub(pat, rep, k)
    raise KeyError(k)


def _fpn_positions(model) -> Dict[int, int]:
    """Position in m2f's FPN lists of the lateral/output conv that HF and the official code call
    ``adapter_{k+1}`` / ``layer_{k+1}``, k = 0 for res2 (their order, finest first)."""
    return {int(name[3:]) - 2: j for j, name in enumerate(getattr(model.pixel_decoder, "fpn_names", []))}


def _split_packed(sd: Dict[str, Tensor], prefix: str, param: str, packed: Tensor) -> None:
    """nn.MultiheadAttention's packed ``in_proj_{param}`` [3C, ...] (q, k, v in that order) ->
    m2f's ``{prefix}.q_proj/k_proj/v_proj.{param}``."""
    for name, part in zip(("q_proj", "k_proj", "v_proj"), packed.chunk(3, dim=0)):
        sd[f"{prefix}.{name}.{param}"] = part.clone()


def _state_dict_from_hf(hf_model, model) -> Dict[str, Tensor]:
    sd: Dict[str, Tensor] = {}
    hf_sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    unmapped = []
    hf_fpn = _fpn_positions(model)
    is_swin = getattr(hf_model.config.backbone_config, "model_type", None) == "swin"
    for k, v in hf_sd.items():
        try:
            if k.startswith("model.pixel_level_module.encoder."):
                if is_swin:
                    continue  # handled by swin_state_dict_from_hf
                new = _resnet_key(k[len("model.pixel_level_module.encoder."):])
                if new:
                    sd["backbone." + new] = v
            elif k.startswith("model.pixel_level_module.decoder."):
                rest = k[len("model.pixel_level_module.decoder."):]
                m = re.fullmatch(r"(adapter|layer)_(\d+)\.(\d+)\.(\w+)", rest)
                if m:
                    kind, idx, sub, p = m.groups()
                    j = hf_fpn[int(idx) - 1]
                    sd[f"pixel_decoder.{'lateral_convs' if kind == 'adapter' else 'output_convs'}.{j}.{sub}.{p}"] = v
                else:
                    sd["pixel_decoder." + _apply_rules(rest, _PIXEL_DECODER_RULES)] = v
            elif k.startswith("model.transformer_module."):
                rest = k[len("model.transformer_module."):]
                m = re.fullmatch(r"decoder\.layers\.(\d+)\.cross_attn\.in_proj_(weight|bias)", rest)
                if m:
                    i, p = m.groups()
                    _split_packed(sd, f"transformer_decoder.layers.{i}.cross_attn", p, v)
                else:
                    sd["transformer_decoder." + _apply_rules(rest, _DECODER_RULES)] = v
            elif k.startswith("class_predictor."):
                sd["transformer_decoder.class_embed." + k[len("class_predictor."):]] = v
            elif k.startswith("criterion."):
                continue
            else:
                unmapped.append(k)
        except KeyError:
            unmapped.append(k)
    if unmapped:
        raise NotImplementedError(f"from_hf: HF weights with no m2f equivalent: {unmapped[:8]}")
    if is_swin:
        try:
            from m2f.models.swin import swin_state_dict_from_hf
        except ImportError as e:
            raise NotImplementedError("from_hf: Swin conversion needs m2f.models.swin.swin_state_dict_from_hf") from e
        for k, v in swin_state_dict_from_hf(hf_model.model.pixel_level_module.encoder).items():
            sd["backbone." + k] = v
    return sd


def from_hf(hf_model) -> Tuple[torch.nn.Module, Config]:
    """HF ``Mask2FormerForUniversalSegmentation`` -> (m2f Mask2Former in eval mode, its Config).

    Raises NotImplementedError for HF setups m2f does not model (non-standard backbones, GELU
    decoders, other strides); InputError if the argument is not a Mask2Former model.
    """
    from m2f.models.build import build_model

    if not hasattr(hf_model, "model") or not hasattr(hf_model, "class_predictor"):
        raise InputError(f"from_hf: expected a Mask2FormerForUniversalSegmentation, got {type(hf_model).__name__}")
    cfg = _config_from_hf(hf_model.config)
    if cfg.backbone.kind.startswith("swin"):
        try:
            from m2f.models.swin import swin_state_dict_from_hf  # noqa: F401
        except ImportError as e:
            raise NotImplementedError(
                "from_hf: Swin conversion needs m2f.models.swin.swin_state_dict_from_hf") from e
    model = build_model(cfg)
    sd = _state_dict_from_hf(hf_model, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise NotImplementedError(
            f"from_hf: weight mapping incomplete; missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval(), cfg


# ---------------------------------------------------------------------------------------------
# detectron2 / official Mask2Former checkpoints
#
# The official code (facebookresearch/Mask2Former, a detectron2 project) names its weights
#   backbone.*                                   detectron2 ResNet (stem, res2..res5) or D2 Swin
#   sem_seg_head.pixel_decoder.adapter_N / layer_N          FPN lateral / output conv (+ .norm)
#   sem_seg_head.pixel_decoder.input_proj.i.{0,1}           conv + GroupNorm per encoder level
#   sem_seg_head.pixel_decoder.transformer.level_embed
#   sem_seg_head.pixel_decoder.transformer.encoder.layers.i.{self_attn.*,norm1,linear1,linear2,norm2}
#   sem_seg_head.pixel_decoder.mask_features
#   sem_seg_head.predictor.transformer_{self,cross}_attention_layers.i.{self_attn,multihead_attn}
#       (nn.MultiheadAttention: packed in_proj [3C, C], q/k/v in that order) + .norm
#   sem_seg_head.predictor.transformer_ffn_layers.i.{linear1,linear2,norm}
#   sem_seg_head.predictor.{query_feat,query_embed,level_embed,input_proj.i,decoder_norm,
#                           class_embed,mask_embed.layers.i}
# and carries criterion.empty_weight (dropped).  m2f's modules use the same layouts, so the
# conversion is a renaming plus the split of the packed attention projections.

_D2_PIXEL_DECODER_RULES = [
    (r"transformer\.level_embed", r"level_embed"),
    (r"input_proj\.(\d+)\.([01])\.(\w+)", r"input_proj.\1.\2.\3"),
    (r"transformer\.encoder\.layers\.(\d+)\.(self_attn\.\w+|norm1|norm2|linear1|linear2)\.(\w+)",
     r"layers.\1.\2.\3"),
    (r"mask_features\.(\w+)", r"mask_features.\1"),
]

_D2_PREDICTOR_RULES = [
    (r"query_embed\.weight", r"query_pos.weight"),
    (r"query_feat\.weight", r"query_feat.weight"),
    (r"level_embed\.weight", r"level_embed.weight"),
    (r"input_proj\.(\d+)\.(\w+)", r"input_proj.\1.\2"),
    (r"transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.(\w+)", r"layers.\1.self_attn.out_proj.\2"),
    (r"transformer_self_attention_layers\.(\d+)\.norm\.(\w+)", r"layers.\1.self_norm.\2"),
    (r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.out_proj\.(\w+)",
     r"layers.\1.cross_attn.out_proj.\2"),
    (r"transformer_cross_attention_layers\.(\d+)\.norm\.(\w+)", r"layers.\1.cross_norm.\2"),
    (r"transformer_ffn_layers\.(\d+)\.(linear1|linear2)\.(\w+)", r"layers.\1.\2.\3"),
    (r"transformer_ffn_layers\.(\d+)\.norm\.(\w+)", r"layers.\1.ffn_norm.\2"),
    (r"decoder_norm\.(\w+)", r"decoder_norm.\1"),
    (r"class_embed\.(\w+)", r"class_embed.\1"),
    (r"mask_embed\.layers\.(\d+)\.(\w+)", r"mask_embed.layers.\1.\2"),
]

_PD = "sem_seg_head.pixel_decoder."
_PRED = "sem_seg_head.predictor."


def _count(sd, pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    return max(idx) + 1 if idx else 0


def config_from_detectron2(d2: Dict[str, Tensor], base: Config) -> Config:
    """``base`` with the fields the weights determine (backbone kind / window, widths, numbers of
    layers, queries and classes; FrozenBN for ResNets, as the official models) set from a
    detectron2 Mask2Former state dict's shapes.  What the
    weights cannot tell (ResNet stride placement, thresholds, data) stays as in ``base``."""
    from m2f.models.weights import is_detectron2_resnet

    def need(key: str) -> Tensor:
        if key not in d2:
            raise InputError(f"detectron2 checkpoint: no {key!r}; is this a Mask2Former (MSDeformAttn pixel "
                             "decoder, masked-attention decoder) checkpoint?")
        return d2[key]

    over: Dict[str, object] = {}
    if is_detectron2_resnet(d2):
        depths = tuple(_count(d2, rf"backbone\.res{s}\.(\d+)\.") for s in range(2, 6))
        kind = _RESNET_KINDS.get((depths, "bottleneck" if "backbone.res2.0.conv3.weight" in d2 else "basic"))
        if kind is None:
            raise InputError(f"detectron2 checkpoint: ResNet with blocks per stage {depths} has no m2f kind")
        over.update({"backbone.kind": kind, "backbone.norm": "frozen_bn"})  # the official RESNETS.NORM
    elif "backbone.patch_embed.proj.weight" in d2:
        embed = int(d2["backbone.patch_embed.proj.weight"].shape[0])
        depths = tuple(_count(d2, rf"backbone\.layers\.{s}\.blocks\.(\d+)\.") for s in range(4))
        kind = _SWIN_KINDS.get((embed, depths))
        if kind is None:
            raise InputError(f"detectron2 checkpoint: Swin with embed dim {embed}, depths {depths} has no m2f kind")
        table = need("backbone.layers.0.blocks.0.attn.relative_position_bias_table").shape[0]
        over.update({"backbone.kind": kind, "backbone.window_size": (int(round(table ** 0.5)) + 1) // 2})
    else:
        raise InputError("detectron2 checkpoint: backbone is neither a detectron2 ResNet (backbone.stem.*) "
                         "nor a Swin (backbone.patch_embed.*)")
    qf = need(_PRED + "query_feat.weight")
    mf = need(_PD + "mask_features.weight")
    over.update({
        "num_classes": int(need(_PRED + "class_embed.weight").shape[0]) - 1,
        "decoder.num_queries": int(qf.shape[0]),
        "decoder.hidden_dim": int(qf.shape[1]),
        "decoder.num_layers": _count(d2, re.escape(_PRED) + r"transformer_cross_attention_layers\.(\d+)\."),
        "decoder.ffn_dim": int(need(_PRED + "transformer_ffn_layers.0.linear1.weight").shape[0]),
        "decoder.enforce_input_projection": any(k.startswith(_PRED + "input_proj.") for k in d2),
        "pixel_decoder.kind": "msdeform",
        "pixel_decoder.conv_dim": int(mf.shape[1]),
        "pixel_decoder.mask_dim": int(mf.shape[0]),
        "pixel_decoder.num_encoder_layers": _count(d2, re.escape(_PD) + r"transformer\.encoder\.layers\.(\d+)\."),
        "pixel_decoder.ffn_dim": int(need(_PD + "transformer.encoder.layers.0.linear1.weight").shape[0]),
    })
    return apply_overrides(base, over)


def state_dict_from_detectron2(d2: Dict[str, Tensor], model) -> Dict[str, Tensor]:
    """detectron2 Mask2Former state dict -> m2f state dict for ``model`` (built from
    :func:`config_from_detectron2`).  Raises InputError naming the keys it cannot place."""
    from m2f.models.weights import is_detectron2_resnet, resnet_keys_from_detectron2

    sd: Dict[str, Tensor] = {}
    fpn_pos = _fpn_positions(model)
    backbone = {k[len("backbone."):]: v for k, v in d2.items() if k.startswith("backbone.")}
    if is_detectron2_resnet(d2):
        for k, v in resnet_keys_from_detectron2(backbone).items():
            if not k.startswith("fc."):
                sd["backbone." + k] = v
    else:
        from m2f.models.swin import _normalise_checkpoint_keys

        for k, v in _normalise_checkpoint_keys(backbone).items():
            sd["backbone." + k] = v
    unmapped = []
    for k, v in d2.items():
        try:
            if k.startswith("backbone.") or k.startswith("criterion.") or k in ("pixel_mean", "pixel_std"):
                continue
            if k.startswith(_PD):
                rest = k[len(_PD):]
                m = re.fullmatch(r"(adapter|layer)_(\d+)(\.norm)?\.(weight|bias)", rest)
                if m:
                    kind, n, norm, p = m.groups()
                    j = fpn_pos[int(n) - 1]
                    mod = "lateral_convs" if kind == "adapter" else "output_convs"
                    sd[f"pixel_decoder.{mod}.{j}.{1 if norm else 0}.{p}"] = v
                else:
                    sd["pixel_decoder." + _apply_rules(rest, _D2_PIXEL_DECODER_RULES)] = v
            elif k.startswith(_PRED):
                rest = k[len(_PRED):]
                m = re.fullmatch(r"transformer_(self|cross)_attention_layers\.(\d+)\.(?:self_attn|multihead_attn)"
                                 r"\.in_proj_(weight|bias)", rest)
                if m:
                    which, i, p = m.groups()
                    _split_packed(sd, f"transformer_decoder.layers.{i}.{which}_attn", p, v)
                else:
                    sd["transformer_decoder." + _apply_rules(rest, _D2_PREDICTOR_RULES)] = v
            else:
                unmapped.append(k)
        except KeyError:
            unmapped.append(k)
    if unmapped:
        raise InputError(f"detectron2 checkpoint: weights with no m2f equivalent: {unmapped[:8]}"
                         f"{' ...' if len(unmapped) > 8 else ''}")
    return sd


def from_detectron2(weights, base: Config | str = "r50_coco_panoptic", overrides=()) -> Tuple[torch.nn.Module, Config]:
    """An official Mask2Former (detectron2) checkpoint -> (m2f model in eval mode, its Config).

    ``weights``: a path (``model_final_*.pkl`` from the official model zoo, or a ``.pth``) or a
    state dict.  ``base``: preset name or Config giving what the weights cannot (e.g. the
    ResNet stride placement: the official R50/R101 models use torchvision's, the default).
    Every tensor must find its place with the right shape, or InputError says which did not.
    """
    from m2f.config import get_preset
    from m2f.models.build import build_model
    from m2f.models.weights import check_shapes, read_state_dict

    field = "detectron2 checkpoint"
    if isinstance(weights, (str, os.PathLike)):
        d2 = read_state_dict(str(weights), field=field)
    else:
        d2 = {k: v if isinstance(v, Tensor) else torch.as_tensor(v) for k, v in dict(weights).items()}
    base_cfg = get_preset(base, list(overrides)) if isinstance(base, str) else apply_overrides(base, list(overrides))
    cfg = config_from_detectron2(d2, base_cfg)
    model = build_model(cfg)
    sd = state_dict_from_detectron2(d2, model)
    check_shapes(model, sd, str(weights) if isinstance(weights, (str, os.PathLike)) else "<state dict>",
                 "that it is a Mask2Former checkpoint", field=field)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise InputError(f"{field} does not fit the m2f model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    return model.eval(), cfg
