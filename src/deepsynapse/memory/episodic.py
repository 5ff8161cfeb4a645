"""Episodic memory: what the policy answered on each problem before, across epochs.

Rewards that read it (``rewards/memory_rewards.py``) and the failure miner
(``rewards/discovery.py``) need to know, per problem, which answers were already given and
whether they were right. The memory is bounded twice: the last ``attempts_per_problem``
attempts per problem, and at most ``max_problems`` problems (least recently attempted ones
are forgotten first). It is never cleared between epochs, which is the point: the second
time a problem comes round, its history is there.

Ordering contract: reward components score a batch against the memory *before* the trainer
calls :meth:`EpisodicMemory.record` for that batch, so a completion is never compared with
itself or with its own group.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from deepsynapse.data.answers import normalize_answer

__all__ = ["Attempt", "EpisodicMemory"]


@dataclass(frozen=True)
class Attempt:
    """One completion's outcome on a problem: normalised answer (None = no number)."""

    answer: str | None
    correct: bool
    step: int
    reward: float | None = None


@dataclass
class _History:
    """Everything remembered about one problem."""

    attempts: list[Attempt] = field(default_factory=list)  # the last K, oldest first
    seen: int = 0  # lifetime attempts, beyond the window of K
    solved: int = 0  # lifetime correct attempts
    solutions: list[tuple[int, str]] = field(default_factory=list)  # (step, completion)


class EpisodicMemory:
    """Per-problem history of attempts, bounded per problem and in problems (LRU).

    >>> m = EpisodicMemory(attempts_per_problem=4)
    >>> m.record(["p1", "p1"], ["12", "$13"], [False, True], step=0)
    >>> m.previous_wrong_answers("p1"), m.is_solved("p1")
    (['12'], True)
    """

    def __init__(
        self,
        attempts_per_problem: int = 8,
        max_problems: int = 10_000,
        solutions_per_problem: int = 2,
    ) -> None:
        if attempts_per_problem < 1 or max_problems < 1 or solutions_per_problem < 0:
            raise ValueError(
                "attempts_per_problem and max_problems must be >= 1, solutions_per_problem >= 0"
            )
        self.attempts_per_problem = attempts_per_problem
        self.max_problems = max_problems
        self.solutions_per_problem = solutions_per_problem
        self._problems: OrderedDict[str, _History] = OrderedDict()

    def __len__(self) -> int:
        return len(self._problems)

    def __contains__(self, problem_id: str) -> bool:
        return problem_id in self._problems

    # ------------------------------------------------------------------ writing

    def record(
        self,
        problem_ids: Sequence[str],
        answers: Sequence[str | None],
        correct: Sequence[bool | float],
        step: int,
        rewards: Sequence[float | None] | None = None,
        completions: Sequence[str] | None = None,
    ) -> None:
        """Remember one batch (one entry per completion); call it *after* scoring the batch.

        ``answers`` may be raw answer fields: they are normalised here. ``completions``, when
        given, lets the memory keep verified correct completions for :meth:`solved_examples`.
        """
        n = len(problem_ids)
        if len(answers) != n or len(correct) != n:
            raise ValueError(
                f"record: {n} problem ids but {len(answers)} answers, {len(correct)} flags"
            )
        for seq, what in ((rewards, "rewards"), (completions, "completions")):
            if seq is not None and len(seq) != n:
                raise ValueError(f"record: {n} problem ids but {len(seq)} {what}")
        for i, pid in enumerate(problem_ids):
            pid = str(pid)
            hist = self._problems.get(pid)
            if hist is None:
                hist = self._problems[pid] = _History()
            self._problems.move_to_end(pid)
            ok = bool(correct[i])
            reward = None if rewards is None or rewards[i] is None else float(rewards[i])
            hist.attempts.append(Attempt(normalize_answer(answers[i]), ok, int(step), reward))
            del hist.attempts[: -self.attempts_per_problem]
            hist.seen += 1
            hist.solved += int(ok)
            if ok and completions is not None and self.solutions_per_problem:
                hist.solutions.append((int(step), str(completions[i])))
                del hist.solutions[: -self.solutions_per_problem]
        while len(self._problems) > self.max_problems:
            self._problems.popitem(last=False)

    # ------------------------------------------------------------------ reading

    def attempts(self, problem_id: str, before_step: int | None = None) -> list[Attempt]:
        """The remembered attempts on a problem, oldest first (only steps < ``before_step``)."""
        hist = self._problems.get(str(problem_id))
        if hist is None:
            return []
        if before_step is None:
            return list(hist.attempts)
        return [a for a in hist.attempts if a.step < before_step]

    def wrong_answer_counts(
        self, problem_id: str, before_step: int | None = None
    ) -> dict[str, int]:
        """How often each distinct wrong (numeric) answer was given, in first-seen order."""
        counts: dict[str, int] = {}
        for a in self.attempts(problem_id, before_step):
            if not a.correct and a.answer is not None:
                counts[a.answer] = counts.get(a.answer, 0) + 1
        return counts

    def previous_wrong_answers(self, problem_id: str, before_step: int | None = None) -> list[str]:
        """Distinct wrong numeric answers remembered for a problem, in first-seen order."""
        return list(self.wrong_answer_counts(problem_id, before_step))

    def previous_answers(self, problem_id: str, before_step: int | None = None) -> set[str]:
        """Every distinct numeric answer remembered for a problem, right or wrong."""
        return {a.answer for a in self.attempts(problem_id, before_step) if a.answer is not None}

    def is_solved(self, problem_id: str) -> bool:
        """Whether any attempt on the problem was ever correct (lifetime, not only the window)."""
        hist = self._problems.get(str(problem_id))
        return hist is not None and hist.solved > 0

    def solve_rate(self, problem_id: str) -> float | None:
        """Lifetime share of correct attempts; None for a problem never seen (or forgotten)."""
        hist = self._problems.get(str(problem_id))
        return None if hist is None or hist.seen == 0 else hist.solved / hist.seen

    def solved_examples(self, limit: int = 16, max_solve_rate: float = 0.5) -> list[dict[str, Any]]:
        """Verified correct completions of the hardest solved problems, hardest first.

        Hard = low lifetime solve rate; only problems at or below ``max_solve_rate`` with a
        kept completion qualify. Meant for a ReLIFT-style SFT pass on what RL rarely finds.
        Each item: ``problem_id``, ``completion``, ``solve_rate``, ``step``.
        """
        found = []
        for pid, hist in self._problems.items():
            if not hist.solutions or hist.seen == 0:
                continue
            rate = hist.solved / hist.seen
            if rate <= max_solve_rate:
                step, text = hist.solutions[-1]
                found.append(
                    {"problem_id": pid, "completion": text, "solve_rate": rate, "step": step}
                )
        found.sort(key=lambda d: (d["solve_rate"], d["problem_id"]))
        return found[:limit]

    def metrics(self) -> dict[str, float]:
        """``episodic/problems``, ``episodic/solved_share``: size and coverage of the memory
        (not ``memory/``: that namespace is the process's RAM)."""
        n = len(self._problems)
        solved = sum(h.solved > 0 for h in self._problems.values())
        return {"episodic/problems": float(n), "episodic/solved_share": solved / n if n else 0.0}

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; problems listed in LRU order (least recent first)."""
        return {
            "attempts_per_problem": self.attempts_per_problem,
            "max_problems": self.max_problems,
            "solutions_per_problem": self.solutions_per_problem,
            "problems": [
                [
                    pid,
                    {
                        "attempts": [asdict(a) for a in h.attempts],
                        "seen": h.seen,
                        "solved": h.solved,
                        "solutions": [list(s) for s in h.solutions],
                    },
                ]
                for pid, h in self._problems.items()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the bounds in effect are this object's own."""
        self._problems = OrderedDict()
        keep = self.solutions_per_problem
        for pid, h in state["problems"]:
            solutions = [(int(s), str(t)) for s, t in h["solutions"]]
            self._problems[str(pid)] = _History(
                attempts=[Attempt(**a) for a in h["attempts"]][-self.attempts_per_problem :],
                seen=int(h["seen"]),
                solved=int(h["solved"]),
                solutions=solutions[-keep:] if keep else [],
            )
        while len(self._problems) > self.max_problems:
            self._problems.popitem(last=False)
