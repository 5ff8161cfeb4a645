"""Context embeddings of prompts (MISSION 3.10, cached per 3.14) for the LoRA hypernetwork.

The embedding of a prompt is the mean, over its tokens, of one decoder layer's output in the
*frozen base* (adapters and DeepSynapse's memory off, no gradient). It depends only on the
prompt's tokens, so it is computed once per distinct prompt and kept in an LRU cache keyed by
a hash of the token ids: the G completions of a group, the inner iterations and later epochs
reuse it.

Each missing prompt runs alone, right-padded to a multiple of ``pad_multiple`` tokens (few
attention shapes, see ``pad_to_multiple``; causal attention keeps the padding out of the real
tokens' states): the vector is then the same whatever batch the prompt arrives in or however
wide its padding there, so a run resumed with an empty cache computes bit-identical
embeddings (exact resume).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from deepsynapse.models.dynamic_lora import causal_lm, decoder_layers
from deepsynapse.models.policy import SEQUENCE_MULTIPLE, adapters_off


def prompt_key(ids: torch.Tensor) -> str:
    """Cache key of one prompt's real (non-pad) token ids."""
    data = ids.detach().to("cpu", torch.int64).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ContextEncoder:
    """``embed(input_ids, attention_mask) -> [B, H]``: per-prompt context vectors, cached.

    ``layer`` indexes the decoder layers (negative counts from the end; -1 = the last
    layer's output, before the final norm).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int = -1,
        cache_size: int = 4096,
        pad_multiple: int = SEQUENCE_MULTIPLE,
    ):
        n = len(decoder_layers(model))
        if not -n <= layer < n:
            raise ValueError(f"context layer {layer} out of range for {n} decoder layers")
        self.model = model
        self.layer = layer % n
        self.cache_size = cache_size
        self.pad_multiple = max(pad_multiple, 1)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def hidden_size(self) -> int:
        return int(causal_lm(self.model).config.hidden_size)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the chosen layer's states over each row's non-pad tokens: [B, H] fp32."""
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            tokens = ids[mask.bool()]
            key = prompt_key(tokens)
            vector = self.cache.get(key)
            if vector is None:
                self.misses += 1
                vector = self._compute(tokens)
                self.cache[key] = vector
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
            else:
                self.hits += 1
                self.cache.move_to_end(key)
            rows.append(vector)
        if not rows:
            return torch.zeros(0, self.hidden_size, device=input_ids.device)
        return torch.stack(rows).to(input_ids.device)

    def _compute(self, tokens: torch.Tensor) -> torch.Tensor:
        lm = causal_lm(self.model)
        body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        captured: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        n = len(tokens)
        padded = torch.cat([tokens, tokens.new_zeros(-n % self.pad_multiple)])  # right: causal
        handle = decoder_layers(self.model)[self.layer].register_forward_hook(grab)
        off = (
            adapters_off(self.model)
            if hasattr(self.model, "disable_adapter")
            else contextlib.nullcontext()
        )
        was_training = lm.training
        lm.eval()
        try:
            with off:
                body(input_ids=padded.unsqueeze(0), use_cache=False)
        finally:
            handle.remove()
            lm.train(was_training)
        return captured[0][0, :n].float().mean(0)  # [H]

    def stats(self) -> dict[str, float]:
        """``context/cache_hits|misses|hit_rate|size`` for the step's metrics."""
        total = self.hits + self.misses
        return {
            "context/cache_hits": float(self.hits),
            "context/cache_misses": float(self.misses),
            "context/cache_hit_rate": self.hits / total if total else 0.0,
            "context/cache_size": float(len(self.cache)),
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters only: the cache is recomputed on demand (the base is frozen)."""
        return {"layer": self.layer, "hits": self.hits, "misses": self.misses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["layer"]) != self.layer:
            raise ValueError(f"context layer {state['layer']} saved, {self.layer} configured")
        self.hits = int(state["hits"])
        self.misses = int(state["misses"])
