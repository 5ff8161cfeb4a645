"""CHORD-style decaying SFT weight and the ReLIFT selector of hard solved problems."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch

from deepsynapse.control import sft_mixing as sft_module
from deepsynapse.control.build import build_controllers
from deepsynapse.control.knobs import Knobs
from deepsynapse.control.sft_mixing import (
    SFTMixing,
    SFTMixingConfig,
    SolvedRecord,
    chord_phi_weights,
    mixing_weight,
    select_hard_solved,
)


def test_weight_decays_from_mu0_to_exactly_zero():
    lin = [mixing_weight(s, 0.4, 10, "linear") for s in range(12)]
    assert lin[0] == 0.4 and lin[5] == pytest.approx(0.2) and lin[10:] == [0.0, 0.0]
    cos = [mixing_weight(s, 0.4, 10, "cosine") for s in range(12)]
    assert cos[0] == 0.4 and cos[5] == pytest.approx(0.2) and cos[10:] == [0.0, 0.0]
    assert cos[2] > lin[2] and cos[8] < lin[8]  # cosine lingers early, drops late
    assert all(a >= b for a, b in zip(cos, cos[1:], strict=False))
    with pytest.raises(ValueError, match="schedule"):
        mixing_weight(0, 0.4, 10, "step")


def knobs() -> Knobs:
    return Knobs(temperature=1.0, beta=0.0, reward_weights={}, max_new_tokens=8)


def drive(ctl: SFTMixing, steps, start=0):
    out = []
    for step in range(start, start + steps):
        k = knobs()
        ctl.apply(k)
        out.append((k.sft_weight, ctl.observe(step, {"sft/loss": 1.5})))
    return out


def test_controller_writes_the_knob_and_says_when_it_is_off():
    ctl = SFTMixing(SFTMixingConfig(enabled=True, mu0=0.5, decay_steps=4, schedule="linear"))
    rows = drive(ctl, 7)
    assert [w for w, _ in rows] == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0, 0.0, 0.0])
    events = [(i, e) for i, (_, evs) in enumerate(rows) for e in evs]
    assert [(i, e.kind) for i, e in events] == [(3, "sft_mixing_off")]
    assert events[0][1].evidence["last_sft_loss"] == 1.5


def test_a_longer_plan_after_the_decay_ended_does_not_bring_sft_back():
    """A time budget re-plans as it measures the pace: the decay stretches to a longer run
    while it lasts, but SFT switched off stays off."""
    ctl = SFTMixing(
        SFTMixingConfig(enabled=True, mu0=0.4, decay_share=0.5, schedule="linear"), total_steps=4
    )
    ctl.set_total_steps(8)  # re-planned while decaying: 4 steps of decay instead of 2
    assert [w for w, _ in drive(ctl, 5)] == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    ctl.set_total_steps(40)  # re-planned after it ended
    assert [w for w, _ in drive(ctl, 3, start=5)] == [0.0, 0.0, 0.0]


def test_state_round_trip_continues_identically():
    cfg = SFTMixingConfig(enabled=True, mu0=0.3, decay_steps=6)
    a = SFTMixing(cfg)
    drive(a, 3)
    b = SFTMixing(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    ra, rb = drive(a, 5, start=3), drive(b, 5, start=3)
    assert [(w, [e.evidence for e in evs]) for w, evs in ra] == [
        (w, [e.evidence for e in evs]) for w, evs in rb
    ]


def test_chord_phi_weights_damp_certain_and_alien_tokens():
    logp = torch.log(torch.tensor([[1.0, 0.5, 1e-6]], requires_grad=True))
    w = chord_phi_weights(logp)
    assert w.tolist()[0] == pytest.approx([0.0, 0.25, 1e-6], abs=1e-7)
    assert not w.requires_grad


def test_select_hard_solved_picks_the_hardest_with_a_verified_solution():
    records = [
        SolvedRecord("easy", 0.9, "sol-easy", step=1),
        SolvedRecord("hard", 0.0, None, step=1),  # never solved: nothing to imitate
        {"problem_id": "mid", "solve_rate": 0.25, "completion": "sol-mid", "step": 2},
        ("tough", 0.5, "old-sol", 1),
        ("tough", 0.1, None, 3),  # newest solve rate wins; the verified solution is kept
        ("tie-b", 0.25, "b"),
        ("tie-a", 0.25, "a"),
    ]
    picked = select_hard_solved(records, 3, max_solve_rate=0.5)
    assert [r.problem_id for r in picked] == ["tough", "mid", "tie-a"]
    assert picked[0].solve_rate == 0.1 and picked[0].verified_completion == "old-sol"
    assert [r.problem_id for r in select_hard_solved(records, 10)][-1] == "easy"
    assert select_hard_solved(records, 0) == []
    assert "easy" not in {r.problem_id for r in select_hard_solved(records, 10, max_solve_rate=0.5)}
    with pytest.raises(TypeError, match="memory record"):
        select_hard_solved([42], 1)


def test_config_validation_and_build():
    with pytest.raises(ValueError, match="mu0"):
        SFTMixingConfig(mu0=1.5)
    with pytest.raises(ValueError, match="decay_steps"):
        SFTMixingConfig(decay_steps=0)
    with pytest.raises(ValueError, match="unknown key 'control.sft_mixing.mu'"):
        build_controllers({"sft_mixing": {"mu": 0.1}}, base=knobs(), total_steps=5)
    (ctl,) = build_controllers(
        {"sft_mixing": {"enabled": True, "mu0": 0.2, "decay_steps": 3}}, base=knobs(), total_steps=5
    )
    assert isinstance(ctl, SFTMixing) and math.isclose(ctl.weight(0), 0.2)


def test_module_doctests():
    assert doctest.testmod(sft_module).failed == 0
