"""Knobs (the settings one step runs with) and the controller seam that changes them.

The training loop only reads a :class:`Knobs`; everything that changes over time is a
controller: ``observe(step, metrics) -> events``, ``apply(knobs)``, ``state_dict()``,
``load_state_dict()``. Controllers are deterministic given their inputs and log each
decision as an event carrying its evidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol


@dataclass
class Knobs:
    temperature: float
    beta: float
    reward_weights: dict[str, float]
    max_new_tokens: int
    length_budget: int | None = None  # the length penalty's budget (None = as configured)
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
        if self.length_budget is not None:
            out["knobs/length_budget"] = float(self.length_budget)
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


@dataclass
class Event:
    """One decision or incident, written to events.jsonl with the step and its evidence."""

    kind: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


# How a controller's write composes with what earlier controllers (in apply order) wrote.
WRITE_RULES = {
    "sets": "the knob's value from config or this controller alone; no earlier writer",
    "overrides": "replaces what an earlier writer set (e.g. a schedule within the phase)",
    "scales": "multiplies what an earlier writer set (allocator factors on phase weights)",
    "adds": "adds entries an earlier writer did not set (discovered reward terms)",
}


class KnobOwnershipError(ValueError):
    """A knob written by two controllers without a rule, or written and never read."""


def check_knob_owners(controllers: Iterable[Any], reads: Collection[str]) -> dict[str, list[str]]:
    """Check who writes each knob, in apply order; returns knob -> writer names.

    Every controller declares ``writes = {knob: rule}`` (rules: :data:`WRITE_RULES`). A
    knob written by a second controller needs a composing rule (not ``sets``); a knob that
    is written must be one the loop ``reads``; an unknown knob name fails.
    """
    fields = {f.name for f in dataclasses.fields(Knobs)}
    owners: dict[str, list[str]] = {}
    for c in controllers:
        writes = getattr(c, "writes", None)
        if writes is None:
            raise KnobOwnershipError(
                f"controller {getattr(c, 'name', type(c).__name__)!r} does not declare the "
                "knobs it writes (a class attribute writes = {knob: rule}, {} for none)"
            )
        for knob, rule in writes.items():
            if knob not in fields:
                raise KnobOwnershipError(f"controller {c.name!r} writes unknown knob {knob!r}")
            if rule not in WRITE_RULES:
                raise KnobOwnershipError(
                    f"controller {c.name!r}: rule {rule!r} for knob {knob!r} is not one of "
                    f"{', '.join(WRITE_RULES)}"
                )
            if knob not in reads:
                raise KnobOwnershipError(
                    f"knob {knob!r} is written by {c.name!r} and read by nothing in the loop"
                )
            earlier = owners.setdefault(knob, [])
            if earlier and rule == "sets":
                raise KnobOwnershipError(
                    f"knob {knob!r} is written by {earlier} and then by {c.name!r} without a "
                    f"rule for how the two compose (declare one of "
                    f"{', '.join(r for r in WRITE_RULES if r != 'sets')})"
                )
            earlier.append(c.name)
    return owners


class Controller(Protocol):
    name: str
    writes: ClassVar[dict[str, str]]  # knob -> rule (WRITE_RULES); {} for an observer

    def apply(self, knobs: Knobs) -> None: ...

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
