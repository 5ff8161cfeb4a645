"""generate and chat: parsed, checked answers printed; a chat loop driven by a fake stdin."""

from __future__ import annotations

import io
import json

import pytest
import torch

from deepsynapse.cli import main
from deepsynapse.formats import parse_completion
from deepsynapse.interactive import Completion, chat, complete, render
from deepsynapse.models.loading import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("tiny-random")
    return load_model("tiny-random", torch.float32, tokenizer), tokenizer


def made(text: str, schema: str = "deepsynapse") -> Completion:
    return Completion("q", "p", text, parse_completion(text, schema), schema, 9, False, 0.1)


def test_render_shows_every_field_and_the_verdict():
    good = made(
        "<reasoning>\n6 * 7 = 42\n</reasoning>\n<answer>\n1,042.0\n</answer>\n"
        "<critique>\nchecked\n</critique>\n<confidence>\n0.8\n</confidence>"
    )
    text = render(good)
    assert good.valid and good.answer == "1042" and good.confidence == 0.8
    assert "reasoning: 6 * 7 = 42" in text and "answer: 1,042.0  (= 1042)" in text
    assert "critique: checked" in text and "confidence: 0.8" in text
    assert "format: valid" in text
    bad = made("Sure! <answer>lots</answer><confidence>2</confidence>")
    text = render(bad)
    assert "reasoning: (missing)" in text and "answer: lots  (not a number)" in text
    assert "confidence: 2  (not in [0, 1])" in text
    assert "format: INVALID (text_outside, missing:reasoning" in text
    assert "answer_not_numeric" in text and "confidence_not_in_0_1" in text


def test_complete_runs_the_model_with_the_schema_prompt(tiny):
    model, tokenizer = tiny
    c = complete(model, tokenizer, "What is 2 + 3?", "deepsynapse", max_new_tokens=5)
    assert "<confidence>" in c.prompt and "What is 2 + 3?" in c.prompt
    assert c.tokens == 5 and c.truncated and c.schema == "deepsynapse"
    sampled = complete(
        model, tokenizer, "What is 2 + 3?", max_new_tokens=5, temperature=1.0, seed=1
    )
    assert sampled.tokens == 5
    assert json.loads(json.dumps(c.to_dict()))["schema"] == "deepsynapse"


def test_chat_loop_answers_each_line_until_exit(tiny):
    model, tokenizer = tiny
    stdin = io.StringIO("What is 1 + 1?\n\n  \nHow many legs do 2 cats have?\nexit\nnever read\n")
    stdout = io.StringIO()
    assert chat(model, tokenizer, "base", stdin=stdin, stdout=stdout, max_new_tokens=4) == 2
    out = stdout.getvalue()
    assert out.count("question> ") == 5  # two answered, two blank lines, then exit
    assert out.count("format: INVALID") == 2
    assert stdin.readline() == "never read\n"


def test_chat_loop_ends_at_eof(tiny):
    model, tokenizer = tiny
    stdout = io.StringIO()
    assert (
        chat(model, tokenizer, stdin=io.StringIO("What is 3 + 3?"), stdout=stdout, max_new_tokens=3)
        == 1
    )
    assert stdout.getvalue().endswith("question> \n")


def test_cli_generate_and_chat(monkeypatch, capsys):
    args = ["--dtype", "fp32", "--max-new-tokens", "4"]
    assert main(["generate", "tiny-random", "What is 5 + 5?", "--json", *args]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["valid"] is False and record["tokens"] == 4 and record["schema"] == "base"
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 9 - 4?\nquit\n"))
    assert main(["chat", "tiny-random", "--schema", "deepsynapse", *args]) == 0
    out = capsys.readouterr().out
    assert "schema 'deepsynapse'" in out and "reasoning: (missing)" in out
    assert out.count("format: ") == 1


def test_cli_generate_bad_input_fails_cleanly(capsys, tmp_path):
    assert main(["generate", "tiny-random", "q", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: got 0" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing-run"), "q"]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and "Traceback" not in err
