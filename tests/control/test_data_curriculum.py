"""Data curriculum: UCB over difficulty buckets, resting, range, determinism, state."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from deepsynapse.control.data_curriculum import DataCurriculum, DataCurriculumConfig
from deepsynapse.control.knobs import Knobs
from deepsynapse.data.problems import Problem
from deepsynapse.data.synthetic import generate_problems


def pool(per_bucket=10, difficulties=(1, 2, 3)) -> list[Problem]:
    return [
        Problem(f"d{d}-{i}", f"question {d}/{i}", "1", "", d, "synthetic")
        for d in difficulties
        for i in range(per_bucket)
    ]


def cfg(**kw) -> DataCurriculumConfig:
    return DataCurriculumConfig(**{"enabled": True, "rest_steps": 0, **kw})


def feed(dc: DataCurriculum, problems, adv_of, rate_of=lambda p: 0.5):
    dc.observe_groups(
        [p.id for p in problems], [adv_of(p) for p in problems], [rate_of(p) for p in problems]
    )


def test_unexplored_buckets_come_first_and_scores_follow_ucb():
    dc = DataCurriculum(pool(), cfg(exploration=0.5), seed=1)
    first = dc.sample(0, 3, rng_seed=0)
    assert sorted(p.difficulty for p in first) == [1, 2, 3]
    assert len({p.id for p in first}) == 3
    feed(dc, first, lambda p: 0.1 * p.difficulty)
    feed(dc, [first[0]], lambda p: 0.3)
    scores = dc.scores()
    total = 4
    b = first[0].difficulty
    assert scores[b] == pytest.approx((0.1 * b + 0.3) / 2 + 0.5 * math.sqrt(math.log(total) / 2))
    other = first[1].difficulty
    assert scores[other] == pytest.approx(0.1 * other + 0.5 * math.sqrt(math.log(total) / 1))


def test_bucket_with_higher_advantage_is_sampled_more():
    dc = DataCurriculum(pool(per_bucket=30), cfg(exploration=0.2, temperature=0.1), seed=0)
    counts: Counter[int] = Counter()
    for step in range(60):
        batch = dc.sample(step, 8, rng_seed=7)
        feed(dc, batch, lambda p: 0.8 if p.difficulty == 2 else 0.05)
        dc.observe(step, {})
        if step >= 20:
            counts.update(p.difficulty for p in batch)
    assert counts[2] > 2 * max(counts[1], counts[3])
    assert dc.metrics()["data/bucket_2/p"] > 0.5
    assert dc.focus == 2


def test_rested_problems_are_skipped_for_rest_steps():
    problems = pool(per_bucket=3, difficulties=(1,))
    p0, p1, p2 = problems
    dc = DataCurriculum(problems, cfg(rest_steps=3), seed=0)
    assert {p.id for p in dc.sample(0, 3, rng_seed=0)} == {p0.id, p1.id, p2.id}
    rates = {p0.id: 1.0, p1.id: 0.0, p2.id: 0.5}
    feed(dc, problems, lambda p: 0.0, lambda p: rates[p.id])
    events = dc.observe(0, {})
    rested = next(e for e in events if e.kind == "problems_rested")
    assert rested.evidence["all_solved"] == [p0.id] and rested.evidence["all_failed"] == [p1.id]
    assert rested.evidence["until_step"] == 4
    for step in (1, 2, 3):
        assert [p.id for p in dc.sample(step, 1, rng_seed=step)] == [p2.id]
        assert dc.is_rested(p0.id, step) and dc.is_rested(p1.id, step)
    # asked for more than the unrested pool holds: rest is waived, still no duplicates
    assert sorted(p.id for p in dc.sample(3, 3, rng_seed=3)) == sorted(rates)
    assert not dc.is_rested(p0.id, 4)
    dc.observe(3, {})
    assert dc.rested == {}


def test_difficulty_range_from_the_knobs_is_respected():
    dc = DataCurriculum(pool(difficulties=(1, 2, 3, 4)), cfg(), seed=0)
    k = Knobs(temperature=1.0, beta=0.0, reward_weights={}, max_new_tokens=8, difficulty=(2, 3))
    dc.apply(k)
    for step in range(10):
        batch = dc.sample(step, 4, rng_seed=0)
        assert {p.difficulty for p in batch} <= {2, 3}
        feed(dc, batch, lambda p: 0.5)
    k.difficulty = (6, 9)  # nothing that hard: the nearest bucket, said once
    dc.apply(k)
    assert {p.difficulty for p in dc.sample(10, 4, rng_seed=0)} == {4}
    dc.sample(10, 4, rng_seed=1)
    events = dc.observe(10, {})
    assert [e.kind for e in events].count("difficulty_fallback") == 1
    assert events[0].evidence["buckets"] == [4]


def test_max_bucket_and_real_synthetic_problems():
    problems = generate_problems(40, seed=3, difficulty=(1, 5))
    dc = DataCurriculum(problems, cfg(max_bucket=3), seed=0)
    assert set(dc.buckets) == {1, 2, 3}
    assert sum(len(v) for v in dc.buckets.values()) == 40


def run(dc: DataCurriculum, steps, start=0, n=5):
    out = []
    for step in range(start, start + steps):
        batch = dc.sample(step, n, rng_seed=11)
        out.append([p.id for p in batch])
        feed(
            dc,
            batch,
            lambda p: (sum(map(ord, p.id)) % 7) / 7,
            lambda p: [0.0, 0.5, 1.0][int(p.id.split("-")[1]) % 3],
        )
        dc.observe(step, {})
    return out


def test_deterministic_and_state_round_trip_continues_identically():
    a = DataCurriculum(pool(), cfg(rest_steps=2), seed=5)
    b = DataCurriculum(pool(), cfg(rest_steps=2), seed=5)
    assert run(a, 6) == run(b, 6)
    c = DataCurriculum(pool(), cfg(rest_steps=2), seed=5)
    c.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert run(a, 6, start=6) == run(c, 6, start=6)
    assert a.state_dict() == c.state_dict()
    other = DataCurriculum(pool(per_bucket=4), cfg(), seed=5)
    with pytest.raises(ValueError, match="buckets"):
        other.load_state_dict(a.state_dict())


def test_bad_inputs():
    with pytest.raises(ValueError, match="duplicate"):
        DataCurriculum(pool()[:2] + pool()[:1], cfg())
    dc = DataCurriculum(pool(), cfg())
    with pytest.raises(ValueError, match="unknown problem id"):
        dc.observe_groups(["nope"], [0.1], [0.5])
    with pytest.raises(ValueError, match="temperature"):
        DataCurriculumConfig(temperature=0.0)
