"""What a checkpoint holds of a run, and restoring it (the atomic write is ``checkpoint.py``'s).

``checkpoints/step-N/``: the LoRA adapter, the optimizer, and ``trainer_state`` (step, data
cursor, warm-up progress, knobs, controllers, reward learners, adaptive parts, RNG, and the
``identity`` a resuming run must share).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from deepsynapse.checkpoint import CheckpointError, load_tree, save_tree, write_checkpoint
from deepsynapse.config import Config
from deepsynapse.control.curriculum import apply_locking
from deepsynapse.models.adaptive import AdaptivePolicy
from deepsynapse.models.trained import restore_policy_state


def save_checkpoint(trainer) -> Path | None:
    """``checkpoints/step-N`` for the trainer's current step (written by the main process)."""
    acc = trainer.accelerator
    acc.wait_for_everyone()
    path = None
    if acc.is_main_process:

        def write(folder: Path) -> None:
            trainer.unwrapped.peft_model.save_pretrained(folder / "adapter")
            if trainer.unwrapped.reference_state is not None:  # the KL's anchor
                save_tree(trainer.unwrapped.reference_state, folder, "reference")
            save_tree(trainer.optimizer.state_dict(), folder, "optimizer")
            save_tree(trainer_state(trainer), folder, "trainer_state")

        path = write_checkpoint(
            trainer.run_dir / "checkpoints",
            trainer.step,
            write,
            trainer.cfg.train.keep_checkpoints,
            pinned=(0,) if trainer.cfg.sft.steps else (),  # the warm-up's end, GRPO's start
        )
        trainer.event("checkpoint", f"saved {path.name}", path=str(path))
        if trainer.bad_steps == 0:
            trainer.last_good_checkpoint = path
    acc.wait_for_everyone()
    # A save leaves thousands of reference cycles (safetensors' ctypes views of each
    # tensor) that only a full collection frees, and with a large heap of long-lived
    # objects those are rare: without this, each SmolLM2 save kept ~0.4 MB (0.1 with it).
    gc.collect()
    return path


def trainer_state(trainer) -> dict[str, Any]:
    """The ``trainer_state`` tree of a checkpoint."""
    return {
        "step": trainer.step,
        "cursor": trainer.sampler.cursor,
        "sft_done": trainer.sft_done,
        "sft_step": trainer.sft_step,
        "budget": None if trainer.budget is None else trainer.budget.state_dict(),
        "bad_steps": trainer.bad_steps,
        "skipped_steps": trainer.skipped_steps,
        "locked_groups": trainer.locked_groups,
        "backend_trial": None
        if trainer.backend_trial is None
        else trainer.backend_trial.state_dict(),
        "controllers": {c.name: c.state_dict() for c in trainer.controllers},
        "rewards": trainer.engine.state_dict(),
        "adaptive": trainer.adaptive.state_dict(),
        "identity": identity(trainer.cfg, trainer.adaptive),
        "rng": {"torch": torch.get_rng_state()},
        "world_size": trainer.world,
        "config": trainer.cfg.to_dict(),
    }


def identity(cfg: Config, adaptive: AdaptivePolicy) -> dict[str, Any]:
    """What a checkpoint must share with the run that loads it."""
    return {
        "model": cfg.model.name,
        "schema": cfg.rewards.schema,
        "lora_r": cfg.lora.r,
        "lora_targets": list(cfg.lora.target_modules),
        "rewards": sorted(cfg.rewards.weights),
        **adaptive.identity(),
    }


def load_checkpoint(trainer, folder: Path) -> None:
    """Restore everything a step depends on; refuse a checkpoint made for another setup."""
    state = load_tree(folder, "trainer_state")
    theirs, ours = state.get("identity", {}), identity(trainer.cfg, trainer.adaptive)
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        detail = "; ".join(
            f"{k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in diff.items()
        )
        raise CheckpointError(f"{folder} was made for another setup ({detail})")
    restore_policy_state(
        trainer.unwrapped.peft_model, trainer.adaptive, folder, trainer.optimizer, state=state
    )
    trainer.optimizer.load_state_dict(load_tree(folder, "optimizer"))
    if (folder / "reference.json").is_file():
        trainer.unwrapped.reference_state = load_tree(folder, "reference")
    trainer.weights_version += 1
    trainer.step = int(state["step"])
    trainer.sampler.cursor = int(state.get("cursor", 0))
    trainer.sft_done = bool(state["sft_done"])
    trainer.sft_step = int(state.get("sft_step", trainer.cfg.sft.steps if trainer.sft_done else 0))
    if trainer.budget is not None and state.get("budget"):
        trainer.budget.load_state_dict(state["budget"])
        if trainer.budget.grpo_steps is not None:
            trainer.retarget_schedules(trainer.budget.grpo_steps)
    trainer.bad_steps = int(state.get("bad_steps", 0))
    trainer.skipped_steps = int(state.get("skipped_steps", 0))
    # The base knobs are neither saved nor restored: they are the configuration's values
    # (controllers change a copy each step and keep their own state), so a setting changed on
    # resume (``rollout.temperature=1.2``) acts; ``note_setting_changes`` says which changed.
    trainer.resumed_config = state.get("config")
    trainer.engine.load_state_dict(state["rewards"])
    for c in trainer.controllers:
        if c.name in state["controllers"]:
            c.load_state_dict(state["controllers"][c.name])
    groups = state.get("locked_groups")
    if groups is not None:
        apply_locking(trainer.unwrapped, groups, lockable=trainer.adapter_names)
        trainer.locked_groups = list(groups)
    trial = state.get("backend_trial")
    if trainer.backend_trial is not None and trial is not None:
        try:
            trainer.backend_trial.load_state_dict(trial)
        except ValueError as exc:
            raise CheckpointError(f"{folder}/trainer_state.json: {exc}") from exc
    torch.set_rng_state(state["rng"]["torch"])
