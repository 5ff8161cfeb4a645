"""Reinforced critique validation: calibration and critique consistency."""

from __future__ import annotations

import pytest

from deepsynapse.formats import DEEPSYNAPSE_SCHEMA, parse_completion
from deepsynapse.rewards.critique import (
    calibration_reward,
    critique_consistency_reward,
    critique_verdict,
    make_calibration_reward,
)


def _done(answer: str, critique: str | None = None, confidence: str | None = None) -> str:
    """A completion in schema order; critique and confidence may be left out (rendered by
    hand: `format_completion` refuses to leave out a required field)."""
    fields = {"reasoning": "48 / 2 = 24 and 48 + 24 = 72", "answer": answer}
    if critique is not None:
        fields["critique"] = critique
    if confidence is not None:
        fields["confidence"] = confidence
    return "\n".join(f"<{k}>\n{v}\n</{k}>" for k, v in fields.items())


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
            -1.0,  # no confidence: required by the schema, so the worst score
            -0.25,  # malformed but the confidence and the right answer are readable
            -1.0,  # truncated before any confidence
            -1.0,  # confidence out of [0, 1] is not a confidence
        ]
    )
    assert calibration_reward.name == "calibration"


def test_confidently_wrong_extra_penalty() -> None:
    strict = make_calibration_reward(confident_wrong_penalty=0.5, threshold=0.8)
    scores = _call(strict)
    assert scores[2] == pytest.approx(-1.5)  # -(1 - 0)^2 - 0.5 * 1
    assert scores[3] == pytest.approx(-0.01)  # humble wrong answers are not punished more
    assert scores[0] == pytest.approx(-0.01)
    assert scores[4] == pytest.approx(-1.5)  # no confidence: as bad as certain and wrong
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
        -1.0,  # no critique: required by the schema, so no better than a wrong verdict
        -1.0,  # malformed: no critique field
        -1.0,  # truncated
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


# ------------------------------------------- required fields: omitting a claim never pays


def test_deepsynapse_omitting_the_confidence_never_pays() -> None:
    """Under the deepsynapse schema a missing confidence scores the worst calibration value:
    never more than a stated one (fusion reads None as 0, which beat every Brier score)."""
    texts = [
        _done("72", "The answer is correct.", "0.9"),  # right, calibrated
        _done("70", "I am not sure.", "0.5"),  # wrong, hedged at 0.5
        _done("72", "The answer is correct."),  # right, no confidence
        _done("70"),  # wrong, no claims at all
        "<reasoning>\n48 / 2 = 24, so",  # truncated
    ]
    for reward, worst in ((calibration_reward, -1.0), (make_calibration_reward(0.5), -1.5)):
        scores = _call(reward, texts, ["72"] * len(texts))
        calibrated, hedged_wrong = scores[0], scores[1]
        for omitted in scores[2:]:
            assert omitted is not None
            assert omitted < calibrated
            assert omitted <= hedged_wrong
            assert omitted == pytest.approx(worst)  # as bad as confidently wrong
    # The same through the trainer's columns (a schema object and the parsed completions).
    parsed = [parse_completion(t, DEEPSYNAPSE_SCHEMA) for t in texts]
    given = calibration_reward(
        ["q"] * len(texts), texts, answer=["72"] * len(texts), schema=DEEPSYNAPSE_SCHEMA,
        parsed=parsed,
    )  # fmt: skip
    assert given == _call(calibration_reward, texts, ["72"] * len(texts))


def test_deepsynapse_omitting_the_critique_never_pays() -> None:
    texts = [
        _done("72", "Checked: 48 + 24 = 72, the answer is correct.", "0.9"),  # agrees
        _done("72", "Let me look again.", "0.9"),  # no verdict
        _done("72", "I made a mistake.", "0.9"),  # contradicts the truth
        _done("72", None, "0.9"),  # no critique
        _done("72"),
    ]
    scores = _call(critique_consistency_reward, texts, ["72"] * len(texts))
    assert scores[:3] == [1.0, 0.0, -1.0]
    assert scores[3:] == [-1.0, -1.0]  # omitted: no better than a wrong verdict


def test_fused_reward_prefers_a_stated_confidence() -> None:
    """The defect end to end: with fusion reading None as 0, omission used to win."""
    from deepsynapse.rewards.fusion import RewardFusion

    texts = [_done("72", "The answer is correct.", "0.9"), _done("72", "The answer is correct.")]
    scores = {"calibration": _call(calibration_reward, texts, ["72", "72"])}
    total = RewardFusion("none").fuse(scores, {"calibration": 1.0}, group_size=2).total
    assert float(total[0]) > float(total[1])


def test_base_schema_claims_stay_not_applicable() -> None:
    """The base schema has no critique or confidence: those components score None there."""
    texts = ["<reasoning>\n6 * 7\n</reasoning>\n<answer>\n42\n</answer>", "garbage"]
    for schema in ("base", None):
        columns = {} if schema is None else {"schema": schema}
        for reward in (calibration_reward, critique_consistency_reward):
            assert reward(["q", "q"], texts, answer=["42", "42"], **columns) == [None, None]


def test_module_doctests() -> None:
    import doctest

    from deepsynapse.rewards import critique

    assert doctest.testmod(critique).failed == 0
