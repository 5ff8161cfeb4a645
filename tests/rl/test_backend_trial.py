"""The rule ``rollout.backend=auto`` picks a CPU training run's sampler by (rl/backend_trial.py).

The trainer-level tests, where the samplers really take turns inside a run and the engine is
freed, need vLLM and live in tests/rollout/test_vllm_backend.py."""

from __future__ import annotations

import pytest

from deepsynapse.rl.backend_trial import TRIAL_ORDER, VLLM_MARGIN, BackendTrial


def run_trial(vllm_seconds: float, ours_seconds: float, tokens: float = 100.0) -> BackendTrial:
    trial = BackendTrial()
    for _ in TRIAL_ORDER:
        sampler = trial.sampler()
        verdict = trial.record(sampler, vllm_seconds if sampler == "vllm" else ours_seconds, tokens)
    assert verdict is not None
    return trial


def test_the_samplers_take_turns_then_the_pick_holds():
    trial = BackendTrial()
    seen = []
    for _ in range(len(TRIAL_ORDER) + 3):
        sampler = trial.sampler()
        seen.append(sampler)
        trial.record(sampler, 2.0 if sampler == "vllm" else 3.0, 100.0)
    assert seen == list(TRIAL_ORDER) + ["vllm"] * 3
    assert len(trial.turns) == len(TRIAL_ORDER)  # steps after the pick are not charged


def test_vllm_is_kept_only_when_faster_by_the_margin():
    """The engine holds ~2 GB more, so a tie goes to our decoder."""
    assert run_trial(1.0, 1.0 * VLLM_MARGIN * 1.01).choice == "vllm"
    assert run_trial(1.0, 1.0 * VLLM_MARGIN * 0.99).choice == "ours"
    assert run_trial(1.5, 1.0).choice == "ours"


def test_time_is_charged_per_completion_token():
    """A sampler whose steps drew longer completions is not blamed for their length."""
    trial = BackendTrial()
    for sampler in TRIAL_ORDER:  # vLLM: 2 s for 200 tokens; ours: 1.5 s for 100
        trial.record(
            sampler, 2.0 if sampler == "vllm" else 1.5, 200.0 if sampler == "vllm" else 100.0
        )
    assert trial.seconds_per_token() == pytest.approx({"vllm": 0.01, "ours": 0.015})
    assert trial.choice == "vllm"


def test_the_verdict_says_both_rates_and_the_pick():
    trial = BackendTrial()
    verdicts = [trial.record(s, 1.0 if s == "vllm" else 2.0, 100.0) for s in TRIAL_ORDER]
    assert verdicts[:-1] == [None] * (len(TRIAL_ORDER) - 1)
    assert "10.0 ms" in verdicts[-1] and "20.0 ms" in verdicts[-1]
    assert verdicts[-1].endswith("vLLM samples from here on")


def test_state_round_trips_and_a_malformed_one_is_refused():
    trial = BackendTrial()
    trial.record("vllm", 1.0, 10.0)
    again = BackendTrial()
    again.load_state_dict(trial.state_dict())
    assert again == trial and again.sampler() == TRIAL_ORDER[1]
    for bad in (
        {"turns": [["vllm", "x", 1]], "choice": None},
        {"turns": []},
        {"turns": [], "choice": "hf"},
    ):
        with pytest.raises(ValueError, match="backend_trial"):
            BackendTrial().load_state_dict(bad)
