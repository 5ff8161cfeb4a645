"""A run from start to finish: held-out evaluation before, SFT warm-up, GRPO steps, held-out
evaluation after; resuming from the last complete checkpoint, stopping cleanly on a signal,
and the run folder's summary, samples and report.
"""

from __future__ import annotations

import json
import time
from typing import Any

from deepsynapse.allocator import active_allocator
from deepsynapse.checkpoint import latest_checkpoint
from deepsynapse.config import save_config
from deepsynapse.rl.backend_trial import Turn
from deepsynapse.rl.budget import (
    PLAN_AFTER,
    announce_replan,
    evals_to_come,
    planned_grpo_steps,
)
from deepsynapse.rl.collect import close_rollout_engine, start_trial_engine
from deepsynapse.rl.evaluation import evaluate_heldout, run_probes, shared_before_fits
from deepsynapse.rl.ranks import reduce_scalar
from deepsynapse.rl.setup import finish_trackers, init_trackers
from deepsynapse.rl.warmup import check_answer_lengths, run_warmup
from deepsynapse.telemetry.report import write_report
from deepsynapse.telemetry.run_logger import read_jsonl, sample_rows, truncate_jsonl_after
from deepsynapse.telemetry.summary import run_summary

LIVE_FILES = ("metrics.jsonl", "events.jsonl", "samples.jsonl")


def note_dtype_change(trainer) -> None:
    """Say so when a resumed run computes in another dtype than it started in.

    ``model.dtype: auto`` is decided again by each invocation (it measures the CPU it lands
    on), so a run resumed on another machine class goes on in that class's dtype: it trains
    on, but no longer samples as the uninterrupted run would have."""
    if not trainer.accelerator.is_main_process:
        return
    started = next(
        (
            e.get("evidence", {}).get("dtype")
            for e in read_jsonl(trainer.run_dir / "events.jsonl")
            if e.get("kind") == "start"
        ),
        None,
    )
    now = trainer.dtype_choice
    if started and started != str(now.dtype):
        message = (
            f"this run started in {started} and goes on in {now.dtype} ({now.reason}): its "
            "samples will differ from an uninterrupted run's; set model.dtype to keep one"
        )
        trainer.say(message)
        trainer.event("dtype_changed", message, started=started, now=str(now.dtype))


def changed_settings(
    before: dict[str, Any], after: dict[str, Any], prefix: str = ""
) -> dict[str, tuple[Any, Any]]:
    """Dotted config keys whose values differ, as ``{key: (before, after)}``."""
    changed: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed.update(changed_settings(a, b, f"{prefix}{key}."))
        elif a != b:
            changed[f"{prefix}{key}"] = (a, b)
    return changed


def note_setting_changes(trainer) -> None:
    """Say which settings a resumed run changed against its checkpoint's.

    A resume may change settings on purpose (``--resume RUN rollout.temperature=1.2``): the
    run goes on with the new values, from the checkpoint's weights and state. Said once, and
    logged, so a run's record shows where it was no longer one configuration."""
    if not trainer.accelerator.is_main_process or trainer.resumed_config is None:
        return
    now = json.loads(json.dumps(trainer.cfg.to_dict()))  # as the checkpoint stored it
    changed = changed_settings(trainer.resumed_config, now)
    if not changed:
        return
    listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    trainer.say(f"resumed with changed settings (they act from here): {listed}")
    trainer.event(
        "settings_changed",
        f"resumed with {len(changed)} changed setting(s)",
        changed={k: [a, b] for k, (a, b) in changed.items()},
    )


def run_training(trainer, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Run to ``train.steps``; ``stop_after`` ends this invocation early (checkpointed)."""
    cfg, acc, run_dir = trainer.cfg, trainer.accelerator, trainer.run_dir
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    init_trackers(acc, cfg, run_dir)
    resumed_from = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and resumed_from is None:
        trainer.say(f"no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        if acc.is_main_process:  # rows of the lost attempt would be counted twice
            for name in LIVE_FILES:
                truncate_jsonl_after(run_dir / name, -1)
    allocator = active_allocator()  # the C allocator the command line picked (start, first line)
    if resumed_from is not None:
        trainer.load_checkpoint(resumed_from)
        if acc.is_main_process:
            for name in LIVE_FILES:
                truncate_jsonl_after(run_dir / name, trainer.step, trainer.sft_step)
        trainer.event("resume", f"resumed from {resumed_from.name}", step=trainer.step)
        trainer.say(f"resumed from {resumed_from} at step {trainer.step}")
        note_dtype_change(trainer)
        note_setting_changes(trainer)
        start_trial_engine(trainer)  # a resume inside the backend trial, or after its vLLM pick
    else:
        trainer.event(
            "start",
            trainer.plan.describe(),
            dtype=str(trainer.dtype_choice.dtype),
            dtype_reason=trainer.dtype_choice.reason,
            world_size=trainer.world,
            skipped_rows=trainer.skipped_rows,
            allocator=allocator,
        )
    dtype = trainer.dtype_choice
    trainer.say(
        f"{trainer.plan.describe()}; dtype {dtype.dtype} ({dtype.reason}); C allocator {allocator}"
    )
    if trainer.rollout_note:
        trainer.say(trainer.rollout_note)
        trainer.event("rollout_backend", trainer.rollout_note)

    stop_at = (
        cfg.train.steps if stop_after is None else min(cfg.train.steps, trainer.step + stop_after)
    )
    with trainer.stop.on_signals():
        finished = run_stages(trainer, resumed_from is not None, stop_at)
    if not finished:
        why = f" ({trainer.stop.reason})" if trainer.stop.reason else ""
        where = (
            f"warm-up step {trainer.sft_step}/{cfg.sft.steps}"
            if not trainer.sft_done
            else f"step {trainer.step}"
        )
        trainer.say(f"stopped at {where}{why}; resume with: deepsynapse train --resume {run_dir}")
        write_run_report(trainer)
        close_rollout_engine(trainer)
        return run_summary(run_dir, trainer.step, None)
    after = evaluate_heldout(trainer, "after")  # through vLLM's engine where it samples
    close_rollout_engine(trainer)
    summary = run_summary(run_dir, trainer.step, after)
    if acc.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    write_run_report(trainer)
    finish_trackers(acc)
    return summary


def run_stages(trainer, resumed: bool, stop_at: int) -> bool:
    """Evaluation before, SFT warm-up, GRPO steps; each checkpoints before a stop.

    Returns whether the run reached ``train.steps`` (False: stopped, checkpointed).
    """
    cfg, acc = trainer.cfg, trainer.accelerator
    run_dir, budget = trainer.run_dir, trainer.budget
    if not resumed:
        check_answer_lengths(trainer)
        if shared_before_fits(trainer):
            before = json.loads((run_dir / "eval_before.json").read_text(encoding="utf-8"))
            if budget is not None:  # the evaluations still to come are reserved at its cost
                budget.eval_seconds = float(before.get("seconds") or 0.0)
        else:
            start = time.perf_counter()
            evaluate_heldout(trainer, "before")
            if budget is not None:  # the evaluations still to come are reserved at this cost
                budget.eval_seconds = time.perf_counter() - start
    if not trainer.sft_done:
        done = run_warmup(trainer)
        trainer.save_checkpoint()
        if not done:
            return False
    if cfg.sft.steps and trainer.step == 0 and not (run_dir / "eval_after_sft.json").exists():
        start = time.perf_counter()
        evaluate_heldout(trainer, "after_sft")  # the start of GRPO: what the warm-up gave
        if budget is not None:  # the final evaluation will cost about the same
            budget.eval_seconds = time.perf_counter() - start
    anchor_reference(trainer)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=planned_grpo_steps(trainer),
        initial=trainer.step,
        desc="grpo",
        disable=not (trainer.progress and acc.is_main_process),
    )
    run_steps(trainer, stop_at, bar)
    bar.close()
    trainer.save_checkpoint()
    return trainer.step >= planned_grpo_steps(trainer)


def anchor_reference(trainer) -> None:
    """``grpo.reference=start``: where GRPO starts after a warm-up, that policy becomes the
    KL's reference (a checkpoint carries it on). Measured on SmolLM2: against the base, the
    warm-up left a KL of 0.4-0.7 a token, and beta = 0.04 pulled held-out accuracy down."""
    policy = trainer.unwrapped
    if trainer.cfg.grpo.reference != "start" or policy.reference_state is not None:
        return
    if trainer.sft_step == 0:
        return  # no warm-up: the policy starts as the base (LoRA B = 0), the base it is
    if trainer.step > 0:
        trainer.say(
            "KL reference: the base model (this checkpoint was made before grpo.reference "
            "existed; a new run anchors at the start of GRPO)"
        )
        return
    policy.freeze_reference()
    message = f"KL reference: the policy after {trainer.sft_step} warm-up steps (grpo.reference)"
    trainer.say(message)
    trainer.event("reference", message, sft_steps=trainer.sft_step)


def run_steps(trainer, stop_at: int, bar) -> None:
    """GRPO steps until ``stop_at``, the time budget or a stop request; checkpoints on schedule."""
    cfg = trainer.cfg
    budget = trainer.budget
    clock = budget.clock if budget is not None else time.perf_counter
    while trainer.step < min(stop_at, planned_grpo_steps(trainer)) and not trainer.stop.requested():
        start = clock()
        off_clock = budget.uncounted if budget is not None else 0.0
        metrics = trainer.train_step(trainer.step)
        trainer.step += 1
        settle_backend_trial(trainer, metrics)
        if cfg.probes.every and trainer.step % cfg.probes.every == 0:
            metrics.update(run_probes(trainer))
        trainer.log.metrics(trainer.step, metrics)
        write_samples(trainer)
        bar.update(1)
        bar.set_postfix(
            phase=trainer.knobs.phase or "-",
            reward=f"{metrics['reward/fused/mean']:.2f}",
            acc=f"{metrics['accuracy/train']:.2f}",
            fmt=f"{metrics['format/valid_rate']:.2f}",
            s=f"{metrics['timing/step']:.1f}",
        )
        if budget is not None:  # probes off the clock are not the step's pace
            off_clock = budget.uncounted - off_clock
            plan_within_budget(trainer, clock() - start - off_clock, bar)
        due = cfg.train.save_every and trainer.step % cfg.train.save_every == 0
        if due and trainer.step < planned_grpo_steps(trainer):
            trainer.save_checkpoint()


def settle_backend_trial(trainer, metrics: dict[str, float]) -> None:
    """Charge the step to the sampler that drew it (``rl/backend_trial.py``); once the trial
    has picked, say so, and free vLLM's engine where our decoder won."""
    trial = trainer.backend_trial
    if trial is None or trial.choice is not None:
        return
    generate_s = metrics.get("timing/generate", 0.0)
    turn = Turn(
        sampler="vllm" if metrics["rollout/vllm"] else "ours",
        generate_s=generate_s,
        drawn_tokens=metrics["completion/tokens_drawn"],
        rest_s=metrics["timing/step"] - generate_s,
        kept_tokens=float(trainer._last_batch.rollout.lengths.sum()),
    )
    verdict = trial.record(turn)
    if verdict is None:
        start_trial_engine(trainer)  # after our decoder's last turn: vLLM's are next
        return
    trainer.say(verdict)
    seconds = trial.step_seconds()
    trainer.event("rollout_backend", verdict, choice=trial.choice, step_seconds=seconds)
    if trial.choice == "ours":
        close_rollout_engine(trainer)


def plan_within_budget(trainer, step_seconds: float, bar) -> None:
    """After the second GRPO step, plan the rest to fit at its pace; every few steps (and when
    the plan runs out with time left) plan again at the recent mean pace; after each step, end
    GRPO early if one more (at the slowest recent pace) would overrun the budget.

    Each process measured its own clock, so every decision is reduced across processes (the
    fewest steps any planned; all stop when one is out of time), or one would wait forever in
    a collective the others never reach. The cadence counts steps, so all decide together."""
    budget, configured = trainer.budget, trainer.cfg.train.steps
    if trainer.step < min(PLAN_AFTER, configured):  # a first step pays one-time costs
        return
    if budget.grpo_steps is None:
        planned = budget.plan_grpo(configured, trainer.step, step_seconds, evals_to_come(trainer))
        planned = budget.grpo_steps = int(reduce_scalar(trainer.accelerator, planned, "min"))
        bar.total = planned
        trainer.say(
            f"time budget: a GRPO step takes {step_seconds:.1f} s; {planned} of {configured} "
            f"GRPO steps planned ({budget.elapsed() / 60:.1f} of {budget.seconds / 60:.1f} min "
            "used so far)"
        )
        trainer.event("budget_plan", budget.describe(), grpo_steps=planned)
        trainer.retarget_schedules(planned)
        return
    budget.observe_step(step_seconds)
    if budget.replan_due(trainer.step):
        before = budget.grpo_steps
        planned = budget.replan_grpo(configured, trainer.step, evals_to_come(trainer))
        planned = budget.grpo_steps = int(reduce_scalar(trainer.accelerator, planned, "min"))
        window = len(budget.recent)
        evidence = {"step": trainer.step, "grpo_steps": planned}
        if announce_replan(trainer, bar, "GRPO", before, planned, budget.pace, window, **evidence):
            trainer.retarget_schedules(planned)
    if trainer.step >= budget.grpo_steps:
        return
    fits = budget.another_step_fits(evals_to_come(trainer))
    if not reduce_scalar(trainer.accelerator, float(fits), "min"):  # one process out: all stop
        trainer.say(
            f"time budget: ending GRPO after {trainer.step} of {budget.grpo_steps} planned steps "
            f"(the slowest recent step took {budget.slowest_step:.1f} s)"
        )
        trainer.event("budget_stop", budget.describe(), step=trainer.step)
        budget.grpo_steps = trainer.step
        trainer.retarget_schedules(trainer.step)


def write_samples(trainer) -> None:
    """Some completions of the last step with their per-component rewards, on schedule."""
    cfg = trainer.cfg
    batch = getattr(trainer, "_last_batch", None)
    every = cfg.train.log_samples_every
    if batch is None or not every or trainer.step % every:
        return
    rows = sample_rows(batch, cfg.rollout.num_generations, cfg.train.samples_per_log)
    trainer.log.samples(trainer.step, rows)


def write_run_report(trainer) -> None:
    """report.html with its plots; a failure here never fails the run."""
    if not (trainer.cfg.train.report and trainer.accelerator.is_main_process):
        return
    try:
        path = write_report(trainer.run_dir)
        trainer.say(f"report: {path}")
    except Exception as exc:  # the report is a view; training results are already safe
        trainer.event("report_error", f"could not write the report: {exc}")
