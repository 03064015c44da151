"""Swin Transformer backbones (Swin-T/S/B/L) for dense prediction, built from timm's layers.

``SwinBackbone.forward(x [B,3,H,W]) -> {"res2": [B,C,H/4,W/4], "res3": [B,2C,H/8,W/8],
"res4": [B,4C,H/16,W/16], "res5": [B,8C,H/32,W/32]}`` (sizes rounded up), each map passed through
its own LayerNorm as the official D2SwinTransformer does.

Any input size works.  The semantics are those of the detection Swin used by Mask2Former (and HF's
``SwinBackbone``), which differ from timm's classification model in two places, hence the
block here instead of ``timm``'s ``SwinTransformerBlock``:

* every block pads its map (right/bottom, zeros after ``norm1``) to a multiple of the window and
  *then* applies the cyclic shift, the shift mask being built for the padded size (timm shifts
  first and pads afterwards, which differs whenever padding is needed);
* windows and shifts are never shrunk for small maps ("always partition").

The patch embedding, window attention (fused ``qkv``, relative position bias), MLP, patch merging
and drop path are timm's modules, and parameter names follow timm's ``SwinTransformer``
(``patch_embed``, ``layers.{i}.downsample`` at the start of stage i >= 1,
``layers.{i}.blocks.{j}.attn.qkv`` ...), so a timm ImageNet checkpoint loads directly; an official
(Microsoft / detectron2) Swin checkpoint is renamed on load (``layers.{i}.downsample`` ->
``layers.{i+1}.downsample``, ``norm{i}`` -> ``out_norms.res{i+2}``).

:func:`swin_state_dict_from_hf` maps a HF ``SwinBackbone`` (as inside HF Mask2Former) onto this
module; :func:`build_swin_from_hf_config` builds the matching module.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging, WindowAttention
from torch import Tensor, nn

from m2f_kernels.cpu_gemm import adopt_linear
from m2f.config import BackboneCfg
from m2f.errors import InputError
from m2f.models.checkpointing import run_block
from m2f.models.weights import check_shapes, read_state_dict
from m2f.registry import BACKBONES

# kind -> (embed_dim, depths, num_heads).  Window size comes from BackboneCfg.window_size
# (official Mask2Former: 7 for T/S at 224 pre-training, 12 for B/L at 384).
SWIN_VARIANTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_l": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}

_OUT_NAMES = ("res2", "res3", "res4", "res5")


# ----------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------
def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of ``window``) -> [B * nW, window * window, C], windows row-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_merge(windows: Tensor, window: int, H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition`: [B * nW, window * window, C] -> [B, H, W, C]."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def shifted_window_mask(H: int, W: int, window: int, shift: int, device: torch.device,
                        dtype: torch.dtype) -> Tensor:
    """Additive mask [nW, window*window, window*window] for shifted-window attention on an
    (already padded, already rolled) H x W map: 0 between tokens of the same region, -100 across.

    Along each axis the rolled map has three regions, [0, L-window), [L-window, L-shift),
    [L-shift, L): positions that were not neighbours before the cyclic roll must not attend.
    Depends only on the sizes (no host synchronisation).
    """
    def regions(L: int) -> Tensor:
        i = torch.arange(L, device=device)
        return (i >= L - window).long() + (i >= L - shift).long()  # [L] in {0, 1, 2}

    region = regions(H)[:, None] * 3 + regions(W)[None, :]  # [H, W], 9 region ids
    ids = window_partition(region[None, :, :, None].to(dtype), window).squeeze(-1)  # [nW, w*w]
    diff = ids[:, None, :] - ids[:, :, None]  # [nW, w*w, w*w]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP on NHWC maps of any size.

    ``forward(x [B, H, W, C]) -> [B, H, W, C]``.  ``shift`` = 0 (W-MSA) or window // 2 (SW-MSA).
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, gemm_backend: str = "reference"):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=window, qkv_bias=True)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # timm builds plain nn.Linear layers: compute them through the GEMM backend (same parameters)
        self.attn.qkv, self.attn.proj = adopt_linear(self.attn.qkv, gemm_backend), adopt_linear(self.attn.proj, gemm_backend)
        self.mlp.fc1, self.mlp.fc2 = adopt_linear(self.mlp.fc1, gemm_backend), adopt_linear(self.mlp.fc2, gemm_backend)

    def _attn(self, x: Tensor) -> Tensor:
        _B, H, W, _C = x.shape
        ws, s = self.window, self.shift
        # Pad right/bottom to whole windows first, then roll (detection Swin / HF order).
        pad_h, pad_w = (-H) % ws, (-W) % ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # [B, Hp, Wp, C]
        Hp, Wp = H + pad_h, W + pad_w
        mask = None
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
            mask = shifted_window_mask(Hp, Wp, ws, s, x.device, x.dtype)  # [nW, ws*ws, ws*ws]
        out = self.attn(window_partition(x, ws), mask=mask)  # [B*nW, ws*ws, C]
        out = window_merge(out, ws, Hp, Wp)  # [B, Hp, Wp, C]
        if s > 0:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out[:, :H, :W, :]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Optional 2x2 patch merging (stages >= 1) followed by ``depth`` blocks alternating W-MSA /
    SW-MSA.  ``forward(x [B, H, W, C_in]) -> [B, ceil(H/2), ceil(W/2), C_out]`` (or same size)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, num_heads: int, window: int,
                 downsample: bool, drop_path: Sequence[float], mlp_ratio: float = 4.0, gemm_backend: str = "reference",
                 activation_checkpointing: bool = False):
        super().__init__()
        self.downsample = PatchMerging(in_dim, out_dim) if downsample else nn.Identity()
        if downsample:
            self.downsample.reduction = adopt_linear(self.downsample.reduction, gemm_backend)
        self.blocks = nn.Sequential(*[
            SwinBlock(out_dim, num_heads, window, shift=0 if j % 2 == 0 else window // 2,
                      mlp_ratio=mlp_ratio, drop_path=drop_path[j], gemm_backend=gemm_backend)
            for j in range(depth)
        ])
        self.activation_checkpointing = activation_checkpointing  # see m2f.models.checkpointing

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = run_block(self.activation_checkpointing, block, x)
        return x


class SwinBackbone(nn.Module):
    """Swin Transformer returning res2..res5 (channels-first, each LayerNorm-ed).

    Args:
        embed_dim: channels of res2 (res3/4/5 have 2x/4x/8x).
        depths, num_heads: blocks and heads per stage.
        window_size: attention window (tokens per side) in every stage.
        drop_path_rate: stochastic depth, linearly increasing from 0 over all blocks.
        patch_size: 4 (stride of res2).
        weights: optional local checkpoint (timm or official Swin layout); never downloaded.
        gemm_backend: the linear layers' GEMMs (m2f_kernels/cpu_gemm.py).
        activation_checkpointing: recompute each block in backward (same gradients, less memory).
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 drop_path_rate: float = 0.3, mlp_ratio: float = 4.0, patch_size: int = 4,
                 weights: str | None = None, gemm_backend: str = "reference", activation_checkpointing: bool = False):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise InputError(f"SwinBackbone: expected 4 stages, got depths={depths}, num_heads={num_heads}")
        if window_size < 1:
            raise InputError(f"backbone.window_size={window_size}: expected >= 1")
        dims = [embed_dim * 2 ** i for i in range(4)]
        # Zero-pads right/bottom to a multiple of the patch; LayerNorm on the NHWC tokens.
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=3, embed_dim=embed_dim,
                                      norm_layer=nn.LayerNorm, output_fmt="NHWC", strict_img_size=False,
                                      dynamic_img_pad=True)
        # Stochastic depth rising linearly 0 -> drop_path_rate over all blocks (plain Python, so the
        # module can also be built under torch.device("meta")).
        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        starts = [sum(depths[:i]) for i in range(4)]
        self.layers = nn.Sequential(*[
            SwinStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], window_size, downsample=i > 0,
                      drop_path=dpr[starts[i]:starts[i] + depths[i]], mlp_ratio=mlp_ratio, gemm_backend=gemm_backend,
                      activation_checkpointing=activation_checkpointing)
            for i in range(4)
        ])
        self.out_norms = nn.ModuleDict({name: nn.LayerNorm(d) for name, d in zip(_OUT_NAMES, dims)})
        self.out_channels: dict[str, int] = dict(zip(_OUT_NAMES, dims))
        self.out_strides: dict[str, int] = {name: patch_size * 2 ** i for i, name in enumerate(_OUT_NAMES)}
        self.window_size = window_size
        self.apply(self._init_weights)
        if weights:
            self.load_weights(weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official Swin init: truncated normal linears, zero biases, unit LayerNorms.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [B, 3, H, W] -> {"res2": [B, C, ceil(H/4), ceil(W/4)], ..., "res5": [B, 8C, ../32]}."""
        h = self.patch_embed(x)  # [B, H/4, W/4, C] (NHWC)
        out: dict[str, Tensor] = {}
        for name, stage in zip(_OUT_NAMES, self.layers):
            h = stage(h)  # [B, h, w, C_i]
            out[name] = self.out_norms[name](h).permute(0, 3, 1, 2).contiguous()  # [B, C_i, h, w]
        return out

    # ------------------------------------------------------------------------------------------
    def load_weights(self, path: str) -> None:
        """Load a local Swin checkpoint (timm, official Microsoft, or detectron2-converted layout;
        torch files or detectron2 ``.pkl`` pickles such as the official configs' ``swin_tiny_patch4_window7_224.pkl``).

        Classification heads and the final ``norm`` are dropped; ``out_norms`` may be absent
        (ImageNet checkpoints) and then keep their unit init.  Anything else missing, unexpected
        or of the wrong shape (e.g. a window-12 checkpoint into a window-7 model) is an InputError.
        """
        sd = read_state_dict(path)
        sd = _normalise_checkpoint_keys(sd)
        check_shapes(self, sd, path, "backbone.kind / backbone.window_size")
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("out_norms.")]
        if missing or unexpected:
            raise InputError(
                f"backbone.weights: {path!r} does not match the Swin layout; missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def _normalise_checkpoint_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm / official / detectron2 Swin key names -> this module's names."""
    out: dict[str, Tensor] = {}
    for prefix in ("module.", "backbone.", "bottom_up."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    # Official layout: patch merging at the END of stage i (there is a layers.0.downsample).
    official = any(k.startswith("layers.0.downsample.") for k in sd)
    for k, v in sd.items():
        if k.startswith(("head.", "norm.")) or k.endswith(("relative_position_index", "attn_mask")):
            continue
        m = re.fullmatch(r"norm([0-3])\.(weight|bias)", k)
        if m:  # detectron2 D2SwinTransformer out norms
            k = f"out_norms.res{int(m.group(1)) + 2}.{m.group(2)}"
        if official:
            m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", k)
            if m:
                k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        out[k] = v
    return out


def _register(kind: str) -> None:
    embed_dim, depths, heads = SWIN_VARIANTS[kind]

    @BACKBONES.register(kind)
    def _(cfg: BackboneCfg, gemm_backend: str = "reference") -> nn.Module:
        return SwinBackbone(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=cfg.window_size,
                            drop_path_rate=cfg.drop_path_rate, weights=cfg.weights, gemm_backend=gemm_backend,
                            activation_checkpointing=cfg.activation_checkpointing)


for _kind in SWIN_VARIANTS:
    _register(_kind)


# ----------------------------------------------------------------------------------------------
# HF transformers interop
# ----------------------------------------------------------------------------------------------
def build_swin_from_hf_config(hf_swin_config) -> tuple[SwinBackbone, dict[str, Any]]:
    """HF ``SwinConfig`` -> (randomly initialised :class:`SwinBackbone`, ``BackboneCfg`` kwargs).

    The kwargs (``kind``, ``window_size``, ``drop_path_rate``) rebuild the same module through the
    registry.  Raises NotImplementedError for HF setups this module does not model.
    """
    c = hf_swin_config
    key = (c.embed_dim, tuple(c.depths), tuple(c.num_heads))
    kinds = {(e, d, h): k for k, (e, d, h) in SWIN_VARIANTS.items()}
    if key not in kinds:
        raise NotImplementedError(f"HF Swin embed_dim/depths/num_heads {key} is not one of {sorted(SWIN_VARIANTS)}")
    unsupported = []
    if c.patch_size != 4:
        unsupported.append(f"patch_size={c.patch_size}")
    if c.use_absolute_embeddings:
        unsupported.append("use_absolute_embeddings=True")
    if not c.qkv_bias:
        unsupported.append("qkv_bias=False")
    if c.hidden_act != "gelu":
        unsupported.append(f"hidden_act={c.hidden_act!r}")
    if c.mlp_ratio != 4.0:
        unsupported.append(f"mlp_ratio={c.mlp_ratio}")
    if abs(c.layer_norm_eps - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_eps={c.layer_norm_eps}")
    if c.num_channels != 3:
        unsupported.append(f"num_channels={c.num_channels}")
    if unsupported:
        raise NotImplementedError(f"HF Swin config not supported: {', '.join(unsupported)}")
    kwargs = {"kind": kinds[key], "window_size": int(c.window_size), "drop_path_rate": float(c.drop_path_rate)}
    return BACKBONES.get(kwargs["kind"])(BackboneCfg(**kwargs)), kwargs


# HF per-block names (transformers 5: q/k/v/o_proj; 4.x: attention.self.query ...) -> ours.
_HF_BLOCK_RULES = (
    (r"layernorm_before\.(\w+)", r"norm1.\1"),
    (r"layernorm_after\.(\w+)", r"norm2.\1"),
    (r"attention\.o_proj\.(\w+)", r"attn.proj.\1"),
    (r"attention\.output\.dense\.(\w+)", r"attn.proj.\1"),
    (r"attention\.relative_position_bias\.relative_position_bias_table", "attn.relative_position_bias_table"),
    (r"attention\.self\.relative_position_bias_table", "attn.relative_position_bias_table"),
    (r"mlp\.fc1\.(\w+)", r"mlp.fc1.\1"),
    (r"mlp\.fc2\.(\w+)", r"mlp.fc2.\1"),
    (r"intermediate\.dense\.(\w+)", r"mlp.fc1.\1"),
    (r"output\.dense\.(\w+)", r"mlp.fc2.\1"),
)
_HF_QKV = {"attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
           "attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}


def swin_state_dict_from_hf(hf_backbone) -> dict[str, Tensor]:
    """HF ``SwinBackbone`` (module or its state dict) -> :class:`SwinBackbone` state dict.

    * ``swin.embeddings.patch_embeddings.projection`` / ``swin.embeddings.norm`` -> ``patch_embed.proj/norm``
    * block ``layernorm_before/after`` -> ``norm1/norm2``; separate q/k/v projections are
      concatenated (q, k, v order) into ``attn.qkv``; ``o_proj`` -> ``attn.proj``
    * HF ``encoder.layers.{i}.downsample`` (end of stage i) -> ``layers.{i+1}.downsample``
      (start of stage i+1); the 4 values of a 2x2 patch are concatenated in the same order
      (row-major within columns: (0,0), (1,0), (0,1), (1,1)) by both.
    * ``hidden_states_norms.stage{k}`` -> ``out_norms.res{k+1}``; ``swin.layernorm`` (classifier
      norm, unused by the backbone) is dropped.

    Raises NotImplementedError if a weight has no equivalent or an output norm is missing
    (the HF backbone must output all four stages).
    """
    sd = hf_backbone.state_dict() if isinstance(hf_backbone, nn.Module) else dict(hf_backbone)
    sd = {k: v.detach().clone() for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[tuple[int, str], Tensor]] = {}
    unmapped = []
    for k, v in sd.items():
        if k.endswith("relative_position_index") or k.startswith("swin.layernorm."):
            continue
        m = re.fullmatch(r"swin\.embeddings\.patch_embeddings\.projection\.(\w+)", k)
        if m:
            out[f"patch_embed.proj.{m.group(1)}"] = v
            continue
        m = re.fullmatch(r"swin\.embeddings\.norm\.(\w+)", k)
        if m:
            out[f"patch_embed.norm.{m.group(1)}"] = v
            continue
        m = re.fullmatch(r"hidden_states_norms\.stage([1-4])\.(\w+)", k)
        if m:
            out[f"out_norms.res{int(m.group(1)) + 1}.{m.group(2)}"] = v
            continue
        m = re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.downsample\.(\w+\.\w+)", k)
        if m:
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = v
            continue
        m = re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", k)
        if m:
            prefix, rest = f"layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            head, _, param = rest.rpartition(".")
            if head in _HF_QKV:
                qkv.setdefault(prefix + "attn.qkv." + param, {})[(_HF_QKV[head], param)] = v
                continue
            for pat, rep in _HF_BLOCK_RULES:
                if re.fullmatch(pat, rest):
                    out[prefix + re.sub(pat, rep, rest)] = v
                    break
            else:
                unmapped.append(k)
            continue
        unmapped.append(k)
    for name, parts in qkv.items():
        if len(parts) != 3:
            raise NotImplementedError(f"swin_state_dict_from_hf: incomplete q/k/v for {name}")
        out[name] = torch.cat([parts[key] for key in sorted(parts)], dim=0)  # q, k, v
    if unmapped:
        raise NotImplementedError(f"swin_state_dict_from_hf: HF weights with no m2f equivalent: {unmapped[:8]}")
    missing_norms = [n for n in _OUT_NAMES if f"out_norms.{n}.weight" not in out]
    if missing_norms:
        raise NotImplementedError(
            f"swin_state_dict_from_hf: the HF backbone lacks output norms for {missing_norms}; "
            "build it with out_features=['stage1', 'stage2', 'stage3', 'stage4']")
    return out
