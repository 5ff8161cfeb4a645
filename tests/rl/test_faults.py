"""Faults the trainer must survive: signals, failing or hanging rewards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXTRA_REWARDS, TINY

from deepsynapse.checkpoint import latest_checkpoint
from deepsynapse.config import load_config
from deepsynapse.rewards.base import call_components
from deepsynapse.rl.trainer import Trainer
from deepsynapse.telemetry.run_logger import read_jsonl


def test_raising_and_hanging_components_score_none():
    def boom(prompts, completions, **_):
        raise RuntimeError("bad reward")

    def hang(prompts, completions, **_):
        time.sleep(30)
        return [1.0] * len(completions)

    def nan(prompts, completions, **_):
        return [float("nan")] * len(completions)

    boom.name, hang.name, nan.name = "boom", "hang", "nan"
    ok = EXTRA_REWARDS["completion_length"]
    start = time.perf_counter()
    scores, failures = call_components([boom, hang, nan, ok], ["p"], ["abc"], {}, timeout=0.5)
    assert time.perf_counter() - start < 5
    assert scores["boom"] == [None] and scores["hang"] == [None] and scores["nan"] == [None]
    assert scores["completion_length"] == [3 / 50]
    assert {f.name for f in failures} == {"boom", "hang", "nan"}
    assert "did not finish within 0.5 s" in next(f.error for f in failures if f.name == "hang")


def test_training_goes_on_when_a_reward_raises(tmp_path):
    def flaky(prompts, completions, **_):
        raise ValueError("flaky reward")

    overrides = TINY + [
        "sft.steps=0",
        "eval.limit=0",
        "rewards.weights={completion_length: 1.0, flaky: 1.0}",
    ]
    trainer = Trainer(
        load_config(None, overrides),
        run_dir=tmp_path / "run",
        progress=False,
        reward_fns={**EXTRA_REWARDS, "flaky": flaky},
    )
    summary = trainer.train()
    assert summary["steps"] == 2
    events = read_jsonl(tmp_path / "run/events.jsonl")
    errors = [e for e in events if e["kind"] == "reward_error"]
    assert len(errors) == 2 and "flaky reward" in errors[0]["evidence"]["error"]
    rows = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if "reward/fused/mean" in r]
    assert all(r["rewards/flaky/none_rate"] == 1.0 for r in rows)


@pytest.mark.heavy
def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("train.steps", "rewards.weights"))]
    cmd = [
        sys.executable,
        "-m",
        "deepsynapse.cli",
        "train",
        "--quiet",
        *overrides,
        "train.steps=500",
        "train.save_every=0",
        "sft.steps=0",
        "eval.limit=0",
        f"train.output_dir={tmp_path}",
        "train.run_name=run",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            rows = read_jsonl(run_dir / "metrics.jsonl")
            if any("reward/fused/mean" in r for r in rows):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "deepsynapse train --resume" in out + err
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/fused/mean" in r]
    assert int(ckpt.name.removeprefix("step-")) == steps[-1] < 500
    assert Path(ckpt / "adapter" / "adapter_model.safetensors").is_file()
