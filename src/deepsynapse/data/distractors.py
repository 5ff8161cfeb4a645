"""Triple distractor anchoring: three typed wrong answers for every problem.

A contrastive reward and the multiple-choice probes need wrong answers that a model could
plausibly give, not random numbers: otherwise telling the gold answer apart is trivial.
Each problem gets exactly three, one of each kind, in this order:

``numeric``
    An arithmetic mistake on the solution's last step, taken from its calculator
    annotation ``<<a*b=c>>`` (or, without annotations, from an ``a * b = c`` found in the
    worked solution). Methods: ``wrong_operation`` (the last operation swapped: + <-> -,
    * -> + or /, / -> * or -), ``off_by_step`` (the last operation applied once more) and
    ``operand_slip`` (the last operand off by one). Which is tried first rotates with a
    stable hash of the question, so the three occur about equally often.
``semantic``
    The answer to a different question: an intermediate quantity of the solution.
    ``penultimate_step`` (the result one step before the end), else ``earlier_step``
    (another intermediate, latest first).
``unit``
    A scale or unit error that the question's own words suggest (minutes/hours x60 or /60,
    percent or cents x100 or /100, dozens or inches x12, days/weeks x7, grams x1000 ...):
    method ``unit_x<f>`` or ``unit_div<f>``.

Fallback chain, when a kind cannot be built (no annotation, a one-step solution, no unit
word, or every candidate collides): semantic falls back to ``question_quantity`` (a number
stated in the question, answering with a given instead of the result), unit to
``decimal_shift`` (x10 or /10), and every kind finally to ``perturb`` (gold + small
offsets, always succeeds). Such distractors carry ``fallback=True``.

Every candidate must be distinct from the gold answer and from the distractors already
chosen (``answers_match``), have the gold answer's sign, not be zero (unless the gold is),
and be "clean" (at most two decimals, or as many as the gold has): a wrong answer like
``13.333333`` would be rejected by its look alone. Everything is deterministic: the
output depends only on the problem's text and columns.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

from deepsynapse.data.answers import answers_match, normalize_answer
from deepsynapse.data.problems import Problem

__all__ = [
    "KINDS",
    "Distractor",
    "attach_distractors",
    "calculations_from_solution",
    "distractor_stats",
    "evaluate_expression",
    "make_distractors",
]

KINDS = ("numeric", "semantic", "unit")
_MAX_ABS = Fraction(10**9)

# ----------------------------------------------------------------- safe arithmetic

_TOKEN_RE = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]*)?|\.[0-9]+)|([-+*/()x\u00d7\u00f7]))")
_OP_ALIASES = {"x": "*", "\u00d7": "*", "\u00f7": "/"}
_MAX_TOKENS = 64

# An expression tree: a Fraction leaf or (op, left, right).
Node = Fraction | tuple[str, "Node", "Node"]


def _tokenize(text: str) -> list[str] | None:
    tokens: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            return None
        tokens.append(m.group(1) or _OP_ALIASES.get(m.group(2), m.group(2)))
        pos = m.end()
        if len(tokens) > _MAX_TOKENS:
            return None
    return tokens


class _Parser:
    """Recursive descent over + - * / and parentheses: no ``eval`` ever touches the text."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expression(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = (op, node, self.term())
        return node

    def term(self) -> Node:
        node = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            node = (op, node, self.factor())
        return node

    def factor(self) -> Node:
        token = self.peek()
        if token is None:
            raise ValueError("unexpected end")
        if token == "(":
            self.take()
            node = self.expression()
            if self.peek() != ")":
                raise ValueError("unbalanced parenthesis")
            self.take()
            return node
        if token == "-":
            self.take()
            return ("-", Fraction(0), self.factor())
        if token[0].isdigit() or token[0] == ".":
            return Fraction(self.take())
        raise ValueError(f"unexpected {token!r}")


def _parse(text: str) -> Node | None:
    tokens = _tokenize(text)
    if not tokens:
        return None
    parser = _Parser(tokens)
    try:
        node = parser.expression()
    except (ValueError, IndexError, ZeroDivisionError):
        return None
    return node if parser.pos == len(tokens) else None


def _value(node: Node) -> Fraction | None:
    if isinstance(node, Fraction):
        return node
    op, left, right = node
    a, b = _value(left), _value(right)
    if a is None or b is None:
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


def evaluate_expression(text: str) -> Fraction | None:
    """Exact value of an arithmetic expression (+ - * / x, parentheses), or None.

    >>> evaluate_expression("100-50-30-15"), evaluate_expression("(3+4) x 2")
    (Fraction(5, 1), Fraction(14, 1))
    >>> evaluate_expression("2**8") is None, evaluate_expression("1/0") is None
    (True, True)
    """
    node = _parse(text)
    return None if node is None else _value(node)


_SOLUTION_CALC_RE = re.compile(
    r"(?<![\w.])([-+*/()x\u00d7\u00f7 .0-9$]*[0-9)][ ]*[-+*/x\u00d7\u00f7][-+*/()x\u00d7\u00f7 .0-9$]*)"
    r"=[ ]*\$?[ ]*([0-9]+(?:\.[0-9]+)?)"
)


def calculations_from_solution(solution: str) -> list[tuple[str, str]]:
    """``(expression, result)`` pairs written as ``a op b = c`` in a worked solution.

    Used when the calculator annotations are not kept (synthetic problems, GSM8K loaded
    without ``calculations=True``). A pair is kept only if the expression really evaluates
    to the result, so prose that happens to contain "=" is ignored.

    >>> calculations_from_solution("Natalia sold 48/2 = 24 clips.\\nSo 48 + 24 = $72 in all.")
    [('48/2', '24'), ('48 + 24', '72')]
    """
    found: list[tuple[str, str]] = []
    for line in solution.splitlines():
        if "=" not in line:
            continue
        for m in _SOLUTION_CALC_RE.finditer(line.replace(",", "")):
            expression = m.group(1).replace("$", "").strip()
            value = evaluate_expression(expression)
            if value is not None and value == Fraction(m.group(2)):
                found.append((expression, m.group(2)))
    return found


# ----------------------------------------------------------------- candidates


@dataclass(frozen=True, slots=True)
class Distractor:
    """One wrong answer: its value (a normalised number string), kind, how it was built."""

    value: str
    kind: str
    method: str
    fallback: bool


def _fraction(text: str | None) -> Fraction | None:
    norm = normalize_answer(text)
    if norm is None:
        return None
    try:
        return Fraction(norm)
    except (ValueError, ZeroDivisionError):
        return None


def _decimals(value: Fraction) -> int | None:
    """Number of decimals of a terminating fraction (at most 12); None otherwise."""
    den, places = value.denominator, 0
    while den != 1 and places <= 12:
        for factor in (10, 2, 5):
            if den % factor == 0:
                den //= factor
                break
        else:
            return None
        places += 1
    return places if den == 1 else None


def _format(value: Fraction) -> str:
    places = _decimals(value) or 0
    if places == 0:
        return str(value.numerator // value.denominator)
    scaled = abs(value) * 10**places
    digits = str(scaled.numerator // scaled.denominator).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")
    return "-" + text if value < 0 else text


class _Picker:
    """Collects values, rejecting those that are not plausible distinct wrong answers."""

    def __init__(self, gold: str, gold_value: Fraction | None) -> None:
        self.gold = gold
        self.gold_value = gold_value
        self.taken: list[str] = [gold]
        gold_places = _decimals(gold_value) if gold_value is not None else 0
        self.max_places = max(2, gold_places or 0)

    def accept(self, value: Fraction | None) -> str | None:
        if value is None or abs(value) > _MAX_ABS:
            return None
        gold = self.gold_value
        if gold is not None:
            if (value < 0) != (gold < 0) and value != 0:
                return None
            if value == 0 and gold != 0:
                return None
        places = _decimals(value)
        if places is None or places > self.max_places:
            return None
        text = _format(value)
        if any(answers_match(text, other) for other in self.taken):
            return None
        return text

    def take(self, text: str) -> None:
        self.taken.append(text)


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _calculations(problem: Problem) -> list[tuple[Node, Fraction]]:
    """Parsed steps of the solution: (expression tree, result), annotations preferred."""
    raw = problem.columns.get("calculations")
    if not raw:
        raw = calculations_from_solution(problem.solution)
    steps: list[tuple[Node, Fraction]] = []
    for item in raw:
        try:
            expression, result = item
        except (TypeError, ValueError):
            continue
        node = _parse(str(expression))
        value = _fraction(str(result))
        if node is not None and value is not None:
            steps.append((node, value))
    return steps


def _final_step(steps: list[tuple[Node, Fraction]], gold: Fraction | None) -> int | None:
    """Index of the step that produces the answer: the last whose result is the gold."""
    if not steps:
        return None
    if gold is not None:
        for i in range(len(steps) - 1, -1, -1):
            if steps[i][1] == gold:
                return i
    return len(steps) - 1


_SWAPS = {"+": ("-",), "-": ("+",), "*": ("+", "/"), "/": ("*", "-")}


def _wrong_operation(node: Node) -> Iterator[Fraction | None]:
    if isinstance(node, Fraction):
        return
    op, left, right = node
    for other in _SWAPS[op]:
        yield _value((other, left, right))


def _off_by_step(node: Node, result: Fraction) -> Iterator[Fraction | None]:
    if isinstance(node, Fraction):
        return
    op, _, right = node
    yield _value((op, result, right))


def _operand_slip(node: Node) -> Iterator[Fraction | None]:
    if isinstance(node, Fraction):
        return
    op, left, right = node
    operand = _value(right)
    if operand is None:
        return
    for delta in (1, -1):
        yield _value((op, left, operand + delta))


_NUMERIC_METHODS = ("wrong_operation", "off_by_step", "operand_slip")

# Unit words (case-insensitive, matched at the start of a word) -> the scale factors they
# suggest. Words that double as ordinary English ("second" place, "quarter", "football")
# are matched only in their unit form.
_UNITS: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"minutes?\b", (60,)),
    (r"hours?\b|hrs?\b|hourly", (60, 24)),
    (r"seconds\b", (60,)),
    (r"percent|%", (100,)),
    (r"cents?\b", (100,)),
    (r"dozens?\b", (12,)),
    (r"inch", (12,)),
    (r"(?:foot|feet)\b", (12, 3)),
    (r"yards?\b", (3,)),
    (r"weeks?\b|weekly", (7, 52)),
    (r"days?\b|daily", (7, 24)),
    (r"months?\b|monthly", (12,)),
    (r"years?\b|yearly|annual", (12, 52)),
    (r"centimet|cm\b", (100,)),
    (r"millimet|mm\b", (10, 1000)),
    (r"kilomet|km\b", (1000,)),
    (r"met(?:er|re)s?\b", (100, 1000)),
    (r"kilograms?\b|kg\b", (1000,)),
    (r"grams?\b", (1000,)),
    (r"pounds?\b|lbs?\b", (16,)),
    (r"ounces?\b|oz\b", (16,)),
    (r"millilit|ml\b", (1000,)),
    (r"lit(?:er|re)s?\b", (1000,)),
    (r"gallons?\b", (4,)),
    (r"quarts?\b", (4, 2)),
    (r"pints?\b", (2,)),
    (r"pairs?\b", (2,)),
    (r"\$|dollars?\b", (100,)),
)
_UNIT_RES = tuple(
    (re.compile(rf"(?<![a-z])(?:{pattern})", re.IGNORECASE), factors) for pattern, factors in _UNITS
)


def _unit_factors(question: str) -> list[int]:
    """Scale factors suggested by the question's units, most strongly suggested first.

    A factor named by several unit words (minutes and hours both say 60) ranks first;
    ties go to the unit mentioned earliest.
    """
    votes: Counter[int] = Counter()
    first: dict[int, int] = {}
    for regex, factors in _UNIT_RES:
        m = regex.search(question)
        if m is None:
            continue
        for factor in factors:
            votes[factor] += 1
            first[factor] = min(first.get(factor, m.start()), m.start())
    return sorted(votes, key=lambda f: (-votes[f], first[f], f))


def _scaled(gold: Fraction, factor: int, flip: bool) -> Iterator[tuple[str, Fraction]]:
    order = (("div", gold / factor), ("x", gold * factor))
    yield from (order[::-1] if flip else order)


_QUESTION_NUMBER_RE = re.compile(r"(?<![\w.])[0-9][0-9,]*(?:\.[0-9]+)?")


def _question_numbers(question: str) -> list[Fraction]:
    values = []
    for m in _QUESTION_NUMBER_RE.finditer(question):
        value = _fraction(m.group())
        if value is not None:
            values.append(value)
    return values


def _perturbations(gold: Fraction | None) -> Iterator[Fraction]:
    base = gold if gold is not None else Fraction(0)
    step = Fraction(1) if base.denominator == 1 else Fraction(1, base.denominator)
    for delta in (1, -1, 2, -2, 10, -10):
        yield base + delta * step
    yield base * 2
    k = 3
    while True:  # always terminates: only finitely many values are taken
        yield base + k * step
        k += 1


def make_distractors(problem: Problem) -> list[Distractor]:
    """Three distinct wrong answers for ``problem``: [numeric, semantic, unit].

    >>> from deepsynapse.data.problems import Problem
    >>> p = Problem("p", "Natalia sold clips to 48 friends in April, and half as many in May. "
    ...     "How many clips did she sell in April and May?", "72",
    ...     "Natalia sold 48/2 = 24 clips in May.\\nNatalia sold 48+24 = 72 clips.", 2, "gsm8k",
    ...     {"calculations": [("48/2", "24"), ("48+24", "72")]})
    >>> [(d.value, d.kind, d.method) for d in make_distractors(p)]
    [('96', 'numeric', 'off_by_step'), ('24', 'semantic', 'penultimate_step'), ('7.2', 'unit', 'decimal_shift')]
    """
    gold_text = normalize_answer(problem.answer) or str(problem.answer)
    gold = _fraction(gold_text)
    picker = _Picker(gold_text, gold)
    steps = _calculations(problem)
    final = _final_step(steps, gold)
    seed = _stable_hash(problem.question)

    def first(
        candidates: Iterable[tuple[str, Fraction | None]], kind: str, fallback: bool
    ) -> Distractor | None:
        for method, value in candidates:
            text = picker.accept(value)
            if text is not None:
                picker.take(text)
                return Distractor(text, kind, method, fallback)
        return None

    def perturb(kind: str) -> Distractor:
        found = first((("perturb", v) for v in _perturbations(gold)), kind, True)
        assert found is not None  # _perturbations is infinite
        return found

    # Semantic first: it has the fewest candidates, so it chooses before the others.
    intermediates = _intermediates(problem, steps, final, gold)
    semantic = (
        first([("penultimate_step", v) for v in intermediates[:1]], "semantic", False)
        or first([("earlier_step", v) for v in intermediates[1:]], "semantic", False)
        or first(
            [("question_quantity", v) for v in reversed(_question_numbers(problem.question))],
            "semantic",
            True,
        )
        or perturb("semantic")
    )

    unit_candidates: list[tuple[str, Fraction | None]] = []
    if gold is not None:
        for factor in _unit_factors(problem.question):
            for way, value in _scaled(gold, factor, bool(seed >> 8 & 1)):
                unit_candidates.append((f"unit_{way}{factor}", value))
    unit = first(unit_candidates, "unit", False) or (
        first(
            [("decimal_shift", v) for _, v in _scaled(gold, 10, bool(seed >> 8 & 1))],
            "unit",
            True,
        )
        if gold is not None
        else None
    )
    unit = unit or perturb("unit")

    numeric_candidates: list[tuple[str, Fraction | None]] = []
    if final is not None:
        node, result = steps[final]
        builders = {
            "wrong_operation": lambda: _wrong_operation(node),
            "off_by_step": lambda: _off_by_step(node, result),
            "operand_slip": lambda: _operand_slip(node),
        }
        rotation = seed % len(_NUMERIC_METHODS)
        for method in _NUMERIC_METHODS[rotation:] + _NUMERIC_METHODS[:rotation]:
            numeric_candidates.extend((method, v) for v in builders[method]())
    numeric = first(numeric_candidates, "numeric", False) or perturb("numeric")
    return [numeric, semantic, unit]


def _intermediates(
    problem: Problem,
    steps: list[tuple[Node, Fraction]],
    final: int | None,
    gold: Fraction | None,
) -> list[Fraction | None]:
    """Intermediate results, latest first (the step before the answer leads)."""
    given = problem.columns.get("intermediates")
    if given:
        values = [_fraction(str(v)) for v in given]
        if values and gold is not None and values[-1] == gold:
            values = values[:-1]
        return values[::-1]
    if final is None:
        return []
    return [value for _, value in steps[:final]][::-1] + [value for _, value in steps[final + 1 :]]


def attach_distractors(problems: Sequence[Problem]) -> list[Problem]:
    """Copies of ``problems`` whose columns carry their distractors.

    Columns added: ``distractors`` (the 3 values), ``distractor_kinds``,
    ``distractor_methods`` and ``distractor_fallbacks``, in the order numeric, semantic,
    unit. Problems are frozen, so new objects are returned.
    """
    out = []
    for problem in problems:
        found = make_distractors(problem)
        columns = {
            **problem.columns,
            "distractors": [d.value for d in found],
            "distractor_kinds": [d.kind for d in found],
            "distractor_methods": [d.method for d in found],
            "distractor_fallbacks": [d.fallback for d in found],
        }
        out.append(replace(problem, columns=columns))
    return out


def distractor_stats(problems: Sequence[Problem]) -> dict[str, float]:
    """Share of each method within its kind, and of fallbacks, over ``problems``.

    Keys: ``"<kind>/<method>"`` (share of that kind's distractors built by the method),
    ``"<kind>/fallback"`` and ``"fallback"`` (over all distractors), ``"problems"``.
    Uses the attached columns when present, else builds the distractors.
    """
    methods: Counter[tuple[str, str]] = Counter()
    fallbacks: Counter[str] = Counter()
    n = 0
    for problem in problems:
        cols = problem.columns
        if "distractor_methods" in cols and "distractor_fallbacks" in cols:
            found = [
                Distractor(v, k, m, f)
                for v, k, m, f in zip(
                    cols["distractors"],
                    cols["distractor_kinds"],
                    cols["distractor_methods"],
                    cols["distractor_fallbacks"],
                    strict=True,
                )
            ]
        else:
            found = make_distractors(problem)
        n += 1
        for d in found:
            methods[(d.kind, d.method)] += 1
            fallbacks[d.kind] += d.fallback
    stats: dict[str, float] = {"problems": float(n)}
    for (kind, method), count in sorted(methods.items()):
        stats[f"{kind}/{method}"] = count / max(n, 1)
    for kind in KINDS:
        stats[f"{kind}/fallback"] = fallbacks[kind] / max(n, 1)
    stats["fallback"] = sum(fallbacks.values()) / max(3 * n, 1)
    return stats
