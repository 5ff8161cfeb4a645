"""Scoring continuations with the policy: log p(continuation | context), batched, no gradient.

Contrastive rewards and multiple-choice probes ask the policy how likely each of a few
short candidate answers is after a long context (prompt + reasoning). Each context is
prefilled once and its KV cache shared by all of its continuations (the same prefix
sharing as the rollouts), so four candidates cost one long forward plus four short ones.
Only the hidden states that predict continuation tokens go through the LM head, in chunks
(gather minus logsumexp), so full-vocabulary log-softmaxes never exist for the batch.

Contexts that start with a shared prefix (the G completions of a group share their prompt)
can name it: each distinct prefix is then prefilled once and its cache shared by the contexts
that start with it. Measured why: under the deepsynapse schema the prompt is most of a
contrastive context, and scoring every context whole made the contrastive reward the costliest
phase of full DeepSynapse's GRPO step (35 s of 115, SmolLM2, bf16 class).
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
        self,
        contexts: Sequence[str],
        continuations: Sequence[Sequence[str]],
        *,
        prefixes: Sequence[str] | None = None,
    ) -> list[list[float]]:
        """``out[i][j] = log p(continuations[i][j] | contexts[i])``, summed over its tokens.

        Context and continuation are tokenized separately and concatenated, so the
        continuation's tokens are exactly those scored. An empty continuation scores 0; an
        empty context is replaced by the BOS (or EOS) token so the first token has a
        predictor. ``prefixes[i]``, where given, must begin ``contexts[i]``: it is tokenized
        apart from the rest of the context (as a prompt is apart from its completion), and
        contexts of one batch with the same prefix share its prefill.
        """
        if len(contexts) != len(continuations):
            raise ValueError(
                f"{len(contexts)} contexts but {len(continuations)} continuation lists"
            )
        split = self._split(contexts, prefixes)
        cont_ids = [self._encode(conts) for conts in continuations]
        out: list[list[float]] = [[0.0] * len(conts) for conts in continuations]
        # whole prefixes together (they share a prefill), shorter contexts first (less padding)
        order = sorted(range(len(contexts)), key=lambda i: (split[i][0], len(split[i][1])))
        with _eval_mode(self.model):
            for b in range(0, len(order), self.max_contexts):
                rows = [i for i in order[b : b + self.max_contexts] if cont_ids[i]]
                if rows:
                    scores = self._score_batch(
                        [split[i] for i in rows], [cont_ids[i] for i in rows]
                    )
                    for i, row_scores in zip(rows, scores, strict=True):
                        out[i] = row_scores
        return out

    def _split(
        self, contexts: Sequence[str], prefixes: Sequence[str] | None
    ) -> list[tuple[tuple[int, ...], list[int]]]:
        """Each context as (prefix token ids, the rest's token ids); no prefix: () and all."""
        start = self.tokenizer.bos_token_id
        start = self.tokenizer.eos_token_id if start is None else start
        if prefixes is None:
            return [((), ids if ids else [start]) for ids in self._encode(contexts)]
        if len(prefixes) != len(contexts):
            raise ValueError(f"{len(contexts)} contexts but {len(prefixes)} prefixes")
        for i, (context, prefix) in enumerate(zip(contexts, prefixes, strict=True)):
            if not context.startswith(prefix):
                raise ValueError(f"prefixes[{i}] does not begin contexts[{i}]")
        heads = self._encode(prefixes)
        rests = self._encode([c[len(p) :] for c, p in zip(contexts, prefixes, strict=True)])
        out = []
        for head, rest in zip(heads, rests, strict=True):
            if not head:  # nothing to share: the whole context, as without prefixes
                out.append(((), rest if rest else [start]))
            else:
                out.append((tuple(head), rest))
        return out

    def _left_padded(self, rows: Sequence[Sequence[int]], pad: int, device) -> tuple:
        """``[B, W]`` ids and mask, left-padded to a multiple of ``pad_multiple``."""
        width = max(len(ids) for ids in rows)
        ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids_t)
        for r, ids in enumerate(rows):
            ids_t[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[r, width - len(ids) :] = 1
        ids_t, mask = pad_to_multiple(ids_t, mask, self.pad_multiple, pad)
        return ids_t.to(device), mask.to(device)

    def _prefill(self, body, cache, contexts: list[tuple[tuple[int, ...], list[int]]], pad, device):
        """Run every context into ``cache``: the hidden state of its last token [B, H] and the
        cache's key mask [B, W]. Rows with a prefix prefill each distinct one once (left
        padded), then their rests, right-padded, on the shared cache."""

        def forward(ids, mask, positions):
            return body(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **cache_kwarg(body, cache),
            ).last_hidden_state

        heads = [head for head, _ in contexts]
        if not all(heads):  # a row without a prefix: every context whole, unshared
            whole = [list(head) + rest for head, rest in contexts]
            ctx, mask = self._left_padded(whole, pad, device)
            return forward(ctx, mask, position_ids_from_mask(mask))[:, -1], mask
        distinct = list(dict.fromkeys(heads))
        owner = torch.tensor([distinct.index(h) for h in heads], device=device)
        ctx, mask = self._left_padded(distinct, pad, device)
        head_last = forward(ctx, mask, position_ids_from_mask(mask))[:, -1][owner]  # [B, H]
        cache.batch_select_indices(owner)
        mask = mask[owner]
        lengths = [len(rest) for _, rest in contexts]
        width = max(lengths)
        if width == 0:
            return head_last, mask
        width += -width % 16  # few attention shapes (see pad_to_multiple)
        rest = torch.full((len(contexts), width), pad, dtype=torch.long)
        rest_mask = torch.zeros_like(rest)
        for r, (_, ids) in enumerate(contexts):
            rest[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            rest_mask[r, : len(ids)] = 1
        rest, rest_mask = rest.to(device), rest_mask.to(device)
        positions = mask.sum(1, keepdim=True) + torch.arange(width, device=device)
        mask = torch.cat([mask, rest_mask], dim=1)
        hidden = forward(rest, mask, positions)  # [B, width, H]
        ends = torch.tensor(lengths, device=device)
        last = hidden[torch.arange(len(contexts), device=device), (ends - 1).clamp(min=0)]
        last = torch.where((ends > 0).unsqueeze(1), last, head_last)
        return last, mask

    def _score_batch(
        self,
        contexts: list[tuple[tuple[int, ...], list[int]]],
        continuations: list[list[list[int]]],
    ) -> list[list[float]]:
        from transformers import DynamicCache

        lm = _causal_lm(self.model)
        body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        head = lm.get_output_embeddings()
        device = next(lm.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        # Contexts into the cache; the last position predicts each first cont. token.
        cache = DynamicCache(config=lm.config)
        last, ctx_mask = self._prefill(body, cache, contexts, pad, device)

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
