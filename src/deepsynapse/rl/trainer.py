"""The DeepSynapse GRPO training loop: one step reads top to bottom in ``Trainer.train_step``.

Objective (per optimizer step, N = B*G completions, tokens t of completion i):

    L = sum_{i,t} w_{i,t} * [ -min(r_{i,t} A_i, clip(r_{i,t}, 1-eps_low, 1+eps_high) A_i)
                              + beta * KL_k3(pi_theta || pi_ref)_{i,t} ]

with r = pi_theta / pi_old (per token, or GSPO's length-normalised sequence ratio),
A_i the group-relative advantage of the fused reward (``ADVANTAGE_ESTIMATORS``) and w the
aggregation weights (``LOSS_AGGREGATIONS``: DAPO token-level by default).

Departures from the GRPO paper, each a config switch:
- token-level loss normalisation by default (DAPO); ``grpo.loss_aggregation=sequence`` is
  the paper's; clip-higher (eps_high 0.28 > eps_low 0.2) by default for token ratios; GSPO's
  sequence ratio (``importance_sampling=sequence``) defaults to the paper's 3e-4 / 4e-4;
- the reference policy is the base model with the LoRA adapters switched off;
- pi_old = the policy that sampled; with ``num_iterations == 1`` (every shipped recipe) the
  ratio is exactly 1, so the clip (eps_low/eps_high) never applies and only the ratio's
  gradient matters (the paper's on-policy case); clipping acts only in the inner iterations
  of ``num_iterations > 1``;
- log-probs use the sampling temperature (the distribution actually sampled);
- dynamic sampling (DAPO) judges a group by *correctness*, not the shaped reward;
- an optional SFT warm-up on gold solutions in the XML format precedes RL: the embedded
  model never writes the format on its own, so without it every group has zero variance.

The phases: ``rl/collect.py`` (sample .. select), ``rl/update.py`` (reference .. update,
the step's metrics); around them ``rl/run.py`` (the run), ``rl/warmup.py``, ``rl/evaluation.py``,
``rl/state.py`` (checkpoints), ``rl/stopping.py`` (signals), ``rl/ranks.py`` (cross-process).

Run it on CPU: ``deepsynapse train`` (configs/demo-cpu.yaml), or for a quick look
``deepsynapse train model.name=tiny-random train.steps=2``.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from deepsynapse.checkpoint import latest_checkpoint
from deepsynapse.config import Config, ConfigError
from deepsynapse.control.build import build_controllers
from deepsynapse.control.curriculum import PhaseCurriculum, apply_locking, locking_summary
from deepsynapse.control.data_curriculum import DataCurriculum
from deepsynapse.control.knobs import Controller, Event, Knobs, check_knob_owners
from deepsynapse.data.distractors import attach_distractors
from deepsynapse.data.problems import Problem
from deepsynapse.formats import get_schema, stop_strings
from deepsynapse.models.adaptive import AdaptivePolicy
from deepsynapse.models.loading import load_tokenizer, resolve_dtype
from deepsynapse.models.policy import PolicyModule, trainable_parameters
from deepsynapse.models.scoring import PolicyScorer
from deepsynapse.rewards.engine import RewardEngine
from deepsynapse.rl.backend_trial import BackendTrial
from deepsynapse.rl.batch import GroupBatch
from deepsynapse.rl.budget import TimeBudget, parse_duration
from deepsynapse.rl.collect import (
    ProblemSampler,
    collect_groups,
    generate_batch,
    open_rollout_engine,
)
from deepsynapse.rl.evaluation import build_probes
from deepsynapse.rl.grpo import ADVANTAGE_ESTIMATORS
from deepsynapse.rl.ranks import agree_on_dtype, mean_metrics
from deepsynapse.rl.run import run_training
from deepsynapse.rl.setup import (  # noqa: F401  (find_run_dir: public here too)
    Timer,
    build_accelerator,
    build_policy,
    build_problems,
    default_run_dir,
    find_run_dir,
    step_seed,
)
from deepsynapse.rl.state import load_checkpoint, save_checkpoint
from deepsynapse.rl.stopping import StopRequest
from deepsynapse.rl.update import grpo_update, step_metrics
from deepsynapse.rl.warmup import SFTWarmup
from deepsynapse.telemetry.run_logger import RunLogger, fix_malloc_thresholds, release_freed_memory

SATURATED_WARN_SHARE = 0.5  # warn when this share of hypernetwork multipliers is saturated
NO_SIGNAL_WARN_SHARE = 0.5  # warn when this share of an update's advantage has no signal

# The knobs the loop reads (a knob a controller writes must be one of them: check_knob_owners).
KNOB_READS = frozenset(
    {
        "temperature",  # rollout, log-probs
        "beta",  # the loss's KL coefficient
        "reward_weights",  # fusion
        "active_rewards",  # which components score
        "max_new_tokens",  # rollout budget, loss aggregation
        "length_budget",  # the length penalty's column
        "micro_batches",  # the update's memory split
        "difficulty",  # which problems are sampled
        "trainable_groups",  # component locking
        "lora_rank",  # dynamic LoRA growth
        "accumulation_steps",  # rollout rounds per optimizer step
        "sft_weight",  # CHORD mixing
        "phase",  # progress bar, metrics
        "phase_index",  # metrics, the phase allocator
        "phase_step",  # metrics
    }
)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""


# ------------------------------------------------------------------ the trainer


class Trainer:
    """Builds everything from one config and runs SFT warm-up, GRPO steps and evaluation."""

    def __init__(
        self,
        cfg: Config,
        *,
        run_dir: str | Path | None = None,
        reward_fns: dict[str, Any] | None = None,
        controllers: list[Controller] | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.progress = progress
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.trim_memory:  # before the model loads: its buffers follow the rule too
            fix_malloc_thresholds()
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
        self.accelerator = build_accelerator(cfg, self.run_dir)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.plan = cfg.batch_plan(self.world)
        self.dtype_choice = agree_on_dtype(
            self.accelerator, resolve_dtype(cfg.model.dtype, self.accelerator.device)
        )
        self.schema = get_schema(cfg.rewards.schema)
        self.stops = stop_strings(self.schema)
        self.engine = RewardEngine(cfg, reward_fns, seed=cfg.train.seed)
        self.log = RunLogger(
            self.run_dir, self.accelerator, enabled=self.accelerator.is_main_process
        )

        # Data and controllers first: their errors should not wait for a model to load.
        self.train_problems, skipped = build_problems(cfg.data.train, "train", cfg)
        if self.engine.needs_distractors:
            self.train_problems = attach_distractors(self.train_problems)
        self.skipped_rows = skipped
        self.knobs = Knobs(
            temperature=cfg.rollout.temperature,
            beta=cfg.grpo.beta if self.engine.fusion.kl_in_loss else 0.0,
            reward_weights=dict(cfg.rewards.weights),
            max_new_tokens=cfg.rollout.max_new_tokens,
            micro_batches=self.plan.micro_batches,
            lora_rank=cfg.lora.r,
        )
        self.controllers: list[Controller] = (
            build_controllers(
                cfg.control,
                base=self.knobs,
                total_steps=cfg.train.steps,
                problems=self.train_problems,
                seed=cfg.train.seed,
                kl_in_loss=self.engine.fusion.kl_in_loss,
            )
            + self.engine.controllers()
            + list(controllers or [])
        )
        self.data_curriculum = next(
            (c for c in self.controllers if isinstance(c, DataCurriculum)), None
        )
        self.refuse_rank_growth_across_processes()
        self.sampler = ProblemSampler(
            self.train_problems,
            prompts_per_step=cfg.grpo.prompts_per_step,
            seed=cfg.train.seed,
            rank=self.rank,
            world=self.world,
            data_curriculum=self.data_curriculum,
            event=self.event,
        )
        self.tokenizer = load_tokenizer(cfg.model.name)
        torch.manual_seed(cfg.train.seed)  # LoRA A, hypernet and memory are initialised from this
        policy = build_policy(cfg, self.tokenizer, self.dtype_choice.dtype)
        self.adaptive = AdaptivePolicy(policy.peft_model, cfg)
        policy = policy.to(self.accelerator.device)
        named = trainable_parameters(policy)
        self.adapter_names = {n for n, _ in named}
        optimizer = torch.optim.AdamW(
            self.adaptive.param_groups(named, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.sft = SFTWarmup(
            cfg,
            accelerator=self.accelerator,
            policy=self.policy,
            adaptive=self.adaptive,
            tokenizer=self.tokenizer,
            schema=self.schema,
            engine=self.engine,
            train_problems=self.train_problems,
        )
        self.scorer = (
            PolicyScorer(
                self.unwrapped.peft_model,
                self.tokenizer,
                pad_multiple=cfg.model.pad_to_multiple_of,
            )
            if self.engine.needs_scorer
            else None
        )
        self.weights_version = 0  # bumped by every optimizer step, growth and load
        self.vllm, self.vllm_version, self.rollout_note = None, -1, ""
        self.resumed_config: dict[str, Any] | None = None  # the checkpoint's, on resume
        self.backend_trial: BackendTrial | None = None
        if cfg.rollout.backend == "auto" and self.accelerator.device.type == "cpu":
            # does the engine pay in this CPU's training process? measured on the run's
            # first GRPO steps; our decoder's turns come first, without the engine built
            from deepsynapse.rollout.vllm import fallback_note, why_vllm_cannot_serve

            reason = why_vllm_cannot_serve(self.unwrapped.peft_model, self.world)
            if reason is None:
                self.backend_trial = BackendTrial()
                self.rollout_note = BackendTrial.plan()
            else:
                self.rollout_note = fallback_note("auto", reason)
        elif cfg.rollout.backend != "ours":
            self.rollout_note = open_rollout_engine(self)
        self.step = 0
        self.sft_done = cfg.sft.steps == 0
        self.sft_step = 0  # warm-up steps done (checkpointed: a stop inside it resumes there)
        self.bad_steps = 0
        self.skipped_steps = 0
        self.dropped_groups = 0  # groups dynamic sampling dropped in the last step
        self.last_good_checkpoint: Path | None = None  # saved while no bad step was pending
        self.locked_groups: list[str] | None = None
        self.warned: set[str] = set()  # event kinds of warnings said (once a process)
        self.stop = StopRequest(self.accelerator, self.say)
        seconds = parse_duration(cfg.train.time_budget)
        self.budget = (
            TimeBudget(seconds, cfg.train.budget_sft_share, cfg.train.budget_counts_evaluations)
            if seconds
            else None
        )
        self.probe_items, self.emergence = build_probes(cfg)
        if self.emergence is not None:
            self.controllers.append(self.emergence)
        self.knob_owners = check_knob_owners(self.controllers, KNOB_READS)
        # controllers whose schedules are fractions of the run (re-scaled to a budget's plan)
        self.scheduled = [c for c in self.controllers if hasattr(c, "set_total_steps")]

    # -------------------------------------------------------------- small helpers

    def retarget_schedules(self, total_steps: int) -> None:
        """Scale schedules built for ``train.steps`` to the steps a time budget planned."""
        for controller in self.scheduled:
            controller.set_total_steps(total_steps)

    def refuse_rank_growth_across_processes(self) -> None:
        """LoRA rank growth replaces parameters, which a DDP-wrapped model cannot follow:
        refuse it at build rather than skip it silently while logging the asked rank."""
        if self.world == 1:
            return
        asked = {
            p.lora_rank
            for c in self.controllers
            if isinstance(c, PhaseCurriculum)
            for p in c.phases
            if p.lora_rank not in (None, self.cfg.lora.r)
        }
        if asked:
            raise ConfigError(
                f"control.curriculum.phases[].lora_rank: ranks {sorted(asked)} differ from "
                f"lora.r={self.cfg.lora.r}; LoRA rank growth runs in one process only "
                f"({self.world} here). Set the phases' lora_rank to {self.cfg.lora.r} or "
                "control.curriculum.default_ranks=[]"
            )

    @property
    def unwrapped(self) -> PolicyModule:
        return self.accelerator.unwrap_model(self.policy)

    def event(self, kind: str, message: str, **evidence: Any) -> None:
        self.log.event(self.step, Event(kind, message, evidence))

    def say(self, text: str) -> None:
        if self.accelerator.is_main_process:
            print(f"[deepsynapse] {text}", flush=True)

    @property
    def draw_seed(self) -> int:
        """The seed of GRPO steps' draws: ``train.draw_seed``, else ``train.seed``."""
        draw = self.cfg.train.draw_seed
        return self.cfg.train.seed if draw is None else draw

    def seed(self, step: int, salt: int = 0) -> None:
        s = step_seed(self.draw_seed, step, self.rank, salt)
        random.seed(s)
        torch.manual_seed(s)

    # -------------------------------------------------------------- one step, top to bottom

    def train_step(self, step: int) -> dict[str, float]:
        """One GRPO step as named, timed phases (``timing/<phase>``; ``timing/step`` = wall).

        sample -> generate -> parse -> reward -> fuse (per rollout round) -> select ->
        advantage -> reference (and old log-probs) -> update -> observe.
        """
        cfg, timer = self.cfg, Timer()
        start = time.perf_counter()
        knobs = self.knobs.copy()
        for controller in self.controllers:
            controller.apply(knobs)
        self.apply_structure(knobs, step)  # component locking, LoRA rank growth
        self.seed(step)
        with self.adaptive.step_context(step_seed(self.draw_seed, step, 0, salt=23)):
            batch, drawn = collect_groups(self, step, knobs, timer)
            with timer("advantage"):
                batch.advantages = ADVANTAGE_ESTIMATORS[cfg.grpo.advantage](
                    batch.reward, cfg.rollout.num_generations
                )
                batch = batch.to(self.accelerator.device)  # what the loss reads lives with it
            update = self.update(batch, knobs, step, timer)
        with timer("observe"):
            metrics = step_metrics(self, batch, drawn, update, knobs)
            shared = mean_metrics(self.accelerator, metrics)  # every rank decides alike
            for controller in self.controllers:
                for ev in controller.observe(step, shared):
                    self.log.event(step, ev)
            for controller in self.controllers:
                metrics.update(getattr(controller, "metrics", dict)())
            self.knobs = knobs
            self._last_batch = batch
            if cfg.train.trim_memory:  # the step's activations are gone: give their pages back
                release_freed_memory()
        for name, sec in timer.seconds.items():
            metrics[f"timing/{name}"] = sec
        metrics["timing/step"] = time.perf_counter() - start
        tokens = float(batch.rollout.lengths.sum()) * self.world
        metrics["rollout/vllm"] = float(batch.sampler_logp is not None)  # which sampler drew
        metrics["throughput/completion_tokens_per_s"] = tokens / max(
            timer.seconds.get("generate", 0.0), 1e-9
        )
        metrics["throughput/tokens_per_s"] = tokens / max(metrics["timing/step"], 1e-9)
        self.warn_saturated_hypernet(metrics.get("hypernet/scale_saturated", 0.0))
        self.warn_advantage_without_signal(metrics["advantage/no_signal_share"])
        return metrics

    def warn_once(self, kind: str, message: str, **evidence: Any) -> None:
        """Say a warning and log its event the first time ``kind`` comes up in this process."""
        if kind in self.warned:
            return
        self.warned.add(kind)
        self.say(f"warning: {message}")
        self.event(kind, message, **evidence)

    def warn_saturated_hypernet(self, share: float) -> None:
        """Say once when most hypernetwork multipliers sit at tanh's bounds, where their
        gradient vanishes (full's first hour runs: all of them at 2.0 from the first step)."""
        if share >= SATURATED_WARN_SHARE:
            self.warn_once(
                "hypernet_saturated",
                f"{share:.0%} of the hypernetwork's multipliers are saturated (1 +- "
                "hypernet.max_change): they no longer learn; lower its learning rate or "
                "raise hypernet.max_change",
                share=share,
            )

    def warn_advantage_without_signal(self, share: float) -> None:
        """Say once when most of an update comes from groups whose correctness is uniform:
        it then follows the auxiliary rewards' differences, not right answers."""
        if share >= NO_SIGNAL_WARN_SHARE:
            self.warn_once(
                "advantage_without_signal",
                f"{share:.0%} of this update's advantage comes from groups whose correctness "
                "does not vary, scaled from the other rewards' differences (the demo lost 16.7 "
                "points held-out so); grpo.dynamic_sampling=true drops such groups",
                share=share,
            )

    def lock_groups(self, groups: list[str]) -> None:
        """Train only ``groups`` of the added parameters (a ``locking`` event when it changes)."""
        if groups == self.locked_groups:
            return
        changes = apply_locking(self.unwrapped, groups, lockable=self.adapter_names)
        self.locked_groups = list(groups)
        if changes:
            self.event(
                "locking",
                f"trainable groups: {', '.join(groups)}",
                changes=locking_summary(changes),
            )

    def apply_structure(self, knobs: Knobs, step: int) -> None:
        """What the knobs say about the model itself: trainable groups and LoRA rank."""
        self.lock_groups(knobs.trainable_groups)
        if knobs.lora_rank is not None:
            info = self.adaptive.maybe_grow(
                knobs.lora_rank, self.optimizer, step_seed(self.draw_seed, step, 0, salt=17)
            )
            if info:
                self.weights_version += 1
                self.event(
                    "lora_growth", f"LoRA rank {info['old_rank']} -> {info['new_rank']}", **info
                )

    def rollout(self, problems: list[Problem], knobs: Knobs) -> GroupBatch:
        """The generate phase of a rollout round (``rl/collect.py``)."""
        return generate_batch(self, problems, knobs)

    def update(self, batch: GroupBatch, knobs: Knobs, step: int, timer: Timer) -> dict[str, float]:
        """The GRPO update of the step (``rl/update.py``)."""
        return grpo_update(self, batch, knobs, step, timer)

    def clip_and_step(self) -> float:
        """Clip, check for non-finite gradients (skip the step if so), step, zero."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.cfg.optim.max_grad_norm
        if max_norm > 0:
            norm = float(self.accelerator.clip_grad_norm_(params, max_norm))
        else:
            norm = float(
                torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            )
        if math.isfinite(norm):
            self.optimizer.step()
            self.weights_version += 1
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            self.event(
                "nonfinite_gradients",
                "gradient norm is not finite; optimizer step skipped",
                grad_norm=str(norm),
                in_a_row=self.bad_steps,
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            last = self.last_good_checkpoint
            if last is None or not last.exists():  # rotated away, or saved before a resume
                last = latest_checkpoint(self.run_dir / "checkpoints")
            raise TrainingDiverged(
                f"{self.bad_steps} steps in a row had non-finite loss or gradients (lower "
                f"optim.lr, or check the rewards); last good checkpoint: {last or 'none'}"
            )
        return norm

    # -------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path | None:
        """``checkpoints/step-N`` for the current step (``rl/state.py``)."""
        return save_checkpoint(self)

    def load_checkpoint(self, folder: Path) -> None:
        """Restore a checkpoint of this setup (``rl/state.py``)."""
        load_checkpoint(self, folder)

    # -------------------------------------------------------------- the run

    def train(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Run to ``train.steps``; ``stop_after`` ends this invocation early (checkpointed)."""
        return run_training(self, resume, stop_after)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
