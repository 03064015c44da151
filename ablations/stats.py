"""Paired statistics of ablation tables: a row against its base row, seed by seed.

Every row of a table runs the same seeds as its base row (same data order, augmentation and
initialisation of the parts they share: all of it follows from ``solver.seed``), so the effect of a
row is estimated from the per-seed differences d_s = row_s - base_s:

- Δ = mean(d_s) over the n seeds both rows have;
- its 95% interval: Student t with n - 1 degrees of freedom, Δ ± t_{0.975, n-1} · sd(d) / √n
  (``scipy.stats.t``); no interval for n < 2;
- verdict against the paper's Δ: ``agrees`` when the interval excludes 0 on the paper's side,
  ``contradicts`` when it excludes 0 on the other side, ``inconclusive`` otherwise (and for n < 2);
  ``no paper value`` when the paper has no Δ, ``not run`` when the row has no paired seeds.

Pairing removes the seed-to-seed variation the two rows share, which with these small runs is most
of it (reports/calibration/README.md measures both spreads).
"""
from __future__ import annotations

import functools
import math
import statistics
from typing import Dict, List, Mapping, Optional

CONFIDENCE = 0.95
VERDICTS = ("agrees", "contradicts", "inconclusive", "not run")


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student t quantile: t such that P(|T_df| <= t) = confidence."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df))


def paired_delta(base: Mapping[int, float], row: Mapping[int, float],
                 confidence: float = CONFIDENCE) -> Optional[Dict[str, object]]:
    """Δ of ``row`` over ``base`` (both {seed: value}) from the seeds they share.

    Returns {"delta", "low", "high", "n", "seeds", "sd"} (low/high None for n < 2; sd of the
    per-seed differences), or None without a shared seed."""
    seeds = sorted(set(base) & set(row))
    if not seeds:
        return None
    d = [float(row[s]) - float(base[s]) for s in seeds]
    n = len(d)
    mean = statistics.fmean(d)
    if n < 2:
        return {"delta": mean, "low": None, "high": None, "n": n, "seeds": seeds, "sd": None}
    sd = statistics.stdev(d)
    half = t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    return {"delta": mean, "low": mean - half, "high": mean + half, "n": n, "seeds": seeds, "sd": sd}


def verdict(delta: Optional[Mapping[str, object]], paper_delta: Optional[float]) -> str:
    """``agrees`` / ``contradicts`` / ``inconclusive`` / ``not run`` / ``no paper value``."""
    if delta is None:
        return "not run"
    if paper_delta is None:
        return "no paper value"
    low, high = delta.get("low"), delta.get("high")
    if low is None or high is None or paper_delta == 0:
        return "inconclusive"
    if low > 0 or high < 0:  # the interval excludes zero
        return "agrees" if (low > 0) == (paper_delta > 0) else "contradicts"
    return "inconclusive"


def seed_spread(values: List[float]) -> Optional[float]:
    """Sample standard deviation over seeds (None for fewer than 2)."""
    return statistics.stdev(values) if len(values) >= 2 else None


@functools.lru_cache(maxsize=None)
def second_look_error(n_first: int, n_total: int, confidence: float = CONFIDENCE, sims: int = 200_000,
                      seed: int = 0) -> float:
    """How often an interval excludes 0 when the true effect is 0, if seeds are added to a row
    (``n_first`` -> ``n_total``) only because its first interval contained 0: the chance that the
    first (when ``n_first`` >= 2) OR the second interval excludes 0 (both two-sided Student t intervals, normal per-seed
    differences; a Monte Carlo estimate over ``sims`` draws).  1 - confidence when nothing is added;
    for 5 -> 8 seeds at 95% it is about 8%, not 5% (half of it on each side of 0)."""
    import numpy as np

    if not 1 <= n_first <= n_total or n_total < 2:
        raise ValueError(f"second_look_error: expected 1 <= n_first <= n_total and n_total >= 2, got {n_first}, "
                         f"{n_total}")
    x = np.random.default_rng(seed).standard_normal((sims, n_total))

    def excludes_zero(a):
        n = a.shape[1]
        return np.abs(a.mean(1)) > t_quantile(n - 1, confidence) * a.std(1, ddof=1) / math.sqrt(n)

    hit = excludes_zero(x)
    if n_first >= 2:  # one seed has no interval: no first look
        hit |= excludes_zero(x[:, :n_first])
    return float(hit.mean())


@functools.lru_cache(maxsize=None)
def second_look_confidence(n_first: int, n_total: int, alpha: float = 1 - CONFIDENCE) -> float:
    """The confidence at which both looks' intervals make a row given extra seeds err (an interval
    excluding 0 with no true effect) in ``alpha`` of tables overall: a Pocock-style two-look design,
    found by bisection on :func:`second_look_error`'s simulated draws (about 0.97 for 5 -> 8 seeds at
    alpha 0.05).  A row gets extra seeds only when its first, nominal 95% interval contained 0; the
    wider interval of this confidence then contains 0 as well, so computing the second look at this
    confidence gives exactly the verdict of the two-look design.  ``1 - alpha`` when nothing is added."""
    if n_total <= n_first or n_first < 2:
        return 1 - alpha
    lo, hi = 1 - alpha, 1 - alpha / 10
    for _ in range(16):  # the bracket is alpha * 0.9 wide: 16 halvings leave < 1e-6
        mid = (lo + hi) / 2
        if second_look_error(n_first, n_total, confidence=mid) > alpha:
            lo = mid
        else:
            hi = mid
    return round(hi, 4)


def signed_rank_p(differences: List[float]) -> Optional[float]:
    """Two-sided p of Wilcoxon's signed-rank test that the per-seed differences centre on 0 (scipy: exact
    for small n without ties or zero differences, a normal approximation otherwise).  A check of a t interval that does not assume normal differences: a few seeds
    far from the rest move a mean more than they move ranks.  None below 2 differences or when all
    are 0."""
    d = [float(x) for x in differences]
    if len(d) < 2 or not any(d):
        return None
    from scipy import stats

    return float(stats.wilcoxon(d).pvalue)


def seeds_for_half_width(sd: Optional[float], target: float, confidence: float = CONFIDENCE,
                         max_seeds: int = 200) -> Optional[int]:
    """The fewest paired seeds n whose interval half-width t_{n-1} · sd / √n falls below ``target``
    (e.g. |paper Δ|), given the per-seed differences' ``sd``: a planning figure (it takes the sd as
    known); None when sd or target is missing, ``max_seeds + 1`` when even ``max_seeds`` do not."""
    if sd is None or not target or target <= 0:
        return None
    for n in range(2, max_seeds + 1):
        if t_quantile(n - 1, confidence) * sd / math.sqrt(n) < target:
            return n
    return max_seeds + 1
