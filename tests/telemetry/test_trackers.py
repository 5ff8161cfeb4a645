"""Live telemetry through Accelerate's trackers: TensorBoard and W&B (offline) hold the metrics."""

from __future__ import annotations

import os

import pytest
from conftest import EXTRA_REWARDS, TINY

from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer

pytest.importorskip(
    "tensorboard", reason="tracker extra not installed: pip install -e '.[trackers]'"
)
pytest.importorskip("wandb", reason="tracker extra not installed: pip install -e '.[trackers]'")


def test_tensorboard_and_wandb_offline_receive_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = TINY + ["sft.steps=0", "eval.limit=0", "train.trackers=[tensorboard, wandb]"]
    run_dir = tmp_path / "run"
    Trainer(
        load_config(None, overrides), run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS
    ).train()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((run_dir / "trackers").rglob("events.out.tfevents.*"))
    assert event_files, "no TensorBoard event file"
    acc = EventAccumulator(str(event_files[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "reward/fused/mean" in tags and "kl/mean" in tags
    assert [e.step for e in acc.Scalars("reward/fused/mean")] == [1, 2]

    offline = list(run_dir.rglob("offline-run-*"))
    assert offline, "no W&B offline run folder"
    runs = list(offline[0].glob("*.wandb"))
    assert runs and runs[0].stat().st_size > 0
    # The run's history file holds the logged keys (W&B writes them in its binary log).
    assert b"reward/fused/mean" in runs[0].read_bytes()
    assert os.environ["WANDB_MODE"] == "offline"
