"""SFT warm-up targets: under deepsynapse they teach a true critique and a confidence."""

from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from deepsynapse.data.answers import answers_match, normalize_answer
from deepsynapse.data.problems import DataError, Problem
from deepsynapse.data.synthetic import generate_problems
from deepsynapse.formats import (
    DEEPSYNAPSE_SCHEMA,
    format_completion,
    parse_completion,
    sft_target,
    target_confidence,
)
from deepsynapse.rewards.critique import (
    calibration_reward,
    critique_consistency_reward,
    critique_verdict,
)

EOS = "<|im_end|>"
_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?(?: [-+*/] -?\d+(?:\.\d+)?)+) = (-?\d+(?:\.\d+)?)")


def _synthetic() -> list[Problem]:
    return generate_problems(120, seed=7, difficulty=(1, 6))


def _gsm8k(limit: int = 300) -> list[Problem]:
    from deepsynapse.data.gsm8k import load_gsm8k

    try:
        problems, _ = load_gsm8k("gsm8k", "train", limit=limit)
    except DataError as exc:  # pragma: no cover - the shared copy is part of the project
        pytest.skip(f"GSM8K train split unavailable: {exc}")
    return problems


def _old_target(problem: Problem, schema) -> str:
    """What the trainer built before `sft_target` (rl/warmup.py, ``SFTWarmup.examples``)."""
    return format_completion({"reasoning": problem.solution, "answer": problem.answer}, schema)


def _evaluate(expression: str) -> Fraction:
    """``a op b op c`` with the usual precedence (the critique's own arithmetic)."""
    tokens = expression.split()
    terms: list[Fraction] = [Fraction(tokens[0])]
    ops: list[str] = []
    for op, number in zip(tokens[1::2], tokens[2::2], strict=True):
        if op in "*/":
            terms[-1] = terms[-1] * Fraction(number) if op == "*" else terms[-1] / Fraction(number)
        else:
            ops.append(op)
            terms.append(Fraction(number))
    total = terms[0]
    for op, term in zip(ops, terms[1:], strict=True):
        total = total + term if op == "+" else total - term
    return total


def _check_deepsynapse_target(problem: Problem, rng: random.Random) -> str:
    text = sft_target(problem, DEEPSYNAPSE_SCHEMA, rng)
    parsed = parse_completion(text, DEEPSYNAPSE_SCHEMA)
    assert parsed.valid, (problem.id, parsed.errors, text)
    assert set(parsed.fields) == set(DEEPSYNAPSE_SCHEMA.required)
    assert parsed.fields["reasoning"] == problem.solution.strip()
    assert answers_match(parsed.answer, problem.answer)
    assert parsed.confidence is not None and 0.0 <= parsed.confidence <= 1.0
    critique = parsed.fields["critique"]
    # The critique names the answer, ends on a verdict that the answer is right (true for
    # the gold), and every equation it writes is arithmetically true.
    numbers = {normalize_answer(n) for n in re.findall(r"-?\d+(?:\.\d+)?", critique)}
    assert normalize_answer(problem.answer) in numbers, critique
    assert critique_verdict(critique) is True, critique
    for expression, result in _EQUATION.findall(critique):
        assert _evaluate(expression) == Fraction(result), (expression, result, critique)
    return text


def test_deepsynapse_targets_on_synthetic_problems() -> None:
    rng = random.Random(0)
    texts = [_check_deepsynapse_target(p, rng) for p in _synthetic()]
    recomputed = sum(bool(_EQUATION.search(parse_completion(t, "deepsynapse").fields["critique"]))
                     for t in texts)  # fmt: skip
    assert recomputed == len(texts)  # the generator's last line is always a computation
    # The rewards the RL phase will apply: a gold target is consistent and well calibrated.
    gold = [p.answer for p in _synthetic()]
    columns = {"answer": gold, "schema": "deepsynapse"}
    assert set(critique_consistency_reward(["q"] * len(texts), texts, **columns)) == {1.0}
    assert all(s > -0.2 for s in calibration_reward(["q"] * len(texts), texts, **columns))


def test_deepsynapse_targets_on_gsm8k_rows() -> None:
    problems = _gsm8k()
    rng = random.Random(0)
    texts = [_check_deepsynapse_target(p, rng) for p in problems]
    recomputed = sum(bool(_EQUATION.search(parse_completion(t, "deepsynapse").fields["critique"]))
                     for t in texts)  # fmt: skip
    assert recomputed > 0.6 * len(texts)  # most last lines restate a checkable computation


def test_critique_recomputes_and_inverts_the_last_step() -> None:
    problem = Problem(
        "p", "q", "18", "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 x 2 = $18 every day.", 2,
        "gsm8k",
    )  # fmt: skip
    critique = parse_completion(sft_target(problem, "deepsynapse"), "deepsynapse").fields[
        "critique"
    ]
    assert "9 * 2 = 18" in critique and "18 / 2 = 9" in critique
    assert critique_verdict(critique) is True
    # Without any checkable equation, the critique still names the answer truthfully.
    plain = Problem("p", "q", "7", "There are seven days in a week.", 1, "gsm8k")
    critique = parse_completion(sft_target(plain, "deepsynapse"), "deepsynapse").fields["critique"]
    assert "7" in critique and critique_verdict(critique) is True
    assert "=" not in critique  # claims no computation it did not check
    # A wrong equation in the working is never restated as a check.
    odd = Problem("p", "q", "10", "So 3 + 4 = 10 in total.", 1, "gsm8k")
    critique = parse_completion(sft_target(odd, "deepsynapse"), "deepsynapse").fields["critique"]
    assert "3 + 4" not in critique


def test_targets_are_deterministic_given_the_rng() -> None:
    problems = _synthetic()[:20]
    first = [sft_target(p, "deepsynapse", random.Random(5), eos=EOS) for p in problems]
    again = [sft_target(p, "deepsynapse", random.Random(5), eos=EOS) for p in problems]
    assert first == again and all(t.endswith(EOS) for t in first)
    assert sft_target(problems[0], "deepsynapse") == sft_target(problems[0], "deepsynapse")


def test_confidence_is_high_for_gold_and_falls_with_length() -> None:
    values = [target_confidence(Problem("p", "q", "1", "x", d, "synthetic")) for d in range(1, 12)]
    assert all(0.5 <= v <= 0.95 for v in values)
    assert values == sorted(values, reverse=True) and values[0] > values[-1]


@pytest.mark.parametrize("schema", ["base", None])
def test_other_schemas_get_exactly_the_old_target(schema) -> None:
    """Plain runs stay bit-identical: same text, and the rng is not touched."""
    problems = _synthetic() + _gsm8k(50)
    rng = random.Random(3)
    state = rng.getstate()
    for p in problems:
        if schema is None:
            assert sft_target(p) == _old_target(p, "base")
        else:
            assert sft_target(p, schema, rng, eos=EOS) == _old_target(p, schema) + EOS
            assert sft_target(p, schema, rng) == _old_target(p, schema)
    assert rng.getstate() == state
