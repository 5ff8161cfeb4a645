"""Intervals and paired tests for accuracies: what a claim about learning must carry.

An accuracy on n problems is a binomial proportion; we report it with its 95% Wilson score
interval, which behaves at 0 and 1 (where the textbook Wald interval collapses to a point).
Base and trained models are scored on the *same* problems, so the comparison is paired: the
problems both get right or both get wrong say nothing about the change, only the discordant
ones do (``fixed``: wrong before, right after; ``broken``: the reverse). That is far more
powerful than comparing two separate intervals. We give:

- the exact McNemar test (a two-sided binomial test of ``fixed`` against ``broken``), and
- Newcombe's hybrid score interval for the paired difference (his method 10, 1998), which
  combines the two Wilson intervals with the observed correlation between the paired
  outcomes; it stays inside [-1, 1] and is well behaved with few discordant pairs.

Across seeds (``pooled_paired_comparison``), each seed's runs are scored on the same
problems, so the (seed, problem) pairs are not independent: a problem one seed fixes, the
others tend to fix too. The pooled change is resampled by whole problems (all seeds' pairs
of a problem together) for its interval and tested by flipping whole problems' signs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "Z95",
    "format_interval",
    "mcnemar_exact",
    "paired_comparison",
    "paired_difference_interval",
    "pooled_paired_comparison",
    "wilson_interval",
]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n``.

    >>> wilson_interval(0, 10)
    (0.0, 0.2775327998628892)
    >>> lo, hi = wilson_interval(50, 100); round(lo, 4), round(hi, 4)
    (0.4038, 0.5962)
    """
    if n <= 0:
        raise ValueError(f"an interval needs n >= 1 observations, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..{n}, got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: is ``fixed`` vs ``broken`` more lopsided than chance?

    Under no change each discordant pair is a fair coin; the p-value is twice the smaller
    binomial tail, capped at 1.

    >>> mcnemar_exact(0, 0)
    1.0
    >>> round(mcnemar_exact(10, 0), 6)
    0.001953
    """
    if fixed < 0 or broken < 0:
        raise ValueError(f"counts must be >= 0, got fixed={fixed}, broken={broken}")
    m = fixed + broken
    if m == 0:
        return 1.0
    k = min(fixed, broken)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_difference_interval(
    both: int, fixed: int, broken: int, neither: int, z: float = Z95
) -> tuple[float, float]:
    """95% interval for ``after - before`` accuracy on paired outcomes (Newcombe, method 10).

    ``both``: right before and after; ``fixed``: wrong before, right after; ``broken``: right
    before, wrong after; ``neither``: wrong in both.

    >>> lo, hi = paired_difference_interval(0, 20, 0, 44); round(lo, 4), round(hi, 4)
    (0.1974, 0.4339)
    >>> lo, hi = paired_difference_interval(10, 3, 3, 48); lo < 0 < hi
    True
    """
    counts = (both, fixed, broken, neither)
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be >= 0, got {counts}")
    n = sum(counts)
    if n == 0:
        raise ValueError("a paired interval needs at least one pair")
    p_before = (both + broken) / n
    p_after = (both + fixed) / n
    lo_b, hi_b = wilson_interval(both + broken, n, z)
    lo_a, hi_a = wilson_interval(both + fixed, n, z)
    # correlation of the paired 0/1 outcomes (phi); 0 when a margin is empty
    margins = (both + broken) * (fixed + neither) * (both + fixed) * (broken + neither)
    phi = (both * neither - fixed * broken) / math.sqrt(margins) if margins > 0 else 0.0
    delta = p_after - p_before
    d_lo_a, d_hi_b = p_after - lo_a, hi_b - p_before
    d_hi_a, d_lo_b = hi_a - p_after, p_before - lo_b
    lower = delta - math.sqrt(max(0.0, d_lo_a**2 - 2 * phi * d_lo_a * d_hi_b + d_hi_b**2))
    upper = delta + math.sqrt(max(0.0, d_hi_a**2 - 2 * phi * d_hi_a * d_lo_b + d_lo_b**2))
    return (max(-1.0, lower), min(1.0, upper))


def paired_comparison(
    before: Sequence[Mapping[str, Any]],
    after: Sequence[Mapping[str, Any]],
    key: str = "correct",
) -> dict[str, Any]:
    """Base vs trained on the same problems (records matched by ``id``), for one outcome.

    ``key`` picks the outcome: ``correct`` (strict: format-valid answer, right) or
    ``lenient_correct`` (the right number, format or not). Raises if the two evaluations
    did not score the same problems: an unpaired comparison must not pass for a paired one.
    """
    a = {r["id"]: bool(r.get(key)) for r in before}
    b = {r["id"]: bool(r.get(key)) for r in after}
    if set(a) != set(b) or len(a) != len(before) or len(b) != len(after):
        only = sorted(set(a) ^ set(b))[:3]
        raise ValueError(
            f"paired comparison needs the same problems on both sides "
            f"({len(before)} vs {len(after)} records; e.g. unmatched ids {only})"
        )
    n = len(a)
    if n == 0:
        raise ValueError("paired comparison needs at least one problem")
    both = sum(a[i] and b[i] for i in a)
    fixed = sum(not a[i] and b[i] for i in a)
    broken = sum(a[i] and not b[i] for i in a)
    neither = n - both - fixed - broken
    k_before, k_after = both + broken, both + fixed
    return {
        "metric": key,
        "n": n,
        "before": k_before / n,
        "before_ci": list(wilson_interval(k_before, n)),
        "after": k_after / n,
        "after_ci": list(wilson_interval(k_after, n)),
        "delta": (k_after - k_before) / n,
        "delta_ci": list(paired_difference_interval(both, fixed, broken, neither)),
        "fixed": fixed,
        "broken": broken,
        "p_value": mcnemar_exact(fixed, broken),
    }


def format_interval(value: float, interval: Sequence[float], points: bool = True) -> str:
    """``0.412 [0.363, 0.463]``, or in points with a sign: ``+12.5 pts [+7.1, +17.9]``.

    >>> format_interval(0.5, (0.4, 0.6), points=False)
    '0.500 [0.400, 0.600]'
    >>> format_interval(0.125, (0.071, 0.179))
    '+12.5 pts [+7.1, +17.9]'
    """
    lo, hi = interval
    if not points:
        return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{100 * value:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def pooled_paired_comparison(
    pairs: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
    key: str = "correct",
    resamples: int = 4000,
    seed: int = 0,
) -> dict[str, Any]:
    """The change ``after - before`` pooled over seeds, each seed a (before, after) pair of
    evaluations on the same problems (checked as ``paired_comparison`` does).

    Why: one seed's 384 problems give about +-4 points; the question "does full beat plain
    by 5" is asked of the seeds together. The pooled change is the mean over every (seed,
    problem) pair; its 95% interval is a percentile bootstrap over problems, each drawn with
    all its seeds' pairs (problems are shared, so their pairs are correlated); ``p_value`` is a
    sign-flip test over problems (under no change, a problem's summed change is as likely
    negative as positive). The interval covers the sampling of problems and of these seeds'
    flips; a spread between seeds larger than their flips show is not in it (see the per-seed
    rows beside it).
    """
    import numpy as np

    if not pairs:
        raise ValueError("a pooled comparison needs at least one seed")
    per_seed = [paired_comparison(a, b, key) for a, b in pairs]
    change: dict[Any, list[int]] = {}
    for before, after in pairs:
        b = {r["id"]: bool(r.get(key)) for r in after}
        for r in before:
            cell = change.setdefault(r["id"], [0, 0])
            cell[0] += int(b[r["id"]]) - int(bool(r.get(key)))
            cell[1] += 1
    summed = np.array([c[0] for c in change.values()], dtype=np.float64)
    counts = np.array([c[1] for c in change.values()], dtype=np.float64)
    delta = float(summed.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(summed), size=(resamples, len(summed)))
    boot = summed[draws].sum(axis=1) / counts[draws].sum(axis=1)
    signs = rng.choice((-1.0, 1.0), size=(resamples, len(summed)))
    flipped = np.abs((signs * summed).sum(axis=1)) / counts.sum()
    p_value = float((1 + np.sum(flipped >= abs(delta) - 1e-12)) / (resamples + 1))
    return {
        "metric": key,
        "seeds": len(pairs),
        "n": int(counts.sum()),
        "problems": len(summed),
        "delta": delta,
        "delta_ci": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
        "fixed": sum(c["fixed"] for c in per_seed),
        "broken": sum(c["broken"] for c in per_seed),
        "p_value": p_value,  # (1 + hits) / (resamples + 1) <= 1
    }
