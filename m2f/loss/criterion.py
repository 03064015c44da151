"""Mask2Former's set criterion.

For every supervised prediction (the final one and, with deep supervision, each auxiliary one;
matching is done per prediction):

- classification: cross-entropy over ALL queries; matched queries -> their target's class,
  unmatched ones -> "no object" (index K), class weights ``empty_weight`` = 1 except
  ``no_object_weight`` for index K (weighted mean, as ``F.cross_entropy(weight=...)``);
- masks of the matched pairs: sigmoid BCE and dice (+1 smoothing), either on ``num_points``
  importance-sampled points per mask (``loss_mode="point"``, PointRend: oversample
  ``oversample_ratio`` x, keep the ``importance_sample_ratio`` most uncertain (-|logit|), fill up
  with uniform points; targets sampled bilinearly at the same normalised points) or on full masks
  (``loss_mode="mask"``: predictions upsampled bilinearly to the target (padded image) size);
- the mask losses are summed over masks and divided by the number of target masks in the batch
  (all-reduced and divided by the world size under torch.distributed; at least 1).

Weights: ``weight_dict`` = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice":
dice_weight}; the key of auxiliary prediction i has the suffix ``_{i}`` and the same weight.
``forward`` returns the losses ALREADY multiplied by their weight (``total = sum(losses.values())``);
``forward(..., weighted=False)`` returns the raw components (for logging).

Images without objects: only the classification term is non-zero; the mask terms are
``0 * mask_logits.sum()`` so every parameter still receives a (zero) gradient (DDP needs that).

Randomness (point sampling in matcher and loss) comes from ``generator`` when given, else from the
global torch RNG; the trainer seeds the global RNG per iteration, so a resumed run is identical.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from m2f.errors import InputError
from m2f.loss.matcher import HungarianMatcher, Indices, check_targets
from m2f.loss.point_sampling import (calculate_uncertainty, point_sample, point_sample_masks, point_sample_rows,
                                     uncertainty_point_coords)

LOSS_MODES = ("point", "mask")


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, num_masks: Tensor) -> Tensor:
    """logits/targets [M, P] -> (sum over masks of the mean BCE over points) / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: Tensor, targets: Tensor, num_masks: Tensor) -> Tensor:
    """logits/targets [M, P] -> (sum over masks of 1 - dice, +1 smoothing) / num_masks."""
    p = logits.sigmoid()
    num = 2 * (p * targets).sum(-1)  # [M]
    den = p.sum(-1) + targets.sum(-1)  # [M]
    return (1 - (num + 1) / (den + 1)).sum() / num_masks


def matched_index(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-image (pred_idx, tgt_idx) -> flat (batch_idx [M], query_idx [M]) on ``device``."""
    b = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    q = torch.cat([src for src, _ in indices])
    return b.to(device, non_blocking=True), q.to(device, non_blocking=True)


class SetCriterion(nn.Module):
    """See the module docstring.  ``matcher`` is a :class:`HungarianMatcher` or any callable
    ``(class_logits, mask_logits, targets, generator=None) -> [(pred_idx, tgt_idx)] per image``."""

    def __init__(self, num_classes: int, matcher: Callable, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 loss_mode: str = "point", deep_supervision: bool = True):
        super().__init__()
        if loss_mode not in LOSS_MODES:
            raise InputError(f"loss.loss: {loss_mode!r} is not a loss mode; valid choices: {list(LOSS_MODES)}")
        if loss_mode == "point" and num_points < 1:
            raise InputError(f"loss.num_points: expected >= 1, got {num_points}")
        if oversample_ratio < 1:
            raise InputError(f"loss.oversample_ratio: expected >= 1, got {oversample_ratio}")
        if not 0 <= importance_sample_ratio <= 1:
            raise InputError(f"loss.importance_sample_ratio: expected in [0, 1], got {importance_sample_ratio}")
        if num_classes < 1:
            raise InputError(f"num_classes: expected >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.loss_mode, self.deep_supervision = loss_mode, deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)  # [K+1]

    @property
    def weight_dict(self) -> dict[str, float]:
        """Weight of each base key; ``key_{i}`` (auxiliary prediction i) has the weight of ``key``."""
        return {"loss_ce": self.class_weight, "loss_mask": self.mask_weight, "loss_dice": self.dice_weight}

    def weight(self, key: str) -> float:
        """Weight of any returned key (``loss_dice_3`` -> ``dice_weight``)."""
        base = key.rsplit("_", 1)[0] if key.rsplit("_", 1)[-1].isdigit() else key
        return self.weight_dict[base]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, weights={self.weight_dict}, "
                f"no_object_weight={float(self.empty_weight[-1])}, loss_mode={self.loss_mode!r}, "
                f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
                f"importance_sample_ratio={self.importance_sample_ratio}, deep_supervision={self.deep_supervision}")

    # ------------------------------------------------------------------------------------------
    def loss_labels(self, class_logits: Tensor, indices: Indices, targets) -> Tensor:
        """class_logits [B, Q, K+1] -> weighted-mean CE (float32, unweighted by class_weight)."""
        B, Q, _ = class_logits.shape
        dev = class_logits.device
        target_classes = torch.full((B, Q), self.num_classes, dtype=torch.int64, device=dev)  # [B, Q]
        b_idx, q_idx = matched_index(indices, dev)
        if b_idx.numel():  # numel of a shape: no device sync
            tgt = torch.cat([t["labels"].to(dev)[j.to(dev)] for t, (_, j) in zip(targets, indices)])  # [M]
            target_classes[b_idx, q_idx] = tgt
        # cross_entropy wants [B, C, Q]
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, self.empty_weight.to(dev))

    def loss_masks(self, mask_logits: Tensor, indices: Indices, targets, num_masks: Tensor,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """mask_logits [B, Q, h, w] -> (BCE, dice), each summed over matched masks / num_masks."""
        dev = mask_logits.device
        b_idx, q_idx = matched_index(indices, dev)
        if b_idx.numel() == 0:
            zero = mask_logits.sum() * 0.0  # keeps the graph connected (DDP) with a zero gradient
            return zero, zero
        src = mask_logits[b_idx, q_idx].float()  # [M, h, w]
        tgt = torch.cat([t["masks"].to(dev)[j.to(dev)] for t, (_, j) in zip(targets, indices)])  # [M, H, W]
        if self.loss_mode == "point":
            with torch.no_grad(), record_function("m2f.point_sampling"):
                coords = uncertainty_point_coords(src[:, None], calculate_uncertainty, self.num_points,
                                                  self.oversample_ratio, self.importance_sample_ratio,
                                                  generator)  # [M, P, 2]
                labels = point_sample_masks(tgt, coords)  # [M, P] float32, no float copy of the masks
            logits = point_sample(src[:, None], coords)[:, 0]  # [M, P]
        else:
            logits = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)
            logits, labels = logits.flatten(1), tgt.flatten(1).float()  # [M, H*W]
        return sigmoid_bce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    def point_mask_losses(self, mask_logits: Sequence[Tensor], all_indices: Sequence[Indices], targets,
                          num_masks: Tensor, generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
        """:meth:`loss_masks` (point mode) of several predictions at once: per prediction (BCE, dice),
        equal to calling it prediction by prediction with the same random points (the draws are made
        in one call in that order: per prediction, the oversampled points, then the uniform ones).
        One point sample, one top-k and one target gather for all predictions.

        mask_logits: per prediction [B, Q, h, w] (same shape); all_indices: per prediction, per image
        (pred_idx, tgt_idx)."""
        n = len(mask_logits)
        dev = mask_logits[0].device
        picked, rows = [], []
        offsets = [0]
        for t in targets:
            offsets.append(offsets[-1] + t["labels"].shape[0])
        for msk, indices in zip(mask_logits, all_indices):
            b_idx, q_idx = matched_index(indices, dev)
            picked.append(msk[b_idx, q_idx])  # [M, h, w]
            rows.append(torch.cat([j.to(dev) + offsets[b] for b, (_, j) in enumerate(indices)]))  # [M]
        M = picked[0].shape[0]
        if M == 0 or any(p.shape[0] != M for p in picked):
            return [self.loss_masks(m, idx, targets, num_masks, generator) for m, idx in zip(mask_logits, all_indices)]
        src = torch.cat(picked).float()  # [n * M, h, w]
        with torch.no_grad():
            masks = torch.cat([t["masks"].to(dev) for t in targets])  # [sum N, H, W]
            with record_function("m2f.point_sampling"):
                coords = uncertainty_point_coords(src[:, None], calculate_uncertainty, self.num_points,
                                                  self.oversample_ratio, self.importance_sample_ratio, generator,
                                                  groups=n)  # [n * M, P, 2]
            # each prediction's matched targets at its points, without stacking the [n * M, H, W] masks
            labels = point_sample_rows(masks, torch.cat(rows), coords)  # [n * M, P]
        logits = point_sample(src[:, None], coords)[:, 0]  # [n * M, P]
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).view(n, M).sum(1)
        p = logits.sigmoid()
        dice = (1 - (2 * (p * labels).sum(-1) + 1) / (p.sum(-1) + labels.sum(-1) + 1)).view(n, M).sum(1)
        return [(bce[i] / num_masks, dice[i] / num_masks) for i in range(n)]

    def num_masks(self, targets, device: torch.device) -> Tensor:
        """Number of target masks in the batch, averaged over processes (all-reduce), at least 1."""
        n = torch.as_tensor(float(sum(t["labels"].shape[0] for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1.0)

    def predictions(self, output) -> list[tuple[str, Tensor, Tensor]]:
        """(key suffix, class_logits, mask_logits) of every supervised prediction, final first."""
        preds = [("", output.class_logits, output.mask_logits)]
        if self.deep_supervision:
            preds += [(f"_{i}", p.class_logits, p.mask_logits) for i, p in enumerate(output.aux)]
        return preds

    def match(self, preds: Sequence[tuple[Tensor, Tensor]], targets,
              generator: torch.Generator | None = None) -> list[Indices]:
        """Matching of each prediction; one host sync for all when the matcher supports it."""
        if hasattr(self.matcher, "match_many"):
            return self.matcher.match_many(preds, targets, generator=generator)
        return [self.matcher(c, m, targets, generator=generator) for c, m in preds]

    def forward(self, output, targets: Sequence[dict[str, Tensor]], generator: torch.Generator | None = None,
                weighted: bool = True) -> dict[str, Tensor]:
        """output: m2f.models.outputs.Mask2FormerOutput; targets[b] = {"labels": int64 [N],
        "masks": bool [N, H, W]} (N = 0 allowed).  Returns {"loss_ce", "loss_mask", "loss_dice",
        and "..._{i}" for output.aux[i]}: 0-d float32 tensors, multiplied by their weight unless
        ``weighted=False``."""
        check_targets(targets, output.class_logits.shape[0])
        if output.class_logits.shape[-1] != self.num_classes + 1:
            raise InputError(f"class_logits: expected {self.num_classes + 1} = num_classes + 1 logits per query, "
                             f"got {output.class_logits.shape[-1]}")
        device = output.class_logits.device
        num_masks = self.num_masks(targets, device)
        preds = self.predictions(output)
        with record_function("m2f.matcher"):  # a label for torch.profiler (python -m m2f.bench profile)
            all_indices = self.match([(c, m) for _, c, m in preds], targets, generator)
        w = self.weight_dict if weighted else {k: 1.0 for k in self.weight_dict}
        losses: dict[str, Tensor] = {}
        if self.loss_mode == "point" and len({tuple(m.shape) for _, _, m in preds}) == 1:
            mask_terms = self.point_mask_losses([m for _, _, m in preds], all_indices, targets, num_masks, generator)
        else:
            mask_terms = [self.loss_masks(msk, indices, targets, num_masks, generator)
                          for (_, _, msk), indices in zip(preds, all_indices)]
        for (suffix, cls, msk), indices, (bce, dice) in zip(preds, all_indices, mask_terms):
            ce = self.loss_labels(cls, indices, targets)
            for k, v in (("loss_ce", ce), ("loss_mask", bce), ("loss_dice", dice)):
                losses[k + suffix] = v * w[k]
        return losses


def build_matcher(cfg) -> HungarianMatcher:
    """cfg: m2f.config.LossCfg -> HungarianMatcher(cost_class, cost_mask, cost_dice, num_points, matching)."""
    return HungarianMatcher(cfg.cost_class, cfg.cost_mask, cfg.cost_dice, cfg.num_points, cfg.matching)


def build_criterion(cfg, num_classes: int) -> SetCriterion:
    """cfg: m2f.config.LossCfg -> SetCriterion (weights, point sampling, loss mode, deep supervision)."""
    return SetCriterion(num_classes, build_matcher(cfg), cfg.class_weight, cfg.mask_weight, cfg.dice_weight,
                        cfg.no_object_weight, cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio,
                        cfg.loss, cfg.deep_supervision)
