"""The masked-attention transformer decoder (paper Sec. 3.2) with every ablation switch of
:class:`m2f.config.DecoderCfg`.

Per decoder layer (default ``layer_order="ca_first"``, post-norm):

    X = LN(X + CrossAttn(X + P, F_l + pos_l, F_l, bias = M_{l-1}))   # masked attention
    X = LN(X + SelfAttn(X + P, X + P, X))
    X = LN(X + FFN(X))

``X`` [B, Q, C] query features, ``P`` [B, Q, C] learnable query positions, ``F_l`` [B, HW_l, C] the
attended pixel-decoder level (+ level embedding), ``M_{l-1}`` the additive mask from the previous
prediction.  After each layer (and, with ``query_features="learnable_supervised"``, once before
layer 1) a prediction is made: ``Y = decoder_norm(X)``, class logits = ``Linear(Y)`` [B, Q, K+1],
mask logits = ``einsum(MLP(Y), mask_features)`` [B, Q, H/4, W/4].

Cross-attention kinds (``cross_attention``; paper Table 4c):
    masked       softmax over keys inside the previous mask (sigmoid >= mask_threshold); a query
                 whose mask is empty at that level attends everywhere.  The mask is detached.
    standard     plain cross-attention (DETR).
    mask_pooling the cross-attention output is replaced by the average of the (value-projected)
                 pixel features weighted by the query's previous sigmoid mask (detached).
    smca         Spatially Modulated Co-Attention (Gao et al., ICCV 2021) as the paper compares it:
                 plain cross-attention plus a learned log-Gaussian spatial prior per head whose
                 centre and scales are predicted from the queries (:class:`SMCAPrior`), not from
                 the previous mask, so it needs no intermediate mask prediction (the paper's
                 Table 4c gives SMCA the FLOPs of plain cross-attention, 213G, where masked
                 attention's intermediate predictions cost 226G).
    smca_mask    our earlier variant, kept as a switch: a fixed log-Gaussian prior centred on the
                 previous mask's centre of mass with its spatial std (detached, no parameters).
                 It uses the intermediate mask predictions, so it is NOT the paper's SMCA.
Feature schedules (``feature_schedule``; Table 4d): round robin over [1/32, 1/16, 1/8], one fixed
level, or all three levels concatenated in every layer.
Query features (``query_features``; Table 11b): ``learnable_supervised`` outputs the prediction
made from X_0 (10 predictions by default); ``learnable`` still makes it (it gives layer 1 its
attention mask, as in the official code) but does not output it; ``zero`` starts from X_0 = 0
and layer 1 attends without a mask (mask pooling: uniform pooling), ``num_layers`` predictions.

No host synchronisation happens in ``forward`` (no ``.item()``, ``.nonzero()``, no Python branch on
tensor values): empty masks are handled with tensor ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from m2f_kernels.cpu_gemm import Conv2d, Linear
from m2f_kernels.mask_product import mask_product
from m2f.config import CrossAttention, DecoderCfg, FeatureSchedule, LayerOrder, QueryFeatures
from m2f.models.outputs import Mask2FormerOutput, MaskPrediction
from m2f.models.position_encoding import PositionEmbeddingSine

NUM_LEVELS = 3  # the pixel decoder hands over [1/32, 1/16, 1/8]

# feature_schedule -> function(layer index) -> tuple of level indices attended
SCHEDULES: Dict[str, Callable[[int], Tuple[int, ...]]] = {
    "multi_scale": lambda i: (i % NUM_LEVELS,),
    "single_32": lambda i: (0,),
    "single_16": lambda i: (1,),
    "single_8": lambda i: (2,),
    "naive_multi_scale": lambda i: tuple(range(NUM_LEVELS)),
}


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention with an optional additive float bias.

    forward(q_in [B,Q,C], k_in [B,S,C], v_in [B,S,C], bias [B, 1 or nH, Q, S] or None)
        -> (out [B,Q,C], weights [B,Q,S] head-averaged or None)

    backend "reference": explicit softmax(q k^T / sqrt(d) + bias) v; "sdpa":
    torch.nn.functional.scaled_dot_product_attention with the bias as a float ``attn_mask`` (so
    fused backends that accept an additive bias can run it).  Weights are only returned by the
    reference path (``need_weights=True`` forces it; so does ``torch.jit.trace``: fvcore counts it).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, backend: str = "sdpa",
                 gemm_backend: str = "reference"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} not divisible by num_heads {num_heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; valid choices: {list(ATTENTION_BACKENDS)}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.dropout = dropout
        self.backend = backend
        self.q_proj = Linear(dim, dim, backend=gemm_backend)
        self.k_proj = Linear(dim, dim, backend=gemm_backend)
        self.v_proj = Linear(dim, dim, backend=gemm_backend)
        self.out_proj = Linear(dim, dim, backend=gemm_backend)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nH, N, Dh]

    def forward(self, q_in: Tensor, k_in: Tensor, v_in: Tensor, bias: Optional[Tensor] = None,
                need_weights: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        B, Q, C = q_in.shape
        q, k, v = self._heads(self.q_proj(q_in)), self._heads(self.k_proj(k_in)), self._heads(self.v_proj(v_in))
        p = self.dropout if self.training else 0.0
        weights = None
        if self.backend == "sdpa" and not need_weights and not torch.jit.is_tracing():  # tracers (fvcore) see the
            # explicit softmax path, which they count
            mask = None if bias is None else bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, nH, Q, Dh]
        else:
            logits = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)  # [B, nH, Q, S]
            if bias is not None:
                logits = logits + bias
            attn = logits.softmax(-1)
            if need_weights:
                weights = attn.mean(1)  # [B, Q, S]
            out = F.dropout(attn, p, self.training) @ v
        out = out.transpose(1, 2).reshape(B, Q, C)
        return self.out_proj(out), weights


def masked_attention_bias(mask_logits: Tensor, sizes: Sequence[Tuple[int, int]], threshold: float) -> Tensor:
    """Additive masked-attention bias from the previous prediction.

    mask_logits: [B, Q, h, w]; sizes: the attended levels' (H_l, W_l).
    Returns [B, 1, Q, sum_l H_l*W_l]: 0 where sigmoid(resized logits) >= threshold, -inf elsewhere;
    a query blocked at every key gets 0 everywhere (attends to all keys).  Detached.
    """
    with torch.no_grad():
        blocked = torch.cat([
            (F.interpolate(mask_logits, size=s, mode="bilinear", align_corners=False).sigmoid() < threshold).flatten(2)
            for s in sizes
        ], dim=-1)  # [B, Q, S] bool
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        bias = torch.zeros(blocked.shape, dtype=mask_logits.dtype, device=mask_logits.device)
        bias = bias.masked_fill(blocked, float("-inf"))
    return bias.unsqueeze(1)


def _resized_sigmoid(mask_logits: Tensor, sizes: Sequence[Tuple[int, int]]) -> Tensor:
    """sigmoid of the mask logits resized to each level, concatenated: [B, Q, S] (detached)."""
    with torch.no_grad():
        return torch.cat([
            F.interpolate(mask_logits, size=s, mode="bilinear", align_corners=False).sigmoid().flatten(2)
            for s in sizes
        ], dim=-1)


def smca_bias(mask_logits: Tensor, sizes: Sequence[Tuple[int, int]], eps: float = 1e-3) -> Tensor:
    """The ``smca_mask`` prior (not the paper's SMCA: :class:`SMCAPrior` is): log of a Gaussian
    centred on each query's previous mask (sigmoid-weighted centre of mass) with its
    sigmoid-weighted spatial std per axis.

    Coordinates are normalised to [0, 1] per level.  Returns [B, 1, Q, S] (detached, <= 0).
    """
    with torch.no_grad():
        parts = []
        for h, w in sizes:
            m = F.interpolate(mask_logits, size=(h, w), mode="bilinear", align_corners=False).sigmoid()  # [B,Q,h,w]
            ys = (torch.arange(h, device=m.device, dtype=m.dtype) + 0.5) / h
            xs = (torch.arange(w, device=m.device, dtype=m.dtype) + 0.5) / w
            total = m.sum((2, 3)) + eps  # [B, Q]
            my, mx = m.sum(3), m.sum(2)  # [B, Q, h], [B, Q, w]
            cy = (my * ys).sum(-1) / total
            cx = (mx * xs).sum(-1) / total
            vy = (my * (ys - cy[..., None]) ** 2).sum(-1) / total + eps
            vx = (mx * (xs - cx[..., None]) ** 2).sum(-1) / total + eps
            dy = (ys[None, None, :, None] - cy[..., None, None]) ** 2 / (2 * vy[..., None, None])  # [B,Q,h,1]
            dx = (xs[None, None, None, :] - cx[..., None, None]) ** 2 / (2 * vx[..., None, None])  # [B,Q,1,w]
            parts.append(-(dy + dx).flatten(2))
        return torch.cat(parts, dim=-1).unsqueeze(1)


class SMCAPrior(nn.Module):
    """Spatially Modulated Co-Attention's prior (Gao et al., ICCV 2021), on Mask2Former's levels.

    As in SMCA: in the first layer each query predicts a normalised centre (x, y) = sigmoid(MLP(.))
    shared by the heads; in every layer it predicts per-head offsets of that centre and per-head,
    per-axis scales s (a linear layer each, on LayerNorm(query + query_pos)); a key at (x_k, y_k)
    gets the additive attention bias ``-(s_x^2 (x_k - c_x)^2 + s_y^2 (y_k - c_y)^2) / beta`` (log
    of a Gaussian-like map; SMCA's ``smooth`` beta = 8; per-axis dynamic scales as in the SMCA
    paper (its release defaults to fixed scales of 1), initialised to 1).  Distances are measured
    in cells of the coarsest (1/32) level, SMCA's single feature map, whatever level a layer
    attends, so one prior geometry holds across the multi-scale schedule.
    Not detached: the centres, offsets and scales learn through the attention (Mask2Former has no
    box loss to supervise the centres).  Uses no mask prediction.

    forward(x [B,Q,C], query_pos [B,Q,C], layer i, sizes [(H_l, W_l)] attended, coarse (H, W) of
    the 1/32 level, centre [B,Q,2] from layer 0 or None) -> (bias [B, nH, Q, S], centre)
    """

    def __init__(self, dim: int, num_heads: int, num_layers: int, beta: float = 8.0,
                 gemm_backend: str = "reference"):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"SMCAPrior: beta={beta}, expected > 0")
        self.num_heads, self.beta = num_heads, float(beta)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.centre = MLP(dim, dim, 2, 3, gemm_backend=gemm_backend)
        self.offsets = nn.ModuleList(Linear(dim, 2 * num_heads, backend=gemm_backend) for _ in range(num_layers))
        self.scales = nn.ModuleList(Linear(dim, 2 * num_heads, backend=gemm_backend) for _ in range(num_layers))
        for lin in [*self.centre.layers, *self.offsets]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        for lin in self.scales:  # SMCA's dynamic scales start at 1 for every head and axis
            nn.init.zeros_(lin.weight)
            nn.init.ones_(lin.bias)

    def forward(self, x: Tensor, query_pos: Tensor, layer: int, sizes: Sequence[Tuple[int, int]],
                coarse: Tuple[int, int], centre: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        B, Q, _ = x.shape
        h = self.norms[layer](x + query_pos)
        if centre is None:
            centre = self.centre(h).sigmoid()  # [B, Q, 2] (x, y) in [0, 1]
        cells = x.new_tensor([float(coarse[1]), float(coarse[0])])  # (W, H) of the 1/32 level
        point = centre.unsqueeze(2) * cells + self.offsets[layer](h).view(B, Q, self.num_heads, 2)  # [B,Q,nH,2]
        scale = self.scales[layer](h).view(B, Q, self.num_heads, 2).square()
        parts = []
        for hl, wl in sizes:
            xs = (torch.arange(wl, device=x.device, dtype=x.dtype) + 0.5) * (cells[0] / wl)  # [w] in 1/32 cells
            ys = (torch.arange(hl, device=x.device, dtype=x.dtype) + 0.5) * (cells[1] / hl)
            dx = (xs - point[..., 0:1]).square() * scale[..., 0:1]  # [B, Q, nH, w]
            dy = (ys - point[..., 1:2]).square() * scale[..., 1:2]  # [B, Q, nH, h]
            parts.append((dy.unsqueeze(-1) + dx.unsqueeze(-2)).flatten(-2))  # [B, Q, nH, h*w]
        bias = torch.cat(parts, dim=-1).div(-self.beta)
        return bias.permute(0, 2, 1, 3), centre  # [B, nH, Q, S]


# ----------------------------------------------------------------------------------------------
# Cross-attention variants (paper Table 4c): how a layer uses the previous mask prediction
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossAttentionVariant:
    """``prior(prev_mask_logits [B,Q,h,w], level sizes, mask_threshold) -> (bias [B,1,Q,S] or None,
    pool weights [B,Q,S] or None)``; ``pools``: the attention is replaced by mask pooling (the layer
    averages value-projected features with the pool weights)."""

    name: str
    prior: Callable[[Tensor, Sequence[Tuple[int, int]], float], Tuple[Optional[Tensor], Optional[Tensor]]]
    pools: bool = False
    # the bias comes from the queries (the decoder's SMCAPrior), not from the previous mask
    query_prior: bool = False


CROSS_ATTENTION: Dict[str, CrossAttentionVariant] = {v.name: v for v in (
    CrossAttentionVariant("masked", lambda m, sizes, thr: (masked_attention_bias(m, sizes, thr), None)),
    CrossAttentionVariant("standard", lambda m, sizes, thr: (None, None)),
    CrossAttentionVariant("mask_pooling", lambda m, sizes, thr: (None, _resized_sigmoid(m, sizes)), pools=True),
    CrossAttentionVariant("smca", lambda m, sizes, thr: (None, None), query_prior=True),
    CrossAttentionVariant("smca_mask", lambda m, sizes, thr: (smca_bias(m, sizes), None)),
)}
if set(CROSS_ATTENTION) != set(get_args(CrossAttention)):  # pragma: no cover - caught by the tests at import
    raise AssertionError(f"CROSS_ATTENTION {sorted(CROSS_ATTENTION)} != config's {sorted(get_args(CrossAttention))}")
if set(SCHEDULES) != set(get_args(FeatureSchedule)):  # pragma: no cover
    raise AssertionError(f"SCHEDULES {sorted(SCHEDULES)} != config's {sorted(get_args(FeatureSchedule))}")
ATTENTION_BACKENDS = ("reference", "sdpa")


def _choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"decoder.{field}={value!r}; valid choices: {list(choices)}")


class MLP(nn.Module):
    """ReLU MLP; ``layers`` Linear layers (ReLU between them)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3,
                 gemm_backend: str = "reference"):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(Linear(a, b, backend=gemm_backend) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


# ----------------------------------------------------------------------------------------------
# Decoder layer
# ----------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """Cross-attention, self-attention and FFN blocks, each with residual + LayerNorm (post-norm;
    pre_norm normalises the block input instead).  ``layer_order`` picks which attention comes first.

    forward(x [B,Q,C], query_pos [B,Q,C], memory [B,S,C], memory_pos [B,S,C],
            cross_bias [B,1,Q,S] or None, pool_weights [B,Q,S] or None) -> (x, attention [B,Q,S] or None)

    ``mask_pooling``: the cross-attention block averages the value-projected memory with
    ``pool_weights`` instead of attending (:class:`CrossAttentionVariant` ``pools``).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0, pre_norm: bool = False,
                 layer_order: str = "ca_first", mask_pooling: bool = False, backend: str = "sdpa",
                 gemm_backend: str = "reference"):
        super().__init__()
        _choice("layer_order", layer_order, get_args(LayerOrder))
        self.cross_attn = Attention(dim, num_heads, dropout, backend, gemm_backend)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout, backend, gemm_backend)
        self.self_norm = nn.LayerNorm(dim)
        self.linear1 = Linear(dim, ffn_dim, backend=gemm_backend)
        self.linear2 = Linear(ffn_dim, dim, backend=gemm_backend)
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        self.layer_order = layer_order
        self.mask_pooling = mask_pooling

    def _residual(self, x: Tensor, norm: nn.Module, fn) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))

    def _cross(self, x: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, bias: Optional[Tensor],
               pool_weights: Optional[Tensor], need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        if self.mask_pooling:
            # Mask pooling: weighted average of value-projected pixel features.
            w = pool_weights / (pool_weights.sum(-1, keepdim=True) + 1e-6)  # [B, Q, S]
            out = self.cross_attn.out_proj(w @ self.cross_attn.v_proj(memory))
            return out, (w if need_weights else None)
        return self.cross_attn(x + query_pos, memory + memory_pos, memory, bias, need_weights)

    def forward(self, x: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                cross_bias: Optional[Tensor] = None, pool_weights: Optional[Tensor] = None,
                need_weights: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        attn: List[Optional[Tensor]] = [None]

        def cross(y: Tensor) -> Tensor:
            out, attn[0] = self._cross(y, query_pos, memory, memory_pos, cross_bias, pool_weights, need_weights)
            return out

        def self_attn(y: Tensor) -> Tensor:
            return self.self_attn(y + query_pos, y + query_pos, y)[0]

        def ffn(y: Tensor) -> Tensor:
            return self.linear2(self.dropout(F.relu(self.linear1(y))))

        if self.layer_order == "ca_first":
            x = self._residual(x, self.cross_norm, cross)
            x = self._residual(x, self.self_norm, self_attn)
        else:
            x = self._residual(x, self.self_norm, self_attn)
            x = self._residual(x, self.cross_norm, cross)
        x = self._residual(x, self.ffn_norm, ffn)
        return x, attn[0]


# ----------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------
class MaskedTransformerDecoder(nn.Module):
    """See the module docstring.

    forward(multi_scale: [1/32, 1/16, 1/8] maps [B, in_channels, H_l, W_l],
            mask_features [B, mask_dim, H/4, W/4], return_attention=False) -> Mask2FormerOutput
    """

    def __init__(self, in_channels: int, mask_dim: int, num_classes: int, hidden_dim: int = 256,
                 num_heads: int = 8, ffn_dim: int = 2048, num_queries: int = 100, num_layers: int = 9,
                 dropout: float = 0.0, pre_norm: bool = False, cross_attention: str = "masked",
                 feature_schedule: str = "multi_scale", layer_order: str = "ca_first",
                 query_features: str = "learnable_supervised", mask_threshold: float = 0.5,
                 enforce_input_projection: bool = False, attention_backend: str = "sdpa",
                 gemm_backend: str = "reference", smca_beta: float = 8.0):
        super().__init__()
        _choice("cross_attention", cross_attention, CROSS_ATTENTION)
        _choice("feature_schedule", feature_schedule, SCHEDULES)
        _choice("query_features", query_features, get_args(QueryFeatures))
        self.num_queries, self.num_layers, self.num_heads = num_queries, num_layers, num_heads
        self.cross_attention, self.feature_schedule = cross_attention, feature_schedule
        self.cross_variant = CROSS_ATTENTION[cross_attention]  # picked once: no string dispatch in forward
        self.schedule = SCHEDULES[feature_schedule]
        self.gemm_backend = gemm_backend  # the mask head product's GEMMs (m2f_kernels/mask_product.py)
        self.query_features, self.mask_threshold = query_features, mask_threshold
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(NUM_LEVELS):
            if in_channels != hidden_dim or enforce_input_projection:
                conv = Conv2d(in_channels, hidden_dim, kernel_size=1, backend=gemm_backend)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.query_pos = nn.Embedding(num_queries, hidden_dim)  # learnable positional embedding P
        self.query_feat = nn.Embedding(num_queries, hidden_dim) if query_features != "zero" else None
        self.layers = nn.ModuleList([
            DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, pre_norm, layer_order, self.cross_variant.pools,
                         attention_backend, gemm_backend)
            for _ in range(num_layers)
        ])
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = Linear(hidden_dim, num_classes + 1, backend=gemm_backend)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3, gemm_backend=gemm_backend)
        self._reset_parameters()
        # Built last, after every shared part has drawn its initialisation: the smca row starts from
        # the same weights as its base row (paired seeds).
        self.smca = (SMCAPrior(hidden_dim, num_heads, num_layers, smca_beta, gemm_backend)
                     if self.cross_variant.query_prior else None)

    def _reset_parameters(self) -> None:
        # As the official layers: xavier-uniform matrices; q/k/v drawn with the bound of one packed
        # [3C, C] in-projection (nn.MultiheadAttention's layout); attention biases zero.
        for layer in self.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for attn in (layer.cross_attn, layer.self_attn):
                bound = (6.0 / (attn.dim + 3 * attn.dim)) ** 0.5
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                    nn.init.uniform_(lin.weight, -bound, bound)
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                    nn.init.zeros_(lin.bias)

    def attended_sizes(self, multi_scale: Sequence[Tensor]) -> List[List[Tuple[int, int]]]:
        """Per decoder layer, the (H_l, W_l) of the levels it attends (order of the keys)."""
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in multi_scale]
        return [[sizes[lvl] for lvl in self.schedule(i)] for i in range(self.num_layers)]

    def predict(self, x: Tensor, mask_features: Tensor) -> MaskPrediction:
        """x [B,Q,C] -> class [B,Q,K+1], masks [B,Q,H/4,W/4] (decoder_norm applied first)."""
        y = self.decoder_norm(x)
        mask_logits = mask_product(self.mask_embed(y), mask_features, self.gemm_backend)
        return MaskPrediction(self.class_embed(y), mask_logits)

    def _cross_inputs(self, prev_masks: Optional[Tensor], sizes: Sequence[Tuple[int, int]]):
        """(bias [B,1,Q,S] or None, pool weights [B,Q,S] or None) for the attended levels."""
        if prev_masks is None:
            if self.cross_variant.pools:
                raise RuntimeError("mask_pooling needs a previous mask prediction")
            return None, None
        return self.cross_variant.prior(prev_masks, sizes, self.mask_threshold)

    def forward(self, multi_scale: Sequence[Tensor], mask_features: Tensor,
                return_attention: bool = False) -> Mask2FormerOutput:
        if len(multi_scale) != NUM_LEVELS:
            raise ValueError(f"transformer decoder expects {NUM_LEVELS} feature levels, got {len(multi_scale)}")
        B = mask_features.shape[0]
        memories, memory_pos, sizes = [], [], []
        for lvl, feat in enumerate(multi_scale):
            sizes.append((int(feat.shape[-2]), int(feat.shape[-1])))
            memory_pos.append(self.pe_layer(feat).flatten(2).transpose(1, 2))  # [B, HW, C]
            mem = self.input_proj[lvl](feat).flatten(2) + self.level_embed.weight[lvl][None, :, None]
            memories.append(mem.transpose(1, 2))  # [B, HW, C]

        query_pos = self.query_pos.weight.unsqueeze(0).expand(B, -1, -1)  # [B, Q, C]
        if self.query_feat is not None:
            x = self.query_feat.weight.unsqueeze(0).expand(B, -1, -1)
        else:
            x = torch.zeros_like(query_pos)

        predictions: List[MaskPrediction] = []
        attention_maps: Optional[List[Tensor]] = [] if return_attention else None
        prev_masks: Optional[Tensor] = None
        if self.query_features != "zero":
            # The prediction from X_0 drives layer 1's attention mask (supervised only if asked).
            pred = self.predict(x, mask_features)
            prev_masks = pred.mask_logits
            if self.query_features == "learnable_supervised":
                predictions.append(pred)
        if prev_masks is None and self.cross_variant.pools:
            # Nothing to pool with yet: the first layer pools uniformly over all pixels.
            prev_masks = torch.zeros(B, x.shape[1], *mask_features.shape[-2:], dtype=x.dtype, device=x.device)

        keys = {}  # attended levels -> (memory [B, S, C], pos [B, S, C]); concatenated once
        centre: Optional[Tensor] = None  # smca: the queries' centres from layer 0
        for i, layer in enumerate(self.layers):
            levels = self.schedule(i)
            lvl_sizes = [sizes[lvl] for lvl in levels]
            if levels not in keys:
                keys[levels] = (torch.cat([memories[lvl] for lvl in levels], 1),
                                torch.cat([memory_pos[lvl] for lvl in levels], 1))
            memory, pos = keys[levels]
            if self.smca is not None:
                bias, centre = self.smca(x, query_pos, i, lvl_sizes, sizes[0], centre if i else None)
                pool = None
            else:
                bias, pool = self._cross_inputs(prev_masks, lvl_sizes)
            x, attn = layer(x, query_pos, memory, pos, bias, pool, need_weights=return_attention)
            if attention_maps is not None:
                attention_maps.append(attn)
            pred = self.predict(x, mask_features)
            prev_masks = pred.mask_logits
            predictions.append(pred)

        final = predictions[-1]
        return Mask2FormerOutput(class_logits=final.class_logits, mask_logits=final.mask_logits,
                                 aux=predictions[:-1], attention_maps=attention_maps)


def foreground_attention(attention_maps: Sequence[Tensor], fg_masks: Tensor,
                         layer_sizes: Sequence[Sequence[Tuple[int, int]]]) -> Tensor:
    """Mean cross-attention weight that falls on the foreground (paper App. C.2: 0.20 with
    standard cross-attention, 0.59 with masked attention).

    attention_maps: per layer [B, Q, S] (``Mask2FormerOutput.attention_maps``);
    fg_masks: [B, Q, H, W] bool/float, each query's foreground (e.g. its matched ground-truth mask
    or its final predicted mask); layer_sizes: per layer the attended levels' (H_l, W_l)
    (``MaskedTransformerDecoder.attended_sizes``).  Returns per-layer means [num_layers].
    """
    fg = fg_masks.float()
    means = []
    for attn, sizes in zip(attention_maps, layer_sizes):
        inside = torch.cat([
            (F.interpolate(fg, size=s, mode="bilinear", align_corners=False) >= 0.5).flatten(2) for s in sizes
        ], dim=-1)  # [B, Q, S]
        means.append((attn * inside).sum(-1).mean())
    return torch.stack(means)


def build_transformer_decoder(cfg: DecoderCfg, in_channels: int, mask_dim: int, num_classes: int,
                              gemm_backend: str = "reference") -> nn.Module:
    """DecoderCfg -> :class:`MaskedTransformerDecoder` (``gemm_backend``: the config's root field)."""
    return MaskedTransformerDecoder(
        in_channels=in_channels, mask_dim=mask_dim, num_classes=num_classes, hidden_dim=cfg.hidden_dim,
        num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim, num_queries=cfg.num_queries, num_layers=cfg.num_layers,
        dropout=cfg.dropout, pre_norm=cfg.pre_norm, cross_attention=cfg.cross_attention,
        feature_schedule=cfg.feature_schedule, layer_order=cfg.layer_order, query_features=cfg.query_features,
        mask_threshold=cfg.mask_threshold, enforce_input_projection=cfg.enforce_input_projection,
        attention_backend=cfg.attention_backend, gemm_backend=gemm_backend,
    )
