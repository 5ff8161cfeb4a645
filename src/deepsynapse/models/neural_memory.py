"""Hybrid modular memory, neural part (MISSION 3.9): learned key/value slots read by attention.

``NeuralMemory`` holds N learned (key, value) slots. The hidden states of one decoder layer
are the queries: each token attends over the N slots with multi-head attention (no mixing
across positions, so causality is untouched and the KV cache of generation still works), and
the read is added to the layer's output through ``tanh(gate)`` with ``gate = 0`` at start, as
in Flamingo's gated cross-attention: the model starts exactly as the base. At gate 0 only the
gate receives a gradient; once it moves, the slots and projections learn too.

``attach_memory`` hooks the module onto a decoder layer's output and registers it inside the
model (parameter names contain ``memory``, which the component-locking classifier uses). The
read is skipped while the LoRA adapters are disabled, so ``PolicyModule.reference()`` (and
the context encoder) still see the frozen base.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsynapse.models.dynamic_lora import (
    adapters_disabled,
    any_lora_layer,
    decoder_layers,
    register_adaptive,
    unregister_adaptive,
)


class NeuralMemory(nn.Module):
    """``forward(h [B, T, H]) -> h + tanh(gate) * read(h)``; identity while ``gate == 0``."""

    def __init__(self, hidden_size: int, num_slots: int = 32, num_heads: int = 4):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(hidden_size)  # queries from normalised residual states
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.keys = nn.Parameter(torch.randn(num_slots, hidden_size))
        self.values = nn.Parameter(torch.randn(num_slots, hidden_size))
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    @property
    def num_slots(self) -> int:
        return self.keys.shape[0]

    def read(self, hidden: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of each position over the slots: [B, T, H] fp32."""
        b, t, h = hidden.shape
        n, heads = self.num_slots, self.num_heads
        d = h // heads
        x = self.norm(hidden.to(self.query.weight.dtype))
        q = self.query(x).view(b, t, heads, d).transpose(1, 2)  # [B, heads, T, d]
        k = self.keys.view(n, heads, d).transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1)
        v = self.values.view(n, heads, d).transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1)
        read = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, d]
        return self.out(read.transpose(1, 2).reshape(b, t, h))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        learns = torch.is_grad_enabled() and self.gate.requires_grad
        if not learns and not bool(self.gate.detach().any()):
            return hidden  # gate 0 and no gradient to it: the read adds exactly nothing
        return hidden + (torch.tanh(self.gate) * self.read(hidden)).to(hidden.dtype)

    def stats(self) -> dict[str, float]:
        """``memory/gate`` (tanh of the gate) for the step's metrics."""
        return {"memory/gate": float(torch.tanh(self.gate.detach()))}


class MemoryHandle:
    """What ``attach_memory`` returns; ``detach()`` removes the hook and the parameters."""

    def __init__(self, model: nn.Module, name: str, hook: Any, memory: NeuralMemory):
        self.model = model
        self.name = name
        self.memory = memory
        self._hook = hook

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            unregister_adaptive(self.model, self.name)


def layer_at_depth(model: nn.Module, depth: float) -> int:
    """Decoder layer index at relative ``depth`` (0 = first, 1 = last)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"memory depth must be in [0, 1], got {depth}")
    return round(depth * (len(decoder_layers(model)) - 1))


def attach_memory(
    model: nn.Module, layer_index: int, memory: NeuralMemory, name: str = "memory"
) -> MemoryHandle:
    """Add ``memory``'s gated read to the output of decoder layer ``layer_index``.

    ``model`` is a ``PeftModel`` or a transformers causal LM. Decoder layers return a tensor
    in transformers 5 and a tuple (hidden, ...) in 4.x; both are handled.
    """
    layers = decoder_layers(model)
    if not -len(layers) <= layer_index < len(layers):
        raise ValueError(f"layer {layer_index} out of range for {len(layers)} decoder layers")
    register_adaptive(model, name, memory)
    probe = any_lora_layer(model)

    def add_read(module: nn.Module, args: tuple, output: Any) -> Any:
        if adapters_disabled(probe):
            return None
        if isinstance(output, tuple):
            return (memory(output[0]), *output[1:])
        return memory(output)

    hook = layers[layer_index].register_forward_hook(add_read)
    return MemoryHandle(model, name, hook, memory)
