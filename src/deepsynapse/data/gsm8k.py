"""Loading GSM8K from local JSONL files or from the Hugging Face hub.

Training machines are often offline, so the local copy is preferred and every failure
says precisely which file, which line and what was expected.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deepsynapse.caching import Stamp, files_stamp
from deepsynapse.data.answers import gsm8k_gold_answer
from deepsynapse.data.problems import DataError, Problem, annotation_spans, solution_lines

__all__ = [
    "DEFAULT_HUB_ID",
    "GSM8K_DIR_ENV",
    "GSM8KSource",
    "PACKAGED_SETS",
    "calculator_annotations",
    "load_gsm8k",
    "load_gsm8k_jsonl",
    "resolve_gsm8k_source",
]

logger = logging.getLogger(__name__)

GSM8K_DIR_ENV = "DEEPSYNAPSE_GSM8K_DIR"
DEFAULT_HUB_ID = "openai/gsm8k"
_LOCAL_ALIAS = "gsm8k"
_SHARED_SUBDIR = Path("shared", "data", "gsm8k")
# Outside evaluation sets shipped with the package, in GSM8K's format (test split only):
# transfer measured where the embedded model can score (data/outside/<name>/README.md)
PACKAGED_SETS = {"svamp": Path(__file__).parent / "outside" / "svamp"}
_ROW_EXPECTED = 'a JSON object with string fields "question" and "answer"'
_OFFLINE_HINTS = (
    "offline",
    "connection",
    "couldn't reach",
    "could not reach",
    "max retries",
    "name resolution",
    "network is unreachable",
    "timed out",
    "no route to host",
)


@dataclass(frozen=True, slots=True)
class GSM8KSource:
    """Where a GSM8K split will be read from: a local JSONL file or a hub dataset id."""

    kind: Literal["jsonl", "hub"]
    location: str
    split: str

    @property
    def path(self) -> Path:
        """The local file; only meaningful for ``kind == "jsonl"``."""
        if self.kind != "jsonl":
            raise ValueError(f"{self.location!r} is a hub dataset, not a local file")
        return Path(self.location)


class _BadRow(Exception):
    """Internal: a row is malformed; carries the what/expected halves of a DataError."""

    def __init__(self, problem: str, expected: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.expected = expected


def calculator_annotations(text: str) -> list[tuple[str, str]]:
    """The ``<<expression=result>>`` annotations of a GSM8K solution, in order.

    They are the exact arithmetic of each step, which distractors reuse (a wrong operation,
    an intermediate result); annotations without ``=`` or unterminated ones are skipped.

    >>> calculator_annotations("48/2 = <<48/2=24>>24 clips, <<48+24=72>>72 in all")
    [('48/2', '24'), ('48+24', '72')]
    """
    found: list[tuple[str, str]] = []
    for start, end in annotation_spans(text):
        expression, sep, result = text[start + 2 : end - 2].rpartition("=")
        if sep and expression.strip() and result.strip():
            found.append((expression.strip(), result.strip()))
    return found


def _problem_from_row(
    row: Any, problem_id: str, calculations: bool = False, source: str = "gsm8k"
) -> Problem:
    """Build a Problem from one decoded GSM8K row, or raise _BadRow saying why not.

    With ``calculations``, ``columns["calculations"]`` keeps the calculator annotations as
    (expression, result) pairs before they are stripped from the solution.
    """
    if not isinstance(row, Mapping):
        raise _BadRow(f"row is a JSON {type(row).__name__}, not an object", _ROW_EXPECTED)
    for key in ("question", "answer"):
        if key not in row:
            raise _BadRow(f'missing field "{key}"', _ROW_EXPECTED)
        if not isinstance(row[key], str):
            raise _BadRow(
                f'field "{key}" is {type(row[key]).__name__}, not a string', _ROW_EXPECTED
            )
    question, answer = row["question"].strip(), row["answer"]
    if not question:
        raise _BadRow('field "question" is empty', "a non-empty question")
    marker = answer.rfind("####")
    if marker < 0:
        raise _BadRow('field "answer" has no "####" line', 'a solution ending in "#### <number>"')
    try:
        gold = gsm8k_gold_answer(answer)
    except ValueError:
        raise _BadRow(
            'no number after "####" in field "answer"', 'a solution ending in "#### <number>"'
        ) from None
    lines = solution_lines(answer[:marker])
    extras = {key: value for key, value in row.items() if key not in ("question", "answer")}
    if calculations:
        extras["calculations"] = calculator_annotations(answer[:marker])
    return Problem(
        id=problem_id,
        question=question,
        answer=gold,
        solution="\n".join(lines),
        difficulty=len(lines),
        source=source,
        columns=extras,
    )


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")


def load_gsm8k_jsonl(
    path: str | Path,
    *,
    skip_malformed: bool = False,
    limit: int | None = None,
    calculations: bool = False,
    source: str = "gsm8k",
) -> tuple[list[Problem], int]:
    """Read a GSM8K JSONL file into problems; return ``(problems, skipped_rows)``.

    ``source`` names the set: each problem's ``source`` and its id ``{source}-{stem}-{line}``
    (a packaged outside set in GSM8K's format keeps ids of its own).

    The file is read as bytes and decoded line by line so that a bad byte is reported
    with its line number rather than as an opaque decode error for the whole file.
    ``limit`` caps the number of problems returned (reading stops early); ``calculations``
    keeps the calculator annotations as ``columns["calculations"]``.
    """
    _check_limit(limit)
    path = Path(path)
    problems: list[Problem] = []
    skipped = 0
    rows = 0
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(
            f"cannot open file ({exc.strerror or exc})", path=path, expected="a JSONL file"
        ) from exc
    with handle:
        if limit == 0:
            return problems, skipped
        for line_number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                rows += 1
                if skip_malformed:
                    skipped += 1
                    continue
                raise DataError(
                    f"invalid UTF-8 byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}",
                    path=path,
                    line=line_number,
                    expected="UTF-8 encoded text",
                ) from None
            if not text.strip():
                continue
            rows += 1
            try:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise _BadRow(
                        f"invalid JSON ({exc.msg} at column {exc.colno})", _ROW_EXPECTED
                    ) from None
                problems.append(
                    _problem_from_row(
                        row, f"{source}-{path.stem}-{line_number}", calculations, source
                    )
                )
            except _BadRow as bad:
                if skip_malformed:
                    skipped += 1
                    continue
                raise DataError(
                    bad.problem, path=path, line=line_number, expected=bad.expected
                ) from None
            if limit is not None and len(problems) >= limit:
                break
    if rows == 0:
        raise DataError("file has no rows", path=path, expected="one JSON object per line")
    if not problems:
        raise DataError(
            f"no usable rows ({skipped} malformed rows skipped)",
            path=path,
            expected=_ROW_EXPECTED + " on at least one line",
        )
    return problems, skipped


def _ancestors(start: Path) -> Iterable[Path]:
    yield start
    yield from start.parents


def _local_gsm8k_candidates() -> list[Path]:
    """Directories that may hold the local GSM8K copy, in search order."""
    candidates: list[Path] = []
    env = os.environ.get(GSM8K_DIR_ENV)
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(Path.cwd().parent / _SHARED_SUBDIR)
    candidates.extend(anc / _SHARED_SUBDIR for anc in _ancestors(Path(__file__).resolve().parent))
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def resolve_gsm8k_source(name: str, split: str) -> GSM8KSource:
    """Decide where ``load_gsm8k(name, split)`` reads from, without reading anything.

    ``name`` is a JSONL file, a directory holding ``{split}.jsonl``, a packaged outside set
    (``PACKAGED_SETS``: ``"svamp"``, test split only), the word ``"gsm8k"``
    (the local shared copy, found via $DEEPSYNAPSE_GSM8K_DIR, ``../shared/data/gsm8k``
    from the working directory, or ``shared/data/gsm8k`` beside any ancestor of this
    package; the hub if none has the split), or a hub dataset id such as "openai/gsm8k".
    """
    path = Path(name).expanduser()
    if path.is_file():
        return GSM8KSource("jsonl", str(path), split)
    if path.is_dir():
        candidate = path / f"{split}.jsonl"
        if candidate.is_file():
            return GSM8KSource("jsonl", str(candidate), split)
        raise DataError(
            f"directory has no {split}.jsonl", path=path, expected=f"a file {candidate}"
        )
    if name.endswith(".jsonl"):
        raise DataError("file not found", path=path, expected="an existing JSONL file")
    packaged = PACKAGED_SETS.get(name.lower())
    if packaged is not None:
        candidate = packaged / f"{split}.jsonl"
        if not candidate.is_file():
            raise DataError(
                f"{name!r} is an evaluation set with no {split!r} split: never trained on",
                path=packaged,
                expected="split 'test' (deepsynapse eval --data " + name.lower() + ")",
            )
        return GSM8KSource("jsonl", str(candidate), split)
    if name.lower() == _LOCAL_ALIAS:
        for directory in _local_gsm8k_candidates():
            candidate = directory / f"{split}.jsonl"
            if candidate.is_file():
                return GSM8KSource("jsonl", str(candidate), split)
        env = os.environ.get(GSM8K_DIR_ENV)
        if env:
            logger.warning("%s=%s has no %s.jsonl; ignoring it", GSM8K_DIR_ENV, env, split)
        return GSM8KSource("hub", DEFAULT_HUB_ID, split)
    return GSM8KSource("hub", name, split)


def _looks_offline(exc: BaseException) -> bool:
    """Whether an exception (or its causes) looks like missing network access."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        text = f"{type(current).__name__} {current}".lower()
        if any(hint in text for hint in _OFFLINE_HINTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _load_from_hub(
    source: GSM8KSource, *, skip_malformed: bool, limit: int | None, calculations: bool = False
) -> tuple[list[Problem], int]:
    label = f"{source.location}[{source.split}]"
    try:
        import datasets  # heavy import; only needed for the hub path

        dataset = datasets.load_dataset(source.location, "main", split=source.split)
    except Exception as exc:
        message = f"could not load dataset {source.location!r} split {source.split!r} ({exc})"
        if _looks_offline(exc):
            message += "; the network seems unavailable (offline?)"
        raise DataError(
            message,
            path=label,
            expected=(
                "a reachable hub dataset, or a local JSONL path "
                "(e.g. load_gsm8k('path/to/train.jsonl') or a directory with train.jsonl)"
            ),
        ) from exc
    problems: list[Problem] = []
    skipped = 0
    for index, row in enumerate(dataset):
        if limit is not None and len(problems) >= limit:
            break
        try:
            problems.append(
                _problem_from_row(row, f"gsm8k-{source.split}-{index + 1}", calculations)
            )
        except _BadRow as bad:
            if not skip_malformed:
                raise DataError(
                    bad.problem, path=label, line=index + 1, expected=bad.expected
                ) from None
            skipped += 1
    if not problems and limit != 0:
        raise DataError("dataset has no usable rows", path=label, expected=_ROW_EXPECTED)
    return problems, skipped


@functools.lru_cache(maxsize=8)
def _parsed_jsonl(
    path: str,
    stamp: Stamp | None,
    skip_malformed: bool,
    limit: int | None,
    calculations: bool,
    source: str,
) -> tuple[tuple[Problem, ...], int]:
    """A file's problems, parsed once per process while its size and mtime stay the same.
    Why: a trainer reads its train and eval splits (7,473 + 1,319 rows, 0.07-0.4 s), and
    a process that builds several (the benchmarks, the tests: 248 loads) read them anew
    each time. Problems are frozen; callers get a list of their own."""
    problems, skipped = load_gsm8k_jsonl(
        path, skip_malformed=skip_malformed, limit=limit, calculations=calculations, source=source
    )
    return tuple(problems), skipped


def load_gsm8k(
    name: str,
    split: str = "train",
    *,
    skip_malformed: bool = False,
    limit: int | None = None,
    calculations: bool = False,
) -> tuple[list[Problem], int]:
    """Load a GSM8K split as ``(problems, skipped_rows)``; see `resolve_gsm8k_source`.

    Ids do not depend on the source (``gsm8k-{split}-{row}`` for ``{split}.jsonl`` files
    and for the hub), so runs on local and hub copies stay comparable. ``calculations``
    keeps each solution's calculator annotations as ``columns["calculations"]`` (off by
    default so that problems stay as they were; distractors use them when present).
    """
    _check_limit(limit)
    source = resolve_gsm8k_source(name, split)
    if source.kind == "jsonl":
        path = str(source.path)
        stamp = files_stamp(path)  # None when missing: load_gsm8k_jsonl says so, naming it
        # a packaged set keeps ids of its own: never paired with GSM8K's by mistake
        label = name.lower() if name.lower() in PACKAGED_SETS else "gsm8k"
        problems, skipped = _parsed_jsonl(path, stamp, skip_malformed, limit, calculations, label)
        return list(problems), skipped
    return _load_from_hub(
        source, skip_malformed=skip_malformed, limit=limit, calculations=calculations
    )
