"""The rollout rounds of a step: sample -> generate -> parse -> reward -> fuse -> select.

``collect_groups`` draws ``accumulation_steps`` rounds of prompts (more with dynamic
sampling, to refill the dropped groups); each round's completions come from our decoder or
vLLM's engine (``Trainer.rollout``), are parsed once, scored by every reward component and
fused over all processes (``score_batch``). Problems come from ``ProblemSampler``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch

from deepsynapse.control.data_curriculum import DataCurriculum
from deepsynapse.control.knobs import Knobs
from deepsynapse.data.problems import Problem
from deepsynapse.formats import parse_completion
from deepsynapse.prompting import build_prompt
from deepsynapse.rewards.fusion import sequence_kl
from deepsynapse.rl.batch import GroupBatch, concat_batches, select_groups
from deepsynapse.rl.grpo import ADVANTAGE_ESTIMATORS, group_has_signal
from deepsynapse.rl.ranks import fuse_over_ranks, gather_all, reduce_scalar
from deepsynapse.rl.setup import Timer
from deepsynapse.rl.update import policy_and_reference_logp
from deepsynapse.rollout.hf import generate_groups


class ProblemSampler:
    """Draws this process's share of each rollout round's ``prompts_per_step`` prompts.

    Without a data curriculum, prompts come in order from a seeded permutation per epoch
    (``cursor``, which checkpoints), skipping problems outside ``knobs.difficulty`` when a
    phase sets it; with it, from UCB over difficulty buckets.
    """

    def __init__(
        self,
        problems: list[Problem],
        *,
        prompts_per_step: int,
        seed: int,
        rank: int,
        world: int,
        data_curriculum: DataCurriculum | None,
        event: Callable[..., None],
    ):
        self.problems = problems
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.rank, self.world = rank, world
        self.data_curriculum = data_curriculum
        self.event = event
        self.cursor = 0  # prompts drawn so far from the seeded epoch permutations
        self._warned_difficulty = False  # the difficulty fallback is said once
        self._perm_cache: tuple[int, list[int]] | None = None

    def draw(self, step: int, round_: int, knobs: Knobs) -> list[Problem]:
        """This process's share of the next ``prompts_per_step`` prompts."""
        p = self.prompts_per_step
        if self.data_curriculum is not None:
            chosen = self.data_curriculum.sample(step, p, rng_seed=self.seed * 7 + round_)
            return chosen[self.rank :: self.world]
        n = len(self.problems)
        lo, hi = knobs.difficulty or (-math.inf, math.inf)
        if not any(lo <= q.difficulty <= hi for q in self.problems):
            if not self._warned_difficulty:
                self._warned_difficulty = True
                self.event(
                    "difficulty_fallback",
                    f"no training problem has difficulty in [{lo}, {hi}]; sampling all",
                    difficulty=[lo, hi],
                )
            lo, hi = -math.inf, math.inf
        idx: list[int] = []
        while len(idx) < p:
            epoch, pos = divmod(self.cursor, n)
            i = self.permutation(epoch)[pos]
            self.cursor += 1
            if lo <= self.problems[i].difficulty <= hi:
                idx.append(i)
        return [self.problems[i] for i in idx[self.rank :: self.world]]

    def permutation(self, epoch: int) -> list[int]:
        """The seeded order of the problems in ``epoch``."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            order = list(range(len(self.problems)))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            self._perm_cache = (epoch, order)
        return self._perm_cache[1]


def collect_groups(
    trainer, step: int, knobs: Knobs, timer: Timer
) -> tuple[GroupBatch, dict[str, float]]:
    """Roll out, score and select ``accumulation_steps`` rounds of prompts.

    With dynamic sampling, groups whose correctness does not vary are dropped and more
    rounds are drawn to refill the step (up to ``grpo.max_resample_rounds`` extra);
    ``grpo.rounds_per_draw`` rounds are decoded together, and their groups are kept in
    round order, as if drawn one after another.
    Returns the kept batch and what the policy did on *every* drawn completion (before
    selection), so accuracy is not pushed toward 0.5 by the selection.
    """
    cfg = trainer.cfg
    g = cfg.rollout.num_generations
    rounds_wanted = max(1, knobs.accumulation_steps)
    want = trainer.plan.prompts_per_process * rounds_wanted
    kept: list[GroupBatch] = []
    n_kept = 0
    rounds = rounds_wanted + (cfg.grpo.max_resample_rounds if cfg.grpo.dynamic_sampling else 0)
    trainer.dropped_groups = 0
    last: GroupBatch | None = None
    correct_drawn, valid_drawn, signal_drawn, tokens_drawn = [], [], [], 0.0
    for first in range(0, rounds, cfg.grpo.rounds_per_draw):
        with timer("sample"):  # several rounds' prompts, in round order, decoded together
            problems = [
                p
                for round_ in range(first, min(first + cfg.grpo.rounds_per_draw, rounds))
                for p in trainer.sampler.draw(step, round_, knobs)
            ]
        with timer("generate"):
            batch = trainer.rollout(problems, knobs)
        score_batch(trainer, batch, knobs, step, timer)
        last = batch
        with timer("select"):
            has_signal = group_has_signal(batch.correct, g)
            observe_data_curriculum(
                trainer, batch, has_signal if cfg.grpo.dynamic_sampling else None
            )
            correct_drawn.append(batch.correct)
            valid_drawn += [p.valid for p in batch.parsed]
            tokens_drawn += float(batch.rollout.lengths.sum())
            signal_drawn.append(has_signal)
            keep = has_signal if cfg.grpo.dynamic_sampling else torch.ones_like(has_signal)
            if keep.any():
                keep = keep & (keep.cumsum(0) <= want - n_kept)
                kept.append(batch if bool(keep.all()) else select_groups(batch, keep, g))
                n_kept += int(keep.sum())
            trainer.dropped_groups += int((~keep).sum())
        if reduce_scalar(trainer.accelerator, n_kept, "min") >= want:
            break  # decided together: every process draws as many rounds (same cursor)
    drawn = {
        "accuracy/train": float(torch.cat(correct_drawn).mean()),
        "format/valid_rate": sum(valid_drawn) / max(len(valid_drawn), 1),
        "groups/with_signal": float(torch.cat(signal_drawn).float().mean()),
        "groups/drawn": float(sum(len(s) for s in signal_drawn)),
        "completion/tokens_drawn": tokens_drawn,
    }
    if not kept:  # nothing carries signal: train on the last batch with zero advantages
        assert last is not None
        last.reward = torch.zeros_like(last.reward)
        return last, drawn
    with timer("select"):
        return concat_batches(kept), drawn


def observe_data_curriculum(trainer, batch: GroupBatch, usable: torch.Tensor | None = None) -> None:
    """Per-group |advantage| and solve rate of every drawn group (DUMP), where ``usable``
    (dynamic sampling's verdict, judged on correctness) zeroes the groups the update drops.

    The curriculum steers toward buckets whose groups move the loss. Without the mask, a
    group whose correctness is uniform but whose format or length rewards vary scores as
    high as one at the edge of competence (std-scaled advantages), and is then dropped:
    full-critique, fifth study, seed 3, sent 52-68% of its draws to the hardest bucket for
    GRPO steps 18-25 on such scores, while training accuracy fell to 0.05-0.14 and 5-19% of
    the drawn groups carried signal.
    """
    if trainer.data_curriculum is None:
        return
    g = trainer.cfg.rollout.num_generations
    adv = (
        ADVANTAGE_ESTIMATORS[trainer.cfg.grpo.advantage](batch.reward, g).view(-1, g).abs().mean(1)
    )
    if usable is not None:
        adv = adv * usable.to(adv.device, adv.dtype)
    rows = list(
        zip(
            [p.id for p in batch.problems],
            adv.tolist(),
            batch.correct.view(-1, g).mean(1).tolist(),
            strict=True,
        )
    )
    rows = gather_all(trainer.accelerator, rows)
    ids, a, s = zip(*rows, strict=True) if rows else ((), (), ())
    trainer.data_curriculum.observe_groups(list(ids), list(a), list(s))


def generate_batch(trainer, problems: list[Problem], knobs: Knobs) -> GroupBatch:
    """``rollout.num_generations`` completions of each problem, from the current policy."""
    cfg = trainer.cfg
    prompts = [build_prompt(trainer.tokenizer, p.question, trainer.schema) for p in problems]
    if trainer.vllm is not None:  # a backend trial builds and frees it for its turns
        return generate_batch_vllm(trainer, problems, prompts, knobs)
    model = trainer.unwrapped.peft_model
    model.eval()
    out = generate_groups(
        model,
        trainer.tokenizer,
        prompts,
        num_generations=cfg.rollout.num_generations,
        max_new_tokens=knobs.max_new_tokens,
        temperature=knobs.temperature,
        top_p=cfg.rollout.top_p,
        stop_strings=trainer.stops,
        prefix_sharing=cfg.rollout.prefix_sharing,
        around=trainer.adaptive.for_prompts,
        decoder=cfg.rollout.decoder,
        merge_lora=cfg.rollout.merge_lora,
        pad_multiple=cfg.model.pad_to_multiple_of,
    )
    model.train()
    n = len(out.texts)
    return GroupBatch(problems, prompts, out, {}, torch.zeros(n), torch.zeros(n))


def generate_batch_vllm(
    trainer, problems: list[Problem], prompts: list[str], knobs: Knobs
) -> GroupBatch:
    """The same rollout from vLLM's engine, fed the policy's weights when they changed."""
    cfg = trainer.cfg
    engine = synced_engine(trainer)
    assert engine is not None
    seed = int(torch.randint(2**31 - 1, ()))  # from the step-seeded RNG: resume replays it
    out, sampler_logp = engine.generate(
        prompts,
        num_generations=cfg.rollout.num_generations,
        max_new_tokens=knobs.max_new_tokens,
        temperature=knobs.temperature,
        top_p=cfg.rollout.top_p,
        stop_strings=trainer.stops,
        seed=seed,
        pad_multiple=cfg.model.pad_to_multiple_of,
        return_logprobs=True,
    )
    n = len(out.texts)
    batch = GroupBatch(problems, prompts, out, {}, torch.zeros(n), torch.zeros(n))
    batch.sampler_logp = sampler_logp
    return batch


def synced_engine(trainer):
    """vLLM's engine holding the policy's current weights (synced if an optimizer step, a
    rank growth or a load changed them since), or None where our decoder samples."""
    if trainer.vllm is None:
        return None
    if trainer.vllm_version != trainer.weights_version:
        trainer.vllm.sync_weights(trainer.unwrapped.peft_model)
        trainer.vllm_version = trainer.weights_version
    return trainer.vllm


def open_rollout_engine(trainer) -> str:
    """Build vLLM's engine for the run where it can serve (``rollout.backend``), holding the
    policy's current weights; returns the one-line note of what samples."""
    from deepsynapse.rollout.vllm import build_vllm_rollout

    cfg = trainer.cfg
    trainer.vllm, note = build_vllm_rollout(
        trainer.unwrapped.peft_model,
        trainer.tokenizer,
        asked=cfg.rollout.backend,
        world_size=trainer.world,
        kv_cache_gb=cfg.rollout.vllm_kv_cache_gb,
        max_model_len=cfg.rollout.vllm_max_model_len,
        seed=cfg.train.seed,
    )
    trainer.vllm_version = -1 if trainer.vllm is None else trainer.weights_version
    return note


def start_trial_engine(trainer) -> None:
    """Build vLLM's engine where the backend trial's next step (a vLLM turn, or its pick)
    needs it and it is not there yet: between steps, off their clocks, or after a resume. If
    it cannot be built after all, the trial ends with our decoder, saying why."""
    trial = trainer.backend_trial
    if trial is None or not trial.needs_engine() or trainer.vllm is not None:
        return
    note = open_rollout_engine(trainer)
    if trainer.vllm is None:
        trial.choice = "ours"
        trainer.say(note)
        trainer.event("rollout_backend", note, choice="ours")


def close_rollout_engine(trainer) -> None:
    """Free vLLM's engine (its weights and KV cache) once the run's rollouts are done."""
    if trainer.vllm is not None:
        trainer.vllm.close()
        trainer.vllm, trainer.vllm_version = None, -1


def score_batch(trainer, batch: GroupBatch, knobs: Knobs, step: int, timer: Timer) -> None:
    """parse -> reward -> fuse: every completion parsed once, scored, then fused."""
    g = trainer.cfg.rollout.num_generations
    engine = trainer.engine
    texts = batch.rollout.texts
    with timer("parse"):
        batch.parsed = [parse_completion(t, trainer.schema) for t in texts]
    expanded = [p for p in batch.problems for _ in range(g)]
    prompts = [p for p in batch.prompts for _ in range(g)]
    columns: dict[str, Any] = {
        "answer": [p.answer for p in expanded],
        "question": [p.question for p in expanded],
        "problem": expanded,
        "parsed": batch.parsed,
        "schema": trainer.schema,
        "truncated": batch.rollout.truncated.tolist(),
        "completion_lengths": batch.rollout.lengths.tolist(),
    }
    if knobs.length_budget is not None:
        columns["length_budget"] = knobs.length_budget
    if trainer.scorer is not None:
        columns["scorer"] = trainer.scorer
    if any("distractors" in p.columns for p in batch.problems):
        columns["distractors"] = [p.columns.get("distractors") for p in expanded]
    spent: dict[str, float] = {}
    with timer("reward"):
        scores, failures, correct = engine.evaluate(
            prompts,
            texts,
            columns,
            knobs,
            seconds=spent,
            signal_groups_of=g if trainer.cfg.grpo.dynamic_sampling else None,
        )
    for name, sec in spent.items():  # timing/reward/<component>: what the reward phase holds
        timer.seconds[f"reward/{name}"] += sec
    with timer("fuse"):
        kl = None
        if not engine.fusion.kl_in_loss:
            logp, batch.ref_logp = policy_and_reference_logp(trainer, batch, knobs)
            mask = batch.rollout.completion_mask.to(logp.device)
            kl = sequence_kl(logp, batch.ref_logp, mask, trainer.cfg.grpo.kl_clamp)
        scored = fuse_over_ranks(
            trainer.accelerator,
            engine,
            scores,
            correct,
            failures,
            texts,
            columns,
            knobs,
            g,
            step,
            kl,
        )
    for failure in scored.failures:
        trainer.event(
            "reward_error",
            f"reward {failure.name} failed; scored None this step",
            error=failure.error,
        )
    batch.scores, batch.calibrated = scored.scores, scored.calibrated
    batch.correct, batch.reward = scored.correct, scored.reward
    batch.reward_metrics = scored.metrics
