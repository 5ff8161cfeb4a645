"""The problem record shared by every data source, and the error raised for bad data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataError", "Problem", "solution_lines", "strip_calculator_annotations"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One math word problem, whatever its source.

    Frozen so that a problem can be shared between rollout workers and reward functions
    without anyone mutating the gold answer. ``columns`` carries source-specific extras
    (e.g. the intermediates of synthetic problems) so the core fields stay uniform.
    """

    id: str
    question: str
    answer: str
    solution: str
    difficulty: int
    source: str
    columns: dict[str, Any] = field(default_factory=dict)


class DataError(ValueError):
    """A data file or dataset that cannot be used, with a message that says where and why.

    The message has the form ``"{path}:{line}: {problem}; expected {expected}"`` so that an
    editor or a human can jump straight to the offending row.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        expected: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        self.expected = expected
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        tail = f"; expected {expected}" if expected else ""
        super().__init__(f"{where}{problem}{tail}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments are not restored by the default exception pickling,
        # and errors may cross process boundaries (dataloader workers).
        return (_rebuild_data_error, (self.problem, self.path, self.line, self.expected))


def _rebuild_data_error(
    problem: str, path: str | None, line: int | None, expected: str | None
) -> DataError:
    return DataError(problem, path=path, line=line, expected=expected)


def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K calculator annotations such as ``<<48/2=24>>``.

    They are an artefact of how GSM8K was written, not reasoning a model should imitate.
    An unterminated ``<<`` is left alone. Linear time (``str.find`` scans only).

    >>> strip_calculator_annotations("48/2 = <<48/2=24>>24 clips")
    '48/2 = 24 clips'
    """
    parts: list[str] = []
    pos = 0
    for start, end in annotation_spans(text):
        parts.append(text[pos:start])
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def annotation_spans(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each complete ``<<...>>`` annotation, in order; linear time."""
    pos = 0
    while True:
        start = text.find("<<", pos)
        if start < 0:
            return
        end = text.find(">>", start + 2)
        if end < 0:
            return
        yield start, end + 2
        pos = end + 2


def solution_lines(reasoning: str) -> list[str]:
    """Non-empty, stripped lines of a worked solution without calculator annotations.

    One line per reasoning step is what makes ``Problem.difficulty`` meaningful.
    """
    cleaned = strip_calculator_annotations(reasoning)
    return [line.strip() for line in cleaned.splitlines() if line.strip()]
