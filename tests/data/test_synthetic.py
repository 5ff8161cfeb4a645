"""Tests for the synthetic word-problem generator."""

from __future__ import annotations

import re
import time
from fractions import Fraction

import pytest

from deepsynapse.data.answers import normalize_answer
from deepsynapse.data.synthetic import VARIANTS, generate_problems

# "... 3 * 12 = 36 ..." or "... 24 * 75 / 100 = 18 ..."
_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+)(?: / (100))? = \$?(\d+)")


def _evaluate(a: str, op: str, b: str, percent: str | None) -> Fraction:
    x, y = Fraction(a), Fraction(b)
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op]
    return value / 100 if percent else value


def test_same_seed_same_problems() -> None:
    assert generate_problems(50, seed=11) == generate_problems(50, seed=11)


def test_different_seeds_differ() -> None:
    a = [p.question for p in generate_problems(50, seed=1)]
    b = [p.question for p in generate_problems(50, seed=2)]
    assert a != b
    assert len(set(a) & set(b)) < 5


def test_prefix_stable() -> None:
    assert generate_problems(10, seed=4) == generate_problems(30, seed=4)[:10]


def test_problem_fields() -> None:
    problems = generate_problems(200, seed=5, difficulty=(1, 6))
    assert [p.id for p in problems] == [f"synthetic-5-{i}" for i in range(200)]
    for p in problems:
        assert p.source == "synthetic"
        assert p.question.endswith("?")
        assert re.fullmatch(r"\d+", p.answer), p.answer
        assert int(p.answer) >= 0
        assert normalize_answer(p.answer) == p.answer
        lines = p.solution.split("\n")
        assert p.difficulty == len(lines)
        assert all(line.strip() == line and line for line in lines)
        assert "<<" not in p.solution


def test_intermediates_match_solution_arithmetic() -> None:
    """Each solution line computes its intermediate, and the last one is the answer."""
    for p in generate_problems(300, seed=9, difficulty=(1, 6)):
        intermediates = p.columns["intermediates"]
        assert len(intermediates) == p.difficulty
        assert all(isinstance(x, str) and x.isdigit() for x in intermediates)
        assert intermediates[-1] == p.answer
        for line, expected in zip(p.solution.split("\n"), intermediates, strict=True):
            match = _EQUATION.search(line)
            assert match, line
            a, op, b, percent, result = match.groups()
            assert result == expected, line
            assert _evaluate(a, op, b, percent) == int(result), line


def test_operands_appear_in_question() -> None:
    """Every number a solution starts from is given in the question or computed before."""
    for p in generate_problems(200, seed=3, difficulty=(1, 6)):
        known = set(re.findall(r"\d+", p.question)) | {"2", "60", "100", "1000"}
        for line, result in zip(p.solution.split("\n"), p.columns["intermediates"], strict=True):
            match = _EQUATION.search(line)
            assert match
            a, _, b, _, _ = match.groups()
            assert a in known and b in known, (p.question, line)
            known.add(result)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5, 6])
def test_exact_difficulty(difficulty: int) -> None:
    problems = generate_problems(40, seed=difficulty, difficulty=difficulty)
    assert {p.difficulty for p in problems} == {difficulty}


def test_difficulty_range_respected_and_covered() -> None:
    problems = generate_problems(300, seed=0, difficulty=(2, 4))
    assert {p.difficulty for p in problems} == {2, 3, 4}
    default = generate_problems(300, seed=0)
    assert {p.difficulty for p in default} == {1, 2, 3}


def test_variety() -> None:
    problems = generate_problems(500, seed=8, difficulty=(1, 6))
    assert len({p.question for p in problems}) == 500
    first_words = {p.question.split()[0] for p in problems}
    assert len(first_words) > 20
    steps = {name for p in problems for name in p.columns["steps"]}
    assert {"groups", "travel", "wage", "percent", "share", "buy", "sell"} <= steps
    # units named in the task description all show up somewhere
    text = " ".join(p.question for p in problems)
    for unit in ("$", "hours", "minutes", "miles", "meters", "kilograms", "%"):
        assert unit in text, unit


@pytest.mark.parametrize("bad", [(0, 3), (3, 2), (1, 7), 0, 7])
def test_invalid_difficulty(bad: int | tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        generate_problems(3, difficulty=bad)


def test_zero_and_negative_n() -> None:
    assert generate_problems(0) == []
    with pytest.raises(ValueError):
        generate_problems(-1)


def test_500_problems_quickly() -> None:
    start = time.perf_counter()
    problems = generate_problems(500, seed=123, difficulty=(1, 6))
    assert len(problems) == 500
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------ SVAMP-style variations


def _unused_numbers(p) -> set[str]:
    """Numbers the question states that no line of the worked solution starts from."""
    operands = set()
    for line in p.solution.split("\n"):
        a, _, b, _, _ = _EQUATION.search(line).groups()
        operands |= {a, b}
    return set(re.findall(r"\d+", p.question)) - operands


def test_no_variants_leave_the_stream_as_it_always_was() -> None:
    """Every earlier study trained on this stream: a share of 0 must not move one problem."""
    plain = generate_problems(300, seed=7, difficulty=(1, 6))
    assert generate_problems(300, seed=7, difficulty=(1, 6), variants=0.0) == plain
    assert all("variant" not in p.columns for p in plain)


def test_varied_problems_compute_their_answers_from_their_own_facts() -> None:
    problems = generate_problems(600, seed=9, difficulty=(1, 6), variants=1.0)
    assert {p.columns["variant"] for p in problems} == set(VARIANTS)
    assert {p.difficulty for p in problems if p.columns["variant"] == "inverse"} == {1, 2}
    assert {p.difficulty for p in problems} == {1, 2, 3, 4, 5, 6}
    assert len({p.question for p in problems}) == 600
    for p in problems:
        intermediates = p.columns["intermediates"]
        lines = p.solution.split("\n")
        assert p.question.endswith("?") and re.fullmatch(r"\d+", p.answer)
        assert len(intermediates) == len(lines) == p.difficulty
        assert intermediates[-1] == p.answer
        known = set(re.findall(r"\d+", p.question)) | {"2", "60", "100", "1000"}
        for line, expected in zip(lines, intermediates, strict=True):
            a, op, b, percent, result = _EQUATION.search(line).groups()
            assert result == expected and _evaluate(a, op, b, percent) == int(result), line
            assert a in known and b in known, (p.question, line)
            known.add(result)


def test_each_variation_varies_what_its_name_says() -> None:
    problems = generate_problems(900, seed=4, difficulty=(1, 3), variants=0.6)
    by = {v: [p for p in problems if p.columns.get("variant") == v] for v in VARIANTS}
    plain = [p for p in problems if "variant" not in p.columns]
    assert 0.5 < 1 - len(plain) / len(problems) < 0.7  # the share asked for
    assert all(len(ps) > 60 for ps in by.values())
    # irrelevant: a stated number no step uses (never so in an unvaried problem)
    assert all(_unused_numbers(p) for p in by["irrelevant"])
    assert not any(_unused_numbers(p) for p in plain)
    # inverse: the unknown is where the story starts or the change in it, never stated; the
    # question asks about the past
    for p in by["inverse"]:
        assert re.search(r"did \w+ (have at first|have before|give to \w+|find)\?$", p.question)
        assert p.answer not in re.findall(r"\d+", p.question), p.question
    # if_clause: the question carries the last fact as its condition
    for p in by["if_clause"]:
        assert re.fullmatch(r"If [^?]+, (how|what)[^?]+\?", p.question.split(". ")[-1]), p.question
    # compare: a difference between two people's amounts is asked, whatever came before
    for p in by["compare"]:
        assert re.search(r"How (many|much) (more|fewer) .* than .*\?$", p.question), p.question
        assert p.columns["steps"][-1] == "compare"


def test_variants_must_be_a_share() -> None:
    with pytest.raises(ValueError, match="variants"):
        generate_problems(3, variants=1.5)


def test_chosen_variant_kinds_vary_only_that_way_and_leave_the_rest_of_the_stream() -> None:
    """A share of compare questions alone (the form every trained hour loses on SVAMP)."""
    every = generate_problems(400, seed=5, difficulty=(1, 3), variants=0.3)
    named = generate_problems(400, seed=5, difficulty=(1, 3), variants=0.3, variant_kinds=VARIANTS)
    assert named == every  # all kinds named: the stream as it was before kinds could be chosen
    compare = generate_problems(
        400, seed=5, difficulty=(1, 3), variants=0.3, variant_kinds=["compare"]
    )
    varied = [p for p in compare if "variant" in p.columns]
    assert {p.columns["variant"] for p in varied} == {"compare"}
    assert 0.2 < len(varied) / len(compare) < 0.4
    # the same problems are varied (the share's draw is its own), the others are unchanged
    assert [i for i, p in enumerate(compare) if "variant" in p.columns] == [
        i for i, p in enumerate(every) if "variant" in p.columns
    ]
    assert all(a == b for a, b in zip(compare, every, strict=True) if "variant" not in a.columns)
    # a kind that cannot vary a problem (inverse needs at most two steps) leaves it as it was
    inverse = generate_problems(200, seed=5, difficulty=3, variants=1.0, variant_kinds=["inverse"])
    assert inverse == generate_problems(200, seed=5, difficulty=3)
    for bad in ([], ["comparison"], "compare"):
        with pytest.raises(ValueError, match="variant kinds must be a non-empty list"):
            generate_problems(3, variants=0.5, variant_kinds=bad)
