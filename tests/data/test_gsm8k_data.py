"""Tests for GSM8K loading: the real shared copy and malformed fixtures."""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import pytest

from deepsynapse.data import gsm8k as gsm8k_module
from deepsynapse.data.gsm8k import load_gsm8k, load_gsm8k_jsonl, resolve_gsm8k_source
from deepsynapse.data.problems import DataError, Problem, strip_calculator_annotations


def _shared_train() -> Path:
    source = resolve_gsm8k_source("gsm8k", "train")
    if source.kind != "jsonl":
        pytest.skip("local GSM8K copy (shared/data/gsm8k/train.jsonl) not found")
    return source.path


def _row(question: str = "Q?", answer: str = "Work 1+1 = <<1+1=2>>2.\n#### 2") -> str:
    return json.dumps({"question": question, "answer": answer})


def _write(tmp_path: Path, lines: list[str | bytes], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    parts = [line if isinstance(line, bytes) else line.encode() for line in lines]
    path.write_bytes(b"\n".join(parts) + b"\n")
    return path


# ----------------------------------------------------------------------------- real data


def test_real_train_split_loads() -> None:
    path = _shared_train()
    problems, skipped = load_gsm8k("gsm8k", "train")
    assert path.name == "train.jsonl"
    assert len(problems) == 7473
    assert skipped == 0
    first = problems[0]
    assert first.answer == "72"
    assert first.id == "gsm8k-train-1"
    assert first.source == "gsm8k"
    assert first.question.startswith("Natalia sold clips to 48 of her friends")
    assert first.solution == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert first.difficulty == 2
    assert all("<<" not in p.solution and "####" not in p.solution for p in problems)
    assert all(p.difficulty == len(p.solution.splitlines()) for p in problems)
    assert len({p.id for p in problems}) == len(problems)


def test_real_data_via_path_and_directory_agree() -> None:
    path = _shared_train()
    by_file, _ = load_gsm8k(str(path), limit=5)
    by_dir, _ = load_gsm8k(str(path.parent), "train", limit=5)
    assert (
        [p.answer for p in by_file]
        == [p.answer for p in by_dir]
        == [
            "72",
            "10",
            "5",
            "42",
            "624",
        ]
    )


def test_env_var_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, [_row()], name="train.jsonl")
    monkeypatch.setenv("DEEPSYNAPSE_GSM8K_DIR", str(tmp_path))
    source = resolve_gsm8k_source("gsm8k", "train")
    assert source.kind == "jsonl"
    assert source.path == tmp_path / "train.jsonl"
    problems, _ = load_gsm8k("gsm8k")
    assert [p.answer for p in problems] == ["2"]


def test_a_file_is_parsed_once_until_it_changes(tmp_path: Path) -> None:
    """load_gsm8k keeps a file's problems for the process; an edit is read again, and
    each caller's list is its own."""
    path = _write(tmp_path, [_row("A?"), _row("B?")])
    first, _ = load_gsm8k(str(path))
    again, _ = load_gsm8k(str(path))
    assert [p.question for p in again] == ["A?", "B?"]
    assert again is not first and again[0] is first[0]  # the same parse, a new list
    first.pop()
    assert len(load_gsm8k(str(path))[0]) == 2
    _write(tmp_path, [_row("C?")] * 3)  # another size and mtime
    assert [p.question for p in load_gsm8k(str(path))[0]] == ["C?"] * 3
    path.unlink()
    with pytest.raises(DataError, match="data.jsonl"):
        load_gsm8k(str(path))


def test_hub_ids_resolve_to_hub() -> None:
    source = resolve_gsm8k_source("openai/gsm8k", "test")
    assert (source.kind, source.location, source.split) == ("hub", "openai/gsm8k", "test")


def test_hub_failure_is_a_clear_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline_load(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    fake = types.ModuleType("datasets")
    fake.load_dataset = offline_load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError) as info:
        load_gsm8k("someone/missing-dataset", "train")
    message = str(info.value)
    assert "someone/missing-dataset" in message
    assert "offline" in message
    assert "local JSONL" in message


def test_hub_rows_become_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"question": "Q1?", "answer": "x\n#### 3"}, {"question": "Q2?", "answer": "#### 4"}]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split: rows  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    problems, skipped = load_gsm8k("openai/gsm8k", "test")
    assert [(p.id, p.answer) for p in problems] == [("gsm8k-test-1", "3"), ("gsm8k-test-2", "4")]
    assert skipped == 0


# ------------------------------------------------------------------------ malformed input


@pytest.mark.parametrize(
    ("line3", "fragment"),
    [
        ('{"question": "Q?", "answer": ', "invalid JSON"),
        ('["not", "an", "object"]', "not an object"),
        ('{"question": "Q?"}', 'missing field "answer"'),
        ('{"question": 5, "answer": "#### 5"}', 'field "question" is int, not a string'),
        ('{"question": "Q?", "answer": "The answer is 5."}', "####"),
        ('{"question": "Q?", "answer": "#### none"}', "no number"),
        (b'{"question": "Caf\xe9?", "answer": "#### 5"}', "invalid UTF-8"),
    ],
)
def test_malformed_row_names_file_and_line(
    tmp_path: Path, line3: str | bytes, fragment: str
) -> None:
    path = _write(tmp_path, [_row(), _row(), line3, _row()], name="broken.jsonl")
    with pytest.raises(DataError) as info:
        load_gsm8k_jsonl(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert "broken.jsonl" in message
    assert fragment in message
    assert "expected" in message
    assert info.value.line == 3


def test_skip_malformed_counts_skips(tmp_path: Path) -> None:
    lines: list[str | bytes] = [
        _row("A?"),
        "{oops",
        _row("B?"),
        b"\xff\xfe",
        '{"answer": "#### 1"}',
    ]
    path = _write(tmp_path, [*lines, _row("C?")])
    problems, skipped = load_gsm8k_jsonl(path, skip_malformed=True)
    assert [p.question for p in problems] == ["A?", "B?", "C?"]
    assert [p.id for p in problems] == ["gsm8k-data-1", "gsm8k-data-3", "gsm8k-data-6"]
    assert skipped == 3


def test_blank_lines_are_ignored_and_keep_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, ["", _row("A?"), "   ", "", "{bad json"], name="blanks.jsonl")
    with pytest.raises(DataError, match=r"blanks\.jsonl:5: "):
        load_gsm8k_jsonl(path)
    good = _write(tmp_path, ["", _row("A?"), "  \t", _row("B?"), ""], name="ok.jsonl")
    problems, skipped = load_gsm8k_jsonl(good)
    assert [p.id for p in problems] == ["gsm8k-ok-2", "gsm8k-ok-4"]
    assert skipped == 0


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty.jsonl"):
        load_gsm8k_jsonl(path)


def test_all_rows_skipped_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, ["{bad", "[1]"])
    with pytest.raises(DataError, match="no usable rows"):
        load_gsm8k_jsonl(path, skip_malformed=True)


def test_limit_stops_early(tmp_path: Path) -> None:
    path = _write(tmp_path, [_row("A?"), _row("B?"), "{never read"])
    problems, skipped = load_gsm8k_jsonl(path, limit=2)
    assert [p.question for p in problems] == ["A?", "B?"]
    assert skipped == 0


def test_missing_paths_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_gsm8k(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="validation.jsonl"):
        load_gsm8k(str(tmp_path), "validation")


def test_extra_columns_and_problem_shape(tmp_path: Path) -> None:
    row = {"question": " Q? ", "answer": "a <<1+1=2>>2\n\nb\n#### 2", "level": 3}
    path = _write(tmp_path, [json.dumps(row)])
    (problem,), _ = load_gsm8k_jsonl(path)
    assert problem == Problem(
        id="gsm8k-data-1",
        question="Q?",
        answer="2",
        solution="a 2\nb",
        difficulty=2,
        source="gsm8k",
        columns={"level": 3},
    )


def test_strip_calculator_annotations() -> None:
    assert strip_calculator_annotations("$<<12/60=0.2>>0.2 and <<2*3=6>>6") == "$0.2 and 6"
    assert strip_calculator_annotations("a << b") == "a << b"
    assert strip_calculator_annotations("") == ""


def test_data_error_pickles() -> None:
    error = DataError("bad row", path="f.jsonl", line=3, expected="JSON")
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error) == "f.jsonl:3: bad row; expected JSON"
    assert clone.line == 3


def test_module_has_no_import_side_effects() -> None:
    assert "datasets" not in vars(gsm8k_module)


def test_svamp_ships_with_the_package_as_an_evaluation_only_set() -> None:
    """The outside set where the embedded model can score: all 1,000 problems, whole-number
    answers, its own ids (never paired with GSM8K's), no text shared with our held-out set,
    and no train split, so no recipe can train on it."""
    from deepsynapse.data.synthetic import heldout_problems

    problems, skipped = load_gsm8k("SVAMP", "test")
    assert skipped == 0 and len(problems) == 1000
    assert problems[0].id == "svamp-test-1" and problems[0].source == "svamp"
    assert problems[0].columns["id"] == "chal-1" and problems[0].answer == "51"
    assert all(p.answer.lstrip("-").isdigit() for p in problems)
    assert len({p.question for p in problems}) > 990  # distinct problems, not a template
    ours = {p.question for p in heldout_problems(384)}
    assert not ours & {p.question for p in problems}
    assert [p.id for p in load_gsm8k("svamp", "test", limit=3)[0]] == [
        f"svamp-test-{i}" for i in (1, 2, 3)
    ]
    with pytest.raises(DataError, match="no 'train' split: never trained on"):
        load_gsm8k("svamp", "train")
