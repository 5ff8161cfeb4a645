"""Skill probes: a deterministic suite disjoint from training data, its scoring, emergence."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from deepsynapse.data.gsm8k import load_gsm8k
from deepsynapse.data.problems import DataError
from deepsynapse.data.synthetic import generate_problems
from deepsynapse.eval.probes import (
    CANNOT,
    PROBE_NAMES,
    SKILLS,
    EmergenceDetector,
    ProbeItem,
    build_probe_suite,
    probe_metrics,
    run_probes,
    score_item,
    summarize_probes,
)
from deepsynapse.formats import BASE_SCHEMA, DEEPSYNAPSE_SCHEMA


def _answer(text: str, valid: bool = True) -> str:
    body = f"<reasoning>\nsteps\n</reasoning>\n<answer>\n{text}\n</answer>"
    return body if valid else body + " trailing text"


# ------------------------------------------------------------------ the suite


def test_suite_is_deterministic_and_complete():
    a, b = build_probe_suite(seed=1234, per_skill=8), build_probe_suite(seed=1234, per_skill=8)
    assert a == b
    assert build_probe_suite(seed=99, per_skill=8) != a
    counts = {s: sum(x.skill == s for x in a) for s in SKILLS}
    assert counts == {s: 16 if s == "consistency" else 8 for s in SKILLS}
    assert len({x.id for x in a}) == len(a) and len({x.question for x in a}) == len(a)
    # A shorter suite is a prefix of each skill's longer one (items depend on (seed, skill, i)).
    small = build_probe_suite(per_skill=3)
    assert all(x in a for x in small)
    pairs: dict[str, list[ProbeItem]] = {}
    for x in a:
        if x.skill == "consistency":
            pairs.setdefault(x.group, []).append(x)
    assert len(pairs) == 8
    for group, (one, two) in pairs.items():
        assert one.answer == two.answer and one.question != two.question, group
    missing = [x for x in a if x.skill == "unanswerable" and x.answer == CANNOT]
    assert len(missing) == 4  # and 4 answerable controls of the same templates
    for x in a:
        if x.skill == "distractor_mc":
            options = x.columns["options"]
            assert options[x.answer] == x.accept[0]
            assert sorted(options.values()) == sorted(
                [x.accept[0], *x.columns["distractors"].values()]
            )
            assert len(set(options.values())) == 4
    with pytest.raises(ValueError, match="unknown probe skills"):
        build_probe_suite(skills=["telepathy"])


def test_arithmetic_and_error_spotting_golds_are_right():
    for x in build_probe_suite(per_skill=8, skills=["arithmetic", "error_spotting"]):
        if x.skill == "arithmetic":
            m = re.search(r"(\d+) (\+|-|\*|/|plus|minus|times|divided by) (\d+)", x.question)
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            value = {"+": a + b, "plus": a + b, "-": a - b, "minus": a - b, "*": a * b,
                     "times": a * b, "/": a / b, "divided by": a / b}[op]  # fmt: skip
            assert float(x.answer) == value
        else:
            steps = re.findall(r"Step (\d+): (\d+) ([-+*]) (\d+) = (-?\d+)", x.question)
            wrong = [
                int(n)
                for n, a, op, b, r in steps
                if {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] != int(r)
            ]
            assert wrong == [int(x.answer)]
            # Later steps build on the shown (wrong) result, so only one step is wrong.
            assert all(int(r) > 0 for *_, r in steps)


def test_probes_are_disjoint_from_training_data():
    probes = build_probe_suite(seed=1234, per_skill=8)
    questions = {x.question for x in probes}
    synthetic = [
        p.question
        for seed in range(4)
        for p in generate_problems(400, seed=seed, difficulty=(1, 6))
    ]
    assert not questions & set(synthetic)
    # Stronger than string equality: no probe person appears in the synthetic generator.
    names = re.compile(r"\b(" + "|".join(PROBE_NAMES) + r")\b")
    assert not [q for q in synthetic if names.search(q)]
    try:
        train, _ = load_gsm8k("gsm8k", "train")
    except DataError as exc:  # pragma: no cover - the shared copy is part of the project
        pytest.skip(f"GSM8K train split unavailable: {exc}")
    assert len(train) > 7000
    assert not questions & {p.question for p in train}


# ------------------------------------------------------------------ scoring


def test_scoring_rules_per_skill():
    s = BASE_SCHEMA
    items = {x.skill: x for x in build_probe_suite(per_skill=1)}
    fmt = items["format"]
    assert score_item(fmt, _answer("anything 0"), s)["correct"]  # format only
    assert not score_item(fmt, _answer(fmt.answer, valid=False), s)["correct"]

    arith = items["arithmetic"]
    assert score_item(arith, _answer(arith.answer, valid=False), s)["correct"]
    assert not score_item(arith, _answer(str(int(arith.answer) + 1)), s)["correct"]
    assert not score_item(arith, "no tags at all " + arith.answer, s)["correct"]

    mc = items["distractor_mc"]
    value = mc.accept[0]
    wrong_letter = next(k for k in "ABCD" if k != mc.answer)
    for good in (mc.answer, f"({mc.answer})", f"{mc.answer}) {value}", value, f"{value} total"):
        assert score_item(mc, _answer(good), s)["correct"], good
    distractor = next(iter(mc.columns["distractors"].values()))
    for bad in (wrong_letter, f"{wrong_letter}.", distractor, "A total of nothing"):
        assert not score_item(mc, _answer(bad), s)["correct"], bad

    missing = ProbeItem("u0", "unanswerable", "q", CANNOT)
    control = ProbeItem("u1", "unanswerable", "q", "36")
    for good in ("cannot be determined", "Unknown", "There is not enough information."):
        assert score_item(missing, _answer(good), s)["correct"], good
    assert not score_item(missing, _answer("36"), s)["correct"]
    assert score_item(control, _answer("36"), s)["correct"]
    assert not score_item(control, _answer("unknown"), s)["correct"]
    assert not score_item(control, _answer("36, or unknown"), s)["correct"]

    spot = items["error_spotting"]
    assert score_item(spot, _answer(f"Step {spot.answer}"), s)["correct"]


def test_consistency_counts_a_pair_only_when_both_wordings_are_right():
    records = [
        {"skill": "consistency", "group": "g1", "correct": True, "format_valid": True},
        {"skill": "consistency", "group": "g1", "correct": False, "format_valid": True},
        {"skill": "consistency", "group": "g2", "correct": True, "format_valid": False},
        {"skill": "consistency", "group": "g2", "correct": True, "format_valid": True},
        {"skill": "units", "group": "u1", "correct": True, "format_valid": True},
    ]
    out = summarize_probes(records)
    assert out["skills"] == {"consistency": 0.5, "units": 1.0}
    assert out["counts"] == {"consistency": 2, "units": 1}
    assert out["accuracy"] == 0.75 and out["format_validity"] == 0.8
    assert probe_metrics(out) == {
        "probes/consistency": 0.5,
        "probes/units": 1.0,
        "probes/mean": 0.75,
    }


def _claimed(answer: str, confidence: str | None) -> str:
    """A deepsynapse-schema completion; ``confidence=None`` leaves the field out."""
    text = (
        f"<reasoning>\nsteps\n</reasoning>\n<answer>\n{answer}\n</answer>\n"
        "<critique>\nI checked it.\n</critique>"
    )
    return text if confidence is None else text + f"\n<confidence>\n{confidence}\n</confidence>"


def test_default_suite_has_calibration_items():
    assert "calibration" in SKILLS
    suite = build_probe_suite(seed=1234, per_skill=8)
    items = [x for x in suite if x.skill == "calibration"]
    assert len(items) == 8 and len({x.question for x in items}) == 8
    assert items == [x for x in build_probe_suite(seed=1234, skills=["calibration"])]
    for x in items:
        assert "confident" in x.question and "between 0 and 1" in x.question
        assert normalize(x.answer) == x.answer  # a plain number to be right or wrong about
    # Easy and hard items, so that a calibrated confidence has something to track.
    assert {x.columns["difficulty"] for x in items} == {"easy", "medium", "hard"}


def normalize(text: str) -> str | None:
    from deepsynapse.data.answers import normalize_answer

    return normalize_answer(text)


def test_calibration_scoring_tracks_correctness():
    item = next(x for x in build_probe_suite(per_skill=1) if x.skill == "calibration")
    right, wrong = item.answer, str(int(item.answer) + 1)
    d = DEEPSYNAPSE_SCHEMA

    def score(text: str, schema=d) -> dict:
        return score_item(item, text, schema)

    confident_right = score(_claimed(right, "0.9"))
    unconfident_right = score(_claimed(right, "0.3"))
    confident_wrong = score(_claimed(wrong, "0.9"))
    humble_wrong = score(_claimed(wrong, "0.1"))
    missing = score(_claimed(right, None))
    assert confident_right["score"] == pytest.approx(1 - 0.1**2)  # 1 - Brier
    assert confident_right["score"] > unconfident_right["score"] > confident_wrong["score"]
    assert humble_wrong["score"] > confident_wrong["score"]
    assert missing["score"] == 0.0  # worst value, not skipped
    assert score(_claimed(wrong, "1"))["score"] == 0.0  # as bad as certain and wrong
    assert score(_claimed(right, "high"))["score"] == 0.0  # not a number in [0, 1]
    assert confident_right["correct"] and not confident_wrong["correct"]  # the answer's truth
    assert confident_right["confidence"] == 0.9 and missing["confidence"] is None
    # A model without a confidence field (the base schema) scores the worst value...
    assert score(_answer(right), BASE_SCHEMA)["score"] == 0.0
    assert score("no tags at all", BASE_SCHEMA)["score"] == 0.0
    # ...unless it states one in a <confidence> tag anyway.
    assert score(_answer(right) + "\n<confidence>0.9</confidence>", BASE_SCHEMA)[
        "score"
    ] == pytest.approx(0.99)
    # Other skills score 1 or 0 as before.
    arith = next(x for x in build_probe_suite(per_skill=1) if x.skill == "arithmetic")
    assert score_item(arith, _answer(arith.answer), BASE_SCHEMA)["score"] == 1.0


def test_calibration_summary_averages_item_scores():
    records = [
        {"skill": "calibration", "group": "c1", "correct": True, "format_valid": True,
         "score": 0.99, "confidence": 0.9},
        {"skill": "calibration", "group": "c2", "correct": False, "format_valid": True,
         "score": 0.19, "confidence": 0.9},
        {"skill": "calibration", "group": "c3", "correct": True, "format_valid": False,
         "score": 0.0, "confidence": None},
        {"skill": "units", "group": "u1", "correct": True, "format_valid": True},
    ]  # fmt: skip
    out = summarize_probes(records)
    assert out["skills"]["calibration"] == pytest.approx((0.99 + 0.19 + 0.0) / 3)
    assert out["skills"]["units"] == 1.0
    cal = out["calibration"]
    assert cal["stated"] == pytest.approx(2 / 3)
    assert cal["brier"] == pytest.approx((0.01 + 0.81 + 1.0) / 3)  # missing counts as 1
    assert cal["ece"] == pytest.approx(abs(0.9 - 0.5))  # one bin: confidence 0.9, accuracy 0.5
    assert probe_metrics(out)["probes/calibration"] == pytest.approx(out["skills"]["calibration"])
    json.dumps(out)


def test_run_probes_on_the_tiny_model():
    from deepsynapse.models.loading import load_model, load_tokenizer

    tok = load_tokenizer("tiny-random")
    torch.manual_seed(0)
    model = load_model("tiny-random", torch.float32, tok)
    items = build_probe_suite(per_skill=1)
    out = run_probes(model, tok, items, "base", batch_size=10, max_new_tokens=4)
    assert set(out["skills"]) == set(SKILLS)
    assert out["n_items"] == 10 and out["counts"] == {s: 1 for s in SKILLS}
    assert [r["id"] for r in out["records"]] == [x.id for x in items]
    assert all(0.0 <= v <= 1.0 for v in out["skills"].values())
    json.dumps(out)


# ------------------------------------------------------------------ emergence


def _binomial(rng: random.Random, p: float, n: int = 8) -> float:
    return sum(rng.random() < p for _ in range(n)) / n


def test_a_step_jump_is_flagged_once():
    rng = random.Random(3)
    det = EmergenceDetector(n_items=8)
    events = []
    for i in range(30):
        p = 0.1 if i < 15 else 0.8
        for e in det.observe(100 * i, {"probes/units": _binomial(rng, p), "probes/mean": 0.5}):
            events.append((100 * i, e))
    assert len(events) == 1
    step, event = events[0]
    assert event.kind == "emergence" and event.evidence["skill"] == "units"
    assert 1500 <= step <= 1700  # within the confirmation window after the jump
    assert event.evidence["level"] - event.evidence["baseline_mean"] >= 0.25
    assert det.flagged == [{"step": step, "skill": "units", "level": event.evidence["level"]}]


def test_noise_is_not_flagged():
    rng = random.Random(11)
    det = EmergenceDetector(n_items=8)
    flagged = []
    for i in range(40):
        metrics = {f"probes/{s}": _binomial(rng, p) for s, p in
                   (("format", 0.5), ("units", 0.3), ("arithmetic", 0.9), ("multistep", 0.05))}  # fmt: skip
        flagged += det.observe(i, metrics)
    assert flagged == []
    # Nor a single lucky evaluation: one spike, then back to the old level.
    det = EmergenceDetector(n_items=8)
    curve = [0.25] * 6 + [0.875] + [0.25] * 6
    assert [e for i, v in enumerate(curve) for e in det.observe(i, {"probes/x": v})] == []


def test_emergence_detector_round_trips_its_state():
    rng = random.Random(5)
    curve = [_binomial(rng, 0.1 if i < 12 else 0.9) for i in range(24)]
    whole = EmergenceDetector()
    expected = [
        (i, e.message) for i, v in enumerate(curve) for e in whole.observe(i, {"probes/a": v})
    ]
    assert len(expected) == 1
    first = EmergenceDetector()
    for i, v in enumerate(curve[:13]):
        first.observe(i, {"probes/a": v})
    state = json.loads(json.dumps(first.state_dict()))
    second = EmergenceDetector()
    second.load_state_dict(state)
    resumed = [
        (i, e.message)
        for i, v in enumerate(curve[13:], start=13)
        for e in second.observe(i, {"probes/a": v})
    ]
    early = [(i, m) for i, m in expected if i < 13]
    assert early + resumed == expected
    assert second.state_dict() == whole.state_dict()


def test_module_doctests():
    import doctest

    from deepsynapse.eval import probes

    assert doctest.testmod(probes).failed == 0
