"""Rollouts on Hugging Face models, each prompt prefilled once for its whole group.

Prefix sharing: the B prompts of a step are prefilled as one batch of B rows (all tokens
but the last), the resulting KV cache is repeated to B*G rows, and decoding continues from
it: each of the G samples only computes its own tokens. Without sharing, the B*G copies of
the same prompts would each be prefilled.

Two decoders continue from that cache. ``fast`` (the default) is a short loop of our own over
the model's forward: the KV cache is allocated once for the whole completion
(``PreallocatedLayer``: transformers' ``DynamicLayer`` concatenates at every token, which
copies the whole cache each step and was half of the rollout time on CPU) and sampling draws
one uniform per row against the cumulative distribution (``torch.multinomial`` draws one
exponential per vocabulary entry, a quarter of the rollout time for a 49k vocabulary), and
rows that have finished leave the batch once they are a quarter of it (``COMPACT_SHARE``:
completions end at very different lengths, and one row cut at ``max_new_tokens`` would
otherwise keep every finished row decoding padding to the end). ``hf`` calls
``model.generate``: the reference, and the fallback for models the loop does not know. Both
give the same tokens under greedy decoding (tested).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from deepsynapse.models.dynamic_lora import merged_lora, row_scaled
from deepsynapse.models.policy import (
    SEQUENCE_MULTIPLE,
    cache_kwarg,
    pad_to_multiple,
    position_ids_from_mask,
    run_shared_prefix,
    shared_prefix_length,
)


@dataclass
class RolloutOutput:
    """G completions per prompt. Field metadata says how rounds are padded when joined."""

    # [N, P] left-padded, N = B * G, rows of a group contiguous
    prompt_ids: torch.Tensor = field(metadata={"pad": "left", "pad_value": "pad_id"})
    prompt_mask: torch.Tensor = field(metadata={"pad": "left", "pad_value": 0})  # [N, P]
    # [N, T] right-padded with pad_token_id
    completion_ids: torch.Tensor = field(metadata={"pad": "right", "pad_value": "pad_id"})
    # [N, T] 1 on tokens that belong to the completion
    completion_mask: torch.Tensor = field(metadata={"pad": "right", "pad_value": 0})
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


Sampler = Callable[..., RolloutOutput]
"""Another backend's ``generate(prompts, *, num_generations, max_new_tokens, temperature, top_p,
greedy, stop_strings, seed, pad_multiple)``, rows as `generate_groups` returns them
(``VLLMRollout.generate``)."""


def generate_with(
    sampler: Sampler | None,
    model,
    tokenizer,
    prompts: list[str],
    *,
    seed: int | None = None,
    prefix_sharing: bool = True,
    around: Callable | None = None,
    **sampling: Any,
) -> RolloutOutput:
    """``sampler`` (vLLM's engine holding the policy's weights) where given, else our decoder
    (``generate_groups``, under the caller's RNG); ``sampling`` is what both take."""
    if sampler is None:
        return generate_groups(
            model, tokenizer, prompts, prefix_sharing=prefix_sharing, around=around, **sampling
        )
    if around is not None:
        raise ValueError("a per-prompt hook (around=) needs our decoder: pass no sampler")
    return sampler(prompts, seed=seed, **sampling)


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
    decoder: str = "fast",
    merge_lora: bool = True,
    pad_multiple: int = SEQUENCE_MULTIPLE,
) -> RolloutOutput:
    """Sample ``num_generations`` completions for each prompt (already chat-formatted text).

    ``around(prompt_ids, prompt_mask)`` returns a context entered for the whole generation
    (the hypernetwork's per-prompt LoRA scales, for instance). ``merge_lora`` folds plain LoRA
    adapters into a copy of the base weights for the duration (``merged_lora``). Prompts are
    left-padded so the prefill (all prompt tokens but the last) is a multiple of
    ``pad_multiple`` wide (``pad_to_multiple``: few attention shapes).
    """
    from transformers import GenerationConfig

    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder '{decoder}': expected one of {', '.join(DECODERS)}")
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_to_multiple(ids, mask, pad_multiple, pad_id, offset=1)
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
    per_prompt = around(ids, mask) if around is not None else contextlib.nullcontext()
    with per_prompt as row_state, merged_lora(model) if merge_lora else contextlib.nullcontext():
        # finished rows may leave the batch where the per-prompt context has no per-row state
        # or can follow the rows that go on (the hypernetwork's ``RowScales``)
        if isinstance(per_prompt, contextlib.nullcontext):
            select_rows = _no_row_state
        else:
            select_rows = getattr(row_state, "select_rows", None)
        completion = DECODERS[decoder](
            model,
            tokenizer,
            ids,
            mask,
            g,
            gen_config,
            stop_strings,
            prefix_sharing,
            select_rows,
            pad_multiple=pad_multiple,
        )
    ids_g = ids.repeat_interleave(g, 0)
    mask_g = mask.repeat_interleave(g, 0)
    return finish_completions(
        tokenizer, ids_g, mask_g, completion, stop_strings or [], max_new_tokens
    )


RowSelector = Callable[[torch.Tensor, int], None]
"""``select_rows(keep, rows)``: of a ``rows``-row batch only rows ``keep`` are decoded on."""


def _no_row_state(keep: torch.Tensor, rows: int) -> None:
    """The model holds no per-row state besides the KV cache."""


def _prefill(model, ids, mask, g, prefix_sharing, pad_multiple: int = 0):
    """A ``DynamicCache`` holding every prompt token but the last, for B*G rows, and the
    [B*G, K] mask of its K columns.

    ``prefix_sharing``: each prompt is run once and its cache repeated to its G rows; with
    ``pad_multiple`` > 0 too, the prompts' common prefix (system prompt, chat template) is run
    once before them (``run_shared_prefix``; not under per-row LoRA scales), and the cache's
    columns are the prefix's, then each prompt's rest: a decoder attends with the returned
    mask, not the prompt's. Only the last position's logits are computed: the prompt's
    others are never read (a [B, P, vocabulary] tensor, ~27% of SmolLM2's prefill compute).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    prompt, prompt_mask = ids[:, :-1], mask[:, :-1]
    if ids.shape[1] <= 1:
        return cache, prompt_mask.repeat_interleave(g, 0)
    prefix = 0
    if prefix_sharing and pad_multiple and not row_scaled(model):
        prefix = shared_prefix_length(prompt, prompt_mask)
    held = prompt_mask[:, :0]
    if prefix:
        prompt, prompt_mask, held = run_shared_prefix(
            model, cache, prompt, prompt_mask, prefix, pad_multiple, logits_to_keep=1
        )
        prompt, prompt_mask = pad_to_multiple(prompt, prompt_mask, pad_multiple)
    elif not prefix_sharing:
        prompt, prompt_mask = prompt.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0)
    model(
        input_ids=prompt,
        attention_mask=torch.cat([held, prompt_mask], 1) if prefix else prompt_mask,
        position_ids=(prefix + prompt_mask.long().cumsum(1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
        **cache_kwarg(model, cache),
    )
    cached = torch.cat([held, prompt_mask], 1) if prefix else prompt_mask
    if prefix_sharing and g > 1:
        cache.batch_repeat_interleave(g)
        cached = cached.repeat_interleave(g, 0)
    return cache, cached


def _generate_hf(
    model,
    tokenizer,
    ids,
    mask,
    g,
    gen_config,
    stop_strings,
    prefix_sharing,
    select_rows=None,
    pad_multiple: int = 0,
) -> torch.Tensor:
    """Completion token ids [B*G, T] from ``model.generate`` (which keeps every row). The
    cache it gets keeps the prompt's own columns (``generate`` attends with the prompt's
    mask), so the prompts' common prefix is not run apart here (``pad_multiple`` unused)."""
    from transformers import StoppingCriteriaList

    ids_g = ids.repeat_interleave(g, 0)
    mask_g = mask.repeat_interleave(g, 0)
    kwargs = {}
    if prefix_sharing and g > 1 and ids.shape[1] > 1:
        kwargs["past_key_values"] = _prefill(model, ids, mask, g, True)[0]
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


@functools.cache
def preallocated_layer_class() -> type:
    """``DynamicLayer`` whose keys and values live in buffers sized for the whole completion.

    ``update`` writes in place instead of concatenating; ``keys``/``values`` stay views of the
    filled part, so everything that reads a ``DynamicLayer`` (sequence length, mask sizes)
    reads this one the same way. Built on first use: transformers is imported lazily.
    """
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def reserve(self, extra: int) -> None:
            n, h, length, d = self.keys.shape
            self._k = self.keys.new_empty(n, h, length + extra, d)
            self._v = self.values.new_empty(n, h, length + extra, d)
            self._k[:, :, :length] = self.keys
            self._v[:, :, :length] = self.values
            self._len = length
            self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self._len + key_states.shape[-2]
            self._k[:, :, self._len : end] = key_states
            self._v[:, :, self._len : end] = value_states
            self._len = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

    return PreallocatedLayer


def _preallocate(cache, extra: int) -> bool:
    """Give every layer of a filled cache room for ``extra`` tokens; False if it cannot."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(
        type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers
    ):
        return False
    for layer in layers:
        layer.__class__ = preallocated_layer_class()
        layer.reserve(extra)
    return True


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row of ``logits`` [N, V]: one uniform per row against the CDF.

    Why not ``torch.multinomial``: on CPU it draws an exponential for every vocabulary entry.
    ``uniform`` [N, 1]: the draws to use (default: fresh ones).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    if top_p < 1.0:
        sorted_w, order = weights.sort(-1, descending=True)
        cdf = sorted_w.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        drop = (cdf - sorted_w) > top_p * cdf[:, -1:]
        sorted_w = sorted_w.masked_fill(drop, 0.0)
        cdf = sorted_w.cumsum(-1)
        u = _uniform(uniform, cdf) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
        return order.gather(-1, pick).squeeze(-1)
    cdf = weights.cumsum(-1)
    u = _uniform(uniform, cdf) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(-1)


def _uniform(uniform: torch.Tensor | None, cdf: torch.Tensor) -> torch.Tensor:
    return torch.rand(cdf.shape[0], 1, device=cdf.device) if uniform is None else uniform


COMPACT_SHARE = 0.25
"""Finished rows leave the decoded batch once they are this share of it: selecting the rows
of the KV cache copies it, so rows leave a few at a time, not one by one."""


def _generate_fast(
    model,
    tokenizer,
    ids,
    mask,
    g,
    gen_config,
    stop_strings,
    prefix_sharing,
    select_rows: RowSelector | None = _no_row_state,
    pad_multiple: int = SEQUENCE_MULTIPLE,
) -> torch.Tensor:
    """Completion token ids [B*G, T]: our own decode loop over a preallocated KV cache
    (``_prefill``'s: the prompts' common prefix run once where ``prefix_sharing``).

    Same contract as ``generate``: rows that finished (EOS or a stop string) are padded with
    the pad token from then on; decoding ends when every row has finished. Finished rows
    leave the decoded batch (``COMPACT_SHARE``) unless ``select_rows`` is None (a per-row
    state outside the cache that cannot follow).
    """
    max_new = gen_config.max_new_tokens
    ids_g = ids.repeat_interleave(g, 0)
    mask_g = mask.repeat_interleave(g, 0)
    n, p = ids_g.shape
    cache, cached = _prefill(model, ids, mask, g, prefix_sharing, pad_multiple)
    if ids.shape[1] > 1 and not _preallocate(cache, max_new + 1):
        return _generate_hf(model, tokenizer, ids, mask, g, gen_config, stop_strings, True)
    seq = ids_g.new_full((n, p + max_new), gen_config.pad_token_id)
    seq[:, :p] = ids_g
    k = cached.shape[1]  # the cache's columns; then the last prompt token, then completions
    attn = mask_g.new_ones(n, k + 1 + max_new)
    attn[:, :k] = cached
    attn[:, k] = mask_g[:, -1]
    position = mask_g.long().sum(1, keepdim=True) - 1  # the last prompt token's position
    stop = stop_criteria(tokenizer, tuple(stop_strings)) if stop_strings else None
    eos_ids = gen_config.eos_token_id
    eos = torch.as_tensor(-1 if eos_ids is None else eos_ids, device=ids.device)  # built once
    finished = torch.zeros(n, dtype=torch.bool, device=ids.device)
    # the rows still decoded (indices into the n rows); attn and position hold only theirs
    live = torch.arange(n, device=ids.device)
    step_input = ids_g[:, -1:] if ids.shape[1] > 1 else ids_g
    step_pos = position if ids.shape[1] > 1 else position_ids_from_mask(mask_g)
    length = p
    for t in range(max_new):
        out = model(
            input_ids=step_input,
            attention_mask=attn[:, : k + 1 + t],
            position_ids=step_pos,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwarg(model, cache),
        )
        cache = out.cache if "cache" in out else out.past_key_values
        logits = out.logits[:, -1]
        everyone = len(live) == n
        if gen_config.do_sample:
            # every row draws, decoded or not: the same random stream, so the same samples,
            # as without compaction
            uniform = torch.rand(n, 1, device=logits.device)
            live_token = sample_next(
                logits,
                gen_config.temperature,
                gen_config.top_p,
                uniform if everyone else uniform[live],
            )
        else:
            live_token = logits.argmax(-1)
        if everyone:
            token = live_token
        else:
            token = seq.new_full((n,), gen_config.pad_token_id)
            token[live] = live_token
        token = token.masked_fill(finished, gen_config.pad_token_id)
        seq[:, p + t] = token
        length = p + t + 1
        done = torch.isin(token, eos)
        if stop is not None:
            if everyone:
                done |= stop(seq[:, :length], None).to(done.device)
            else:
                done[live] |= stop(seq[live, :length], None).to(done.device)
        finished |= done
        if bool(finished.all()):
            break
        position = position + 1
        if select_rows is not None and int(finished[live].sum()) >= COMPACT_SHARE * len(live):
            keep = (~finished[live]).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            select_rows(keep, len(live))
            live, attn, position = live[keep], attn[keep], position[keep]
        step_input = token[live].unsqueeze(1)
        step_pos = position
    return seq[:, p:length]


DECODERS = {"fast": _generate_fast, "hf": _generate_hf}


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
