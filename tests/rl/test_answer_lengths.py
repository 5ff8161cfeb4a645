"""The start-of-run check that taught answers fit the completion budgets (full DeepSynapse's
first hour run taught critique-and-confidence answers longer than its rollouts could write)."""

from __future__ import annotations

from conftest import EXTRA_REWARDS

from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer
from deepsynapse.rl.warmup import check_answer_lengths
from deepsynapse.telemetry.run_logger import read_jsonl


def _trainer(tmp_path, tiny_overrides, *overrides):
    hard = ["data.train=synthetic", "sft.data=synthetic", "data.synthetic_difficulty=[3, 3]"]
    cfg = load_config(None, [*tiny_overrides, *hard, "rewards.schema=deepsynapse", *overrides])
    return Trainer(cfg, run_dir=tmp_path / "run", progress=False, reward_fns=EXTRA_REWARDS)


def test_answers_longer_than_the_rollout_budget_are_flagged(tmp_path, tiny_overrides, capsys):
    trainer = _trainer(tmp_path, tiny_overrides, "rollout.max_new_tokens=96")
    found = check_answer_lengths(trainer)
    assert found["mean"] > 96 and found["over/rollout.max_new_tokens"] > 0.5
    out = capsys.readouterr().out
    assert "warning" in out and "rollout.max_new_tokens=96" in out
    assert f"at least {found['p95'] + 16:.0f}" in out  # the advice names a budget that fits
    events = [
        e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["kind"] == "length_check"
    ]
    assert len(events) == 1 and events[0]["evidence"]["p95"] == found["p95"]


def test_answers_that_fit_pass_quietly(tmp_path, tiny_overrides, capsys):
    fits = ["rollout.max_new_tokens=256", "eval.max_new_tokens=256"]
    found = check_answer_lengths(_trainer(tmp_path, tiny_overrides, *fits))
    assert found["over/rollout.max_new_tokens"] == 0 and found["over/eval.max_new_tokens"] == 0
    assert "warning" not in capsys.readouterr().out


def test_no_warm_up_no_check(tmp_path, tiny_overrides):
    assert check_answer_lengths(_trainer(tmp_path, tiny_overrides, "sft.steps=0")) is None
