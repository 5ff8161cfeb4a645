"""Defects 7 and 8 at trainer level: what the step reports is what the policy did, and the
accumulation controller's noise-scale signal exists."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EXTRA_REWARDS, TINY

from deepsynapse.config import load_config
from deepsynapse.control.accumulation import MicrobatchGradients
from deepsynapse.rl.trainer import Trainer


def _trainer(tmp_path, extra):
    cfg = load_config(None, TINY + ["sft.steps=0", "eval.limit=0", *extra])
    return Trainer(cfg, run_dir=tmp_path / "run", progress=False, reward_fns=EXTRA_REWARDS)


def test_accuracy_train_is_measured_before_dynamic_sampling_drops_groups(tmp_path):
    """Each round: group 0 all right (dropped: no signal), group 1 half right (kept). The
    policy solves 3 of 4; the kept groups 1 of 2. accuracy/train must say 0.75, not 0.5."""
    trainer = _trainer(tmp_path, ["grpo.dynamic_sampling=true", "grpo.max_resample_rounds=2"])
    evaluate = trainer.engine.evaluate

    def designed(prompts, texts, columns, knobs, seconds=None, **kwargs):
        scores, failures, _ = evaluate(prompts, texts, columns, knobs, seconds=seconds, **kwargs)
        return scores, failures, [1.0, 1.0, 1.0, 0.0]

    trainer.engine.evaluate = designed
    m = trainer.train_step(0)
    assert m["groups/drawn"] == 4  # two rounds of two groups, one kept from each
    assert m["accuracy/train"] == pytest.approx(0.75)
    assert m["accuracy/train_kept"] == pytest.approx(0.5)
    assert m["groups/with_signal"] == pytest.approx(0.5)


def _draw_step(tmp_path, rounds_per_draw):
    """One dynamic-sampling step where, in each round, group 0 is all right (dropped) and
    group 1 half right (kept): the rollout calls' prompts, the kept prompts, the metrics."""
    trainer = _trainer(
        tmp_path,
        [
            "grpo.dynamic_sampling=true",
            "grpo.max_resample_rounds=2",
            f"grpo.rounds_per_draw={rounds_per_draw}",
        ],
    )
    evaluate, rollout = trainer.engine.evaluate, trainer.rollout
    calls: list[list[str]] = []

    def designed(prompts, texts, columns, knobs, seconds=None, **kwargs):
        scores, failures, _ = evaluate(prompts, texts, columns, knobs, seconds=seconds, **kwargs)
        return scores, failures, [1.0, 1.0, 1.0, 0.0] * (len(texts) // 4)

    def spy(problems, knobs):
        calls.append([p.id for p in problems])
        return rollout(problems, knobs)

    trainer.engine.evaluate, trainer.rollout = designed, spy
    m = trainer.train_step(0)
    return calls, [p.id for p in trainer._last_batch.problems], m


def test_rounds_drawn_together_are_the_same_prompts_and_keep_the_same_groups(tmp_path):
    """grpo.rounds_per_draw=2 decodes the refill round with the first (one rollout of 4
    prompts, not two of 2): the same prompts in the same order, the same groups kept."""
    one_calls, one_kept, one = _draw_step(tmp_path / "one", 1)
    two_calls, two_kept, two = _draw_step(tmp_path / "two", 2)
    assert [len(c) for c in one_calls] == [2, 2] and [len(c) for c in two_calls] == [4]
    drawn = [i for c in one_calls for i in c]
    assert two_calls[0] == drawn and len(set(drawn)) == 4
    assert one_kept == two_kept == [drawn[1], drawn[3]]
    for m in (one, two):
        assert m["groups/drawn"] == 4 and m["groups/dropped"] == 2
        assert m["accuracy/train"] == pytest.approx(0.75)


def test_noise_scale_of_known_pieces():
    """Two pieces g1, g2: G = g1 + g2, estimates 2*g1 and 2*g2, b tr(Sigma)/|G|^2."""
    p = torch.nn.Parameter(torch.zeros(2))
    rec = MicrobatchGradients([p])
    p.grad = torch.tensor([1.0, 0.0])
    rec.capture()
    p.grad = torch.tensor([1.0, 2.0])  # accumulated: the second piece is [0, 2]
    rec.capture()
    # estimates [2, 0] and [0, 4], mean [1, 2]; spread (1+4 + 1+4) / 1 = 10; |G|^2 = 5
    assert rec.noise_scale(rows_per_piece=3) == pytest.approx(3 * 10 / 5)


def test_noise_scale_signal_is_emitted_and_read(tmp_path):
    trainer = _trainer(
        tmp_path,
        [
            "control.accumulation.enabled=true",
            "control.accumulation.signal=noise_scale",
            "control.accumulation.warmup=1",
        ],
    )
    m = trainer.train_step(0)
    assert math.isfinite(m["grad/noise_scale"]) and m["grad/noise_scale"] > 0
    assert "grad/microbatch_cosine" in m  # both signals reported (NaN when a piece is zero)
    # the controller read it: without the metric its EWMA never starts (the key is absent)
    assert math.isfinite(m["accumulation/signal_ewma"])
