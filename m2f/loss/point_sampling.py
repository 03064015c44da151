"""Point sampling (PointRend): sample per-mask values at continuous points, and choose points by
uncertainty.

Coordinates are normalised ``(x, y)`` in ``[0, 1]`` over the whole map: pixel ``(row i, col j)`` of an
``H x W`` map has its centre at ``((j + 0.5) / W, (i + 0.5) / H)`` (``grid_sample`` with
``align_corners=False``).  Because they are normalised, the same coordinates address the same place
in a 1/4-resolution prediction and in a full-resolution target mask.

Randomness: every draw uses ``generator`` when one is given, else the global torch RNG (the trainer
seeds it per iteration, so a resumed run draws the same points).  A generator may live on another
device than the tensors (e.g. a CPU generator for CUDA logits): the numbers are drawn on the
generator's device and moved, so a CPU generator gives the same points on every device.

All functions here are pure (no module state), so they can be timed directly with pytest-benchmark.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def uniform_coords(shape: Sequence[int], device: torch.device,
                   generator: torch.Generator | None = None) -> Tensor:
    """Uniform random numbers in [0, 1) of ``shape`` (float32) on ``device``; drawn with ``generator``
    (on the generator's own device) when given, else with the global RNG of ``device``."""
    if generator is None:
        return torch.rand(*shape, device=device)
    return torch.rand(*shape, device=generator.device, generator=generator).to(device)


def point_sample(input: Tensor, coords: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Bilinear values of ``input`` at ``coords``.

    input [N, C, H, W] (any dtype; non-floating inputs such as bool masks are read as float32),
    coords [N, P, 2] (x, y) in [0, 1] -> [N, C, P] (dtype of ``input`` if floating, else float32).

    ``padding_mode="zeros"`` (the official code's choice, used by the loss and matcher) blends values
    within half a pixel of the map border with 0: there the logit is pulled towards 0 and the target
    towards background, so point losses differ from full-mask losses by a small border bias (about 1%
    of the BCE for a 32x32 prediction, see tests/test_loss.py).  ``"border"`` repeats the edge pixel,
    as ``F.interpolate(align_corners=False)`` does, and removes that bias.
    """
    if not input.is_floating_point():
        input = input.float()
    grid = coords.mul(2.0).sub_(1.0).unsqueeze(2)  # [N, P, 1, 2] in [-1, 1] (= 2 * coords - 1, one copy)
    out = F.grid_sample(input, grid.to(input.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.squeeze(3)  # [N, C, P, 1] -> [N, C, P]


def point_sample_masks(masks: Tensor, coords: Tensor) -> Tensor:
    """``point_sample`` for (binary) target masks without converting them to float: the same bilinear
    weights (``align_corners=False``, zero padding) applied to 4 gathered pixels per point.

    masks [N, H, W] (bool / uint8 / float), coords [N, P, 2] or [1, P, 2] (shared points) (x, y) in
    [0, 1] -> [N, P] float32.  Equals ``point_sample(masks[:, None].float(), coords)[:, 0]``, but
    reads 4 * N * P pixels instead of writing an N * H * W float copy (a [N, 1024, 1024] mask stack is
    4 MiB per mask in float32).  Not differentiable (targets need no gradient).
    """
    N, H, W = masks.shape
    x = coords[..., 0].float() * W - 0.5  # [n, P] pixel coordinates (pixel centres at integers)
    y = coords[..., 1].float() * H - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0  # weights of the right / lower neighbours
    # Per axis: the two neighbours' clamped indices and weights, zeroed outside the mask (zero
    # padding); then per corner (nw, ne, sw, se, grid_sample's order and weight products) a gather
    # and a weighted add, each [N, P] (corner by corner keeps the working set in cache).
    x1, y1 = x0 + 1, y0 + 1
    wx = ((1 - fx) * ((x0 >= 0) & (x0 <= W - 1)), fx * ((x1 >= 0) & (x1 <= W - 1)))
    wy = ((1 - fy) * ((y0 >= 0) & (y0 <= H - 1)), fy * ((y1 >= 0) & (y1 <= H - 1)))
    xi = (x0.clamp(0, W - 1).long(), x1.clamp(0, W - 1).long())
    yi = (y0.clamp(0, H - 1).long() * W, y1.clamp(0, H - 1).long() * W)
    flat = masks.reshape(N, H * W)
    out = None
    for dy in (0, 1):
        for dx in (0, 1):
            val = flat.gather(1, (yi[dy] + xi[dx]).expand(N, -1)).float() * (wy[dy] * wx[dx]).expand(N, -1)
            out = val if out is None else out + val
    return out  # [N, P]


# A float32 copy of the target masks up to this size is cheaper than the gathers of
# point_sample_masks (one grid_sample instead of ~30 passes over [rows, P] temporaries); above it
# (e.g. 1024 px masks) the gathers keep memory flat.
FLOAT_TARGETS_MAX_BYTES = 64 << 20


def point_sample_rows(masks: Tensor, rows: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of the target masks ``masks[rows]`` at per-row points, without stacking
    ``masks[rows]``: ``point_sample_masks(masks[rows], coords)`` up to float rounding.

    masks [T, H, W] (bool / uint8 / float; the unique targets of a batch), rows [R] int64 (the
    target of each row, e.g. every supervised prediction's matched targets, so a target repeats
    once per prediction), coords [R, P, 2] (x, y) in [0, 1] -> [R, P] float32.  Not differentiable.

    When every target occurs equally often (k times: each prediction matched every target) and a
    float32 copy of the T masks fits :data:`FLOAT_TARGETS_MAX_BYTES`, the rows are grouped by target
    and sampled with ONE ``grid_sample`` over the T float masks ([T, k * P] points); otherwise, if
    the R masks fit, ``grid_sample`` on ``masks[rows]``; else :func:`point_sample_masks` (gathers,
    no float copy).
    """
    T, H, W = masks.shape
    R, P = coords.shape[:2]
    if R == 0:
        return coords.new_zeros((0, P))
    float_bytes = 4 * H * W
    counts = torch.bincount(rows, minlength=T) if T else rows.new_zeros(0)
    if T and T * float_bytes <= FLOAT_TARGETS_MAX_BYTES and R % T == 0 and bool((counts == R // T).all()):
        k = R // T
        order = torch.argsort(rows, stable=True)  # rows grouped by target: [t0 x k, t1 x k, ...]
        grid = coords[order].reshape(T, k * P, 2)
        vals = point_sample(masks[:, None].float(), grid)[:, 0].reshape(R, P)
        out = torch.empty_like(vals)
        out[order] = vals
        return out
    if R * float_bytes <= FLOAT_TARGETS_MAX_BYTES:
        return point_sample(masks[rows][:, None].float(), coords)[:, 0]
    return point_sample_masks(masks[rows], coords)


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """-|logit|: highest (0) at the decision boundary.  logits [N, 1, ...] -> same shape."""
    return -logits.abs()


def uncertainty_point_coords(logits: Tensor, uncertainty_fn: Callable[[Tensor], Tensor], num_points: int,
                             oversample_ratio: float, importance_sample_ratio: float,
                             generator: torch.Generator | None = None, groups: int = 1) -> Tensor:
    """Choose ``num_points`` points per mask as PointRend's training sampler (no Python loop over masks).

    Draw ``int(oversample_ratio * num_points)`` uniform points, keep the
    ``int(importance_sample_ratio * num_points)`` with the highest uncertainty (``uncertainty_fn`` of
    the logits sampled there; -|logit| in Mask2Former), then append uniform points up to
    ``num_points``.  With ``importance_sample_ratio = 0`` the result is ``num_points`` uniform points.

    logits [N, 1, H, W] -> coords [N, num_points, 2] (x, y) in [0, 1], float32.  Call under
    ``torch.no_grad()``: the choice of points is not differentiated.

    ``groups`` = G > 1: the N masks are G equal groups (e.g. several predictions' matched masks) and
    the random numbers are drawn as G separate calls would draw them, group after group (the
    oversampled points, then the uniform ones): the result equals G calls on the groups, concatenated,
    in one draw, one point sample and one top-k.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1, got "
                         f"{oversample_ratio} and {importance_sample_ratio}")
    n, dev = logits.shape[0], logits.device
    n_sampled = int(num_points * oversample_ratio)
    n_imp = int(importance_sample_ratio * num_points)
    n_rand = num_points - n_imp
    if n % groups:
        raise ValueError(f"uncertainty_point_coords: {n} masks do not split into {groups} equal groups")
    if n_imp == 0:  # plain uniform sampling: skip the oversampled draw and its grid_sample
        return uniform_coords((n, num_points, 2), dev, generator)
    if groups > 1:  # one draw in the order of G calls: per group [m * S * 2 oversampled | m * n_rand * 2 uniform]
        m = n // groups
        draws = uniform_coords((groups, m * 2 * (n_sampled + n_rand)), dev, generator)
        coords = draws[:, : m * n_sampled * 2].reshape(n, n_sampled, 2)
        fill = draws[:, m * n_sampled * 2:].reshape(n, n_rand, 2)
    else:
        coords = uniform_coords((n, n_sampled, 2), dev, generator)  # [N, S, 2]
        fill = None
    unc = uncertainty_fn(point_sample(logits, coords))[:, 0]  # [N, S]
    idx = unc.topk(n_imp, dim=1, sorted=False).indices  # [N, n_imp]: a set (the loss averages over points)
    chosen = coords.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))  # [N, n_imp, 2]
    if n_rand > 0:
        chosen = torch.cat([chosen, fill if fill is not None else uniform_coords((n, n_rand, 2), dev, generator)],
                           dim=1)
    return chosen  # [N, num_points, 2]
