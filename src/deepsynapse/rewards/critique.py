"""Reinforced critique validation: reward a self-critique and a confidence that tell the truth.

The DeepSynapse schema makes a completion end with ``<critique>`` (a check of its own
answer) and ``<confidence>`` (0 to 1). Both are only worth training if they track whether
the answer is actually right, so the rewards here compare them with the gold answer:
calibration (a proper scoring rule, so the best policy reports its true probability) and
consistency of the critique's verdict.

Under a schema that REQUIRES the field (deepsynapse), a completion without it (left out,
empty, truncated before it, or a confidence that is not a number in [0, 1]) scores the
worst value of the component: omission must never pay more than a stated claim. (Scoring
None there, which fusion counts as 0, beat every Brier score <= 0, and the policy learnt
never to state a confidence.) Under a schema without the field (base), or where it is
optional, such completions score None (not applicable), so these components never touch
the base schema.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deepsynapse.data.answers import answers_match
from deepsynapse.formats import BASE_SCHEMA, ParsedCompletion, get_schema
from deepsynapse.rewards.base import Scores, _parsed

__all__ = [
    "HEDGE_PHRASES",
    "NEGATIVE_PHRASES",
    "POSITIVE_PHRASES",
    "CalibrationReward",
    "calibration_reward",
    "critique_consistency_reward",
    "critique_verdict",
    "is_correct",
    "make_calibration_reward",
    "requires_field",
]

# The verdict lexicon. Phrases that say the answer is WRONG; negated positives come first
# so that "not correct" is read as one negative phrase, never as "correct".
NEGATIVE_PHRASES: tuple[str, ...] = (
    r"(?:is|are|was|were|does|do|did)\s*n[o']?t\s+(?:correct|right|accurate|valid|consistent"
    r"|verified|match|check out|add up|hold)",
    r"not\s+(?:correct|right|accurate|valid|consistent|verified)",
    r"(?:can ?not|can't|couldn't|could not)\s+(?:be\s+)?(?:verif\w*|confirm\w*)",
    r"in(?:correct\w*|accura\w+|consistent\w*|valid)",
    r"wrong\w*",
    r"mistakes?|mistaken",
    r"errors?|erroneous",
    r"miscalculat\w*|miscount\w*|mismatch\w*",
    r"should\s+(?:have\s+)?be(?:en)?",
    r"flaw\w*",
    r"contradict\w*",
    r"fail(?:s|ed)?",
    r"forg[oe]t\w*|overlook\w*",
)
# Phrases that say the answer is RIGHT; negated negatives ("no mistakes") come first.
POSITIVE_PHRASES: tuple[str, ...] = (
    r"no\s+(?:mistakes?|errors?|issues?|problems?)",
    r"without\s+(?:any\s+)?(?:mistakes?|errors?)",
    r"error[- ]free",
    r"nothing\s+(?:is\s+)?wrong|not\s+wrong",
    r"(?:is|are|was|looks|seems)\s+right|right\s+answer",
    r"correct(?:ly)?",
    r"verif(?:ied|ies)",
    r"checks?\s+out|adds\s+up|makes\s+sense|looks\s+good|holds",
    r"consistent",
    r"confirm(?:s|ed)?",
    r"match(?:es|ed)?",
    r"accurate(?:ly)?",
    r"valid",
)
# Hedges: a verdict in the same sentence as one of these is no verdict ("I am not sure
# this is right" claims nothing).
HEDGE_PHRASES: tuple[str, ...] = (
    r"not\s+(?:sure|certain)",
    r"unsure|uncertain",
    r"(?:might|may|could)\s+(?:not\s+)?be",
    r"maybe|perhaps|possibly|probably",
    r"i\s+(?:think|guess|believe)",
)
_HEDGE_RE = re.compile(r"\b(?:{})\b".format("|".join(HEDGE_PHRASES)), re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"[.!?;\n]")
_VERDICT_RE = re.compile(
    r"\b(?:(?P<neg>{})|(?P<pos>{}))\b".format(
        "|".join(NEGATIVE_PHRASES), "|".join(POSITIVE_PHRASES)
    ),
    re.IGNORECASE,
)


def critique_verdict(text: str | None) -> bool | None:
    """What a critique says about its answer: True = correct, False = wrong, None = no verdict.

    The critique is scanned left to right for the phrases of `NEGATIVE_PHRASES` and
    `POSITIVE_PHRASES` (negated forms such as "not correct" or "no mistakes" are matched
    as single phrases), and the LAST phrase found decides: critiques reason first and
    conclude at the end ("a mistake at first, but now it is correct" is a positive verdict).
    If the sentence holding that phrase also holds a hedge (`HEDGE_PHRASES`: "not sure",
    "might be", "I think" ...), there is no verdict.

    >>> critique_verdict("6 * 7 = 42 checks out, the answer is correct.")
    True
    >>> critique_verdict("This is not correct: 6 * 8 should be 48.")
    False
    >>> critique_verdict("I found no mistakes."), critique_verdict("Let me see.")
    (True, None)
    """
    if not text:
        return None
    last = deque(_VERDICT_RE.finditer(text), maxlen=1)  # only the final phrase matters
    if not last:
        return None
    match = last[0]
    start = max((m.end() for m in _SENTENCE_END_RE.finditer(text, 0, match.start())), default=0)
    end = _SENTENCE_END_RE.search(text, match.end())
    if _HEDGE_RE.search(text, start, end.start() if end else len(text)):
        return None
    return match.group("pos") is not None


def is_correct(parsed: ParsedCompletion, gold: str) -> bool:
    """Whether the completion's ``<answer>`` matches the gold answer."""
    answer = parsed.fields.get("answer")
    return answer is not None and answers_match(answer, gold)


def requires_field(columns: dict[str, Any], name: str) -> bool:
    """Whether the completions' schema (column ``schema``, base by default) requires ``name``."""
    schema = get_schema(columns.get("schema") or BASE_SCHEMA)
    return name in schema.required


@dataclass(frozen=True)
class CalibrationReward:
    """Negative Brier score of ``<confidence>`` against actual correctness.

    reward = -(c - y)^2 with c the confidence and y = 1 if the answer is right, else 0;
    in [-1, 0]. A proper scoring rule: the expected reward is highest when c is the true
    probability of being right. A completion without a valid confidence scores the worst
    value, ``-1 - confident_wrong_penalty`` (as if certain and wrong), when the schema
    requires the field (deepsynapse), and None (not applicable) when it does not (base).

    The confidently-wrong penalty is the Brier term itself: a wrong answer given with
    confidence 1 scores -1, the worst possible, while a wrong answer with confidence 0
    scores 0. ``confident_wrong_penalty`` adds an extra -penalty * c when the answer is
    wrong and c >= ``threshold`` (default 0: the plain Brier score).

    >>> ok, bad = "<answer>42</answer><confidence>0.9</confidence>", "<answer>41</answer>"
    >>> calibration_reward(["q"] * 3, [ok, ok.replace("42", "41"), bad], answer=["42"] * 3,
    ...                    schema="deepsynapse")
    [-0.01, -0.81, -1.0]
    >>> calibration_reward(["q"], [bad], answer=["42"])  # base schema: no confidence field
    [None]
    """

    confident_wrong_penalty: float = 0.0
    threshold: float = 0.8
    name: str = "calibration"

    @property
    def worst(self) -> float:
        """The lowest score: a wrong answer stated with confidence 1."""
        return -1.0 - self.confident_wrong_penalty

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> Scores:
        missing = self.worst if requires_field(columns, "confidence") else None
        out: Scores = []
        for parsed, gold in zip(_parsed(completions, columns), columns["answer"], strict=True):
            c = parsed.confidence
            if c is None:
                out.append(missing)
                continue
            y = 1.0 if is_correct(parsed, gold) else 0.0
            reward = -((c - y) ** 2)
            if y == 0.0 and c >= self.threshold:
                reward -= self.confident_wrong_penalty * c
            out.append(round(reward, 12))
        return out


def make_calibration_reward(
    confident_wrong_penalty: float = 0.0, threshold: float = 0.8
) -> CalibrationReward:
    """A calibration reward with an optional extra penalty for confidently wrong answers."""
    if confident_wrong_penalty < 0:
        raise ValueError("confident_wrong_penalty must be >= 0")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError("threshold must be in [0, 1]")
    return CalibrationReward(float(confident_wrong_penalty), float(threshold))


calibration_reward = CalibrationReward()


def critique_consistency_reward(
    prompts: Sequence[Any], completions: Sequence[str], **columns: Any
) -> Scores:
    """+1 when the critique's verdict agrees with the truth, -1 when not, 0 without a verdict.

    The verdict is `critique_verdict` of the ``<critique>`` field; the truth is whether the
    answer matches the gold. A completion without a (non-empty) critique scores -1, no
    better than a wrong verdict, when the schema requires the field (deepsynapse), and None
    when it does not (base).

    >>> done = "<answer>42</answer><critique>{}</critique>"
    >>> texts = [done.format("The answer is correct."), done.format("I made a mistake."),
    ...          done.format("Let me look again."), "<answer>42</answer>"]
    >>> critique_consistency_reward(["q"] * 4, texts, answer=["42"] * 4, schema="deepsynapse")
    [1.0, -1.0, 0.0, -1.0]
    """
    missing = -1.0 if requires_field(columns, "critique") else None
    out: Scores = []
    for parsed, gold in zip(_parsed(completions, columns), columns["answer"], strict=True):
        critique = parsed.fields.get("critique")
        if not critique:
            out.append(missing)
            continue
        verdict = critique_verdict(critique)
        if verdict is None:
            out.append(0.0)
        else:
            out.append(1.0 if verdict == is_correct(parsed, gold) else -1.0)
    return out


critique_consistency_reward.name = "critique_consistency"  # type: ignore[attr-defined]
