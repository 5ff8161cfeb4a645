"""Meta-contextual adaptation (MISSION 3.10): a hypernetwork sets per-layer LoRA scales per prompt.

``LoRAHypernetwork`` maps a prompt's context embedding [B, H] (``ContextEncoder``) to one
multiplier per decoder layer (or per LoRA module) [B, L]: ``1 + max_change * tanh(up(...))``
with ``up`` zero-initialised, so at initialisation every multiplier is exactly 1 and the
policy is plain LoRA. ``hypernet_scales(model, multipliers)`` applies them: a forward hook
on each ``lora_B`` multiplies that module's update, row by row, by its layer's multiplier.

Rows. ``multipliers`` has one row per batch row, or one row per prompt when the batch holds
k contiguous copies of each prompt (the G completions of a group, as rollouts lay them out):
a batch of k*B rows takes each multiplier row k times. So during a prefix-shared rollout the
prefill (B rows) and the decode steps (B*G rows) both get the right rows.

Export. ``bake_mean_scales`` folds fixed per-layer multipliers (the mean over the eval
prompts) into ``lora_B``; ``baked_adapter`` does that and the module scales temporarily, so
``save_pretrained`` inside it writes a plain PEFT adapter, and restores the weights after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from deepsynapse.models.context import ContextEncoder
from deepsynapse.models.dynamic_lora import (
    ROW_SCALES_ATTR,
    active_adapter,
    add_module_scales,
    addmm_forward,
    bake_module_scales,
    causal_lm,
    decoder_layers,
    lora_layer_indices,
    lora_layers,
    module_scale_columns,
    module_scale_factors,
    module_scale_hooks,
    module_scales,
    remove_module_scales,
    replayed_in_backward,
    swappable_lora,
)

Granularity = Literal["layer", "module"]
SATURATED = 0.99  # a multiplier this close to 1 +- max_change counts as saturated


class LoRAHypernetwork(nn.Module):
    """Context embedding [B, H] -> LoRA scale multipliers [B, num_outputs], exactly 1 at init."""

    def __init__(
        self, hidden_size: int, num_outputs: int, bottleneck: int = 64, max_change: float = 1.0
    ):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)  # context scales differ a lot between layers
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, num_outputs)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.max_change = max_change
        self.last: torch.Tensor | None = None  # detached multipliers of the last call

    @property
    def num_outputs(self) -> int:
        return self.up.out_features

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.norm(context.to(self.down.weight.dtype))
        multipliers = 1.0 + self.max_change * torch.tanh(self.up(self.act(self.down(x))))
        self.last = multipliers.detach()
        return multipliers

    def is_identity(self) -> bool:
        """Whether every multiplier is exactly 1 whatever the context (``up`` all zero)."""
        return not (bool(self.up.weight.any()) or bool(self.up.bias.any()))

    def identity_stats(self) -> dict[str, float]:
        """``scale_stats`` of an identity hypernetwork (every multiplier 1), without running it."""
        return self._stats(torch.ones(1, 1))

    def scale_stats(self) -> dict[str, float]:
        """``hypernet/scale_{mean,std,min,max}`` of the last multipliers and the share of them
        saturated (``scale_saturated``); empty before a call."""
        if self.last is None or self.last.numel() == 0:
            return {}
        return self._stats(self.last.float())

    def _stats(self, m: torch.Tensor) -> dict[str, float]:
        return {
            "hypernet/scale_mean": float(m.mean()),
            "hypernet/scale_std": float(m.std(unbiased=False)),
            "hypernet/scale_min": float(m.min()),
            "hypernet/scale_max": float(m.max()),
            # at tanh's bounds the gradient vanishes: a saturated multiplier no longer learns
            "hypernet/scale_saturated": float(
                ((m - 1.0).abs() > SATURATED * self.max_change).float().mean()
            ),
        }


def _columns(model: nn.Module, width: int, per: Granularity) -> list[int]:
    """For each LoRA layer, the column of the multipliers it uses."""
    if per == "layer":
        n = len(decoder_layers(model))
        if width != n:
            raise ValueError(f"per-layer multipliers need {n} columns, got {width}")
        return lora_layer_indices(model)
    n = len(lora_layers(model))
    if width != n:
        raise ValueError(f"per-module multipliers need {n} columns, got {width}")
    return list(range(n))


def _expand_rows(multipliers: torch.Tensor, rows: int) -> torch.Tensor:
    have = multipliers.shape[0]
    if have == rows:
        return multipliers
    if have and rows % have == 0:
        return multipliers.repeat_interleave(rows // have, 0)
    raise ValueError(f"{have} multiplier rows cannot scale a batch of {rows} rows")


def num_outputs_for(model: nn.Module, per: Granularity) -> int:
    """How many multipliers the hypernetwork must produce for ``model``."""
    return len(decoder_layers(model)) if per == "layer" else len(lora_layers(model))


class RowScales:
    """What ``hypernet_scales`` yields: a decoder that drops finished rows from its batch says
    which rows go on, so each remaining row keeps its prompt's multipliers."""

    def __init__(self, select_rows: Callable[[torch.Tensor, int], None]):
        self.select_rows = select_rows


@contextlib.contextmanager
def hypernet_scales(
    model: nn.Module,
    multipliers: torch.Tensor,
    per: Granularity = "layer",
    fused: bool = False,
    addmm: bool = False,
) -> Iterator[RowScales]:
    """Inside, each LoRA update of row i in layer l is multiplied by ``multipliers[i, l]``.

    Gradients flow into ``multipliers`` (and the hypernetwork behind them). With gradient
    checkpointing, run the backward inside the context too (the recomputation needs the hooks).
    ``select_rows(keep, rows)`` on what it yields: of a ``rows``-row batch, only rows ``keep``
    are forwarded from now on.

    ``fused`` (decoding: no gradient, dropout off): each plain LoRA layer's forward is swapped
    for ``base(x) + ((x A^T) * m) (s B)^T``, the LoRA scaling and module scale folded into B
    once. Per-row scales keep LoRA from being merged into the weights, and at a decode
    step's few rows PEFT's forward (dropout, A, B and hook calls, then scaling) costs more
    than its matmuls; this is the same function in four operations.

    ``addmm`` (training: gradients flow): the same swap with gradients to A, B, the module
    scale and the multipliers, ``addmm(base(x), (x A^T) * m * ms, B^T, alpha=s)``: the rows'
    and the module's scales multiply the rank-wide product, not the full-width output as the
    hooks do, forward and backward. Not under gradient checkpointing (the replay in backward
    must run the same code).
    """
    adapter = active_adapter(model)
    columns = _columns(model, multipliers.shape[1], per)
    cached: dict[int, torch.Tensor] = {}

    def rows_for(n: int) -> torch.Tensor:  # [L, n]
        if multipliers.requires_grad:  # a fresh graph per call: nothing shared across backwards
            return _expand_rows(multipliers, n).t()
        if n not in cached:
            cached[n] = _expand_rows(multipliers, n).t().contiguous()
        return cached[n]

    handles = []
    swapped: list[nn.Module] = []
    allowed = module_scale_hooks(model)
    factor = module_scale_factors(model) if fused else {}
    addmm = addmm and not fused and not replayed_in_backward(causal_lm(model))
    own_scales = module_scale_columns(model) if addmm else {}
    for col, (name, layer) in zip(columns, lora_layers(model, adapter), strict=True):
        if (fused or addmm) and swappable_lora(layer, adapter, allowed):
            if fused:
                layer.forward = _row_scaled_forward(layer, adapter, col, rows_for, factor.get(name))
            else:

                def rows(n: int, col: int = col) -> torch.Tensor:
                    return rows_for(n)[col]

                layer.forward = addmm_forward(layer, adapter, own_scales.get(name), rows)
            swapped.append(layer)
            continue

        def scale(module: nn.Module, args: tuple, out: torch.Tensor, col: int = col):
            m = rows_for(out.shape[0])[col]
            return out * m.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)

        handles.append(layer.lora_B[adapter].register_forward_hook(scale))

    def select_rows(keep: torch.Tensor, rows: int) -> None:
        nonlocal multipliers
        multipliers = _expand_rows(multipliers, rows).index_select(0, keep)
        cached.clear()

    lm = causal_lm(model)
    setattr(lm, ROW_SCALES_ATTR, getattr(lm, ROW_SCALES_ATTR, 0) + 1)  # row_scaled() says so
    try:
        yield RowScales(select_rows)
    finally:
        setattr(lm, ROW_SCALES_ATTR, getattr(lm, ROW_SCALES_ATTR) - 1)
        for h in handles:
            h.remove()
        for layer in swapped:
            del layer.forward  # PEFT's own again


def _row_scaled_forward(
    layer: nn.Module,
    adapter: str,
    col: int,
    rows_for: Callable[[int], torch.Tensor],
    module_scale: float | None,
) -> Callable[..., torch.Tensor]:
    """``layer``'s forward with its LoRA update scaled per row by ``rows_for(n)[col]``."""
    base = layer.base_layer
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter].weight
    scale = layer.scaling[adapter] * (1.0 if module_scale is None else module_scale)
    b_scaled = (b * scale).detach()

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = base(x, *args, **kwargs)
        if layer.disable_adapters:
            return out
        h = nn.functional.linear(x.to(a.dtype), a)
        m = rows_for(h.shape[0])[col].to(h.dtype)
        h = h * m.view(-1, *([1] * (h.dim() - 1)))
        return out + nn.functional.linear(h, b_scaled).to(out.dtype)

    return forward


@torch.no_grad()
def bake_mean_scales(
    model: nn.Module, mean_multipliers: torch.Tensor, per: Granularity = "layer"
) -> None:
    """Fold fixed multipliers [L] into ``lora_B`` (in place): plain PEFT approximates the hypernet."""
    adapter = active_adapter(model)
    mean = mean_multipliers.detach().reshape(-1)
    columns = _columns(model, mean.shape[0], per)
    for col, (_, layer) in zip(columns, lora_layers(model, adapter), strict=True):
        b = layer.lora_B[adapter]
        b.weight.mul_(mean[col].to(b.weight))
        if b.bias is not None:
            b.bias.mul_(mean[col].to(b.bias))


@contextlib.contextmanager
def baked_adapter(
    model: nn.Module, mean_multipliers: torch.Tensor | None = None, per: Granularity = "layer"
) -> Iterator[None]:
    """Inside, ``lora_B`` holds the module scales and mean multipliers folded in; restored after.

    ``with baked_adapter(m, mean): m.save_pretrained(folder)`` writes an adapter that
    ``peft.PeftModel.from_pretrained`` loads with no DeepSynapse code.
    """
    adapter = active_adapter(model)
    saved = []
    for _, layer in lora_layers(model, adapter):
        b = layer.lora_B[adapter]
        saved.append((b, b.weight.detach().clone(), None if b.bias is None else b.bias.clone()))
    scales = module_scales(model)
    saved_scales = None if scales is None else scales.scales.detach().clone()
    bake_module_scales(model)
    if mean_multipliers is not None:
        bake_mean_scales(model, mean_multipliers, per)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, weight, bias in saved:
                b.weight.copy_(weight)
                if bias is not None:
                    b.bias.copy_(bias)
            if scales is not None:
                scales.scales.copy_(saved_scales)


def bake_saved_scales(
    model: nn.Module,
    lora_state: dict | None,
    mean_multipliers: torch.Tensor | None = None,
    per: Granularity = "layer",
) -> None:
    """Export path: fold a checkpoint's module scales and mean multipliers into ``lora_B``.

    ``model`` is ``PeftModel.from_pretrained(base, checkpoint/adapter)`` (raw LoRA weights at
    the saved rank); ``lora_state`` is what ``lora_state_dict`` saved next to it. Afterwards
    the model is a plain PEFT model whose function is DeepSynapse's with the hypernetwork
    held at ``mean_multipliers``.
    """
    saved = (lora_state or {}).get("module_scales")
    if saved is not None:
        (scales,) = add_module_scales(model)
        if list(saved["names"]) != module_scales(model).names:
            raise ValueError("saved LoRA module scales are for other modules")
        with torch.no_grad():
            scales.copy_(saved["values"])
        bake_module_scales(model)
        remove_module_scales(model)
    if mean_multipliers is not None:
        bake_mean_scales(model, mean_multipliers, per)


class ContextualScaler:
    """Encoder + hypernetwork + hooks: what the trainer and the evaluator call per batch."""

    def __init__(
        self,
        model: nn.Module,
        encoder: ContextEncoder,
        hypernet: LoRAHypernetwork,
        per: Granularity = "layer",
    ):
        expected = num_outputs_for(model, per)
        if hypernet.num_outputs != expected:
            raise ValueError(f"hypernetwork gives {hypernet.num_outputs} outputs, need {expected}")
        self.model = model
        self.encoder = encoder
        self.hypernet = hypernet
        self.per = per

    def multipliers(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] multipliers for these prompts (with grad when grad is enabled)."""
        return self.hypernet(self.encoder.embed(prompt_ids, prompt_mask))

    def scales(self, multipliers: torch.Tensor) -> contextlib.AbstractContextManager:
        return hypernet_scales(self.model, multipliers, self.per, addmm=True)

    @contextlib.contextmanager
    def for_prompts(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> Iterator[RowScales]:
        """Generation: multipliers from the prompts (no grad), applied to every forward inside."""
        with torch.no_grad():
            m = self.multipliers(prompt_ids, prompt_mask)
        with hypernet_scales(self.model, m, self.per, fused=not torch.is_grad_enabled()) as rows:
            yield rows

    @torch.no_grad()
    def mean_multipliers(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, batch_size: int = 64
    ) -> torch.Tensor:
        """Mean multipliers [L] over a set of prompts (e.g. the eval set), for export."""
        parts = [
            self.multipliers(prompt_ids[i : i + batch_size], prompt_mask[i : i + batch_size])
            for i in range(0, prompt_ids.shape[0], batch_size)
        ]
        return torch.cat(parts).mean(0)
