"""Dynamic LoRA (MISSION 3.1 / 3.18): rank growth, nested ranks and per-module scales on PEFT.

Growth. ``grow_lora_rank`` gives every LoRA layer of the active adapter new rank components:
new rows of A drawn like PEFT draws A (kaiming uniform, seeded), new columns of B zero, so
B @ A, and hence the model's function, is unchanged at the moment of growth. PEFT multiplies
the update by ``scaling = alpha / r``; growth keeps each layer's scaling constant by raising
alpha with r (``alpha' = alpha * r' / r``, or ``* sqrt(r' / r)`` under rsLoRA) instead of
rescaling B. Why: rescaling B would also rescale the step size of the directions already
learned (Adam's updates are scale-free, so scaling * lr per step would drop by r / r') and
would need Adam's moments rescaled. The adapter's ``peft_config`` gets the same (r', alpha'),
so ``save_pretrained`` writes a config that ``PeftModel.from_pretrained`` turns back into the
same scaling. The weights are swapped inside the existing ``nn.Linear`` modules (same module
objects, new ``Parameter``): forward hooks on them (module scales, hypernetwork multipliers,
rank truncation) survive growth. AdamW's moments for the old part are carried over, the new
part starts at zero, the step count is kept.

Nested ranks (DyLoRA). ``truncated_rank(model, k)`` makes every LoRA layer use only its first
k rank components in forward (a pre-hook zeroes the others at B's input), scaling unchanged,
so training with k drawn by ``sample_nested_rank`` each step teaches every prefix to work on
its own.

Module scales. ``add_module_scales`` adds one learnable scalar per LoRA module (init 1.0) that
multiplies that module's update (a forward hook on ``lora_B``); ``bake_module_scales`` folds
them into B for export.

Where the extra parameters live. DeepSynapse's own modules (module scales, hypernetwork,
neural memory) are registered in one ``nn.ModuleDict`` attached to the transformers model
(``<causal lm>.deepsynapse_adaptive``): ``.to(device)``, ``accelerator.prepare``,
``named_parameters`` and DDP see them, while PEFT's ``save_pretrained`` (which stores only
tuner layers) does not, so the saved adapter stays a plain PEFT adapter.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

ADAPTIVE_ATTR = "deepsynapse_adaptive"
MODULE_SCALES = "lora_module_scales"  # a "lora_*" segment: locking treats it as LoRA
ROW_SCALES_ATTR = "deepsynapse_row_scales"  # how many hypernet_scales contexts are open


# ------------------------------------------------------------------ finding things


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (``model.layers`` for Llama, Qwen, Mistral, SmolLM...)."""
    lm = causal_lm(model)
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", lm)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}")
    return layers


def active_adapter(model: nn.Module) -> str:
    name = getattr(model, "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else name


def lora_layers(model: nn.Module, adapter: str | None = None) -> list[tuple[str, nn.Module]]:
    """(name relative to the transformers model, PEFT LoRA layer) in module order."""
    from peft.tuners.lora import LoraLayer

    adapter = adapter or active_adapter(model)
    found = []
    for name, module in causal_lm(model).named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            found.append((name, module))
    return found


def lora_layer_indices(model: nn.Module, adapter: str | None = None) -> list[int]:
    """For each LoRA layer (``lora_layers`` order), the index of the decoder block holding it."""
    owner = {}
    for i, block in enumerate(decoder_layers(model)):
        for m in block.modules():
            owner[id(m)] = i
    indices = []
    for name, layer in lora_layers(model, adapter):
        if id(layer) not in owner:
            raise ValueError(f"LoRA module {name} is outside the decoder layers")
        indices.append(owner[id(layer)])
    return indices


def any_lora_layer(model: nn.Module) -> nn.Module | None:
    """One LoRA layer, to read whether the adapters are switched off (the reference policy)."""
    layers = lora_layers(model) if hasattr(model, "peft_config") else []
    return layers[0][1] if layers else None


def adapters_disabled(probe: nn.Module | None) -> bool:
    return probe is not None and bool(probe.disable_adapters)


# ------------------------------------------------------------------ the adaptive container


def adaptive_modules(model: nn.Module) -> nn.ModuleDict:
    """The ``ModuleDict`` holding DeepSynapse's extra modules inside the transformers model."""
    lm = causal_lm(model)
    container = getattr(lm, ADAPTIVE_ATTR, None)
    if container is None:
        container = nn.ModuleDict()
        lm.add_module(ADAPTIVE_ATTR, container)
    return container


def register_adaptive(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` inside the model (device moves, optimizer, DDP) under ``name``."""
    container = adaptive_modules(model)
    if name in container and container[name] is not module:
        raise ValueError(f"an adaptive module named {name!r} is already registered")
    device = next((p.device for p in causal_lm(model).parameters()), None)
    container[name] = module.to(device) if device is not None else module


def unregister_adaptive(model: nn.Module, name: str) -> None:
    container = adaptive_modules(model)
    if name in container:
        del container[name]


# ------------------------------------------------------------------ rank growth


def current_rank(model: nn.Module) -> int:
    """The largest LoRA rank of the active adapter (growth keeps all layers equal)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    adapter = active_adapter(model)
    return max(layer.r[adapter] for _, layer in layers)


def _alpha_for(scaling: float, r: int, rslora: bool) -> float | int:
    alpha = scaling * (math.sqrt(r) if rslora else r)
    rounded = round(alpha)
    return rounded if abs(alpha - rounded) < 1e-9 * max(1.0, abs(alpha)) else alpha


def grow_lora_rank(
    model: nn.Module, new_r: int, optimizer: Any = None, *, seed: int = 0
) -> dict[str, int]:
    """Grow every LoRA layer of the active adapter to rank ``new_r`` without changing outputs.

    ``optimizer`` (a torch optimizer or accelerate's ``AcceleratedOptimizer``) gets the new
    parameters in place of the old ones, with the old part's state carried over. Under DDP the
    caller must wrap the model again afterwards (DDP holds the old parameters).
    """
    adapter = active_adapter(model)
    layers = lora_layers(model, adapter)
    if not layers:
        raise ValueError("the model has no LoRA layers to grow")
    old_ranks = {layer.r[adapter] for _, layer in layers}
    if max(old_ranks) > new_r:
        raise ValueError(f"cannot shrink LoRA rank from {max(old_ranks)} to {new_r}")
    gen = torch.Generator().manual_seed(seed)
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter, int]] = {}
    added = 0
    for _, layer in layers:
        r = layer.r[adapter]
        if r == new_r:
            continue
        if getattr(layer, "lora_variant", {}).get(adapter) is not None or layer.use_dora.get(
            adapter, False
        ):
            raise ValueError("rank growth supports plain LoRA only (no DoRA or other variants)")
        a_mod, b_mod = layer.lora_A[adapter], layer.lora_B[adapter]
        a_old, b_old = a_mod.weight, b_mod.weight
        extra = torch.empty(new_r - r, a_old.shape[1], dtype=torch.float32)
        nn.init.kaiming_uniform_(extra, a=math.sqrt(5), generator=gen)  # PEFT's init of A
        a_new = nn.Parameter(
            torch.cat([a_old.detach(), extra.to(a_old)], 0), requires_grad=a_old.requires_grad
        )
        b_new = nn.Parameter(
            torch.cat([b_old.detach(), b_old.new_zeros(b_old.shape[0], new_r - r)], 1),
            requires_grad=b_old.requires_grad,
        )
        a_mod.weight, a_mod.out_features = a_new, new_r
        b_mod.weight, b_mod.in_features = b_new, new_r
        replaced[id(a_old)] = (a_old, a_new, 0)
        replaced[id(b_old)] = (b_old, b_new, 1)
        added += a_new.numel() - a_old.numel() + b_new.numel() - b_old.numel()
        scaling = layer.scaling[adapter]
        layer.r[adapter] = new_r
        layer.lora_alpha[adapter] = _alpha_for(scaling, new_r, layer.use_rslora.get(adapter, False))
        layer.scaling[adapter] = scaling  # exactly the old value, not alpha' / r' recomputed
    if optimizer is not None:
        _carry_optimizer_state(getattr(optimizer, "optimizer", optimizer), replaced)
    _sync_peft_config(model, adapter)
    return {
        "old_rank": max(old_ranks),
        "new_rank": new_r,
        "layers": len(layers),
        "added_parameters": added,
        "lora_parameters": count_lora_parameters(model),
    }


def _carry_optimizer_state(
    optimizer: torch.optim.Optimizer, replaced: dict[int, tuple[nn.Parameter, nn.Parameter, int]]
) -> None:
    """Swap grown parameters into the param groups; pad their state with zeros for the new part."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if id(p) not in replaced:
                continue
            old, new, dim = replaced[id(p)]
            group["params"][i] = new
            state = optimizer.state.pop(old, None)
            if not state:
                continue
            carried = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == old.shape:
                    pad_shape = list(value.shape)
                    pad_shape[dim] = new.shape[dim] - old.shape[dim]
                    value = torch.cat([value, value.new_zeros(pad_shape)], dim)
                elif isinstance(value, torch.Tensor):
                    value = value.clone()
                carried[key] = value
            optimizer.state[new] = carried


def _sync_peft_config(model: nn.Module, adapter: str) -> None:
    """Write the layers' ranks and alphas into the adapter's config (what save_pretrained saves)."""
    config = getattr(model, "peft_config", {}).get(adapter)
    if config is None:
        return
    layers = lora_layers(model, adapter)
    ranks = {name: layer.r[adapter] for name, layer in layers}
    alphas = {name: layer.lora_alpha[adapter] for name, layer in layers}
    config.r = Counter(ranks.values()).most_common(1)[0][0]
    config.lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    config.rank_pattern = {n: r for n, r in ranks.items() if r != config.r}
    config.alpha_pattern = {n: a for n, a in alphas.items() if a != config.lora_alpha}


# ------------------------------------------------------------------ nested ranks (DyLoRA)


def sample_nested_rank(layer_rank: int, rng: random.Random, min_rank: int = 1) -> int:
    """A rank drawn uniformly from [min_rank, layer_rank] for one nested-rank training step."""
    if not 1 <= min_rank <= layer_rank:
        raise ValueError(f"need 1 <= min_rank ({min_rank}) <= layer_rank ({layer_rank})")
    return rng.randint(min_rank, layer_rank)


@contextlib.contextmanager
def truncated_rank(model: nn.Module, k: int) -> Iterator[None]:
    """Inside, each LoRA layer uses only its first ``k`` rank components (scaling unchanged)."""
    if k < 1:
        raise ValueError(f"truncated rank must be >= 1, got {k}")
    adapter = active_adapter(model)
    handles = []
    for _, layer in lora_layers(model, adapter):
        r = layer.r[adapter]
        if k >= r:
            continue
        b = layer.lora_B[adapter]
        keep = torch.zeros(r, device=b.weight.device, dtype=b.weight.dtype)
        keep[:k] = 1.0

        def mask_input(module: nn.Module, args: tuple, keep: torch.Tensor = keep) -> tuple:
            return (args[0] * keep.to(args[0].dtype), *args[1:])

        handles.append(b.register_forward_pre_hook(mask_input))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ merged for generation


def plain_lora(layer: nn.Module, adapter: str, allowed_hooks: set[int]) -> bool:
    """Plain LoRA on a plain ``nn.Linear``, with no hooks but module scales' on its A and B,
    and PEFT's own forward (not one swapped in for decoding, as ``hypernet_scales`` does)."""
    a, b = layer.lora_A[adapter], layer.lora_B[adapter]
    return (
        type(layer.base_layer) is nn.Linear
        and "forward" not in vars(layer)
        and not layer.merged
        and not getattr(layer, "use_dora", {}).get(adapter, False)
        and b.bias is None
        and not a._forward_hooks
        and not a._forward_pre_hooks
        and not b._forward_pre_hooks
        and set(b._forward_hooks) <= allowed_hooks
    )


def swappable_lora(layer: nn.Module, adapter: str, allowed_hooks: set[int]) -> bool:
    """Plain LoRA whose dropout does nothing: its forward can be replaced by the same
    function in fewer operations (``addmm_forward``, the hypernetwork's decoding forward)."""
    drop = layer.lora_dropout[adapter]
    return plain_lora(layer, adapter, allowed_hooks) and (
        isinstance(drop, nn.Identity) or not drop.training
    )


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[bool]:
    """Inside, each LoRA update is folded into a copy of its base weight and the adapter is
    bypassed: one matmul per linear layer instead of three, about twice the decoding speed
    on CPU. Yields whether it merged.

    Why a copy: merging in place and subtracting afterwards does not give back a bf16 base
    weight bit for bit, and the base is also the KL reference. The original tensors are put
    back on exit. Nothing is merged (yields False) when a layer carries anything beyond plain
    LoRA and module scales: per-row hypernetwork scales, truncated nested ranks, DoRA.
    """
    layers = lora_layers(model) if hasattr(model, "get_base_model") else []
    adapter = active_adapter(model) if layers else ""
    allowed = module_scale_hooks(model)
    if (
        not layers
        or any(layer.disable_adapters for _, layer in layers)
        or not all(plain_lora(layer, adapter, allowed) for _, layer in layers)
    ):
        yield False
        return
    factor = module_scale_factors(model)
    originals = []
    try:
        with torch.no_grad():
            for name, layer in layers:
                base = layer.base_layer
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                scale = layer.scaling[adapter] * factor.get(name, 1.0)
                merged = torch.addmm(base.weight.float(), b.float(), a.float(), alpha=scale)
                originals.append((layer, base.weight.data))
                base.weight.data = merged.to(base.weight.dtype)
                # PEFT's own "merged" state: forward calls the base layer alone, and the
                # adapter still counts as enabled (the neural memory reads that flag)
                layer.merged_adapters = [adapter]
        yield True
    finally:
        for layer, weight in originals:
            layer.base_layer.weight.data = weight
            layer.merged_adapters = []


def row_scaled(model: nn.Module) -> bool:
    """Whether per-row LoRA scales (the hypernetwork's, ``hypernet_scales``) are installed:
    then a token's output depends on its row's prompt, so no forward may share its work
    across rows beyond the row's own prompt."""
    return getattr(causal_lm(model), ROW_SCALES_ATTR, 0) > 0


def replayed_in_backward(model: nn.Module) -> bool:
    """Whether a forward with gradients replays its layers in backward (gradient
    checkpointing): the replay must run the same code, so nothing swapped for one call."""
    if torch.is_grad_enabled() and model.training:
        return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    return False


def module_scale_columns(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Each LoRA module's (scales vector, its index) by name (empty without module scales):
    what a swapped forward multiplies by, with the scale's gradient."""
    scales = module_scales(model)
    if scales is None:
        return {}
    return {name: (scales.scales, i) for i, name in enumerate(scales.names)}


@contextlib.contextmanager
def addmm_lora(model: nn.Module) -> Iterator[int]:
    """Inside, each plain LoRA layer (no hook but a module scale's, no dropout) computes
    ``base(x) + s (x A^T) B^T`` with the scaling and the add inside one ``addmm``. Yields how
    many layers it swapped.

    Why: PEFT's forward multiplies the update by its scaling at the output's full width and
    adds it in a second pass, and backward repeats the multiply, on every adapted layer: in
    a warm-up step on one AMX core those element-wise passes cost about as much as the
    base's matmuls. ``addmm`` scales the rank-wide product instead and adds in the kernel;
    the function and its gradients are the same. A module scale moves onto the rank-wide
    product too (its gradient unchanged); layers with other hooks (the hypernetwork's rows,
    nested ranks) keep PEFT's forward.
    """
    layers = lora_layers(model) if hasattr(model, "get_base_model") else []
    adapter = active_adapter(model) if layers else ""
    columns = module_scale_columns(model) if layers else {}
    allowed = module_scale_hooks(model) if layers else set()
    swapped = []
    try:
        for name, layer in layers:
            if swappable_lora(layer, adapter, allowed):
                layer.forward = addmm_forward(layer, adapter, columns.get(name))
                swapped.append(layer)
        yield len(swapped)
    finally:
        for layer in swapped:
            del layer.forward  # PEFT's own again


def addmm_forward(
    layer: nn.Module,
    adapter: str,
    module_scale: tuple[torch.Tensor, int] | None = None,
    row_scale: Callable[[int], torch.Tensor] | None = None,
) -> Callable[..., torch.Tensor]:
    """``layer``'s forward as ``base(x) + s ((x A^T) * rows * ms) B^T``, gradients to every
    factor: the scales multiply the rank-wide product, not the full-width output as their
    hooks on ``lora_B`` would. ``module_scale``: (the scales' vector, this layer's index);
    ``row_scale(n)``: the [n] multipliers of an n-row batch (the hypernetwork's)."""
    base = layer.base_layer
    a = layer.lora_A[adapter].weight  # [r, in]
    b = layer.lora_B[adapter].weight  # [out, r]
    scaling = layer.scaling[adapter]
    peft_forward = type(layer).forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (
            layer.disable_adapters
            or adapter not in layer.active_adapters
            or kwargs.get("adapter_names") is not None
        ):
            return peft_forward(layer, x, *args, **kwargs)
        autocast = torch.is_autocast_enabled(x.device.type)
        # Where the base and the adapter share a dtype (fp32), the update is added into the
        # base's fresh 2-D output in place: its backward keeps x and W, not the output, and
        # torch.addmm would first copy it at full width (~4% of a warm-up step in fp32)
        in_place = (
            not (autocast or args or kwargs) and type(base) is nn.Linear and x.dtype == a.dtype
        )
        out = base(x.reshape(-1, x.shape[-1])) if in_place else base(x, *args, **kwargs)
        h = nn.functional.linear(x if autocast else x.to(a.dtype), a)
        if row_scale is not None:
            h = h * row_scale(h.shape[0]).to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
        if module_scale is not None:
            vector, i = module_scale
            h = h * vector[i].to(h.dtype)
        if in_place:
            out.addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling)
            return out.view(*x.shape[:-1], out.shape[-1])
        if not (autocast or h.dtype == out.dtype):  # fp32 adapters on a bf16 base, no autocast
            return out + nn.functional.linear(h * scaling, b).to(out.dtype)
        flat = torch.addmm(
            out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling
        )
        return flat.view(out.shape)

    return forward


# ------------------------------------------------------------------ per-module scales


class ModuleScales(nn.Module):
    """One learnable scalar per LoRA module (one vector, init 1) multiplying its update."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.scales = nn.Parameter(torch.ones(len(names)))
        self._handles: list[Any] = []

    def extra_repr(self) -> str:
        return f"modules={len(self.names)}"


def module_scale_factors(model: nn.Module) -> dict[str, float]:
    """Each LoRA module's current output scale by name (empty without module scales)."""
    scales = module_scales(model)
    if scales is None:
        return {}
    return dict(zip(scales.names, scales.scales.detach().tolist(), strict=True))


def module_scale_hooks(model: nn.Module) -> set[int]:
    """The ids of the module scales' hooks on ``lora_B`` (what ``plain_lora`` allows)."""
    scales = module_scales(model)
    return {h.id for h in scales._handles} if scales is not None else set()


def module_scales(model: nn.Module) -> ModuleScales | None:
    container = getattr(causal_lm(model), ADAPTIVE_ATTR, None)
    return (
        container[MODULE_SCALES] if container is not None and MODULE_SCALES in container else None
    )


def add_module_scales(model: nn.Module) -> list[nn.Parameter]:
    """Give each LoRA module of the active adapter a learnable output scale (init 1.0).

    Returns the new parameters (one vector of per-module scalars) for the optimizer; they are
    also registered inside the model, so ``trainable_parameters(policy)`` finds them.
    """
    existing = module_scales(model)
    if existing is not None:
        return [existing.scales]
    adapter = active_adapter(model)
    layers = lora_layers(model, adapter)
    if not layers:
        raise ValueError("the model has no LoRA layers to scale")
    scales = ModuleScales([name for name, _ in layers])
    register_adaptive(model, MODULE_SCALES, scales)
    for i, (_, layer) in enumerate(layers):

        def scale_output(module: nn.Module, args: tuple, out: torch.Tensor, i: int = i):
            return out * scales.scales[i].to(out.dtype)

        scales._handles.append(layer.lora_B[adapter].register_forward_hook(scale_output))
    return [scales.scales]


def remove_module_scales(model: nn.Module) -> None:
    """Drop the scale hooks and parameters (bake them first to keep their effect)."""
    scales = module_scales(model)
    if scales is None:
        return
    for h in scales._handles:
        h.remove()
    scales._handles.clear()
    unregister_adaptive(model, MODULE_SCALES)


@torch.no_grad()
def bake_module_scales(model: nn.Module) -> None:
    """Fold each module's scale into its ``lora_B`` and reset the scales to 1 (same function)."""
    scales = module_scales(model)
    if scales is None:
        return
    adapter = active_adapter(model)
    by_name = dict(lora_layers(model, adapter))
    for name, s in zip(scales.names, scales.scales, strict=True):
        b = by_name[name].lora_B[adapter]
        b.weight.mul_(s.to(b.weight.dtype))
        if b.bias is not None:
            b.bias.mul_(s.to(b.bias.dtype))
    scales.scales.fill_(1.0)


def module_scale_stats(model: nn.Module) -> dict[str, float]:
    """``lora/module_scale_{mean,min,max}`` for the step's metrics (empty when scales are off)."""
    scales = module_scales(model)
    if scales is None:
        return {}
    s = scales.scales.detach().float()
    return {
        "lora/module_scale_mean": float(s.mean()),
        "lora/module_scale_min": float(s.min()),
        "lora/module_scale_max": float(s.max()),
    }


# ------------------------------------------------------------------ state and counts


def lora_state_dict(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint needs beyond the PEFT adapter files: the rank and the module scales."""
    scales = module_scales(model)
    return {
        "rank": current_rank(model),
        "module_scales": None
        if scales is None
        else {"names": list(scales.names), "values": scales.scales.detach().cpu().clone()},
    }


def load_lora_state_dict(model: nn.Module, state: dict[str, Any], optimizer: Any = None) -> None:
    """Grow to the saved rank and restore the module scales; load adapter weights *after* this.

    ``optimizer`` must be the one built on the fresh model, so that its parameters are the
    grown ones before ``optimizer.load_state_dict`` runs.
    """
    rank = int(state["rank"])
    if current_rank(model) < rank:
        grow_lora_rank(model, rank, optimizer)
    saved = state.get("module_scales")
    if saved is not None:
        scales = module_scales(model)
        if scales is None:
            raise ValueError("checkpoint has LoRA module scales: call add_module_scales first")
        if list(saved["names"]) != scales.names:
            raise ValueError("checkpoint's LoRA module scales are for other modules")
        with torch.no_grad():
            scales.scales.copy_(saved["values"])


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values in ``module`` (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def count_lora_parameters(model: nn.Module) -> int:
    """LoRA A and B values of the active adapter, plus module scales if present."""
    adapter = active_adapter(model)
    total = 0
    for _, layer in lora_layers(model, adapter):
        total += count_parameters(layer.lora_A[adapter]) + count_parameters(layer.lora_B[adapter])
    scales = module_scales(model)
    return total + (count_parameters(scales) if scales is not None else 0)
