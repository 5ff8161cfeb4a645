"""Held-out evaluation on GSM8K-style problems: greedy, majority vote, or best-of-N, batched.

Three modes, one record per problem:

- ``greedy``: one greedy completion per problem (the number a paper reports).
- ``majority``: ``k`` sampled completions per problem; the answer most of them give wins
  (self-consistency). Ties go to the answer that appeared first, so the result is a
  deterministic function of the samples.
- ``best_of_n``: ``k`` sampled completions; a ``select(completions, question) -> index``
  callable picks one (the learned verifier plugs in here without this module importing it;
  `confidence_select` is a verifier-free stand-in that trusts the stated confidence).

Sampling goes through `generate_groups`, so the k samples of a problem share one prompt
prefill, and runs under a forked RNG so that evaluating mid-training never perturbs the
training run's random stream. A ``sampler`` (vLLM's engine holding the policy's weights,
``VLLMRollout.generate``) replaces it where it is faster: evaluation is what a study runs
most often.

Metrics beyond accuracy: format validity, mean length, truncation rate; calibration (ECE
over 10 equal-width bins and the Brier score) over completions that state a
``<confidence>``; distractor discrimination when problems carry ``columns["distractors"]``
(how often a wrong answer is exactly one of the anticipated wrong answers).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from deepsynapse.data.answers import answers_match, normalize_answer
from deepsynapse.data.problems import Problem
from deepsynapse.formats import ParsedCompletion, XMLSchema, parse_completion, stop_strings
from deepsynapse.models.policy import SEQUENCE_MULTIPLE
from deepsynapse.prompting import build_prompt
from deepsynapse.rollout.hf import Sampler, generate_with

__all__ = [
    "MODES",
    "Sampler",
    "SelectFn",
    "answer_key",
    "brier",
    "confidence_select",
    "distractor_values",
    "evaluate",
    "item_record",
    "lenient_answer",
    "expected_calibration_error",
    "majority_answer",
    "summarize",
]

MODES = ("greedy", "majority", "best_of_n")

_CONFIDENCE_RE = re.compile(r"<confidence>.*?(</confidence>|$)", re.DOTALL)

SelectFn = Callable[[list[str], str], int]
"""``select(completions, question) -> index`` of the completion to keep (best-of-N)."""


# ------------------------------------------------------------------ pure metric functions


def _check_pairs(confidences: Sequence[float], correct: Sequence[bool | float]) -> None:
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness flags")
    if not confidences:
        raise ValueError("calibration needs at least one (confidence, correct) pair")
    for c in confidences:
        if not (isinstance(c, (int, float)) and 0.0 <= c <= 1.0):
            raise ValueError(f"confidence {c!r} is not a number in [0, 1]")


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool | float], bins: int = 10
) -> float:
    """ECE: the gap between stated confidence and accuracy, averaged over confidence bins.

    Equal-width bins ``[0, 1/bins), [1/bins, 2/bins), ..., [(bins-1)/bins, 1]``; each bin
    contributes ``(n_bin / n) * |accuracy_bin - mean_confidence_bin|``.

    >>> expected_calibration_error([0.9, 0.9, 0.2, 0.2], [True, False, False, False])
    0.3
    """
    _check_pairs(confidences, correct)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    sums: dict[int, list[float]] = {}  # bin -> [count, sum confidence, sum correct]
    for c, y in zip(confidences, correct, strict=True):
        b = min(int(c * bins), bins - 1)
        acc = sums.setdefault(b, [0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += float(c)
        acc[2] += float(y)
    n = len(confidences)
    ece = sum(cnt / n * abs(s_y / cnt - s_c / cnt) for cnt, s_c, s_y in sums.values())
    return round(ece, 12)


def brier(confidences: Sequence[float], correct: Sequence[bool | float]) -> float:
    """Mean squared error between stated confidence and the 0/1 outcome.

    >>> brier([1.0, 0.5], [True, False])
    0.125
    """
    _check_pairs(confidences, correct)
    return sum((float(c) - float(y)) ** 2 for c, y in zip(confidences, correct, strict=True)) / len(
        confidences
    )


def answer_key(answer: str | None) -> str | None:
    """What two answers must share to count as the same vote.

    The canonical number when there is one ("$18.00" and "18" agree); otherwise the
    lower-cased, whitespace-collapsed text, so non-numeric answers can still be voted on.

    >>> answer_key("$1,000"), answer_key("  Cannot  be determined "), answer_key("  ")
    ('1000', 'cannot be determined', None)
    """
    if answer is None:
        return None
    number = normalize_answer(answer)
    if number is not None:
        return number
    text = " ".join(answer.split()).lower()
    return text or None


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The answer (as `answer_key`) that most samples give; ties go to the first seen.

    Missing answers (None, empty) do not vote; None when nobody answered.

    >>> majority_answer(["12", "7", "12.0", "7", None])
    '12'
    >>> majority_answer(["7", "12", "12", "7"])
    '7'
    >>> majority_answer([None, ""]) is None
    True
    """
    counts: dict[str, int] = {}  # insertion order = first occurrence
    for a in answers:
        key = answer_key(a)
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(key for key, count in counts.items() if count == best)


def distractor_values(raw: Any) -> list[tuple[str | None, str]]:
    """``(kind, value)`` pairs from a problem's ``columns["distractors"]``.

    Accepts a mapping ``{kind: value}``, a list of values, or a list of mappings with
    ``value``/``answer`` and ``kind``/``type`` keys, so it does not depend on one producer.

    >>> distractor_values({"numeric": "41", "unit": 4200})
    [('numeric', '41'), ('unit', '4200')]
    >>> distractor_values(["3", {"kind": "semantic", "value": "9"}])
    [(None, '3'), ('semantic', '9')]
    """
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        if "value" in raw or "answer" in raw:
            raw = [raw]
        else:
            return [(str(k), str(v)) for k, v in raw.items() if v is not None]
    if isinstance(raw, (str, int, float)):
        raw = [raw]
    out: list[tuple[str | None, str]] = []
    for item in raw:
        if isinstance(item, Mapping):
            value = item.get("value", item.get("answer"))
            kind = item.get("kind", item.get("type"))
            if value is not None:
                out.append((None if kind is None else str(kind), str(value)))
        elif item is not None:
            out.append((None, str(item)))
    return out


def confidence_select(completions: list[str], question: str, schema: XMLSchema | str) -> int:
    """A verifier-free best-of-N: the valid completion with the highest stated confidence.

    Falls back to the first valid completion, then to the first one. Bind the schema with
    ``functools.partial(confidence_select, schema=...)`` to use it as ``select``.
    """
    best, best_conf = None, -1.0
    for i, text in enumerate(completions):
        parsed = parse_completion(text, schema)
        if not parsed.valid:
            continue
        conf = parsed.confidence
        score = conf if conf is not None else 0.0
        if best is None or score > best_conf:
            best, best_conf = i, score
    return 0 if best is None else best


# ------------------------------------------------------------------ evaluation


def lenient_answer(parsed: ParsedCompletion, text: str) -> str | None:
    """The number a lenient grader reads: the answer field, else the completion's last number.

    The stated confidence is left out of the fallback, so "<confidence>0.9" is never read as
    an answer. Lenient accuracy counts the right number with or without the format; strict
    accuracy (``correct``) needs a format-valid completion too, so a format gain cannot pass
    for a reasoning gain.

    >>> lenient_answer(parse_completion("So she has 12 apples."), "So she has 12 apples.")
    '12'
    >>> text = "<answer>7</answer> trailing 9"
    >>> lenient_answer(parse_completion(text), text)
    '7'
    """
    if parsed.answer and normalize_answer(parsed.answer) is not None:
        return parsed.answer
    return normalize_answer(_CONFIDENCE_RE.sub(" ", text))


def _distractor_fields(problem: Problem, predicted: str | None, correct: bool) -> dict[str, Any]:
    values = distractor_values(problem.columns.get("distractors"))
    if not values:
        return {}
    hit = None
    if predicted is not None and not correct:
        hit = next((kind or "any" for kind, v in values if answers_match(predicted, v)), None)
    return {"has_distractors": True, "distractor_hit": hit}


def item_record(
    problem: Problem,
    schema: XMLSchema,
    texts: list[str],
    lengths: list[int],
    truncated: list[bool],
    mode: str,
    select: SelectFn | None,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """One problem's record from its k completions (k = 1 for greedy), whatever generated them.

    The chosen completion's fields (answer, correctness, validity, length, confidence) are
    the record's; sampled modes also keep every sample's answer and correctness.
    """
    parsed = [parse_completion(t, schema) for t in texts]
    answers = [p.fields.get("answer") for p in parsed]
    samples_correct = [a is not None and answers_match(a, problem.answer) for a in answers]
    record: dict[str, Any] = {"id": problem.id, "gold": problem.answer, "mode": mode}
    if mode == "greedy":
        chosen = 0
    elif mode == "majority":
        winner = majority_answer(answers)
        chosen = next((i for i, a in enumerate(answers) if answer_key(a) == winner), 0)
        votes = sum(answer_key(a) == winner for a in answers) if winner is not None else 0
        record["vote_share"] = votes / len(answers)
    else:
        assert select is not None
        chosen = int(select(list(texts), problem.question))
        if not 0 <= chosen < len(texts):
            raise ValueError(f"select returned {chosen} for {len(texts)} completions")
    answer = answers[chosen]
    correct = samples_correct[chosen] and parsed[chosen].valid
    lenient = lenient_answer(parsed[chosen], texts[chosen])
    record.update(
        {
            "predicted": answer,
            "correct": correct,
            "lenient_correct": answers_match(lenient, problem.answer),
            "format_valid": parsed[chosen].valid,
            "length": lengths[chosen],
            "truncated": truncated[chosen],
            "confidence": parsed[chosen].confidence,
            "completion": texts[chosen],
        }
    )
    if mode != "greedy":
        record["chosen"] = chosen
        record["answers"] = answers
        record["samples_correct"] = samples_correct
        if keep_samples:
            record["samples"] = list(texts)
    record.update(_distractor_fields(problem, answer, correct))
    return record


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    problems: Sequence[Problem],
    schema: XMLSchema,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    progress: bool = True,
    desc: str = "eval",
    mode: str = "greedy",
    k: int = 8,
    temperature: float = 0.7,
    top_p: float = 1.0,
    select: SelectFn | None = None,
    seed: int = 0,
    keep_samples: bool = False,
    around: Callable | None = None,
    pad_multiple: int = SEQUENCE_MULTIPLE,
    sampler: Sampler | None = None,
) -> dict[str, Any]:
    """Evaluate ``problems``; returns summary metrics (see `summarize`) and one record each.

    ``mode``: greedy | majority | best_of_n. ``k``, ``temperature``, ``top_p`` and ``seed``
    apply to the sampled modes (``batch_size`` counts prompts; a batch holds
    ``batch_size * k`` completions). ``select`` is required for best_of_n.
    ``keep_samples`` stores all k completions in each record (large; off by default).
    ``around(prompt_ids, prompt_mask)``: a context per batch, as in ``generate_groups`` (the
    hypernetwork's per-input LoRA scales).
    ``sampler``: generate with another backend (vLLM) instead of our decoder; batch ``i``
    samples with seed ``seed + i``. The summary's ``backend`` says which one ran.
    """
    if mode not in MODES:
        raise ValueError(f"unknown eval mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "best_of_n" and select is None:
        raise ValueError("mode best_of_n needs select(completions, question) -> index")
    if mode != "greedy" and k < 1:
        raise ValueError(f"k must be >= 1 for mode {mode}, got {k}")
    g = 1 if mode == "greedy" else k
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(problems), desc=desc, disable=not progress, leave=False)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for i in range(0, len(problems), batch_size):
                chunk = problems[i : i + batch_size]
                prompts = [build_prompt(tokenizer, p.question, schema) for p in chunk]
                out = generate_with(
                    sampler,
                    model,
                    tokenizer,
                    prompts,
                    seed=seed + i,
                    prefix_sharing=True,  # each prompt once, their system prompt once
                    around=around,
                    num_generations=g,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    greedy=mode == "greedy",
                    stop_strings=stop_strings(schema),
                    pad_multiple=pad_multiple,
                )
                lengths, truncated = out.lengths.tolist(), out.truncated.tolist()
                for j, p in enumerate(chunk):
                    rows = slice(j * g, (j + 1) * g)
                    records.append(
                        item_record(
                            p,
                            schema,
                            out.texts[rows],
                            lengths[rows],
                            truncated[rows],
                            mode,
                            select,
                            keep_samples,
                        )
                    )
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    summary = summarize(records, time.perf_counter() - start, mode=mode)
    summary["backend"] = "ours" if sampler is None else "vllm"
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(
    records: list[dict[str, Any]], seconds: float = 0.0, *, mode: str | None = None
) -> dict[str, Any]:
    """Summary metrics over per-item records (also after gathering them from processes).

    Always present: n, mode, accuracy (strict: format-valid and right), lenient_accuracy (the
    right number, format or not), format_validity, mean_length, truncation_rate.
    None when not applicable: sample_accuracy and pass_at_k (sampled modes), ece, brier
    and confidence_rate (completions with a confidence), distractor_* (problems with
    distractors).
    """
    n = len(records)
    if mode is None:
        modes = {r.get("mode", "greedy") for r in records}
        mode = modes.pop() if len(modes) == 1 else "greedy"

    def mean(key: str) -> float:
        return sum(float(r.get(key, 0.0)) for r in records) / n if n else 0.0

    sampled = [r for r in records if r.get("samples_correct")]
    with_conf = [r for r in records if r.get("confidence") is not None]
    confs = [float(r["confidence"]) for r in with_conf]
    outcomes = [bool(r["correct"]) for r in with_conf]
    dis = [r for r in records if r.get("has_distractors")]
    dis_wrong = [r for r in dis if not r["correct"] and r.get("predicted") is not None]
    by_kind: dict[str, int] = {}
    for r in dis_wrong:
        if r.get("distractor_hit"):
            by_kind[r["distractor_hit"]] = by_kind.get(r["distractor_hit"], 0) + 1
    return {
        "n": n,
        "mode": mode,
        "accuracy": mean("correct"),
        "lenient_accuracy": mean("lenient_correct"),
        "format_validity": mean("format_valid"),
        "mean_length": mean("length"),
        "truncation_rate": mean("truncated"),
        "samples_per_item": len(sampled[0]["samples_correct"]) if sampled else 1,
        "sample_accuracy": _mean(
            [sum(r["samples_correct"]) / len(r["samples_correct"]) for r in sampled]
        ),
        "pass_at_k": _mean([float(any(r["samples_correct"])) for r in sampled]),
        "confidence_rate": len(with_conf) / n if n else 0.0,
        "ece": expected_calibration_error(confs, outcomes, 10) if confs else None,
        "brier": brier(confs, outcomes) if confs else None,
        "mean_confidence": _mean(confs),
        "distractor_items": len(dis),
        "distractor_correct_rate": _mean([float(r["correct"]) for r in dis]),
        "distractor_wrong_share": _mean([float(bool(r.get("distractor_hit"))) for r in dis_wrong]),
        "distractor_hits": by_kind or None,
        "seconds": seconds if math.isfinite(seconds) else 0.0,
        "records": records,
    }
