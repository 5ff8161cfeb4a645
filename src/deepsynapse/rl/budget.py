"""A wall-clock budget for a run (``train.time_budget``): measure the first steps, plan the rest.

The same recipe costs minutes on one CPU and an hour on another (bf16 matmuls are 60x slower
without AVX512-BF16), so step counts alone cannot promise a duration. With a budget the run
measures what it is about to repeat and plans to fit:

1. the evaluation before training is timed. The untrained model writes to the token limit,
   the trained one about as long as the warm-up's targets, so the evaluations still to come
   (after the warm-up, after GRPO) are reserved at that cost scaled by the targets' length
   (x1.5 for the longest of a batch) over the limit; once the evaluation after the warm-up
   has run, its own time is the reserve;
2. after the second SFT warm-up step (the first pays one-time costs: measured 8 s against
   46 s for the same step on a busy machine), the warm-up is planned at that step's pace to
   take at most ``sft_share`` of what is left (never more steps than configured), and planned
   again like GRPO (below) at the mean pace of its recent steps: warm-up steps vary with their
   examples' lengths, and GSM8K's worked solutions (measured, AMX class, one core: 21.5 and
   19.5 s for the second step, 10.5 s on average) had one slow step plan 50 and 55 steps
   where 100 fitted, so the warm-up took 11 of its 18 minutes;
3. after the second GRPO step, GRPO gets the rest at that step's pace; every
   ``REPLAN_EVERY`` steps, and whenever the plan runs out with time left, the rest is planned
   again at the mean pace of the last ``PACE_WINDOW`` steps, and each step checks that one more
   (at the slowest of those) still fits, so long completions late in a run cannot overrun.
   One measured step made the plan before: the hour study's schedule variant planned 42 steps
   at 68.6 s and left 10 of its 47 minutes unused; the optimisation variant planned 124 at
   23.2 s, its steps took ~39 s and it was cut at 78, so schedules sized to the plan (phase
   shares, the SFT decay, the temperature ramp) never finished.

The elapsed time survives a resume (it is part of the checkpoint state), so "train for an
hour" means an hour of this run, however many times it was stopped.

With ``count_evaluations=False`` (``train.budget_counts_evaluations``) the held-out
evaluations and the skill probes run off the clock and nothing is reserved for them: the
budget is training time alone. Configurations compared at equal compute need that, because
what they pay for measurement is not what they train with (measured, first study, seed 0:
full DeepSynapse's three evaluations of record took 1,604 s of its hour, plain GRPO's 797 s).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "PACE_WINDOW",
    "PLAN_AFTER",
    "REPLAN_EVERY",
    "TimeBudget",
    "evaluating",
    "evals_to_come",
    "planned_grpo_steps",
    "parse_duration",
    "announce_replan",
    "planned_sft_steps",
]

PLAN_AFTER = 2  # steps of a stage measured before it is planned (at the last one's pace)
REPLAN_EVERY = 4  # GRPO steps between plans at the measured pace
PACE_WINDOW = 8  # the last steps whose mean is the pace (and whose slowest must still fit)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh])")


def parse_duration(text: str | float | int, key: str = "train.time_budget") -> float:
    """Seconds in ``text``: ``"90s"``, ``"10m"``, ``"1h30m"``, or a bare number of seconds.

    >>> parse_duration("10m"), parse_duration("1h30m"), parse_duration("45"), parse_duration("")
    (600.0, 5400.0, 45.0, 0.0)
    """
    if isinstance(text, bool):
        raise ValueError(f"{key}: expected a duration such as 10m, 1h or 90s, got {text!r}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        spec = text.strip().lower().replace(" ", "")
        if not spec:
            return 0.0
        try:
            seconds = float(spec)
        except ValueError:
            pieces = _DURATION.findall(spec)
            if not pieces or "".join(n + u for n, u in pieces) != spec:
                raise ValueError(
                    f"{key}: expected a duration such as 10m, 1h, 1h30m or 90s, got {text!r}"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in pieces)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{key}: expected a non-negative duration, got {text!r}")
    return seconds


def _replan_due(planned: int | None, planned_at: int, done: int) -> bool:
    """A stage's plan is made again every ``REPLAN_EVERY`` steps and when it has run out."""
    return planned is not None and (done - planned_at >= REPLAN_EVERY or done >= planned)


def _mean(seconds: list[float]) -> float:
    return sum(seconds) / len(seconds) if seconds else 0.0


def _window(seconds: list[float], step_seconds: float) -> list[float]:
    """The last ``PACE_WINDOW`` step times, ``step_seconds`` the newest."""
    return [*seconds, float(step_seconds)][-PACE_WINDOW:]


class TimeBudget:
    """Plans the SFT warm-up and GRPO step counts so the whole run fits ``seconds``."""

    def __init__(
        self,
        seconds: float,
        sft_share: float = 0.4,
        count_evaluations: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if seconds <= 0:
            raise ValueError(f"a time budget needs seconds > 0, got {seconds}")
        if not 0.0 <= sft_share <= 1.0:
            raise ValueError(f"sft_share must lie within [0, 1], got {sft_share}")
        self.seconds = seconds
        self.sft_share = sft_share
        self.clock = clock or time.monotonic  # every duration it sees (a test drives its own)
        self.spent_before = 0.0  # by earlier invocations of this run (resume)
        self.started = self.clock()
        self.eval_seconds = 0.0  # one held-out evaluation (the one before training)
        self.sft_steps: int | None = None  # planned, once measured
        self.grpo_steps: int | None = None
        self.planned_at = 0  # the GRPO step the plan was last made after
        self.recent: list[float] = []  # the last PACE_WINDOW GRPO steps' seconds
        self.sft_planned_at = 0  # likewise for the warm-up
        self.sft_recent: list[float] = []
        self.count_evaluations = count_evaluations
        self.uncounted = 0.0  # seconds of evaluation kept off the clock (this invocation)
        self._evaluating = 0  # nesting depth: probes run a held-out slice inside

    # ------------------------------------------------------------------ time

    def elapsed(self) -> float:
        return self.spent_before + self.clock() - self.started - self.uncounted

    def left(self, evals_to_come: int) -> float:
        """Seconds left for training once the evaluations still to come are paid for."""
        reserve = evals_to_come * self.eval_seconds if self.count_evaluations else 0.0
        return self.seconds - self.elapsed() - reserve

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Around a held-out evaluation or probe: its time is left off the clock unless
        evaluations count."""
        start = self.clock()
        self._evaluating += 1
        try:
            yield
        finally:
            self._evaluating -= 1
            if self._evaluating == 0 and not self.count_evaluations:
                self.uncounted += self.clock() - start

    def expect_completions(self, mean_tokens: float, max_new_tokens: int) -> None:
        """Scale the reserve from the untrained model's evaluation to completions of about
        ``mean_tokens`` (a batch decodes until its longest: x1.5)."""
        self.eval_seconds *= min(1.0, 1.5 * mean_tokens / max(1, max_new_tokens))

    # ------------------------------------------------------------------ plans

    def plan_sft(self, configured: int, done: int, step_seconds: float, evals_to_come: int) -> int:
        """Warm-up steps to run in all, after ``done`` steps, the last taking ``step_seconds``:
        at most ``sft_share`` of the training time (the steps done plus what is left)."""
        self.observe_sft_step(step_seconds)
        return self._plan_sft(configured, done, step_seconds, evals_to_come)

    def sft_replan_due(self, done: int) -> bool:
        """``replan_due`` for the warm-up."""
        return _replan_due(self.sft_steps, self.sft_planned_at, done)

    def replan_sft(self, configured: int, done: int, evals_to_come: int) -> int:
        """The warm-up planned again at the mean pace of its recent steps."""
        return self._plan_sft(configured, done, self.sft_pace, evals_to_come)

    @property
    def sft_pace(self) -> float:
        """Mean seconds of the recent warm-up steps (0 before any)."""
        return _mean(self.sft_recent)

    def observe_sft_step(self, step_seconds: float) -> None:
        self.sft_recent = _window(self.sft_recent, step_seconds)

    def _plan_sft(self, configured: int, done: int, pace: float, evals_to_come: int) -> int:
        room = self.sft_share * (done * pace + max(0.0, self.left(evals_to_come)))
        self.sft_steps = max(done, min(configured, int(room // max(pace, 1e-6))))
        self.sft_planned_at = done
        return self.sft_steps

    def plan_grpo(self, configured: int, done: int, step_seconds: float, evals_to_come: int) -> int:
        """GRPO steps to run in all, after ``done`` steps, the last taking ``step_seconds``."""
        self.observe_step(step_seconds)
        return self._plan(configured, done, step_seconds, evals_to_come)

    def replan_due(self, done: int) -> bool:
        """Whether to plan again after ``done`` steps: every ``REPLAN_EVERY`` steps, and when
        the plan has run out (the pace may have left time for more)."""
        return _replan_due(self.grpo_steps, self.planned_at, done)

    def replan_grpo(self, configured: int, done: int, evals_to_come: int) -> int:
        """The rest of GRPO planned again at the mean pace of the recent steps."""
        return self._plan(configured, done, self.pace, evals_to_come)

    def _plan(self, configured: int, done: int, pace: float, evals_to_come: int) -> int:
        more = int(max(0.0, self.left(evals_to_come)) // max(pace, 1e-6))
        self.grpo_steps = max(done, min(configured, done + more))
        self.planned_at = done
        return self.grpo_steps

    @property
    def pace(self) -> float:
        """Mean seconds of the recent GRPO steps (0 before any)."""
        return _mean(self.recent)

    @property
    def slowest_step(self) -> float:
        """The slowest of the recent GRPO steps: one more must fit at that pace."""
        return max(self.recent, default=0.0)

    def another_step_fits(self, evals_to_come: int) -> bool:
        """Whether one more step at the slowest recent pace still ends within the budget."""
        return self.left(evals_to_come) >= self.slowest_step

    def observe_step(self, step_seconds: float) -> None:
        self.recent = _window(self.recent, step_seconds)

    def describe(self) -> str:
        parts = [f"time budget {self.seconds / 60:.1f} min"]
        if self.eval_seconds:
            off = "" if self.count_evaluations else " (off the clock)"
            parts.append(f"an evaluation takes {self.eval_seconds:.0f} s{off}")
        if self.sft_steps is not None:
            parts.append(f"{self.sft_steps} warm-up steps")
        if self.grpo_steps is not None:
            parts.append(f"{self.grpo_steps} GRPO steps")
        return ", ".join(parts)

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return {
            "elapsed": self.elapsed(),
            "eval_seconds": self.eval_seconds,
            "sft_steps": self.sft_steps,
            "grpo_steps": self.grpo_steps,
            "planned_at": self.planned_at,
            "recent": list(self.recent),
            "sft_planned_at": self.sft_planned_at,
            "sft_recent": list(self.sft_recent),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent_before = float(state.get("elapsed", 0.0))
        self.started = self.clock()
        self.eval_seconds = float(state.get("eval_seconds", 0.0))
        self.sft_steps = state.get("sft_steps")
        self.grpo_steps = state.get("grpo_steps")
        self.planned_at = int(state.get("planned_at", 0))
        # checkpoints before re-planning kept only the slowest step
        old = [float(state["slowest_step"])] if state.get("slowest_step") else []
        self.recent = [float(x) for x in state.get("recent", old)][-PACE_WINDOW:]
        self.sft_planned_at = int(state.get("sft_planned_at", 0))
        self.sft_recent = [float(x) for x in state.get("sft_recent", [])][-PACE_WINDOW:]


def announce_replan(
    trainer, bar, stage: str, before: int, planned: int, pace: float, window: int, **evidence
) -> bool:
    """Where a stage's plan changed: the progress bar's total and a ``budget_replan`` event
    (``evidence`` names the stage's step and plan). Returns whether it changed."""
    if planned == before:
        return False
    bar.total = planned
    trainer.event(
        "budget_replan",
        f"{before} -> {planned} {stage} steps at {pace:.1f} s a step (the mean of the last {window})",
        pace=pace,
        **evidence,
    )
    return True


def planned_sft_steps(trainer) -> int:
    """Warm-up steps this run makes: ``sft.steps``, or fewer once a budget has planned them."""
    budget, configured = trainer.budget, trainer.cfg.sft.steps
    return configured if budget is None or budget.sft_steps is None else budget.sft_steps


def planned_grpo_steps(trainer) -> int:
    """GRPO steps this run makes: ``train.steps``, or fewer once a budget has planned them."""
    budget, configured = trainer.budget, trainer.cfg.train.steps
    return configured if budget is None or budget.grpo_steps is None else budget.grpo_steps


def evaluating(trainer) -> contextlib.AbstractContextManager:
    """The budget's ``evaluating`` context, or nothing without a budget."""
    budget = trainer.budget
    return budget.evaluating() if budget is not None else contextlib.nullcontext()


def evals_to_come(trainer) -> int:
    """Held-out evaluations still to run (after the warm-up, after GRPO): the budget keeps
    their time aside."""
    if trainer.cfg.eval.limit <= 0:
        return 0
    warmup_eval = trainer.cfg.sft.steps > 0 and trainer.step == 0
    return 1 + int(warmup_eval and not (trainer.run_dir / "eval_after_sft.json").exists())
