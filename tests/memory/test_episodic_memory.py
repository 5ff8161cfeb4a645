"""Episodic memory and the rewards that read it, on hand-made attempt sequences."""

from __future__ import annotations

import json

import pytest

from deepsynapse.data.problems import Problem
from deepsynapse.formats import BASE_SCHEMA, parse_completion
from deepsynapse.memory import EpisodicMemory
from deepsynapse.rewards.base import call_components
from deepsynapse.rewards.memory_rewards import MEMORY_REWARDS, NoveltyReward, RepeatMistakePenalty


def problem(pid: str, answer: str = "42") -> Problem:
    return Problem(pid, f"question {pid}", answer, "", 1, "synthetic")


def xml(answer: str) -> str:
    return f"<reasoning>r</reasoning>\n<answer>{answer}</answer>"


def columns(problems: list[Problem], texts: list[str]) -> dict:
    return {
        "problem": problems,
        "answer": [p.answer for p in problems],
        "parsed": [parse_completion(t, BASE_SCHEMA) for t in texts],
        "schema": BASE_SCHEMA,
    }


def test_record_normalises_answers_and_keeps_last_k_attempts():
    m = EpisodicMemory(attempts_per_problem=3)
    for step, ans in enumerate(["$1,000", "12", "13", "14"]):
        m.record(["p"], [ans], [False], step=step)
    attempts = m.attempts("p")
    assert [a.answer for a in attempts] == ["12", "13", "14"]  # oldest forgotten
    assert [a.step for a in attempts] == [1, 2, 3]
    m.record(["p"], ["1000.00"], [False], step=4)
    assert m.previous_wrong_answers("p") == ["13", "14", "1000"]
    assert m.wrong_answer_counts("p", before_step=4) == {"13": 1, "14": 1}
    assert m.solve_rate("p") == 0.0 and not m.is_solved("p")


def test_lru_cap_forgets_least_recently_attempted_problem():
    m = EpisodicMemory(max_problems=2)
    m.record(["a", "b"], ["1", "2"], [False, False], step=0)
    m.record(["a"], ["3"], [False], step=1)  # a is now more recent than b
    m.record(["c"], ["4"], [True], step=2)
    assert "b" not in m and "a" in m and "c" in m
    assert len(m) == 2
    assert m.metrics() == {"episodic/problems": 2.0, "episodic/solved_share": 0.5}


def test_memory_spans_epochs_and_lifetime_solve_rate_outlives_window():
    m = EpisodicMemory(attempts_per_problem=2)
    m.record(["p"] * 4, ["42", "1", "2", "3"], [True, False, False, False], step=0)  # epoch 1
    assert [a.answer for a in m.attempts("p")] == ["2", "3"]
    m.record(["p"], ["5"], [False], step=100)  # epoch 2: still remembered
    assert m.is_solved("p")  # the correct attempt fell out of the window, not out of memory
    assert m.solve_rate("p") == pytest.approx(1 / 5)


def test_solved_examples_hardest_first_and_only_verified():
    m = EpisodicMemory(solutions_per_problem=1)
    m.record(
        ["easy", "easy", "hard", "hard", "hard", "hard", "never"],
        ["42", "42", "42", "1", "2", "3", "9"],
        [True, True, True, False, False, False, False],
        step=3,
        completions=["e1", "e2", "h1", "x", "y", "z", "n"],
    )
    ex = m.solved_examples(limit=5, max_solve_rate=1.0)
    assert [e["problem_id"] for e in ex] == ["hard", "easy"]
    assert ex[0]["completion"] == "h1" and ex[0]["solve_rate"] == 0.25 and ex[0]["step"] == 3
    assert ex[1]["completion"] == "e2"  # the newest kept solution
    assert [e["problem_id"] for e in m.solved_examples(max_solve_rate=0.5)] == ["hard"]


def test_state_round_trip_is_json_and_identical():
    m = EpisodicMemory(attempts_per_problem=2, max_problems=3)
    m.record(
        ["a", "b", "a"],
        ["1", "2", "42"],
        [False, False, True],
        step=0,
        rewards=[0.1, None, 1],
        completions=["x", "y", "z"],
    )
    state = json.loads(json.dumps(m.state_dict()))
    m2 = EpisodicMemory(attempts_per_problem=2, max_problems=3)
    m2.load_state_dict(state)
    assert m2.state_dict() == m.state_dict()
    for mem in (m, m2):  # continues identically, LRU order included
        mem.record(["c", "d"], ["5", "6"], [False, False], step=1)
    assert m2.state_dict() == m.state_dict()
    assert "b" not in m2 and "a" in m2


def test_record_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 problem ids but 1 answers"):
        EpisodicMemory().record(["a", "b"], ["1"], [True, False], step=0)


def test_repeat_mistake_penalty_grows_with_repetitions():
    m = EpisodicMemory()
    pen = RepeatMistakePenalty(m)
    p = problem("p")
    texts = [xml("7"), xml("8"), xml("42"), "no tags, no number"]
    cols = columns([p] * 4, texts)
    assert pen([""] * 4, texts, **cols) == [0.0, 0.0, 0.0, None]  # nothing remembered yet
    # The trainer records after scoring: 7 and 8 were wrong, 42 right.
    m.record([p.id] * 3, ["7", "8", "42"], [False, False, True], step=0)
    assert pen([""] * 4, texts, **cols) == [-0.5, -0.5, 0.0, None]
    m.record([p.id], ["7"], [False], step=1)
    scores = pen([""] * 4, texts, **cols)
    assert scores[0] == -0.75 and scores[1] == -0.5  # the more repeated, the more it costs
    other = problem("q")  # the same wrong answer on another problem is not a repeat
    assert pen([""], [xml("7")], **columns([other], [xml("7")])) == [0.0]


def test_components_score_before_batch_is_recorded():
    """Scoring then recording (the trainer's order) never compares a completion with itself."""
    m = EpisodicMemory()
    p = problem("p")
    texts = [xml("7"), xml("7")]
    cols = columns([p, p], texts)
    scores, failures = call_components(
        [RepeatMistakePenalty(m), NoveltyReward(m)], [""] * 2, texts, cols
    )
    assert not failures
    assert scores["repeat_mistake"] == [0.0, 0.0]  # the in-batch duplicate is not a repeat
    assert scores["novelty"] == [1.0, 1.0]
    m.record([p.id] * 2, ["7", "7"], [False, False], step=0)
    scores, _ = call_components([RepeatMistakePenalty(m), NoveltyReward(m)], [""] * 2, texts, cols)
    assert scores["repeat_mistake"] == [-0.75, -0.75]  # given twice before
    assert scores["novelty"] == [0.0, 0.0]


def test_novelty_only_for_new_answers_on_unsolved_problems():
    m = EpisodicMemory()
    a, b = problem("a"), problem("b")
    m.record(["a", "b"], ["7", "42"], [False, True], step=0)
    texts = [xml("7"), xml("9"), xml("42"), xml("9"), "<answer>nine</answer>"]
    cols = columns([a, a, a, b, a], texts)
    nov = NoveltyReward(m, bonus=0.1)
    assert nov([""] * 5, texts, **cols) == [0.0, 0.1, 0.1, 0.0, None]
    assert nov.name == "novelty" and RepeatMistakePenalty(m).name == "repeat_mistake"
    assert {name: type(f(m)) for name, f in MEMORY_REWARDS.items()} == {
        "repeat_mistake": RepeatMistakePenalty,
        "novelty": NoveltyReward,
    }


def test_memory_rewards_need_problem_ids():
    with pytest.raises(KeyError, match="problem"):
        NoveltyReward(EpisodicMemory())([""], [xml("1")], parsed=[parse_completion(xml("1"))])
    # a problem_id column works too
    assert NoveltyReward(EpisodicMemory())([""], [xml("1")], problem_id=["x"]) == [1.0]
