"""The reward weights the loss sees, through the real trainer: curriculum phase x allocator.

A curriculum phase's ``reward_weights`` are the prior the allocator composes with (see
``rewards/allocators.py``): ``static`` keeps them as they are, so a phase weight must show
up in ``weights/*`` *and* in the fused reward the advantages are computed from.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXTRA_REWARDS

from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer

PHASE = {"strict_format": 0.77, "completion_length": 0.9}  # base: 0.5 and 0.2 (conftest TINY)


def build(tmp_path, overrides, allocator="static", options="{}", curriculum=True):
    cfg = load_config(
        None,
        [o for o in overrides if not o.startswith(("train.steps", "sft.steps", "eval.limit"))]
        + ["train.steps=2", "sft.steps=0", "eval.limit=0", "train.save_every=0"]
        + ["rewards.calibration=none", f"rewards.allocator={allocator}"]
        + [f"rewards.allocator_options={options}"]
        + [f"control.curriculum.enabled={str(curriculum).lower()}"]
        + [
            "control.curriculum.phases=[{name: only, reward_weights: {"
            + ", ".join(f"{k}: {v}" for k, v in PHASE.items())
            + "}}]"
        ],
    )
    return Trainer(cfg, run_dir=tmp_path / allocator, progress=False, reward_fns=EXTRA_REWARDS)


def hand_fused(batch, weights):
    n = batch.reward.numel()
    total = torch.zeros(n)
    for name, values in batch.calibrated.items():
        total += weights.get(name, 0.0) * torch.tensor([0.0 if v is None else v for v in values])
    return total


def test_static_allocator_keeps_curriculum_phase_weights_in_the_loss(tmp_path, tiny_overrides):
    trainer = build(tmp_path, tiny_overrides)
    metrics = trainer.train_step(0)
    assert metrics["weights/strict_format"] == pytest.approx(0.77, abs=0)
    assert metrics["weights/completion_length"] == pytest.approx(0.9, abs=0)
    assert metrics["weights/correctness"] == 1.0  # not in the phase: the base weight
    assert trainer.knobs.reward_weights["strict_format"] == 0.77
    batch = trainer._last_batch
    applied = {k: metrics[f"weights/{k}"] for k in batch.calibrated}
    # The fused reward the advantages used is the sum with the phase's weights...
    torch.testing.assert_close(batch.reward, hand_fused(batch, applied))
    # ...and not the one with the base weights (completion_length varies on random text).
    base = dict(applied, strict_format=0.5, completion_length=0.2)
    assert not torch.allclose(batch.reward, hand_fused(batch, base))
    assert metrics["reward/fused/mean"] == pytest.approx(float(hand_fused(batch, applied).mean()))


@pytest.mark.parametrize("curriculum", [True, False], ids=["phase-prior", "base-prior"])
def test_neural_factors_scale_the_prior_without_compounding(tmp_path, tiny_overrides, curriculum):
    """Explored neural weights (a target metric that varies on random text) are factors on
    the phase weights; without a curriculum, on the base weights, step after step."""
    options = "{seed: 0, exploration_std: 0.5, target: rewards/completion_length/mean}"
    trainer = build(tmp_path, tiny_overrides, "neural", options, curriculum)
    alloc = trainer.engine.allocator
    base = dict(alloc.base)
    prior = {**base, **PHASE} if curriculum else base
    moved = 0.0
    for step in range(2):
        factor = {c: alloc.weights[c] / base[c] for c in base}  # what this step applies
        metrics = trainer.train_step(step)
        for c in base:
            assert metrics[f"weights/{c}"] == pytest.approx(prior[c] * factor[c], rel=1e-9), c
        moved = max(moved, *(abs(f - 1.0) for f in factor.values()))
        batch = trainer._last_batch
        applied = {k: metrics[f"weights/{k}"] for k in batch.calibrated}
        torch.testing.assert_close(batch.reward, hand_fused(batch, applied))
    assert moved > 1e-3  # the factors did move, so the check above means something
