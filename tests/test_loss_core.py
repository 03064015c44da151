"""Matcher optimality, point vs full-mask loss consistency, empty images, deep supervision."""
from __future__ import annotations

import itertools

import pytest
import torch

from m2f.config import LossCfg
from m2f.loss import HungarianMatcher, build_criterion
from m2f.loss.criterion import SetCriterion, dice_loss, sigmoid_bce_loss
from m2f.loss.matcher import pairwise_cost
from m2f.loss.point_sampling import point_sample, uncertainty_point_coords
from m2f.models.outputs import Mask2FormerOutput, MaskPrediction


def _targets(g, n, H=32, W=32, K=5):
    masks = torch.rand(n, H, W, generator=g) > 0.6
    return {"labels": torch.randint(0, K, (n,), generator=g), "masks": masks}


@pytest.mark.parametrize("mode", ["mask", "point"])
@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal_vs_brute_force(mode, seed):
    g = torch.Generator().manual_seed(seed)
    Q, N, K = 6, int(torch.randint(1, 5, (1,), generator=g)), 5
    cls = torch.randn(1, Q, K + 1, generator=g)
    msk = torch.randn(1, Q, 8, 8, generator=g)
    t = _targets(g, N, K=K)
    m = HungarianMatcher(2.0, 5.0, 5.0, num_points=500, mode=mode)
    (r, c), = m(cls, msk, [t], generator=torch.Generator().manual_seed(7))
    C = pairwise_cost(cls[0], msk[0], t["labels"], t["masks"], 2.0, 5.0, 5.0, 500, mode,
                      generator=torch.Generator().manual_seed(7))
    got = C[r, c].sum().item()
    best = min(sum(C[q, j].item() for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), N))
    assert len(r) == N and sorted(c.tolist()) == list(range(N))
    assert got == pytest.approx(best, abs=1e-5)


def test_matcher_honours_the_class_cost_weight():
    # Two queries, one target: query 0 has the better mask, query 1 the better class score.
    t = {"labels": torch.tensor([1]), "masks": torch.zeros(1, 8, 8, dtype=torch.bool)}
    t["masks"][0, :4] = True
    good_mask = torch.full((8, 8), -5.0)
    good_mask[:4] = 5.0
    msk = torch.stack([good_mask, torch.zeros(8, 8)])[None]
    cls = torch.tensor([[[0.0, 0.0, 0.0], [-5.0, 5.0, -5.0]]])
    assert HungarianMatcher(0.0, 5.0, 5.0, mode="mask")(cls, msk, [t])[0][0].tolist() == [0]
    assert HungarianMatcher(100.0, 1.0, 1.0, mode="mask")(cls, msk, [t])[0][0].tolist() == [1]


def test_bce_and_dice_costs_equal_the_losses_pairwise():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 50, generator=g), (torch.rand(2, 50, generator=g) > 0.5).float()
    from m2f.loss.matcher import batch_bce_cost, batch_dice_cost

    bce, dice = batch_bce_cost(x, t), batch_dice_cost(x, t)
    for q in range(3):
        for n in range(2):
            one = torch.ones(())
            assert bce[q, n] == pytest.approx(sigmoid_bce_loss(x[q:q + 1], t[n:n + 1], one).item(), rel=1e-5)
            assert dice[q, n] == pytest.approx(dice_loss(x[q:q + 1], t[n:n + 1], one).item(), rel=1e-5)


def test_point_sample_reads_pixel_centres():
    img = torch.arange(12.0).view(1, 1, 3, 4)
    coords = torch.tensor([[[(1 + 0.5) / 4, (2 + 0.5) / 3]]])  # x = col 1, y = row 2
    assert point_sample(img, coords).item() == pytest.approx(9.0)


def test_importance_sampling_prefers_uncertain_points():
    logits = torch.full((1, 1, 32, 32), 10.0)
    logits[..., :, 16:] = -10.0
    logits[..., :, 15:17] = 0.0  # boundary band: uncertainty highest
    coords = uncertainty_point_coords(logits, lambda x: -x.abs(), 400, 3.0, 0.75, torch.Generator().manual_seed(0))
    assert coords.shape == (1, 400, 2)
    x = coords[0, :, 0] * 32
    in_band = ((x > 14.5) & (x < 17.5)).float()
    # The band is 3/32 = 9% of the image: all ~112 of the 1200 candidates that fall in it are kept among the
    # 300 importance points (37%), while the 100 uniform points land there at the base rate.
    assert in_band[:300].mean() > 0.3
    assert in_band[300:].mean() < 0.25


@pytest.mark.parametrize("K,tol", [(1000, 0.10), (10000, 0.04), (100000, 0.015)])
def test_point_losses_converge_to_full_mask_losses(K, tol):
    """Uniform point sampling (importance 0) is an unbiased estimate of the full-mask loss; its relative
    error shrinks like 1/sqrt(K).  Stated tolerances: 10% at 1k, 4% at 10k, 1.5% at 100k points."""
    g = torch.Generator().manual_seed(0)
    # Smooth predictions at 1/4 resolution and a blob target at full resolution.
    pred = torch.nn.functional.interpolate(torch.randn(1, 3, 8, 8, generator=g) * 3, size=(32, 32), mode="bilinear")[0]
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    tgt = torch.stack([((yy - 40) ** 2 + (xx - 60) ** 2 < 900), (yy > 80), ((xx - yy).abs() < 20)])
    out = Mask2FormerOutput(class_logits=torch.zeros(1, 3, 4), mask_logits=pred[None])
    targets = [{"labels": torch.tensor([0, 1, 2]), "masks": tgt}]
    kw = dict(num_points=K, oversample_ratio=1.0, importance_sample_ratio=0.0, deep_supervision=False)
    # Identity matching (the costs put query i on target i is not guaranteed): use a fixed matcher.
    fixed = lambda *a, **k: [(torch.arange(3), torch.arange(3))]  # noqa: E731
    full = SetCriterion(3, fixed, loss_mode="mask", **kw)(out, targets)
    torch.manual_seed(1)
    pts = SetCriterion(3, fixed, loss_mode="point", **kw)(out, targets)
    for k in ("loss_mask", "loss_dice"):
        assert pts[k].item() == pytest.approx(full[k].item(), rel=tol), k


def test_image_without_objects_gives_the_no_object_cross_entropy():
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    msk = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    out = Mask2FormerOutput(cls, msk, aux=[MaskPrediction(cls * 1.0, msk * 1.0)])
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}
    crit = build_criterion(LossCfg(num_points=64), num_classes=5)
    losses = crit(out, [empty, empty])
    # All queries -> no-object (class 5); weighted mean of CE with uniform weights 0.1 = plain mean.
    expected = torch.nn.functional.cross_entropy(cls.detach().reshape(-1, 6), torch.full((8,), 5)).item() * 2.0
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(cls.grad).all() and msk.grad is not None


def test_perfect_prediction_has_near_zero_mask_loss_and_deep_supervision_keys():
    g = torch.Generator().manual_seed(0)
    tgt = torch.zeros(2, 64, 64, dtype=torch.bool)
    tgt[0, :32], tgt[1, 32:] = True, True
    logits = torch.where(tgt, 20.0, -20.0).float()
    msk = torch.nn.functional.interpolate(logits[None], size=(16, 16), mode="nearest")  # [1, 2, 16, 16]
    msk = torch.cat([msk, torch.full((1, 2, 16, 16), -20.0)], 1)
    cls = torch.full((1, 4, 4), -10.0)
    cls[0, 0, 1] = cls[0, 1, 2] = 10.0
    cls[0, 2:, 3] = 10.0
    out = Mask2FormerOutput(cls, msk, aux=[MaskPrediction(cls, msk) for _ in range(9)])
    crit = build_criterion(LossCfg(num_points=4096, importance_sample_ratio=0.0), num_classes=3)
    losses = crit(out, [{"labels": torch.tensor([1, 2]), "masks": tgt}])
    assert len(losses) == 3 * 10
    assert set(losses) >= {"loss_ce", "loss_mask_0", "loss_dice_8"}
    # Uniform points; bilinear sampling of +-20 logits across the edge costs a little (weights 5 included).
    assert losses["loss_mask"].item() < 0.5 and losses["loss_dice"].item() < 0.05
    bad = crit(out, [{"labels": torch.tensor([1, 2]), "masks": tgt.transpose(1, 2).contiguous()}])
    assert bad["loss_mask"].item() > 20 * losses["loss_mask"].item()
    assert losses["loss_ce"].item() < 1e-3
