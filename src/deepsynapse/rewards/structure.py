"""XML Structural Guardian rewards: graded structure from the parser's errors, and length.

The parser (`deepsynapse.formats.parse_completion`) names what is wrong with a completion;
these components turn that into a graded score, so that a group whose completions are all
invalid still ranks the nearly valid ones higher (the cold-start signal), and into counts
for the ``format/errors/<category>`` metrics. Length penalties keep reasoning within a
budget that the curriculum may change between steps.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from deepsynapse.formats import BASE_SCHEMA, ParsedCompletion, XMLSchema, get_schema
from deepsynapse.rewards.base import Scores, _parsed

__all__ = [
    "LENGTH_PENALTIES",
    "STRUCTURE_CHECKS",
    "LengthPenalty",
    "completion_lengths",
    "error_counts",
    "make_length_penalty",
    "over_budget",
    "structure_checks",
    "structure_reward",
]

# Partial credit: each check's weight; they sum to 1, so only a valid completion scores 1.
STRUCTURE_CHECKS: dict[str, float] = {
    "present": 0.40,  # share of required fields present and non-empty
    "once": 0.10,  # no field repeated
    "ordered": 0.10,  # fields in schema order
    "well_formed": 0.15,  # every field closed, no tag nested in a field, no unknown tag
    "nothing_outside": 0.10,  # only whitespace outside the fields
    "answer_parses": 0.15,  # a number in <answer>; a confidence (if any) in [0, 1]
}


def structure_checks(parsed: ParsedCompletion, schema: XMLSchema | str = BASE_SCHEMA) -> dict:
    """Each check of `STRUCTURE_CHECKS` for one parsed completion, as a value in [0, 1].

    A completion with no schema field at all passes nothing: an empty or unrelated text is
    not "well ordered" or "free of outside text" in any useful sense.
    """
    schema = get_schema(schema)
    errors = set(parsed.errors)
    required = schema.required
    found = [
        name
        for name in required
        if f"missing:{name}" not in errors and f"empty:{name}" not in errors
    ]
    if not parsed.fields:
        return dict.fromkeys(STRUCTURE_CHECKS, 0.0)
    has = lambda prefix: any(e.startswith(prefix) for e in errors)  # noqa: E731
    return {
        "present": len(found) / len(required),
        "once": float(not has("duplicate:")),
        "ordered": float("order" not in errors),
        "well_formed": float(
            not has("unclosed:") and "nested_tag" not in errors and not has("unknown_tag:")
        ),
        "nothing_outside": float("text_outside" not in errors),
        "answer_parses": float(
            ("answer" not in schema.fields or "answer" in found)
            and "answer_not_numeric" not in errors
            and "confidence_not_in_0_1" not in errors
        ),
    }


def structure_reward(prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> Scores:
    """Graded structure in [0, 1]: the weighted checks of `STRUCTURE_CHECKS`.

    1.0 exactly when the parser finds no error; garbage without any field scores 0.

    >>> ok = "<reasoning>6 * 7 = 42</reasoning>\\n<answer>42</answer>"
    >>> structure_reward(["q"], [ok, "Sure! " + ok, "<reasoning>6 * 7", "42"])
    [1.0, 0.9, 0.5, 0.0]
    """
    schema = columns.get("schema", BASE_SCHEMA)
    out: Scores = []
    for parsed in _parsed(completions, columns):
        checks = structure_checks(parsed, schema)
        score = sum(STRUCTURE_CHECKS[name] * value for name, value in checks.items())
        out.append(round(score, 10))
    return out


structure_reward.name = "structure"  # type: ignore[attr-defined]


def error_counts(
    parsed_list: Iterable[ParsedCompletion], schema: XMLSchema | str | None = None
) -> dict[str, int]:
    """How many completions have each parser error category (metric ``format/errors/<cat>``).

    With ``schema``, every category that schema can produce is present (0 when unseen), so
    logged curves have no gaps.

    >>> from deepsynapse.formats import parse_completion
    >>> counts = error_counts([parse_completion("<answer>x</answer>"), parse_completion("hi")])
    >>> counts["missing:reasoning"], counts["answer_not_numeric"], counts["text_outside"]
    (2, 1, 1)
    """
    counts: Counter[str] = Counter()
    if schema is not None:
        schema = get_schema(schema)
        for name in ("order", "text_outside", "nested_tag"):
            counts[name] = 0
        for name in schema.fields:
            counts[f"duplicate:{name}"] = 0
            counts[f"unclosed:{name}"] = 0
        for name in schema.required:
            counts[f"missing:{name}"] = 0
            counts[f"empty:{name}"] = 0
        if "answer" in schema.fields:
            counts["answer_not_numeric"] = 0
        if "confidence" in schema.fields:
            counts["confidence_not_in_0_1"] = 0
    for parsed in parsed_list:
        counts.update(parsed.errors)
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------- length penalties

LENGTH_PENALTIES = ("none", "linear", "cosine", "truncation")


def completion_lengths(completions: Sequence[str], columns: dict[str, Any]) -> list[int]:
    """Length of each completion: tokens from column ``completion_lengths`` if given, else
    whitespace-separated words (so components work without a tokenizer)."""
    given = columns.get("completion_lengths")
    if given is not None:
        lengths = [int(x) for x in given]
        if len(lengths) != len(completions):
            raise ValueError(
                f"completion_lengths has {len(lengths)} entries for {len(completions)} completions"
            )
        return lengths
    return [len(c.split()) for c in completions]


def _budgets(n: int, default: int, columns: dict[str, Any]) -> list[int]:
    """Per-completion budgets from column ``length_budget`` (scalar or list), else default."""
    given = columns.get("length_budget")
    if given is None:
        return [default] * n
    if isinstance(given, int | float):
        return [int(given)] * n
    budgets = [default if b is None else int(b) for b in given]
    if len(budgets) != n:
        raise ValueError(f"length_budget has {len(budgets)} entries for {n} completions")
    return budgets


def over_budget(completions: Sequence[str], budget: int, **columns: Any) -> list[bool]:
    """Which completions exceed their budget or were cut by ``max_new_tokens``.

    DLER's truncation penalty sets the whole reward of such completions to 0; the trainer
    can apply that to the fused reward with this mask.
    """
    lengths = completion_lengths(completions, columns)
    budgets = _budgets(len(completions), budget, columns)
    truncated = columns.get("truncated")
    if truncated is None:
        truncated = [False] * len(completions)
    return [bool(t) or length > b for length, b, t in zip(lengths, budgets, truncated, strict=True)]


@dataclass(frozen=True)
class LengthPenalty:
    """A length penalty in [-1, 0] (0 = no penalty), in TRL's reward convention.

    Kinds, with L the length and B the budget:

    - ``none``: always 0.
    - ``linear``: 0 up to B, then -(L - B) / B, floored at -1 (at 2B).
    - ``cosine``: -(1 - cos(pi * min(L, B) / B)) / 2: rises smoothly from 0 at L = 0 to -1
      at L = B and stays -1 beyond; flat at both ends, so short answers are barely pushed.
    - ``truncation`` (DLER, seeds/001): 0 within budget, -1 over it or when the completion
      was truncated (column ``truncated``). DLER's "reward 0 when over budget" is the fused
      reward multiplied by ``not over_budget(...)``; as an additive component, -1 is the
      closest equivalent and a weight of at least the correctness weight cancels it.

    The budget is read per call from the column ``length_budget`` (a number or one per
    completion) so that a curriculum can change it; ``budget`` is the default.

    >>> pen = make_length_penalty("linear", budget=4)
    >>> pen(["q"] * 3, ["a b c", "a b c d e f", "a " * 20])
    [0.0, -0.5, -1.0]
    >>> pen(["q"], ["a b c d e f"], length_budget=6)
    [0.0]
    >>> cut = make_length_penalty("truncation", 4)
    >>> cut(["q"] * 3, ["a", "a", "a b c d e"], truncated=[True, False, False])
    [-1.0, 0.0, -1.0]
    """

    kind: str = "none"
    budget: int = 256
    name: str = "length_penalty"

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_PENALTIES:
            raise ValueError(
                f"unknown length penalty {self.kind!r}; valid: {', '.join(LENGTH_PENALTIES)}"
            )
        if self.budget <= 0:
            raise ValueError(f"length budget must be positive, got {self.budget}")

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> Scores:
        n = len(completions)
        if self.kind == "none":
            return [0.0] * n
        if self.kind == "truncation":
            return [
                -1.0 if over else 0.0 for over in over_budget(completions, self.budget, **columns)
            ]
        lengths = completion_lengths(completions, columns)
        budgets = _budgets(n, self.budget, columns)
        out: Scores = []
        for length, budget in zip(lengths, budgets, strict=True):
            budget = max(budget, 1)
            if self.kind == "linear":
                penalty = min(1.0, max(0.0, (length - budget) / budget))
            else:  # cosine
                penalty = (1.0 - math.cos(math.pi * min(length, budget) / budget)) / 2.0
            out.append(-penalty if penalty > 0 else 0.0)
        return out


def make_length_penalty(kind: str = "none", budget: int = 256) -> LengthPenalty:
    """The length penalty component of ``kind`` (none, linear, cosine, truncation)."""
    return LengthPenalty(kind, int(budget))
