"""Base reward components in TRL's convention, and the isolation that calls them.

A component is a plain callable ``component(prompts=..., completions=..., **columns)`` (called
with keywords, exactly as TRL calls reward functions) returning one
``float | None`` per completion (None = not applicable), with a ``name`` attribute. Extra
context arrives as keyword columns; the trainer passes at least ``answer`` (gold answers),
``parsed`` (one :class:`~deepsynapse.formats.ParsedCompletion` per completion) and
``schema``. Components ignore columns they do not need (``**_``), so a TRL reward function
works unchanged.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from deepsynapse.data.answers import answers_match, normalize_answer
from deepsynapse.formats import BASE_SCHEMA, ParsedCompletion, get_schema, parse_completion

logger = logging.getLogger(__name__)

Scores = list[float | None]


class RewardComponent(Protocol):
    name: str

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> Scores: ...


def _parsed(completions: Sequence[str], columns: dict[str, Any]) -> list[ParsedCompletion]:
    parsed = columns.get("parsed")
    if parsed is not None:
        return list(parsed)
    schema = columns.get("schema", BASE_SCHEMA)
    schema = get_schema(schema) if isinstance(schema, str) else schema
    return [parse_completion(c, schema) for c in completions]


def correctness(prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> Scores:
    """1.0 when the ``<answer>`` field matches the gold answer numerically, else 0.0.

    Only the answer field counts: a right number elsewhere in the text earns nothing.

    >>> correctness(["q"], ["<reasoning>2+2</reasoning>\\n<answer>4</answer>"], answer=["4"])
    [1.0]
    >>> correctness(["q"], ["the answer is 4"], answer=["4"])
    [0.0]
    """
    gold = columns["answer"]
    return [
        1.0 if p.fields.get("answer") is not None and answers_match(p.fields["answer"], g) else 0.0
        for p, g in zip(_parsed(completions, columns), gold, strict=True)
    ]


correctness.name = "correctness"  # type: ignore[attr-defined]


def strict_format(prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> Scores:
    """1.0 when the completion is exactly the schema (tags once, in order, nothing outside).

    >>> strict_format(["q"], ["<reasoning>r</reasoning>\\n<answer>4</answer>"])
    [1.0]
    >>> strict_format(["q"], ["Sure! <reasoning>r</reasoning><answer>4</answer>"])
    [0.0]
    """
    return [1.0 if p.valid else 0.0 for p in _parsed(completions, columns)]


strict_format.name = "strict_format"  # type: ignore[attr-defined]


def soft_format(prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> Scores:
    """Graded structure in [0, 1]: the share of format checks a completion passes.

    Checks: each required field present (opened and closed), a numeric answer, nothing outside
    the tags, fields in order. Gives partial credit so that groups differ before any
    completion is fully valid: the cold-start signal.

    >>> soft_format(["q"], ["<reasoning>r</reasoning>\\n<answer>4</answer>"])
    [1.0]
    >>> soft_format(["q"], ["<reasoning>r</reasoning> and then"])
    [0.25]
    """
    out: Scores = []
    for p in _parsed(completions, columns):
        errors = set(p.errors)
        checks = [
            "answer" in p.fields
            and "missing:answer" not in errors
            and "unclosed:answer" not in errors,
            "reasoning" in p.fields
            and "missing:reasoning" not in errors
            and "unclosed:reasoning" not in errors,
            p.fields.get("answer") is not None and normalize_answer(p.fields["answer"]) is not None,
            "text_outside" not in errors and "order" not in errors and p.fields != {},
        ]
        out.append(sum(checks) / len(checks))
    return out


soft_format.name = "soft_format"  # type: ignore[attr-defined]


BUILTIN_REWARDS: dict[str, Callable[..., Scores]] = {
    "correctness": correctness,
    "strict_format": strict_format,
    "soft_format": soft_format,
}


@dataclass
class ComponentFailure:
    name: str
    error: str


def _call_with_timeout(fn: Callable[[], Any], timeout: float | None) -> Any:
    """Run ``fn`` in a daemon thread; raise TimeoutError if it does not finish in time.

    A hung component cannot be killed from Python: its thread is abandoned (daemon, so it
    never blocks exit) and the step goes on without it.
    """
    if not timeout:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="reward-component")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"did not finish within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_components(
    components: Sequence[Callable[..., Scores]],
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: dict[str, Any],
    timeout: float | None = None,
    seconds: dict[str, float] | None = None,
    costly_rows: Sequence[int] | None = None,
) -> tuple[dict[str, Scores], list[ComponentFailure]]:
    """Score every completion with every component, isolating failures.

    A component that raises, hangs past ``timeout`` seconds, returns the wrong length or a
    non-finite value scores None for the whole step; the failure is returned (to be logged
    as an event) and training goes on. ``seconds`` (when given) gets each component's wall
    time, so a slow reward is seen by name rather than as one ``timing/reward``.
    ``costly_rows``: the only rows a costly component (``costly = True``: it runs a model
    per completion) scores; the others get None. Dynamic sampling passes the rows of the
    groups it keeps, so the policy is not run over completions the update never sees.
    """
    scores: dict[str, Scores] = {}
    failures: list[ComponentFailure] = []
    n = len(completions)
    for component in components:
        name = component_name(component)
        started = time.perf_counter()
        rows = costly_rows if getattr(component, "costly", False) else None
        try:
            values = list(
                _call_with_timeout(
                    lambda c=component, r=rows: _call_on_rows(c, prompts, completions, columns, r),
                    timeout,
                )
            )
            if len(values) != n:
                raise ValueError(f"returned {len(values)} scores for {n} completions")
            checked: Scores = []
            for v in values:
                if v is None:
                    checked.append(None)
                    continue
                v = float(v)
                if not math.isfinite(v):
                    raise ValueError(f"returned a non-finite score {v}")
                checked.append(v)
            scores[name] = checked
        except Exception as exc:  # isolation is the point: any error, any component
            logger.warning("reward %s failed: %s", name, exc)
            failures.append(
                ComponentFailure(name, "".join(traceback.format_exception_only(exc)).strip())
            )
            scores[name] = [None] * len(completions)
        if seconds is not None:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
    return scores, failures


def _call_on_rows(
    component: Callable[..., Scores],
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: dict[str, Any],
    rows: Sequence[int] | None,
) -> Scores:
    """The component's scores for every completion, computed only on ``rows`` when given
    (per-completion columns are cut to those rows; the other rows score None)."""
    if rows is None:
        return component(prompts=prompts, completions=completions, **columns)
    n = len(completions)
    out: Scores = [None] * n
    if not rows:
        return out
    part = {
        k: [v[i] for i in rows] if isinstance(v, (list, tuple)) and len(v) == n else v
        for k, v in columns.items()
    }
    values = list(
        component(
            prompts=[prompts[i] for i in rows], completions=[completions[i] for i in rows], **part
        )
    )
    if len(values) != len(rows):
        raise ValueError(f"returned {len(values)} scores for {len(rows)} completions")
    for i, v in zip(rows, values, strict=True):
        out[i] = v
    return out


def component_name(component: Callable[..., Any]) -> str:
    return str(
        getattr(component, "name", None) or getattr(component, "__name__", type(component).__name__)
    )
