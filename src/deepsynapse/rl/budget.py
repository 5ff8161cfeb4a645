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
   take at most ``sft_share`` of what is left (never more steps than configured);
3. after the second GRPO step, GRPO gets the rest; each later step checks that one more step
   (at the slowest seen since) still fits, so long completions late in a run cannot overrun.

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
from collections.abc import Iterator
from typing import Any

__all__ = [
    "PLAN_AFTER",
    "TimeBudget",
    "evaluating",
    "evals_to_come",
    "planned_grpo_steps",
    "parse_duration",
    "planned_sft_steps",
]

PLAN_AFTER = 2  # steps of a stage measured before it is planned (at the last one's pace)

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


class TimeBudget:
    """Plans the SFT warm-up and GRPO step counts so the whole run fits ``seconds``."""

    def __init__(
        self, seconds: float, sft_share: float = 0.4, count_evaluations: bool = True
    ) -> None:
        if seconds <= 0:
            raise ValueError(f"a time budget needs seconds > 0, got {seconds}")
        if not 0.0 <= sft_share <= 1.0:
            raise ValueError(f"sft_share must lie within [0, 1], got {sft_share}")
        self.seconds = seconds
        self.sft_share = sft_share
        self.spent_before = 0.0  # by earlier invocations of this run (resume)
        self.started = time.monotonic()
        self.eval_seconds = 0.0  # one held-out evaluation (the one before training)
        self.sft_steps: int | None = None  # planned, once measured
        self.grpo_steps: int | None = None
        self.slowest_step = 0.0
        self.count_evaluations = count_evaluations
        self.uncounted = 0.0  # seconds of evaluation kept off the clock (this invocation)
        self._evaluating = 0  # nesting depth: probes run a held-out slice inside

    # ------------------------------------------------------------------ time

    def elapsed(self) -> float:
        return self.spent_before + time.monotonic() - self.started - self.uncounted

    def left(self, evals_to_come: int) -> float:
        """Seconds left for training once the evaluations still to come are paid for."""
        reserve = evals_to_come * self.eval_seconds if self.count_evaluations else 0.0
        return self.seconds - self.elapsed() - reserve

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Around a held-out evaluation or probe: its time is left off the clock unless
        evaluations count."""
        start = time.monotonic()
        self._evaluating += 1
        try:
            yield
        finally:
            self._evaluating -= 1
            if self._evaluating == 0 and not self.count_evaluations:
                self.uncounted += time.monotonic() - start

    def expect_completions(self, mean_tokens: float, max_new_tokens: int) -> None:
        """Scale the reserve from the untrained model's evaluation to completions of about
        ``mean_tokens`` (a batch decodes until its longest: x1.5)."""
        self.eval_seconds *= min(1.0, 1.5 * mean_tokens / max(1, max_new_tokens))

    # ------------------------------------------------------------------ plans

    def plan_sft(self, configured: int, done: int, step_seconds: float, evals_to_come: int) -> int:
        """Warm-up steps to run in all, after ``done`` steps, the last taking ``step_seconds``:
        at most ``sft_share`` of the training time (the steps done plus what is left)."""
        room = self.sft_share * (done * step_seconds + max(0.0, self.left(evals_to_come)))
        self.sft_steps = max(done, min(configured, int(room // max(step_seconds, 1e-6))))
        return self.sft_steps

    def plan_grpo(self, configured: int, done: int, step_seconds: float, evals_to_come: int) -> int:
        """GRPO steps to run in all, after ``done`` steps, the last taking ``step_seconds``."""
        self.slowest_step = max(self.slowest_step, step_seconds)
        more = int(max(0.0, self.left(evals_to_come)) // max(step_seconds, 1e-6))
        self.grpo_steps = max(done, min(configured, done + more))
        return self.grpo_steps

    def another_step_fits(self, evals_to_come: int) -> bool:
        """Whether one more step at the slowest pace seen still ends within the budget."""
        return self.left(evals_to_come) >= self.slowest_step

    def observe_step(self, step_seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, step_seconds)

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
            "slowest_step": self.slowest_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent_before = float(state.get("elapsed", 0.0))
        self.started = time.monotonic()
        self.eval_seconds = float(state.get("eval_seconds", 0.0))
        self.sft_steps = state.get("sft_steps")
        self.grpo_steps = state.get("grpo_steps")
        self.slowest_step = float(state.get("slowest_step", 0.0))


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
