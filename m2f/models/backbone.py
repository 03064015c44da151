"""ResNet backbones (torchvision architecture, random init, optional local weights).

``ResNetBackbone.forward(x [B,3,H,W]) -> {"res2": [B,C2,H/4,W/4], "res3": ../8, "res4": ../16,
"res5": ../32}``.  Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1`` ..
``layer4``), so a torchvision ImageNet state dict loads directly (its ``fc.*`` is ignored).

Normalisation (``BackboneCfg.norm``): ``frozen_bn`` (the official code: BN statistics and affine
fixed), ``bn``, ``syncbn`` and ``gn`` (GroupNorm, 32 groups).  ``freeze_at`` follows
detectron2's FREEZE_AT: 0 trains everything, 1 freezes the stem, 2 the stem and res2, ...
Frozen stages also get their BatchNorms replaced by :class:`FrozenBatchNorm2d`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor

from m2f_kernels.cpu_gemm import check_backend as check_gemm_backend
from m2f_kernels.cpu_gemm import conv2d as gemm_conv2d
from m2f.config import BackboneCfg
from m2f.errors import InputError
from m2f.models.checkpointing import run_block
from m2f.models.weights import check_shapes, is_detectron2_resnet, read_state_dict, resnet_keys_from_detectron2
from m2f.registry import BACKBONES

# name -> (torchvision constructor, bottleneck?)
_RESNETS = {
    "resnet18": (torchvision.models.resnet18, False),
    "resnet34": (torchvision.models.resnet34, False),
    "resnet50": (torchvision.models.resnet50, True),
    "resnet101": (torchvision.models.resnet101, True),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, no gradients).

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, i.e. exactly BatchNorm2d in
    eval mode; the training flag has no effect.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # BatchNorm2d checkpoints carry a step counter we have no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The affine map this layer applies: y = x * scale + shift, scale/shift [C]."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # [C]
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        return x * scale[None, :, None, None].to(x.dtype) + shift[None, :, None, None].to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Return ``module`` with every BatchNorm2d / SyncBatchNorm (recursively) frozen."""
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            frozen = cls(module.num_features, module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new = cls.convert(child)
            if new is not child:
                setattr(module, name, new)
        return module


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor, backend: str = "reference") -> Tensor:
    """``norm(conv(x))`` with the convolution through the GEMM ``backend`` (m2f_kernels/cpu_gemm.py); a
    FrozenBatchNorm2d is folded into the convolution (weight * scale, bias shift): one conv instead of
    conv + two full-size elementwise passes, same function (gradients still reach ``conv.weight``)."""
    if isinstance(norm, FrozenBatchNorm2d):
        scale, shift = norm.scale_shift()  # [C_out] each
        weight = conv.weight * scale.to(conv.weight.dtype)[:, None, None, None]
        bias = shift if conv.bias is None else conv.bias * scale + shift
        return gemm_conv2d(x, weight, bias.to(weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups,
                           backend=backend)
    return norm(gemm_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                            backend=backend))


def _block_forward(block: nn.Module, x: Tensor, backend: str = "reference") -> Tensor:
    """torchvision Bottleneck / BasicBlock forward with :func:`conv_norm` (same parameters)."""
    out = F.relu(conv_norm(block.conv1, block.bn1, x, backend))
    if hasattr(block, "conv3"):  # bottleneck
        out = F.relu(conv_norm(block.conv2, block.bn2, out, backend))
        out = conv_norm(block.conv3, block.bn3, out, backend)
    else:
        out = conv_norm(block.conv2, block.bn2, out, backend)
    identity = x if block.downsample is None else conv_norm(block.downsample[0], block.downsample[1], x, backend)
    return F.relu(out + identity)


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "syncbn":
        # Falls back to plain BN when torch.distributed is not initialised.
        return nn.SyncBatchNorm
    if norm == "gn":
        return lambda c: nn.GroupNorm(32, c)
    raise InputError(f"backbone.norm: unknown norm {norm!r}; expected one of frozen_bn, bn, syncbn, gn")


class ResNetBackbone(nn.Module):
    """torchvision ResNet trunk returning res2..res5.

    Args:
        depth_name: "resnet18" | "resnet34" | "resnet50" | "resnet101".
        norm: see module docstring.
        freeze_at: detectron2 FREEZE_AT (0 = train all).
        stride_in_3x3: bottleneck only; True = stride in the 3x3 conv (torchvision, ResNet v1.5),
            False = stride in the first 1x1 conv (original ResNet / MSRA weights).
        weights: optional local weights: a torchvision state dict or a detectron2 ``.pkl``
            (``stem`` / ``res2..res5`` names, e.g. the official configs' ``R-50.pkl``).
        gemm_backend: the convolutions' 1x1 GEMMs (m2f_kernels/cpu_gemm.py).
        activation_checkpointing: recompute each block in backward (same gradients, less memory).
    """

    def __init__(self, depth_name: str = "resnet50", norm: str = "frozen_bn", freeze_at: int = 0,
                 stride_in_3x3: bool = True, weights: Optional[str] = None, gemm_backend: str = "reference",
                 activation_checkpointing: bool = False):
        super().__init__()
        if depth_name not in _RESNETS:
            raise InputError(f"backbone.kind: unknown ResNet {depth_name!r}; expected one of {sorted(_RESNETS)}")
        if not 0 <= freeze_at <= 5:
            raise InputError(f"backbone.freeze_at={freeze_at}: expected 0..5")
        ctor, bottleneck = _RESNETS[depth_name]
        net = ctor(weights=None, norm_layer=_norm_layer(norm))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if bottleneck and not stride_in_3x3:
            for layer in (self.layer2, self.layer3, self.layer4):
                block = layer[0]
                s = block.conv2.stride
                block.conv1.stride, block.conv2.stride = s, (1, 1)
        expansion = 4 if bottleneck else 1
        widths = [64, 128, 256, 512]
        self.out_channels: Dict[str, int] = {f"res{i + 2}": w * expansion for i, w in enumerate(widths)}
        self.out_strides: Dict[str, int] = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        self.gemm_backend = check_gemm_backend(gemm_backend)
        self.activation_checkpointing = activation_checkpointing  # see m2f.models.checkpointing
        if weights:
            self.load_weights(weights)
        self.freeze(freeze_at)
        # Convolution weights channels_last too (the activations are, see forward): oneDNN then skips a
        # weight reorder per convolution and step (tiny preset: backbone forward + backward ~10% faster
        # on one CPU thread), bit-identical results (tests/test_model.py).  load_state_dict copies into
        # these tensors, so the layout survives loading and resuming.
        self.to(memory_format=torch.channels_last)

    def load_weights(self, path: str) -> None:
        """Load a local torchvision state dict or a detectron2 pickle (``R-50.pkl``, or a whole
        detectron2 model whose ``backbone.*`` is taken); ``fc.*`` is ignored, ``module.`` stripped."""
        sd = read_state_dict(path)
        if is_detectron2_resnet(sd):
            sd = resnet_keys_from_detectron2(sd)
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        check_shapes(self, sd, path, "backbone.kind")
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise InputError(
                f"backbone.weights: {path!r} does not match the torchvision ResNet layout; "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )

    def freeze(self, freeze_at: int) -> None:
        """detectron2 FREEZE_AT: 1 = stem, 2 = stem + res2, ... (BN there becomes FrozenBN)."""
        stages = [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]
        for i in range(min(freeze_at, 5)):
            for p in stages[i].parameters():
                p.requires_grad_(False)
        if freeze_at >= 1:
            self.bn1 = FrozenBatchNorm2d.convert(self.bn1)
        for i, name in enumerate(["layer1", "layer2", "layer3", "layer4"], start=2):
            if freeze_at >= i:
                setattr(self, name, FrozenBatchNorm2d.convert(getattr(self, name)))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        # channels_last: oneDNN (CPU) and cuDNN (tensor cores) convolutions run without layout
        # reorders; the outputs are channels_last views of the usual [B, C, H, W] tensors.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(F.relu(conv_norm(self.conv1, self.bn1, x, self.gemm_backend)))  # [B, 64, H/4, W/4]
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = run_block(self.activation_checkpointing, _block_forward, block, x, self.gemm_backend)
            feats.append(x)
        res2, res3, res4, res5 = feats  # [B, C_i, H/s_i, W/s_i], s = 4, 8, 16, 32
        return {"res2": res2, "res3": res3, "res4": res4, "res5": res5}


def _register(name: str) -> None:
    @BACKBONES.register(name)
    def _(cfg: BackboneCfg, gemm_backend: str = "reference") -> nn.Module:
        return ResNetBackbone(name, norm=cfg.norm, freeze_at=cfg.freeze_at, stride_in_3x3=cfg.stride_in_3x3,
                              weights=cfg.weights, gemm_backend=gemm_backend,
                              activation_checkpointing=cfg.activation_checkpointing)


for _name in _RESNETS:
    _register(_name)
