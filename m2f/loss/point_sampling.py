"""Point sampling (PointRend): sample per-mask values at continuous points, and choose points by
uncertainty.  Coordinates are normalised ``(x, y)`` in ``[0, 1]`` (pixel centres at
``(i + 0.5) / size``, i.e. grid_sample with ``align_corners=False``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, coords: Tensor) -> Tensor:
    """input [N, C, H, W], coords [N, P, 2] in [0, 1] -> [N, C, P] (bilinear, zero padding)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # [N, P, 1, 2]
    return F.grid_sample(input, grid.to(input.dtype), mode="bilinear", align_corners=False).squeeze(3)


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """-|logit|: highest at the decision boundary.  logits [N, 1, ...] -> same shape."""
    return -logits.abs()


def uncertainty_point_coords(logits: Tensor, uncertainty_fn: Callable[[Tensor], Tensor], num_points: int,
                             oversample_ratio: float, importance_sample_ratio: float,
                             generator: Optional[torch.Generator] = None) -> Tensor:
    """Choose ``num_points`` points per mask as PointRend's training sampler.

    Draw ``oversample_ratio * num_points`` uniform points, keep the ``importance_sample_ratio``
    fraction with the highest uncertainty (``uncertainty_fn`` of the logits sampled there), then add
    uniform points for the rest.  logits [N, 1, H, W] -> coords [N, num_points, 2].
    """
    n = logits.shape[0]
    n_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, n_sampled, 2, device=logits.device, generator=generator)
    unc = uncertainty_fn(point_sample(logits, coords))  # [N, 1, n_sampled]
    n_imp = int(importance_sample_ratio * num_points)
    n_rand = num_points - n_imp
    idx = unc[:, 0].topk(n_imp, dim=1).indices  # [N, n_imp]
    chosen = coords.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if n_rand > 0:
        chosen = torch.cat([chosen, torch.rand(n, n_rand, 2, device=logits.device, generator=generator)], dim=1)
    return chosen
