"""The whole configuration of an m2f run: one frozen dataclass per component, composed into
:class:`Config`.  Every switch the paper ablates is a field here; defaults are the paper's
(official COCO R50 panoptic config, see shared/PAPER.md).

Overrides are dotted paths, from Python or the CLI::

    cfg = get_preset("r50_coco_panoptic", ["decoder.cross_attention=standard"])
    cfg = apply_overrides(cfg, {"decoder.num_queries": 50})

An unknown path or a bad value raises :class:`ConfigError` naming the path and the valid choices.
"""
from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Dict, Iterable, Literal, Mapping, Optional, Tuple, Union, get_args, get_origin


from m2f.errors import M2FError


class ConfigError(M2FError, ValueError):
    """A bad config path or value (the message names the path and what was expected)."""


def execution_only(default: Any, kernel: bool = False):
    """A field that changes how a result is computed, not what (the one mark; :data:`EXECUTION_ONLY`
    is read from it): left out of a run's identity (:func:`config_hash`, resume, shared ablation runs),
    so e.g. a run that ran out of memory resumes with activation checkpointing switched on.
    ``kernel=True``: an implementation choice whose resolved value is recorded with every result
    (:func:`m2f.train.kernels_used`)."""
    return field(default=default, metadata={"execution_only": True, "kernel": kernel})


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------
BackboneKind = Literal[
    "resnet18", "resnet34", "resnet50", "resnet101", "swin_t", "swin_s", "swin_b", "swin_l"
]


@dataclass(frozen=True)
class BackboneCfg:
    kind: BackboneKind = "resnet50"
    # Local weight file (torchvision / timm / detectron2 .pkl-converted state dict). Never downloaded.
    weights: Optional[str] = None
    # ResNet normalisation: the official code uses FrozenBN ("frozen_bn"); "bn" / "gn" / "syncbn".
    norm: Literal["frozen_bn", "bn", "syncbn", "gn"] = "frozen_bn"
    # Freeze the stem (and res2..res{freeze_at}) as detectron2's FREEZE_AT; 0 = train everything.
    freeze_at: int = 0
    # Swin only.
    drop_path_rate: float = 0.3
    window_size: int = 7
    # ResNet only: True = stride in the 3x3 conv (torchvision / ResNet v1.5, official M2F R50).
    stride_in_3x3: bool = True
    # Activation checkpointing (mmdet's with_cp, Swin's use_checkpoint): each block keeps only its
    # input for backward and is recomputed there. Same function and gradients, less training memory,
    # about one more backbone forward per step.
    activation_checkpointing: bool = execution_only(False)


PixelDecoderKind = Literal["msdeform", "fpn", "semantic_fpn", "bifpn", "fapn", "transformer_encoder"]


@dataclass(frozen=True)
class PixelDecoderCfg:
    kind: PixelDecoderKind = "msdeform"
    conv_dim: int = 256  # channels of the multi-scale features handed to the decoder
    mask_dim: int = 256  # channels of the 1/4 per-pixel embedding
    norm: Literal["GN", "BN", "none"] = "GN"
    # Transformer encoder (msdeform: deformable layers over res3-res5; transformer_encoder: res5 only)
    num_encoder_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.0
    # Multi-scale deformable attention implementation (m2f_kernels/ms_deform_attn.py): "reference" (pure
    # PyTorch, runs everywhere: per-level grid_sample under autograd, one embedding_bag gather without;
    # both equal m2f_kernels.ms_deform_attn_reference), "reference_recompute" (the same, but training keeps
    # only the attention's inputs for backward and recomputes the samples there: less memory, more
    # time; reports/bench/kernels.json), "triton", "auto" (triton on CUDA when available).
    deform_attn_backend: Literal["reference", "reference_recompute", "triton", "auto"] = execution_only(
        "reference", kernel=True)
    # BiFPN repeats (only for kind=bifpn)
    bifpn_repeats: int = 2
    # Activation checkpointing of the transformer encoder layers (kinds msdeform and
    # transformer_encoder): each layer keeps only its input for backward and is recomputed there.
    # Same function and gradients.
    activation_checkpointing: bool = execution_only(False)


CrossAttention = Literal["masked", "standard", "mask_pooling", "smca", "smca_mask"]
FeatureSchedule = Literal["multi_scale", "single_32", "single_16", "single_8", "naive_multi_scale"]
LayerOrder = Literal["ca_first", "sa_first"]
QueryFeatures = Literal["learnable_supervised", "learnable", "zero"]


@dataclass(frozen=True)
class DecoderCfg:
    """Transformer decoder.  ``num_layers`` counts decoder layers only (9 = 3 rounds of 3
    levels); ``query_features='learnable_supervised'`` adds one extra prediction from the
    query features alone, so the default model yields 10 predictions."""

    hidden_dim: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    num_queries: int = 100
    num_layers: int = 9
    dropout: float = 0.0
    pre_norm: bool = False
    cross_attention: CrossAttention = "masked"
    feature_schedule: FeatureSchedule = "multi_scale"
    layer_order: LayerOrder = "ca_first"
    query_features: QueryFeatures = "learnable_supervised"
    # Masked attention: blocked where sigmoid(mask) < threshold (paper: 0.5).
    mask_threshold: float = 0.5
    # Always add a 1x1 projection of the pixel-decoder features (official: only if dims differ).
    enforce_input_projection: bool = False
    # Masked attention implementation: "reference" (explicit softmax) or "sdpa"
    # (scaled_dot_product_attention with an additive bias).
    attention_backend: Literal["reference", "sdpa"] = execution_only("sdpa", kernel=True)


@dataclass(frozen=True)
class LossCfg:
    class_weight: float = 2.0
    mask_weight: float = 5.0  # BCE
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    # Matching costs (paper / official: same as the loss weights)
    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    # Point sampling (paper Table 5: matching and final loss switched separately)
    matching: Literal["point", "mask"] = "point"
    loss: Literal["point", "mask"] = "point"
    num_points: int = 12544  # 112 x 112
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True


@dataclass(frozen=True)
class InferenceCfg:
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    top_k: int = 100  # instances per image
    panoptic: bool = True
    instance: bool = True
    semantic: bool = True


@dataclass(frozen=True)
class DataCfg:
    # Dataset spec: a registered name ("synth", "coco_2017_panoptic", ...) or a path spec
    # ("coco_panoptic:JSON:PNG_DIR:IMAGE_DIR", "coco_instances:JSON:IMAGE_DIR",
    #  "semantic:IMAGE_DIR:LABEL_DIR:NUM_CLASSES").
    train: str = "synth"
    val: str = "synth_val"
    task: Literal["panoptic", "instance", "semantic"] = "panoptic"
    # Large-scale jitter (instance/panoptic) or random resize + crop (semantic)
    image_size: int = 1024  # LSJ target / crop size
    min_scale: float = 0.1
    max_scale: float = 2.0
    flip: bool = True
    # Test-time: resize shorter side to this (0 = keep) and cap the longer side
    test_min_size: int = 0
    test_max_size: int = 0
    size_divisibility: int = 32
    num_workers: int = 2
    # Embedded synthetic dataset
    synth_images: int = 400
    synth_val_images: int = 100
    synth_size: int = 128
    synth_seed: int = 0


@dataclass(frozen=True)
class SolverCfg:
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    backbone_lr_multiplier: float = 0.1
    max_iters: int = 368750
    schedule: Literal["step", "poly"] = "step"
    steps: Tuple[float, ...] = (0.9, 0.95)  # fractions of max_iters (step schedule)
    gamma: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 10
    warmup_factor: float = 1.0
    clip_grad_norm: float = 0.01  # full-model L2; 0 disables
    amp: bool = True  # bf16 on CUDA; ignored on CPU unless amp_on_cpu
    amp_on_cpu: bool = False
    grad_accum: int = 1
    seed: int = 0
    eval_period: int = 0  # 0 = only at the end
    checkpoint_period: int = 5000
    log_period: int = 20
    # AdamW's implementation: "fused" (one kernel per parameter group; on CPU about 4x faster than
    # "foreach" for the tiny preset: reports/bench/), "foreach" (PyTorch's default), "auto" (fused
    # where this PyTorch has it for the device, else foreach).  Same update up to float32 rounding.
    optimizer_impl: Literal["auto", "fused", "foreach"] = execution_only("auto", kernel=True)
    # glibc malloc settings for CPU training (m2f.train.tune_cpu_allocator): "tuned" keeps freed
    # blocks of up to 32 MiB in the heap instead of returning them to the kernel after every step
    # (fewer page faults and system time), "default" leaves malloc as it is.  No effect on the numbers.
    cpu_allocator: Literal["tuned", "default"] = execution_only("tuned", kernel=True)


@dataclass(frozen=True)
class Config:
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    pixel_decoder: PixelDecoderCfg = field(default_factory=PixelDecoderCfg)
    decoder: DecoderCfg = field(default_factory=DecoderCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    inference: InferenceCfg = field(default_factory=InferenceCfg)
    data: DataCfg = field(default_factory=DataCfg)
    solver: SolverCfg = field(default_factory=SolverCfg)
    # Number of real classes K (the model predicts K + 1 with "no object").  COCO panoptic: 133.
    num_classes: int = 133
    # Backbone input normalisation (0-255 RGB), detectron2's ImageNet values.
    pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375)
    # float32 CPU GEMMs of every linear layer and 1x1 convolution (m2f_kernels/cpu_gemm.py): "onednn"
    # (oneDNN's linear op; how much faster than the BLAS depends on the CPU: reports/bench/gemm_cpu*.json),
    # "reference" (F.linear / F.conv2d), "auto" (oneDNN for float32 CPU tensors outside autocast where
    # the build has it, else reference).  Same function up to float32 summation order.
    gemm_backend: Literal["auto", "onednn", "reference"] = execution_only("auto", kernel=True)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's defaults (shared/PAPER.md): R50, MSDeformAttn, 9 layers, 100 queries.
    "r50_coco_panoptic": {},
    "r101_coco_panoptic": {"backbone.kind": "resnet101"},
    "swin_t_coco_panoptic": {"backbone.kind": "swin_t", "backbone.drop_path_rate": 0.3},
    "swin_s_coco_panoptic": {"backbone.kind": "swin_s", "backbone.drop_path_rate": 0.3},
    "swin_b_coco_panoptic": {"backbone.kind": "swin_b", "backbone.window_size": 12},
    "swin_l_coco_panoptic": {
        "backbone.kind": "swin_l",
        "backbone.window_size": 12,
        "decoder.num_queries": 200,
    },
    "r50_coco_instance": {"num_classes": 80, "data.task": "instance"},
    "r50_ade20k_semantic": {
        "num_classes": 150,
        "data.task": "semantic",
        "data.image_size": 512,
        "data.min_scale": 0.5,
        "data.max_scale": 2.0,
        "solver.schedule": "poly",
        "solver.max_iters": 160000,
        "solver.batch_size": 16,
        "solver.weight_decay": 0.05,
    },
    # CPU scale: ResNet-18, hidden 128, 50 queries, 3 encoder layers, on the embedded synthetic data.
    "tiny": {
        "num_classes": 9,  # the embedded synthetic dataset: 6 thing + 3 stuff classes
        "backbone.kind": "resnet18",
        "backbone.norm": "bn",
        "pixel_decoder.conv_dim": 128,
        "pixel_decoder.mask_dim": 128,
        "pixel_decoder.num_encoder_layers": 3,
        "pixel_decoder.ffn_dim": 256,
        "pixel_decoder.num_heads": 8,
        "decoder.hidden_dim": 128,
        "decoder.ffn_dim": 512,
        "decoder.num_heads": 8,
        "decoder.num_queries": 50,
        "decoder.num_layers": 9,
        "loss.num_points": 3136,  # 56 x 56
        "data.image_size": 128,
        "data.min_scale": 0.5,
        "data.max_scale": 1.5,
        "data.num_workers": 0,
        "solver.batch_size": 4,
        "solver.lr": 3e-4,
        "solver.backbone_lr_multiplier": 1.0,
        "solver.max_iters": 2000,
        "solver.clip_grad_norm": 1.0,
        "solver.checkpoint_period": 250,
        "solver.eval_period": 0,
        "solver.warmup_iters": 50,
        "solver.warmup_factor": 0.01,
        "inference.object_mask_threshold": 0.5,
    },
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, overrides: Union[None, Mapping[str, Any], Iterable[str]] = None) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid choices: {list_presets()}")
    cfg = apply_overrides(Config(), PRESETS[name])
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------
def parse_override_strings(items: Iterable[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form path=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _type_hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return f"one of {list(get_args(tp))}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    if origin in (tuple, Tuple):
        return "a comma-separated tuple"
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (possibly a CLI string) to type ``tp`` or raise ConfigError."""
    origin = get_origin(tp)
    bad = ConfigError(f"bad value {value!r} for {path}: expected {_describe(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"bad value {value!r} for {path}; valid choices: {list(choices)}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(path, a, value)
            except ConfigError:
                continue
        raise bad
    if origin in (tuple, Tuple):
        args = get_args(tp)
        elem = args[0] if args else str
        if isinstance(value, str):
            s = value.strip().strip("()[]")
            parts = [p.strip() for p in s.split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise bad
        return tuple(_coerce(path, elem, p) for p in parts)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad from None
                if f.is_integer():
                    return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _paths(cfg_cls, prefix: str = "") -> list[str]:
    out = []
    hints = _type_hints(cfg_cls)
    for f in fields(cfg_cls):
        tp = hints[f.name]
        if isinstance(tp, type) and is_dataclass(tp):
            out.extend(_paths(tp, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def get_args_choices(path: str) -> tuple:
    """The valid values of a Literal-typed field, e.g. ``get_args_choices("decoder.cross_attention")``."""
    cls: Any = Config
    parts = path.split(".")
    for part in parts[:-1]:
        cls = _type_hints(cls)[part]
    tp = _type_hints(cls)[parts[-1]]
    if get_origin(tp) is not Literal:
        raise ConfigError(f"{path} is not a field with fixed choices")
    return get_args(tp)


def all_paths() -> list[str]:
    """Every overridable dotted path."""
    return _paths(Config)


def _set(obj: Any, parts: list[str], value: Any, full: str) -> Any:
    cls = type(obj)
    names = [f.name for f in fields(cls)]
    head = parts[0]
    if head not in names:
        prefix = full[: len(full) - len(".".join(parts))]
        raise ConfigError(
            f"unknown config path {full!r}: {cls.__name__} has no field {head!r}; "
            f"valid choices under {prefix or '<root>'!r}: {names}"
        )
    tp = _type_hints(cls)[head]
    if len(parts) == 1:
        if isinstance(tp, type) and is_dataclass(tp):
            if isinstance(value, Mapping):
                sub = getattr(obj, head)
                for k, v in value.items():
                    sub = _set(sub, k.split("."), v, f"{full}.{k}")
                return replace(obj, **{head: sub})
            raise ConfigError(f"{full!r} is a section; set one of its fields: {_paths(tp, full + '.')}")
        return replace(obj, **{head: _coerce(full, tp, value)})
    if not (isinstance(tp, type) and is_dataclass(tp)):
        raise ConfigError(f"unknown config path {full!r}: {'.'.join(full.split('.')[:-len(parts)+1])!r} is not a section")
    return replace(obj, **{head: _set(getattr(obj, head), parts[1:], value, full)})


def apply_overrides(cfg: Config, overrides: Union[Mapping[str, Any], Iterable[str]]) -> Config:
    """Return a new config with dotted-path overrides applied (validated)."""
    if not isinstance(overrides, Mapping):
        overrides = parse_override_strings(overrides)
    for path, value in overrides.items():
        cfg = _set(cfg, path.split("."), value, path)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that single-field typing cannot express."""
    d = cfg.decoder
    if d.hidden_dim % d.num_heads:
        raise ConfigError(f"decoder.hidden_dim={d.hidden_dim} must be divisible by decoder.num_heads={d.num_heads}")
    p = cfg.pixel_decoder
    if p.conv_dim % p.num_heads:
        raise ConfigError(f"pixel_decoder.conv_dim={p.conv_dim} must be divisible by pixel_decoder.num_heads={p.num_heads}")
    for name, v in (("decoder.num_queries", d.num_queries), ("decoder.num_layers", d.num_layers),
                    ("num_classes", cfg.num_classes), ("solver.batch_size", cfg.solver.batch_size),
                    ("solver.grad_accum", cfg.solver.grad_accum), ("loss.num_points", cfg.loss.num_points)):
        if v < 1:
            raise ConfigError(f"{name}={v} must be >= 1")
    if not 0.0 <= d.dropout < 1.0:
        raise ConfigError(f"decoder.dropout={d.dropout} must be in [0, 1)")
    if not 0.0 <= cfg.loss.importance_sample_ratio <= 1.0:
        raise ConfigError("loss.importance_sample_ratio must be in [0, 1]")
    if cfg.loss.oversample_ratio < 1.0:
        raise ConfigError("loss.oversample_ratio must be >= 1")


# ----------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> Dict[str, Any]:
    def conv(v):
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def from_dict(d: Mapping[str, Any]) -> Config:
    """Inverse of :func:`to_dict` (validated; unknown keys rejected)."""
    flat: Dict[str, Any] = {}

    def walk(prefix, obj):
        for k, v in obj.items():
            if isinstance(v, Mapping):
                walk(prefix + k + ".", v)
            else:
                flat[prefix + k] = v

    walk("", d)
    return apply_overrides(Config(), flat)


def _marked(cls, key: str, prefix: str = "") -> Tuple[str, ...]:
    out: list = []
    hints = _type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and is_dataclass(tp):
            out.extend(_marked(tp, key, prefix + f.name + "."))
        elif f.metadata.get(key):
            out.append(prefix + f.name)
    return tuple(out)


# Fields marked :func:`execution_only` (read from the dataclass field metadata, the one mark).
EXECUTION_ONLY: Tuple[str, ...] = _marked(Config, "execution_only")
# The implementation choices among them (recorded, resolved, with results).
KERNEL_FIELDS: Tuple[str, ...] = _marked(Config, "kernel")


def get_path(cfg: Any, path: str) -> Any:
    """The value at a dotted path (``get_path(cfg, "decoder.num_queries")``)."""
    for k in path.split("."):
        cfg = getattr(cfg, k)
    return cfg


def config_hash(cfg: Config, execution: bool = False) -> str:
    """Stable short hash of the resolved config (for result records), :data:`EXECUTION_ONLY`
    fields left out unless ``execution`` (for what they change, e.g. memory)."""
    d = to_dict(cfg)
    for path in EXECUTION_ONLY if not execution else ():
        *parents, leaf = path.split(".")
        node = d
        for k in parents:
            node = node[k]
        node.pop(leaf)
    s = json.dumps(d, sort_keys=True)
    return hashlib.sha256(s.encode()).hexdigest()[:12]


def diff(cfg: Config, base: Optional[Config] = None) -> Dict[str, Any]:
    """Dotted paths whose values differ from ``base`` (default: ``Config()``)."""
    base = base or Config()
    a, b = _flatten(to_dict(cfg)), _flatten(to_dict(base))
    return {k: v for k, v in a.items() if b.get(k) != v}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out
