"""The DeepSynapse GRPO training loop: one step reads top to bottom in ``Trainer.train_step``.

Objective (per optimizer step, N = B*G completions, tokens t of completion i):

    L = sum_{i,t} w_{i,t} * [ -min(r_{i,t} A_i, clip(r_{i,t}, 1-eps_low, 1+eps_high) A_i)
                              + beta * KL_k3(pi_theta || pi_ref)_{i,t} ]

with r = pi_theta / pi_old (per token, or GSPO's length-normalised sequence ratio),
A_i the group-relative advantage of the fused reward (``ADVANTAGE_ESTIMATORS``) and w the
aggregation weights (``LOSS_AGGREGATIONS``: DAPO token-level by default).

Departures from the GRPO paper, each a config switch:
- token-level loss normalisation by default (DAPO); ``grpo.loss_aggregation=sequence`` is
  the paper's; clip-higher (eps_high 0.28 > eps_low 0.2) by default;
- the reference policy is the base model with the LoRA adapters switched off;
- pi_old = the policy that sampled; with ``num_iterations == 1`` the ratio is 1 and only
  its gradient matters (as in the paper's on-policy case);
- log-probs use the sampling temperature (the distribution actually sampled);
- dynamic sampling (DAPO) judges a group by *correctness*, not the shaped reward;
- an optional SFT warm-up on gold solutions in the XML format precedes RL: the embedded
  model never writes the format on its own, so without it every group has zero variance.

Run it on CPU: ``deepsynapse train`` (configs/demo-cpu.yaml), or for a quick look
``deepsynapse train model.name=tiny-random train.steps=2``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepsynapse.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_tree,
    save_tree,
    write_checkpoint,
)
from deepsynapse.config import Config, ConfigError, save_config
from deepsynapse.control.knobs import Controller, Event, Knobs
from deepsynapse.data.answers import answers_match
from deepsynapse.data.gsm8k import load_gsm8k
from deepsynapse.data.problems import Problem
from deepsynapse.data.synthetic import generate_problems
from deepsynapse.eval.harness import evaluate, summarize
from deepsynapse.formats import format_completion, get_schema, parse_completion, stop_strings
from deepsynapse.models.loading import load_model, load_tokenizer, resolve_dtype
from deepsynapse.models.policy import PolicyModule, apply_lora, trainable_parameters
from deepsynapse.prompting import build_prompt
from deepsynapse.rewards.base import BUILTIN_REWARDS, call_components, component_name
from deepsynapse.rl.grpo import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    group_has_signal,
    grpo_token_loss,
)
from deepsynapse.rollout.hf import RolloutOutput, encode_prompts, generate_groups
from deepsynapse.telemetry.run_logger import (
    RunLogger,
    current_rss_mb,
    peak_rss_mb,
    read_jsonl,
    truncate_jsonl_after,
)

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""


# ------------------------------------------------------------------ the batch contract


@dataclass
class GroupBatch:
    """Everything one step exchanges between rollout, rewards and loss (this process's share)."""

    problems: list[Problem]  # B problems
    prompts: list[str]  # B prompt texts
    rollout: RolloutOutput  # N = B*G completions, groups contiguous
    scores: dict[str, list[float | None]]  # component -> N scores
    correct: torch.Tensor  # [N] float 0/1, ground-truth correctness (not a shaped reward)
    reward: torch.Tensor  # [N] fused reward, exactly what the advantages use
    parsed: list[Any] = field(default_factory=list)  # N ParsedCompletion
    advantages: torch.Tensor | None = None  # [N]


def concat_batches(parts: list[GroupBatch]) -> GroupBatch:
    """Join rollout rounds (dynamic sampling) into one batch, padding to common widths."""
    if len(parts) == 1:
        return parts[0]
    p = max(b.rollout.prompt_ids.shape[1] for b in parts)
    t = max(b.rollout.completion_ids.shape[1] for b in parts)

    def pad(x: torch.Tensor, width: int, left: bool, value: int) -> torch.Tensor:
        extra = width - x.shape[1]
        if extra == 0:
            return x
        filler = x.new_full((x.shape[0], extra), value)
        return torch.cat([filler, x] if left else [x, filler], 1)

    pad_id = (
        int(parts[0].rollout.completion_ids.flatten()[-1])
        if parts[0].rollout.completion_ids.numel()
        else 0
    )
    r = RolloutOutput(
        prompt_ids=torch.cat([pad(b.rollout.prompt_ids, p, True, pad_id) for b in parts]),
        prompt_mask=torch.cat([pad(b.rollout.prompt_mask, p, True, 0) for b in parts]),
        completion_ids=torch.cat([pad(b.rollout.completion_ids, t, False, pad_id) for b in parts]),
        completion_mask=torch.cat([pad(b.rollout.completion_mask, t, False, 0) for b in parts]),
        texts=[x for b in parts for x in b.rollout.texts],
        truncated=torch.cat([b.rollout.truncated for b in parts]),
    )
    names = parts[0].scores.keys()
    return GroupBatch(
        problems=[x for b in parts for x in b.problems],
        prompts=[x for b in parts for x in b.prompts],
        rollout=r,
        scores={k: [x for b in parts for x in b.scores[k]] for k in names},
        correct=torch.cat([b.correct for b in parts]),
        reward=torch.cat([b.reward for b in parts]),
        parsed=[x for b in parts for x in b.parsed],
    )


def select_groups(batch: GroupBatch, keep: torch.Tensor, group_size: int) -> GroupBatch:
    """Keep the groups where ``keep`` [B] is True."""
    rows = keep.repeat_interleave(group_size).nonzero().flatten().tolist()
    groups = keep.nonzero().flatten().tolist()
    r = batch.rollout
    return GroupBatch(
        problems=[batch.problems[i] for i in groups],
        prompts=[batch.prompts[i] for i in groups],
        rollout=RolloutOutput(
            r.prompt_ids[rows],
            r.prompt_mask[rows],
            r.completion_ids[rows],
            r.completion_mask[rows],
            [r.texts[i] for i in rows],
            r.truncated[rows],
        ),
        scores={k: [v[i] for i in rows] for k, v in batch.scores.items()},
        correct=batch.correct[rows],
        reward=batch.reward[rows],
        parsed=[batch.parsed[i] for i in rows],
    )


# ------------------------------------------------------------------ builders


def build_accelerator(cfg: Config, run_dir: Path):
    """Accelerate owns processes, devices, DDP and the trackers (TensorBoard, W&B, ...)."""
    from accelerate import Accelerator

    trackers = list(cfg.train.trackers) or None
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        log_with=trackers,
        project_dir=str(run_dir / "trackers") if trackers else None,
    )


def init_trackers(accelerator, cfg: Config, run_dir: Path) -> None:
    """Start the configured trackers; W&B runs offline unless WANDB_MODE says otherwise."""
    if not cfg.train.trackers:
        return
    flat = {f"{section}.{k}": v for section, fields in cfg.to_dict().items() for k, v in fields.items()}
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
    """Problems for ``name``: 'synthetic' or any GSM8K source that ``load_gsm8k`` resolves."""
    if name == "synthetic":
        lo, hi = cfg.data.synthetic_difficulty
        seed = cfg.train.seed + (0 if split == "train" else 10_000) + seed_offset
        return generate_problems(cfg.data.synthetic_size, seed=seed, difficulty=(lo, hi)), 0
    return load_gsm8k(name, split, skip_malformed=cfg.data.skip_malformed)


def build_policy(cfg: Config, tokenizer, dtype: torch.dtype) -> PolicyModule:
    base = load_model(cfg.model.name, dtype=dtype, tokenizer=tokenizer)
    if cfg.model.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    peft_model = apply_lora(
        base, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules
    )
    return PolicyModule(peft_model, chunk_tokens=cfg.grpo.logprob_chunk_tokens)


def build_rewards(cfg: Config, extra: dict[str, Any] | None = None) -> list[Any]:
    """Reward components named in ``rewards.weights`` (built-in or passed in ``extra``)."""
    table = {**BUILTIN_REWARDS, **(extra or {})}
    for name in cfg.rewards.weights:
        if name not in table:
            near = difflib.get_close_matches(name, table, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(
                f"rewards.weights: unknown reward '{name}'{hint} (known: {', '.join(sorted(table))})"
            )
    return [table[name] for name in cfg.rewards.weights]


def learning_rate(cfg: Config, step: int) -> float:
    """Peak lr with linear warm-up then constant, linear or cosine decay (a pure function)."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    total = max(cfg.train.steps - o.warmup_steps, 1)
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
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


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
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
        self.accelerator = build_accelerator(cfg, self.run_dir)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.plan = cfg.batch_plan(self.world)
        self.dtype_choice = resolve_dtype(cfg.model.dtype, self.accelerator.device)
        self.schema = get_schema(cfg.rewards.schema)
        self.stops = stop_strings(self.schema)
        self.reward_fns = build_rewards(cfg, reward_fns)
        self.log = RunLogger(
            self.run_dir, self.accelerator, enabled=self.accelerator.is_main_process
        )

        self.tokenizer = load_tokenizer(cfg.model.name)
        torch.manual_seed(cfg.train.seed)  # LoRA A matrices are initialised from this
        policy = build_policy(cfg, self.tokenizer, self.dtype_choice.dtype).to(
            self.accelerator.device
        )
        params = [p for _, p in trainable_parameters(policy)]
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.train_problems, skipped = build_problems(cfg.data.train, "train", cfg)
        self.skipped_rows = skipped
        self.controllers: list[Controller] = list(controllers or [])
        self.knobs = Knobs(
            temperature=cfg.rollout.temperature,
            beta=cfg.grpo.beta,
            reward_weights=dict(cfg.rewards.weights),
            max_new_tokens=cfg.rollout.max_new_tokens,
            micro_batches=self.plan.micro_batches,
        )
        self.step = 0
        self.sft_done = cfg.sft.steps == 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self._stop_requested: str | None = None

    # -------------------------------------------------------------- small helpers

    @property
    def unwrapped(self) -> PolicyModule:
        return self.accelerator.unwrap_model(self.policy)

    def event(self, kind: str, message: str, **evidence: Any) -> None:
        self.log.event(self.step, Event(kind, message, evidence))

    def seed(self, step: int, salt: int = 0) -> None:
        s = step_seed(self.cfg.train.seed, step, self.rank, salt)
        random.seed(s)
        torch.manual_seed(s)

    def problems_for_step(self, step: int, round_: int) -> list[Problem]:
        """This process's share of the step's prompts: a seeded permutation per epoch."""
        p = self.cfg.grpo.prompts_per_step
        n = len(self.train_problems)
        if round_ == 0:
            start = step * p
            idx = []
            for k in range(start, start + p):
                epoch, pos = divmod(k, n)
                perm = self._permutation(epoch)
                idx.append(perm[pos])
        else:
            rng = random.Random(step_seed(self.cfg.train.seed, step, 0, salt=round_))
            idx = [rng.randrange(n) for _ in range(p)]
        return [self.train_problems[i] for i in idx[self.rank :: self.world]]

    def _permutation(self, epoch: int) -> list[int]:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            order = list(range(len(self.train_problems)))
            random.Random(self.cfg.train.seed * 7919 + epoch).shuffle(order)
            self._perm_cache = (epoch, order)
        return self._perm_cache[1]

    # -------------------------------------------------------------- one step, top to bottom

    def train_step(self, step: int) -> dict[str, float]:
        cfg, timer = self.cfg, Timer()
        knobs = self.knobs.copy()
        for controller in self.controllers:
            controller.apply(knobs)
        self.seed(step)
        batch = self.collect_groups(step, knobs, timer)  # sample -> parse -> reward -> fuse
        with timer("update"):
            batch.advantages = ADVANTAGE_ESTIMATORS[cfg.grpo.advantage](
                batch.reward, cfg.rollout.num_generations
            )
            update = self.update(batch, knobs, step)
        metrics = self.step_metrics(batch, update, knobs, timer)
        for controller in self.controllers:
            for ev in controller.observe(step, metrics):
                self.log.event(step, ev)
        self.knobs = knobs
        self._last_batch = batch
        return metrics

    def collect_groups(self, step: int, knobs: Knobs, timer: Timer) -> GroupBatch:
        """Roll out, score and fuse; with dynamic sampling, refill groups that carry no signal."""
        cfg = self.cfg
        g = cfg.rollout.num_generations
        want = self.plan.prompts_per_process
        kept: list[GroupBatch] = []
        n_kept = 0
        rounds = 1 + (cfg.grpo.max_resample_rounds if cfg.grpo.dynamic_sampling else 0)
        self.dropped_groups = 0
        last: GroupBatch | None = None
        for round_ in range(rounds):
            problems = self.problems_for_step(step, round_)
            with timer("generation"):
                batch = self.rollout(problems, knobs)
            with timer("scoring"):
                self.score(batch, knobs)
            last = batch
            if not cfg.grpo.dynamic_sampling:
                return batch
            signal = group_has_signal(batch.correct, g)
            self.dropped_groups += int((~signal).sum())
            if signal.any():
                room = want - n_kept
                keep = signal & (signal.cumsum(0) <= room)
                kept.append(select_groups(batch, keep, g))
                n_kept += int(keep.sum())
            if n_kept >= want:
                break
        if not kept:  # nothing carries signal: train on the last batch with zero advantages
            assert last is not None
            last.reward = torch.zeros_like(last.reward)
            return last
        return concat_batches(kept)

    def rollout(self, problems: list[Problem], knobs: Knobs) -> GroupBatch:
        prompts = [build_prompt(self.tokenizer, p.question, self.schema) for p in problems]
        model = self.unwrapped.peft_model
        model.eval()
        out = generate_groups(
            model,
            self.tokenizer,
            prompts,
            num_generations=self.cfg.rollout.num_generations,
            max_new_tokens=knobs.max_new_tokens,
            temperature=knobs.temperature,
            top_p=self.cfg.rollout.top_p,
            stop_strings=self.stops,
            prefix_sharing=self.cfg.rollout.prefix_sharing,
        )
        model.train()
        n = len(out.texts)
        return GroupBatch(problems, prompts, out, {}, torch.zeros(n), torch.zeros(n))

    def score(self, batch: GroupBatch, knobs: Knobs) -> None:
        """Parse every completion once, run every component, fuse with the knob weights."""
        g = self.cfg.rollout.num_generations
        texts = batch.rollout.texts
        batch.parsed = [parse_completion(t, self.schema) for t in texts]
        expanded = [p for p in batch.problems for _ in range(g)]
        columns = {
            "answer": [p.answer for p in expanded],
            "question": [p.question for p in expanded],
            "problem": expanded,
            "parsed": batch.parsed,
            "schema": self.schema,
            "truncated": batch.rollout.truncated.tolist(),
        }
        prompts = [p for p in batch.prompts for _ in range(g)]
        batch.scores, failures = call_components(
            self.reward_fns, prompts, texts, columns, timeout=self.cfg.rewards.timeout_s or None
        )
        for failure in failures:
            self.event(
                "reward_error",
                f"reward {failure.name} failed; scored None this step",
                error=failure.error,
            )
        batch.correct = torch.tensor(
            [
                float(
                    p.fields.get("answer") is not None
                    and answers_match(p.fields["answer"], prob.answer)
                )
                for p, prob in zip(batch.parsed, expanded, strict=True)
            ]
        )
        fused = torch.zeros(len(texts))
        for component in self.reward_fns:
            name = component_name(component)
            weight = knobs.reward_weights.get(name, 0.0)
            values = torch.tensor([0.0 if v is None else v for v in batch.scores[name]])
            fused += weight * values
        batch.reward = fused

    def update(self, batch: GroupBatch, knobs: Knobs, step: int) -> dict[str, float]:
        """GRPO update: ``num_iterations`` passes over micro-batches, one optimizer step each."""
        cfg, acc = self.cfg, self.accelerator
        r = batch.rollout
        ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
        attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
        cmask = r.completion_mask
        loss_mask = cmask.float()
        if cfg.grpo.mask_truncated:
            loss_mask = loss_mask * (~r.truncated).float().unsqueeze(1)
        totals = torch.tensor([loss_mask.sum().item(), float(loss_mask.shape[0])])
        if self.world > 1:
            totals = acc.reduce(totals, reduction="sum")
        weights = (
            LOSS_AGGREGATIONS[cfg.grpo.loss_aggregation](
                loss_mask, knobs.max_new_tokens, float(totals[0]), int(totals[1])
            )
            * self.world
        )  # DDP averages gradients over processes
        order = torch.argsort(
            cmask.sum(1) + r.prompt_mask.sum(1)
        ).tolist()  # similar lengths together
        micro = self.micro_batches(order, knobs)
        live_rows = [rows for rows, live in micro if live]
        p_len = r.prompt_ids.shape[1]

        def rows_of(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice]:
            """Trim padding columns that no row of this micro-batch uses."""
            t = max(int(cmask[rows].sum(1).max()), 1)
            first = int((r.prompt_mask[rows].sum(0) > 0).nonzero().min()) if rows else 0
            cols = slice(first, p_len + t)
            return ids[rows, cols], attn[rows, cols], cmask[rows, :t], slice(0, t)

        with torch.no_grad():
            ref_logp = old_logp = None
            if knobs.beta > 0:
                ref_logp = torch.zeros_like(loss_mask)
                with self.unwrapped.reference():
                    for rows in live_rows:
                        i, a, c, tcols = rows_of(rows)
                        ref_logp[rows, tcols] = self.unwrapped(i, a, c, knobs.temperature).logp
            if cfg.grpo.num_iterations > 1:
                old_logp = torch.zeros_like(loss_mask)
                for rows in live_rows:
                    i, a, c, tcols = rows_of(rows)
                    old_logp[rows, tcols] = self.unwrapped(i, a, c, knobs.temperature).logp

        stats: dict[str, float] = defaultdict(float)
        entropy_sum = kl_sum = clip_sum = 0.0
        for iteration in range(cfg.grpo.num_iterations):
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step) * knobs.lr_scale
            for k, (rows, live) in enumerate(micro):
                sync = k == len(micro) - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(self.policy)
                with ctx:
                    i, a, c, tcols = rows_of(rows)
                    first = iteration == 0
                    out = self.policy(i, a, c, knobs.temperature, first)
                    old = out.logp.detach() if old_logp is None else old_logp[rows, tcols]
                    ref = None if ref_logp is None else ref_logp[rows, tcols]
                    terms = grpo_token_loss(
                        out.logp,
                        old,
                        ref,
                        batch.advantages[rows],
                        c.float(),
                        epsilon_low=cfg.grpo.epsilon_low,
                        epsilon_high=cfg.grpo.epsilon_high,
                        beta=knobs.beta,
                        importance_sampling=cfg.grpo.importance_sampling,
                    )
                    w = weights[rows, tcols] * (1.0 if live else 0.0)
                    loss = (terms["loss"] * w).sum()
                    acc.backward(loss)
                    stats["loss/total"] += float(loss.detach()) / self.world
                    lm = loss_mask[rows, tcols]
                    if not live:
                        continue
                    if first:
                        kl_sum += float((terms["kl"].detach() * lm).sum())
                        if out.entropy is not None:
                            entropy_sum += float((out.entropy * lm).sum())
                    clip_sum += float((terms["clipped"].detach() * lm).sum())
            grad_norm = self.clip_and_step()
            stats["grad_norm"] = grad_norm
        n_tok = max(float(loss_mask.sum()), 1.0)
        stats["loss/total"] /= cfg.grpo.num_iterations
        stats["kl/mean"] = kl_sum / n_tok
        stats["entropy/mean"] = entropy_sum / n_tok
        stats["clip/fraction"] = clip_sum / (n_tok * cfg.grpo.num_iterations)
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        return dict(stats)

    def micro_batches(self, order: list[int], knobs: Knobs) -> list[tuple[list[int], bool]]:
        """Split rows into micro-batches of similar length: (rows, live) pairs.

        Every process must run the same number of backward passes (DDP synchronises on the
        last one): a process with fewer rows repeats a row with zero weight (live=False).
        """
        size = max(1, -(-len(order) // max(knobs.micro_batches, 1)))
        size = min(size, self.cfg.grpo.micro_batch_size)
        chunks = [(order[i : i + size], True) for i in range(0, len(order), size)]
        if self.world > 1:
            count = int(self.accelerator.reduce(torch.tensor([len(chunks)]), reduction="max"))
            chunks += [([order[0]], False)] * (count - len(chunks))
        return chunks

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
            last = latest_checkpoint(self.run_dir / "checkpoints")
            raise TrainingDiverged(
                f"{self.bad_steps} steps in a row had non-finite loss or gradients (lower "
                f"optim.lr, or check the rewards); last good checkpoint: {last or 'none'}"
            )
        return norm

    def step_metrics(
        self, batch: GroupBatch, update: dict[str, float], knobs: Knobs, timer: Timer
    ) -> dict[str, float]:
        r = batch.rollout
        m: dict[str, float] = {}
        for name, values in batch.scores.items():
            v = torch.tensor([x for x in values if x is not None])
            m[f"rewards/{name}/mean"] = float(v.mean()) if v.numel() else float("nan")
            m[f"rewards/{name}/std"] = float(v.std()) if v.numel() > 1 else 0.0
            m[f"rewards/{name}/none_rate"] = 1.0 - v.numel() / max(len(values), 1)
        m["reward/fused/mean"] = float(batch.reward.mean())
        m["reward/fused/std"] = float(batch.reward.std()) if batch.reward.numel() > 1 else 0.0
        m["advantage/abs_mean"] = float(batch.advantages.abs().mean())
        m["accuracy/train"] = float(batch.correct.mean())
        m["format/valid_rate"] = sum(p.valid for p in batch.parsed) / max(len(batch.parsed), 1)
        m["completion/length_mean"] = float(r.lengths.float().mean())
        m["completion/length_max"] = float(r.lengths.max())
        m["completion/truncated_rate"] = float(r.truncated.float().mean())
        m["groups/with_signal"] = float(
            group_has_signal(batch.correct, self.cfg.rollout.num_generations).float().mean()
        )
        m["groups/dropped"] = float(getattr(self, "dropped_groups", 0))
        m.update(update)
        m.update(knobs.as_metrics())
        for name, sec in timer.seconds.items():
            m[f"timing/{name}"] = sec
        total = sum(timer.seconds.values())
        m["timing/step"] = total
        tokens = float(r.lengths.sum()) * self.world
        m["throughput/completion_tokens_per_s"] = tokens / max(
            timer.seconds.get("generation", 0.0), 1e-9
        )
        m["throughput/tokens_per_s"] = tokens / max(total, 1e-9)
        m["memory/peak_rss_mb"] = peak_rss_mb()
        m["memory/rss_mb"] = current_rss_mb()
        if torch.cuda.is_available():
            m["memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return m

    # -------------------------------------------------------------- SFT warm-up

    def sft_warmup(self) -> None:
        """Supervised steps on gold solutions rewritten into the XML format (cold start)."""
        cfg, acc = self.cfg, self.accelerator
        problems, _ = build_problems(cfg.sft.data, "train", cfg, seed_offset=1)
        problems = [p for p in problems if p.solution]
        eos = self.tokenizer.eos_token or ""
        from tqdm.auto import tqdm

        bar = tqdm(
            range(cfg.sft.steps),
            desc="sft warm-up",
            disable=not (self.progress and acc.is_main_process),
        )
        for k in bar:
            rng = random.Random(step_seed(cfg.train.seed, k, 0, salt=99))
            chosen = [
                problems[rng.randrange(len(problems))]
                for _ in range(cfg.sft.batch_size * self.world)
            ]
            chosen = chosen[self.rank :: self.world]
            prompts = [build_prompt(self.tokenizer, p.question, self.schema) for p in chosen]
            targets = [
                format_completion({"reasoning": p.solution, "answer": p.answer}, self.schema) + eos
                for p in chosen
            ]
            pid, pmask = encode_prompts(self.tokenizer, prompts, acc.device)
            self.tokenizer.padding_side = "right"
            enc = self.tokenizer(
                targets, return_tensors="pt", padding=True, add_special_tokens=False
            )
            self.tokenizer.padding_side = "left"
            cid, cmask = enc["input_ids"].to(acc.device), enc["attention_mask"].to(acc.device)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.sft.lr * min(1.0, (k + 1) / max(1, cfg.sft.steps // 10))
            start = time.perf_counter()
            out = self.policy(torch.cat([pid, cid], 1), torch.cat([pmask, cmask], 1), cmask)
            loss = -(out.logp * cmask).sum() / cmask.sum().clamp(min=1)
            acc.backward(loss)
            norm = self.clip_and_step()
            loss_value = (
                float(acc.reduce(loss.detach(), reduction="mean"))
                if self.world > 1
                else float(loss.detach())
            )
            self.log.metrics(
                0,
                {
                    "sft/step": k + 1,
                    "sft/loss": loss_value,
                    "sft/grad_norm": norm,
                    "timing/sft_step": time.perf_counter() - start,
                },
            )
            bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.close()
        # RL starts with fresh Adam moments: SFT's gradient scale is not RL's.
        self.optimizer.optimizer.state.clear() if hasattr(
            self.optimizer, "optimizer"
        ) else self.optimizer.state.clear()
        self.sft_done = True
        self.event(
            "sft_done",
            f"SFT warm-up finished after {cfg.sft.steps} steps",
            last_loss=loss_value if cfg.sft.steps else None,
        )

    # -------------------------------------------------------------- evaluation

    def evaluate_heldout(self, tag: str) -> dict[str, Any] | None:
        cfg = self.cfg
        if cfg.eval.limit <= 0:
            return None
        problems, _ = build_problems(cfg.data.eval, "test", cfg)
        problems = problems[: cfg.eval.limit]
        shard = problems[self.rank :: self.world]
        result = evaluate(
            self.unwrapped.peft_model,
            self.tokenizer,
            shard,
            self.schema,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            progress=self.progress and self.accelerator.is_main_process,
            desc=f"eval ({tag})",
        )
        records = result["records"]
        if self.world > 1:
            from accelerate.utils import gather_object

            records = gather_object(records)
        summary = summarize(records, result["seconds"])
        if self.accelerator.is_main_process:
            (self.run_dir / f"eval_{tag}.json").write_text(json.dumps(summary, indent=1))
        return summary

    # -------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:

            def write(folder: Path) -> None:
                self.unwrapped.peft_model.save_pretrained(folder / "adapter")
                save_tree(self.optimizer.state_dict(), folder, "optimizer")
                save_tree(self.trainer_state(), folder, "trainer_state")

            path = write_checkpoint(
                self.run_dir / "checkpoints", self.step, write, self.cfg.train.keep_checkpoints
            )
            self.event("checkpoint", f"saved {path.name}", path=str(path))
        acc.wait_for_everyone()
        return path

    def trainer_state(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "step": self.step,
            "sft_done": self.sft_done,
            "bad_steps": self.bad_steps,
            "knobs": {
                "temperature": self.knobs.temperature,
                "beta": self.knobs.beta,
                "reward_weights": self.knobs.reward_weights,
                "max_new_tokens": self.knobs.max_new_tokens,
                "lr_scale": self.knobs.lr_scale,
                "micro_batches": self.knobs.micro_batches,
            },
            "controllers": {c.name: c.state_dict() for c in self.controllers},
            "identity": self.identity(),
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
            "world_size": self.world,
            "config": cfg.to_dict(),
        }

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that loads it."""
        c = self.cfg
        return {
            "model": c.model.name,
            "schema": c.rewards.schema,
            "lora_r": c.lora.r,
            "lora_targets": list(c.lora.target_modules),
        }

    def load_checkpoint(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_tree(folder, "trainer_state")
        theirs, ours = state.get("identity", {}), self.identity()
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if diff:
            detail = "; ".join(
                f"{k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in diff.items()
            )
            raise CheckpointError(f"{folder} was made for another setup ({detail})")
        weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(self.unwrapped.peft_model, weights)
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(
                f"{folder}: adapter has unexpected keys {result.unexpected_keys[:3]}"
            )
        self.optimizer.load_state_dict(load_tree(folder, "optimizer"))
        self.step = int(state["step"])
        self.sft_done = bool(state["sft_done"])
        self.bad_steps = int(state.get("bad_steps", 0))
        k = state["knobs"]
        self.knobs = Knobs(
            temperature=k["temperature"],
            beta=k["beta"],
            reward_weights=dict(k["reward_weights"]),
            max_new_tokens=k["max_new_tokens"],
            lr_scale=k["lr_scale"],
            micro_batches=k["micro_batches"],
        )
        for c in self.controllers:
            if c.name in state["controllers"]:
                c.load_state_dict(state["controllers"][c.name])
        torch.set_rng_state(state["rng"]["torch"])

    # -------------------------------------------------------------- the run

    def train(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Run to ``train.steps``; ``stop_after`` ends this invocation early (checkpointed)."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        init_trackers(acc, cfg, self.run_dir)
        resumed_from = latest_checkpoint(self.run_dir / "checkpoints") if resume else None
        if resume and resumed_from is None:
            self.say(
                f"no complete checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0"
            )
        if resumed_from is not None:
            self.load_checkpoint(resumed_from)
            if acc.is_main_process:
                for name in ("metrics.jsonl", "events.jsonl", "samples.jsonl"):
                    truncate_jsonl_after(self.run_dir / name, self.step)
            self.event("resume", f"resumed from {resumed_from.name}", step=self.step)
            self.say(f"resumed from {resumed_from} at step {self.step}")
        else:
            self.event(
                "start",
                self.plan.describe(),
                dtype=str(self.dtype_choice.dtype),
                dtype_reason=self.dtype_choice.reason,
                world_size=self.world,
                skipped_rows=self.skipped_rows,
            )
        self.say(
            f"{self.plan.describe()}; dtype {self.dtype_choice.dtype} ({self.dtype_choice.reason})"
        )

        if resumed_from is None and not (self.run_dir / "eval_before.json").exists():
            self.evaluate_heldout("before")
        if not self.sft_done:
            self.sft_warmup()
            self.save_checkpoint()

        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step,
            desc="grpo",
            disable=not (self.progress and acc.is_main_process),
        )
        stop_at = (
            cfg.train.steps if stop_after is None else min(cfg.train.steps, self.step + stop_after)
        )
        with self.graceful_stop():
            self.run_steps(stop_at, bar)
        bar.close()
        self.save_checkpoint()
        if self.step < cfg.train.steps:
            why = f" ({self._stop_requested})" if self._stop_requested else ""
            self.say(
                f"stopped at step {self.step}{why}; resume with: "
                f"deepsynapse train --resume {self.run_dir}"
            )
            return self.summary(None)
        after = self.evaluate_heldout("after")
        summary = self.summary(after)
        if acc.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        acc.end_training()
        return summary

    def run_steps(self, stop_at: int, bar) -> None:
        """GRPO steps until ``stop_at`` or a stop request; checkpoints on schedule."""
        cfg = self.cfg
        while self.step < stop_at and not self.stop_requested():
            metrics = self.train_step(self.step)
            self.step += 1
            self.log.metrics(self.step, metrics)
            self.write_samples(metrics)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward/fused/mean']:.2f}",
                acc=f"{metrics['accuracy/train']:.2f}",
                fmt=f"{metrics['format/valid_rate']:.2f}",
                s=f"{metrics['timing/step']:.1f}",
            )
            due = cfg.train.save_every and self.step % cfg.train.save_every == 0
            if due and self.step < cfg.train.steps:
                self.save_checkpoint()

    @contextlib.contextmanager
    def graceful_stop(self):
        """SIGINT/SIGTERM: finish the current step, checkpoint, exit 0 (a second one stops now)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = signal.Signals(signum).name
            self.say(f"{self._stop_requested} received: finishing this step, then checkpointing")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def stop_requested(self) -> bool:
        """Whether any process asked to stop (all must agree, or collectives would hang)."""
        flag = torch.tensor([1 if self._stop_requested else 0])
        if self.world > 1:
            flag = self.accelerator.reduce(flag, reduction="max")
        if int(flag) and not self._stop_requested:
            self._stop_requested = "stop requested on another process"
        return bool(int(flag))

    def write_samples(self, metrics: dict[str, float]) -> None:
        cfg = self.cfg
        batch = getattr(self, "_last_batch", None)
        if (
            batch is None
            or not cfg.train.log_samples_every
            or self.step % cfg.train.log_samples_every
        ):
            return
        g = cfg.rollout.num_generations
        rows = []
        for i in range(min(cfg.train.samples_per_log, len(batch.rollout.texts))):
            problem = batch.problems[i // g]
            rows.append(
                {
                    "problem_id": problem.id,
                    "question": problem.question,
                    "gold": problem.answer,
                    "completion": batch.rollout.texts[i],
                    "rewards": {k: v[i] for k, v in batch.scores.items()},
                    "fused_reward": float(batch.reward[i]),
                    "advantage": float(batch.advantages[i])
                    if batch.advantages is not None
                    else None,
                    "correct": bool(batch.correct[i]),
                    "format_errors": batch.parsed[i].errors,
                    "truncated": bool(batch.rollout.truncated[i]),
                }
            )
        self.log.samples(self.step, rows)

    def say(self, text: str) -> None:
        if self.accelerator.is_main_process:
            print(f"[deepsynapse] {text}", flush=True)

    def summary(self, after: dict[str, Any] | None) -> dict[str, Any]:
        """Each reward's mean over the first and last steps, and held-out before/after."""
        rows = [r for r in read_jsonl(self.run_dir / "metrics.jsonl") if "reward/fused/mean" in r]
        k = max(1, min(5, len(rows) // 2)) if rows else 0
        keys = sorted(
            {
                key
                for r in rows
                for key in r
                if key.endswith("/mean") and key.startswith(("rewards/", "reward/"))
            }
            | {"accuracy/train", "format/valid_rate"}
        )
        first = {key: _mean([r.get(key) for r in rows[:k]]) for key in keys}
        last = {key: _mean([r.get(key) for r in rows[-k:]]) for key in keys}
        before_path = self.run_dir / "eval_before.json"
        before = json.loads(before_path.read_text()) if before_path.exists() else None
        return {
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "window": k,
            "first_steps": first,
            "last_steps": last,
            "eval_before": _headline(before),
            "eval_after": _headline(after),
            "mean_step_seconds": _mean([r.get("timing/step") for r in rows]),
        }


def _headline(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """An evaluation result without its per-item records."""
    if result is None:
        return None
    return {
        k: result[k] for k in ("n", "accuracy", "format_validity", "mean_length", "truncation_rate")
    }


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def default_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    return Path(cfg.train.output_dir) / name


def find_run_dir(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "config.yaml").is_file():
        raise CheckpointError(f"{p} is not a run folder (no config.yaml)")
    return p


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
