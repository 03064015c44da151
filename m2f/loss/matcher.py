"""Hungarian matching of predictions to ground-truth masks (scipy's ``linear_sum_assignment``).

Per image, the pairwise cost matrix ``C [Q, N]`` (Q predictions, N targets) is

    C = cost_class * (-p(target class)) + cost_mask * BCE + cost_dice * dice

with ``p`` the softmax over the K + 1 classes, BCE the mean sigmoid binary cross-entropy over the
compared pixels/points and dice ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)``.

- ``mode="point"`` (paper default): the mask costs are computed on the SAME ``num_points`` uniform
  random points for every prediction and target of an image.  Predictions (1/4 resolution) and
  targets (padded image resolution) are both sampled with the same normalised coordinates.
- ``mode="mask"``: full masks; the predictions are upsampled bilinearly to the target mask size,
  as the full-mask loss does (MaskFormer's criterion), so the cost is computed at the padded image
  resolution.  Not the only reading: MaskFormer's matcher instead downsamples the targets to the
  prediction size (nearest), Mask2Former's released code has point matching only, and the paper does
  not say which its "mask" matching (Table 5) used.

Costs are computed in float32 with autocast disabled, under ``torch.no_grad``; all cost matrices of
a call are copied to the host in ONE transfer, then solved on the CPU.  The result per image is
``(pred_idx, tgt_idx)``, int64 CPU tensors sorted by ``pred_idx`` (empty for an image without
targets).

Pure functions for benchmarks: :func:`pairwise_cost` (one image's cost matrix) and
:func:`hungarian_match` (costs + assignment for a batch).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from m2f.errors import InputError
from m2f.loss.point_sampling import point_sample, point_sample_masks, uniform_coords

Indices = list[tuple[Tensor, Tensor]]
MODES = ("point", "mask")


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """inputs [..., Q, P] logits, targets [..., N, P] in [0, 1] -> [..., Q, N] dice loss (+1 smoothing)."""
    p = inputs.sigmoid()
    num = 2 * p @ targets.transpose(-1, -2)  # [..., Q, N]
    den = p.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]  # [..., Q, N]
    return 1 - (num + 1) / (den + 1)


def batch_bce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """inputs [..., Q, P] logits, targets [..., N, P] in [0, 1] -> [..., Q, N] mean BCE over the P
    points, with ONE matrix product instead of a [Q, N, P] tensor:
    BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x) = softplus(x) - t * x."""
    P = inputs.shape[-1]
    return (F.softplus(inputs).sum(-1)[..., :, None] - inputs @ targets.transpose(-1, -2)) / P  # [..., Q, N]


def pairwise_cost(class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor, cost_class: float,
                  cost_mask: float, cost_dice: float, num_points: int, mode: str,
                  generator: torch.Generator | None = None) -> Tensor:
    """One image's cost matrix [Q, N] in float32 (autocast disabled).

    class_logits [Q, K+1], mask_logits [Q, h, w], labels [N] int64 in [0, K), masks [N, H, W]
    (bool/float; any device: moved to ``mask_logits``'s).  ``mode``: "point" | "mask" (module doc).
    Out-of-range labels are clamped here (validated by :func:`hungarian_match`).
    """
    if mode not in MODES:
        raise ValueError(f"matching mode {mode!r}; valid choices: {list(MODES)}")
    dev = mask_logits.device
    with torch.autocast(device_type=dev.type, enabled=False):
        prob = class_logits.float().softmax(-1)  # [Q, K+1]
        labels = labels.to(prob.device).clamp(0, prob.shape[-1] - 1)
        c_class = -prob[:, labels]  # [Q, N]
        out_m = mask_logits.float()  # [Q, h, w]
        masks = masks.to(dev)  # [N, H, W]
        if mode == "point":
            coords = uniform_coords((1, num_points, 2), dev, generator)  # shared by all masks of the image
            tgt = point_sample_masks(masks, coords)  # [N, P], no float copy of the full masks
            out = point_sample(out_m[None], coords)[0]  # [1, Q, h, w] -> [Q, P] (masks as channels)
        else:
            out = F.interpolate(out_m[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)
            out, tgt = out.flatten(1), masks.flatten(1).float()  # [Q, H*W], [N, H*W]
        cost = cost_mask * batch_bce_cost(out, tgt) + cost_dice * batch_dice_cost(out, tgt)
        return cost_class * c_class.to(cost.device) + cost  # [Q, N]


def check_targets(targets: Sequence[dict[str, Tensor]], batch_size: int, name: str = "targets") -> None:
    """Shape checks (no device sync): one dict per image with labels [N] and masks [N, H, W]."""
    if len(targets) != batch_size:
        raise InputError(f"{name}: expected one target dict per image ({batch_size}), got {len(targets)}")
    for b, t in enumerate(targets):
        if not isinstance(t, dict) or "labels" not in t or "masks" not in t:
            raise InputError(f"{name}[{b}]: expected a dict with 'labels' [N] and 'masks' [N, H, W]")
        lab, m = t["labels"], t["masks"]
        if lab.ndim != 1 or lab.dtype.is_floating_point or lab.dtype == torch.bool:
            raise InputError(f"{name}[{b}]['labels']: expected an integer tensor [N], got {lab.dtype} {tuple(lab.shape)}")
        if m.ndim != 3 or m.shape[0] != lab.shape[0]:
            raise InputError(f"{name}[{b}]['masks']: expected [N={lab.shape[0]}, H, W], got {tuple(m.shape)}")


def linear_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """cost [Q, N] (CPU) -> (rows, cols) int64 of the minimum-cost assignment, sorted by row.
    Non-finite costs (e.g. from NaN logits) are replaced by large finite ones so scipy never fails."""
    c = torch.nan_to_num(cost.double(), nan=1e8, posinf=1e8, neginf=-1e8).numpy()
    r, col = linear_sum_assignment(c)
    return torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)


def point_costs_batched(predictions: Sequence[tuple[Tensor, Tensor]], targets: Sequence[dict[str, Tensor]],
                        cost_class: float, cost_mask: float, cost_dice: float, num_points: int,
                        generator: torch.Generator | None = None) -> list[list[Tensor | None]]:
    """Point-mode cost matrices of every (prediction, image) at once: ``costs[p][b]`` [Q, N_b] equals
    :func:`pairwise_cost` of prediction p and image b (None for an image without targets), with the
    same random points -- the draws are made in one call in :func:`hungarian_match`'s order
    (prediction-major, images without targets skipped), which gives the same numbers as one draw per
    pair.  One ``grid_sample`` for all predictions' masks, one target gather per image, batched
    matrix products: about one tenth of the small operations of the per-pair loop."""
    nonempty = [b for b, t in enumerate(targets) if t["labels"].shape[0] > 0]
    n_pred, n_img = len(predictions), len(nonempty)
    costs: list[list[Tensor | None]] = [[None] * len(targets) for _ in range(n_pred)]
    if n_img == 0 or n_pred == 0:
        return costs
    dev = predictions[0][1].device
    with torch.autocast(device_type=dev.type, enabled=False):
        coords = uniform_coords((n_pred * n_img, num_points, 2), dev, generator).view(n_pred, n_img, num_points, 2)
        prob = torch.stack([c for c, _ in predictions]).float().softmax(-1)  # [n_pred, B, Q, K+1]
        masks = torch.stack([m for _, m in predictions])[:, nonempty].float()  # [n_pred, n_img, Q, h, w]
        Q = masks.shape[2]
        out = point_sample(masks.flatten(0, 1), coords.flatten(0, 1)).view(n_pred, n_img, Q, num_points)
        for j, b in enumerate(nonempty):
            t = targets[b]
            labels = t["labels"].to(dev).clamp(0, prob.shape[-1] - 1)
            n = labels.shape[0]
            # the image's masks at every prediction's points: [N, n_pred * P] -> [n_pred, N, P]
            tgt = point_sample_masks(t["masks"].to(dev), coords[:, j].reshape(1, n_pred * num_points, 2))
            tgt = tgt.view(n, n_pred, num_points).transpose(0, 1)
            o = out[:, j]  # [n_pred, Q, P]
            cost = cost_mask * batch_bce_cost(o, tgt) + cost_dice * batch_dice_cost(o, tgt)  # [n_pred, Q, N]
            cost = cost_class * (-prob[:, b][:, :, labels]) + cost
            for p in range(n_pred):
                costs[p][b] = cost[p]
    return costs


@torch.no_grad()
def hungarian_match(predictions: Sequence[tuple[Tensor, Tensor]], targets: Sequence[dict[str, Tensor]],
                    cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                    num_points: int = 12544, mode: str = "point",
                    generator: torch.Generator | None = None) -> list[Indices]:
    """Match several predictions of one batch (e.g. the final and every auxiliary one) to ``targets``.

    predictions: list of (class_logits [B, Q, K+1], mask_logits [B, Q, h, w]);
    targets[b] = {"labels": int64 [N_b], "masks": bool [N_b, H, W]}.
    Returns, per prediction, a list over images of (pred_idx, tgt_idx) int64 CPU tensors.
    One host transfer for all cost matrices (and the label range check).
    """
    for class_logits, _ in predictions:
        check_targets(targets, class_logits.shape[0])
    if mode == "point" and len({tuple(m.shape) for _, m in predictions}) == 1:
        costs = point_costs_batched(predictions, targets, cost_class, cost_mask, cost_dice, num_points, generator)
    else:
        costs = []
        for class_logits, mask_logits in predictions:
            per_image: list[Tensor | None] = []
            for b, t in enumerate(targets):
                if t["labels"].shape[0] == 0:
                    per_image.append(None)
                    continue
                per_image.append(pairwise_cost(class_logits[b], mask_logits[b], t["labels"], t["masks"], cost_class,
                                               cost_mask, cost_dice, num_points, mode, generator))
            costs.append(per_image)
    if not costs:
        return []
    dev = predictions[0][0].device
    K1 = predictions[0][0].shape[-1]
    flat = [c.flatten() for per_image in costs for c in per_image if c is not None]
    labels = [t["labels"].to(dev) for t in targets if t["labels"].shape[0] > 0]
    # One host transfer: every cost matrix, then each image's (min, max) label.
    bounds = [torch.stack([lab.min(), lab.max()]).float() for lab in labels]
    host = torch.cat(flat + bounds).cpu() if flat else torch.zeros(0)
    n_cost = sum(f.numel() for f in flat)
    if bounds:
        lo_hi = host[n_cost:].view(-1, 2)
        n_img = [b for b, t in enumerate(targets) if t["labels"].shape[0] > 0]
        for b, (lo, hi) in zip(n_img, lo_hi.tolist()):
            if lo < 0 or hi > K1 - 2:
                raise InputError(f"targets[{b}]['labels']: class ids must lie in [0, {K1 - 2}] "
                                 f"(num_classes = {K1 - 1}; {K1 - 1} is 'no object'), got [{lo:.0f}, {hi:.0f}]")
    out: list[Indices] = []
    offset = 0
    empty = torch.empty(0, dtype=torch.int64)
    for per_image in costs:
        matched: Indices = []
        for c in per_image:
            if c is None:
                matched.append((empty, empty.clone()))
                continue
            host_c = host[offset:offset + c.numel()].view(c.shape)
            offset += c.numel()
            matched.append(linear_assignment(host_c))
        out.append(matched)
    return out


class HungarianMatcher(nn.Module):
    """Module wrapper of :func:`hungarian_match` holding the cost weights (no parameters).

    ``cost_class`` is honoured (HF transformers hard-codes 1.0 for it).
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544, mode: str = "point"):
        super().__init__()
        if mode not in MODES:
            raise InputError(f"loss.matching: {mode!r} is not a matching mode; valid choices: {list(MODES)}")
        if mode == "point" and num_points < 1:
            raise InputError(f"loss.num_points: expected >= 1 for point matching, got {num_points}")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points, self.mode = num_points, mode

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"mode={self.mode!r}, num_points={self.num_points}")

    def match_many(self, predictions: Sequence[tuple[Tensor, Tensor]], targets: Sequence[dict[str, Tensor]],
                   generator: torch.Generator | None = None) -> list[Indices]:
        """Several predictions [(class_logits, mask_logits), ...] at once (one host sync)."""
        return hungarian_match(predictions, targets, self.cost_class, self.cost_mask, self.cost_dice,
                               self.num_points, self.mode, generator)

    def forward(self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[dict[str, Tensor]],
                generator: torch.Generator | None = None) -> Indices:
        """class_logits [B, Q, K+1], mask_logits [B, Q, h, w]; targets[b] = {labels [N], masks [N, H, W]}.
        Returns per image (pred_idx, tgt_idx), int64 on CPU, sorted by pred_idx."""
        return self.match_many([(class_logits, mask_logits)], targets, generator)[0]
