"""KL-temperature co-regulation on synthetic KL streams."""

from __future__ import annotations

import json
import math

import pytest

from deepsynapse.control.build import build_controllers
from deepsynapse.control.curriculum import PhaseCurriculum, PhaseSpec
from deepsynapse.control.kl_temperature import (
    KLTemperatureConfig,
    KLTemperatureController,
    cosine_decay,
)
from deepsynapse.control.knobs import Knobs

TARGET = 0.02


def knobs() -> Knobs:
    return Knobs(temperature=1.0, beta=0.04, reward_weights={"correctness": 1.0}, max_new_tokens=8)


def controller(total_steps=1000, phases=None, **kw) -> KLTemperatureController:
    cfg = KLTemperatureConfig(
        **{"enabled": True, "t_max": 1.0, "t_min": 0.6, "kl_target": TARGET,
           "temperature_step": 0.1, **kw}
    )  # fmt: skip
    return KLTemperatureController(
        cfg, base_beta=0.04, base_temperature=1.0, total_steps=total_steps, phases=phases
    )


def drive(ctl, kls, start=0, curriculum=None):
    """One step per KL value, as the trainer runs it: apply, (train), observe."""
    rows = []
    for i, kl in enumerate(kls):
        k = knobs()
        if curriculum is not None:
            curriculum.apply(k)
        ctl.apply(k)
        metrics = {} if kl is None else {"kl/mean": kl}
        events = curriculum.observe(start + i, metrics) if curriculum is not None else []
        events += ctl.observe(start + i, metrics)
        rows.append((k.temperature, k.beta, [e.kind for e in events], events))
    return rows


def test_cosine_start_middle_end():
    assert cosine_decay(0.0, 1.0, 0.6) == 1.0
    assert cosine_decay(0.5, 1.0, 0.6) == pytest.approx(0.8)
    assert cosine_decay(1.0, 1.0, 0.6) == pytest.approx(0.6)
    ctl = controller(total_steps=101)
    temps = [row[0] for row in drive(ctl, [TARGET] * 101)]  # KL on target: schedule only
    assert temps[0] == 1.0 and temps[50] == pytest.approx(0.8) and temps[100] == pytest.approx(0.6)
    assert all(a >= b for a, b in zip(temps, temps[1:], strict=False))


def test_coupled_overshoot_lowers_temperature_first_then_raises_beta():
    rows = drive(controller(schedule="constant", couple=True), [2 * TARGET] * 10)
    temps, betas, kinds = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    # four coupled steps take the temperature from 1.0 to the floor 0.6, beta untouched
    assert kinds[:4] == [["temperature_lowered"]] * 4
    assert temps[:5] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    assert betas[:5] == [0.04] * 5
    # then beta rises by (1 + K_p * 0.2) per step, the error being clipped to 0.2
    assert kinds[4:] == [["beta_raised"]] * 6
    assert betas[5] == pytest.approx(0.04 * 1.02) and betas[9] == pytest.approx(0.04 * 1.02**5)
    ev = rows[0][3][0]
    assert ev.evidence["kl"] == 2 * TARGET and ev.evidence["target"] == TARGET
    assert (ev.evidence["old"], ev.evidence["new"]) == pytest.approx((1.0, 0.9))


def test_coupled_undershoot_restores_temperature_first_then_lowers_beta():
    ctl = controller(schedule="constant", couple=True)
    drive(ctl, [2 * TARGET] * 2)  # temperature cut to 0.8
    rows = drive(ctl, [0.5 * TARGET] * 4, start=2)
    assert [r[2] for r in rows] == [["temperature_raised"]] * 2 + [["beta_lowered"]] * 2
    assert [r[0] for r in rows] == pytest.approx([0.8, 0.9, 1.0, 1.0])
    assert rows[3][1] == pytest.approx(0.04 * 0.98)


def test_by_default_beta_alone_answers_the_kl_and_the_temperature_keeps_its_schedule():
    """A temperature cut raises the KL the trainer reads (log-probs at the sampling
    temperature), so by default only beta acts on it, both ways."""
    rows = drive(controller(schedule="constant"), [2 * TARGET] * 5 + [0.5 * TARGET] * 5)
    assert [r[0] for r in rows] == [1.0] * 10
    assert [r[2] for r in rows] == [["beta_raised"]] * 5 + [["beta_lowered"]] * 5
    assert rows[5][1] == pytest.approx(0.04 * 1.02**5)


def test_within_tolerance_nothing_changes():
    rows = drive(controller(schedule="constant"), [TARGET * 1.05, TARGET * 0.95] * 5)
    assert all(r[2] == [] for r in rows) and {r[1] for r in rows} == {0.04}


def test_beta_bounds_are_respected_and_quiet_at_the_bound():
    ctl = controller(schedule="constant", beta_max=0.05, k_p=1.0)
    rows = drive(ctl, [10 * TARGET] * 20)
    betas = [r[1] for r in rows]
    assert max(betas) == 0.05 and all(b <= 0.05 for b in betas)
    assert rows[-1][2] == []  # pinned at the bound: no further events
    ctl = controller(schedule="constant", beta_min=0.03, k_p=1.0, couple=False)
    betas = [r[1] for r in drive(ctl, [0.0] * 20)]
    assert min(betas) == 0.03 and all(b >= 0.03 for b in betas)


def test_adaptive_beta_off_leaves_beta_to_others():
    rows = drive(
        controller(schedule="constant", adaptive_beta=False, couple=True), [5 * TARGET] * 8
    )
    assert all(r[1] == 0.04 for r in rows)  # knobs() default, never written
    assert [r[0] for r in rows][-1] == pytest.approx(0.6)


def test_missing_kl_is_reported_once_and_holds():
    rows = drive(controller(schedule="constant"), [None, None, float("nan")])
    assert [r[2] for r in rows] == [["kl_metric_missing"], [], []]
    assert {(r[0], r[1]) for r in rows} == {(1.0, 0.04)}


def test_phase_schedule_restarts_in_each_phase_and_takes_phase_beta_and_target():
    phases = [
        PhaseSpec(name="a", temperature=[1.2, 0.8], max_steps=5, beta=0.01),
        PhaseSpec(name="b", temperature=[0.9, 0.5], max_steps=3, beta=0.1, kl_target=0.05),
        PhaseSpec(name="c"),
    ]
    base = Knobs(temperature=1.0, beta=0.04, reward_weights={}, max_new_tokens=8)
    cur = PhaseCurriculum(phases, base, total_steps=20)
    ctl = controller(total_steps=20, phases=cur, schedule="phase")
    rows = drive(ctl, [TARGET] * 5 + [0.05] * 3 + [TARGET], curriculum=cur)
    temps = [r[0] for r in rows]
    assert temps[0] == 1.2 and temps[2] == pytest.approx(1.0) and temps[4] == pytest.approx(0.8)
    assert temps[5] == 0.9 and temps[7] == pytest.approx(0.5)
    assert [r[1] for r in rows][:5] == [0.01] * 5 and rows[5][1] == 0.1
    reset = [e for r in rows for e in r[3] if e.kind == "kl_phase_reset"]
    assert [e.evidence["phase"] for e in reset] == ["b", "c"]
    assert reset[0].evidence["new_target"] == 0.05 and ctl.target == TARGET  # c has none
    assert temps[8] == pytest.approx(1.0)  # phase c: no range -> [t_max, t_min] from its start


def test_phase_schedule_needs_the_curriculum():
    with pytest.raises(ValueError, match="curriculum"):
        controller(schedule="phase")


def test_config_validation():
    with pytest.raises(ValueError, match="t_max >= t_min"):
        KLTemperatureConfig(t_max=0.5, t_min=0.9)
    with pytest.raises(ValueError, match="beta_max >= beta_min"):
        KLTemperatureConfig(beta_min=0.5, beta_max=0.1)
    with pytest.raises(ValueError, match="kl_target"):
        KLTemperatureConfig(kl_target=0.0)


def test_state_round_trip_continues_identically():
    stream = [2 * TARGET] * 6 + [0.3 * TARGET] * 3 + [TARGET * 1.5] * 6
    a = controller(total_steps=30, couple=True)  # the cut is state too
    drive(a, stream[:7])
    b = controller(total_steps=30, couple=True)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    ra, rb = drive(a, stream[7:], start=7), drive(b, stream[7:], start=7)
    assert [r[:3] for r in ra] == [r[:3] for r in rb]
    assert [e.evidence for r in ra for e in r[3]] == [e.evidence for r in rb for e in r[3]]
    assert a.state_dict() == b.state_dict()
    assert all(math.isfinite(r[0]) and 0.6 <= r[0] <= 1.0 for r in ra)


def test_build_wires_the_phase_schedule_to_the_curriculum_in_order():
    section = {
        "curriculum": {"enabled": True},
        "kl_temperature": {"enabled": True, "schedule": "phase"},
        "data_curriculum": {"enabled": False},
    }
    cur, kl = build_controllers(section, base=knobs(), total_steps=50)
    assert (cur.name, kl.name) == ("curriculum", "kl_temperature") and kl.phases is cur
    with pytest.raises(ValueError, match="needs the curriculum"):
        build_controllers(
            {"kl_temperature": {"enabled": True, "schedule": "phase"}}, base=knobs(), total_steps=5
        )


def test_kl_as_a_reward_objective_keeps_the_loss_beta_at_zero():
    """rewards.kl_mode=reward: the KL is already an objective of the fused reward, so the
    loss's beta must stay 0, whatever beta_min, a phase's beta or the KL stream say (the
    controller used to write max(beta, beta_min) > 0: KL counted twice)."""
    phases = [PhaseSpec(name="a", max_steps=4, beta=0.05), PhaseSpec(name="b", beta=0.2)]
    base = Knobs(temperature=1.0, beta=0.0, reward_weights={}, max_new_tokens=8)
    cur = PhaseCurriculum(phases, base, total_steps=20)
    cfg = KLTemperatureConfig(
        enabled=True,
        schedule="constant",
        kl_target=TARGET,
        temperature_step=0.1,
        beta_min=1e-3,
        couple=True,
    )
    ctl = KLTemperatureController(
        cfg, base_beta=0.0, base_temperature=1.0, total_steps=20, phases=cur, kl_in_loss=False
    )
    rows = drive(ctl, [5 * TARGET] * 8 + [0.1 * TARGET] * 8, curriculum=cur)
    assert [r[1] for r in rows] == [0.0] * 16  # the curriculum's 0.05 / 0.2 overwritten too
    kinds = [k for r in rows for k in r[2]]
    assert "temperature_lowered" in kinds and "temperature_raised" in kinds  # it still acts
    assert not {"beta_raised", "beta_lowered"} & set(kinds)
    reset = [e for r in rows for e in r[3] if e.kind == "kl_phase_reset"]
    assert reset and all(e.evidence["new_beta"] == 0.0 for e in reset)
    assert ctl.beta == 0.0 and ctl.state_dict()["beta"] == 0.0
    # with KL in the loss, the same controller does move beta (unchanged behaviour)
    again = KLTemperatureController(
        cfg, base_beta=0.04, base_temperature=1.0, total_steps=20, kl_in_loss=True
    )
    assert drive(again, [5 * TARGET] * 8)[-1][1] > 0.04
