"""Seeded golden test: the first two GRPO steps' loss and fused reward, pinned (tiny, fp32).

A change that moves these numbers changes what the loss sees; if it was meant to, update
the constants in the same commit and say why. Tolerances allow for fp32 reduction order on
other CPU classes, not for a changed step.
"""

from __future__ import annotations

import pytest
from conftest import EXTRA_REWARDS, TINY

from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer

GOLDEN = [
    # (reward/fused/mean, advantage/abs_mean, grad_norm, kl/mean, entropy/mean) per step
    # loss/total itself is ~0 on-policy (advantages sum to 0 in a group): its gradient is pinned
    (0.308000028, 0.353548169, 0.117289595, 0.0, 10.789861043),
    (0.330000013, 0.707083464, 0.178202748, 1.19234125e-05, 10.789863586),
]


def _first_two_steps(tmp_path) -> list[tuple[float, ...]]:
    cfg = load_config(None, TINY + ["sft.steps=0", "eval.limit=0", "grpo.beta=0.04"])
    trainer = Trainer(cfg, run_dir=tmp_path / "golden", progress=False, reward_fns=EXTRA_REWARDS)
    out = []
    for step in range(2):
        m = trainer.train_step(step)
        trainer.step = step + 1
        out.append(
            (
                m["reward/fused/mean"],
                m["advantage/abs_mean"],
                m["grad_norm"],
                m["kl/mean"],
                m["entropy/mean"],
            )
        )
    return out


def test_first_two_steps_are_pinned(tmp_path):
    got = _first_two_steps(tmp_path)
    for step, (want, have) in enumerate(zip(GOLDEN, got, strict=True)):
        assert have == pytest.approx(want, rel=1e-4, abs=1e-6), f"step {step + 1}: {have}"
