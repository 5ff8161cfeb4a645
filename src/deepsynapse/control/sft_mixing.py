"""SFT mixed into RL: CHORD's decaying auxiliary loss and ReLIFT's hardest solved problems.

CHORD (Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts") treats SFT on expert
solutions as an auxiliary objective inside on-policy RL, ``L = (1 - mu) * L_GRPO + mu * L_SFT``,
with a global weight ``mu`` that decays so training moves from imitation to exploration, and
a token-wise weight ``phi = p * (1 - p)`` (:func:`chord_phi_weights`) that damps tokens the
policy already finds certain (p near 1) or alien (p near 0). :class:`SFTMixing` is the
controller that writes ``mu`` into ``knobs.sft_weight``: ``mu0`` at step 0, decaying
(linearly or on a cosine) to exactly 0 at ``decay_steps`` and after. With ``decay_share`` the
decay spans that fraction of the run instead, re-scaled when a time budget plans the run.

ReLIFT (Ma et al. 2025, "Learning What Reinforcement Learning Can't") interleaves RL with
fine-tuning on high-quality solutions of the questions RL finds hardest.
:func:`select_hard_solved` picks them from the episodic memory: the problems with the lowest
recent solve rate that have a verified correct completion.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from deepsynapse.control.knobs import Event, Knobs

if TYPE_CHECKING:
    import torch

__all__ = [
    "SFTMixing",
    "SFTMixingConfig",
    "SolvedRecord",
    "chord_phi_weights",
    "mixing_weight",
    "select_hard_solved",
]


def mixing_weight(step: int, mu0: float, decay_steps: int, schedule: str) -> float:
    """CHORD's global weight at ``step``: ``mu0`` at 0, exactly 0 from ``decay_steps`` on.

    >>> [round(mixing_weight(s, 0.5, 4, "linear"), 3) for s in range(6)]
    [0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
    >>> round(mixing_weight(2, 0.5, 4, "cosine"), 3)
    0.25
    """
    if step >= decay_steps:
        return 0.0
    progress = max(step, 0) / decay_steps
    if schedule == "linear":
        return mu0 * (1.0 - progress)
    if schedule == "cosine":
        return mu0 * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"sft_mixing.schedule: got {schedule!r}, expected 'linear' or 'cosine'")


def chord_phi_weights(logp: torch.Tensor) -> torch.Tensor:
    """CHORD-phi token weights ``p * (1 - p)`` from per-token log-probs (no gradient). [N, T]"""
    p = logp.detach().exp()
    return p * (1.0 - p)


@dataclass(frozen=True)
class SFTMixingConfig:
    enabled: bool = field(
        default=False, metadata={"help": "add a decaying SFT loss to the GRPO loss (CHORD)"}
    )
    mu0: float = field(default=0.5, metadata={"help": "SFT weight mu at the first RL step"})
    decay_steps: int = field(default=50, metadata={"help": "RL steps over which mu reaches 0"})
    decay_share: float | None = field(
        default=None,
        metadata={
            "help": "share of the run's GRPO steps over which mu reaches 0 (the steps a "
            "train.time_budget plans, else train.steps); set, it replaces decay_steps"
        },
    )
    schedule: Literal["linear", "cosine"] = field(
        default="cosine", metadata={"help": "shape of mu's decay"}
    )
    source: Literal["gold", "hard_solved"] = field(
        default="gold",
        metadata={
            "help": "SFT examples: gold solutions in the XML format, or verified solutions "
            "of the hardest problems from the episodic memory (ReLIFT)"
        },
    )
    batch_size: int = field(default=4, metadata={"help": "SFT examples per RL step"})
    token_weighting: Literal["uniform", "chord_phi"] = field(
        default="chord_phi", metadata={"help": "per-token SFT weight: 1, or CHORD's p(1-p)"}
    )
    max_solve_rate: float = field(
        default=0.5, metadata={"help": "hard_solved: only problems solved at most this often"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.mu0 <= 1.0:
            raise ValueError(f"sft_mixing.mu0: got {self.mu0}, expected 0 <= mu0 <= 1")
        if self.decay_steps < 1:
            raise ValueError(f"sft_mixing.decay_steps: got {self.decay_steps}, expected >= 1")
        if self.decay_share is not None and not 0.0 < self.decay_share <= 1.0:
            raise ValueError(
                f"sft_mixing.decay_share: got {self.decay_share}, expected None or 0 < share <= 1"
            )
        if self.batch_size < 1:
            raise ValueError(f"sft_mixing.batch_size: got {self.batch_size}, expected >= 1")
        if not 0.0 <= self.max_solve_rate <= 1.0:
            raise ValueError(
                f"sft_mixing.max_solve_rate: got {self.max_solve_rate}, expected in [0, 1]"
            )


class SFTMixing:
    """Writes CHORD's decaying SFT weight ``mu`` into ``knobs.sft_weight``.

    >>> mixing = SFTMixing(SFTMixingConfig(decay_share=0.5), total_steps=10_000)
    >>> mixing.decay_steps
    5000
    >>> mixing.set_total_steps(60)  # a time budget planned 60 GRPO steps
    >>> mixing.decay_steps
    30
    """

    name = "sft_mixing"
    writes: ClassVar[dict[str, str]] = {"sft_weight": "sets"}

    def __init__(self, config: SFTMixingConfig, *, total_steps: int | None = None):
        self.cfg = config
        self.decay_steps = config.decay_steps
        if total_steps:
            self.set_total_steps(total_steps)
        self.next_step = 0
        self.finished = False

    def set_total_steps(self, total_steps: int) -> None:
        """The run's GRPO steps: a ``decay_share`` decay spans its share of them (a time
        budget re-plans as it measures; once the weight has reached 0 it stays there)."""
        if self.cfg.decay_share is not None:
            self.decay_steps = max(1, round(self.cfg.decay_share * int(total_steps)))

    def weight(self, step: int) -> float:
        return mixing_weight(step, self.cfg.mu0, self.decay_steps, self.cfg.schedule)

    def apply(self, knobs: Knobs) -> None:
        knobs.sft_weight = 0.0 if self.finished else self.weight(self.next_step)

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]:
        self.next_step = step + 1
        if self.finished or self.weight(self.next_step) > 0.0:
            return []
        self.finished = True
        return [
            Event(
                "sft_mixing_off",
                f"SFT weight reached 0 after {self.decay_steps} steps; pure RL from here",
                {
                    "step": step,
                    "mu0": self.cfg.mu0,
                    "decay_steps": self.decay_steps,
                    "schedule": self.cfg.schedule,
                    "last_sft_loss": metrics.get("sft/loss"),
                },
            )
        ]

    def metrics(self) -> dict[str, float]:
        """Nothing beyond ``knobs/sft_weight``: the schedule is a pure function of the step."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = int(state["next_step"])
        self.finished = bool(state["finished"])


@dataclass(frozen=True)
class SolvedRecord:
    """What ReLIFT needs to know of a problem: how often it is solved, and one verified solution."""

    problem_id: str
    solve_rate: float
    verified_completion: str | None  # a completion checked correct against the gold answer
    step: int = 0  # when the record was made; the newest record gives the solve rate


def _as_record(rec: Any) -> SolvedRecord:
    if isinstance(rec, SolvedRecord):
        return rec
    if isinstance(rec, Mapping):  # "completion" as EpisodicMemory.solved_examples writes it
        return SolvedRecord(
            str(rec["problem_id"]),
            float(rec["solve_rate"]),
            rec.get("verified_completion", rec.get("completion")),
            int(rec.get("step", 0)),
        )
    if isinstance(rec, (tuple, list)) and len(rec) in (3, 4):
        return SolvedRecord(str(rec[0]), float(rec[1]), rec[2], int(rec[3]) if len(rec) == 4 else 0)
    raise TypeError(
        f"cannot read a memory record from {type(rec).__name__}: expected SolvedRecord, a "
        "mapping or a (problem_id, solve_rate, verified_completion[, step]) tuple"
    )


def select_hard_solved(
    memory_records: Iterable[Any], k: int, *, max_solve_rate: float = 1.0
) -> list[SolvedRecord]:
    """The ``k`` hardest problems (lowest solve rate) that have a verified solution.

    Per problem, the newest record (highest ``step``; later in the input on ties) gives the
    solve rate, and the newest non-empty verified completion is kept. Problems solved more
    often than ``max_solve_rate`` are not hard; ties break on the problem id.

    >>> recs = [("a", 0.5, "x"), ("b", 0.1, None), ("c", 0.2, "y"), ("d", 0.0, "z")]
    >>> [r.problem_id for r in select_hard_solved(recs, 2)]
    ['d', 'c']
    """
    rate: dict[str, tuple[int, float]] = {}
    solution: dict[str, tuple[int, str]] = {}
    for raw in memory_records:
        rec = _as_record(raw)
        if rec.problem_id not in rate or rec.step >= rate[rec.problem_id][0]:
            rate[rec.problem_id] = (rec.step, rec.solve_rate)
        text = rec.verified_completion
        if text and (rec.problem_id not in solution or rec.step >= solution[rec.problem_id][0]):
            solution[rec.problem_id] = (rec.step, text)
    candidates = [
        SolvedRecord(pid, rate[pid][1], solution[pid][1], max(rate[pid][0], solution[pid][0]))
        for pid in solution
        if rate[pid][1] <= max_solve_rate
    ]
    candidates.sort(key=lambda r: (r.solve_rate, r.problem_id))
    return candidates[: max(k, 0)]
