"""Mask2Former's set criterion: Hungarian matching per prediction, then

- classification: cross-entropy over all queries (unmatched -> "no object", weighted
  ``no_object_weight``), times ``class_weight``;
- masks of matched pairs: sigmoid BCE (``mask_weight``) + dice (``dice_weight``), either on K
  importance-sampled points (``loss_mode="point"``, PointRend: oversample 3x, 75% most uncertain) or
  on full masks (``loss_mode="mask"``: predictions upsampled bilinearly to the target resolution);
- normalised by the number of target masks in the batch (summed over processes under DDP, >= 1);
- deep supervision: the same losses for every auxiliary prediction (keys suffixed ``_{i}``).

The returned losses are already weighted: ``total = sum(losses.values())``.  Randomness (point
sampling) comes from the global torch RNG unless a ``generator`` is given; the trainer seeds the
global RNG per iteration, which makes a resumed run identical.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.loss.matcher import HungarianMatcher
from m2f.loss.point_sampling import calculate_uncertainty, point_sample, uncertainty_point_coords


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, num_masks: Tensor) -> Tensor:
    """logits/targets [M, P] -> sum over masks of the mean BCE over points, / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: Tensor, targets: Tensor, num_masks: Tensor) -> Tensor:
    """logits/targets [M, P] -> sum over masks of (1 - dice) with +1 smoothing, / num_masks."""
    p = logits.sigmoid()
    num = 2 * (p * targets).sum(-1)
    den = p.sum(-1) + targets.sum(-1)
    return (1 - (num + 1) / (den + 1)).sum() / num_masks


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 loss_mode: str = "point", deep_supervision: bool = True):
        super().__init__()
        if loss_mode not in ("point", "mask"):
            raise ValueError(f"loss mode {loss_mode!r}; valid choices: ['point', 'mask']")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.loss_mode, self.deep_supervision = loss_mode, deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # ------------------------------------------------------------------------------------------
    def loss_labels(self, class_logits: Tensor, indices, targets) -> Tensor:
        B, Q, _ = class_logits.shape
        target_classes = torch.full((B, Q), self.num_classes, dtype=torch.int64, device=class_logits.device)
        b_idx, q_idx = self._pred_index(indices, class_logits.device)
        if b_idx.numel():
            tgt = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
            target_classes[b_idx, q_idx] = tgt.to(class_logits.device)
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, self.empty_weight)

    def loss_masks(self, mask_logits: Tensor, indices, targets, num_masks: Tensor,
                   generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        b_idx, q_idx = self._pred_index(indices, mask_logits.device)
        if b_idx.numel() == 0:
            zero = mask_logits.sum() * 0.0  # keeps the graph connected (DDP) with a zero gradient
            return zero, zero
        src = mask_logits[b_idx, q_idx].float()  # [M, h, w]
        tgt = torch.cat([t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)])
        tgt = tgt.to(device=src.device, dtype=src.dtype)  # [M, H, W]
        if self.loss_mode == "point":
            with torch.no_grad():
                coords = uncertainty_point_coords(src[:, None], calculate_uncertainty, self.num_points,
                                                  self.oversample_ratio, self.importance_sample_ratio, generator)
                labels = point_sample(tgt[:, None], coords)[:, 0]  # [M, P]
            logits = point_sample(src[:, None], coords)[:, 0]  # [M, P]
        else:
            logits = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)
            logits, labels = logits.flatten(1), tgt.flatten(1)
        return sigmoid_bce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    @staticmethod
    def _pred_index(indices, device) -> Tuple[Tensor, Tensor]:
        b = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        q = torch.cat([src for src, _ in indices]).to(device)
        return b, q

    def num_masks(self, targets, device) -> Tensor:
        n = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1.0)

    # ------------------------------------------------------------------------------------------
    def unweighted(self, class_logits: Tensor, mask_logits: Tensor, targets, num_masks: Tensor,
                   generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        indices = self.matcher(class_logits, mask_logits, targets, generator=generator)
        ce = self.loss_labels(class_logits, indices, targets)
        bce, dice = self.loss_masks(mask_logits, indices, targets, num_masks, generator)
        return {"loss_ce": ce, "loss_mask": bce, "loss_dice": dice}

    def forward(self, output, targets: Sequence[Dict[str, Tensor]],
                generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """output: Mask2FormerOutput; targets: per image {labels [N], masks [N, H, W]}."""
        device = output.class_logits.device
        num_masks = self.num_masks(targets, device)
        w = {"loss_ce": self.class_weight, "loss_mask": self.mask_weight, "loss_dice": self.dice_weight}
        losses: Dict[str, Tensor] = {}
        preds: List = [(None, output.class_logits, output.mask_logits)]
        if self.deep_supervision:
            preds += [(i, p.class_logits, p.mask_logits) for i, p in enumerate(output.aux)]
        for i, cls, msk in preds:
            for k, v in self.unweighted(cls, msk, targets, num_masks, generator).items():
                losses[k if i is None else f"{k}_{i}"] = v * w[k]
        return losses


def build_matcher(cfg) -> HungarianMatcher:
    """cfg: m2f.config.LossCfg."""
    return HungarianMatcher(cfg.cost_class, cfg.cost_mask, cfg.cost_dice, cfg.num_points, cfg.matching)


def build_criterion(cfg, num_classes: int) -> SetCriterion:
    """cfg: m2f.config.LossCfg."""
    return SetCriterion(num_classes, build_matcher(cfg), cfg.class_weight, cfg.mask_weight, cfg.dice_weight,
                        cfg.no_object_weight, cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio,
                        cfg.loss, cfg.deep_supervision)
