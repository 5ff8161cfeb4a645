"""Defect 10: a stop inside the SFT warm-up checkpoints it, and --resume goes on from there."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import EXTRA_REWARDS
from safetensors.torch import load_file

from deepsynapse.checkpoint import latest_checkpoint, load_tree
from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer


def _trainer(tmp_path, overrides, name):
    cfg = load_config(None, overrides)
    return Trainer(cfg, run_dir=tmp_path / name, progress=False, reward_fns=EXTRA_REWARDS)


def _adapter(run_dir):
    folder = latest_checkpoint(run_dir / "checkpoints")
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.heavy
def test_sigterm_in_warmup_checkpoints_and_resume_matches_unbroken_run(
    tmp_path, tiny_overrides, capsys
):
    base = tiny_overrides + ["sft.steps=6", "train.steps=1", "train.save_every=0"]
    straight = _trainer(tmp_path, base, "straight")
    straight.train()

    broken = _trainer(tmp_path, base, "broken")
    real_loss = broken.sft.loss
    calls = {"n": 0}

    def loss_then_sigterm(prompts, targets, phi=False):
        calls["n"] += 1
        if calls["n"] == 3:  # SIGTERM arrives during warm-up step 3 (as measured in review)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(prompts, targets, phi=phi)

    broken.sft.loss = loss_then_sigterm
    summary = broken.train()
    out = capsys.readouterr().out
    assert "stopped at warm-up step 3/6" in out and "--resume" in out
    assert summary["steps"] == 0
    folder = latest_checkpoint(tmp_path / "broken" / "checkpoints")
    assert folder is not None, "the warm-up was lost: no checkpoint"
    state = load_tree(folder, "trainer_state")
    assert state["sft_step"] == 3 and state["sft_done"] is False
    assert (tmp_path / "broken" / "eval_before.json").is_file()

    resumed = _trainer(tmp_path, base, "broken")
    resumed.train(resume=True)
    assert resumed.sft_done and resumed.sft_step == 6 and resumed.step == 1
    out = capsys.readouterr().out
    assert "resumed from" in out
    sft_rows = [
        r["sft/step"]
        for r in map(
            __import__("json").loads,
            (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines(),
        )
        if "sft/step" in r
    ]
    assert sorted(sft_rows) == [1, 2, 3, 4, 5, 6]  # each warm-up step logged once
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "broken")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
