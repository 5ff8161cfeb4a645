"""``rollout.backend=auto`` in a CPU training process: measure both samplers, keep the faster.

Whether vLLM's engine pays inside a CPU *training* process depends on the machine, and no CPU
flag predicts it: with vLLM a whole GRPO step was x1.15 faster on the Intel Xeon without AMX
and x1.21-1.39 on the EPYC (both AVX512-BF16), but x0.83 on the AMX Xeon, where the engine's
resident memory made the update's page faults dearer (docs/benchmarks.md). So the run
measures it on its own first GRPO steps: vLLM and our decoder take turns (``TRIAL_ORDER``),
each step's wall time is charged to its sampler per completion token, and the faster keeps
sampling. Those steps are ordinary training steps (both samplers draw from the same policy);
only the engine's build is spent. Where our decoder wins, the engine is closed (its weights
and KV cache freed) and the rest of the run, its final evaluation included, uses our decoder.
The trial's record is checkpointed, so a resumed run samples each step as the unbroken run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRIAL_ORDER = ("vllm", "ours", "vllm", "ours")
# vLLM must be this much faster per completion token to be kept: it holds ~2 GB more memory
VLLM_MARGIN = 1.05


@dataclass
class BackendTrial:
    """The turns measured so far (sampler, step seconds, completion tokens), and the pick."""

    turns: list[tuple[str, float, float]] = field(default_factory=list)
    choice: str | None = None

    def sampler(self) -> str:
        """Which sampler the next GRPO step uses: its turn in the trial, or the pick."""
        if self.choice is not None:
            return self.choice
        return TRIAL_ORDER[len(self.turns)]

    def record(self, sampler: str, seconds: float, tokens: float) -> str | None:
        """Charge a finished step to its sampler; after the last turn, pick and return a
        one-line account of the pick (None while the trial goes on)."""
        if self.choice is not None:
            return None
        self.turns.append((sampler, float(seconds), float(tokens)))
        if len(self.turns) < len(TRIAL_ORDER):
            return None
        per_token = self.seconds_per_token()
        vllm, ours = per_token["vllm"], per_token["ours"]
        self.choice = "vllm" if ours > vllm * VLLM_MARGIN else "ours"
        winner = "vLLM" if self.choice == "vllm" else "our decoder (vLLM's engine closed)"
        return (
            f"rollout.backend=auto: over the first {len(self.turns)} GRPO steps a completion "
            f"token cost {vllm * 1e3:.1f} ms of step time with vLLM sampling and "
            f"{ours * 1e3:.1f} ms with our decoder: {winner} samples from here on"
        )

    def seconds_per_token(self) -> dict[str, float]:
        """Each sampler's step seconds over its steps' completion tokens (pooled turns)."""
        rates = {}
        for name in ("vllm", "ours"):
            seconds = sum(s for who, s, _ in self.turns if who == name)
            tokens = sum(t for who, _, t in self.turns if who == name)
            rates[name] = seconds / max(tokens, 1.0)
        return rates

    def state_dict(self) -> dict[str, Any]:
        return {"turns": [list(t) for t in self.turns], "choice": self.choice}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's record; a malformed one is a ValueError saying what."""
        try:
            turns = [(str(w), float(s), float(t)) for w, s, t in state["turns"]]
            choice = state["choice"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"backend_trial: expected turns and choice ({exc!r})") from exc
        if choice not in (None, "vllm", "ours") or len(turns) > len(TRIAL_ORDER):
            raise ValueError(f"backend_trial: choice {choice!r} after {len(turns)} turns")
        self.turns, self.choice = turns, choice
