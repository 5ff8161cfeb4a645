"""Held-out evaluation: accuracy and format validity on GSM8K-style problems, greedy, batched."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from deepsynapse.data.answers import answers_match
from deepsynapse.data.problems import Problem
from deepsynapse.formats import XMLSchema, parse_completion, stop_strings
from deepsynapse.prompting import build_prompt
from deepsynapse.rollout.hf import generate_groups


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
) -> dict[str, Any]:
    """Greedy completions for ``problems``; returns summary metrics and one record per item."""
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(problems), desc=desc, disable=not progress, leave=False)
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [build_prompt(tokenizer, p.question, schema) for p in chunk]
        out = generate_groups(
            model,
            tokenizer,
            prompts,
            num_generations=1,
            max_new_tokens=max_new_tokens,
            greedy=True,
            stop_strings=stop_strings(schema),
            prefix_sharing=False,
        )
        for p, text, length, trunc in zip(
            chunk, out.texts, out.lengths.tolist(), out.truncated.tolist(), strict=True
        ):
            parsed = parse_completion(text, schema)
            answer = parsed.fields.get("answer")
            records.append(
                {
                    "id": p.id,
                    "gold": p.answer,
                    "predicted": answer,
                    "correct": answer is not None and answers_match(answer, p.answer),
                    "format_valid": parsed.valid,
                    "length": length,
                    "truncated": trunc,
                    "completion": text,
                }
            )
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return summarize(records, time.perf_counter() - start)


def summarize(records: list[dict[str, Any]], seconds: float = 0.0) -> dict[str, Any]:
    n = len(records)
    mean = lambda key: sum(float(r[key]) for r in records) / n if n else 0.0  # noqa: E731
    return {
        "n": n,
        "accuracy": mean("correct"),
        "format_validity": mean("format_valid"),
        "mean_length": mean("length"),
        "truncation_rate": mean("truncated"),
        "seconds": seconds,
        "records": records,
    }
