"""``rollout.backend=auto`` in a CPU training process: measure both samplers, keep the faster.

Whether vLLM's engine pays inside a CPU *training* process depends on the machine, and no CPU
flag predicts it: with vLLM a whole GRPO step was x1.15 faster on the Intel Xeon without AMX
and x1.21-1.39 on the EPYC (both AVX512-BF16), but x0.83 on the AMX Xeon, where the engine's
resident memory made the update's page faults dearer (docs/benchmarks.md). So the run
measures it on its own first GRPO steps (``TRIAL_ORDER``): our decoder's two turns come first,
before the engine is built, so they are timed as a run without it would go (the engine's mere
presence was the AMX Xeon's cost); then the engine is built (off the steps' clocks) and takes
two turns. Steps differ in what they hold (completion lengths, dynamic sampling's extra
rounds), so each sampler's turns give two rates, generation seconds per drawn completion
token and the rest of the step (scoring, reference, update) per kept one, and each is priced
at the trial's mean workload; the sampler whose step comes out shorter keeps sampling. The
turns are ordinary training steps (both samplers draw from the same policy); only the
engine's build is spent. Where our decoder wins, the engine is closed (its weights and KV
cache freed) and the rest of the run, its final evaluation included, uses our decoder; the
evaluation before training always does (no engine yet). The turns are checkpointed, so a
resumed run samples each step as the unbroken run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRIAL_ORDER = ("ours", "ours", "vllm", "vllm")
# vLLM must be this much faster a step to be kept: it holds ~2 GB more memory
VLLM_MARGIN = 1.05


@dataclass(frozen=True)
class Turn:
    """One trial step: who sampled, and what the step cost and held."""

    sampler: str
    generate_s: float
    drawn_tokens: float  # completion tokens generated over all the step's rounds
    rest_s: float  # the step's other seconds: scoring, reference, update
    kept_tokens: float  # completion tokens the update saw


@dataclass
class BackendTrial:
    """The turns measured so far, and the pick once they are done."""

    turns: list[Turn] = field(default_factory=list)
    choice: str | None = None

    @staticmethod
    def plan() -> str:
        """The run's first line about its sampler while the trial is to come."""
        return (
            f"rollout.backend=auto on a CPU: our decoder samples the first "
            f"{TRIAL_ORDER.count('ours')} GRPO steps, vLLM's engine (built then) the next "
            f"{TRIAL_ORDER.count('vllm')}, and the one with the shorter step the rest"
        )

    def needs_engine(self) -> bool:
        """Whether the next GRPO step samples with vLLM (its engine must exist by then)."""
        return self.sampler() == "vllm"

    def sampler(self) -> str:
        """Which sampler the next GRPO step uses: its turn in the trial, or the pick."""
        if self.choice is not None:
            return self.choice
        return TRIAL_ORDER[len(self.turns)]

    def record(self, turn: Turn) -> str | None:
        """Add a finished step; after the last turn, pick and return a one-line account of
        the pick (None while the trial goes on, and once it is over)."""
        if self.choice is not None:
            return None
        self.turns.append(turn)
        if len(self.turns) < len(TRIAL_ORDER):
            return None
        step = self.step_seconds()
        self.choice = "vllm" if step["ours"] > step["vllm"] * VLLM_MARGIN else "ours"
        winner = "vLLM" if self.choice == "vllm" else "our decoder (vLLM's engine closed)"
        return (
            f"rollout.backend=auto: over the first {len(self.turns)} GRPO steps, a step of "
            f"their mean size took {step['vllm']:.1f} s with vLLM sampling and "
            f"{step['ours']:.1f} s with our decoder: {winner} samples from here on"
        )

    def step_seconds(self) -> dict[str, float]:
        """Each sampler's step time at the trial's mean workload, from its own turns' rates."""
        n = max(len(self.turns), 1)
        drawn = sum(t.drawn_tokens for t in self.turns) / n
        kept = sum(t.kept_tokens for t in self.turns) / n
        seconds = {}
        for name in ("vllm", "ours"):
            own = [t for t in self.turns if t.sampler == name]
            per_drawn = sum(t.generate_s for t in own) / max(sum(t.drawn_tokens for t in own), 1.0)
            per_kept = sum(t.rest_s for t in own) / max(sum(t.kept_tokens for t in own), 1.0)
            seconds[name] = per_drawn * drawn + per_kept * kept
        return seconds

    def state_dict(self) -> dict[str, Any]:
        return {"turns": [list(vars(t).values()) for t in self.turns], "choice": self.choice}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's record; a malformed one is a ValueError saying what."""
        try:
            turns = [Turn(str(w), *map(float, rest)) for w, *rest in state["turns"]]
            choice = state["choice"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"backend_trial: expected turns and choice ({exc!r})") from exc
        if choice not in (None, "vllm", "ours") or len(turns) > len(TRIAL_ORDER):
            raise ValueError(f"backend_trial: choice {choice!r} after {len(turns)} turns")
        self.turns, self.choice = turns, choice
