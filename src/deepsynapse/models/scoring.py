"""Scoring continuations with the policy: log p(continuation | context), batched, no gradient.

Contrastive rewards and multiple-choice probes ask the policy how likely each of a few
short candidate answers is after a long context (prompt + reasoning). Each context is
prefilled once and its KV cache shared by all of its continuations (the same prefix
sharing as the rollouts), so four candidates cost one long forward plus four short ones.
Only the hidden states that predict continuation tokens go through the LM head, in chunks
(gather minus logsumexp), so full-vocabulary log-softmaxes never exist for the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from deepsynapse.models.policy import (
    SEQUENCE_MULTIPLE,
    cache_kwarg,
    pad_to_multiple,
    position_ids_from_mask,
    selected_token_logprobs,
)

__all__ = ["PolicyScorer"]


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT model / PolicyModule (adapters stay active)."""
    if hasattr(model, "causal_lm"):  # deepsynapse PolicyModule
        return model.causal_lm
    if hasattr(model, "get_base_model"):  # PeftModel: LoRA layers are injected in place
        return model.get_base_model()
    return model


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout (LoRA's included) off while scoring, the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class PolicyScorer:
    """Total log-probabilities of continuations under a causal LM (HF or PEFT model).

    ``max_contexts`` contexts are prefilled per batch (sorted by length to limit padding);
    ``chunk_tokens`` bounds how many positions go through the LM head at once; contexts are
    padded to a multiple of ``pad_multiple`` tokens (``pad_to_multiple``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_contexts: int = 16,
        chunk_tokens: int = 1024,
        pad_multiple: int = SEQUENCE_MULTIPLE,
    ) -> None:
        if min(max_contexts, chunk_tokens, pad_multiple) < 1:
            raise ValueError("max_contexts, chunk_tokens and pad_multiple must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_contexts = max_contexts
        self.chunk_tokens = chunk_tokens
        self.pad_multiple = pad_multiple

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def continuation_logprobs(
        self, contexts: Sequence[str], continuations: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """``out[i][j] = log p(continuations[i][j] | contexts[i])``, summed over its tokens.

        Context and continuation are tokenized separately and concatenated, so the
        continuation's tokens are exactly those scored. An empty continuation scores 0; an
        empty context is replaced by the BOS (or EOS) token so the first token has a
        predictor.
        """
        if len(contexts) != len(continuations):
            raise ValueError(
                f"{len(contexts)} contexts but {len(continuations)} continuation lists"
            )
        ctx_ids = self._encode(contexts)
        start = self.tokenizer.bos_token_id
        start = self.tokenizer.eos_token_id if start is None else start
        ctx_ids = [ids if ids else [start] for ids in ctx_ids]
        cont_ids = [self._encode(conts) for conts in continuations]
        out: list[list[float]] = [[0.0] * len(conts) for conts in continuations]
        order = sorted(range(len(contexts)), key=lambda i: len(ctx_ids[i]))
        with _eval_mode(self.model):
            for b in range(0, len(order), self.max_contexts):
                rows = [i for i in order[b : b + self.max_contexts] if cont_ids[i]]
                if rows:
                    scores = self._score_batch(
                        [ctx_ids[i] for i in rows], [cont_ids[i] for i in rows]
                    )
                    for i, row_scores in zip(rows, scores, strict=True):
                        out[i] = row_scores
        return out

    def _score_batch(
        self, contexts: list[list[int]], continuations: list[list[list[int]]]
    ) -> list[list[float]]:
        from transformers import DynamicCache

        lm = _causal_lm(self.model)
        body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        head = lm.get_output_embeddings()
        device = next(lm.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        # Contexts, left-padded: [B, P]; the last position predicts each first cont. token.
        width = max(len(ids) for ids in contexts)
        ctx = torch.full((len(contexts), width), pad, dtype=torch.long)
        ctx_mask = torch.zeros_like(ctx)
        for r, ids in enumerate(contexts):
            ctx[r, width - len(ids) :] = torch.tensor(ids)
            ctx_mask[r, width - len(ids) :] = 1
        ctx, ctx_mask = pad_to_multiple(ctx, ctx_mask, self.pad_multiple, pad)
        ctx, ctx_mask = ctx.to(device), ctx_mask.to(device)
        cache = DynamicCache(config=lm.config)
        last = body(
            input_ids=ctx,
            attention_mask=ctx_mask,
            position_ids=position_ids_from_mask(ctx_mask),
            use_cache=True,
            **cache_kwarg(body, cache),
        ).last_hidden_state[:, -1]  # [B, H]

        # Continuations, right-padded: [N, C], N = all continuations of the batch.
        owner = [r for r, conts in enumerate(continuations) for _ in conts]
        flat = [ids for conts in continuations for ids in conts]
        c_width = max(1, max(len(ids) for ids in flat))
        cont = torch.full((len(flat), c_width), pad, dtype=torch.long)
        cont_mask = torch.zeros_like(cont)
        for n, ids in enumerate(flat):
            cont[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            cont_mask[n, : len(ids)] = 1
        cont, cont_mask = cont.to(device), cont_mask.to(device)
        index = torch.tensor(owner, device=device)
        cache.batch_select_indices(index)
        full_mask = torch.cat([ctx_mask[index], cont_mask.new_ones(cont_mask.shape)], dim=1)
        positions = ctx_mask[index].sum(1, keepdim=True) + torch.arange(c_width, device=device)
        hidden = body(
            input_ids=cont,
            attention_mask=full_mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwarg(body, cache),
        ).last_hidden_state  # [N, C, H]
        # Predictor of token k: the context's last state for k = 0, else cont. state k - 1.
        predictors = torch.cat([last[index].unsqueeze(1), hidden[:, :-1]], dim=1)  # [N, C, H]
        sel = cont_mask.bool()
        logp, _ = selected_token_logprobs(predictors[sel], head, cont[sel], self.chunk_tokens)
        per_token = torch.zeros(cont.shape, dtype=torch.float32, device=device)
        totals = per_token.masked_scatter(sel, logp).sum(1).tolist()
        out: list[list[float]] = [[] for _ in continuations]
        for r, total in zip(owner, totals, strict=True):
            out[r].append(float(total))
        return out
