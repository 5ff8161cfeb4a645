"""Knobs (the settings one step runs with) and the controller seam that changes them.

The training loop only reads a :class:`Knobs`; everything that changes over time is a
controller: ``observe(step, metrics) -> events``, ``apply(knobs)``, ``state_dict()``,
``load_state_dict()``. Controllers are deterministic given their inputs and log each
decision as an event carrying its evidence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Knobs:
    temperature: float
    beta: float
    reward_weights: dict[str, float]
    max_new_tokens: int
    lr_scale: float = 1.0
    micro_batches: int = 1
    difficulty: tuple[int, int] | None = None
    trainable_groups: list[str] = field(default_factory=lambda: ["all"])
    phase: str = ""  # curriculum phase ("" = no curriculum)
    phase_index: int = 0
    phase_step: int = 0  # steps already run in this phase
    lora_rank: int | None = None  # None = as built (lora.r)
    active_rewards: list[str] | None = None  # None = every component
    accumulation_steps: int = 1  # rollout batches per optimizer step
    sft_weight: float = 0.0  # CHORD mu: L = (1 - mu) L_GRPO + mu L_SFT

    def as_metrics(self) -> dict[str, float]:
        out = {
            "knobs/temperature": self.temperature,
            "knobs/beta": self.beta,
            "knobs/max_new_tokens": float(self.max_new_tokens),
            "knobs/micro_batches": float(self.micro_batches),
            "knobs/accumulation_steps": float(self.accumulation_steps),
            "knobs/sft_weight": self.sft_weight,
            "curriculum/phase": float(self.phase_index),
            "curriculum/phase_step": float(self.phase_step),
        }
        if self.lora_rank is not None:
            out["knobs/lora_rank"] = float(self.lora_rank)
        out.update({f"weights/{k}": v for k, v in self.reward_weights.items()})
        return out

    def copy(self) -> Knobs:
        return dataclasses.replace(
            self,
            reward_weights=dict(self.reward_weights),
            trainable_groups=list(self.trainable_groups),
            active_rewards=None if self.active_rewards is None else list(self.active_rewards),
        )

    def state_dict(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        state["difficulty"] = None if self.difficulty is None else list(self.difficulty)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Knobs:
        state = dict(state)
        if state.get("difficulty") is not None:
            state["difficulty"] = tuple(state["difficulty"])
        return cls(**state)


@dataclass
class Event:
    """One decision or incident, written to events.jsonl with the step and its evidence."""

    kind: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


class Controller(Protocol):
    name: str

    def apply(self, knobs: Knobs) -> None: ...

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
