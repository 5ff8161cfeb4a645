"""Stock transformers layers that keep less for backward: the same function, less memory.

What a GRPO update keeps for backward is most of its peak memory (SmolLM2, 16 completions of
128 tokens after 4 prompts, fp32, LoRA on every linear layer: 4,486 MB saved, the model 540
MB). Two of the layers' habits cost 1.9 GB of it, and each has an exact fix; with both the
update keeps 3,372 MB, and the reference GRPO step measured 23.7 s at 5.3 GB peak against
26.8 s at 6.8 GB (Intel Xeon, fp32, docs/benchmarks.md):

- **Grouped-query attention.** transformers' SDPA attention copies every key/value head once
  per query head of its group (``repeat_kv``) whenever an attention mask is passed, and our
  batches are padded, so one always is: every training forward, reference pass, SFT step and
  prefill. SDPA then saves those copies: SmolLM2 has 9 query heads on 3 key/value heads, and
  the copies were 810 MB of the 4,486 (``(16, 9, 384, 64)`` x 2 a layer). PyTorch's CPU SDPA
  takes grouped heads as they are (``enable_gqa=True``), masks included: the same outputs and
  gradients bit for bit, and one layer's attention forward+backward at that shape took 119 ms
  against 163 (the copies' memory traffic; Intel Xeon, fp32, one thread). Registered as the
  attention implementation ``sdpa_gqa``; single-token decoding, unmasked calls, position
  biases and non-CPU devices go through transformers' SDPA unchanged (on CUDA a masked grouped
  call falls back to SDPA's math kernel, which would cost more than the copies).
- **The gated MLP** ``down(silu(gate(x)) * up(x))``: autograd saves ``gate(x)`` for the SiLU,
  and ``silu(gate(x))`` and ``up(x)`` for the product, three intermediate-wide tensors a layer
  (1,080 MB of the 4,486 at the shape above). ``silu_mul`` saves ``gate(x)`` and ``up(x)`` and
  recomputes the sigmoid in backward (a few elementwise operations against the layer's three
  matmuls), on every device.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GQA_ATTENTION", "sdpa_gqa_attention", "silu_mul", "use_lean_layers"]

GQA_ATTENTION = "sdpa_gqa"

# Gated MLPs whose forward is exactly down(silu(gate(x)) * up(x)) (with a SiLU act_fn)
GATED_SILU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU_ACTIVATIONS = frozenset({"SiLU", "SiLUActivation"})  # torch's; transformers' ACT2FN["silu"]


def sdpa_gqa_attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, H, Tq, D]
    key: torch.Tensor,  # [B, KV, Tk, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; output ``[B, Tq, H, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if (
        not grouped
        or query.device.type != "cpu"
        or query.shape[2] == 1
        or attention_mask is None
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving its two inputs (not also ``silu(gate)``)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        dtype = gate.dtype
        if dtype in (torch.bfloat16, torch.float16):  # in fp32, as torch's SiLU backward is
            gate, up, grad = gate.float(), up.float(), grad.float()
        sig = torch.sigmoid(gate)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = (grad * (gate * sig)).to(dtype)
        if ctx.needs_input_grad[0]:  # silu'(g) = s (1 + g (1 - s))
            grad_gate = (grad * up * sig * (1 + gate * (1 - sig))).to(dtype)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``; under autograd it keeps ``gate`` and ``up`` only."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _register_attention() -> None:
    """Make ``sdpa_gqa`` a name transformers knows (attention and its mask: SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_ATTENTION, sdpa_gqa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)


def use_lean_layers(model: nn.Module) -> nn.Module:
    """Switch a loaded model's SDPA attention to ``sdpa_gqa`` and its gated SiLU MLPs to
    ``silu_mul`` (others are left as they are). Nothing of it is saved with the model."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa":
        _register_attention()
        model.set_attn_implementation(GQA_ATTENTION)
    for module in model.modules():
        act = type(getattr(module, "act_fn", None)).__name__
        if type(module).__name__ in GATED_SILU_MLPS and act in SILU_ACTIVATIONS:
            module.forward = types.MethodType(_gated_mlp_forward, module)
    return model
