"""XML Structural Guardian: graded structure, error counts, length penalties."""

from __future__ import annotations

import math

import pytest

from deepsynapse.formats import DEEPSYNAPSE_SCHEMA, parse_completion
from deepsynapse.rewards.structure import (
    STRUCTURE_CHECKS,
    error_counts,
    make_length_penalty,
    over_budget,
    structure_checks,
    structure_reward,
)

RIGHT = "<reasoning>\n48 / 2 = 24, 48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>"
WRONG = "<reasoning>\n48 + 2 = 50\n</reasoning>\n<answer>\n50\n</answer>"
MALFORMED = "Sure! <answer>72</answer>\n<reasoning>48 / 2 = 24</reasoning>"
TRUNCATED = "<reasoning>\n48 / 2 = 24, and then 48 + 24 ="
NESTED = "<reasoning>a <answer>3</answer> b</reasoning>\n<answer>72</answer>"
NOT_NUMERIC = "<reasoning>r</reasoning>\n<answer>seventy-two</answer>"
DUPLICATE = "<reasoning>r</reasoning>\n<answer>72</answer>\n<answer>73</answer>"


def test_weights_sum_to_one() -> None:
    assert math.isclose(sum(STRUCTURE_CHECKS.values()), 1.0)


def test_hand_written_cases() -> None:
    texts = [RIGHT, WRONG, MALFORMED, TRUNCATED, NESTED, NOT_NUMERIC, DUPLICATE, "", "72"]
    scores = structure_reward(["q"] * len(texts), texts)
    expected = [
        1.0,  # right: valid
        1.0,  # wrong answer, perfect structure: structure is not correctness
        0.8,  # text outside (0.1) and out of order (0.1)
        0.5,  # half the required fields (0.2), unclosed (0), no answer to parse (0)
        0.85,  # a tag nested in <reasoning>: not well formed
        0.85,  # the answer is not a number
        0.9,  # <answer> twice
        0.0,  # nothing
        0.0,  # a bare number has no structure at all
    ]
    assert scores == pytest.approx(expected)


def test_score_is_one_exactly_when_valid() -> None:
    texts = [RIGHT, WRONG, MALFORMED, TRUNCATED, NESTED, NOT_NUMERIC, DUPLICATE, "x", "<x>1</x>"]
    for text in texts:
        parsed = parse_completion(text)
        (score,) = structure_reward(["q"], [text], parsed=[parsed])
        assert (score == 1.0) == parsed.valid, text
        assert 0.0 <= score <= 1.0


def test_deepsynapse_schema_confidence_must_parse() -> None:
    ok = RIGHT + "\n<critique>\nchecks out\n</critique>\n<confidence>\n0.8\n</confidence>"
    bad = ok.replace("0.8", "1.7")
    scores = structure_reward(["q", "q"], [ok, bad], schema=DEEPSYNAPSE_SCHEMA)
    assert scores == pytest.approx([1.0, 0.85])
    checks = structure_checks(parse_completion(bad, DEEPSYNAPSE_SCHEMA), DEEPSYNAPSE_SCHEMA)
    assert checks["answer_parses"] == 0.0 and checks["present"] == 1.0


def test_deepsynapse_schema_requires_its_claims() -> None:
    """Under deepsynapse, critique and confidence are required: leaving them out costs."""
    claims = "\n<critique>\nchecks out\n</critique>\n<confidence>\n0.8\n</confidence>"
    texts = [RIGHT + claims, RIGHT, RIGHT + "\n<confidence>\n0.8\n</confidence>"]
    scores = structure_reward(["q"] * 3, texts, schema=DEEPSYNAPSE_SCHEMA)
    assert scores == pytest.approx([1.0, 0.8, 0.9])  # present: 4/4, 2/4, 3/4 of 0.4
    counts = error_counts([parse_completion(t, DEEPSYNAPSE_SCHEMA) for t in texts], "deepsynapse")
    assert counts["missing:critique"] == 2 and counts["missing:confidence"] == 1
    assert counts["empty:confidence"] == 0
    assert structure_reward(["q"], [RIGHT]) == [1.0]  # the base schema is unchanged


def test_error_counts() -> None:
    parsed = [parse_completion(t) for t in (RIGHT, MALFORMED, TRUNCATED, NOT_NUMERIC, "junk")]
    counts = error_counts(parsed)
    assert counts == {
        "answer_not_numeric": 1,
        "missing:answer": 2,
        "missing:reasoning": 1,
        "order": 1,
        "text_outside": 2,
        "unclosed:reasoning": 1,
    }
    full = error_counts(parsed, schema="base")
    assert full["nested_tag"] == 0 and full["duplicate:answer"] == 0
    assert {k: v for k, v in full.items() if v} == counts


def test_length_none_and_linear() -> None:
    words = ["w " * n for n in (0, 10, 15, 20, 40)]
    assert make_length_penalty("none", 10)(["q"] * 5, words) == [0.0] * 5
    linear = make_length_penalty("linear", budget=10)
    assert linear(["q"] * 5, words) == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert linear.name == "length_penalty"


def test_length_cosine_shape() -> None:
    cosine = make_length_penalty("cosine", budget=100)
    lengths = [0, 25, 50, 75, 100, 200]
    scores = cosine(["q"] * 6, ["x"] * 6, completion_lengths=lengths)
    assert scores == pytest.approx([0.0, -0.1464466, -0.5, -0.8535534, -1.0, -1.0])
    assert scores == sorted(scores, reverse=True)  # longer never scores better


def test_length_truncation_dler() -> None:
    cut = make_length_penalty("truncation", budget=5)
    texts = ["a b c", "a b c d e f", "a"]
    truncated = [False, False, True]
    assert cut(["q"] * 3, texts, truncated=truncated) == [0.0, -1.0, -1.0]
    assert over_budget(texts, 5, truncated=truncated) == [False, True, True]


def test_budget_column_and_token_lengths() -> None:
    linear = make_length_penalty("linear", budget=10)
    texts = ["one two three"] * 3
    # Token lengths win over words; the per-call budget wins over the factory default.
    assert linear(["q"] * 3, texts, completion_lengths=[10, 15, 20]) == [0.0, -0.5, -1.0]
    assert linear(["q"] * 3, texts, completion_lengths=[10, 15, 20], length_budget=20) == [
        0.0,
        0.0,
        0.0,
    ]
    per_row = linear(["q"] * 3, texts, completion_lengths=[10, 15, 20], length_budget=[5, None, 20])
    assert per_row == [-1.0, -0.5, 0.0]
    with pytest.raises(ValueError, match="completion_lengths"):
        linear(["q"] * 3, texts, completion_lengths=[1])


def test_bad_factory_arguments() -> None:
    with pytest.raises(ValueError, match="valid: none, linear, cosine, truncation"):
        make_length_penalty("quadratic", 10)
    with pytest.raises(ValueError, match="positive"):
        make_length_penalty("linear", 0)
