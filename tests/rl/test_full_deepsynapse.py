"""Every DeepSynapse part on at once, on the tiny model: rewards, controllers, adaptive policy.

One run passes through the three curriculum phases (low thresholds), grows the LoRA rank at
each phase change, locks attention LoRA in phase 1, moves reward weights with the neural
allocator, discovers reward terms, and resumes exactly from the middle of phase 2.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXTRA_REWARDS, TINY
from safetensors.torch import load_file

from deepsynapse.config import load_config
from deepsynapse.rl.trainer import Trainer
from deepsynapse.telemetry.run_logger import read_jsonl

COMPONENTS = [
    "correctness",
    "strict_format",
    "soft_format",
    "structure",
    "length_penalty",
    "calibration",
    "critique_consistency",
    "contrastive",
    "verifier",
    "repeat_mistake",
    "novelty",
    "completion_length",
]
PHASES = (
    "[{name: structure, trainable_groups: [lora_mlp, hypernet, memory], lora_rank: 4, min_steps: 2,"
    " temperature: [1.0, 0.8], exit: {metric: completion/length_mean, threshold: 0, window: 1}},"
    " {name: reasoning, lora_rank: 8, min_steps: 2,"
    " exit: {metric: completion/length_mean, threshold: 0, window: 1}},"
    " {name: precision, lora_rank: 16, beta: 0.08}]"
)
FULL = [o for o in TINY if not o.startswith(("rewards.weights", "train.steps", "sft.steps"))] + [
    "train.steps=6",
    "sft.steps=1",
    "eval.limit=0",
    "rewards.schema=deepsynapse",
    "rewards.weights={" + ", ".join(f"{c}: 0.3" for c in COMPONENTS) + "}",
    "rewards.calibration=running",
    "rewards.allocator=neural",
    "rewards.allocator_options={seed: 0, exploration_std: 0.5, lr: 0.5, event_threshold: 0.001,"
    " target: rewards/completion_length/mean}",
    "rewards.verifier_backbone=hashing",
    "discovery.enabled=true",
    "discovery.min_records=4",
    "discovery.patience=1",
    "discovery.on_threshold=0.1",
    "control.curriculum.enabled=true",
    f"control.curriculum.phases={PHASES}",
    "control.kl_temperature.enabled=true",
    "control.kl_temperature.kl_target=0.0001",
    "control.accumulation.enabled=true",
    "control.accumulation.max_steps=2",
    "control.accumulation.low=0.99",
    "control.accumulation.high=1.0",
    "control.accumulation.warmup=1",
    "control.accumulation.cooldown=1",
    "control.data_curriculum.enabled=true",
    "control.sft_mixing.enabled=true",
    "control.sft_mixing.mu0=0.3",
    "control.sft_mixing.decay_steps=4",
    "control.sft_mixing.batch_size=2",
    "lora.module_scales=true",
    "hypernet.enabled=true",
    "hypernet.bottleneck=8",
    "memory.enabled=true",
    "memory.slots=4",
    "memory.heads=2",
]


def train(run_dir, overrides=FULL, **kwargs):
    trainer = Trainer(
        load_config(None, overrides), run_dir=run_dir, progress=False, reward_fns=EXTRA_REWARDS
    )
    trainer.train(**kwargs)
    return trainer


def adapter(run_dir, step):
    return load_file(str(run_dir / f"checkpoints/step-{step}/adapter/adapter_model.safetensors"))


# One trained run shared by every test here: all heavy together, so one worker builds it.
pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    train(run_dir, FULL + ["train.keep_checkpoints=10"])
    return run_dir


def steps_of(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/fused/mean" in r]


def test_every_reward_component_is_logged_calibrated_and_weighted(full_run):
    rows = steps_of(full_run)
    assert len(rows) == 6
    for name in COMPONENTS:
        assert f"rewards/{name}/mean" in rows[0], name
        assert f"weights/{name}" in rows[0], name
    assert any(k.endswith("/calibrated_mean") for k in rows[0])
    # The neural allocator's weights visibly move.
    moved = max(abs(r["weights/correctness"] - rows[0]["weights/correctness"]) for r in rows)
    assert moved > 1e-3
    kinds = {e["kind"] for e in read_jsonl(full_run / "events.jsonl")}
    assert "reward_weights" in kinds
    assert kinds & {"reward_candidate", "reward_discovered"}


def test_curriculum_passes_three_phases_with_changing_knobs(full_run):
    import json

    phases = json.loads((full_run / "summary.json").read_text())["phases"]
    assert [(p["phase"], p["from_step"]) for p in phases] == [
        ("structure", 1),
        ("reasoning", 3),
        ("precision", 5),
    ]
    rows = steps_of(full_run)
    assert [r["curriculum/phase"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert [r["lora/rank"] for r in rows] == [4, 4, 8, 8, 16, 16]
    assert len({round(r["knobs/temperature"], 6) for r in rows}) > 1
    assert len({round(r["knobs/beta"], 6) for r in rows}) > 1
    assert len({r["knobs/accumulation_steps"] for r in rows}) > 1
    assert rows[0]["trainable/tensors"] < rows[2]["trainable/tensors"]  # attention unlocked
    assert rows[0]["knobs/sft_weight"] > 0 and "sft/aux_loss" in rows[0]
    assert "hypernet/scale_mean" in rows[0] and "memory/gate" in rows[0]
    events = read_jsonl(full_run / "events.jsonl")
    kinds = [e["kind"] for e in events]
    assert kinds.count("phase_transition") == 2
    assert kinds.count("lora_growth") == 2
    assert "locking" in kinds and "accumulation_changed" in kinds


def test_locked_parameters_stay_bit_identical_while_locked(full_run):
    first, second = adapter(full_run, 1), adapter(full_run, 2)  # both in phase 1
    attn = [k for k in first if "self_attn" in k]
    mlp = [k for k in first if "mlp" in k]
    assert attn and mlp
    assert all(torch.equal(first[k], second[k]) for k in attn)
    assert any(not torch.equal(first[k], second[k]) for k in mlp)
    third = adapter(full_run, 3)  # phase 2 unlocks attention (and grew the rank to 8)
    assert any(
        not torch.equal(third[k][: first[k].shape[0], : first[k].shape[1]], first[k]) for k in attn
    )


def test_resume_in_phase_two_continues_exactly(full_run, tmp_path):
    split = tmp_path / "split"
    train(split, stop_after=3)  # stops at step 3: phase 2, rank 8
    state = read_jsonl(split / "metrics.jsonl")[-1]
    assert state["curriculum/phase"] == 1
    train(split, resume=True)
    a, b = adapter(full_run, 6), adapter(split, 6)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    straight, resumed = steps_of(full_run), steps_of(split)
    for key in (
        "knobs/temperature",
        "knobs/beta",
        "knobs/accumulation_steps",
        "weights/correctness",
    ):
        assert [round(r[key], 6) for r in straight] == [round(r[key], 6) for r in resumed], key
