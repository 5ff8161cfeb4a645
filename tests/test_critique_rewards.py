"""Reinforced critique validation: calibration and critique consistency."""

from __future__ import annotations

import pytest

from deepsynapse.formats import DEEPSYNAPSE_SCHEMA, format_completion, parse_completion
from deepsynapse.rewards.critique import (
    calibration_reward,
    critique_consistency_reward,
    critique_verdict,
    make_calibration_reward,
)


def _done(answer: str, critique: str | None = None, confidence: str | None = None) -> str:
    fields = {"reasoning": "48 / 2 = 24 and 48 + 24 = 72", "answer": answer}
    if critique is not None:
        fields["critique"] = critique
    if confidence is not None:
        fields["confidence"] = confidence
    return format_completion(fields, DEEPSYNAPSE_SCHEMA)


RIGHT_CONFIDENT = _done("72", "Checked: 24 + 48 = 72, the answer is correct.", "0.9")
RIGHT_UNSURE = _done("72", "I am not sure this is right.", "0.3")
WRONG_CONFIDENT = _done("70", "Verified, the answer is correct.", "1")
WRONG_HUMBLE = _done("70", "I made a mistake in the addition.", "0.1")
NO_CLAIMS = _done("72")
MALFORMED = "<answer>72</answer> <confidence>0.5"  # unclosed, text outside: still scored
TRUNCATED = "<reasoning>\n48 / 2 = 24, so"
BAD_CONFIDENCE = _done("72", "fine", "1.5")

TEXTS = [
    RIGHT_CONFIDENT,
    RIGHT_UNSURE,
    WRONG_CONFIDENT,
    WRONG_HUMBLE,
    NO_CLAIMS,
    MALFORMED,
    TRUNCATED,
    BAD_CONFIDENCE,
]
GOLD = ["72"] * len(TEXTS)


def _call(component, texts=TEXTS, gold=GOLD, **columns):
    return component(["q"] * len(texts), texts, answer=gold, schema="deepsynapse", **columns)


def test_calibration_hand_written() -> None:
    assert _call(calibration_reward) == pytest.approx(
        [
            -0.01,  # right, 0.9: (0.9 - 1)^2
            -0.49,  # right but unsure: (0.3 - 1)^2
            -1.0,  # confidently wrong: the worst score
            -0.01,  # wrong and says so: (0.1 - 0)^2
            None,  # no confidence: not applicable
            -0.25,  # malformed but the confidence and the right answer are readable
            None,  # truncated before any confidence
            None,  # confidence out of [0, 1] is not a confidence
        ]
    )
    assert calibration_reward.name == "calibration"


def test_confidently_wrong_extra_penalty() -> None:
    strict = make_calibration_reward(confident_wrong_penalty=0.5, threshold=0.8)
    scores = _call(strict)
    assert scores[2] == pytest.approx(-1.5)  # -(1 - 0)^2 - 0.5 * 1
    assert scores[3] == pytest.approx(-0.01)  # humble wrong answers are not punished more
    assert scores[0] == pytest.approx(-0.01)
    with pytest.raises(ValueError):
        make_calibration_reward(confident_wrong_penalty=-1)


def test_calibration_uses_given_parsed_column() -> None:
    parsed = [parse_completion(t, DEEPSYNAPSE_SCHEMA) for t in TEXTS]
    assert _call(calibration_reward, parsed=parsed) == _call(calibration_reward)


def test_critique_consistency_hand_written() -> None:
    assert _call(critique_consistency_reward) == [
        1.0,  # right and says correct
        0.0,  # right, but "not sure this is right" hedges: no verdict
        -1.0,  # confidently wrong: says verified/correct
        1.0,  # wrong and admits the mistake
        None,  # no critique
        None,  # malformed: no critique field
        None,  # truncated
        0.0,  # "fine": no verdict in the lexicon
    ]
    assert critique_consistency_reward.name == "critique_consistency"


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("The answer is not correct.", False),
        ("The answer is correct.", True),
        ("Everything checks out and is consistent with the question.", True),
        ("There are no errors.", True),
        ("Nothing is wrong here.", True),
        ("The answer is incorrect.", False),
        ("This isn't right: 48 + 24 is 72, not 70.", False),
        ("It does not add up.", False),
        ("I miscalculated the total; it should be 72.", False),
        ("First I thought there was a mistake, but the answer is correct.", True),
        ("It looked correct, but I forgot the tax.", False),
        ("Let me reread the question.", None),
        ("I am not sure this is right.", None),
        ("It might be wrong.", None),
        ("I was not sure at first. Now I checked: the answer is correct.", True),
        ("", None),
    ],
)
def test_verdict_lexicon(text: str, verdict: bool | None) -> None:
    assert critique_verdict(text) is verdict
