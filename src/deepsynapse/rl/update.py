"""The GRPO update of a step: the loss over micro-batches and its gradient, then one optimizer
step per inner iteration (``Trainer.clip_and_step``, shared with the SFT warm-up).

The objective and its departures from the GRPO paper are in ``rl/trainer.py``'s docstring; the
per-token terms are ``rl/grpo.py``'s pure functions. Here: the loss aggregation weights over
the whole step (all processes), the reference (and, with ``num_iterations > 1``, old) log-probs,
micro-batches of similar length, CHORD's SFT term, and the step's metrics.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from deepsynapse.config import Config
from deepsynapse.control.accumulation import MicrobatchGradients
from deepsynapse.control.knobs import Knobs
from deepsynapse.rl.batch import GroupBatch
from deepsynapse.rl.budget import planned_grpo_steps
from deepsynapse.rl.grpo import LOSS_AGGREGATIONS, group_has_signal, grpo_token_loss
from deepsynapse.rl.ranks import mean_scalar, reduce_scalar
from deepsynapse.rl.setup import Timer, learning_rate
from deepsynapse.telemetry.run_logger import current_rss_mb, peak_rss_mb


@torch.no_grad()
def policy_and_reference_logp(
    trainer, batch: GroupBatch, knobs: Knobs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the sampled completions under policy and reference. [N, T]"""
    r = batch.rollout
    policy, adaptive = trainer.unwrapped, trainer.adaptive
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
    device = trainer.accelerator.device
    logp = torch.zeros(r.completion_mask.shape, device=device)
    ref = torch.zeros(r.completion_mask.shape, device=device)
    size = trainer.cfg.grpo.micro_batch_size
    g = trainer.cfg.rollout.num_generations
    if size % g or not shares_prompt_groups(trainer.cfg, r.prompt_ids, r.prompt_mask):
        g = 1  # every row runs its own prompt
    for start in range(0, ids.shape[0], size):
        rows = slice(start, start + size)
        one = slice(start, start + size, g)  # one row per group: the hypernet's context
        with adaptive.for_rows(r.prompt_ids[one], r.prompt_mask[one]):
            logp[rows] = policy(
                ids[rows], attn[rows], r.completion_mask[rows], knobs.temperature, group_size=g
            ).logp
        with policy.reference():
            ref[rows] = policy(
                ids[rows], attn[rows], r.completion_mask[rows], knobs.temperature, group_size=g
            ).logp
    return logp, ref


def grpo_update(
    trainer, batch: GroupBatch, knobs: Knobs, step: int, timer: Timer
) -> dict[str, float]:
    """GRPO update: ``num_iterations`` passes over micro-batches, one optimizer step each.

    Every tensor here lives on the policy's device (``batch.to`` put it there).
    """
    cfg, acc, world = trainer.cfg, trainer.accelerator, trainer.world
    policy, unwrapped, adaptive = trainer.policy, trainer.unwrapped, trainer.adaptive
    r = batch.rollout
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
    cmask = r.completion_mask
    loss_mask = cmask.float()
    if cfg.grpo.mask_truncated:
        loss_mask = loss_mask * (~r.truncated).float().unsqueeze(1)
    totals = torch.tensor(
        [loss_mask.sum().item(), float(loss_mask.shape[0])], device=loss_mask.device
    )
    if world > 1:
        totals = acc.reduce(totals, reduction="sum")
    weights = (
        LOSS_AGGREGATIONS[cfg.grpo.loss_aggregation](
            loss_mask, knobs.max_new_tokens, float(totals[0]), int(totals[1])
        )
        * world
    )  # DDP averages gradients over processes
    count = max(knobs.micro_batches, 2 if measures_gradient_noise(cfg) else 1)
    g = cfg.rollout.num_generations
    share = (
        cfg.grpo.micro_batch_size % g == 0
        and r.prompt_ids.shape[0] // g >= count
        and shares_prompt_groups(cfg, r.prompt_ids, r.prompt_mask)
    )
    if share:  # micro-batches of whole groups, each prompt run once (grpo.share_prompt)
        width = (cmask.sum(1) + r.prompt_mask.sum(1)).view(-1, g).amax(1)
        groups = micro_batches(
            acc, torch.argsort(width).tolist(), count, cfg.grpo.micro_batch_size // g
        )
        micro = [([k * g + j for k in gs for j in range(g)], live) for gs, live in groups]
    else:
        g = 1
        order = torch.argsort(cmask.sum(1) + r.prompt_mask.sum(1)).tolist()  # similar lengths
        micro = micro_batches(acc, order, count, cfg.grpo.micro_batch_size)
    live_rows = [rows for rows, live in micro if live]
    p_len = r.prompt_ids.shape[1]

    def rows_of(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice]:
        """Trim padding columns that no row of this micro-batch uses."""
        t = max(int(cmask[rows].sum(1).max()), 1)
        first = int((r.prompt_mask[rows].sum(0) > 0).nonzero().min()) if rows else 0
        cols = slice(first, p_len + t)
        return ids[rows, cols], attn[rows, cols], cmask[rows, :t], slice(0, t)

    def context(rows: list[int]) -> contextlib.AbstractContextManager:
        """The hypernetwork's per-row scales: one row per group when prompts are shared."""
        return adaptive.for_rows(r.prompt_ids[rows[::g]], r.prompt_mask[rows[::g]])

    with torch.no_grad(), timer("reference"):
        ref_logp, old_logp = batch.ref_logp, None
        if ref_logp is None and knobs.beta > 0:
            ref_logp = torch.zeros_like(loss_mask)
            with unwrapped.reference():
                for rows in live_rows:
                    i, a, c, tcols = rows_of(rows)
                    ref_logp[rows, tcols] = unwrapped(i, a, c, knobs.temperature, group_size=g).logp
        if cfg.grpo.num_iterations > 1:
            old_logp = torch.zeros_like(loss_mask)
            for rows in live_rows:
                i, a, c, tcols = rows_of(rows)
                with context(rows):
                    old_logp[rows, tcols] = unwrapped(i, a, c, knobs.temperature, group_size=g).logp

    mu = knobs.sft_weight
    stats: dict[str, float] = defaultdict(float)
    with timer("update"):
        entropy_sum = kl_sum = clip_sum = sampler_gap = 0.0
        recorder = None
        if measures_gradient_noise(cfg):
            recorder = MicrobatchGradients([p for p in policy.parameters() if p.requires_grad])
        for iteration in range(cfg.grpo.num_iterations):
            first = iteration == 0
            for group in trainer.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, planned_grpo_steps(trainer)) * group.get(
                    "lr_mult", 1.0
                )
            if mu > 0:  # CHORD: L = (1 - mu) L_GRPO + mu L_SFT, SFT first (no sync)
                with acc.no_sync(policy):
                    stats["sft/aux_loss"] += (
                        trainer.sft.mixing_backward(step, mu) / cfg.grpo.num_iterations
                    )
                if recorder is not None and first:
                    recorder.reset()
            for k, (rows, live) in enumerate(micro):
                sync = k == len(micro) - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(policy)
                with ctx, context(rows):
                    i, a, c, tcols = rows_of(rows)
                    out = policy(i, a, c, knobs.temperature, first, group_size=g)
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
                        beta=knobs.beta if trainer.engine.fusion.kl_in_loss else 0.0,
                        importance_sampling=cfg.grpo.importance_sampling,
                        kl_clamp=cfg.grpo.kl_clamp,
                    )
                    w = weights[rows, tcols] * ((1.0 - mu) if live else 0.0)
                    loss = (terms["loss"] * w).sum()
                    acc.backward(loss)
                if recorder is not None and first and live and not (sync and world > 1):
                    recorder.capture()
                stats["loss/total"] += float(loss.detach()) / world
                if not live:
                    continue
                lm = loss_mask[rows, tcols]
                if first:
                    kl_sum += float((terms["kl"].detach() * lm).sum())
                    if batch.sampler_logp is not None:
                        gap = (out.logp.detach() - batch.sampler_logp[rows, tcols]).abs()
                        sampler_gap += float((gap * lm).sum())
                    if out.entropy is not None:
                        entropy_sum += float((out.entropy * lm).sum())
                clip_sum += float((terms["clipped"].detach() * lm).sum())
            if recorder is not None and first:
                stats["grad/microbatch_cosine"] = mean_scalar(acc, recorder.cosine())
                rows_per_piece = len(live_rows[0]) if live_rows else 1
                stats["grad/noise_scale"] = mean_scalar(acc, recorder.noise_scale(rows_per_piece))
            grad_norm = trainer.clip_and_step()
            stats["grad_norm"] = grad_norm
    n_tok = max(float(loss_mask.sum()), 1.0)
    stats["loss/total"] /= cfg.grpo.num_iterations
    stats["kl/mean"] = kl_sum / n_tok
    stats["entropy/mean"] = entropy_sum / n_tok
    stats["clip/fraction"] = clip_sum / (n_tok * cfg.grpo.num_iterations)
    if batch.sampler_logp is not None:  # how far the sampler's log-probs are from ours
        stats["rollout/sampler_logp_abs_diff"] = sampler_gap / n_tok
    stats["lr"] = trainer.optimizer.param_groups[0]["lr"]
    return dict(stats)


def shares_prompt_groups(cfg: Config, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> bool:
    """Whether the forwards may run each prompt once for its G rows (``grpo.share_prompt``):
    G > 1 and the rows are consecutive groups of G with one prompt each (ids and mask)."""
    g = cfg.rollout.num_generations
    if not cfg.grpo.share_prompt or g < 2 or prompt_ids.shape[0] % g:
        return False
    return torch.equal(prompt_ids, prompt_ids[::g].repeat_interleave(g, 0)) and torch.equal(
        prompt_mask, prompt_mask[::g].repeat_interleave(g, 0)
    )


def measures_gradient_noise(cfg: Config) -> bool:
    """Whether the update records per-micro-batch gradients (the accumulation controller)."""
    return cfg.control.accumulation.enabled


def micro_batches(
    accelerator, order: list[int], count: int, max_size: int
) -> list[tuple[list[int], bool]]:
    """Split rows (in ``order``) into ``count`` micro-batches of at most ``max_size`` rows:
    (rows, live) pairs.

    Every process must run the same number of backward passes (DDP synchronises on the
    last one): a process with fewer rows repeats a row with zero weight (live=False).
    """
    size = max(1, -(-len(order) // count))
    size = min(size, max_size)
    chunks = [(order[i : i + size], True) for i in range(0, len(order), size)]
    if accelerator.num_processes > 1:
        count = int(reduce_scalar(accelerator, len(chunks), "max"))
        chunks += [([order[0]], False)] * (count - len(chunks))
    return chunks


def no_signal_share(batch: GroupBatch, group_size: int) -> float:
    """Share of the update's advantage mass in groups whose correctness does not vary.

    Such a group has nothing to teach about right answers, yet with auxiliary rewards beside
    correctness the group-normalised advantage scales their small differences to +-1: the
    demo without dynamic sampling, 50-100% of groups so, lost 16.7 points held-out in 10 GRPO
    steps (docs/benchmarks.md). With dynamic sampling it is 0: those groups are dropped."""
    weight = batch.advantages.abs()
    total = float(weight.sum())
    if total == 0.0:
        return 0.0
    signal = group_has_signal(batch.correct.float(), group_size).repeat_interleave(group_size)
    return float(weight[~signal].sum()) / total  # the batch lives on one device


def step_metrics(
    trainer,
    batch: GroupBatch,
    drawn: dict[str, float],
    update: dict[str, float],
    knobs: Knobs,
) -> dict[str, float]:
    """This process's metrics of the step: ``drawn`` covers every rollout, the rest the
    kept groups the loss saw."""
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
    m["advantage/no_signal_share"] = no_signal_share(batch, trainer.cfg.rollout.num_generations)
    m.update(drawn)  # accuracy/train, format/valid_rate, groups/with_signal: all drawn
    m["accuracy/train_kept"] = float(batch.correct.float().mean())
    m["completion/length_mean"] = float(r.lengths.float().mean())
    m["completion/length_max"] = float(r.lengths.max())
    m["completion/truncated_rate"] = float(r.truncated.float().mean())
    # The padded width of the update's tensors: activations scale with it, so a soak can tell
    # an RSS rise at a new widest batch from one without (benchmarks/soak.py).
    m["batch/sequence_width"] = float(r.prompt_ids.shape[1] + r.completion_ids.shape[1])
    m["groups/dropped"] = float(trainer.dropped_groups)
    m["data/skipped_rows"] = float(trainer.skipped_rows)
    trainable = [p for p in trainer.unwrapped.parameters() if p.requires_grad]
    m["trainable/params"] = float(sum(p.numel() for p in trainable))
    m["trainable/tensors"] = float(len(trainable))
    m.update(batch.reward_metrics)
    m.update(update)
    m.update(knobs.as_metrics())
    m.update(trainer.adaptive.metrics())
    m["memory/peak_rss_mb"] = peak_rss_mb()
    m["memory/rss_mb"] = current_rss_mb()
    if torch.cuda.is_available():
        m["memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return m
