"""Contrastive reward: after its own reasoning, does the policy prefer the gold answer?

Exact-match correctness is sparse: a group where every completion is wrong gives no signal.
The contrastive reward asks a denser question: given the prompt and the completion's own
reasoning, how much more likely does the policy find the gold answer than the three typed
distractors (`deepsynapse.data.distractors`)? Reasoning that leads toward the right number
scores higher even before the final answer is right. Scores come from the policy itself
(`PolicyScorer`, no gradient); the reward is a scalar like any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deepsynapse.models.scoring import PolicyScorer
from deepsynapse.rewards.base import Scores, _parsed

__all__ = [
    "CONTRASTIVE_MODES",
    "ContrastiveReward",
    "answer_context",
    "answer_continuation",
    "make_contrastive_reward",
    "multiple_choice_probe",
]

CONTRASTIVE_MODES = ("share", "margin")


def answer_context(prompt: str, reasoning: str) -> str:
    """The prompt followed by the completion in the strict format, up to the answer's value.

    >>> answer_context("Q: 6 x 7?\\n", "6 * 7 = 42")
    'Q: 6 x 7?\\n<reasoning>\\n6 * 7 = 42\\n</reasoning>\\n<answer>\\n'
    """
    return f"{prompt}<reasoning>\n{reasoning.strip()}\n</reasoning>\n<answer>\n"


def answer_continuation(candidate: str) -> str:
    """A candidate answer closed as the format closes it, so its end is scored too."""
    return f"{candidate}\n</answer>"


def _distractors_for(columns: dict[str, Any], n: int) -> list[Any]:
    given = columns.get("distractors")
    if given is not None:
        return list(given)
    problems = columns.get("problem")
    if problems is not None:  # problems with attached distractor columns
        return [getattr(p, "columns", {}).get("distractors") for p in problems]
    return [None] * n


@dataclass(frozen=True)
class ContrastiveReward:
    """Gold answer vs three distractors, scored by the policy after the completion's reasoning.

    With ``lp`` the total log-probability of each candidate (``answer_continuation``)
    after ``answer_context(prompt, reasoning)``:

    - ``share``: softmax(lp / temperature)[gold] over the four candidates, in [0, 1]
      (0.25 = no preference).
    - ``margin``: tanh((lp_gold - max lp_distractor) / scale), in (-1, 1).

    Columns: ``scorer`` (a `PolicyScorer`), ``distractors`` (per completion, a list of 3;
    else taken from ``problem[i].columns["distractors"]``), ``answer`` (gold), ``parsed``.
    None for a completion without reasoning, without distractors, or when no scorer is
    given. All completions of a call are scored in one batched, gradient-free pass, each
    prompt prefilled once for the completions that share it.
    """

    mode: str = "share"
    temperature: float = 1.0
    scale: float = 5.0
    name: str = "contrastive"
    costly: bool = True  # a forward pass per completion: scored only where the update looks

    def __post_init__(self) -> None:
        if self.mode not in CONTRASTIVE_MODES:
            raise ValueError(
                f"unknown contrastive mode {self.mode!r}; valid: {', '.join(CONTRASTIVE_MODES)}"
            )
        if self.temperature <= 0 or self.scale <= 0:
            raise ValueError("temperature and scale must be positive")

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> Scores:
        n = len(completions)
        scorer: PolicyScorer | None = columns.get("scorer")
        if scorer is None:
            return [None] * n
        distractors = _distractors_for(columns, n)
        gold = columns["answer"]
        rows, contexts, candidates, shared = [], [], [], []
        for i, parsed in enumerate(_parsed(completions, columns)):
            reasoning = parsed.fields.get("reasoning")
            wrong = distractors[i]
            if not reasoning or not wrong or not isinstance(prompts[i], str):
                continue
            rows.append(i)
            contexts.append(answer_context(prompts[i], reasoning))
            shared.append(prompts[i])  # a group's completions share the prompt's prefill
            candidates.append([answer_continuation(c) for c in [gold[i], *wrong]])
        out: Scores = [None] * n
        if not rows:
            return out
        scores = scorer.continuation_logprobs(contexts, candidates, prefixes=shared)
        for i, lps in zip(rows, scores, strict=True):
            out[i] = self.score(lps)
        return out

    def score(self, logprobs: Sequence[float]) -> float:
        """The reward from candidate log-probs, gold first.

        >>> ContrastiveReward("share").score([-1.0, -1.0, -1.0, -1.0])
        0.25
        >>> round(ContrastiveReward("margin", scale=1.0).score([-1.0, -2.0, -3.0, -9.0]), 4)
        0.7616
        """
        if self.mode == "share":
            lps = [lp / self.temperature for lp in logprobs]
            top = max(lps)
            weights = [math.exp(lp - top) for lp in lps]
            return weights[0] / sum(weights)
        return math.tanh((logprobs[0] - max(logprobs[1:])) / self.scale)


def make_contrastive_reward(
    mode: str = "share", temperature: float = 1.0, scale: float = 5.0
) -> ContrastiveReward:
    """The contrastive reward in ``mode`` ("share" or "margin")."""
    return ContrastiveReward(mode, float(temperature), float(scale))


def multiple_choice_probe(
    scorer: PolicyScorer,
    prompts: Sequence[str],
    gold: Sequence[str],
    distractors: Sequence[Sequence[str]],
    *,
    closing: str = "\n</answer>",
) -> float:
    """Accuracy of picking the gold answer among it and its distractors by likelihood.

    Each prompt is a full context ending where the answer's value starts (e.g.
    `answer_context` of a question and a reasoning, or a question ending in "<answer>\\n");
    each candidate is followed by ``closing``. A tie with a distractor counts as a miss.
    """
    if not (len(prompts) == len(gold) == len(distractors)):
        raise ValueError("prompts, gold and distractors must have the same length")
    if not prompts:
        return 0.0
    candidates = [
        [f"{g}{closing}", *(f"{d}{closing}" for d in ds)]
        for g, ds in zip(gold, distractors, strict=True)
    ]
    scores = scorer.continuation_logprobs(list(prompts), candidates)
    hits = sum(lps[0] > max(lps[1:], default=-math.inf) for lps in scores)
    return hits / len(prompts)
