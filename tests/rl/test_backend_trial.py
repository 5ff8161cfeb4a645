"""The rule ``rollout.backend=auto`` picks a CPU training run's sampler by (rl/backend_trial.py).

The trainer-level tests, where the samplers really take turns inside a run and the engine is
freed, need vLLM and live in tests/rollout/test_vllm_backend.py."""

from __future__ import annotations

import pytest

from deepsynapse.rl.backend_trial import TRIAL_ORDER, VLLM_MARGIN, BackendTrial, Turn


def turn(sampler: str, generate_s: float, drawn=100.0, rest_s=1.0, kept=100.0) -> Turn:
    return Turn(sampler, generate_s, drawn, rest_s, kept)


def run_trial(vllm_generate: float, ours_generate: float) -> BackendTrial:
    trial = BackendTrial()
    verdicts = []
    for _ in TRIAL_ORDER:
        sampler = trial.sampler()
        verdicts.append(
            trial.record(turn(sampler, vllm_generate if sampler == "vllm" else ours_generate))
        )
    assert verdicts[:-1] == [None] * (len(TRIAL_ORDER) - 1) and verdicts[-1] is not None
    return trial


def test_the_samplers_take_turns_then_the_pick_holds():
    trial = BackendTrial()
    seen = []
    for _ in range(len(TRIAL_ORDER) + 3):
        sampler = trial.sampler()
        seen.append(sampler)
        trial.record(turn(sampler, 2.0 if sampler == "vllm" else 3.0))
    assert seen == list(TRIAL_ORDER) + ["vllm"] * 3
    assert len(trial.turns) == len(TRIAL_ORDER)  # steps after the pick are not charged


def test_our_decoder_goes_first_so_its_turns_run_without_the_engine():
    """The engine's presence alone slowed the AMX Xeon's update: our decoder's turns are
    timed before it exists, and the engine is wanted only from vLLM's first turn on."""
    trial = BackendTrial()
    wanted = []
    for sampler in TRIAL_ORDER:
        wanted.append(trial.needs_engine())
        trial.record(turn(sampler, 1.0 if sampler == "vllm" else 3.0))
    assert TRIAL_ORDER[:2] == ("ours", "ours") and wanted == [False, False, True, True]
    assert trial.choice == "vllm" and trial.needs_engine()
    assert "our decoder samples the first 2 GRPO steps" in BackendTrial.plan()


def test_vllm_is_kept_only_when_faster_by_the_margin():
    """The engine holds ~2 GB more, so a near tie goes to our decoder (steps: 1 s + generate)."""
    assert run_trial(1.0, 2.0 * VLLM_MARGIN * 1.01 - 1.0).choice == "vllm"
    assert run_trial(1.0, 2.0 * VLLM_MARGIN * 0.99 - 1.0).choice == "ours"
    assert run_trial(1.5, 1.0).choice == "ours"


def test_each_sampler_is_priced_at_the_trials_mean_workload():
    """A sampler whose turns drew longer completions, or an extra round of them, is not
    blamed for it: generation is charged per drawn token, the rest per kept token."""
    trial = BackendTrial()
    trial.record(turn("vllm", 4.0, drawn=400.0, rest_s=2.0, kept=200.0))  # an extra round
    trial.record(turn("ours", 3.0, drawn=200.0, rest_s=1.0, kept=100.0))
    trial.record(turn("vllm", 2.0, drawn=200.0, rest_s=2.0, kept=200.0))
    trial.record(turn("ours", 3.0, drawn=200.0, rest_s=1.0, kept=100.0))
    # mean workload: 250 drawn, 150 kept; vLLM 0.01 s/drawn, 0.01 s/kept; ours 0.015, 0.01
    assert trial.step_seconds() == pytest.approx({"vllm": 4.0, "ours": 5.25})
    assert trial.choice == "vllm"


def test_the_verdict_says_both_step_times_and_the_pick():
    trial = run_trial(1.0, 3.0)
    assert trial.choice == "vllm"
    again = BackendTrial()
    for t in trial.turns[:-1]:
        again.record(t)
    verdict = again.record(trial.turns[-1])
    assert "2.0 s with vLLM sampling and 4.0 s with our decoder" in verdict
    assert verdict.endswith("vLLM samples from here on")
    ours = run_trial(3.0, 1.0)
    assert ours.choice == "ours" and ours.record(turn("ours", 1.0)) is None


def test_state_round_trips_and_a_malformed_one_is_refused():
    trial = BackendTrial()
    trial.record(turn("vllm", 1.0))
    again = BackendTrial()
    again.load_state_dict(trial.state_dict())
    assert again == trial and again.sampler() == TRIAL_ORDER[1]
    bad_states = (
        {"turns": [["vllm", "x", 1, 1, 1]], "choice": None},
        {"turns": [["vllm", 1, 1]], "choice": None},
        {"turns": []},
        {"turns": [], "choice": "hf"},
    )
    for bad in bad_states:
        with pytest.raises(ValueError, match="backend_trial"):
            BackendTrial().load_state_dict(bad)
