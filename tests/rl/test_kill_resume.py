"""Injected faults on the tiny model: SIGKILL at random moments, failing saves, NaN gradients.

The kill harness runs the real command (``python -m deepsynapse.cli train``) and kills it
with SIGKILL, the signal nothing can catch, at seeded random moments inside GRPO steps
(generation, scoring, backward) and once in the middle of a checkpoint write (the moment
a ``.tmp-step-N`` folder exists). After every kill it checks that every complete
checkpoint loads, and resumes with ``--resume RUN_DIR``. At the end every GRPO step is
logged exactly once and the adapter equals that of an unbroken run with the same seed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXTRA_REWARDS, TINY
from safetensors.torch import load_file

import deepsynapse.checkpoint as checkpoint_module
from deepsynapse.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_tree,
    write_checkpoint,
)
from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer, TrainingDiverged
from deepsynapse.telemetry.run_logger import read_jsonl

# Built-in rewards only (the command cannot take the test's extra reward), so the random
# tiny model scores zero everywhere; one SFT step makes policy != reference (the base here:
# grpo.reference=base), so the KL term moves the adapter on every GRPO step and the final
# comparison is not vacuous. (The start-of-GRPO reference across a resume:
# tests/rl/test_train_e2e.py::test_resume_is_exact.)
KILL_CONFIG = {
    "model": {"name": "tiny-random", "dtype": "fp32"},
    "lora": {"r": 4, "alpha": 8},
    "data": {"train": "gsm8k", "eval": "gsm8k"},
    "rollout": {"num_generations": 2, "max_new_tokens": 12},
    "grpo": {"prompts_per_step": 2, "micro_batch_size": 2, "reference": "base"},
    "optim": {"lr": 1e-3},
    "sft": {"steps": 1, "batch_size": 2},
    "eval": {"limit": 0},
    "train": {"save_every": 1, "keep_checkpoints": 100, "seed": 3},
}


def grpo_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/fused/mean" in r]


def check_every_checkpoint_loads(run_dir: Path) -> list[int]:
    """Load each complete checkpoint's files the way a resume does; return their steps."""
    steps = []
    for folder in complete_checkpoints(run_dir / "checkpoints"):
        state = load_tree(folder, "trainer_state")
        assert state["step"] == int(folder.name.removeprefix("step-"))
        assert "param_groups" in load_tree(folder, "optimizer")
        weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
        assert weights and all(torch.isfinite(w).all() for w in weights.values())
        json.loads((folder / "adapter" / "adapter_config.json").read_text())
        steps.append(state["step"])
    return steps


@dataclass
class KillReport:
    kills: list[dict] = field(default_factory=list)  # one per kill: where, steps lost
    seconds: float = 0.0


def _tmp_dirs(ckpt_dir: Path) -> dict[str, int]:
    """``.tmp-step-*`` folders and their change times (a stale one keeps its own)."""
    if not ckpt_dir.is_dir():
        return {}
    found = {}
    for p in ckpt_dir.iterdir():
        if p.name.startswith(".tmp-step-"):
            try:
                found[p.name] = p.stat().st_ctime_ns
            except FileNotFoundError:
                continue
    return found


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


AFTER_ROW = 0.08  # seconds between a step's metrics row and the next step: samples, save
PHASES = ("generate", "reward", "update")  # the order inside a step (timing/<phase>)


def _typical(values: list[float]) -> float:
    """Lower quartile: each process's first step is slow (lazy initialisation), and with a
    restart per kill those steps would drag a median late."""
    return statistics.quantiles(values, n=4)[0] if len(values) > 1 else values[0]


def _phase_windows(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Typical (start, end) of each phase in seconds after the previous step's metrics row."""
    windows, t = {}, AFTER_ROW
    for phase in PHASES:
        length = _typical([float(r.get(f"timing/{phase}") or 0.0) for r in rows])
        windows[phase] = (t, t + length)
        t += length
    return windows


def _phase_at(windows: dict[str, tuple[float, float]], seconds_after_row: float) -> str:
    """Where a kill that many seconds after a metrics row most likely landed."""
    if seconds_after_row < AFTER_ROW:
        return "checkpoint write (probably)"
    for phase, (_, end) in windows.items():
        if seconds_after_row < end:
            return phase
    return "next step"


def _kill_at_random_moment(
    proc: subprocess.Popen, run_dir: Path, after: int, rng: random.Random, target: str
) -> str | None:
    """Wait for this process to log a GRPO step > ``after``, then SIGKILL it at a random
    moment of the next step: inside the ``target`` phase (by its median timing) or, for
    ``anywhere``, uniformly over the step. Return the phase it most likely hit, or None if
    the process ended first.

    Rows of the previous, killed process past its checkpoint stay in the file until the
    resume truncates them, so this process's rows are told apart by their time.
    """
    started = time.time()
    deadline = started + 300
    while time.time() < deadline and proc.poll() is None:
        rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/fused/mean" in r]
        if any(r["step"] > after and r["time"] > started for r in rows):
            seen = time.time()
            windows = _phase_windows(rows)
            lo, hi = windows[target] if target in windows else (0.0, windows["update"][1])
            time.sleep(lo + rng.uniform(0.1, 0.9) * (hi - lo))
            if proc.poll() is not None:
                return None
            _kill(proc)
            return _phase_at(windows, time.time() - seen)
        time.sleep(0.01)
    return None


def _kill_inside_checkpoint_write(proc: subprocess.Popen, ckpt_dir: Path) -> bool:
    """SIGKILL the moment this process has a ``.tmp-step-*`` folder; True if it was killed."""
    stale = _tmp_dirs(ckpt_dir)  # left by an earlier kill: not this process's write
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        now = _tmp_dirs(ckpt_dir)
        if any(stale.get(name) != ctime for name, ctime in now.items()):
            _kill(proc)
            return True
        time.sleep(0.002)
    return False


def run_kill_harness(tmp_path: Path, steps: int, random_kills: int, seed: int) -> KillReport:
    """SIGKILL a CLI training run ``random_kills`` times at random moments and at least once
    inside a checkpoint write, resuming after each kill; return what each kill cost."""
    started = time.time()
    # One math thread per process: the two runs then sum in the same order whatever the load
    # (with two threads, one run in a few differed in the last bits after the SFT step, and
    # Adam turns last-bit differences of near-zero gradients into 1e-5 ones).
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["MKL_NUM_THREADS"] = "1"
    for name in ("killed", "straight"):
        config = json.loads(json.dumps(KILL_CONFIG))
        config["train"].update(steps=steps, output_dir=str(tmp_path), run_name=name)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    config_path = tmp_path / "killed.yaml"
    run_dir, ckpt_dir = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    # The unbroken reference: the same command and config (but the run name), alongside.
    cmd = [sys.executable, "-m", "deepsynapse.cli", "train", "--quiet", "--config"]
    straight_log = open(tmp_path / "straight.log", "w")  # noqa: SIM115 - closed below
    straight = subprocess.Popen(
        cmd + [str(tmp_path / "straight.yaml")],
        env=env,
        stdout=straight_log,
        stderr=subprocess.STDOUT,
    )
    try:
        report = _kill_and_resume(tmp_path, config_path, run_dir, ckpt_dir, env, random_kills, seed)
        assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    finally:
        if straight.poll() is None:
            straight.kill()
            straight.wait()
        straight_log.close()
    report.seconds = time.time() - started
    return report


TARGETS = ("generate", "update", "anywhere")  # cycled through by the random kills (PHASES)


def _kill_and_resume(
    tmp_path: Path,
    config_path: Path,
    run_dir: Path,
    ckpt_dir: Path,
    env: dict[str, str],
    random_kills: int,
    seed: int,
) -> KillReport:
    rng = random.Random(seed)
    need = {"random": random_kills, "checkpoint": 1}
    report = KillReport()
    resumed_at = -1  # checkpoint step the current process resumed from (-1: a fresh start)
    for attempt in range(3 * (random_kills + 1) + 1):  # a few spare attempts
        cmd = [sys.executable, "-m", "deepsynapse.cli", "train", "--quiet"]
        cmd += ["--resume", str(run_dir)] if resumed_at >= 0 else ["--config", str(config_path)]
        log = tmp_path / f"attempt-{attempt}.log"
        stale = _tmp_dirs(ckpt_dir)  # left by earlier kills, until their step is saved again
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                if not any(need.values()):  # every kill placed: let it finish
                    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
                    break
                # Two kills inside steps first, then the checkpoint write, then the rest.
                if need["checkpoint"] and len(report.kills) >= 2:
                    hit = _kill_inside_checkpoint_write(proc, ckpt_dir)
                    phase = "checkpoint write" if hit else None
                else:
                    target = TARGETS[len(report.kills) % len(TARGETS)]
                    after = max(resumed_at, 0)
                    phase = _kill_at_random_moment(proc, run_dir, after, rng, target)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if phase is None:
            tail = log.read_text()[-1500:]
            pytest.fail(f"run ended before kill {len(report.kills) + 1}: {report.kills}\n{tail}")
        tmp_left = sorted(n for n, c in _tmp_dirs(ckpt_dir).items() if stale.get(n) != c)
        kind = "checkpoint" if tmp_left and need["checkpoint"] else "random"
        if not need[kind]:
            kind = "random" if need["random"] else "checkpoint"
        need[kind] = max(0, need[kind] - 1)
        logged = grpo_steps(run_dir)
        assert logged == sorted(set(logged)), f"a step was logged twice: {logged}"
        complete = check_every_checkpoint_loads(run_dir)
        newest = latest_checkpoint(ckpt_dir)
        assert newest is not None, "no complete checkpoint after a kill"
        resumed_at = int(newest.name.removeprefix("step-"))
        report.kills.append(
            {
                "kind": kind,
                "phase": "checkpoint write" if tmp_left else phase,
                "last_logged_step": logged[-1] if logged else 0,
                "resumes_from": resumed_at,
                "completed_steps_lost": (logged[-1] if logged else 0) - resumed_at,
                "tmp_left": tmp_left,
                "complete_checkpoints": len(complete),
            }
        )
    else:
        pytest.fail(f"could not place the kills: {report.kills}")
    return report


def _check_run_after_kills(tmp_path: Path, report: KillReport, steps: int, random_kills: int):
    run_dir = tmp_path / "killed"
    assert len(report.kills) == random_kills + 1
    in_write = [k for k in report.kills if k["kind"] == "checkpoint"]
    assert in_write and in_write[0]["tmp_left"], "no kill landed inside a checkpoint write"
    assert all(k["completed_steps_lost"] <= 1 for k in report.kills), report.kills
    assert grpo_steps(run_dir) == list(range(1, steps + 1))  # each step exactly once
    resumes = [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == "resume"]
    assert resumes == [k["resumes_from"] for k in report.kills]  # never silently from 0
    check_every_checkpoint_loads(run_dir)
    assert not any(p.name.startswith(".tmp") for p in (run_dir / "checkpoints").iterdir())

    straight = tmp_path / "straight"
    final = f"checkpoints/step-{steps}/adapter/adapter_model.safetensors"
    a, b = load_file(str(straight / final)), load_file(str(run_dir / final))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    after_sft = load_file(str(run_dir / "checkpoints/step-0/adapter/adapter_model.safetensors"))
    assert any(not torch.equal(after_sft[k], b[k]) for k in b)  # GRPO moved it: not vacuous
    target = os.environ.get("DEEPSYNAPSE_KILL_REPORT")
    if target:
        Path(target).write_text(
            json.dumps({"steps": steps, "seconds": report.seconds, "kills": report.kills}, indent=1)
        )


@pytest.mark.heavy
def test_sigkill_at_random_moments_then_resume_matches_unbroken_run(tmp_path):
    # inside generate, inside update, anywhere; + a checkpoint write. Steps take ~0.3 s, and
    # under a loaded suite the harness has reacted 3 steps late: 10 steps leave room for that.
    steps, random_kills = 10, 3
    report = run_kill_harness(tmp_path, steps=steps, random_kills=random_kills, seed=11)
    _check_run_after_kills(tmp_path, report, steps, random_kills)


@pytest.mark.slow
def test_sigkill_many_times_then_resume_matches_unbroken_run(tmp_path):
    steps, random_kills = 30, 16
    report = run_kill_harness(tmp_path, steps=steps, random_kills=random_kills, seed=12345)
    _check_run_after_kills(tmp_path, report, steps, random_kills)


# ----------------------------------------------------------------- saves that fail


def _enospc(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["first-file", "after-some-files", "complete-marker", "rename"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    root = tmp_path / "checkpoints"

    def write(folder: Path, payload: str) -> None:
        (folder / "a.json").write_text(payload)
        (folder / "b.json").write_text(payload)

    write_checkpoint(root, 1, lambda d: write(d, "one"), keep=2)
    before = {p.name: p.read_bytes() for p in (root / "step-1").iterdir()}

    def failing(folder: Path) -> None:
        if where == "first-file":
            _enospc()
        write(folder, "two")
        if where == "after-some-files":
            _enospc()

    if where == "complete-marker":
        real = checkpoint_module._write_json
        monkeypatch.setattr(
            checkpoint_module,
            "_write_json",
            lambda path, obj: _enospc() if path.name == "COMPLETE" else real(path, obj),
        )
    if where == "rename":
        monkeypatch.setattr(checkpoint_module.os, "replace", _enospc)
    with pytest.raises(CheckpointError) as info:
        write_checkpoint(root, 2, failing, keep=1)
    message = str(info.value)
    assert "step-2" in message and "No space left on device" in message
    assert [p.name for p in root.iterdir()] == ["step-1"]  # no .tmp left, nothing pruned
    assert {p.name: p.read_bytes() for p in (root / "step-1").iterdir()} == before


def test_trainer_save_that_fails_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    overrides = TINY + ["sft.steps=0", "eval.limit=0", "train.steps=2", "train.save_every=1"]
    trainer = Trainer(
        load_config(None, overrides),
        run_dir=tmp_path / "run",
        progress=False,
        reward_fns=EXTRA_REWARDS,
    )
    trainer.train(stop_after=1)
    good = latest_checkpoint(tmp_path / "run/checkpoints")
    assert good is not None and good.name == "step-1"
    before = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}

    import deepsynapse.rl.state as state_module

    real_save_tree = state_module.save_tree

    def save_tree_without_space(tree, folder, name):
        if name == "optimizer":  # the adapter is already written: a half-full folder
            _enospc()
        return real_save_tree(tree, folder, name)

    monkeypatch.setattr(state_module, "save_tree", save_tree_without_space)
    with pytest.raises(CheckpointError) as info:
        trainer.train(resume=True)  # step 2 runs, then its save fails
    assert "step-2" in str(info.value) and "No space left on device" in str(info.value)
    root = tmp_path / "run/checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-1"]
    after = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    assert after == before

    # The adapter writer failing (PEFT's save_pretrained) is refused the same way.
    monkeypatch.setattr(state_module, "save_tree", real_save_tree)
    peft_cls = type(trainer.unwrapped.peft_model)
    monkeypatch.setattr(peft_cls, "save_pretrained", _enospc)
    trainer.step = 3
    with pytest.raises(CheckpointError, match="step-3.*No space left on device"):
        trainer.save_checkpoint()
    assert [p.name for p in root.iterdir()] == ["step-1"]

    # ... and a fresh trainer resumes from the intact checkpoint.
    monkeypatch.undo()
    fresh = Trainer(
        load_config(None, overrides),
        run_dir=tmp_path / "run",
        progress=False,
        reward_fns=EXTRA_REWARDS,
    )
    fresh.load_checkpoint(good)
    assert fresh.step == 1


# ----------------------------------------------------------------- non-finite gradients


class NaNLossTrainer(Trainer):
    """Multiplies the loss by NaN from ``poison_from`` on: the fault under test, injected by
    shadowing ``accelerator.backward`` for the duration of ``update``."""

    poison_from = 2

    def update(self, batch, knobs, step, timer):
        if step < self.poison_from:
            return super().update(batch, knobs, step, timer)
        backward = self.accelerator.backward
        self.accelerator.backward = lambda loss, **kw: backward(loss * float("nan"), **kw)
        try:
            return super().update(batch, knobs, step, timer)
        finally:
            del self.accelerator.backward  # the class's method again


def test_nonfinite_gradients_are_skipped_counted_then_the_run_stops(tmp_path):
    overrides = TINY + [
        "sft.steps=0",
        "eval.limit=0",
        "train.steps=10",
        "train.save_every=1",
        "train.max_bad_steps=3",
        "train.keep_checkpoints=10",
    ]
    run_dir = tmp_path / "run"
    trainer = NaNLossTrainer(
        load_config(None, overrides), run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS
    )
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    message = str(info.value)
    assert "3 steps in a row" in message and "last good checkpoint" in message
    named = Path(message.rsplit("last good checkpoint: ", 1)[1].strip())
    assert named.is_dir() and named in complete_checkpoints(run_dir / "checkpoints")
    assert named.name == "step-2"  # saved before the first bad step, not the newest (step-4)
    check_every_checkpoint_loads(run_dir)

    events = read_jsonl(run_dir / "events.jsonl")
    events = [e for e in events if e["kind"] == "nonfinite_gradients"]
    assert [e["evidence"]["in_a_row"] for e in events] == [1, 2, 3]
    assert all(e["evidence"]["grad_norm"] == "nan" for e in events)
    assert trainer.skipped_steps == 3 and trainer.bad_steps == 3
    # Skipped steps leave the weights as the last good step left them.
    ckpts = run_dir / "checkpoints"
    good = load_file(str(ckpts / "step-2/adapter/adapter_model.safetensors"))
    for later in ("step-3", "step-4"):
        weights = load_file(str(ckpts / later / "adapter/adapter_model.safetensors"))
        assert all(torch.equal(good[k], weights[k]) for k in good)
    assert load_tree(ckpts / "step-4", "trainer_state")["skipped_steps"] == 2
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/fused/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["grad_norm"]) for r in rows[:2])
    assert all(r["grad_norm"] is None for r in rows[2:])  # NaN is logged as null


def test_a_single_nonfinite_step_does_not_stop_the_run(tmp_path):
    class OneBadStep(NaNLossTrainer):
        def update(self, batch, knobs, step, timer):
            self.poison_from = 1 if step == 1 else 10**9
            return super().update(batch, knobs, step, timer)

    overrides = TINY + ["sft.steps=0", "eval.limit=0", "train.steps=3", "train.max_bad_steps=2"]
    trainer = OneBadStep(
        load_config(None, overrides),
        run_dir=tmp_path / "run",
        progress=False,
        reward_fns=EXTRA_REWARDS,
    )
    summary = trainer.train()
    assert summary["steps"] == 3 and trainer.skipped_steps == 1 and trainer.bad_steps == 0


def test_kill_during_warmup_does_not_log_warmup_twice(tmp_path):
    """Emulates a SIGKILL after the SFT rows were logged but before the step-0 checkpoint."""
    overrides = TINY + ["sft.steps=2", "eval.limit=0", "train.steps=0"]
    run_dir = tmp_path / "run"
    cfg = load_config(None, overrides)
    Trainer(cfg, run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS).train()
    for folder in (run_dir / "checkpoints").iterdir():  # as if killed before the save
        shutil.rmtree(folder)
    Trainer(cfg, run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS).train(resume=True)
    sft_steps = [r["sft/step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "sft/step" in r]
    assert sft_steps == [1, 2]
