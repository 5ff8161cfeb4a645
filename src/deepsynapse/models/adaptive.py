"""What DeepSynapse adds to the PEFT policy, built from config in one place: all optional.

- dynamic LoRA rank (grows at phase changes, function unchanged at the moment of growth),
  per-module LoRA scales, DyLoRA-style nested ranks;
- a hypernetwork that scales LoRA per prompt from a cached context embedding (3.10);
- a gated neural memory read by attention from one decoder layer (3.9).

With every part off this object does nothing and the policy is plain PEFT LoRA.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deepsynapse.models.context import ContextEncoder
from deepsynapse.models.dynamic_lora import (
    adaptive_modules,
    add_module_scales,
    current_rank,
    grow_lora_rank,
    load_lora_state_dict,
    lora_state_dict,
    module_scale_stats,
    register_adaptive,
    sample_nested_rank,
    truncated_rank,
)
from deepsynapse.models.hypernet import (
    ContextualScaler,
    LoRAHypernetwork,
    RowScales,
    num_outputs_for,
)
from deepsynapse.models.neural_memory import NeuralMemory, attach_memory, layer_at_depth


class AdaptivePolicy:
    """Owns the optional adaptive parts of one PEFT model and the hooks they need."""

    def __init__(self, peft_model: nn.Module, cfg: Any):
        self.peft_model = peft_model
        self.cfg = cfg
        hidden = peft_model.get_base_model().config.hidden_size
        self.scaler: ContextualScaler | None = None
        self.memory: NeuralMemory | None = None
        if cfg.lora.module_scales:
            add_module_scales(peft_model)
        if cfg.memory.enabled:
            self.memory = NeuralMemory(hidden, cfg.memory.slots, cfg.memory.heads)
            attach_memory(peft_model, layer_at_depth(peft_model, cfg.memory.depth), self.memory)
        if cfg.hypernet.enabled:
            gran = cfg.hypernet.granularity
            hypernet = LoRAHypernetwork(
                hidden,
                num_outputs_for(peft_model, gran),
                cfg.hypernet.bottleneck,
                cfg.hypernet.max_change,
            )
            register_adaptive(peft_model, "hypernet", hypernet)
            encoder = ContextEncoder(
                peft_model,
                cfg.hypernet.context_layer,
                cfg.hypernet.cache_size,
                cfg.model.pad_to_multiple_of,
            )
            self.scaler = ContextualScaler(peft_model, encoder, hypernet, gran)
        self._hypernet_stats: dict[str, float] = {}
        self.nested_rank: int | None = None

    # ---------------------------------------------------------------- optimizer groups

    def param_groups(
        self, params: list[tuple[str, nn.Parameter]], weight_decay: float
    ) -> list[dict]:
        """LoRA at the base lr; hypernet/memory at their multipliers; scales and norms undecayed."""
        groups: dict[str, dict] = {}

        def add(key: str, p: nn.Parameter, **opts: Any) -> None:
            groups.setdefault(key, {"params": [], **opts})["params"].append(p)

        for name, p in params:
            if "hypernet" in name:
                add("hypernet", p, lr_mult=self.cfg.hypernet.lr_mult, weight_decay=0.0)
            elif "memory" in name:
                add("memory", p, lr_mult=self.cfg.memory.lr_mult, weight_decay=0.0)
            elif "module_scales" in name or "norm" in name:
                add("scales", p, lr_mult=1.0, weight_decay=0.0)
            else:
                add("lora", p, lr_mult=1.0, weight_decay=weight_decay)
        return list(groups.values())

    # ---------------------------------------------------------------- per step

    def maybe_grow(self, rank: int | None, optimizer: Any, seed: int) -> dict | None:
        if not rank or rank <= current_rank(self.peft_model):
            return None
        return grow_lora_rank(self.peft_model, rank, optimizer, seed=seed)

    @contextlib.contextmanager
    def step_context(self, seed: int) -> Iterator[None]:
        """DyLoRA nested rank for the whole step (sampling and update use the same rank)."""
        if not self.cfg.lora.nested_rank:
            self.nested_rank = None
            yield
            return
        rank = current_rank(self.peft_model)
        self.nested_rank = sample_nested_rank(
            rank, random.Random(seed), self.cfg.lora.nested_min_rank
        )
        with truncated_rank(self.peft_model, self.nested_rank):
            yield

    def for_prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Context for generation: per-prompt LoRA scales (B rows, expanded to B*G).

        A hypernetwork still at identity (every multiplier exactly 1: zero-initialised, or
        locked until the curriculum unlocks it) installs nothing, so LoRA stays mergeable and
        decoding takes the fast path (measured: the per-prompt hooks cost full DeepSynapse 43 s
        of a 103 s step).
        """
        if self.scaler is None:
            return contextlib.nullcontext()
        if self.scaler.hypernet.is_identity():
            self._hypernet_stats = self.scaler.hypernet.identity_stats()
            return contextlib.nullcontext()
        return self._for_prompts(prompt_ids, prompt_mask)

    @contextlib.contextmanager
    def _for_prompts(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> Iterator[RowScales]:
        assert self.scaler is not None
        with self.scaler.for_prompts(prompt_ids, prompt_mask) as rows:
            yield rows
        self._hypernet_stats = self.scaler.hypernet.scale_stats()

    def for_rows(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Context for a training forward (and its backward): hypernet scales with gradient.

        A hypernetwork at identity that takes no gradient here (locked: the warm-up trains
        LoRA only, as does the curriculum's first phase; or no grad enabled) multiplies by 1
        and learns nothing, so nothing is installed: no per-prompt context forward, no hooks
        (measured side by side on one core each: full without the critique schema, warm-up step
        6.02 -> 4.75 s; plain's 4.37).
        """
        if self.scaler is None:
            return contextlib.nullcontext()
        hypernet = self.scaler.hypernet
        learns = torch.is_grad_enabled() and any(p.requires_grad for p in hypernet.parameters())
        if not learns and hypernet.is_identity():
            return contextlib.nullcontext()
        context = self.scaler.encoder.embed(prompt_ids, prompt_mask)
        return self.scaler.scales(self.scaler.hypernet(context))

    # ---------------------------------------------------------------- telemetry and state

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"lora/rank": float(current_rank(self.peft_model))}
        if self.nested_rank is not None:
            out["lora/nested_rank"] = float(self.nested_rank)
        if self.cfg.lora.module_scales:
            out.update(module_scale_stats(self.peft_model))
        if self.scaler is not None:
            out.update(self._hypernet_stats)
            out.update(self.scaler.encoder.stats())
        if self.memory is not None:
            out.update(self.memory.stats())
        return out

    def state_dict(self) -> dict[str, Any]:
        modules = adaptive_modules(self.peft_model)
        state: dict[str, Any] = {"lora": lora_state_dict(self.peft_model)}
        if "hypernet" in modules:
            state["hypernet"] = modules["hypernet"].state_dict()
        if self.memory is not None:
            state["memory"] = self.memory.state_dict()
        if self.scaler is not None:
            state["context"] = self.scaler.encoder.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], optimizer: Any = None) -> None:
        """Grow to the saved rank first (weights must fit), then restore the parts."""
        load_lora_state_dict(self.peft_model, state["lora"], optimizer)
        modules = adaptive_modules(self.peft_model)
        if "hypernet" in state and "hypernet" in modules:
            modules["hypernet"].load_state_dict(state["hypernet"])
        if "memory" in state and self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        if "context" in state and self.scaler is not None:
            self.scaler.encoder.load_state_dict(state["context"])

    def identity(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "module_scales": c.lora.module_scales,
            "hypernet": c.hypernet.granularity if c.hypernet.enabled else None,
            "memory": [c.memory.slots, c.memory.heads, c.memory.depth]
            if c.memory.enabled
            else None,
        }
