"""Intervals and paired tests of the evaluation of record, and the held-out set's disjointness."""

from __future__ import annotations

import doctest
import random

import pytest

import deepsynapse.eval.stats as stats
from deepsynapse.data.synthetic import (
    generate_problems,
    heldout_problems,
    is_heldout,
    training_problems,
)
from deepsynapse.eval.stats import (
    mcnemar_exact,
    paired_comparison,
    paired_difference_interval,
    pooled_paired_comparison,
    wilson_interval,
)


def test_docstring_examples_hold():
    assert doctest.testmod(stats).failed == 0


def test_wilson_covers_the_truth_95_percent_of_the_time():
    rng = random.Random(0)
    for p, n in [(0.05, 64), (0.3, 100), (0.5, 384)]:
        hits = 0
        for _ in range(2000):
            k = sum(rng.random() < p for _ in range(n))
            lo, hi = wilson_interval(k, n)
            hits += lo <= p <= hi
        assert 0.92 <= hits / 2000 <= 0.98, (p, n, hits / 2000)
    # 384 problems at p = 0.5: the +-5 points the evaluation of record is sized for
    lo, hi = wilson_interval(192, 384)
    assert hi - lo < 0.101


def test_paired_interval_covers_and_is_narrower_than_unpaired():
    """Correlated before/after outcomes: the paired interval keeps its coverage, and is
    narrower than one built as if the two evaluations were independent (phi = 0)."""
    rng = random.Random(1)
    before_p, keep, gain = 0.3, 0.85, 0.15  # right stays right w.p. keep; wrong fixed w.p. gain
    true = before_p * keep + (1 - before_p) * gain - before_p
    n, hits, widths = 200, 0, []
    for _ in range(1500):
        c = [0, 0, 0, 0]  # both, fixed, broken, neither
        for _ in range(n):
            x = rng.random() < before_p
            y = rng.random() < (keep if x else gain)
            c[0 if x and y else 1 if y else 2 if x else 3] += 1
        lo, hi = paired_difference_interval(*c)
        hits += lo <= true <= hi
        widths.append(hi - lo)
    assert 0.93 <= hits / 1500 <= 0.975
    # independent samples of the same margins give a wider interval
    lo_b, hi_b = wilson_interval(60, 200)
    lo_a, hi_a = wilson_interval(72, 200)
    unpaired = ((0.36 - lo_a) ** 2 + (hi_b - 0.3) ** 2) ** 0.5 + (
        (hi_a - 0.36) ** 2 + (0.3 - lo_b) ** 2
    ) ** 0.5
    assert sum(widths) / len(widths) < unpaired


def test_mcnemar_is_the_exact_binomial_tail():
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(6, 1) == pytest.approx(2 * (1 + 7) / 128)
    assert mcnemar_exact(1, 6) == mcnemar_exact(6, 1)
    with pytest.raises(ValueError, match="counts must be >= 0"):
        mcnemar_exact(-1, 2)


def test_paired_comparison_matches_records_by_id_and_refuses_unpaired():
    before = [{"id": str(i), "correct": i < 3} for i in range(10)]
    after = [{"id": str(i), "correct": 1 <= i < 8} for i in reversed(range(10))]
    c = paired_comparison(before, after)
    assert (c["n"], c["fixed"], c["broken"]) == (10, 5, 1)
    assert c["before"] == 0.3 and c["after"] == 0.7 and c["delta"] == pytest.approx(0.4)
    assert c["delta_ci"][0] < 0.4 < c["delta_ci"][1]
    assert c["p_value"] == mcnemar_exact(5, 1)
    with pytest.raises(ValueError, match="same problems"):
        paired_comparison(before, after[:-1])
    lenient = paired_comparison(
        [{"id": "a", "lenient_correct": False}],
        [{"id": "a", "lenient_correct": True}],
        key="lenient_correct",
    )
    assert lenient["metric"] == "lenient_correct" and lenient["fixed"] == 1


def _seeded_evaluations(rng: random.Random, easy: list[float], gain: float, seeds: int):
    """Before/after records per seed on shared problems: a problem's difficulty is shared by
    the seeds, so their pairs are correlated, as in a study."""
    pairs = []
    for _ in range(seeds):
        before = [{"id": i, "correct": rng.random() < p} for i, p in enumerate(easy)]
        after = [
            {"id": i, "correct": rng.random() < min(1.0, p + gain)} for i, p in enumerate(easy)
        ]
        pairs.append((before, after))
    return pairs


def test_pooled_comparison_over_seeds_agrees_with_one_seed_narrows_and_covers():
    rng = random.Random(2)
    easy = [rng.choice((0.02, 0.3, 0.7, 0.98)) for _ in range(384)]
    one = _seeded_evaluations(rng, easy, 0.0, 1)
    pooled, newcombe = pooled_paired_comparison(one), paired_comparison(*one[0])
    assert pooled["delta"] == pytest.approx(newcombe["delta"])
    assert (pooled["fixed"], pooled["broken"]) == (newcombe["fixed"], newcombe["broken"])
    for got, want in zip(pooled["delta_ci"], newcombe["delta_ci"], strict=True):
        assert got == pytest.approx(want, abs=0.012)  # the bootstrap near Newcombe's interval
    three = pooled_paired_comparison(_seeded_evaluations(rng, easy, 0.0, 3))
    assert (three["seeds"], three["n"], three["problems"]) == (3, 3 * 384, 384)
    width = lambda c: c["delta_ci"][1] - c["delta_ci"][0]  # noqa: E731
    assert width(three) < 0.75 * width(pooled)
    assert pooled_paired_comparison(one) == pooled_paired_comparison(one)  # seeded
    # coverage of the true change (+5 points on problems not already solved) over 3 seeds
    true = sum(min(1.0, p + 0.05) - p for p in easy) / len(easy)
    hits = p_small = 0
    for _ in range(60):
        c = pooled_paired_comparison(_seeded_evaluations(rng, easy, 0.05, 3), resamples=1000)
        hits += c["delta_ci"][0] <= true <= c["delta_ci"][1]
        p_small += c["p_value"] < 0.05
    assert hits >= 53 and p_small >= 50  # ~95% coverage; a 4.6-point change is found
    no_change = pooled_paired_comparison([(one[0][0], one[0][0])] * 3)
    assert no_change["delta"] == 0.0 and no_change["p_value"] == 1.0
    with pytest.raises(ValueError, match="same problems"):
        pooled_paired_comparison([(one[0][0], one[0][1][:-1])])
    with pytest.raises(ValueError, match="at least one seed"):
        pooled_paired_comparison([])


def test_heldout_set_is_fixed_stratified_and_never_trained_on():
    ps = heldout_problems(384)
    assert [p.difficulty for p in ps[:6]] == [1, 2, 3, 1, 2, 3]
    assert {d: sum(p.difficulty == d for p in ps) for d in (1, 2, 3)} == {1: 128, 2: 128, 3: 128}
    assert len({p.question for p in ps}) == 384 and all(is_heldout(p.question) for p in ps)
    assert [p.id for p in heldout_problems(12)] == [p.id for p in ps[:12]]  # prefixes agree
    # training draws from the other partition, whatever its seed; unfiltered draws do collide
    held = {p.question for p in ps}
    for seed in (0, 1, 7, 10_000):
        train = training_problems(3000, seed=seed, difficulty=(1, 3))
        assert len(train) == 3000 and not held & {p.question for p in train}
    raw = generate_problems(3000, seed=0, difficulty=1)
    assert any(is_heldout(p.question) for p in raw)  # the filter has work to do
