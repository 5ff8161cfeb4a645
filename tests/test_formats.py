"""Tests for the strict XML answer format."""

from __future__ import annotations

import random
import time

import pytest

from deepsynapse.formats import (
    BASE_SCHEMA,
    DEEPSYNAPSE_SCHEMA,
    SCHEMAS,
    ParsedCompletion,
    XMLSchema,
    format_completion,
    get_schema,
    parse_completion,
    stop_strings,
    system_prompt,
)

GOOD = "<reasoning>\n48 / 2 = 24, 48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>"


def test_valid_completion() -> None:
    parsed = parse_completion(GOOD)
    assert parsed == ParsedCompletion(
        valid=True, fields={"reasoning": "48 / 2 = 24, 48 + 24 = 72", "answer": "72"}, errors=[]
    )
    assert parsed.answer == "72"
    assert parsed.confidence is None


@pytest.mark.parametrize(
    "text",
    [
        "<reasoning>a</reasoning><answer>5</answer>",
        "  \n\t<reasoning>  a  </reasoning>\n\n   <answer> 5 </answer>\n\n",
        "<reasoning>\r\nx\r\n</reasoning>\r\n<answer>\r\n$5.00\r\n</answer>\r\n",
        "<reasoning>3 < 5 and 5 > 3, x<y, a </ b</reasoning><answer>5</answer>",
    ],
)
def test_whitespace_and_harmless_angle_brackets(text: str) -> None:
    parsed = parse_completion(text)
    assert parsed.valid, parsed.errors
    assert parsed.fields["answer"] in ("5", "$5.00")


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        ("<reasoning>a</reasoning>", ["missing:answer"]),
        ("<answer>5</answer>", ["missing:reasoning"]),
        (
            "<reasoning>a</reasoning><reasoning>b</reasoning><answer>5</answer>",
            ["duplicate:reasoning"],
        ),
        ("<reasoning>a</reasoning><answer>5", ["unclosed:answer"]),
        ("<reasoning>a<answer>5</answer>", ["unclosed:reasoning"]),
        ("<answer>5</answer><reasoning>a</reasoning>", ["order"]),
        ("Sure! <reasoning>a</reasoning><answer>5</answer>", ["text_outside"]),
        ("<reasoning>a</reasoning> so <answer>5</answer>", ["text_outside"]),
        ("<reasoning>a</reasoning><answer>5</answer> Done.", ["text_outside"]),
        ("<reasoning>a</reasoning><answer>5</answer></answer>", ["text_outside"]),
        ("<reasoning>a <b>b</b></reasoning><answer>5</answer>", ["nested_tag"]),
        (
            "<reasoning>a</reasoning><answer><answer>5</answer></answer>",
            ["nested_tag", "text_outside"],  # the first </answer> closes the field
        ),
        ("<think></think><reasoning>a</reasoning><answer>5</answer>", ["unknown_tag:think"]),
        ("<reasoning> </reasoning><answer>5</answer>", ["empty:reasoning"]),
        ("<reasoning>a</reasoning><answer>\n</answer>", ["empty:answer"]),
        ("<reasoning>a</reasoning><answer>five</answer>", ["answer_not_numeric"]),
        (
            "<reasoning>a</reasoning><answer>5</answer><critique>ok</critique>",
            ["unknown_tag:critique", "text_outside"],
        ),
        ("", ["missing:reasoning", "missing:answer"]),
        ("just 42", ["text_outside", "missing:reasoning", "missing:answer"]),
    ],
)
def test_error_categories(text: str, errors: list[str]) -> None:
    parsed = parse_completion(text)
    assert not parsed.valid
    assert parsed.errors == errors


def test_errors_are_reported_once_each() -> None:
    text = "x <reasoning>a</reasoning> y <answer>5</answer> z <b>" * 3
    parsed = parse_completion(text)
    assert len(parsed.errors) == len(set(parsed.errors))
    assert set(parsed.errors) == {
        "text_outside",
        "duplicate:reasoning",
        "duplicate:answer",
        "unknown_tag:b",
    }


def test_best_effort_fields_when_invalid() -> None:
    parsed = parse_completion("<reasoning>half of 48 is 24</reasoning>\n<answer>\n72 clips")
    assert parsed.errors == ["unclosed:answer"]
    assert parsed.answer == "72 clips"
    duplicate = parse_completion("<reasoning>r</reasoning><answer>1</answer><answer>2</answer>")
    assert duplicate.answer == "1"
    unclosed_reasoning = parse_completion("<reasoning>thinking <answer>7</answer>")
    assert unclosed_reasoning.fields == {"reasoning": "thinking", "answer": "7"}


def test_deepsynapse_schema_full_completion() -> None:
    full = (
        "<reasoning>6*7</reasoning>\n<answer>42</answer>\n"
        "<critique>6*7 is 42, checked.</critique>\n<confidence>0.9</confidence>"
    )
    parsed = parse_completion(full, DEEPSYNAPSE_SCHEMA)
    assert parsed.valid, parsed.errors
    assert parsed.confidence == pytest.approx(0.9)
    assert parsed.fields["critique"] == "6*7 is 42, checked."


def test_deepsynapse_schema_requires_critique_and_confidence() -> None:
    """Omitting the claims is not format-valid (they were optional, so omission paid)."""
    minimal = parse_completion("<reasoning>6*7</reasoning><answer>42</answer>", "deepsynapse")
    assert not minimal.valid and minimal.confidence is None
    assert minimal.errors == ["missing:critique", "missing:confidence"]
    only_confidence = "<reasoning>r</reasoning><answer>1</answer><confidence>1</confidence>"
    parsed = parse_completion(only_confidence, "deepsynapse")
    assert parsed.confidence == 1.0 and parsed.errors == ["missing:critique"]
    no_confidence = "<reasoning>r</reasoning><answer>1</answer><critique>ok</critique>"
    assert parse_completion(no_confidence, "deepsynapse").errors == ["missing:confidence"]
    empty = "<reasoning>r</reasoning><answer>1</answer><critique> </critique><confidence>1"
    assert "empty:critique" in parse_completion(empty + "</confidence>", "deepsynapse").errors
    # The base schema is unchanged: reasoning and answer are all it needs.
    assert parse_completion("<reasoning>6*7</reasoning><answer>42</answer>").valid


_FULL = "<reasoning>r</reasoning><answer>1</answer><critique>c</critique>"


@pytest.mark.parametrize(
    ("completion", "errors"),
    [
        (
            "<reasoning>r</reasoning><answer>1</answer><confidence>0.5</confidence>"
            "<critique>c</critique>",
            ["order"],
        ),
        (_FULL + "<confidence>1.5</confidence>", None),
        (_FULL + "<confidence>high</confidence>", None),
        (_FULL + "<confidence>nan</confidence>", None),
        (_FULL + "<confidence>-0.1</confidence>", None),
        (_FULL + "<confidence></confidence>", ["empty:confidence", "confidence_not_in_0_1"]),
        (
            _FULL + "<critique>b</critique><confidence>1</confidence>",
            ["duplicate:critique"],
        ),
    ],
)
def test_deepsynapse_schema_errors(completion: str, errors: list[str] | None) -> None:
    parsed = parse_completion(completion, DEEPSYNAPSE_SCHEMA)
    assert not parsed.valid
    assert parsed.errors == (errors or ["confidence_not_in_0_1"])


def test_format_completion_round_trip() -> None:
    fields = {"reasoning": "Step 1.\nStep 2.", "answer": "42"}
    text = format_completion(fields)
    assert text == "<reasoning>\nStep 1.\nStep 2.\n</reasoning>\n<answer>\n42\n</answer>"
    parsed = parse_completion(text)
    assert parsed.valid and parsed.fields == fields

    full = {"reasoning": "r", "answer": "3", "critique": "ok", "confidence": "0.75"}
    out = format_completion(full, "deepsynapse")
    parsed = parse_completion(out, "deepsynapse")
    assert parsed.valid and parsed.fields == full
    with pytest.raises(ValueError, match="critique"):
        format_completion({"reasoning": "r", "answer": "3", "confidence": "1"}, "deepsynapse")


def test_format_completion_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="answer"):
        format_completion({"reasoning": "r"})
    with pytest.raises(ValueError, match="critique"):
        format_completion({"reasoning": "r", "answer": "1", "critique": "c"})


def test_schemas_and_prompts() -> None:
    assert SCHEMAS == {"base": BASE_SCHEMA, "deepsynapse": DEEPSYNAPSE_SCHEMA}
    assert get_schema("deepsynapse") is DEEPSYNAPSE_SCHEMA
    assert BASE_SCHEMA.required == ("reasoning", "answer")
    assert DEEPSYNAPSE_SCHEMA.required == ("reasoning", "answer", "critique", "confidence")
    with pytest.raises(ValueError, match="base, deepsynapse"):
        get_schema("nope")
    with pytest.raises(ValueError):
        XMLSchema("bad", ("a", "a"))
    with pytest.raises(ValueError):
        XMLSchema("bad", ("a",), frozenset({"b"}))

    base_prompt = system_prompt()
    assert "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>" in base_prompt
    assert "<critique>" not in base_prompt
    deep = system_prompt(DEEPSYNAPSE_SCHEMA)
    for tag in ("<reasoning>", "</answer>", "<critique>", "</confidence>"):
        assert tag in deep
    assert "between 0 and 1" in deep
    assert stop_strings(BASE_SCHEMA) == ["</answer>"]
    assert stop_strings("deepsynapse") == ["</confidence>"]


def test_megabyte_garbage_parses_quickly_without_raising() -> None:
    rng = random.Random(0)
    pieces = [
        "<reasoning>",
        "</reasoning>",
        "<answer>",
        "</answer>",
        "<confidence>",
        "<x>",
        "</",
        "<",
        ">",
        "\x00",
        "\u2212",
        "\U0001f600",
        "42",
        " ",
        "\n",
        "abc",
        "<<",
        "1/0",
    ]
    garbage = "".join(rng.choices(pieces, k=250_000))
    random_unicode = "".join(chr(rng.randrange(0x110000)) for _ in range(20_000)) * 50
    assert len(garbage) > 1_000_000 and len(random_unicode) >= 1_000_000
    start = time.perf_counter()
    for text in (
        garbage,
        random_unicode,
        "<" * 1_000_000,
        "<a" * 500_000,
        "<answer>" + "9" * 10**6,
    ):
        for schema in (BASE_SCHEMA, DEEPSYNAPSE_SCHEMA):
            parsed = parse_completion(text, schema)
            assert isinstance(parsed.valid, bool)
    assert time.perf_counter() - start < 5.0  # ten megabyte-sized parses


def test_single_megabyte_parse_under_one_second() -> None:
    rng = random.Random(1)
    text = "".join(rng.choices(["<answer>", "</answer>", "<b>", "x", " ", "7"], k=300_000))
    start = time.perf_counter()
    parse_completion(text)
    assert time.perf_counter() - start < 1.0


def test_module_doctests() -> None:
    import doctest

    from deepsynapse import formats

    assert doctest.testmod(formats).failed == 0
