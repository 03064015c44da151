"""Hungarian matching of predictions to ground-truth masks (scipy's linear_sum_assignment).

Cost = cost_class * (-p(target class)) + cost_mask * BCE + cost_dice * dice, all pairwise
[Q, N].  ``mode="point"`` (paper default) computes mask costs on the same K uniform random points
for every prediction and target of an image; ``mode="mask"`` on full masks (predictions upsampled
bilinearly to the target mask resolution).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from m2f.loss.point_sampling import point_sample


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """inputs [Q, P] logits, targets [N, P] in {0, 1} -> [Q, N] dice loss (+1 smoothing)."""
    p = inputs.sigmoid()
    num = 2 * p @ targets.T
    den = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def batch_bce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """inputs [Q, P] logits, targets [N, P] -> [Q, N] mean BCE, via two matrix products:
    BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x)."""
    P = inputs.shape[1]
    pos = F.softplus(-inputs)
    neg = F.softplus(inputs)
    return (pos @ targets.T + neg @ (1 - targets).T) / P


def pairwise_cost(class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor, cost_class: float,
                  cost_mask: float, cost_dice: float, num_points: int, mode: str,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """One image's cost matrix [Q, N] (float32).  class_logits [Q, K+1], mask_logits [Q, h, w],
    labels [N], masks [N, H, W] (bool/float)."""
    prob = class_logits.float().softmax(-1)  # [Q, K+1]
    c_class = -prob[:, labels]  # [Q, N]
    out_m = mask_logits.float()
    tgt_m = masks.to(out_m.dtype)
    if mode == "point":
        coords = torch.rand(1, num_points, 2, device=out_m.device, generator=generator)
        tgt = point_sample(tgt_m[:, None], coords.expand(tgt_m.shape[0], -1, -1))[:, 0]  # [N, P]
        out = point_sample(out_m[:, None], coords.expand(out_m.shape[0], -1, -1))[:, 0]  # [Q, P]
    elif mode == "mask":
        out = F.interpolate(out_m[:, None], size=tgt_m.shape[-2:], mode="bilinear", align_corners=False)
        out, tgt = out.flatten(1), tgt_m.flatten(1)
    else:
        raise ValueError(f"matching mode {mode!r}; valid choices: ['point', 'mask']")
    return cost_class * c_class + cost_mask * batch_bce_cost(out, tgt) + cost_dice * batch_dice_cost(out, tgt)


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544, mode: str = "point"):
        super().__init__()
        if mode not in ("point", "mask"):
            raise ValueError(f"matching mode {mode!r}; valid choices: ['point', 'mask']")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points, self.mode = num_points, mode

    @torch.no_grad()
    def forward(self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[Dict[str, Tensor]],
                generator: Optional[torch.Generator] = None) -> List[Tuple[Tensor, Tensor]]:
        """class_logits [B, Q, K+1], mask_logits [B, Q, h, w]; targets[b] = {labels [N], masks [N, H, W]}.
        Returns per image (pred_idx, tgt_idx), int64 on CPU, sorted by pred_idx."""
        out = []
        costs = []
        for b, t in enumerate(targets):
            if t["labels"].numel() == 0:
                costs.append(None)
                continue
            with torch.autocast(device_type=mask_logits.device.type, enabled=False):
                c = pairwise_cost(class_logits[b], mask_logits[b], t["labels"], t["masks"], self.cost_class,
                                  self.cost_mask, self.cost_dice, self.num_points, self.mode, generator)
            costs.append(c)
        # One device->host copy for the whole batch.
        host = [c.cpu() if c is not None else None for c in costs]
        for c in host:
            if c is None:
                e = torch.empty(0, dtype=torch.int64)
                out.append((e, e.clone()))
                continue
            c = torch.nan_to_num(c, nan=1e6, posinf=1e6, neginf=-1e6)
            r, col = linear_sum_assignment(c.numpy())
            out.append((torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)))
        return out
