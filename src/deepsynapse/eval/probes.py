"""Emergent skill probes: a small, fixed, generated suite that shows *which* skills a run gains.

Task accuracy says whether a model improves; probes say what it learned. Each skill is a
handful of templated items generated from a fixed seed (same seed, same items), with
names, objects and number ranges that the training generator (`deepsynapse.data.synthetic`)
never uses, so a probe item is never a training item. Skills and how an item is scored:

- ``format``: a trivial question; correct iff the completion is strictly valid XML for the
  schema (the question is trivial so that only the format is measured).
- ``arithmetic``: bare multi-digit ``+ - * /`` (exact integer results).
- ``units``: hours/minutes, meters/centimeters, dollars/cents, kilograms/grams.
- ``multistep``: 2-3 step word problems.
- ``distractor_mc``: a word problem with options A-D (the gold and three distractors: an
  arithmetic slip, an intermediate quantity, a wrong scale); the letter or the value counts.
- ``consistency``: the same problem worded two ways; the pair counts as one unit, correct
  only if both wordings get the right answer.
- ``unanswerable``: half the items miss a needed quantity (correct: an answer containing
  "cannot be determined", "unknown", "not enough information" ...); the other half are
  the same templates with the quantity given (correct: the number), so answering
  "unknown" to everything scores no better than answering a number to everything.
- ``error_spotting``: a worked solution with numbered steps, exactly one with a wrong
  result (later steps compute correctly from it); the answer is the wrong step's number.
- ``calibration``: questions from trivial to hard (one-digit sums, two-digit products,
  four-by-three-digit products, multi-step word problems) that ask for a confidence
  too. An item scores ``1 - (c - y)^2`` (one minus its Brier score) with c the stated
  ``<confidence>`` and y = 1 if the answer is right, else 0: 1 for a right answer stated
  with certainty, 0 for a wrong one stated with certainty. A completion that states no
  confidence (none of the schema's, or none that is a number in [0, 1]) scores 0, the
  worst value, never skipped; under a schema without a confidence field (base) a
  ``<confidence>`` tag is still read if the model writes one. The summary also reports
  Brier score, expected calibration error (ECE) and how often a confidence was stated.

Answers are read from the ``<answer>`` field even when the completion is otherwise
invalid, as in the held-out evaluation; only ``format`` judges validity. Every record
carries a ``score`` in [0, 1] (1 or 0 = correct or not, except for ``calibration``); a
skill's value is the mean over its units of the lowest score among the unit's items.

`EmergenceDetector` watches the per-skill curves (metrics ``probes/<skill>``) and logs an
``emergence`` event when a skill jumps beyond its binomial noise band.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from deepsynapse.control.knobs import Event, Knobs
from deepsynapse.data.answers import answers_match
from deepsynapse.formats import (
    DEEPSYNAPSE_SCHEMA,
    ParsedCompletion,
    XMLSchema,
    get_schema,
    parse_completion,
    stop_strings,
)
from deepsynapse.models.policy import SEQUENCE_MULTIPLE
from deepsynapse.prompting import build_prompt
from deepsynapse.rollout.hf import Sampler, generate_with

__all__ = [
    "CANNOT",
    "PROBE_NAMES",
    "SKILLS",
    "UNANSWERABLE_PHRASES",
    "EmergenceDetector",
    "ProbeItem",
    "build_probe_suite",
    "calibration_summary",
    "probe_metrics",
    "run_probes",
    "says_cannot",
    "score_item",
    "stated_confidence",
    "summarize_probes",
]

SKILLS = (
    "format",
    "arithmetic",
    "units",
    "multistep",
    "distractor_mc",
    "consistency",
    "unanswerable",
    "error_spotting",
    "calibration",
)
CANNOT = "cannot be determined"
UNANSWERABLE_PHRASES = (
    "cannot be determined",
    "can't be determined",
    "can not be determined",
    "cannot determine",
    "undetermined",
    "unknown",
    "not enough information",
    "insufficient information",
    "not enough info",
    "cannot be answered",
    "not possible to determine",
    "impossible to determine",
)
_HINT = (
    f' If the question cannot be answered from the information given, write "{CANNOT}"'
    " as the answer."
)
_ASK_CONFIDENCE = (
    " Also state how confident you are that your answer is right, as a number between 0 and 1."
)


@dataclass(frozen=True, slots=True)
class ProbeItem:
    """One probe question. ``group`` ties the two wordings of a consistency pair."""

    id: str
    skill: str
    question: str
    answer: str  # gold: a number, an option letter, or CANNOT
    accept: tuple[str, ...] = ()  # other answers that count (the value of an MC option)
    group: str = ""
    columns: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ vocabulary
# Deliberately disjoint from deepsynapse.data.synthetic (its names, items and containers).

PROBE_NAMES = (
    "Beatrix", "Cornelius", "Dagny", "Evander", "Fenella", "Gustav", "Henrietta", "Ignatius",
    "Juniper", "Kasimir", "Lavinia", "Magnus", "Octavia", "Percival", "Rosalind", "Thaddeus",
    "Ursula", "Wendell", "Xiomara", "Zebedee",
)  # fmt: skip
_NOUNS = (
    "lanterns", "acorns", "buttons", "postcards", "pinecones", "candles", "kites", "teacups",
    "thimbles", "chestnuts",
)  # fmt: skip


class _Gen:
    """The random choices of one probe item."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def name(self) -> str:
        name = self.rng.choice([n for n in PROBE_NAMES if n not in self.used])
        self.used.add(name)
        return name

    def noun(self) -> str:
        return self.rng.choice(_NOUNS)

    def randint(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def pick(self, options: Sequence[Any]) -> Any:
        return self.rng.choice(list(options))


# ------------------------------------------------------------------ word problems
# Each returns (question, answer, intermediates); shared by multistep and distractor_mc.

_Problem = tuple[str, int, list[int]]


def _wp_shelves(g: _Gen) -> _Problem:
    name, k, m = g.name(), g.randint(3, 9), g.randint(11, 19)
    b = g.randint(2, k * m // 3)
    q = (
        f"{name} arranges {k} shelves with {m} teacups on each shelf, then breaks {b} of them "
        "while dusting. How many teacups are still whole?"
    )
    return q, k * m - b, [k * m]


def _wp_kites(g: _Gen) -> _Problem:
    name, k, p, s, r = g.name(), g.randint(3, 8), g.randint(7, 19), g.randint(2, 6), g.randint(3, 9)
    total = k * p + s * r
    bill = (total // 100 + 1) * 100
    q = (
        f"{name} buys {k} kites at ${p} each and {s} spools of string at ${r} each, and pays "
        f"with a ${bill} bill. How many dollars of change does {name} receive?"
    )
    return q, bill - total, [k * p, s * r, total]


def _wp_ferry(g: _Gen) -> _Problem:
    t, c, d = g.randint(3, 7), g.randint(21, 48), g.randint(3, 9)
    q = (
        f"A lake ferry makes {t} crossings a day and carries {c} passengers on each crossing. "
        f"How many passengers does it carry in {d} days?"
    )
    return q, t * c * d, [t * c]


def _wp_acorns(g: _Gen) -> _Problem:
    a, b = g.name(), g.name()
    n = g.randint(13, 47)
    gift = g.randint(5, 2 * n)
    q = (
        f"{a} gathers {n} acorns and {b} gathers twice as many. Together they give {gift} "
        "acorns to the park ranger. How many acorns do they have left?"
    )
    return q, 3 * n - gift, [2 * n, 3 * n]


def _wp_albums(g: _Gen) -> _Problem:
    name, k, each, extra = g.name(), g.randint(3, 8), g.randint(12, 31), g.randint(2, 9)
    q = (
        f"{name} divides {k * each} postcards equally into {k} albums and then adds {extra} "
        "more postcards to each album. How many postcards are in each album?"
    )
    return q, each + extra, [each]


_WORD_PROBLEMS: tuple[Callable[[_Gen], _Problem], ...] = (
    _wp_shelves,
    _wp_kites,
    _wp_ferry,
    _wp_acorns,
    _wp_albums,
)


# ------------------------------------------------------------------ skills


def _format(g: _Gen, i: int) -> list[ProbeItem]:
    name, noun, n = g.name(), g.noun(), g.randint(101, 999)
    q, a = g.pick(
        (
            (f"{name} has {n} {noun}. How many {noun} does {name} have?", n),
            (f"What number comes right after {n}?", n + 1),
            (f"{name} writes the number {n} on a card. What number is on the card?", n),
        )
    )
    return [ProbeItem(f"probe-format-{i}", "format", q, str(a))]


def _arithmetic(g: _Gen, i: int) -> list[ProbeItem]:
    op = ("+", "-", "*", "/")[i % 4]
    if op == "+":
        a, b = g.randint(1000, 9999), g.randint(100, 9999)
        r, words = a + b, "plus"
    elif op == "-":
        a = g.randint(2000, 9999)
        b = g.randint(101, a - 100)
        r, words = a - b, "minus"
    elif op == "*":
        a, b = g.randint(12, 99), g.randint(12, 99)
        r, words = a * b, "times"
    else:
        b, r = g.randint(12, 49), g.randint(21, 299)
        a, words = b * r, "divided by"
    q = g.pick(
        (
            f"What is {a} {op} {b}?",
            f"Calculate {a} {op} {b}.",
            f"What is {a} {words} {b}?",
        )
    )
    return [ProbeItem(f"probe-arithmetic-{i}", "arithmetic", q, str(r))]


def _units(g: _Gen, i: int) -> list[ProbeItem]:
    name = g.name()
    kind, down = i % 4, g.pick((True, False))
    if kind == 0:
        x = g.randint(2, 12)
        q = (
            f"{name}'s choir rehearsal lasts {x} hours. How many minutes is that?"
            if down
            else f"{name} spends {60 * x} minutes polishing lanterns. How many hours is that?"
        )
        a = 60 * x if down else x
    elif kind == 1:
        x = g.randint(3, 40)
        q = (
            f"{name} cuts a garland {x} meters long. How many centimeters long is it?"
            if down
            else f"A garland is {100 * x} centimeters long. How many meters long is it?"
        )
        a = 100 * x if down else x
    elif kind == 2:
        x = g.randint(3, 40)
        q = (
            f"{name} keeps {x} dollars in a tin. How many cents is that?"
            if down
            else f"{name} keeps {100 * x} cents in a tin. How many dollars is that?"
        )
        a = 100 * x if down else x
    else:
        x = g.randint(2, 30)
        q = (
            f"A sack of chestnuts weighs {x} kilograms. How many grams is that?"
            if down
            else f"A sack of chestnuts weighs {1000 * x} grams. How many kilograms is that?"
        )
        a = 1000 * x if down else x
    return [ProbeItem(f"probe-units-{i}", "units", q, str(a))]


def _multistep(g: _Gen, i: int) -> list[ProbeItem]:
    q, a, _ = _WORD_PROBLEMS[i % len(_WORD_PROBLEMS)](g)
    return [ProbeItem(f"probe-multistep-{i}", "multistep", q, str(a))]


def _distractors(g: _Gen, gold: int, intermediates: list[int]) -> dict[str, int]:
    """Three distinct wrong answers: an arithmetic slip, an intermediate, a wrong scale."""
    taken = {gold}

    def fresh(candidates: list[int]) -> int:
        for c in candidates:
            if c > 0 and c not in taken:
                taken.add(c)
                return c
        raise AssertionError("no fresh distractor")  # pragma: no cover

    numeric = fresh([gold + g.pick((-1, 1)) * g.randint(1, 9), gold + 11, gold + 13])
    semantic = fresh([*reversed(intermediates), gold * 2, gold + 21])
    unit = fresh([gold * 10, gold * 100, gold * 1000])
    return {"numeric": numeric, "semantic": semantic, "unit": unit}


def _distractor_mc(g: _Gen, i: int) -> list[ProbeItem]:
    q, a, inter = _WORD_PROBLEMS[(i + 2) % len(_WORD_PROBLEMS)](g)
    wrong = _distractors(g, a, inter)
    options = [a, *wrong.values()]
    g.rng.shuffle(options)
    letters = "ABCD"
    lines = "\n".join(f"{letters[j]}) {v}" for j, v in enumerate(options))
    question = f"{q}\nOptions:\n{lines}\nAnswer with the letter of the correct option."
    letter = letters[options.index(a)]
    return [
        ProbeItem(
            f"probe-distractor_mc-{i}",
            "distractor_mc",
            question,
            letter,
            accept=(str(a),),
            columns={
                "options": {letters[j]: str(v) for j, v in enumerate(options)},
                "distractors": {k: str(v) for k, v in wrong.items()},
            },
        )
    ]


def _consistency(g: _Gen, i: int) -> list[ProbeItem]:
    name, kind = g.name(), i % 4
    if kind == 0:
        a, k, m = g.randint(11, 60), g.randint(3, 9), g.randint(6, 14)
        ans = a + k * m
        one = (
            f"{name} owns {a} buttons and buys {k} cards of buttons with {m} buttons on each "
            f"card. How many buttons does {name} own now?"
        )
        two = (
            f"Each card of buttons holds {m} buttons. {name} already has {a} buttons and then "
            f"purchases {k} such cards. What is the total number of buttons {name} has?"
        )
    elif kind == 1:
        m, k = g.randint(6, 16), g.randint(3, 9)
        e = g.randint(2, m * k // 2)
        ans = m * k - e
        one = (
            f"A bakery box holds {m} chestnut rolls. {name} fills {k} boxes and then eats {e} "
            "rolls. How many rolls are left?"
        )
        two = (
            f"{name} eats {e} chestnut rolls after filling {k} boxes that hold {m} rolls each. "
            "How many rolls remain?"
        )
    elif kind == 2:
        d, n = g.randint(3, 19), g.randint(4, 15)
        ans = d * n
        one = (
            f"{name} walks {d} kilometers each day for {n} days. How many kilometers does "
            f"{name} walk in total?"
        )
        two = (
            f"Over {n} days, {name} covers {d} kilometers per day on foot. What total "
            f"distance, in kilometers, does {name} walk?"
        )
    else:
        k, each = g.randint(3, 9), g.randint(7, 45)
        ans = each
        one = (
            f"{name} splits {k * each} dollars equally among {k} cousins. How many dollars "
            "does each cousin get?"
        )
        two = (
            f"{k} cousins share {k * each} dollars from {name} so that each gets the same "
            "amount. How many dollars does each cousin receive?"
        )
    group = f"probe-consistency-{i}"
    return [
        ProbeItem(f"{group}-a", "consistency", one, str(ans), group=group),
        ProbeItem(f"{group}-b", "consistency", two, str(ans), group=group),
    ]


def _unanswerable(g: _Gen, i: int) -> list[ProbeItem]:
    missing = i % 2 == 0  # even: information missing; odd: the same template, answerable
    kind = (i // 2) % 4
    name = g.name()
    if kind == 0:
        k, p = g.randint(3, 12), g.randint(4, 15)
        count = "some" if missing else str(k)
        q = (
            f"{name} buys {count} lanterns for a festival. Each lantern costs ${p}. "
            f"How many dollars does {name} spend on lanterns?"
        )
        a = k * p
    elif kind == 1:
        v, h = g.randint(40, 90), g.randint(2, 6)
        speed = "" if missing else f" at {v} kilometers per hour"
        q = (
            f"{name} drives to a lake {v * h} kilometers away{speed}. "
            "How many hours does the drive take?"
        )
        a = h
    elif kind == 2:
        other, x, y = g.name(), g.randint(12, 70), g.randint(12, 70)
        theirs = f"{other} picks some too" if missing else f"{other} picks {y}"
        q = (
            f"{name} and {other} pick pinecones. {name} picks {x} and {theirs}. "
            "How many pinecones do they pick together?"
        )
        a = x + y
    else:
        k, p = g.randint(4, 20), g.randint(3, 12)
        price = "at the usual price" if missing else f"for ${p} each"
        q = f"{name} sells {k} teacups at a market {price}. How many dollars does {name} earn?"
        a = k * p
    gold = CANNOT if missing else str(a)
    return [
        ProbeItem(
            f"probe-unanswerable-{i}",
            "unanswerable",
            q + _HINT,
            gold,
            columns={"missing_information": missing},
        )
    ]


def _error_spotting(g: _Gen, i: int) -> list[ProbeItem]:
    """A numbered solution where step ``wrong`` shows a wrong result, later steps follow it."""
    name = g.name()
    if i % 2 == 0:
        a, b, c, d = g.randint(3, 9), g.randint(12, 25), g.randint(5, 30), g.randint(4, 20)
        story = (
            f"{name} packs {a} crates with {b} pinecones in each, then finds {c} more "
            f"pinecones and gives {d} to a neighbour. How many pinecones does {name} have now?"
        )
        # Each step: (left, op, right); an int is a constant, ("s", j) is step j's result.
        steps: list[tuple[Any, str, Any]] = [(a, "*", b), (("s", 0), "+", c), (("s", 1), "-", d)]
    else:
        k, p, m, r, s = (
            g.randint(3, 8),
            g.randint(9, 15),
            g.randint(2, 6),
            g.randint(3, 9),
            g.randint(4, 12),
        )
        story = (
            f"{name} sells {k} kites at ${p} each and {m} spools of string at ${r} each, then "
            f"spends ${s} on new paper. How many dollars does {name} have left from the sales?"
        )
        steps = [(k, "*", p), (m, "*", r), (("s", 0), "+", ("s", 1)), (("s", 2), "-", s)]
    wrong = g.randint(0, len(steps) - 1)
    shown: list[int] = []
    lines = []
    for j, (left, op, right) in enumerate(steps):
        x = shown[left[1]] if isinstance(left, tuple) else left
        y = shown[right[1]] if isinstance(right, tuple) else right
        value = {"+": x + y, "-": x - y, "*": x * y}[op]
        if j == wrong:
            delta = g.pick((1, 2, 3, 5, 9, 10, 11, 20))
            value = value + delta if value - delta < 1 or g.pick((True, False)) else value - delta
        shown.append(value)
        lines.append(f"Step {j + 1}: {x} {op} {y} = {value}")
    question = (
        f"{story}\nHere is a worked solution:\n" + "\n".join(lines) + "\n"
        "Exactly one step has an arithmetic mistake. Which step is wrong? "
        "Give the step number as the answer."
    )
    return [
        ProbeItem(
            f"probe-error_spotting-{i}",
            "error_spotting",
            question,
            str(wrong + 1),
            columns={"steps": len(steps)},
        )
    ]


def _calibration(g: _Gen, i: int) -> list[ProbeItem]:
    """A question of known difficulty that also asks for a confidence (see the docstring).

    Difficulty cycles easy, medium, hard, multi-step, so that a model whose confidence
    tracks its correctness has easy items to be sure of and hard ones to doubt.
    """
    kind = i % 4
    if kind == 0:
        a, b = g.randint(2, 9), g.randint(2, 9)
        q, ans, level = g.pick((f"What is {a} + {b}?", f"Add {a} and {b}.")), a + b, "easy"
    elif kind == 1:
        a, b = g.randint(13, 49), g.randint(3, 9)
        q, ans, level = f"What is {a} * {b}?", a * b, "medium"
    elif kind == 2:
        a, b = g.randint(1234, 9876), g.randint(123, 987)
        q, ans, level = f"What is {a} * {b}?", a * b, "hard"
    else:
        q, ans, _ = _WORD_PROBLEMS[(i // 4 + 1) % len(_WORD_PROBLEMS)](g)
        level = "hard"
    return [
        ProbeItem(
            f"probe-calibration-{i}",
            "calibration",
            q + _ASK_CONFIDENCE,
            str(ans),
            columns={"difficulty": level},
        )
    ]


_GENERATORS: dict[str, Callable[[_Gen, int], list[ProbeItem]]] = {
    "format": _format,
    "arithmetic": _arithmetic,
    "units": _units,
    "multistep": _multistep,
    "distractor_mc": _distractor_mc,
    "consistency": _consistency,
    "unanswerable": _unanswerable,
    "error_spotting": _error_spotting,
    "calibration": _calibration,
}


def build_probe_suite(
    seed: int = 1234, per_skill: int = 8, skills: Sequence[str] = SKILLS
) -> list[ProbeItem]:
    """``per_skill`` scored units for each skill (a consistency unit is a pair of items).

    Deterministic: item ``i`` of a skill depends only on ``(seed, skill, i)``. Questions
    are distinct within the suite.

    >>> a, b = build_probe_suite(per_skill=2), build_probe_suite(per_skill=2)
    >>> a == b, len(a), sorted({x.skill for x in a}) == sorted(SKILLS)
    (True, 20, True)
    """
    unknown = [s for s in skills if s not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown probe skills {unknown}; valid: {', '.join(SKILLS)}")
    if per_skill < 1:
        raise ValueError(f"per_skill must be >= 1, got {per_skill}")
    items: list[ProbeItem] = []
    seen: set[str] = set()
    for skill in skills:
        for i in range(per_skill):
            for attempt in range(100):
                rng = random.Random(f"deepsynapse-probes:{seed}:{skill}:{i}:{attempt}")
                new = _GENERATORS[skill](_Gen(rng), i)
                if not any(x.question in seen for x in new):
                    break
            seen.update(x.question for x in new)
            items.extend(new)
    return items


# ------------------------------------------------------------------ scoring

_LETTER_ONLY = re.compile(r"\(?([A-Da-d])\)?\.?")
_LETTER_LEAD = re.compile(r"(?:option\s+|answer\s*:?\s*)?\(?([A-D])(?:\)|\.|:|$)", re.I)


def _mc_letter(answer: str) -> str | None:
    text = answer.strip()
    m = _LETTER_ONLY.fullmatch(text) or _LETTER_LEAD.match(text)
    return m.group(1).upper() if m else None


def says_cannot(answer: str | None) -> bool:
    """Whether an answer states that the question cannot be answered."""
    if not answer:
        return False
    text = " ".join(answer.lower().replace("\u2019", "'").split())
    return any(phrase in text for phrase in UNANSWERABLE_PHRASES)


def stated_confidence(completion: str, parsed: ParsedCompletion, schema: XMLSchema) -> float | None:
    """The completion's ``<confidence>`` in [0, 1], or None.

    Read with ``schema`` when it has the field, else as if the schema were deepsynapse (a
    model trained without the field may still write one).
    """
    if "confidence" in schema.fields:
        return parsed.confidence
    return parse_completion(completion, DEEPSYNAPSE_SCHEMA).confidence


def score_item(item: ProbeItem, completion: str, schema: XMLSchema | str) -> dict[str, Any]:
    """Whether one completion answers one probe item correctly (see the module docstring).

    Returns ``predicted``, ``correct``, ``format_valid`` and ``score`` (in [0, 1]; for
    ``calibration`` one minus the Brier score of ``confidence``, 0 without a confidence).
    """
    schema = get_schema(schema)
    parsed = parse_completion(completion, schema)
    answer = parsed.fields.get("answer")
    if item.skill == "calibration":
        correct = answer is not None and answers_match(answer, item.answer)
        confidence = stated_confidence(completion, parsed, schema)
        score = 0.0 if confidence is None else 1.0 - (confidence - float(correct)) ** 2
        return {
            "predicted": answer,
            "correct": bool(correct),
            "format_valid": parsed.valid,
            "score": round(score, 12),
            "confidence": confidence,
        }
    if item.skill == "format":
        correct = parsed.valid
    elif answer is None:
        correct = False
    elif item.skill == "distractor_mc":
        letter = _mc_letter(answer)
        if letter is not None:
            correct = letter == item.answer
        else:
            correct = any(answers_match(answer, v) for v in item.accept)
    elif item.answer == CANNOT:
        correct = says_cannot(answer)
    elif item.skill == "unanswerable":  # an answerable control: the number, no hedging
        correct = answers_match(answer, item.answer) and not says_cannot(answer)
    else:
        correct = answers_match(answer, item.answer)
    return {
        "predicted": answer,
        "correct": bool(correct),
        "format_valid": parsed.valid,
        "score": float(bool(correct)),
    }


@torch.no_grad()
def run_probes(
    model,
    tokenizer,
    items: Sequence[ProbeItem],
    schema: XMLSchema | str,
    batch_size: int = 16,
    max_new_tokens: int = 200,
    *,
    progress: bool = False,
    pad_multiple: int = SEQUENCE_MULTIPLE,
    around: Callable[..., Any] | None = None,
    sampler: Sampler | None = None,
) -> dict[str, Any]:
    """Greedy, batched completions for ``items``; per-skill accuracy over scored units.

    ``around`` is the per-prompt hook of the trained policy (the hypernetwork's scales),
    as in ``generate_groups``: probes see the model that was trained. ``sampler`` decodes
    with another backend (vLLM's engine holding the policy's weights; ``generate_with``).

    Returns ``skills`` ({skill: score}), ``counts`` ({skill: units}), ``accuracy`` (the
    mean over skills), ``format_validity`` (over items), ``seconds``, ``records`` and,
    with calibration items, ``calibration`` (see `calibration_summary`).
    """
    schema = get_schema(schema)
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc="probes", disable=not progress, leave=False)
    try:
        for i in range(0, len(items), batch_size):
            chunk = list(items[i : i + batch_size])
            prompts = [build_prompt(tokenizer, it.question, schema) for it in chunk]
            out = generate_with(
                sampler,
                model,
                tokenizer,
                prompts,
                prefix_sharing=True,  # the items' common prefix once
                around=around,
                num_generations=1,
                max_new_tokens=max_new_tokens,
                greedy=True,
                stop_strings=stop_strings(schema),
                pad_multiple=pad_multiple,
            )
            for it, text in zip(chunk, out.texts, strict=True):
                scored = score_item(it, text, schema)
                records.append(
                    {
                        "id": it.id,
                        "skill": it.skill,
                        "group": it.group or it.id,
                        "gold": it.answer,
                        **scored,
                        "completion": text,
                    }
                )
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return summarize_probes(records, time.perf_counter() - start)


def _record_score(record: dict[str, Any]) -> float:
    """A record's score in [0, 1] (records without one: 1 if correct, else 0)."""
    score = record.get("score")
    return float(bool(record["correct"])) if score is None else float(score)


def calibration_summary(records: list[dict[str, Any]], bins: int = 10) -> dict[str, Any]:
    """Brier score, ECE and more over ``calibration`` records (empty dict without any).

    ``brier`` counts a record without a confidence as 1 (the worst); ``ece`` (expected
    calibration error: ``bins`` equal-width confidence bins, the gap between mean
    confidence and accuracy weighted by the bin's share) uses the records that state a
    confidence and is None when none does; ``stated`` is their share.
    """
    cal = [r for r in records if r["skill"] == "calibration"]
    if not cal:
        return {}
    stated = [(float(r["confidence"]), float(bool(r["correct"]))) for r in cal
              if r.get("confidence") is not None]  # fmt: skip
    brier = (sum((c - y) ** 2 for c, y in stated) + (len(cal) - len(stated))) / len(cal)
    ece = None
    if stated:
        grouped: dict[int, list[tuple[float, float]]] = {}
        for c, y in stated:
            grouped.setdefault(min(int(c * bins), bins - 1), []).append((c, y))
        gaps = [abs(sum(c for c, _ in v) - sum(y for _, y in v)) for v in grouped.values()]
        ece = sum(gaps) / len(stated)  # = sum over bins of share * |confidence - accuracy|
    return {
        "n": len(cal),
        "stated": len(stated) / len(cal),
        "accuracy": sum(bool(r["correct"]) for r in cal) / len(cal),
        "mean_confidence": sum(c for c, _ in stated) / len(stated) if stated else None,
        "brier": brier,
        "ece": ece,
    }


def summarize_probes(records: list[dict[str, Any]], seconds: float = 0.0) -> dict[str, Any]:
    """Per-skill score over units: a unit (a ``group``) scores the lowest ``score`` of its
    items, so a consistency pair is correct iff both wordings are; calibration units are
    single items scored 1 - Brier. Adds ``calibration`` (`calibration_summary`) when the
    records hold calibration items."""
    units: dict[tuple[str, str], float] = {}
    for r in records:
        key = (r["skill"], r["group"])
        units[key] = min(units.get(key, 1.0), _record_score(r))
    skills: dict[str, list[float]] = {}
    for (skill, _), value in units.items():
        skills.setdefault(skill, []).append(value)
    per_skill = {s: sum(v) / len(v) for s, v in skills.items()}
    extra = (
        {"calibration": calibration_summary(records)}
        if any(r["skill"] == "calibration" for r in records)
        else {}
    )
    return {
        "n_items": len(records),
        "n_units": len(units),
        "skills": per_skill,
        "counts": {s: len(v) for s, v in skills.items()},
        "accuracy": sum(per_skill.values()) / len(per_skill) if per_skill else 0.0,
        "format_validity": (
            sum(bool(r["format_valid"]) for r in records) / len(records) if records else 0.0
        ),
        "seconds": seconds,
        **extra,
        "records": records,
    }


def probe_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``probes/<skill>`` and ``probes/mean`` for metrics.jsonl and the trackers."""
    out = {f"probes/{s}": float(v) for s, v in result["skills"].items()}
    out["probes/mean"] = float(result["accuracy"])
    return out


# ------------------------------------------------------------------ emergence


class EmergenceDetector:
    """Flags a skill whose probe accuracy jumps beyond the noise of its recent history.

    A controller that changes no knob. Each probe evaluation (a step whose metrics carry
    ``probes/<skill>``) appends to that skill's history. The mean r of the last ``confirm``
    values is compared with the mean m of the ``window`` values before them. With
    ``n_items`` units per skill an accuracy is binomial noise around the true rate, so the
    band is ``k * sqrt(p(1-p)/n * (1/confirm + 1/window))`` (the noise of both means, p = m
    smoothed away from 0 and 1). An ``emergence`` event fires when r > m + band and
    r - m >= ``min_gain``. Requiring ``confirm`` evaluations is what keeps single lucky
    evaluations quiet (with 8 items a skill at 50% scores 75% one time in seven). After a
    flag the history restarts from the confirming values, so a step jump is flagged once
    and its new level becomes the baseline.

    Defaults measured on simulated binomial curves (8 items, 40 evaluations): about 0.08
    false flags per skill and run; a jump from 10% to 60% is flagged in 98% of runs.
    """

    name = "emergence"
    writes: ClassVar[dict[str, str]] = {}  # probes observe

    def __init__(
        self,
        n_items: int = 8,
        window: int = 5,
        confirm: int = 2,
        k: float = 3.0,
        min_gain: float = 0.25,
        prefix: str = "probes/",
        ignore: Sequence[str] = ("mean",),
    ) -> None:
        if n_items < 1 or window < 1 or confirm < 1:
            raise ValueError("n_items, window and confirm must be >= 1")
        self.n_items, self.window, self.confirm = n_items, window, confirm
        self.k, self.min_gain = k, min_gain
        self.prefix, self.ignore = prefix, tuple(ignore)
        self.history: dict[str, list[float]] = {}
        self.flagged: list[dict[str, Any]] = []

    def apply(self, knobs: Knobs) -> None:
        """Probes observe; they change no knob."""

    def band(self, mean: float) -> float:
        """How far above ``mean`` a confirmed level must be to stand out of the noise."""
        n = self.n_items * self.window
        p = (mean * n + 1) / (n + 2)
        return self.k * math.sqrt(p * (1 - p) / self.n_items * (1 / self.confirm + 1 / self.window))

    def observe(self, step: int, metrics: dict[str, float]) -> list[Event]:
        events = []
        for key in sorted(metrics):
            skill = key[len(self.prefix) :]
            if not key.startswith(self.prefix) or "/" in skill or skill in self.ignore:
                continue
            value = metrics[key]
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            history = self.history.setdefault(skill, [])
            history.append(float(value))
            del history[: -(self.window + self.confirm)]
            if len(history) < self.window + self.confirm:
                continue
            baseline, recent = history[: self.window], history[self.window :]
            mean = sum(baseline) / self.window
            level = sum(recent) / self.confirm
            band = self.band(mean)
            if level > mean + band and level - mean >= self.min_gain:
                evidence = {
                    "skill": skill,
                    "value": value,
                    "level": round(level, 6),
                    "recent": recent,
                    "baseline_mean": round(mean, 6),
                    "baseline": baseline,
                    "band": round(band, 6),
                    "min_gain": self.min_gain,
                    "n_items": self.n_items,
                }
                events.append(
                    Event(
                        "emergence",
                        f"skill '{skill}' rose to {level:.2f} from {mean:.2f} "
                        f"(noise band +{band:.2f}, {self.confirm} evaluations)",
                        evidence,
                    )
                )
                self.flagged.append({"step": step, "skill": skill, "level": level})
                self.history[skill] = list(recent)
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {s: list(v) for s, v in self.history.items()},
            "flagged": [dict(f) for f in self.flagged],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {s: [float(x) for x in v] for s, v in state.get("history", {}).items()}
        self.flagged = [dict(f) for f in state.get("flagged", [])]
