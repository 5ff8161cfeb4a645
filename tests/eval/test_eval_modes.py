"""Evaluation modes (greedy, majority vote, best-of-N), metric maths and result comparison."""

from __future__ import annotations

import json

import pytest
import torch

from deepsynapse.data.problems import Problem
from deepsynapse.eval.compare import compare_results, flips, main_compare
from deepsynapse.eval.harness import (
    answer_key,
    brier,
    confidence_select,
    distractor_values,
    evaluate,
    expected_calibration_error,
    item_record,
    majority_answer,
    summarize,
)
from deepsynapse.formats import BASE_SCHEMA, DEEPSYNAPSE_SCHEMA


def _problem(pid: str, answer: str, **columns) -> Problem:
    return Problem(pid, f"question {pid}?", answer, "", 1, "synthetic", columns)


def _completion(answer: str, confidence: str | None = None) -> str:
    text = f"<reasoning>\nwork\n</reasoning>\n<answer>\n{answer}\n</answer>"
    if confidence is not None:  # the deepsynapse schema: critique and confidence both required
        text += f"\n<critique>\nchecked\n</critique>\n<confidence>\n{confidence}\n</confidence>"
    return text


# ------------------------------------------------------------------ pure metrics


def test_ece_against_hand_computed_values():
    # Bins of width 0.1. Bin 9 holds 0.95, 0.9, 0.92 (2 of 3 right): conf 0.9233.., acc 0.6667.
    # Bin 2 holds 0.25 (wrong): gap 0.25. Bin 5 holds 0.5 (right): gap 0.5.
    conf = [0.95, 0.9, 0.92, 0.25, 0.5]
    correct = [True, True, False, False, True]
    expected = 3 / 5 * abs(2 / 3 - (0.95 + 0.9 + 0.92) / 3) + 1 / 5 * 0.25 + 1 / 5 * 0.5
    assert expected_calibration_error(conf, correct, 10) == pytest.approx(expected, abs=1e-12)
    # Perfect calibration inside a bin gives 0; one bin = |mean conf - accuracy|.
    assert expected_calibration_error([1.0, 1.0, 0.0], [True, True, False]) == 0.0
    assert expected_calibration_error(conf, correct, bins=1) == pytest.approx(
        abs(sum(conf) / 5 - 3 / 5)
    )
    # Edges: 1.0 falls in the last bin, 0.1 in the second.
    assert expected_calibration_error([0.1], [False], 10) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        expected_calibration_error([], [])
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [True])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5, 0.5], [True])


def test_brier_against_hand_computed_values():
    assert brier([0.9, 0.2, 0.6], [True, False, False]) == pytest.approx((0.01 + 0.04 + 0.36) / 3)
    assert brier([1.0, 0.0], [True, False]) == 0.0


def test_majority_answer_counts_normalised_answers_and_breaks_ties_by_first_seen():
    assert majority_answer(["$1,000", "7", "1000.00", "7", "1000"]) == "1000"
    assert majority_answer(["5", "6", "6", "5"]) == "5"  # tie: 5 came first
    assert majority_answer(["6", None, "", "5", "5", "6"]) == "6"
    assert majority_answer([None, "  "]) is None
    assert majority_answer(["Unknown", "unknown ", "3"]) == "unknown"
    assert answer_key("18 apples") == "18"


def test_distractor_values_accepts_the_usual_shapes():
    assert distractor_values(None) == []
    assert distractor_values({"numeric": 5, "semantic": "6"}) == [
        ("numeric", "5"),
        ("semantic", "6"),
    ]
    assert distractor_values([{"type": "unit", "answer": 500}, 7]) == [("unit", "500"), (None, "7")]


# ------------------------------------------------------------------ records and summaries


def test_majority_record_picks_the_first_completion_with_the_winning_answer():
    p = _problem("a", "12")
    texts = [_completion("7"), _completion("12.0"), _completion("7"), _completion("$12")]
    rec = item_record(p, BASE_SCHEMA, texts, [5, 6, 7, 8], [False] * 4, "majority", None)
    # 7 and 12 tie 2-2; 7 was seen first, so the vote is wrong although 2 samples are right.
    assert rec["chosen"] == 0 and rec["predicted"] == "7" and not rec["correct"]
    assert rec["samples_correct"] == [False, True, False, True] and rec["vote_share"] == 0.5
    texts[2] = _completion("12")
    rec = item_record(p, BASE_SCHEMA, texts, [5, 6, 7, 8], [False] * 4, "majority", None)
    assert rec["chosen"] == 1 and rec["correct"] and rec["length"] == 6


def test_best_of_n_record_uses_select_and_checks_its_index():
    p = _problem("b", "3")
    texts = [_completion("1", "0.2"), _completion("3", "0.9"), "garbage"]
    sel = lambda comps, q: 1  # noqa: E731
    rec = item_record(p, DEEPSYNAPSE_SCHEMA, texts, [1, 2, 3], [False] * 3, "best_of_n", sel)
    assert rec["chosen"] == 1 and rec["correct"] and rec["confidence"] == 0.9
    assert confidence_select(texts, "q", schema=DEEPSYNAPSE_SCHEMA) == 1
    assert confidence_select(["x", "y"], "q", schema=DEEPSYNAPSE_SCHEMA) == 0
    with pytest.raises(ValueError, match="select returned 3"):
        item_record(p, BASE_SCHEMA, texts, [1, 2, 3], [False] * 3, "best_of_n", lambda c, q: 3)


def test_summary_calibration_and_distractor_metrics():
    schema = DEEPSYNAPSE_SCHEMA
    dis = {"numeric": "41", "semantic": "20", "unit": "4200"}
    cases = [  # (gold, completion, distractors)
        ("42", _completion("42", "0.9"), dis),  # right
        ("42", _completion("41", "0.8"), dis),  # wrong, the numeric distractor
        ("42", _completion("7", "0.3"), dis),  # wrong, not a distractor
        ("5", _completion("5"), None),  # right number, but no confidence: format-invalid
    ]
    records = []
    for i, (gold, text, d) in enumerate(cases):
        p = _problem(str(i), gold, **({"distractors": d} if d else {}))
        records.append(item_record(p, schema, [text], [10 * (i + 1)], [i == 3], "greedy", None))
    s = summarize(records, 1.5)
    # strict needs the format (the 4th omits the required confidence); lenient does not
    assert s["mode"] == "greedy" and s["n"] == 4 and s["accuracy"] == 0.25
    assert s["lenient_accuracy"] == 0.5
    assert s["mean_length"] == 25.0 and s["truncation_rate"] == 0.25
    assert s["confidence_rate"] == 0.75
    assert s["brier"] == pytest.approx((0.01 + 0.64 + 0.09) / 3)
    assert s["ece"] == pytest.approx(expected_calibration_error([0.9, 0.8, 0.3], [1, 0, 0]))
    assert s["distractor_items"] == 3
    assert s["distractor_correct_rate"] == pytest.approx(1 / 3)
    assert s["distractor_wrong_share"] == 0.5 and s["distractor_hits"] == {"numeric": 1}
    assert s["sample_accuracy"] is None and s["pass_at_k"] is None
    # Without confidences or distractors those metrics are None, not 0.
    bare = summarize(records[3:])
    assert bare["ece"] is None and bare["brier"] is None and bare["distractor_items"] == 0


# ------------------------------------------------------------------ on a real (tiny) model


@pytest.fixture(scope="module")
def tiny():
    from deepsynapse.models.loading import load_model, load_tokenizer

    tok = load_tokenizer("tiny-random")
    torch.manual_seed(0)
    return load_model("tiny-random", torch.float32, tok), tok


def test_evaluate_modes_on_the_tiny_model(tiny):
    model, tok = tiny
    problems = [_problem("x", "4"), _problem("y", "9")]
    kw = dict(batch_size=2, max_new_tokens=4, progress=False)
    greedy = evaluate(model, tok, problems, BASE_SCHEMA, **kw)
    assert greedy["mode"] == "greedy" and greedy["n"] == 2 and greedy["samples_per_item"] == 1
    assert [r["id"] for r in greedy["records"]] == ["x", "y"]

    model.train()
    rng_before = torch.get_rng_state()
    kw.update(k=3, temperature=1.0, seed=7, keep_samples=True)
    maj = evaluate(model, tok, problems, BASE_SCHEMA, mode="majority", **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training's RNG untouched
    assert model.training  # the caller's mode is restored
    assert maj["samples_per_item"] == 3 and all(len(r["answers"]) == 3 for r in maj["records"])
    assert maj["pass_at_k"] is not None and 0.0 <= maj["sample_accuracy"] <= 1.0

    seen = []

    def last(completions, question):
        seen.append((len(completions), question))
        return len(completions) - 1

    best = evaluate(model, tok, problems, BASE_SCHEMA, mode="best_of_n", select=last, **kw)
    assert seen == [(3, p.question) for p in problems]
    assert all(r["chosen"] == 2 for r in best["records"])
    # Same seed, same samples: sampling is reproducible and both modes judged the same k.
    assert [r["samples"] for r in best["records"]] == [r["samples"] for r in maj["records"]]
    assert [r["completion"] for r in best["records"]] == [r["samples"][2] for r in maj["records"]]
    assert len({t for r in maj["records"] for t in r["samples"]}) > 1  # really sampled
    json.dumps(best)  # the result is JSON-able as written to eval_*.json

    with pytest.raises(ValueError, match="needs select"):
        evaluate(model, tok, problems, BASE_SCHEMA, mode="best_of_n", progress=False)
    with pytest.raises(ValueError, match="unknown eval mode"):
        evaluate(model, tok, problems, BASE_SCHEMA, mode="beam", progress=False)


# ------------------------------------------------------------------ comparison


def test_compare_results_table_and_flips(tmp_path, capsys):
    def result(acc, correct, **extra):
        recs = [{"id": f"p{i}", "correct": c} for i, c in enumerate(correct)]
        return {"n": len(correct), "mode": "greedy", "accuracy": acc, "format_validity": 0.5,
                "ece": None, "records": recs, "seconds": 3.0, **extra}  # fmt: skip

    a = result(0.5, [True, True, False, False])
    b = result(0.5, [True, False, True, False], skills={"units": 0.75})
    f = flips(a, b)
    assert (f["common"], f["fixed"], f["broken"]) == (4, 1, 1)
    assert f["fixed_ids"] == ["p2"] and f["broken_ids"] == ["p1"]
    table = compare_results(a, b)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "trained", "delta"]
    acc = next(line for line in lines if line.startswith("accuracy"))
    assert acc.split() == ["accuracy", "0.500", "0.500", "+0.000"]
    assert any(line.split()[:3] == ["skills/units", "n/a", "0.750"] for line in lines)
    assert not any(line.startswith(("seconds", "records")) for line in lines)
    assert "fixed 1" in table and "broken 1" in table
    # same problems: the paired change with its interval (strict only: no lenient field)
    paired = [line for line in lines if line.startswith("paired change")]
    assert len(paired) == 1 and paired[0].startswith("paired change (strict): +0.0 pts [")
    assert "McNemar p=1" in paired[0]
    c = result(0.25, [True, False, False])  # one problem fewer: no paired claim
    assert "scored different problems" in compare_results(a, c)
    pa, pb = tmp_path / "base.json", tmp_path / "trained.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(dict(b, mode="majority", accuracy=0.75)))
    assert main_compare(pa, pb) == 0
    out = capsys.readouterr().out
    assert "+0.250" in out and "modes differ" in out


def test_module_doctests():
    import doctest

    from deepsynapse.eval import compare, harness

    assert doctest.testmod(harness).failed == 0
    assert doctest.testmod(compare).failed == 0
