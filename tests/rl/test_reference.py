"""The KL's reference policy in the trainer: where GRPO starts, not the base it left behind."""

from __future__ import annotations

import pytest
from conftest import EXTRA_REWARDS

from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer
from deepsynapse.telemetry.run_logger import read_jsonl

# the tiny model's SFT at this rate moves it measurably away from the base
ANCHOR = ["sft.steps=3", "sft.lr=5e-3", "grpo.beta=0.1", "train.steps=1", "eval.limit=0"]


def first_step(tmp_path, tiny_overrides, extra, name):
    cfg = load_config(None, tiny_overrides + ANCHOR + extra)
    trainer = Trainer(cfg, run_dir=tmp_path / name, progress=False, reward_fns=EXTRA_REWARDS)
    trainer.train()
    (metrics,) = [m for m in read_jsonl(tmp_path / name / "metrics.jsonl") if "kl/mean" in m]
    return trainer, metrics


def test_after_a_warmup_the_kl_anchors_where_grpo_starts(tmp_path, tiny_overrides):
    """start: the first GRPO step's policy is the reference, so its KL is 0; base: the same
    step measures how far the warm-up moved the model, and the loss pulls it back."""
    start, at_start = first_step(tmp_path, tiny_overrides, [], "start")
    base, at_base = first_step(tmp_path, tiny_overrides, ["grpo.reference=base"], "base")
    assert start.unwrapped.reference_state is not None and base.unwrapped.reference_state is None
    assert at_start["kl/mean"] == pytest.approx(0.0, abs=1e-6)
    assert at_base["kl/mean"] > 1e-4
    events = [e["kind"] for e in read_jsonl(tmp_path / "start" / "events.jsonl")]
    assert "reference" in events
    # the checkpoint carries the anchor, so a resumed run measures KL to the same policy
    assert (tmp_path / "start" / "checkpoints" / "step-1" / "reference.json").is_file()
    assert not (tmp_path / "base" / "checkpoints" / "step-1" / "reference.json").exists()


def test_without_a_warmup_the_reference_is_the_base_as_in_plain_grpo(tmp_path, tiny_overrides):
    trainer, metrics = first_step(tmp_path, tiny_overrides, ["sft.steps=0"], "plain")
    assert trainer.unwrapped.reference_state is None
    assert metrics["kl/mean"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: policy = base
