"""The policy: a frozen base model with PEFT LoRA adapters, and its log-prob forward.

The reference policy for KL is the same module with the adapters disabled (no second copy
of the weights). Log-probs are computed from the last hidden states in chunks of tokens, on
completion tokens only (no compute on padding), so the full-vocabulary logits never exist for
the whole batch at once; with gradients, each chunk is recomputed in backward instead of
being kept.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepsynapse.models.dynamic_lora import (
    ADAPTIVE_ATTR,
    addmm_lora,
    replayed_in_backward,
    row_scaled,
)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` computes them. [N, L]"""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


SEQUENCE_MULTIPLE = 64


def shares_prompts(body: nn.Module, rows: int, group_size: int) -> bool:
    """Whether ``PolicyModule.forward(..., group_size=G)`` can run each prompt once.

    Not when the rows do not split into groups of G, nor in a forward with gradients while
    gradient checkpointing is on (transformers drops the KV cache there: a layer replayed in
    backward would append to it twice). The no-gradient passes share even then.
    """
    if group_size < 2 or rows % group_size:
        return False
    return not replayed_in_backward(body)


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for the model's forward: ``cache`` where transformers renamed it
    (5.2x deprecates ``past_key_values``, with a warning per call), else ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_argument(type(base)): cache}


SHARED_PREFIX_MULTIPLE = 16
MIN_SHARED_PREFIX = 32


def shared_prefix_length(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading real tokens every left-padded row of ``ids`` [B, P] has in common,
    rounded down to a multiple of ``SHARED_PREFIX_MULTIPLE`` and leaving each row at least
    one token of its own; 0 for fewer than two rows, under ``MIN_SHARED_PREFIX`` tokens, or
    where a row's padding is not all on its left.

    Why rounded: the passes after it attend over the prefix, and each length is one more
    attention shape (CPU flash attention keeps a kernel per shape, ``pad_to_multiple``);
    prompts of one system prompt give one length.
    """
    rows, width = ids.shape
    if rows < 2:
        return 0
    lengths = mask.long().sum(1, keepdim=True)
    starts = width - lengths
    columns = torch.arange(width, device=ids.device)
    if not torch.equal(mask.bool(), columns >= starts):
        return 0
    most = int(lengths.min()) - 1
    if most < MIN_SHARED_PREFIX:
        return 0
    aligned = ids.gather(1, starts + columns[:most])  # [B, most]: real tokens, left-aligned
    differs = (aligned != aligned[:1]).any(0).nonzero()
    same = int(differs[0]) if len(differs) else most
    same -= same % SHARED_PREFIX_MULTIPLE
    return same if same >= MIN_SHARED_PREFIX else 0


def run_shared_prefix(
    model: nn.Module,
    cache: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    prefix: int,
    multiple: int,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the first ``prefix`` real tokens of the left-padded rows ``ids`` [B, P] (the same
    in every row: ``shared_prefix_length``) once into ``cache``, and repeat it to the B rows
    (with autograd, where gradients flow). Returns each row's rest (ids and mask [B, R], the
    columns of the prefix masked) and the [B, K] mask of the cache's columns; the rest's
    positions go on from ``prefix``. ``kwargs`` go to ``model`` (``logits_to_keep``).
    """
    width = ids.shape[1]
    first = width - int(mask[0].sum())  # row 0's first real column
    head, head_mask = pad_to_multiple(
        ids[:1, first : first + prefix], mask.new_ones(1, prefix), multiple
    )
    model(
        input_ids=head,
        attention_mask=head_mask,
        position_ids=position_ids_from_mask(head_mask),
        use_cache=True,
        **cache_kwarg(model, cache),
        **kwargs,
    )
    cache.batch_repeat_interleave(ids.shape[0])
    starts = width - mask.sum(1, keepdim=True)
    rest = width - int(starts.min()) - prefix  # the longest row's columns after the prefix
    columns = torch.arange(width - rest, width, device=ids.device)
    rest_mask = mask[:, width - rest :] * (columns >= starts + prefix)
    return ids[:, width - rest :], rest_mask, head_mask.expand(ids.shape[0], -1)


def pad_to_multiple(
    ids: torch.Tensor, mask: torch.Tensor, multiple: int, pad_id: int = 0, *, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend masked columns to ``[N, W]`` ids and mask so that ``W - offset`` is a multiple.

    Why: PyTorch's CPU flash attention builds a brgemm kernel for each new block shape and
    keeps every one (no cap): batches trimmed to every possible length grew a SmolLM2 run's
    memory by 0.1-0.7 MB a step, and the kernel builds made attention ~2x slower on lengths
    not yet seen (docs/reliability.md, cause 6). A few widths per run keep both flat. Left padding with
    position ids from the mask leaves every real token's output unchanged.
    """
    extra = -(ids.shape[1] - offset) % multiple if multiple > 1 else 0
    if extra == 0:
        return ids, mask
    return (
        torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1),
        torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1),
    )


def _chunk_logprobs(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


@torch.no_grad()
def _chunk_entropy(hidden: torch.Tensor, head: nn.Module, temperature: float) -> torch.Tensor:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def selected_token_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_tokens: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) for each row of ``hidden`` [M, H] -> ([M] fp32, entropy [M] or None)."""
    out, ent = [], []
    grad = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start : start + chunk_tokens]
        t = targets[start : start + chunk_tokens]
        if grad:
            out.append(checkpoint(_chunk_logprobs, h, head, t, temperature, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(h, head, t, temperature))
        if with_entropy:
            ent.append(_chunk_entropy(h.detach(), head, temperature))
    logp = torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
    entropy = (torch.cat(ent) if ent else logp.new_zeros(0)) if with_entropy else None
    return logp, entropy


@dataclass
class LogprobOutput:
    logp: torch.Tensor  # [N, T] fp32, zero where mask == 0
    entropy: torch.Tensor | None  # [N, T] fp32 or None


class PolicyModule(nn.Module):
    """Wraps the PEFT model so one ``forward`` returns completion log-probs.

    Going through ``forward`` matters under DDP/FSDP: the wrapper's hooks see the call.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        chunk_tokens: int = 1024,
        pad_multiple: int = SEQUENCE_MULTIPLE,
        share_prefix: bool = True,
    ):
        super().__init__()
        self.peft_model = peft_model
        self.chunk_tokens = chunk_tokens
        self.pad_multiple = pad_multiple  # sequence widths (pad_to_multiple)
        self.share_prefix = share_prefix  # the prompts' common prefix run once (_shared_states)
        # The reference policy's adapter-side values (None: the base, adapters off).
        self.reference_state: dict[str, torch.Tensor] | None = None

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model with LoRA layers injected (``LlamaForCausalLM``...)."""
        return self.peft_model.get_base_model()

    def low_precision_adapters(self) -> contextlib.AbstractContextManager:
        """On a bf16 base, the fp32 LoRA layers compute in bf16 too (autocast), on the bf16
        input as it comes (no fp32 copy per adapted layer).

        Why: PEFT casts each adapted layer's input to the adapter's fp32 and multiplies in
        fp32: with LoRA on every linear layer, those copies (kept for backward) were most of
        the update's time and memory on CPU. The adapter weights, their gradients and the
        optimizer stay fp32, as with mixed precision elsewhere (TRL's ``bf16=True``).
        """
        base = self.causal_lm.get_input_embeddings().weight
        if base.dtype not in (torch.bfloat16, torch.float16) or not any(
            p.dtype == torch.float32 for p in self.peft_model.parameters() if p.requires_grad
        ):
            return contextlib.nullcontext()
        from peft.helpers import disable_input_dtype_casting

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(base.device.type, dtype=base.dtype))
        stack.enter_context(disable_input_dtype_casting(self.peft_model))
        return stack

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter that is not the frozen base: LoRA, module scales, hypernetwork,
        neural memory (what the policy has learned, whatever locking froze for now)."""
        return {
            name: p
            for name, p in self.peft_model.named_parameters()
            if "lora_" in name or ADAPTIVE_ATTR in name
        }

    def freeze_reference(self) -> None:
        """Make the policy as it is now the reference (the KL's anchor), e.g. where GRPO
        starts after an SFT warm-up: the base would pull the policy back from the warm-up."""
        self.reference_state = {
            name: p.detach().clone() for name, p in self.adapter_parameters().items()
        }

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which the model is the reference policy: the base with the adapters
        off, or, after ``freeze_reference``, the adapter-side parameters as they were then."""
        if self.reference_state is None:
            return adapters_off(self.peft_model)
        return self._reference_swapped()

    @contextlib.contextmanager
    def _reference_swapped(self) -> Iterator[None]:
        """Swap the frozen values into the live parameters (no copies: ``.data`` pointers),
        and back on exit. A LoRA rank grown since then gets zero rows/columns, which leave
        ``B @ A`` as it was (the reference's function is unchanged, as growth's is)."""
        assert self.reference_state is not None
        live = self.adapter_parameters()
        for name, p in live.items():
            frozen = self.reference_state.get(name)
            if frozen is not None and frozen.shape != p.shape:
                self.reference_state[name] = _zero_pad_to(frozen, p.shape)
        swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, p in live.items():
                    frozen = self.reference_state.get(name)
                    if frozen is None:
                        continue
                    swapped.append((p, p.data))
                    p.data = frozen.to(device=p.device, dtype=p.dtype)
            yield
        finally:
            for p, data in swapped:
                p.data = data

    def forward(
        self,
        input_ids: torch.Tensor,  # [N, P + T] prompts left-padded, completions right-padded
        attention_mask: torch.Tensor,  # [N, P + T]
        completion_mask: torch.Tensor,  # [N, T] 1 on completion tokens that count
        temperature: float = 1.0,
        with_entropy: bool = False,
        group_size: int = 1,
    ) -> LogprobOutput:
        """Per-token log-probs (and entropies) of the completion tokens.

        ``group_size`` G > 1: rows come in consecutive groups of G that share one prompt
        (the same ``[P]`` ids and mask), and each prompt is run once; with ``share_prefix``
        the prompts' common prefix runs once too (see ``_shared_states``). The result equals
        the unshared forward's up to float rounding; it runs unshared where no sharing
        applies.
        """
        lm = self.causal_lm
        t = completion_mask.shape[1]
        body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        fused = (
            contextlib.nullcontext() if replayed_in_backward(body) else addmm_lora(self.peft_model)
        )
        with self.low_precision_adapters(), fused:
            hidden = self._shared_states(body, input_ids, attention_mask, t, group_size)
            if hidden is None:
                ids, mask = pad_to_multiple(
                    input_ids[:, :-1], attention_mask[:, :-1], self.pad_multiple
                )
                hidden = body(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=False,
                ).last_hidden_state[:, -t:]  # [N, T, H]: states that predict the completion
        sel = completion_mask.bool()
        targets = input_ids[:, -t:][sel]
        logp_sel, ent_sel = selected_token_logprobs(
            hidden[sel],
            lm.get_output_embeddings(),
            targets,
            self.chunk_tokens,
            temperature,
            with_entropy,
        )
        logp = torch.zeros(completion_mask.shape, dtype=torch.float32, device=input_ids.device)
        logp = logp.masked_scatter(sel, logp_sel)
        entropy = None
        if ent_sel is not None:
            entropy = torch.zeros_like(logp).masked_scatter(sel, ent_sel)
        return LogprobOutput(logp, entropy)

    def _shared_states(
        self,
        body: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        t: int,
        group_size: int,
    ) -> torch.Tensor | None:
        """The [N, T, H] states that predict the completion tokens, work shared across rows
        run once, at two levels:

        - **the prompts' common prefix** (``share_prefix``; the system prompt and chat
          template, ~110 tokens of SmolLM2's ~155 a prompt): one [1, L] pass fills a KV
          cache, repeated to the prompts (``batch_repeat_interleave``, with autograd: every
          row's gradient flows back into the one prefix pass); each prompt then runs only
          its own rest, the prefix's columns masked, positions going on from L. Not under
          per-row LoRA scales (``row_scaled``: the prefix's states would differ by row).
        - **each prompt once for its G completions** (``group_size`` G > 1, rows in
          consecutive groups of G sharing one prompt): the B = N / G prompts' pass (their
          rests after a shared prefix) fills the cache, its last state predicts completion
          token 1; the cache is repeated to the N rows and the completions (all but their
          last token, right-padded with masked columns) run against it, positions going on
          from each prompt's real length.

        With one row per prompt (G = 1) the rest of the prompt and the completion run in one
        pass after the prefix. Both levels give what one pass over the whole left-padded row
        gives (``position_ids_from_mask``), up to float rounding. ``None`` where neither
        applies (``shares_prompts``, ``shared_prefix_length``) or the cache is not plain K/V.
        """
        n, p = input_ids.shape[0], input_ids.shape[1] - t
        prompt, prompt_mask = input_ids[:, :p], attention_mask[:, :p]
        g = group_size if shares_prompts(body, n, group_size) else 1
        if g > 1 and not (
            torch.equal(prompt.view(n // g, g, p), prompt[::g].unsqueeze(1).expand(-1, g, -1))
            and torch.equal(
                prompt_mask.view(n // g, g, p), prompt_mask[::g].unsqueeze(1).expand(-1, g, -1)
            )
        ):
            raise ValueError(f"group_size={g}: rows of a group do not share one prompt")
        own, own_mask = prompt[::g], prompt_mask[::g]  # [B, P]: each prompt once
        prefix = 0
        if self.share_prefix and not replayed_in_backward(body) and not row_scaled(self.peft_model):
            prefix = shared_prefix_length(own, own_mask)
        if g == 1 and not prefix:
            return None
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=body.config)
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            return None  # sliding-window or hybrid layers: a cache that is not plain K/V

        def run(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return body(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions.clamp(min=0),
                use_cache=True,
                **cache_kwarg(body, cache),
            ).last_hidden_state

        held = own_mask[:, :0]  # [B, K]: the mask of the K columns the cache holds
        if prefix:
            own, own_mask, held = run_shared_prefix(
                body, cache, own, own_mask, prefix, self.pad_multiple
            )
        if g == 1:  # the rest of each prompt and its completion in one pass
            ids, mask = pad_to_multiple(
                torch.cat([own, input_ids[:, p:-1]], 1),
                torch.cat([own_mask, attention_mask[:, p:-1]], 1),
                self.pad_multiple,
            )
            positions = prefix + mask.long().cumsum(1) - 1
            return run(ids, torch.cat([held, mask], 1), positions)[:, -t:]
        ids, mask = pad_to_multiple(own, own_mask, self.pad_multiple)
        held = torch.cat([held, mask], 1)
        last = run(ids, held, prefix + mask.long().cumsum(1) - 1)[:, -1:]  # [B, 1, H]
        last = last.repeat_interleave(g, 0)
        if t == 1:
            return last
        cache.batch_repeat_interleave(g)
        c_ids, c_mask = input_ids[:, p:-1], attention_mask[:, p:-1]  # [N, T - 1]
        extra = -c_ids.shape[1] % self.pad_multiple if self.pad_multiple > 1 else 0
        if extra:
            c_ids = torch.cat([c_ids, c_ids.new_zeros(n, extra)], 1)
            c_mask = torch.cat([c_mask, c_mask.new_zeros(n, extra)], 1)
        positions = prompt_mask.long().sum(1, keepdim=True) + c_mask.long().cumsum(1) - 1
        hidden = run(c_ids, torch.cat([held.repeat_interleave(g, 0), c_mask], 1), positions)
        return torch.cat([last, hidden[:, : t - 1]], 1)  # [N, T, H]


def _zero_pad_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``tensor`` in the top-left corner of zeros of ``shape`` (every dim >= the tensor's)."""
    if any(have > want for have, want in zip(tensor.shape, shape, strict=True)):
        raise ValueError(f"reference policy: a {tuple(tensor.shape)} tensor shrank to {shape}")
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


@contextlib.contextmanager
def adapters_off(peft_model: nn.Module):
    """PEFT's ``disable_adapter`` that leaves ``requires_grad`` as it found it.

    On exit PEFT re-activates the adapter with ``set_adapter``, which marks every adapter
    parameter trainable again: that would silently undo component locking.
    """
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str]):
    """Freeze ``model`` and add PEFT LoRA adapters (fp32 weights even on a bf16 base)."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = (
        "all-linear" if target_modules == ["all-linear"] else list(target_modules)
    )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
