"""Reward-weight allocators on synthetic reward streams (no model needed)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from deepsynapse.checkpoint import load_tree, save_tree
from deepsynapse.control.knobs import Knobs
from deepsynapse.rewards.allocators import (
    MirrorDescentAllocator,
    NeuralAllocator,
    PhaseAllocator,
    StaticAllocator,
    build_allocator,
)

G, B = 4, 4


def knobs(**weights: float) -> Knobs:
    return Knobs(temperature=1.0, beta=0.0, reward_weights=dict(weights), max_new_tokens=8)


def closed_loop(
    alloc, steps: int, seed: int = 0, start: int = 0, with_batches: bool = True, sign: float = 1.0
):
    """Accuracy rises with the weight share of 'helpful' (falls if ``sign`` < 0), whose
    scores track correctness; 'noise' is unrelated to it. Returns the allocator's (mean)
    weights and events per step."""
    rng = random.Random(seed)
    k = knobs(other=7.0)
    weights, events = [], []
    for t in range(start, start + steps):
        alloc.apply(k)
        assert k.reward_weights["other"] == 7.0  # keys it does not own stay untouched
        share = k.reward_weights["helpful"] / (
            k.reward_weights["helpful"] + k.reward_weights["noise"]
        )
        p = 0.5 + sign * 0.3 * (2 * share - 1)
        correct = [float(rng.random() < p) for _ in range(G * B)]
        helpful = [c + rng.gauss(0, 0.3) for c in correct]
        noise = [rng.gauss(0.5, 0.3) for _ in correct]
        if with_batches:
            alloc.observe_batch({"helpful": helpful, "noise": noise}, correct, G)
        metrics = {
            "rewards/helpful/mean": sum(helpful) / len(helpful),
            "rewards/noise/mean": sum(noise) / len(noise),
            "accuracy/train": p + rng.gauss(0, 0.01),
        }
        events.append(alloc.observe(t, metrics))
        weights.append(dict(alloc.shown))
    return weights, events


BASE = {"helpful": 1.0, "noise": 1.0}


def test_static_allocator_writes_base_weights_and_never_moves():
    a = build_allocator("static", ["a", "b"], {"a": 1.0, "b": 0.5, "c": 9.0})
    k = knobs(a=0.0, z=3.0)
    a.apply(k)
    assert k.reward_weights == {"a": 1.0, "b": 0.5, "z": 3.0}
    assert a.observe(0, {"rewards/a/mean": 1.0, "accuracy/train": 1.0}) == []
    assert isinstance(a, StaticAllocator)


def test_phase_allocator_follows_curriculum_phase_metric_and_set_phase():
    a = build_allocator(
        "phase",
        ["fmt", "correct"],
        {"fmt": 1.0, "correct": 1.0},
        phases=[{"fmt": 1.0, "correct": 0.1}, {"fmt": 0.3}, {"fmt": 0.0, "correct": 2.0}],
    )
    assert a.weights == {"fmt": 1.0, "correct": 0.1}
    assert a.observe(0, {"curriculum/phase": 0}) == []
    [ev] = a.observe(1, {"curriculum/phase": 1.0})
    assert a.weights == {"fmt": 0.3, "correct": 1.0}  # missing objective keeps its base weight
    assert ev.kind == "reward_weights" and ev.evidence["phase"] == 1
    assert ev.evidence["previous_phase"] == 0 and ev.evidence["new"] == a.weights
    a.set_phase(7)  # beyond the last table: the last one applies
    assert a.weights == {"fmt": 0.0, "correct": 2.0}
    b = PhaseAllocator(["x"], {"x": 1.0}, phases={1: {"x": 0.5}, 3: {"x": 2.0}})
    b.set_phase(2)
    assert b.weights == {"x": 0.5}
    with pytest.raises(ValueError, match="unknown objectives"):
        PhaseAllocator(["x"], {"x": 1.0}, phases=[{"y": 1.0}])


@pytest.mark.parametrize("name", ["mirror", "neural"])
def test_correlated_objective_gains_weight(name):
    a = build_allocator(name, ["helpful", "noise"], BASE)
    weights, events = closed_loop(a, 150)
    assert weights[0]["helpful"] <= 1.3
    assert weights[-1]["helpful"] > 1.5 > 0.5 > weights[-1]["noise"]
    moved = [e for step in events for e in step]
    assert moved and moved[0].kind == "reward_weights"
    ev = moved[0].evidence
    assert ev["allocator"] == name and set(ev["old"]) == set(ev["new"]) == {"helpful", "noise"}
    assert abs(ev["new"]["helpful"] - ev["old"]["helpful"]) > 0.05
    if name == "mirror":
        assert ev["usefulness"]["helpful"] > 0.5 > abs(ev["usefulness"]["noise"])
    else:
        assert set(ev["features"]["helpful"]) == {
            "running_mean",
            "trend",
            "variance",
            "correctness_corr",
        }


def test_neural_follows_the_return_not_the_correlation():
    """If weighting 'helpful' *hurts* accuracy, REINFORCE moves weight away from it, even
    though its scores still correlate with correctness: the network learns from outcomes."""
    a = NeuralAllocator(["helpful", "noise"], BASE, seed=0)
    weights, _ = closed_loop(a, 150, sign=-1.0)
    assert weights[-1]["helpful"] < 0.5 < 1.5 < weights[-1]["noise"]


def test_mirror_uses_step_means_when_no_batches_arrive():
    a = MirrorDescentAllocator(["helpful", "noise"], BASE)
    weights, _ = closed_loop(a, 60, with_batches=False)
    assert weights[-1]["helpful"] > weights[-1]["noise"]


def test_mirror_stalled_objective_loses_weight():
    """Design: an objective that stalls (no variance left) stops earning weight and decays."""
    a = MirrorDescentAllocator(["correctness", "format"], {"correctness": 1.0, "format": 1.0})
    rng = random.Random(0)
    trace = []
    for t in range(140):
        correct = [float(rng.random() < 0.5) for _ in range(G * B)]
        if t < 40:  # format still being learned: valid completions are more often right
            fmt = [min(1.0, 0.5 * c + rng.random() * 0.6) for c in correct]
        else:  # saturated: every completion is valid, nothing to learn from it
            fmt = [1.0] * len(correct)
        a.observe_batch({"correctness": correct, "format": fmt}, correct, G)
        a.observe(t, {"rewards/format/mean": sum(fmt) / len(fmt), "accuracy/train": 0.5})
        trace.append(a.weights["format"])
    peak = trace[39]
    assert trace[-1] < peak - 0.1
    assert trace[-1] < 0.5
    assert a.weights["correctness"] > 1.5


@pytest.mark.parametrize("name", ["mirror", "neural"])
def test_weights_stay_on_the_scaled_simplex_with_floor(name):
    comps = ["a", "b", "c"]
    a = build_allocator(name, comps, {"a": 2.0, "b": 0.5, "c": 0.5}, floor=0.1, total=3.0)
    rng = random.Random(1)
    for t in range(120):
        metrics = {f"rewards/{c}/mean": rng.gauss(0, 5) for c in comps}
        metrics["rewards/b/mean"] = math.nan if t % 3 == 0 else metrics["rewards/b/mean"]
        if t % 5:
            metrics["accuracy/train"] = rng.random()
        correct = [float(rng.random() < 0.3) for _ in range(8)]
        a.observe_batch(
            {"a": correct, "b": [None] * 8, "c": [rng.random() for _ in range(8)]}, correct, 4
        )
        a.observe(t, metrics)
        for w in (a.weights, a.shown):
            assert sum(w.values()) == pytest.approx(3.0, abs=1e-9)
            assert min(w.values()) >= 0.1 - 1e-12
    with pytest.raises(ValueError, match="floor"):
        build_allocator(name, comps, {"a": 1.0, "b": 1.0, "c": 1.0}, floor=1.0)


def test_neural_is_deterministic_given_seed():
    runs = [
        closed_loop(NeuralAllocator(["helpful", "noise"], BASE, seed=s), 30)[0] for s in (3, 3, 4)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_neural_state_round_trip_through_checkpoint_continues_identically(tmp_path):
    a = NeuralAllocator(["helpful", "noise"], BASE, seed=5)
    closed_loop(a, 25)
    save_tree(a.state_dict(), tmp_path, "alloc")
    b = NeuralAllocator(["helpful", "noise"], BASE, seed=999)  # seed overwritten by the state
    b.load_state_dict(load_tree(tmp_path, "alloc"))
    wa, ea = closed_loop(a, 20, seed=7, start=25)
    wb, eb = closed_loop(b, 20, seed=7, start=25)
    assert wa == wb
    assert [[e.evidence for e in s] for s in ea] == [[e.evidence for e in s] for s in eb]
    for pa, pb in zip(a.net.parameters(), b.net.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_mirror_state_is_json_and_continues_identically():
    a = MirrorDescentAllocator(["helpful", "noise"], BASE)
    closed_loop(a, 15)
    b = MirrorDescentAllocator(["helpful", "noise"], BASE)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert closed_loop(a, 10, seed=2, start=15)[0] == closed_loop(b, 10, seed=2, start=15)[0]


def test_build_allocator_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown allocator 'nerual'"):
        build_allocator("nerual", ["a"], {"a": 1.0})
    with pytest.raises(ValueError, match="did you mean 'exploration_std'"):
        build_allocator("neural", ["a"], {"a": 1.0}, exploration_sd=0.1)
    with pytest.raises(ValueError, match="no base weight"):
        build_allocator("mirror", ["a", "b"], {"a": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        build_allocator("mirror", ["a", "b"], {"a": 1.0, "b": -1.0})


@pytest.mark.parametrize("name", ["mirror", "neural"])
def test_adaptive_allocators_start_exactly_at_the_base_weights(name):
    base = {"a": 1.0, "b": 0.5, "c": 0.25}
    a = build_allocator(name, list(base), base, floor=0.05)
    assert a.weights == pytest.approx(base) and a.shown == pytest.approx(base)
