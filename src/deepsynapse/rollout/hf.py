"""Rollouts with Hugging Face ``generate``, each prompt prefilled once for its whole group.

Prefix sharing: the B prompts of a step are prefilled as one batch of B rows (all tokens
but the last), the resulting KV cache is repeated to B*G rows, and ``generate`` continues from
it: each of the G samples only computes its own tokens. Without sharing, ``generate`` would
prefill B*G copies of the same prompts.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deepsynapse.models.policy import position_ids_from_mask


@dataclass
class RolloutOutput:
    prompt_ids: torch.Tensor  # [N, P] left-padded, N = B * G, rows of a group contiguous
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, T] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [N, T] 1 on tokens that belong to the completion
    texts: list[str]  # N decoded completions (up to and including the stop string)
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without stopping

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)


def encode_prompts(
    tokenizer, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def generate_groups(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_strings: list[str] | None = None,
    prefix_sharing: bool = True,
    around: Callable[[torch.Tensor, torch.Tensor], contextlib.AbstractContextManager] | None = None,
) -> RolloutOutput:
    """Sample ``num_generations`` completions for each prompt (already chat-formatted text).

    ``around(prompt_ids, prompt_mask)`` returns a context entered for the whole generation
    (the hypernetwork's per-prompt LoRA scales, for instance).
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    g = num_generations
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_p=top_p if not greedy else None,
        top_k=None if greedy else 0,  # no top-k: sample the distribution the loss scores
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with around(ids, mask) if around is not None else contextlib.nullcontext():
        completion = _generate(
            model, tokenizer, ids, mask, g, gen_config, stop_strings, prefix_sharing
        )
    ids_g = ids.repeat_interleave(g, 0)
    mask_g = mask.repeat_interleave(g, 0)
    return finish_completions(
        tokenizer, ids_g, mask_g, completion, stop_strings or [], max_new_tokens
    )


def _generate(
    model, tokenizer, ids, mask, g, gen_config, stop_strings, prefix_sharing
) -> torch.Tensor:
    """Completion token ids [B*G, T]; the prompt's KV computed once per group when sharing."""
    from transformers import DynamicCache, StoppingCriteriaList

    ids_g = ids.repeat_interleave(g, 0)
    mask_g = mask.repeat_interleave(g, 0)
    kwargs = {}
    if prefix_sharing and g > 1 and ids.shape[1] > 1:
        cache = DynamicCache(config=model.config)
        model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=position_ids_from_mask(mask[:, :-1]),
            past_key_values=cache,
            use_cache=True,
        )
        cache.batch_repeat_interleave(g)
        kwargs["past_key_values"] = cache
    if stop_strings:
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [stop_criteria(tokenizer, tuple(stop_strings))]
        )
    out = model.generate(
        input_ids=ids_g,
        attention_mask=mask_g,
        generation_config=gen_config,
        **kwargs,
    )
    return out[:, ids.shape[1] :]


_STOP_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stop_criteria(tokenizer, stops: tuple[str, ...]):
    """One StopStringCriteria per (tokenizer, stop strings): building it scans the whole
    vocabulary (about 2 s for 49k tokens), which ``generate`` would redo on every call."""
    from transformers import StopStringCriteria

    per_tokenizer = _STOP_CACHE.setdefault(tokenizer, {})
    if stops not in per_tokenizer:
        per_tokenizer[stops] = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stops))
    return per_tokenizer[stops]


def finish_completions(
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion: torch.Tensor,
    stop_strings: list[str],
    max_new_tokens: int,
) -> RolloutOutput:
    """Cut each row at its stop string or first EOS, build masks and the truncation flags.

    ``generate`` pads finished rows with the pad token, which for many chat models is the EOS
    token: a row's first EOS is then either a real end (kept as a target) or the first pad
    after a stop string (not kept).
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    n, t = completion.shape
    mask = torch.zeros(n, t, dtype=torch.long, device=completion.device)
    truncated = torch.zeros(n, dtype=torch.bool)
    texts: list[str] = []
    rows = completion.tolist()
    for i, row in enumerate(rows):
        end = row.index(eos) if eos in row else None
        body = row if end is None else row[:end]
        text = tokenizer.decode(body, skip_special_tokens=True)
        stop_at = min((text.find(s) + len(s) for s in stop_strings if s in text), default=None)
        if stop_at is not None:
            # Keep tokens up to the one that completes the stop string.
            keep = len(body)
            while (
                keep > 1
                and len(tokenizer.decode(body[: keep - 1], skip_special_tokens=True)) >= stop_at
            ):
                keep -= 1
            length, text = keep, text[:stop_at]
        elif end is not None:
            length = end + 1  # the EOS itself is a target: the model learns to stop
        else:
            length = len(row)
            truncated[i] = len(row) >= max_new_tokens
        mask[i, :length] = 1
        texts.append(text)
    completion = completion.masked_fill(mask == 0, pad)
    return RolloutOutput(prompt_ids, prompt_mask, completion, mask, texts, truncated)
