"""Tests for numeric answer normalisation and matching."""

from __future__ import annotations

import random
import time

import pytest

from deepsynapse.data.answers import answers_match, gsm8k_gold_answer, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", "42"),
        ("1,000", "1000"),
        ("1,234,567", "1234567"),
        ("$1,234.50", "1234.5"),
        ("$18", "18"),
        ("€3.50", "3.5"),
        ("£12", "12"),
        ("18 dollars", "18"),
        ("The answer is 18 apples.", "18"),
        ("5.00", "5"),
        ("2.50", "2.5"),
        ("0.000", "0"),
        ("007", "7"),
        ("3/4", "0.75"),
        ("1 1/2", "1.5"),
        ("-1 1/2", "-1.5"),
        ("1/3", "0.333333"),
        ("2/3", "0.666667"),
        ("-1/3", "-0.333333"),
        ("1/1024", "0.0009765625"),
        ("48 / 2", "24"),
        ("50%", "50"),
        ("12.5 %", "12.5"),
        ("-3", "-3"),
        ("\u22123", "-3"),
        ("-0", "0"),
        ("+7", "7"),
        ("x = -3", "-3"),
        ("-$5", "-5"),
        ("$-5", "-5"),
        ("-.5", "-0.5"),
        (".5", "0.5"),
        ("\\boxed{42}", "42"),
        ("\\boxed{\\frac{1}{2}} and then 7", "0.5"),
        ("\\frac{3}{4}", "0.75"),
        ("\\dfrac{6}{4}", "1.5"),
        ("18 apples and 3 oranges, so 21", "21"),
        ("10-3", "3"),
        ("5 - 3", "3"),
        ("She has 7.", "7"),
        ("1.2.3", "3"),
        ("1,2,3", "3"),
        ("1,0000", "0"),
        ("5/0", "0"),
        ("2 5/3", "1.666667"),
        ("#### 72", "72"),
    ],
)
def test_normalize_answer_forms(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text", [None, "", "no digits", "\\boxed{x}", "$", "-", "...", "e"])
def test_normalize_answer_without_number(text: str | None) -> None:
    assert normalize_answer(text) is None


def test_normalize_answer_huge_number_is_exact() -> None:
    digits = "9" * 10_000  # beyond Python's default int-to-str digit limit
    assert normalize_answer(digits + ".500") == digits + ".5"


def test_normalize_answer_is_fast_and_total_on_garbage() -> None:
    rng = random.Random(0)
    alphabet = "0123456789 ,./-+$%\\{}boxedfrac\u2212\u20ac\x00<>ab\n"
    garbage = "".join(rng.choices(alphabet, k=1_000_000))
    start = time.perf_counter()
    normalize_answer(garbage)
    normalize_answer("1 " * 500_000)
    normalize_answer("\\boxed{" * 100_000)
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("18", "18"),
        ("$18.00", "18"),
        ("The answer is 1,000.", "1000"),
        ("0.333333", "1/3"),
        ("1/3", "0.3333333"),
        ("\\boxed{0.75}", "3/4"),
        ("1000000", "1000000.5"),  # within relative 1e-6
        ("0.0000000001", "0"),  # within absolute 1e-9
    ],
)
def test_answers_match(pred: str, gold: str) -> None:
    assert answers_match(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("18", "18.5"),
        ("18", "-18"),
        ("0.33", "1/3"),
        ("1000000", "1000002"),
        ("0.000001", "0"),
        (None, "18"),
        ("18", None),
        ("eighteen", "18"),
        (None, None),
    ],
)
def test_answers_mismatch(pred: str | None, gold: str | None) -> None:
    assert not answers_match(pred, gold)


def test_gsm8k_gold_answer() -> None:
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gsm8k_gold_answer(solution) == "72"
    assert gsm8k_gold_answer("a\n#### 1,080") == "1080"
    assert gsm8k_gold_answer("#### 5 #### -3") == "-3"  # the last marker wins


@pytest.mark.parametrize("field", ["no marker 72", "#### ", "42\n#### none"])
def test_gsm8k_gold_answer_errors(field: str) -> None:
    with pytest.raises(ValueError):
        gsm8k_gold_answer(field)
