"""What a run is built from: accelerator, trackers, problems, policy, schedules, timers.

Named ``build_*`` functions, each a pure step from the config, so the trainer's constructor
reads as a list of them and tests can build one piece alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from deepsynapse.checkpoint import CheckpointError
from deepsynapse.config import Config
from deepsynapse.data.gsm8k import load_gsm8k
from deepsynapse.data.problems import Problem
from deepsynapse.data.synthetic import (
    HELDOUT_SIZE,
    VARIANTS,
    heldout_problems,
    training_problems,
)
from deepsynapse.models.loading import load_model
from deepsynapse.models.policy import PolicyModule, apply_lora


def build_accelerator(cfg: Config, run_dir: Path):
    """Accelerate owns processes, devices, DDP and the trackers (TensorBoard, W&B, ...)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    trackers = list(cfg.train.trackers) or None
    # Component locking freezes parameter groups mid-run: DDP must expect unused ones.
    handlers = (
        [DistributedDataParallelKwargs(find_unused_parameters=True)]
        if cfg.control.curriculum.enabled
        else []
    )
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=handlers,
        log_with=trackers,
        project_dir=str(run_dir / "trackers") if trackers else None,
    )


def finish_trackers(accelerator) -> None:
    """Close the trackers at a run's end, leaving the process group up: a script may train
    again, evaluate or export under the same launch (``Accelerator.end_training`` would tear
    the group down under it); the command line ends the group when it exits."""
    for tracker in accelerator.trackers:
        tracker.finish()


def end_processes() -> None:
    """End the process group of a distributed launch (a no-op in one process): the command
    line's last act, so no rank exits with its group still open. A script that trains under
    torchrun should end with it too: a rank that exits with a gloo group open can abort in the
    group's teardown ("terminate called without an active exception", pytorch#190489)."""
    from accelerate import PartialState

    PartialState().destroy_process_group()


def init_trackers(accelerator, cfg: Config, run_dir: Path) -> None:
    """Start the configured trackers; W&B runs offline unless WANDB_MODE says otherwise."""
    if not cfg.train.trackers:
        return
    flat = {
        f"{section}.{k}": v for section, fields in cfg.to_dict().items() for k, v in fields.items()
    }
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
    accelerator.init_trackers(
        project_name="deepsynapse",
        config=flat,
        init_kwargs={
            "wandb": {
                "dir": str(run_dir),
                "name": run_dir.name,
                "mode": os.environ.get("WANDB_MODE", "offline"),
            }
        },
    )


def build_problems(
    name: str, split: str, cfg: Config, *, seed_offset: int = 0
) -> tuple[list[Problem], int]:
    """Problems for ``name``: 'synthetic' or any GSM8K source that ``load_gsm8k`` resolves.

    Synthetic training problems come from one partition of question texts and the synthetic
    test split is the fixed held-out set from the other (``data.synthetic``), so no training
    seed can draw an evaluation problem.
    """
    if name == "synthetic":
        if split == "train":
            lo, hi = cfg.data.synthetic_difficulty
            seed = cfg.train.seed + seed_offset
            problems = training_problems(
                cfg.data.synthetic_size,
                seed=seed,
                difficulty=(lo, hi),
                variants=cfg.data.synthetic_variants,
                variant_kinds=cfg.data.synthetic_variant_kinds or VARIANTS,
            )
            return problems, 0
        # the held-out set of record: fixed, stratified, never drawn by training
        return heldout_problems(HELDOUT_SIZE, cfg.data.heldout_difficulty), 0
    return load_gsm8k(name, split, skip_malformed=cfg.data.skip_malformed)


def build_policy(cfg: Config, tokenizer, dtype: torch.dtype) -> PolicyModule:
    base = load_model(cfg.model.name, dtype=dtype, tokenizer=tokenizer)
    if cfg.model.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    peft_model = apply_lora(
        base, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules
    )
    return PolicyModule(
        peft_model,
        chunk_tokens=cfg.grpo.logprob_chunk_tokens,
        pad_multiple=cfg.model.pad_to_multiple_of,
        share_prefix=cfg.model.share_prefix,
    )


def learning_rate(cfg: Config, step: int, steps: int | None = None) -> float:
    """Peak lr with linear warm-up then constant, linear or cosine decay (a pure function).

    ``steps``: the run's GRPO steps when a time budget planned fewer than ``train.steps``.
    """
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    total = max((cfg.train.steps if steps is None else steps) - o.warmup_steps, 1)
    progress = min(max(step - o.warmup_steps, 0) / total, 1.0)
    if o.schedule == "linear":
        return o.lr * (1.0 - progress)
    if o.schedule == "cosine":
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.lr


def step_seed(seed: int, step: int, rank: int, salt: int = 0) -> int:
    """Every step reseeds from (seed, step, rank): resuming replays exactly the same draws."""
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + salt * 7) % (2**31 - 1)


class Timer:
    """Seconds spent in each named phase of a step (``timing/<phase>``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def default_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    return Path(cfg.train.output_dir) / name


def find_run_dir(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "config.yaml").is_file():
        raise CheckpointError(f"{p} is not a run folder (no config.yaml)")
    return p
