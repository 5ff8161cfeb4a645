"""Supervised steps on worked solutions: the SFT warm-up before RL, and CHORD's SFT term in it.

The embedded model never writes the XML format on its own, so without a warm-up every group
has zero variance. ``sft.steps`` supervised steps on gold solutions rewritten into the schema
come first (``run_warmup``); with ``control.sft_mixing`` (CHORD) each GRPO step then adds a
decaying SFT term, ``L = (1 - mu) L_GRPO + mu L_SFT``, on gold solutions or on verified
solutions of rarely solved problems from the episodic memory (``SFTWarmup.mixing_backward``).
"""

from __future__ import annotations

import random
import time

import torch

from deepsynapse.config import Config
from deepsynapse.control.sft_mixing import chord_phi_weights
from deepsynapse.data.problems import Problem
from deepsynapse.formats import XMLSchema, sft_target
from deepsynapse.models.adaptive import AdaptivePolicy
from deepsynapse.prompting import build_prompt
from deepsynapse.rewards.engine import RewardEngine
from deepsynapse.rl.budget import (
    PLAN_AFTER,
    announce_replan,
    evals_to_come,
    planned_sft_steps,
)
from deepsynapse.rl.ranks import reduce_scalar
from deepsynapse.rl.setup import build_problems, step_seed
from deepsynapse.rollout.hf import encode_prompts
from deepsynapse.telemetry.run_logger import release_freed_memory

LENGTH_SAMPLE = 256  # worked solutions measured by the answer-length check
LENGTH_WARN_SHARE = 0.05  # warn when more than this share would be cut off


class SFTWarmup:
    """Worked solutions rewritten into the schema, and their NLL under the policy."""

    def __init__(
        self,
        cfg: Config,
        *,
        accelerator,
        policy: torch.nn.Module,
        adaptive: AdaptivePolicy,
        tokenizer,
        schema: XMLSchema,
        engine: RewardEngine,
        train_problems: list[Problem],
    ):
        self.cfg = cfg
        self.accelerator = accelerator
        self.policy = policy  # as prepared by Accelerate (DDP-wrapped with several processes)
        self.adaptive = adaptive
        self.tokenizer = tokenizer
        self.schema = schema
        self.engine = engine
        self.train_problems = train_problems
        self._pool: list[Problem] | None = None

    def pool(self) -> list[Problem]:
        """Problems with worked solutions for supervised steps (loaded once)."""
        if self._pool is None:
            problems, _ = build_problems(self.cfg.sft.data, "train", self.cfg, seed_offset=1)
            self._pool = [p for p in problems if p.solution]
        return self._pool

    def examples(self, k: int, batch_size: int, salt: int) -> tuple[list[str], list[str]]:
        """This process's share of ``batch_size`` gold solutions, rewritten into the schema."""
        pool = self.pool()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        rng = random.Random(step_seed(self.cfg.train.seed, k, 0, salt=salt))
        chosen = [pool[rng.randrange(len(pool))] for _ in range(batch_size * world)]
        chosen = chosen[rank::world]
        eos = self.tokenizer.eos_token or ""
        prompts = [build_prompt(self.tokenizer, p.question, self.schema) for p in chosen]
        targets = [sft_target(p, self.schema, rng, eos=eos) for p in chosen]
        return prompts, targets

    def target_lengths(self, k: int = LENGTH_SAMPLE) -> list[int]:
        """Token counts of ``k`` worked solutions in the schema (a fixed sample), sorted."""
        pool = self.pool()
        rng = random.Random(step_seed(self.cfg.train.seed, 0, 0, salt=55))
        chosen = rng.sample(pool, min(k, len(pool)))
        texts = [sft_target(p, self.schema, rng) for p in chosen]
        return sorted(len(self.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)

    def loss(self, prompts: list[str], targets: list[str], phi: bool = False) -> torch.Tensor:
        """Token-mean NLL of ``targets`` after ``prompts`` (CHORD's p(1-p) weights if ``phi``)."""
        device = self.accelerator.device
        pid, pmask = encode_prompts(self.tokenizer, prompts, device)
        self.tokenizer.padding_side = "right"
        try:
            enc = self.tokenizer(
                targets, return_tensors="pt", padding=True, add_special_tokens=False
            )
        finally:
            self.tokenizer.padding_side = "left"
        cid, cmask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        with self.adaptive.for_rows(pid, pmask):
            out = self.policy(torch.cat([pid, cid], 1), torch.cat([pmask, cmask], 1), cmask)
        weights = chord_phi_weights(out.logp) * cmask if phi else cmask.float()
        return -(out.logp * weights).sum() / cmask.sum().clamp(min=1)

    def mixing_backward(self, step: int, mu: float) -> float:
        """The auxiliary SFT term of a GRPO step (CHORD), from gold or verified hard solutions."""
        mix = self.cfg.control.sft_mixing
        prompts, targets = [], []
        if mix.source == "hard_solved":
            solved = self.engine.memory.solved_examples(mix.batch_size, mix.max_solve_rate)
            by_id = {p.id: p for p in self.train_problems}
            for ex in solved:
                problem = by_id.get(ex.get("problem_id"))
                if problem is not None and ex.get("completion"):
                    prompts.append(build_prompt(self.tokenizer, problem.question, self.schema))
                    targets.append(ex["completion"] + (self.tokenizer.eos_token or ""))
        if not prompts:  # gold solutions (also the fallback while memory holds none)
            prompts, targets = self.examples(step, mix.batch_size, salt=77)
        loss = mu * self.loss(prompts, targets, phi=mix.token_weighting == "chord_phi")
        self.accelerator.backward(loss)
        return float(loss.detach())


def check_answer_lengths(trainer) -> dict[str, float] | None:
    """Warn when the schema's worked solutions are longer than the completion budgets.

    A model taught to write answers longer than ``rollout.max_new_tokens`` has them cut off
    in its rollouts: no closing tag, no answer, format-invalid, no reward. Measured: under the
    ``deepsynapse`` schema (critique and confidence) 17% of difficulty-2 and 88% of
    difficulty-3 synthetic solutions exceed 128 tokens, and full DeepSynapse's hour run on
    such a budget truncated 10-35% of its training completions. Returns the lengths measured
    (None without a warm-up) and logs them as a ``length_check`` event.
    """
    if not trainer.cfg.sft.steps or not trainer.sft.pool():
        return None
    cfg, lengths = trainer.cfg, trainer.sft.target_lengths()
    n = len(lengths)
    found = {
        "mean": sum(lengths) / n,
        "p95": float(lengths[int(0.95 * (n - 1))]),
        "max": float(lengths[-1]),
    }
    budgets = {
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
    }
    for key, cap in budgets.items():
        found[f"over/{key}"] = sum(length > cap for length in lengths) / n
    short = [k for k in budgets if found[f"over/{k}"] > LENGTH_WARN_SHARE]
    message = (
        f"worked solutions in the {trainer.schema.name!r} schema: {found['mean']:.0f} tokens "
        f"on average, {found['p95']:.0f} at the 95th percentile"
    )
    if short:
        cut = ", ".join(f"{found[f'over/{k}']:.0%} exceed {k}={budgets[k]}" for k in short)
        message += (
            f"; {cut}: such answers are cut off before their last tag. "
            f"Raise {' and '.join(short)} to at least {found['p95'] + 16:.0f}"
        )
        trainer.say(f"warning: {message}")
    trainer.event("length_check", message, **found)
    return found


def warmup_step(trainer, k: int) -> tuple[list[str], float, float]:
    """Warm-up step ``k``: its examples, the learning rate's ramp, one optimizer step.

    Returns this process's targets, the loss (mean over processes) and the gradient norm;
    ``benchmarks/sft_step.py`` times this against a bare transformers + PEFT step.
    """
    cfg, acc = trainer.cfg, trainer.accelerator
    prompts, targets = trainer.sft.examples(k, cfg.sft.batch_size, salt=99)
    for group in trainer.optimizer.param_groups:
        group["lr"] = (
            cfg.sft.lr * min(1.0, (k + 1) / max(1, cfg.sft.steps // 10)) * group.get("lr_mult", 1.0)
        )
    loss = trainer.sft.loss(prompts, targets)
    acc.backward(loss)
    norm = trainer.clip_and_step()
    if trainer.world > 1:
        return targets, float(acc.reduce(loss.detach(), reduction="mean")), norm
    return targets, float(loss.detach()), norm


def plan_warmup(trainer, targets: list[str], seconds: float, bar) -> None:
    """The budget's warm-up plan after a step of ``seconds``: made once ``PLAN_AFTER`` steps
    are measured, then made again at the recent pace (``TimeBudget.sft_replan_due``). Every
    process runs the fewest steps any planned on its own clock (see run.py)."""
    cfg, budget, done = trainer.cfg, trainer.budget, trainer.sft_step
    if budget.sft_steps is None:
        if done < min(PLAN_AFTER, cfg.sft.steps):
            return
        lengths = [len(trainer.tokenizer(t, add_special_tokens=False).input_ids) for t in targets]
        budget.expect_completions(sum(lengths) / len(lengths), cfg.eval.max_new_tokens)
        planned = budget.plan_sft(cfg.sft.steps, done, seconds, evals_to_come(trainer))
        planned = budget.sft_steps = int(reduce_scalar(trainer.accelerator, planned, "min"))
        bar.total = planned
        trainer.say(
            f"time budget: a warm-up step takes {seconds:.1f} s; "
            f"{planned} of {cfg.sft.steps} warm-up steps planned"
        )
        trainer.event("budget_plan", budget.describe(), sft_steps=planned)
        return
    budget.observe_sft_step(seconds)
    if not budget.sft_replan_due(done):
        return
    before = budget.sft_steps
    planned = budget.replan_sft(cfg.sft.steps, done, evals_to_come(trainer))
    planned = budget.sft_steps = int(reduce_scalar(trainer.accelerator, planned, "min"))
    window, evidence = len(budget.sft_recent), {"sft_step": done, "sft_steps": planned}
    announce_replan(trainer, bar, "warm-up", before, planned, budget.sft_pace, window, **evidence)


def run_warmup(trainer) -> bool:
    """Supervised steps on gold solutions rewritten into the XML format (cold start).

    Resumes at ``trainer.sft_step``; checkpoints every ``train.save_every`` warm-up steps and
    when a stop is requested. Returns whether the warm-up finished.
    """
    cfg, acc = trainer.cfg, trainer.accelerator
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.sft.steps,
        initial=trainer.sft_step,
        desc="sft warm-up",
        disable=not (trainer.progress and acc.is_main_process),
    )
    loss_value = None
    trainer.lock_groups(cfg.sft.trainable_groups)
    clock = trainer.budget.clock if trainer.budget is not None else time.perf_counter
    while trainer.sft_step < planned_sft_steps(trainer) and not trainer.stop.requested():
        k = trainer.sft_step
        start = clock()
        targets, loss_value, norm = warmup_step(trainer, k)
        seconds = clock() - start
        trainer.log.metrics(
            0,
            {
                "sft/step": k + 1,
                "sft/loss": loss_value,
                "sft/grad_norm": norm,
                "timing/sft_step": seconds,
            },
        )
        trainer.sft_step = k + 1
        if trainer.budget is not None:
            plan_warmup(trainer, targets, seconds, bar)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        due = cfg.train.save_every and trainer.sft_step % cfg.train.save_every == 0
        if due and trainer.sft_step < planned_sft_steps(trainer):
            trainer.save_checkpoint()
    bar.close()
    if trainer.sft_step < planned_sft_steps(trainer):
        return False
    # RL starts with fresh Adam moments: SFT's gradient scale is not RL's.
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.state.clear()
    if cfg.train.trim_memory:  # the warm-up's activations left ~5 GB of free C heap
        release_freed_memory()
    trainer.sft_done = True
    trainer.event(
        "sft_done", f"SFT warm-up finished after {trainer.sft_step} steps", last_loss=loss_value
    )
    return True
