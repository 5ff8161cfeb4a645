"""The strict XML answer format that models are trained to produce.

A completion is a sequence of top-level fields such as ``<reasoning>...</reasoning>``
``<answer>...</answer>``. Format rewards need to know not only whether a completion is
valid but *what* is wrong with it, so the parser reports named error categories and still
extracts whatever fields it can. It is a single linear scan over tags, because
completions are untrusted and can be megabytes of garbage.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from deepsynapse.data.answers import answers_match, normalize_answer

if TYPE_CHECKING:
    from deepsynapse.data.problems import Problem

__all__ = [
    "BASE_SCHEMA",
    "DEEPSYNAPSE_SCHEMA",
    "SCHEMAS",
    "ParsedCompletion",
    "XMLSchema",
    "format_completion",
    "get_schema",
    "parse_completion",
    "sft_target",
    "stop_strings",
    "system_prompt",
    "target_confidence",
    "verification_critique",
]

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Name characters cannot match '>' or '<', so each '<' costs at most one scan of the name
# run after it: linear overall.
_TAG_RE = re.compile(r"<(/?)([A-Za-z_][A-Za-z0-9_]*)>")
_CONFIDENCE_RE = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


@dataclass(frozen=True)
class XMLSchema:
    """Which fields a completion has, in which order, and which of them may be left out."""

    name: str
    fields: tuple[str, ...]
    optional: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "optional", frozenset(self.optional))
        if not self.fields:
            raise ValueError(f"schema {self.name!r} has no fields")
        for name in self.fields:
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                raise ValueError(f"schema {self.name!r}: {name!r} is not a valid tag name")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"schema {self.name!r} repeats a field: {self.fields}")
        if not self.optional <= set(self.fields):
            extra = sorted(self.optional - set(self.fields))
            raise ValueError(f"schema {self.name!r}: optional fields {extra} are not fields")
        if not self.required:
            raise ValueError(f"schema {self.name!r} needs at least one required field")

    @property
    def required(self) -> tuple[str, ...]:
        """The fields that must be present, in schema order."""
        return tuple(name for name in self.fields if name not in self.optional)


BASE_SCHEMA = XMLSchema("base", ("reasoning", "answer"), frozenset())
# Critique and confidence are required: were they optional, leaving them out would score
# None on the calibration and critique rewards (0 after fusion), which beats any stated
# confidence (a Brier reward is <= 0), and the policy would learn never to state one.
DEEPSYNAPSE_SCHEMA = XMLSchema("deepsynapse", ("reasoning", "answer", "critique", "confidence"))
SCHEMAS: dict[str, XMLSchema] = {"base": BASE_SCHEMA, "deepsynapse": DEEPSYNAPSE_SCHEMA}


def get_schema(name: str | XMLSchema) -> XMLSchema:
    """Look a schema up by name (an `XMLSchema` is passed through)."""
    if isinstance(name, XMLSchema):
        return name
    try:
        return SCHEMAS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(SCHEMAS))
        raise ValueError(f"unknown XML schema {name!r}; valid names: {valid}") from None


def _parse_confidence(text: str) -> float | None:
    """A confidence in [0, 1], or None; plain decimals only ("nan", "1e-1", "5_0" are not)."""
    text = text.strip()
    if not _CONFIDENCE_RE.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


@dataclass
class ParsedCompletion:
    """Result of `parse_completion`.

    ``fields`` is filled best-effort even for invalid completions (first occurrence of
    each field, stripped), so that partial credit and diagnostics stay possible.
    ``errors`` holds each error category at most once, in the order found.
    """

    valid: bool
    fields: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def answer(self) -> str | None:
        """The raw (stripped) answer field, if any."""
        return self.fields.get("answer")

    @property
    def confidence(self) -> float | None:
        """The confidence field as a float in [0, 1]; None if absent or not such a number."""
        raw = self.fields.get("confidence")
        return None if raw is None else _parse_confidence(raw)


def parse_completion(text: str, schema: XMLSchema | str = BASE_SCHEMA) -> ParsedCompletion:
    """Check ``text`` against the strict format and extract its fields.

    Valid means: each required field exactly once, optional ones at most once, all in
    schema order and properly closed; no tag inside a field; nothing but whitespace
    outside the fields; no empty required field; an answer containing a number; a
    confidence (if present) that is a number in [0, 1].

    A tag inside an open field counts as nested if the field is closed later, otherwise
    the field is unclosed and ends at that tag. A closing tag with no open field is stray
    markup and reported as ``text_outside``. Never raises on a string.

    >>> parse_completion("<reasoning>\\n6 * 7\\n</reasoning>\\n<answer>42</answer>").valid
    True
    >>> p = parse_completion("<answer>42</answer><reasoning>x</reasoning> hi")
    >>> p.errors, p.answer
    (['text_outside', 'order'], '42')
    """
    schema = get_schema(schema)
    if text is None:
        text = ""
    known = set(schema.fields)
    errors: dict[str, None] = {}  # ordered set
    fields: dict[str, str] = {}
    counts: dict[str, int] = {}
    order: list[str] = []

    tags = [(m.start(), m.end(), bool(m.group(1)), m.group(2)) for m in _TAG_RE.finditer(text)]
    last_close: dict[str, int] = {}
    for index, (_, _, closing, name) in enumerate(tags):
        if closing and name in known:
            last_close[name] = index

    def store(name: str, content: str) -> None:
        fields.setdefault(name, content.strip())

    open_name: str | None = None
    content_start = 0
    cursor = 0  # end of the last piece of structure seen at top level
    for index, (start, end, closing, name) in enumerate(tags):
        if open_name is not None:
            if closing and name == open_name:
                store(open_name, text[content_start:start])
                open_name, cursor = None, end
                continue
            if last_close.get(open_name, -1) > index:
                errors["nested_tag"] = None
                continue
            errors[f"unclosed:{open_name}"] = None
            store(open_name, text[content_start:start])
            open_name, cursor = None, start
        if text[cursor:start].strip():
            errors["text_outside"] = None
        cursor = end
        if name not in known:
            errors[f"unknown_tag:{name}"] = None
        elif closing:
            errors["text_outside"] = None
        else:
            counts[name] = counts.get(name, 0) + 1
            if counts[name] > 1:
                errors[f"duplicate:{name}"] = None
            else:
                order.append(name)
            open_name, content_start = name, end
    if open_name is not None:
        errors[f"unclosed:{open_name}"] = None
        store(open_name, text[content_start:])
        cursor = len(text)
    if text[cursor:].strip():
        errors["text_outside"] = None

    positions = [schema.fields.index(name) for name in order]
    if positions != sorted(positions):
        errors["order"] = None
    for name in schema.required:
        if name not in counts:
            errors[f"missing:{name}"] = None
        elif not fields.get(name):
            errors[f"empty:{name}"] = None
    answer = fields.get("answer")
    if "answer" in known and answer and normalize_answer(answer) is None:
        errors["answer_not_numeric"] = None
    confidence = fields.get("confidence")
    if "confidence" in known and confidence is not None and _parse_confidence(confidence) is None:
        errors["confidence_not_in_0_1"] = None
    return ParsedCompletion(valid=not errors, fields=fields, errors=list(errors))


def format_completion(fields: Mapping[str, str], schema: XMLSchema | str = BASE_SCHEMA) -> str:
    """Render fields in the strict format: each tag on its own line, schema order.

    Used for few-shot examples and supervised warm-up targets; absent optional fields are
    skipped, while a missing required or unknown field is a programming error.

    >>> print(format_completion({"reasoning": "6 * 7 = 42", "answer": "42"}))
    <reasoning>
    6 * 7 = 42
    </reasoning>
    <answer>
    42
    </answer>
    """
    schema = get_schema(schema)
    unknown = sorted(set(fields) - set(schema.fields))
    if unknown:
        raise ValueError(f"fields {unknown} are not in schema {schema.name!r}")
    missing = [name for name in schema.required if name not in fields]
    if missing:
        raise ValueError(f"schema {schema.name!r} requires fields {missing}")
    blocks = [
        f"<{name}>\n{str(fields[name]).strip()}\n</{name}>"
        for name in schema.fields
        if name in fields
    ]
    return "\n".join(blocks)


_FIELD_HELP = {
    "reasoning": "your step-by-step working",
    "answer": "only the final numeric answer, without units",
    "critique": "a short check of the answer: verify it against the question",
    "confidence": "a number between 0 and 1: how likely the answer is correct",
}


def system_prompt(schema: XMLSchema | str = BASE_SCHEMA) -> str:
    """The instruction that tells the model the exact output format.

    The skeleton is generated from the schema so that prompt and parser cannot drift.
    """
    schema = get_schema(schema)
    skeleton = "\n".join(f"<{name}>\n...\n</{name}>" for name in schema.fields)
    explained = "\n".join(
        f"- <{name}>: {_FIELD_HELP.get(name, 'the ' + name)}" for name in schema.fields
    )
    return (
        "You solve math word problems. Think step by step, then give the final answer.\n"
        "Respond in exactly this format, with nothing before or after it:\n"
        f"{skeleton}\n"
        "Where:\n"
        f"{explained}\n"
        "Use each tag exactly once, in this order, and put no other tags inside them."
    )


def stop_strings(schema: XMLSchema | str = BASE_SCHEMA) -> list[str]:
    """Strings at which generation may stop: the closing tag of the last field."""
    schema = get_schema(schema)
    return [f"</{schema.fields[-1]}>"]


# ----------------------------------------------------------------- SFT warm-up targets
#
# The warm-up teaches the format by imitation, so under the deepsynapse schema it must
# show a critique and a confidence too: a policy that never saw them has nothing for the
# calibration and critique rewards to shape. Targets are gold solutions, so the critique
# is a check that is TRUE for the gold (it recomputes the computation of the worked
# solution that yields the answer and, for one operation, runs it backwards) and ends on
# a verdict of "correct"; the confidence is high but falls with the number of steps (see
# `target_confidence`). No deliberately wrong solutions are mixed in: imitating them
# would teach the policy to answer wrongly; low confidence on wrong answers is left to
# the calibration reward of the RL phase.

_NUMBER = r"\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_EQUATION_RE = re.compile(
    rf"(?<![\w.,$])({_NUMBER}(?:\s*(?:[-+*/\u00d7\u00f7]|x)\s*{_NUMBER})+)\s*=\s*({_NUMBER})"
)
_OPERAND_RE = re.compile(rf"{_NUMBER}|[-+*/\u00d7\u00f7x]")
_OPS = {"x": "*", "\u00d7": "*", "\u00f7": "/"}


def _fraction(token: str) -> Fraction:
    return Fraction(token.replace("$", "").replace(",", ""))


def _show(value: Fraction) -> str | None:
    """A value as a plain decimal ("18", "0.2", "-3"), or None if it does not terminate."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return None
    text = f"{value.numerator / value.denominator:.12f}".rstrip("0")
    return text if Fraction(text) == value else None


def _evaluate(numbers: list[Fraction], ops: list[str]) -> Fraction | None:
    """``numbers[0] ops[0] numbers[1] ...`` with * and / before + and -; None on x / 0."""
    terms, signs = [numbers[0]], []
    for op, number in zip(ops, numbers[1:], strict=True):
        if op == "*":
            terms[-1] *= number
        elif op == "/":
            if number == 0:
                return None
            terms[-1] /= number
        else:
            signs.append(op)
            terms.append(number)
    total = terms[0]
    for op, term in zip(signs, terms[1:], strict=True):
        total = total + term if op == "+" else total - term
    return total


def _checked_equations(solution: str) -> list[tuple[str, Fraction, str | None]]:
    """Every arithmetically true ``a op b ... = r`` of a worked solution, in order.

    Each as (the expression rewritten with plain numbers and * /, its value, the inverse
    check for a single operation such as "18 / 2 = 9", or None). Equations that do not
    hold as written (GSM8K has a few, and text around numbers can fool the pattern) are
    left out, so a critique built from them claims nothing false.
    """
    found = []
    for match in _EQUATION_RE.finditer(solution):
        tokens = _OPERAND_RE.findall(match.group(1))
        numbers = [_fraction(t) for t in tokens[0::2]]
        ops = [_OPS.get(t, t) for t in tokens[1::2]]
        value = _evaluate(numbers, ops)
        if value is None or value != _fraction(match.group(2)) or value < 0:
            continue
        shown = [_show(n) for n in numbers]
        if any(s is None for s in shown):
            continue
        expression = " ".join(
            part for pair in zip(shown, [*ops, ""], strict=True) for part in pair if part
        )
        inverse = None
        if len(ops) == 1:
            a, b = numbers
            back = {"+": ("-", value - b), "-": ("+", value + b), "*": ("/", a), "/": ("*", a)}
            op, result = back[ops[0]]
            if not (ops[0] == "*" and b == 0) and result == a:
                inverse = f"{_show(value)} {op} {shown[1]} = {shown[0]}"
        found.append((expression, value, inverse))
    return found


_RECOMPUTE = (
    "Check: {expr} = {value}, and {inverse}. The answer {answer} is correct.",
    "Recomputing: {expr} = {value}. Working backwards, {inverse}. The answer {answer} "
    "matches, so it is correct.",
    "I redo the calculation of the answer: {expr} = {value}. Reversing it, {inverse}. The "
    "answer {answer} is correct.",
)
_RECOMPUTE_ONLY = (
    "Check: {expr} = {value}, which matches the answer {answer}. The answer is correct.",
    "Recomputing the answer: {expr} = {value}. The answer {answer} is correct.",
)
_RESTATE = (
    "The last step of the working gives {answer}, the quantity the question asks for. The "
    "answer {answer} is correct.",
)
_LEADS_TO = (
    "The working above leads to {answer}, the quantity the question asks for. The answer "
    "{answer} is correct.",
)


def verification_critique(problem: Problem, rng: random.Random | None = None) -> str:
    """A short critique of a GOLD solution that is true and concludes "correct".

    It recomputes the last computation of ``problem.solution`` whose result is the answer
    (and, for a single operation, checks it backwards: "18 / 2 = 9"), written from the
    problem's own numbers; only equations that hold as written are used. Without one it
    restates where the answer comes from. ``rng`` picks among equivalent phrasings (the
    first when None).

    >>> from deepsynapse.data.problems import Problem
    >>> p = Problem("p", "q", "18", "She sells 16 - 7 = 9 eggs.\\nShe makes 9 * 2 = $18.", 2, "x")
    >>> verification_critique(p)
    'Check: 9 * 2 = 18, and 18 / 2 = 9. The answer 18 is correct.'
    """
    answer = str(problem.answer).strip()

    def pick(templates: tuple[str, ...]) -> str:
        return templates[rng.randrange(len(templates))] if rng is not None else templates[0]

    for expression, value, inverse in reversed(_checked_equations(problem.solution)):
        if answers_match(_show(value), answer):
            templates = _RECOMPUTE if inverse else _RECOMPUTE_ONLY
            return pick(templates).format(
                expr=expression, value=_show(value), inverse=inverse, answer=answer
            )
    lines = [line for line in problem.solution.splitlines() if line.strip()]
    gives = bool(lines) and answers_match(normalize_answer(lines[-1]), answer)
    return pick(_RESTATE if gives else _LEADS_TO).format(answer=answer)


def target_confidence(problem: Problem) -> float:
    """The confidence an SFT target states: 0.95 for one step, 0.05 less per extra step,
    never below 0.5.

    The target is gold, so any high value is honest for it; falling with the number of
    steps (``problem.difficulty``) shows the policy that confidence is a judgement that
    varies, not a constant tag, and matches how a small model's accuracy falls on longer
    problems. The calibration reward refines it during RL.
    """
    steps = max(1, int(problem.difficulty))
    return round(min(0.95, max(0.5, 0.95 - 0.05 * (steps - 1))), 2)


def sft_target(
    problem: Problem,
    schema: XMLSchema | str = BASE_SCHEMA,
    rng: random.Random | None = None,
    *,
    eos: str = "",
) -> str:
    """The supervised warm-up target for ``problem`` in ``schema``, followed by ``eos``.

    Reasoning and answer are the gold solution. Under a schema with ``critique`` and
    ``confidence`` fields (deepsynapse), the target also carries `verification_critique`
    (a true check of the gold's last computation) and `target_confidence`. Under any other
    schema it is exactly ``format_completion({"reasoning": p.solution, "answer":
    p.answer}, schema) + eos`` (what the trainer built before), and ``rng`` is not used.
    """
    schema = get_schema(schema)
    fields = {"reasoning": problem.solution, "answer": problem.answer}
    if "critique" in schema.fields:
        fields["critique"] = verification_critique(problem, rng)
    if "confidence" in schema.fields:
        fields["confidence"] = f"{target_confidence(problem):g}"
    return format_completion(fields, schema) + eos
