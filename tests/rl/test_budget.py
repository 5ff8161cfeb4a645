"""The time budget's plans, unit by unit (the trainer-level test lives in test_train_e2e)."""

from __future__ import annotations

import pytest

from deepsynapse.rl.budget import PACE_WINDOW, REPLAN_EVERY, TimeBudget, parse_duration


def test_durations_parse_and_bad_ones_name_the_key():
    assert parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    assert parse_duration("2m30s") == 150 and parse_duration(12) == 12.0
    for bad in ("ten minutes", "10x", "-5", "5m10", True):
        with pytest.raises(ValueError, match="train.time_budget"):
            parse_duration(bad)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr("deepsynapse.rl.budget.time.monotonic", c)
    return c


def test_plans_fit_the_budget_and_never_exceed_the_configuration(clock):
    b = TimeBudget(600, sft_share=0.4)
    clock.now += 60  # the evaluation before training
    b.eval_seconds = 60
    clock.now += 5  # the first warm-up step
    # left: 600 - 65 - 2 * 60 = 415; 40% of (415 + 5) = 168 s -> 33 warm-up steps of 5 s
    assert b.plan_sft(configured=100, done=1, step_seconds=5, evals_to_come=2) == 33
    assert b.plan_sft(configured=20, done=1, step_seconds=5, evals_to_come=2) == 20
    clock.now += 19 * 5 + 40  # the rest of the warm-up, its evaluation, a GRPO step of 40 s
    left = 600 - (clock.now - 1000) - 60  # the final evaluation still to come
    assert b.plan_grpo(configured=50, done=1, step_seconds=40, evals_to_come=1) == 1 + int(
        left // 40
    )
    assert b.plan_grpo(configured=3, done=1, step_seconds=40, evals_to_come=1) == 3
    b.observe_step(80)  # a slow recent step: one more only if 80 s still fit
    clock.now = 1000 + 600 - 60 - 79
    assert not b.another_step_fits(evals_to_come=1)
    clock.now -= 2
    assert b.another_step_fits(evals_to_come=1)


def test_elapsed_time_survives_a_resume(clock):
    b = TimeBudget(3600)
    clock.now += 1200
    b.eval_seconds, b.sft_steps = 30.0, 12
    state = b.state_dict()
    clock.now += 5000  # the process was stopped for a while: that time is not the run's
    again = TimeBudget(3600)
    again.load_state_dict(state)
    assert again.elapsed() == pytest.approx(1200) and again.sft_steps == 12
    assert again.left(evals_to_come=1) == pytest.approx(3600 - 1200 - 30)


def test_a_budget_smaller_than_one_step_still_runs_the_measured_steps():
    b = TimeBudget(1)
    assert b.plan_sft(configured=30, done=2, step_seconds=50, evals_to_come=0) == 2
    assert b.plan_grpo(configured=30, done=1, step_seconds=50, evals_to_come=0) == 1


def test_the_reserve_scales_to_the_trained_models_shorter_completions():
    b = TimeBudget(600)
    b.eval_seconds = 100.0  # the untrained model wrote to the 128-token limit
    b.expect_completions(mean_tokens=40, max_new_tokens=128)
    assert b.eval_seconds == pytest.approx(100 * 1.5 * 40 / 128)
    b.expect_completions(mean_tokens=500, max_new_tokens=128)  # never more than measured
    assert b.eval_seconds == pytest.approx(100 * 1.5 * 40 / 128)


def test_evaluations_run_off_the_clock_only_when_asked(clock):
    counted, free = TimeBudget(600), TimeBudget(600, count_evaluations=False)
    for b in (counted, free):
        b.eval_seconds = 50.0
        clock.now += 10  # training
        with b.evaluating():
            clock.now += 30
            with b.evaluating():  # a probe's held-out slice inside the probes
                clock.now += 20
        clock.now += 5  # training
    # the clock ran 65 s for each budget's block: counted sees all of it
    assert counted.elapsed() == pytest.approx(130) and counted.left(1) == pytest.approx(420)
    # free: only its 15 s of training (the 50 s of evaluation nested once, not twice)
    assert free.elapsed() == pytest.approx(130 - 50) and free.left(1) == pytest.approx(520)
    state = free.state_dict()
    again = TimeBudget(600, count_evaluations=False)
    again.load_state_dict(state)
    assert again.elapsed() == pytest.approx(80)


def test_the_plan_follows_the_measured_pace(clock):
    """One step's pace made the plan for the whole run: a slow second step left time unused,
    a fast one planned steps that never fit. Re-planned at the recent mean pace, the plan
    grows and shrinks with the steps, and the slowest step leaves the window."""
    b = TimeBudget(300, count_evaluations=False)
    clock.now += 20  # the second GRPO step, slow (a first phase, long completions)
    assert b.plan_grpo(configured=1000, done=2, step_seconds=20, evals_to_come=0) == 2 + 14
    assert not b.replan_due(done=2 + REPLAN_EVERY - 1)
    for _ in range(REPLAN_EVERY):  # then 5 s a step
        clock.now += 5
        b.observe_step(5)
    assert b.replan_due(done=2 + REPLAN_EVERY)
    # 260 s left at the mean of (20, 5, 5, 5, 5) = 8 s: 32 more
    assert b.replan_grpo(configured=1000, done=6, evals_to_come=0) == 6 + 32
    assert b.pace == pytest.approx(8.0) and b.slowest_step == 20
    for _ in range(PACE_WINDOW):
        clock.now += 5
        b.observe_step(5)
    assert b.slowest_step == 5  # the slow step has left the window
    assert b.replan_grpo(configured=1000, done=14, evals_to_come=0) == 14 + 220 // 5
    for _ in range(PACE_WINDOW):  # slower again: fewer steps than planned
        clock.now += 10
        b.observe_step(10)
    assert b.replan_grpo(configured=1000, done=22, evals_to_come=0) == 22 + 140 // 10
    assert b.replan_grpo(configured=25, done=22, evals_to_come=0) == 25  # never past the cap
    assert b.replan_due(done=25)  # the plan ran out: time may be left for more


def test_a_checkpoint_before_replanning_still_resumes(clock):
    old = {"elapsed": 100.0, "eval_seconds": 0.0, "grpo_steps": 40, "slowest_step": 12.0}
    b = TimeBudget(600)
    b.load_state_dict(old)
    assert b.grpo_steps == 40 and b.slowest_step == 12.0 and b.planned_at == 0
    again = TimeBudget(600)
    again.load_state_dict(b.state_dict())
    assert again.recent == [12.0]


def test_the_warm_up_is_planned_again_at_its_measured_pace(clock):
    """One slow second warm-up step (GSM8K's long solutions: 21.5 s against 10.5 on average)
    planned half the warm-up its share allowed; planned again at the recent mean, the warm-up
    grows to its share, never past the configured steps, and the pace survives a resume."""
    b = TimeBudget(1000, sft_share=0.3, count_evaluations=False)
    clock.now += 20
    # left 980: 30% of (2 x 20 + 980) = 306 s -> 15 steps of 20 s
    assert b.plan_sft(configured=1000, done=2, step_seconds=20, evals_to_come=0) == 15
    assert not b.sft_replan_due(done=2 + REPLAN_EVERY - 1)
    for _ in range(REPLAN_EVERY):
        clock.now += 5
        b.observe_sft_step(5)
    assert b.sft_replan_due(done=6) and b.sft_pace == pytest.approx(8.0)
    # left 960 at 8 s a step: 30% of (6 x 8 + 960) = 302.4 s -> 37 steps
    assert b.replan_sft(configured=1000, done=6, evals_to_come=0) == 37
    assert b.replan_sft(configured=20, done=6, evals_to_come=0) == 20
    again = TimeBudget(1000, sft_share=0.3, count_evaluations=False)
    again.load_state_dict(b.state_dict())
    assert (again.sft_pace, again.sft_planned_at, again.sft_steps) == (8.0, 6, 20)
    assert not again.replan_due(done=6)  # GRPO's plan is its own: not made yet
