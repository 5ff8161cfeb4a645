"""Reward components that read the episodic memory (white paper 3.17).

Both score a batch against the memory as it was *before* this batch: the trainer calls
``memory.record(...)`` only after every component has scored. Repeats inside the current
batch (two samples of one group giving the same wrong answer) are therefore not penalised:
they are judged against earlier steps only, which keeps a group's scores independent of
the order its samples were drawn in.

Columns read: ``problem`` (one Problem per completion; its ``.id`` keys the memory, or a
``problem_id`` column of strings) and ``parsed`` (ParsedCompletion per completion; parsed
here when absent, with ``schema``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deepsynapse.data.answers import normalize_answer
from deepsynapse.memory.episodic import EpisodicMemory
from deepsynapse.rewards.base import Scores, _parsed

__all__ = ["MEMORY_REWARDS", "NoveltyReward", "RepeatMistakePenalty", "problem_ids"]


def problem_ids(n: int, columns: dict[str, Any]) -> list[str]:
    """The memory key of each completion: ``problem[i].id`` or the ``problem_id`` column."""
    if columns.get("problem") is not None:
        ids = [str(p.id) for p in columns["problem"]]
    elif columns.get("problem_id") is not None:
        ids = [str(p) for p in columns["problem_id"]]
    else:
        raise KeyError("memory rewards need a 'problem' (or 'problem_id') column")
    if len(ids) != n:
        raise ValueError(f"{len(ids)} problem ids for {n} completions")
    return ids


class RepeatMistakePenalty:
    """Giving a wrong answer already given on this problem before costs more each time.

    Score ``-(1 - 0.5**k)`` where k is how often this same wrong answer appears among the
    problem's remembered attempts: -0.5, -0.75, -0.875, ... (bounded by -1). A correct
    answer, a new wrong answer or a problem never seen scores 0.0; a completion with no
    numeric answer scores None (not applicable: the format rewards deal with it).

    >>> m = EpisodicMemory()
    >>> m.record(["p"], ["7"], [False], step=0)
    >>> from deepsynapse.formats import parse_completion
    >>> from types import SimpleNamespace
    >>> texts = ["<reasoning>r</reasoning><answer>7</answer>", "<answer>8</answer>"]
    >>> RepeatMistakePenalty(m)(["q"] * 2, texts, problem=[SimpleNamespace(id="p")] * 2)
    [-0.5, 0.0]
    """

    name = "repeat_mistake"

    def __init__(self, memory: EpisodicMemory) -> None:
        self.memory = memory

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> Scores:
        out: Scores = []
        for pid, answer in numeric_answers(completions, columns):
            if answer is None:
                out.append(None)
                continue
            k = self.memory.wrong_answer_counts(pid).get(answer, 0)
            out.append(-(1.0 - 0.5**k) if k else 0.0)
        return out


class NoveltyReward:
    """A small bonus for a new distinct answer on a problem not solved yet: exploration.

    Score ``bonus`` (default 1.0; give the component a small fusion weight) when the
    problem has never been answered correctly and this numeric answer is not among the
    answers remembered for it; 0.0 otherwise; None when there is no numeric answer. On a
    problem seen for the first time every numeric answer is new, so the whole group gets
    the bonus and the group-relative advantage is unchanged.

    >>> m = EpisodicMemory()
    >>> m.record(["p"], ["7"], [False], step=0)
    >>> from types import SimpleNamespace
    >>> texts = ["<answer>7</answer>", "<answer>9</answer>", "no answer"]
    >>> NoveltyReward(m)(["q"] * 3, texts, problem=[SimpleNamespace(id="p")] * 3)
    [0.0, 1.0, None]
    """

    name = "novelty"

    def __init__(self, memory: EpisodicMemory, bonus: float = 1.0) -> None:
        self.memory = memory
        self.bonus = float(bonus)

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> Scores:
        out: Scores = []
        for pid, answer in numeric_answers(completions, columns):
            if answer is None:
                out.append(None)
            elif self.memory.is_solved(pid) or answer in self.memory.previous_answers(pid):
                out.append(0.0)
            else:
                out.append(self.bonus)
        return out


def numeric_answers(
    completions: Sequence[str], columns: dict[str, Any]
) -> list[tuple[str, str | None]]:
    """(memory key, normalised numeric answer or None) for each completion."""
    ids = problem_ids(len(completions), columns)
    parsed = _parsed(completions, columns)
    return [(pid, normalize_answer(p.answer)) for pid, p in zip(ids, parsed, strict=True)]


# Name -> factory taking the run's EpisodicMemory: how a config names these components.
MEMORY_REWARDS: dict[str, type] = {
    RepeatMistakePenalty.name: RepeatMistakePenalty,
    NoveltyReward.name: NoveltyReward,
}
