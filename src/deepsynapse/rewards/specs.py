"""The declarative language of discovered reward terms: records, predicates, specs.

A reward term is a JSON spec ``{"name", "predicate", "weight", "description"?}``. Its
predicate names one entry of the fixed table ``PREDICATES`` (plain Python functions over a
:class:`RolloutRecord`) plus that entry's parameters, or combines predicates with
``all_of`` / ``any_of`` / ``not``. :func:`validate_spec` checks a spec against this schema
by hand (types, ranges, no extra keys, bounded nesting) and names the offending field;
:func:`evaluate_predicate` interprets a validated predicate through the table. Nothing in a
spec is ever executed as code: strings are compared, numbers are compared or multiplied.
"""

from __future__ import annotations

import copy
import math
import re
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from deepsynapse.data.answers import answers_match, normalize_answer
from deepsynapse.memory.episodic import EpisodicMemory
from deepsynapse.rewards.base import _parsed

__all__ = [
    "FEATURE_BINS",
    "MAX_DEPTH",
    "PREDICATES",
    "RolloutRecord",
    "SpecError",
    "TermSpec",
    "evaluate_predicate",
    "record_features",
    "records_from_columns",
    "validate_spec",
]

_TEXT_LIMIT = 100_000  # characters of a completion any predicate looks at


# ------------------------------------------------------------------ rollout records


@dataclass(frozen=True)
class RolloutRecord:
    """What the miner and the terms know about one completion (JSON-able)."""

    id: str
    problem_id: str
    step: int
    completion: str
    answer: str | None  # the raw <answer> field
    reasoning: str | None
    errors: tuple[str, ...]
    correct: bool
    gold: str
    question: str
    distractors: tuple[str, ...] = ()  # normalised distractor answers, if the data has them
    previous_wrong: tuple[str, ...] = ()  # wrong answers remembered from earlier steps
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for checkpoints and event evidence."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutRecord:
        """Inverse of :meth:`to_dict`."""
        tuples = ("errors", "distractors", "previous_wrong")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


def _distractor_values(raw: Any) -> tuple[str, ...]:
    """Normalised distractor answers from whatever shape the data gives.

    Accepts a string, a number, a list of those (``attach_distractors`` stores a list of
    values), objects with a ``.value`` or mappings with a ``value`` / ``answer`` key (typed
    distractors), or a mapping kind -> value.
    """
    if raw is None:
        return ()
    if isinstance(raw, (str, int, float)):
        items: list[Any] = [raw]
    elif isinstance(raw, Mapping):
        items = [raw] if ("value" in raw or "answer" in raw) else list(raw.values())
    else:
        items = list(raw)
    out = []
    for item in items:
        if isinstance(item, Mapping):
            item = item.get("value", item.get("answer"))
        elif hasattr(item, "value"):  # a Distractor object
            item = item.value
        value = normalize_answer(str(item)) if item is not None else None
        if value is not None and value not in out:
            out.append(value)
    return tuple(out)


def records_from_columns(
    completions: Sequence[str],
    columns: Mapping[str, Any],
    step: int,
    memory: EpisodicMemory | None = None,
) -> list[RolloutRecord]:
    """One record per completion from the trainer's reward columns.

    Reads ``answer`` (gold), ``question``, ``problem`` (for ``id`` and
    ``columns["distractors"]``), ``parsed`` (or ``schema`` to parse), ``truncated`` and an
    optional ``distractors`` column. ``previous_wrong`` comes from ``memory``, counting only
    attempts from steps before ``step``, so it does not matter whether the memory already
    recorded this batch.
    """
    n = len(completions)
    parsed = _parsed(completions, dict(columns))
    gold = list(columns.get("answer") or [""] * n)
    questions = list(columns.get("question") or [""] * n)
    problems = list(columns.get("problem") or [None] * n)
    truncated = list(columns.get("truncated") or [False] * n)
    distractors = columns.get("distractors")
    records = []
    for i in range(n):
        p, prob = parsed[i], problems[i]
        pid = str(prob.id) if prob is not None else f"row{i}"
        raw = distractors[i] if distractors is not None else None
        if raw is None and prob is not None:
            raw = prob.columns.get("distractors")
        answer = p.fields.get("answer")
        prev = memory.previous_wrong_answers(pid, before_step=step) if memory else []
        records.append(
            RolloutRecord(
                id=f"{step}:{i}",
                problem_id=pid,
                step=int(step),
                completion=str(completions[i])[:_TEXT_LIMIT],
                answer=answer,
                reasoning=p.fields.get("reasoning"),
                errors=tuple(p.errors),
                correct=answer is not None and answers_match(answer, str(gold[i])),
                gold=str(gold[i]),
                question=str(questions[i]),
                distractors=_distractor_values(raw),
                previous_wrong=tuple(prev),
                truncated=bool(truncated[i]),
            )
        )
    return records


# ------------------------------------------------------------------ features (for clustering)

# Bin edges per feature: bucket j is edges[j] <= x < edges[j+1].
FEATURE_BINS: dict[str, tuple[float, ...]] = {
    "words": (0.0, 20.0, 60.0, 150.0, 400.0, 1e9),
    "digit_ratio": (0.0, 0.02, 0.1, 0.3, 1.01),
    "tag_errors": (0.0, 0.5, 2.5, 100.0),
    "log_rel_error": (0.0, 0.05, 0.3, 1.0, 3.0, 6.5, 7.5),
}
_NO_NUMBER = 7.0  # log_rel_error of an answer (or gold) with no number


def record_features(r: RolloutRecord) -> dict[str, float]:
    """The clustering features of a record: words, digit ratio, tag errors, log rel error.

    ``log_rel_error`` is ``log10(1 + |pred - gold| / max(|gold|, 1))`` capped at 6, and 7
    when either side has no number.
    """
    text = r.completion
    digits = sum(ch.isdigit() for ch in text)
    pred, gold = normalize_answer(r.answer), normalize_answer(r.gold)
    if pred is None or gold is None:
        rel = _NO_NUMBER
    else:
        p, g = float(pred), float(gold)
        rel = min(6.0, math.log10(1.0 + abs(p - g) / max(abs(g), 1.0)))
    return {
        "words": float(len(text.split())),
        "digit_ratio": digits / len(text) if text else 0.0,
        "tag_errors": float(len(r.errors)),
        "log_rel_error": rel,
    }


# ------------------------------------------------------------------ predicates (the fixed table)

_NUM_RE = re.compile(r"\d[\d,]*(?:\.\d+)?")
_WORD_RE = re.compile(r"[A-Za-z]{2,}")


def _pred_number(r: RolloutRecord) -> str | None:
    return normalize_answer(r.answer)


def p_format_error(r: RolloutRecord, category: str) -> bool:
    """A parser error of this category ("missing", "unclosed:answer", "order", ...)."""
    return any(e == category or e.startswith(category + ":") for e in r.errors)


def p_answer_not_numeric(r: RolloutRecord) -> bool:
    """An answer field is present but holds no number."""
    return r.answer is not None and _pred_number(r) is None


def p_distractor_chosen(r: RolloutRecord) -> bool:
    """The answer equals one of the problem's distractors (always a wrong answer)."""
    pred = _pred_number(r)
    return pred is not None and any(answers_match(pred, d) for d in r.distractors)


def p_unit_mismatch(r: RolloutRecord, factors: Sequence[float], words: bool) -> bool:
    """A wrong answer off from the gold by a unit factor (x or / each factor), or, with
    ``words``, a wrong answer field carrying words (units) while the gold is a bare number."""
    if r.correct or r.answer is None:
        return False
    gold, pred = normalize_answer(r.gold), _pred_number(r)
    if gold is None:
        return False
    if words and _WORD_RE.search(r.answer[:200]):
        return True
    if pred is None:
        return False
    g, p = float(gold), float(pred)
    return any(
        g != 0 and (math.isclose(p, g * f, rel_tol=1e-6) or math.isclose(p, g / f, rel_tol=1e-6))
        for f in factors
    )


def p_repetition(r: RolloutRecord, n: int, min_repeats: int) -> bool:
    """Some word n-gram occurs at least ``min_repeats`` times: a generation loop."""
    words = r.completion.split()[:4000]
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= min_repeats:
            return True
    return False


def p_copied_from_question(r: RolloutRecord) -> bool:
    """A wrong answer that is one of the numbers of the question (copied, not computed)."""
    pred = _pred_number(r)
    if r.correct or pred is None:
        return False
    return any(normalize_answer(m) == pred for m in _NUM_RE.findall(r.question[:_TEXT_LIMIT]))


def p_overlong_reasoning(r: RolloutRecord, max_words: int) -> bool:
    """Reasoning (the whole completion if it has none) over ``max_words`` words, or cut
    off at the token budget."""
    text = r.reasoning if r.reasoning is not None else r.completion
    return r.truncated or len(text.split()) > max_words


def p_repeated_mistake(r: RolloutRecord) -> bool:
    """A wrong answer already given on this problem at an earlier step (episodic memory)."""
    pred = _pred_number(r)
    return not r.correct and pred is not None and pred in r.previous_wrong


def p_feature_box(r: RolloutRecord, bounds: Mapping[str, Sequence[float]]) -> bool:
    """A wrong answer whose features all lie in ``lo <= x < hi`` (a discovered cluster)."""
    if r.correct:
        return False
    f = record_features(r)
    return all(lo <= f[k] < hi for k, (lo, hi) in bounds.items())


# Parameter kinds, checked by _check_param: ("int", lo, hi), ("bool",), ("category",),
# ("factors",), ("bounds",), ("predicate",), ("predicates",).
_P = dict[str, tuple[Any, ...]]


def _combinator(r: RolloutRecord) -> bool:
    """all_of / any_of / not are interpreted by :func:`evaluate_predicate` itself."""
    raise AssertionError("combinators are never called directly")


@dataclass(frozen=True)
class _PredicateType:
    fn: Callable[..., bool]
    params: _P = field(default_factory=dict)  # name -> kind
    defaults: dict[str, Any] = field(default_factory=dict)  # params absent from here: required


PREDICATES: dict[str, _PredicateType] = {
    "format_error": _PredicateType(p_format_error, {"category": ("category",)}),
    "answer_not_numeric": _PredicateType(p_answer_not_numeric),
    "distractor_chosen": _PredicateType(p_distractor_chosen),
    "unit_mismatch": _PredicateType(
        p_unit_mismatch,
        {"factors": ("factors",), "words": ("bool",)},
        {"factors": [60, 100, 1000, 12], "words": True},
    ),
    "repetition": _PredicateType(
        p_repetition,
        {"n": ("int", 1, 16), "min_repeats": ("int", 2, 1000)},
        {"n": 6, "min_repeats": 3},
    ),
    "copied_from_question": _PredicateType(p_copied_from_question),
    "overlong_reasoning": _PredicateType(
        p_overlong_reasoning, {"max_words": ("int", 1, 100_000)}, {"max_words": 300}
    ),
    "repeated_mistake": _PredicateType(p_repeated_mistake),
    "feature_box": _PredicateType(p_feature_box, {"bounds": ("bounds",)}),
    "all_of": _PredicateType(_combinator, {"predicates": ("predicates",)}),
    "any_of": _PredicateType(_combinator, {"predicates": ("predicates",)}),
    "not": _PredicateType(_combinator, {"predicate": ("predicate",)}),
}


def evaluate_predicate(predicate: Mapping[str, Any], r: RolloutRecord) -> bool:
    """Interpret a *validated* predicate on a record, through the ``PREDICATES`` table."""
    kind = predicate["type"]
    if kind == "all_of":
        return all(evaluate_predicate(p, r) for p in predicate["predicates"])
    if kind == "any_of":
        return any(evaluate_predicate(p, r) for p in predicate["predicates"])
    if kind == "not":
        return not evaluate_predicate(predicate["predicate"], r)
    params = {k: v for k, v in predicate.items() if k != "type"}
    return PREDICATES[kind].fn(r, **params)


# ------------------------------------------------------------------ spec validation

MAX_DEPTH = 4  # nesting levels of predicates (a plain predicate is level 1)
MAX_CHILDREN = 8
MAX_NODES = 32
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")
_CATEGORY_RE = re.compile(
    r"(?:missing|duplicate|unclosed|empty|unknown_tag)(?::[A-Za-z_][A-Za-z0-9_]{0,31})?"
    r"|order|text_outside|nested_tag|answer_not_numeric|confidence_not_in_0_1"
)
_SPEC_KEYS = {"name": True, "predicate": True, "weight": True, "description": False}
MIN_WEIGHT = -10.0


class SpecError(ValueError):
    """A reward spec that does not fit the schema; the message names the field."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"reward spec: field '{path}': {message}")


@dataclass(frozen=True)
class TermSpec:
    """A validated spec: its predicate is canonical (defaults filled, plain JSON types)."""

    name: str
    predicate: dict[str, Any]
    weight: float
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for checkpoints and event evidence."""
        out = {"name": self.name, "predicate": self.predicate, "weight": self.weight}
        if self.description:
            out["description"] = self.description
        return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _type_name(x: Any) -> str:
    return type(x).__name__


def _short(x: Any) -> str:
    """A bounded repr for error messages (a spec may be huge)."""
    return reprlib.repr(x)[:60]


def _check_param(path: str, kind: tuple[Any, ...], value: Any, depth: int, nodes: list[int]) -> Any:
    """Validate one predicate parameter and return its canonical form."""
    tag = kind[0]
    if tag == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise SpecError(path, f"must be an integer, got {_type_name(value)}")
        if not kind[1] <= value <= kind[2]:
            raise SpecError(path, f"must be in [{kind[1]}, {kind[2]}], got {value}")
        return value
    if tag == "bool":
        if not isinstance(value, bool):
            raise SpecError(path, f"must be true or false, got {_type_name(value)}")
        return value
    if tag == "category":
        if not isinstance(value, str) or not _CATEGORY_RE.fullmatch(value):
            raise SpecError(
                path,
                f"must be a parser error category such as 'missing:answer', got {_short(value)}",
            )
        return value
    if tag == "factors":
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_CHILDREN:
            raise SpecError(path, f"must be a list of 1 to {MAX_CHILDREN} numbers")
        for i, f in enumerate(value):
            if not _is_number(f) or not 1 < f <= 1e6:
                raise SpecError(f"{path}[{i}]", f"must be a number in (1, 1e6], got {_short(f)}")
        return [float(f) for f in value]
    if tag == "bounds":
        if not isinstance(value, dict) or not 1 <= len(value) <= len(FEATURE_BINS):
            raise SpecError(path, f"must map 1 to {len(FEATURE_BINS)} features to [lo, hi]")
        out = {}
        for k, pair in value.items():
            if k not in FEATURE_BINS:
                raise SpecError(
                    f"{path}.{k!s:.40}", f"unknown feature; valid: {sorted(FEATURE_BINS)}"
                )
            ok = isinstance(pair, list) and len(pair) == 2 and all(map(_is_number, pair))
            if not ok or pair[0] > pair[1]:
                raise SpecError(f"{path}.{k}", "must be [lo, hi], two finite numbers, lo <= hi")
            out[k] = [float(pair[0]), float(pair[1])]
        return out
    if tag == "predicate":
        return _check_predicate(path, value, depth + 1, nodes)
    if tag == "predicates":
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_CHILDREN:
            raise SpecError(path, f"must be a list of 1 to {MAX_CHILDREN} predicates")
        return [_check_predicate(f"{path}[{i}]", p, depth + 1, nodes) for i, p in enumerate(value)]
    raise AssertionError(f"unknown parameter kind {tag}")  # pragma: no cover


def _check_predicate(path: str, pred: Any, depth: int, nodes: list[int]) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise SpecError(path, f"predicates nest deeper than {MAX_DEPTH} levels")
    nodes[0] += 1
    if nodes[0] > MAX_NODES:
        raise SpecError(path, f"more than {MAX_NODES} predicates in one spec")
    if not isinstance(pred, dict):
        raise SpecError(path, f"must be an object with a 'type', got {_type_name(pred)}")
    kind = pred.get("type")
    if not isinstance(kind, str) or kind not in PREDICATES:
        raise SpecError(
            f"{path}.type", f"unknown predicate type {_short(kind)}; valid: {sorted(PREDICATES)}"
        )
    ptype = PREDICATES[kind]
    extra = sorted(str(k)[:40] for k in pred if k != "type" and k not in ptype.params)
    if extra:
        raise SpecError(
            f"{path}.{extra[0]}", f"not a parameter of '{kind}' (valid: {sorted(ptype.params)})"
        )
    out: dict[str, Any] = {"type": kind}
    for name, param_kind in ptype.params.items():
        if name in pred:
            out[name] = _check_param(f"{path}.{name}", param_kind, pred[name], depth, nodes)
        elif name in ptype.defaults:
            out[name] = copy.deepcopy(ptype.defaults[name])
        else:
            raise SpecError(f"{path}.{name}", f"required by '{kind}'")
    return out


def validate_spec(spec: Any) -> TermSpec:
    """Check a JSON spec against the schema; return it canonical or raise :class:`SpecError`.

    Schema: an object with exactly ``name`` (lowercase identifier, <= 48 chars),
    ``predicate`` (an object whose ``type`` is a key of ``PREDICATES`` plus that type's
    parameters, nested at most ``MAX_DEPTH`` levels), ``weight`` (a finite number in
    [-10, 0): a penalty) and optionally ``description`` (a string).

    >>> validate_spec({"name": "x", "predicate": {"type": "repetition"}, "weight": -0.5}).predicate
    {'type': 'repetition', 'n': 6, 'min_repeats': 3}
    >>> try:
    ...     validate_spec({"name": "x", "predicate": {"type": "shell"}, "weight": -1})
    ... except SpecError as e:
    ...     e.path
    'predicate.type'
    """
    if not isinstance(spec, dict):
        raise SpecError("<root>", f"must be an object, got {_type_name(spec)}")
    extra = sorted(str(k)[:40] for k in spec if k not in _SPEC_KEYS)
    if extra:
        raise SpecError(extra[0], f"unknown key (valid: {sorted(_SPEC_KEYS)})")
    for key, required in _SPEC_KEYS.items():
        if required and key not in spec:
            raise SpecError(key, "is required")
    name = spec["name"]
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise SpecError(
            "name", f"must be a lowercase identifier of at most 48 chars, got {_short(name)}"
        )
    weight = spec["weight"]
    if not _is_number(weight):
        raise SpecError("weight", f"must be a finite number, got {_type_name(weight)}")
    if not MIN_WEIGHT <= weight < 0:
        raise SpecError("weight", f"must be in [{MIN_WEIGHT}, 0) (a penalty), got {weight}")
    description = spec.get("description", "")
    if not isinstance(description, str) or len(description) > 500:
        raise SpecError("description", "must be a string of at most 500 characters")
    predicate = _check_predicate("predicate", spec["predicate"], 1, [0])
    return TermSpec(name, predicate, float(weight), description)
