"""Try a model by hand: one completion with its XML fields parsed and checked, or a chat loop.

The logic behind ``deepsynapse generate`` and ``deepsynapse chat`` (and ``api.generate``).
Each question is answered on its own, with the system prompt of the schema, exactly as the
model saw problems in training: the policy was never trained on multi-turn conversations, so
the loop keeps no history.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from deepsynapse.data.answers import normalize_answer
from deepsynapse.formats import ParsedCompletion, get_schema, parse_completion, stop_strings
from deepsynapse.models.policy import SEQUENCE_MULTIPLE
from deepsynapse.prompting import build_prompt
from deepsynapse.rollout.hf import generate_groups

EXIT_WORDS = frozenset({"exit", "quit", ":q"})


@dataclass
class Completion:
    """One answer to one question, parsed against the schema."""

    question: str
    prompt: str  # the exact text the model was given (chat template applied)
    text: str  # the completion, cut after the stop string
    parsed: ParsedCompletion
    schema: str
    tokens: int
    truncated: bool  # hit max_new_tokens before the last closing tag
    seconds: float

    @property
    def valid(self) -> bool:
        return self.parsed.valid

    @property
    def fields(self) -> dict[str, str]:
        return self.parsed.fields

    @property
    def errors(self) -> list[str]:
        return self.parsed.errors

    @property
    def answer(self) -> str | None:
        """The normalised numeric answer (``"1,000.50"`` -> ``"1000.5"``), or None."""
        raw = self.parsed.answer
        return None if raw is None else normalize_answer(raw)

    @property
    def confidence(self) -> float | None:
        return self.parsed.confidence

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "completion": self.text,
            "valid": self.valid,
            "errors": self.errors,
            "fields": self.fields,
            "answer": self.answer,
            "confidence": self.confidence,
            "schema": self.schema,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "seconds": self.seconds,
        }


@torch.no_grad()
def complete(
    model,
    tokenizer,
    question: str,
    schema: str = "base",
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
    around: Callable | None = None,
    pad_multiple: int = SEQUENCE_MULTIPLE,
) -> Completion:
    """Answer ``question``: greedy when ``temperature`` is 0, sampled otherwise.

    ``around(prompt_ids, prompt_mask)``: the generation context of a trained run (the
    hypernetwork's per-prompt LoRA scales: ``TrainedPolicy.around``); ``pad_multiple``: the
    run's ``model.pad_to_multiple_of``.
    """
    xml = get_schema(schema)
    prompt = build_prompt(tokenizer, question, xml)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    out = generate_groups(
        model,
        tokenizer,
        [prompt],
        num_generations=1,
        max_new_tokens=max_new_tokens,
        temperature=temperature if temperature > 0 else 1.0,
        greedy=temperature <= 0,
        stop_strings=stop_strings(xml),
        prefix_sharing=False,
        around=around,
        pad_multiple=pad_multiple,
    )
    seconds = time.perf_counter() - start
    model.train(was_training)
    text = out.texts[0]
    return Completion(
        question=question,
        prompt=prompt,
        text=text,
        parsed=parse_completion(text, xml),
        schema=xml.name,
        tokens=int(out.lengths[0]),
        truncated=bool(out.truncated[0]),
        seconds=seconds,
    )


def render(completion: Completion) -> str:
    """The completion, then each schema field, the answer and the verdict of the parser."""
    lines = [completion.text.strip() or "(empty completion)", "-" * 40]
    schema = get_schema(completion.schema)
    for name in schema.fields:
        value = completion.fields.get(name)
        if value is None:
            if name not in schema.optional:
                lines.append(f"{name}: (missing)")
            continue
        if name == "answer":
            normal = completion.answer
            shown = value if normal in (None, value) else f"{value}  (= {normal})"
            lines.append(f"answer: {shown if normal is not None else value + '  (not a number)'}")
        elif name == "confidence":
            c = completion.confidence
            lines.append(f"confidence: {value}" + ("" if c is not None else "  (not in [0, 1])"))
        else:
            body = value if "\n" not in value else "\n  " + value.replace("\n", "\n  ")
            lines.append(f"{name}: {body}")
    verdict = "valid" if completion.valid else "INVALID (" + ", ".join(completion.errors) + ")"
    lines.append(f"format: {verdict}")
    tail = f"{completion.tokens} tokens, {completion.seconds:.1f} s"
    lines.append(f"({tail}{', truncated' if completion.truncated else ''})")
    return "\n".join(lines)


def chat(
    model,
    tokenizer,
    schema: str = "base",
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    around: Callable | None = None,
    pad_multiple: int = SEQUENCE_MULTIPLE,
) -> int:
    """Read questions until EOF or ``exit``; print each parsed answer. Returns how many.

    ``around`` and ``pad_multiple`` as in ``complete``.
    """
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stdout.write(
        f"DeepSynapse chat (schema '{get_schema(schema).name}'): one math word problem per line; "
        "'exit' or Ctrl-D to quit.\n"
    )
    answered = 0
    while True:
        stdout.write("question> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            break
        question = line.strip()
        if not question:
            continue
        if question.lower() in EXIT_WORDS:
            break
        result = complete(
            model,
            tokenizer,
            question,
            schema,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            around=around,
            pad_multiple=pad_multiple,
        )
        stdout.write(render(result) + "\n\n")
        answered += 1
    return answered
